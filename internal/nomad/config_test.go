package nomad

import (
	"context"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	hclog "github.com/hashicorp/go-hclog"
	goversion "github.com/hashicorp/go-version"
	"github.com/hashicorp/nomad/helper/pluginutils/hclutils"
	"github.com/hashicorp/nomad/plugins/base"
	"github.com/hashicorp/nomad/plugins/drivers"

	"github.com/fireactions/fireactions/internal/vm/firecracker"
)

// The task config block decodes with the original driver's attribute
// names, including both ways of writing OCIAuth (the original's examples
// use `OCIAuth = {...}`).
func TestTaskConfigSchema(t *testing.T) {
	for _, auth := range []string{
		`OCIAuth = { Username = "u" Password = "p" }`,
		`OCIAuth { Username = "u" Password = "p" }`,
	} {
		var cfg TaskConfig
		hclutils.NewConfigParser(taskConfigSpec).ParseHCL(t, `config {
  OCIImage    = "ubuntu:22.04"
  `+auth+`
  KernelImage = "/opt/firecracker/vmlinux"
  Vcpus       = 2
  Mem         = 1024
  Cputype     = "T2"
  DisableHt   = true
  BootOptions = "console=ttyS0"
  Nic {
    Ip          = "192.168.50.10/24"
    Gateway     = "192.168.50.1"
    Interface   = "tap0"
    Nameservers = ["192.168.50.1"]
  }
  Disks       = ["/data/disk.ext4:rw"]
  Firecracker = "/usr/bin/firecracker"
  Log         = "local/vm.log"
  Backend     = "qemu"
  Command     = "/bin/sh"
  Args        = ["-c", "true"]
  DiskSize    = "2GiB"
}`, &cfg)
		want := TaskConfig{
			OCIImage: "ubuntu:22.04", OCIAuth: &OCIAuth{Username: "u", Password: "p"},
			KernelImage: "/opt/firecracker/vmlinux", Vcpus: 2, Mem: 1024, Cputype: "T2", DisableHt: true,
			BootOptions: "console=ttyS0",
			Nic:         &Nic{Ip: "192.168.50.10/24", Gateway: "192.168.50.1", Interface: "tap0", Nameservers: []string{"192.168.50.1"}},
			Disks:       []string{"/data/disk.ext4:rw"}, Firecracker: "/usr/bin/firecracker", Log: "local/vm.log",
			Backend: "qemu", Command: "/bin/sh", Args: []string{"-c", "true"}, DiskSize: "2GiB",
		}
		if !reflect.DeepEqual(cfg, want) {
			t.Errorf("%s:\n got %+v\nwant %+v", auth, cfg, want)
		}
	}
}

