package qemu

import (
	"net/http"
	"net/http/httptest"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/fireactions/fireactions/internal/metadata"
	"github.com/fireactions/fireactions/internal/vm"
)

func argAfter(args []string, flag string) []string {
	var vals []string
	for i, a := range args {
		if a == flag && i+1 < len(args) {
			vals = append(vals, args[i+1])
		}
	}
	return vals
}

func TestBuildArgs(t *testing.T) {
	spec := (vm.Spec{
		ID: "vm1", Kernel: "/k/vmlinux", VCPUs: 4, SMT: true, MemoryMiB: 1024, BootArgs: "quiet console=hvc0",
		Drives: []vm.Drive{
			{Path: "/images/base,v1.ext4", ReadOnly: true, Role: vm.RoleBase},
			{Path: "/vms/vm1/scratch.ext4", Role: vm.RoleScratch},
			{Path: "/data/cache.ext4", Role: vm.RoleExtra},
		},
		Interfaces: []vm.Interface{{TapName: "tap0", MTU: 1400}},
		Metadata:   []byte(`{}`),
	}).WithDefaults()
	args := buildArgs(cmdline{spec: &spec, dir: "/vms/vm1", kvm: false, initrd: "/vms/vm1/initrd",
		consoleLog: "/vms/vm1/console.log", metadataCmd: []string{"/usr/bin/fireactions", MetadataHelperArg, "--doc", "/vms/vm1/metadata.json"}})

	if got := argAfter(args, "-smp"); !slices.Equal(got, []string{"4,sockets=1,cores=2,threads=2"}) {
		t.Errorf("-smp %v", got)
	}
	if got := argAfter(args, "-accel"); !slices.Equal(got, []string{"tcg"}) {
		t.Errorf("-accel %v", got)
	}
	app := argAfter(args, "-append")[0]
	for _, want := range []string{"quiet", "console=hvc0", "panic=-1", "tsc_early_khz=2000000", "lpj=4000000"} {
		if !slices.Contains(strings.Fields(app), want) {
			t.Errorf("-append %q lacks %s", app, want)
		}
	}
	if strings.Contains(app, "console=ttyS0") {
		t.Errorf("-append %q overrides the caller's console", app)
	}
	drives := argAfter(args, "-drive")
	if len(drives) != 3 || !strings.Contains(drives[0], "file=/images/base,,v1.ext4,readonly=on") ||
		strings.Contains(drives[1], "readonly") || !strings.Contains(drives[1], "discard=unmap") {
		t.Errorf("-drive %q", drives)
	}
	devs := strings.Join(argAfter(args, "-device"), " ")
	for _, want := range []string{"serial=base", "serial=scratch", "serial=extra2", "host_mtu=1400", "mac=" + mmdsMAC("vm1")} {
		if !strings.Contains(devs, want) {
			t.Errorf("-device %s lacks %s", devs, want)
		}
	}
	nets := argAfter(args, "-netdev")
	if len(nets) != 2 || !strings.HasPrefix(nets[0], "tap,id=net0,ifname=tap0,script=no,downscript=no") ||
		!strings.Contains(nets[1], "restrict=on") || !strings.Contains(nets[1], "guestfwd=tcp:169.254.169.254:80-cmd:'/usr/bin/fireactions' '"+MetadataHelperArg+"'") {
		t.Errorf("-netdev %q", nets)
	}
	if got := argAfter(args, "-pidfile"); !slices.Equal(got, []string{"/vms/vm1/vmm.pid"}) {
		t.Errorf("-pidfile %v: the VM directory must be in the command line", got)
	}

	kvm := buildArgs(cmdline{spec: &spec, dir: "/vms/vm1", kvm: true, consoleLog: "/c"})
	if got := argAfter(kvm, "-cpu"); !slices.Equal(got, []string{"host"}) {
		t.Errorf("KVM -cpu %v", got)
	}
	if a := argAfter(kvm, "-append")[0]; strings.Contains(a, "tsc_early_khz") {
		t.Errorf("KVM -append %q carries TCG workarounds", a)
	}
	if slices.Contains(kvm, "-initrd") || len(argAfter(kvm, "-netdev")) != 1 {
		t.Errorf("unexpected initrd or metadata NIC: %q", kvm)
	}
}

