//go:build linux

package registrycache

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// inNetns runs fn on an OS thread that has joined the named network
// namespace. The thread stays locked, so Go discards it when fn returns
// instead of reusing a thread in the wrong namespace. Sockets opened by fn
// stay in that namespace.
func inNetns(name string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		f, err := os.Open(filepath.Join("/run/netns", name))
		if err != nil {
			errc <- err
			return
		}
		defer f.Close()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("setns %s: %w", name, err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

func ipCmd(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// testNet is a network namespace that plays the host (bridge fireactions0
// with the gateway address, the metadata address and an "internet"
// origin 203.0.113.10 on its loopback) and one that plays a VM on the
// bridge, with the rendered nftables rules loaded into the host. Nothing
// can leave the two namespaces: neither has any other link.
type testNet struct {
	host, vm string
}

func newTestNet(t *testing.T, rules []byte) testNet {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces")
	}
	for _, tool := range []string{"ip", "nft"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("needs %s", tool)
		}
	}
	rulesFile := filepath.Join(t.TempDir(), "rules.nft")
	if err := os.WriteFile(rulesFile, rules, 0o644); err != nil {
		t.Fatal(err)
	}
	suffix := fmt.Sprintf("%d-%d", os.Getpid(), time.Now().UnixNano()%1000000)
	n := testNet{host: "farc-host-" + suffix, vm: "farc-vm-" + suffix}
	if out, err := exec.Command("ip", "netns", "add", n.host).CombinedOutput(); err != nil {
		t.Skipf("needs network namespaces (ip netns add): %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", n.host).Run() })
	ipCmd(t, "netns", "add", n.vm)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", n.vm).Run() })

	ipCmd(t, "-n", n.host, "link", "set", "lo", "up")
	ipCmd(t, "-n", n.host, "link", "add", "fireactions0", "type", "bridge")
	ipCmd(t, "-n", n.host, "addr", "add", gw+"/24", "dev", "fireactions0")
	ipCmd(t, "-n", n.host, "link", "add", "veth-vm", "type", "veth", "peer", "name", "eth0", "netns", n.vm)
	ipCmd(t, "-n", n.host, "link", "set", "veth-vm", "master", "fireactions0")
	ipCmd(t, "-n", n.host, "link", "set", "veth-vm", "up")
	ipCmd(t, "-n", n.host, "link", "set", "fireactions0", "up")
	ipCmd(t, "-n", n.host, "addr", "add", MetadataAddress+"/32", "dev", "lo")
	ipCmd(t, "-n", n.host, "addr", "add", "203.0.113.10/32", "dev", "lo")
	ipCmd(t, "-n", n.vm, "link", "set", "lo", "up")
	ipCmd(t, "-n", n.vm, "addr", "add", "10.200.0.2/24", "dev", "eth0")
	ipCmd(t, "-n", n.vm, "link", "set", "eth0", "up")
	ipCmd(t, "-n", n.vm, "route", "add", "default", "via", gw)
	ipCmd(t, "netns", "exec", n.host, "nft", "-f", rulesFile)
	return n
}

// listen opens a listener inside the namespace and closes it at cleanup.
func listen(t *testing.T, ns, addr string) net.Listener {
	t.Helper()
	var ln net.Listener
	err := inNetns(ns, func() (err error) {
		ln, err = net.Listen("tcp4", addr)
		return err
	})
	if err != nil {
		t.Fatalf("listen %s in %s: %v", addr, ns, err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// dial connects from inside the namespace. The timeout only bounds a
// broken setup; no test measures it.
func dial(ctx context.Context, ns, network, addr string) (net.Conn, error) {
	var c net.Conn
	err := inNetns(ns, func() (err error) {
		d := net.Dialer{Timeout: 10 * time.Second}
		c, err = d.DialContext(ctx, network, addr)
		return err
	})
	return c, err
}

// TestNftRulesRedirectOnlyWebTraffic loads the rendered rules and connects
// from the VM namespace. Every listener answers with its own name, so each
// connection shows where the rules sent it.
func TestNftRulesRedirectOnlyWebTraffic(t *testing.T) {
	for _, tc := range []struct {
		name string
		bump bool
	}{{"http only", false}, {"http and https", true}} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := testConfig(t)
			cfg.RegistryCache.Squid.Enabled = true
			if tc.bump {
				withBump(t, cfg, t.TempDir())
			}
			n := newTestNet(t, mustHost(t, cfg)[HostNftables])
			listeners := map[string]string{
				gw + ":3128":            "squid-http",
				gw + ":3129":            "squid-https",
				gw + ":80":              "gateway",
				MetadataAddress + ":80": "metadata",
				"203.0.113.10:80":       "origin-http",
				"203.0.113.10:443":      "origin-https",
			}
			for addr, name := range listeners {
				ln := listen(t, n.host, addr)
				go func(name string) {
					for {
						c, err := ln.Accept()
						if err != nil {
							return
						}
						io.WriteString(c, name)
						c.Close()
					}
				}(name)
			}
			reach := func(addr string) string {
				t.Helper()
				c, err := dial(context.Background(), n.vm, "tcp4", addr)
				if err != nil {
					return "unreachable: " + err.Error()
				}
				defer c.Close()
				b, _ := io.ReadAll(c)
				return string(b)
			}
			https := "origin-https"
			if tc.bump {
				https = "squid-https"
			}
			for addr, want := range map[string]string{
				"203.0.113.10:80":       "squid-http",
				"203.0.113.10:443":      https,
				MetadataAddress + ":80": "metadata",
				gw + ":80":              "gateway",
			} {
				if got := reach(addr); got != want {
					t.Errorf("VM → %s reached %q, want %q", addr, got, want)
				}
			}
		})
	}
}