// Each invalid task config is rejected before anything starts, naming the
// attribute and the fix.
func TestInvalidTaskConfigs(t *testing.T) {
	e := newEnv(t)
	d, h := e.driver(t)
	outside := filepath.Join(e.dir, "outside.ext4")
	if err := os.WriteFile(outside, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	allowedDisk := filepath.Join(e.dir, "allowed", "disk.ext4")
	if err := os.WriteFile(allowedDisk, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	// A link inside the allowed directory must not lead outside it.
	link := filepath.Join(e.dir, "allowed", "link.ext4")
	if err := os.Symlink(outside, link); err != nil {
		t.Fatal(err)
	}
	const img = "127.0.0.1:1/none:latest"
	cases := []struct {
		name string
		cfg  TaskConfig
		want []string
	}{
		{"no root", TaskConfig{}, []string{"OCIImage: required"}},
		{"image and boot disk", TaskConfig{OCIImage: img, BootDisk: allowedDisk}, []string{"BootDisk: OCIImage and BootDisk are exclusive"}},
		{"bad reference", TaskConfig{OCIImage: "Not A Ref"}, []string{`OCIImage: "Not A Ref" is not an image reference`}},
		{"auth without password", TaskConfig{OCIImage: img, OCIAuth: &OCIAuth{Username: "u"}}, []string{"OCIAuth: both Username and Password are required"}},
		{"auth with boot disk", TaskConfig{BootDisk: allowedDisk, OCIAuth: &OCIAuth{Username: "u", Password: "p"}}, []string{"OCIAuth: only applies to OCIImage"}},
		{"boot disk outside", TaskConfig{BootDisk: outside}, []string{"BootDisk: " + outside + " is outside the task's allocation directory and allowed_image_paths"}},
		{"boot disk through a link", TaskConfig{BootDisk: link}, []string{"BootDisk: " + link + " is outside"}},
		{"boot disk missing", TaskConfig{BootDisk: "/nonexistent/root.ext4"}, []string{"BootDisk: /nonexistent/root.ext4: no such file or directory"}},
		{"kernel outside", TaskConfig{OCIImage: img, KernelImage: outside}, []string{"KernelImage: " + outside + " is outside"}},
		{"vcpus", TaskConfig{OCIImage: img, Vcpus: 64}, []string{"Vcpus: 64 is outside 1..32"}},
		{"negative vcpus", TaskConfig{OCIImage: img, Vcpus: -1}, []string{"Vcpus: -1 is outside 1..32"}},
		{"mem", TaskConfig{OCIImage: img, Mem: 16}, []string{"Mem: 16 MiB is outside 64..1048576"}},
		{"cputype", TaskConfig{OCIImage: img, Cputype: "X9"}, []string{`Cputype: "X9" is not one of None, T2, T2S, T2CL, T2A, C3`}},
		{"disk size", TaskConfig{OCIImage: img, DiskSize: "1KiB"}, []string{"DiskSize: 1KiB is too small"}},
		{"disk size unit", TaskConfig{OCIImage: img, DiskSize: "lots"}, []string{"DiskSize: "}},
		{"disk without mode", TaskConfig{OCIImage: img, Disks: []string{allowedDisk}}, []string{"Disks[0]: disk", "write PATH:ro or PATH:rw"}},
		{"disk mode", TaskConfig{OCIImage: img, Disks: []string{allowedDisk + ":rx"}}, []string{`Disks[0]: disk`, `access "rx" is not ro or rw`}},
		{"disk outside", TaskConfig{OCIImage: img, Disks: []string{allowedDisk + ":ro", outside + ":rw"}}, []string{"Disks[1]: " + outside + " is outside the task's allocation directory and allowed_disk_paths"}},
		{"network and nic", TaskConfig{OCIImage: img, Network: "default", Nic: &Nic{Ip: "10.1.0.2/24", Interface: "tap9"}}, []string{"Nic: Network and Nic are exclusive"}},
		{"unknown network", TaskConfig{OCIImage: img, Network: "nonet"}, []string{`Network: CNI network "nonet"`, "cni_conf_dir"}},
		{"nic network address", TaskConfig{OCIImage: img, Nic: &Nic{Ip: "192.168.50.0/24", Interface: "tap9"}}, []string{"Nic.Ip: 192.168.50.0 is the network address of 192.168.50.0/24; give the guest's own address"}},
		{"nic gateway", TaskConfig{OCIImage: img, Nic: &Nic{Ip: "192.168.50.10/24", Gateway: "10.0.0.1", Interface: "tap9"}}, []string{"Nic.Gateway: 10.0.0.1 is outside 192.168.50.0/24"}},
		{"nic interface", TaskConfig{OCIImage: img, Nic: &Nic{Ip: "192.168.50.10/24", Interface: "a-name-far-too-long"}}, []string{"Nic.Interface: "}},
		{"nic nameserver", TaskConfig{OCIImage: img, Nic: &Nic{Ip: "192.168.50.10/24", Interface: "tap9", Nameservers: []string{"dns"}}}, []string{`Nic.Nameservers[0]: "dns" is not an IP address`}},
		{"backend", TaskConfig{OCIImage: img, Backend: "xen"}, []string{`Backend: "xen" is not auto, firecracker or qemu`}},
		{"firecracker binary", TaskConfig{OCIImage: img, Firecracker: "/opt/other/firecracker"}, []string{`Firecracker: "/opt/other/firecracker" is not the Firecracker binary this plugin runs`}},
		{"firecracker with qemu", TaskConfig{OCIImage: img, Backend: "qemu", Firecracker: "firecracker"}, []string{`Firecracker: names a Firecracker binary, but Backend is "qemu"`}},
		{"log outside", TaskConfig{OCIImage: img, Log: "/etc/fireactions-test.log"}, []string{"Log: /etc/fireactions-test.log is outside the task's allocation directory"}},
		{"everything at once", TaskConfig{Vcpus: 99, Mem: 1, Backend: "x"}, []string{"OCIImage: required", "Vcpus: 99", "Mem: 1 MiB", `Backend: "x"`}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			tc := bareTask(t, "bad", &c.cfg)
			_, _, err := h.StartTask(tc)
			if err == nil {
				t.Fatal("accepted")
			}
			t.Logf("%s", err)
			for _, w := range c.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q\nlacks %q", err, w)
				}
			}
		})
	}
	if ents, _ := os.ReadDir(filepath.Join(e.pc.DataDir, "vms")); len(ents) > 0 {
		t.Errorf("invalid configs created VMs: %v", ents)
	}
	if len(d.tasks) != 0 {
		t.Errorf("invalid configs left tasks: %v", d.tasks)
	}
}