// shellJoin's output must parse back to the same argv, as slirp's
// g_shell_parse_argv (POSIX shell quoting) does.
func TestShellJoinRoundTrip(t *testing.T) {
	argv := []string{"/opt/fire actions/bin", "it's", `back\slash`, "$HOME", "a,b", ""}
	out, err := exec.Command("sh", "-c", "eval \"set -- $1\"; for a in \"$@\"; do printf '<%s>\\n' \"$a\"; done", "sh", shellJoin(argv)).Output()
	if err != nil {
		t.Fatal(err)
	}
	var want strings.Builder
	for _, a := range argv {
		want.WriteString("<" + a + ">\n")
	}
	if string(out) != want.String() {
		t.Fatalf("round trip:\n%s\nwant:\n%s", out, want.String())
	}
}

func TestStatelessV2Tokens(t *testing.T) {
	doc, err := metadata.New(metadata.Input{InstanceID: "i-v2"})
	if err != nil {
		t.Fatal(err)
	}
	inner, err := metadata.NewHandler(doc, metadata.V1)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Unix(1_000_000, 0)
	key := []byte("0123456789abcdef0123456789abcdef")
	issuer := &statelessV2{key: key, next: inner, now: func() time.Time { return now }}
	// Another process: same key, no shared memory.
	checker := &statelessV2{key: key, next: inner, now: func() time.Time { return now }}

	do := func(h http.Handler, method, path string, hdr map[string]string) *httptest.ResponseRecorder {
		r := httptest.NewRequest(method, path, nil)
		for k, v := range hdr {
			r.Header.Set(k, v)
		}
		w := httptest.NewRecorder()
		h.ServeHTTP(w, r)
		return w
	}
	if w := do(checker, "GET", "/latest/meta-data/instance-id", nil); w.Code != http.StatusUnauthorized {
		t.Fatalf("GET without token: %d", w.Code)
	}
	if w := do(issuer, "PUT", metadata.TokenPath, map[string]string{"X-metadata-token-ttl-seconds": "0"}); w.Code != http.StatusBadRequest {
		t.Fatalf("PUT with ttl 0: %d", w.Code)
	}
	if w := do(issuer, "PUT", metadata.TokenPath, map[string]string{"X-metadata-token-ttl-seconds": "60", "X-Forwarded-For": "10.0.0.1"}); w.Code != http.StatusBadRequest {
		t.Fatalf("PUT through a proxy: %d", w.Code)
	}
	w := do(issuer, "PUT", metadata.TokenPath, map[string]string{"X-aws-ec2-metadata-token-ttl-seconds": "60"})
	if w.Code != http.StatusOK {
		t.Fatalf("PUT token: %d %s", w.Code, w.Body)
	}
	token := w.Body.String()
	w = do(checker, "GET", "/latest/meta-data/instance-id", map[string]string{"X-metadata-token": token})
	if w.Code != http.StatusOK || w.Body.String() != "i-v2" {
		t.Fatalf("GET with token: %d %q", w.Code, w.Body)
	}
	b := []byte(token)
	b[10] ^= 1 // still base64url, different bytes
	forged := string(b)
	if w := do(checker, "GET", "/latest/meta-data/instance-id", map[string]string{"X-metadata-token": forged}); w.Code != http.StatusUnauthorized {
		t.Fatalf("GET with a forged token: %d", w.Code)
	}
	now = now.Add(61 * time.Second)
	if w := do(checker, "GET", "/latest/meta-data/instance-id", map[string]string{"X-metadata-token": token}); w.Code != http.StatusUnauthorized {
		t.Fatalf("GET with an expired token: %d", w.Code)
	}
}
