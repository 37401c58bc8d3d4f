//go:build linux

package netconf

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/fireactions/fireactions/internal/guest"
)

// inNetns runs fn on an OS thread moved into a fresh network namespace that
// holds a veth pair, a0 (MAC 52:54:00:aa:bb:01) and b0, and returns the
// namespace name for `ip -n`. The thread is never handed back to the Go
// scheduler, so it dies with the namespace attached.
func inNetns(t *testing.T, fn func() error) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (CAP_SYS_ADMIN) to create a network namespace")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Fatalf("needs ip (Debian package iproute2): %v", err)
	}
	b := make([]byte, 4)
	rand.Read(b)
	ns := "fa-netconf-" + hex.EncodeToString(b)
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	run("netns", "add", ns)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() })
	run("-n", ns, "link", "add", "a0", "address", "52:54:00:aa:bb:01", "type", "veth", "peer", "name", "b0")
	run("-n", ns, "link", "set", "b0", "up")

	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread exits with the goroutine
		f, err := os.Open(filepath.Join("/run/netns", ns))
		if err != nil {
			errc <- err
			return
		}
		defer f.Close()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- err
			return
		}
		errc <- fn()
	}()
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	return ns
}

func ipJSON(t *testing.T, ns string, args ...string) []map[string]any {
	t.Helper()
	out, err := exec.Command("ip", append([]string{"-n", ns, "-j"}, args...)...).Output()
	if err != nil {
		t.Fatalf("ip %v: %v", args, err)
	}
	var v []map[string]any
	if err := json.Unmarshal(out, &v); err != nil {
		t.Fatalf("ip %v: %v\n%s", args, err, out)
	}
	return v
}

func TestConfigure(t *testing.T) {
	ifaces := []guest.Interface{{
		MAC: "52:54:00:AA:BB:01", Address: "10.7.0.2/24", Gateway: "10.7.0.1", MTU: 1400, MMDS: true,
	}}
	ns := inNetns(t, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := Configure(ctx, ifaces); err != nil {
			return err
		}
		// Idempotent: a second run replaces rather than fails.
		return Configure(ctx, ifaces)
	})

	links := ipJSON(t, ns, "link", "show")
	for _, l := range links {
		switch l["ifname"] {
		case "lo", "a0":
			flags, _ := json.Marshal(l["flags"])
			if !strings.Contains(string(flags), `"UP"`) {
				t.Errorf("%s is not up: %s", l["ifname"], flags)
			}
			if l["ifname"] == "a0" && l["mtu"] != float64(1400) {
				t.Errorf("a0 mtu = %v", l["mtu"])
			}
		}
	}
	var addrs []string
	for _, l := range ipJSON(t, ns, "addr", "show", "dev", "a0") {
		for _, a := range l["addr_info"].([]any) {
			m := a.(map[string]any)
			addrs = append(addrs, fmt.Sprintf("%v/%v", m["local"], m["prefixlen"]))
		}
	}
	if !slices.Contains(addrs, "10.7.0.2/24") {
		t.Errorf("a0 addresses = %v", addrs)
	}
	var routes []string
	for _, r := range ipJSON(t, ns, "route", "show") {
		s := r["dst"].(string)
		if gw, ok := r["gateway"]; ok {
			s += " via " + gw.(string)
		}
		s += " dev " + r["dev"].(string)
		if sc, ok := r["scope"]; ok {
			s += " scope " + sc.(string)
		}
		routes = append(routes, s)
	}
	for _, want := range []string{"default via 10.7.0.1 dev a0", "169.254.169.254 dev a0 scope link"} {
		if !slices.Contains(routes, want) {
			t.Errorf("routes %q lack %q", routes, want)
		}
	}
}

func TestConfigureMissingInterface(t *testing.T) {
	inNetns(t, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		defer cancel()
		err := Configure(ctx, []guest.Interface{{MAC: "52:54:00:00:00:99", Address: "10.7.0.2/24"}})
		if err == nil || !strings.Contains(err.Error(), "52:54:00:00:00:99") || !strings.Contains(err.Error(), "a0=52:54:00:aa:bb:01") {
			t.Errorf("err = %v", err)
		}
		return nil
	})
}

func TestWriteFiles(t *testing.T) {
	root := t.TempDir()
	etc := filepath.Join(root, "etc")
	os.MkdirAll(etc, 0o755)
	os.Symlink("../run/systemd/resolve/stub-resolv.conf", filepath.Join(etc, "resolv.conf"))
	os.WriteFile(filepath.Join(etc, "hosts"), []byte("127.0.0.1 localhost"), 0o644)
	ifaces := []guest.Interface{
		{MAC: "52:54:00:00:00:01", Nameservers: []string{"10.0.0.1", "10.0.0.2"}},
		{MAC: "52:54:00:00:00:02", Nameservers: []string{"10.0.0.2", "fd00::1"}},
	}
	for i := 0; i < 2; i++ { // the second run must not add a second hosts line
		if err := WriteFiles(root, "vm-7", ifaces); err != nil {
			t.Fatal(err)
		}
	}
	read := func(name string) string {
		b, err := os.ReadFile(filepath.Join(etc, name))
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	if got := read("resolv.conf"); got != "# written by fireactions-init\nnameserver 10.0.0.1\nnameserver 10.0.0.2\nnameserver fd00::1\n" {
		t.Errorf("resolv.conf = %q", got)
	}
	if fi, _ := os.Lstat(filepath.Join(etc, "resolv.conf")); fi.Mode()&os.ModeSymlink != 0 {
		t.Error("resolv.conf is still a symlink")
	}
	if got := read("hostname"); got != "vm-7\n" {
		t.Errorf("hostname = %q", got)
	}
	if got := read("hosts"); got != "127.0.0.1 localhost\n127.0.1.1\tvm-7\n" {
		t.Errorf("hosts = %q", got)
	}

	// No nameservers, no host name: nothing is touched.
	empty := t.TempDir()
	if err := WriteFiles(empty, "", nil); err != nil {
		t.Fatal(err)
	}
	if ents, _ := os.ReadDir(filepath.Join(empty, "etc")); len(ents) != 0 {
		t.Errorf("wrote %v", ents)
	}
}