// Paths in the task's allocation directory are allowed without any
// plugin setting; relative paths are in the task directory.
func TestAllowedPaths(t *testing.T) {
	dir := t.TempDir()
	alloc := filepath.Join(dir, "alloc")
	taskDir := filepath.Join(alloc, "web")
	for _, d := range []string{filepath.Join(taskDir, "local"), filepath.Join(dir, "images")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	inTask := filepath.Join(taskDir, "local", "root.ext4")
	inImages := filepath.Join(dir, "images", "root.ext4")
	for _, f := range []string{inTask, inImages} {
		if err := os.WriteFile(f, []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if p, err := allowedFile("local/root.ext4", taskDir, alloc, nil, "allowed_image_paths"); err != nil || p != inTask {
		t.Errorf("relative path in the task dir: %q, %v", p, err)
	}
	if _, err := allowedFile(inImages, taskDir, alloc, nil, "allowed_image_paths"); err == nil || !strings.Contains(err.Error(), "allows no other paths") {
		t.Errorf("no allowed paths: %v", err)
	}
	if p, err := allowedFile(inImages, taskDir, alloc, []string{filepath.Join(dir, "images")}, "allowed_image_paths"); err != nil || p != inImages {
		t.Errorf("allowed path: %q, %v", p, err)
	}
	if _, err := allowedFile(filepath.Join(dir, "images"), taskDir, alloc, []string{dir}, "allowed_image_paths"); err == nil {
		t.Error("a directory was accepted as a file")
	}
	if p, err := logPath("local/vm.log", taskDir, alloc); err != nil || p != filepath.Join(taskDir, "local", "vm.log") {
		t.Errorf("log path: %q, %v", p, err)
	}
	if _, err := logPath("../../escape.log", taskDir, alloc); err == nil {
		t.Error("a log path escaping the allocation was accepted")
	}
}

// The plugin block: defaults, and each bad field named.
func TestPluginConfig(t *testing.T) {
	pc := PluginConfig{}.withDefaults()
	if err := pc.validate(); err != nil {
		t.Fatalf("defaults: %v", err)
	}
	if pc.DataDir != DefaultDataDir || pc.ImageCacheDir != DefaultImageCacheDir || pc.Backend != "auto" || pc.PullPolicy != "IfNotPresent" || pc.CNIConfDir != "/etc/cni/conf.d" {
		t.Errorf("defaults: %+v", pc)
	}
	bad := PluginConfig{Kernel: "vmlinux", Backend: "xen", PullPolicy: "Sometimes", ImageCacheSize: "big",
		AllowedDiskPaths: []string{"rel"}, InsecureRegistries: []string{"http://x"}}.withDefaults()
	err := bad.validate()
	for _, want := range []string{
		`config: kernel: "vmlinux" must be an absolute path`,
		`backend: "xen" is not auto, firecracker or qemu`,
		`pull_policy: "Sometimes" is not Always, IfNotPresent or Never`,
		`image_cache_size: `,
		`allowed_disk_paths[0]: "rel" must be an absolute path`,
		`insecure_registries[0]: "http://x" is not a registry host[:port]`,
	} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("error %v lacks %q", err, want)
		}
	}
}

// SetConfig refuses a bad plugin block with the field named.
func TestSetConfigRejectsBadConfig(t *testing.T) {
	e := newEnv(t)
	e.pc.Backend = "vmware"
	d := NewDriver(hclog.NewNullLogger())
	defer d.Shutdown()
	var data []byte
	if err := base.MsgPackEncode(&data, &e.pc); err != nil {
		t.Fatal(err)
	}
	err := d.SetConfig(&base.Config{PluginConfig: data})
	if err == nil || !strings.Contains(err.Error(), `backend: "vmware" is not auto, firecracker or qemu`) {
		t.Fatalf("SetConfig: %v", err)
	}
}

// The VM id and host name come from the task and stay within what the VM
// layer and DNS accept.
func TestVMIDAndHostname(t *testing.T) {
	tc := &drivers.TaskConfig{ID: "a1b2c3d4-0000/Web Server!/x", AllocID: "a1b2c3d4-1111-2222-3333-444455556666", Name: "Web Server!" + strings.Repeat("x", 80)}
	id := vmID(tc)
	if !strings.HasPrefix(id, "Web-Server-") || len(id) > 64 || strings.ContainsAny(id, " !/") {
		t.Errorf("vm id %q", id)
	}
	other := *tc
	other.ID = "a1b2c3d4-0000/Web Server!/y"
	if vmID(&other) == id {
		t.Error("two task instances share a VM id")
	}
	if hn := hostname(tc); len(hn) > 63 || strings.ContainsAny(hn, " !_/") || !strings.HasPrefix(hn, "Web-Server-") {
		t.Errorf("hostname %q", hn)
	}
}

// Fingerprint is healthy when the backend can run VMs here, with the
// backend and its version as node attributes; unhealthy with the reason
// otherwise.
func TestFingerprint(t *testing.T) {
	e := newEnv(t)
	_, h := e.driver(t)
	fp := firstFingerprint(t, h)
	if fp.Health != drivers.HealthStateHealthy {
		t.Fatalf("fingerprint: %+v", fp)
	}
	out, err := exec.Command(e.pc.QEMU, "--version").Output()
	if err != nil {
		out, err = exec.Command(DefaultQEMU, "--version").Output()
	}
	if err != nil {
		t.Fatal(err)
	}
	wantVersion := versionPattern.FindString(string(out))
	attr := func(name string) string {
		a, ok := fp.Attributes[attrPrefix+name]
		if !ok {
			return ""
		}
		s, _ := a.GetString()
		return s
	}
	if attr("backend") != "qemu" || attr("backend_version") != wantVersion || wantVersion == "" {
		t.Errorf("attributes: backend %q version %q, want qemu %q", attr("backend"), attr("backend_version"), wantVersion)
	}
	if !strings.Contains(fp.HealthDescription, "qemu") {
		t.Errorf("health description %q", fp.HealthDescription)
	}

	// No kernel: unhealthy, saying so.
	e2 := newEnv(t)
	e2.pc.Kernel = filepath.Join(e2.dir, "missing-vmlinux")
	_, h2 := e2.driver(t)
	fp = firstFingerprint(t, h2)
	if fp.Health != drivers.HealthStateUnhealthy || !strings.Contains(fp.HealthDescription, "missing-vmlinux") {
		t.Errorf("without a kernel: %+v", fp)
	}

	// Firecracker asked for where it cannot run: unhealthy with its reason.
	if reason := firecracker.New(firecracker.Options{}).Available(); reason != nil {
		e3 := newEnv(t)
		e3.pc.Backend = "firecracker"
		_, h3 := e3.driver(t)
		fp = firstFingerprint(t, h3)
		if fp.Health != drivers.HealthStateUnhealthy || !strings.Contains(fp.HealthDescription, reason.Error()) {
			t.Errorf("firecracker where it cannot run (%v): %+v", reason, fp)
		}
	}
}

func firstFingerprint(t *testing.T, h *harness) *drivers.Fingerprint {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	ch, err := h.Fingerprint(ctx)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case fp := <-ch:
		return fp
	case <-ctx.Done():
		t.Fatal("no fingerprint")
	}
	return nil
}

// Nomad refuses plugins whose version is not semantic: every build's
// version is made one.
func TestPluginVersion(t *testing.T) {
	for in, want := range map[string]string{
		"dev": "0.0.0+dev", "v1.2.3": "1.2.3", "1.2.3-rc.1": "1.2.3-rc.1",
		"1a67efb-dirty": "0.0.0+1a67efb.dirty", "v0.1.0-3-g1a67efb": "0.1.0-3-g1a67efb", "": "0.0.0",
	} {
		got := pluginVersion(in)
		if got != want {
			t.Errorf("pluginVersion(%q) = %q, want %q", in, got, want)
		}
		if _, err := goversion.NewVersion(got); err != nil {
			t.Errorf("pluginVersion(%q) = %q: %v", in, got, err)
		}
	}
}

// A KernelImage is booted with the modules laid out next to it
// (scripts/test-kernel.sh's layout), none otherwise; the plugin's own
// kernel keeps the plugin's modules.
func TestKernelImageModules(t *testing.T) {
	dir := t.TempDir()
	withMods := filepath.Join(dir, "k1", "vmlinux")
	mods := filepath.Join(dir, "k1", "lib", "modules", "6.1.0-test")
	bare := filepath.Join(dir, "k2", "vmlinux")
	for _, d := range []string{mods, filepath.Dir(bare)} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, f := range []string{withMods, bare, filepath.Join(mods, "modules.dep")} {
		if err := os.WriteFile(f, []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if got := kernelModules(withMods); got != mods {
		t.Errorf("kernelModules(%s) = %q, want %q", withMods, got, mods)
	}
	if got := kernelModules(bare); got != "" {
		t.Errorf("kernelModules(%s) = %q, want none", bare, got)
	}

	pc := PluginConfig{Kernel: withMods, KernelModules: "/plugin/modules", AllowedImagePaths: []string{dir}}.withDefaults()
	alloc := filepath.Join(dir, "alloc")
	if err := os.MkdirAll(filepath.Join(alloc, "t", "local"), 0o755); err != nil {
		t.Fatal(err)
	}
	tc := &drivers.TaskConfig{ID: "a/t/1", AllocID: "a", Name: "t", AllocDir: alloc}
	for _, c := range []struct {
		kernel, wantKernel, wantMods string
	}{
		{withMods, "", ""}, // the plugin's kernel: the runtime's defaults apply
		{bare, bare, ""},
	} {
		p, err := buildPlan(tc, &TaskConfig{OCIImage: "busybox", KernelImage: c.kernel}, &pc)
		if err != nil {
			t.Fatal(err)
		}
		if p.req.Kernel != c.wantKernel || p.req.KernelModules != c.wantMods {
			t.Errorf("KernelImage %s: kernel %q modules %q, want %q %q", c.kernel, p.req.Kernel, p.req.KernelModules, c.wantKernel, c.wantMods)
		}
	}
}

// The slog records of the fireactions packages reach Nomad's log through
// hclog with their level and attributes, groups flattened into keys.
func TestSlogToHclog(t *testing.T) {
	var buf syncBuffer
	l := newSlogLogger(hclog.New(&hclog.LoggerOptions{Level: hclog.Info, Output: &buf, JSONFormat: true}))
	l.Debug("hidden")
	l.With("vm", "a").WithGroup("pull").Warn("slow", "ref", "busybox", slog.Group("layer", "n", 2))
	out := buf.String()
	if strings.Contains(out, "hidden") {
		t.Errorf("debug record below the logger's level: %s", out)
	}
	for _, want := range []string{`"@level":"warn"`, `"@message":"slow"`, `"vm":"a"`, `"pull.ref":"busybox"`, `"pull.layer.n":2`} {
		if !strings.Contains(out, want) {
			t.Errorf("no %s in %s", want, out)
		}
	}
}
