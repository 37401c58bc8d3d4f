// Package netnstest runs a package's tests inside a network namespace of
// their own, so tests that create bridges, veths, taps and nftables rules
// never touch the host's real interfaces or rules. It is imported by tests
// only.
package netnstest

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
)

// envName is set in the re-executed test binary to the namespace name.
const envName = "FIREACTIONS_TEST_NETNS"

// Main is a TestMain body: as root, it creates a named network namespace
// (ip netns add), re-runs the test binary inside it with `ip netns exec`,
// deletes the namespace and exits with the child's status. The child runs
// m with the loopback interface up. Without root it just runs m; tests
// that need the namespace call Require and are skipped.
func Main(m *testing.M) {
	if os.Getenv(envName) != "" {
		if err := exec.Command(ipPath(), "link", "set", "lo", "up").Run(); err != nil {
			fmt.Fprintln(os.Stderr, "netnstest: lo up:", err)
			os.Exit(1)
		}
		os.Exit(m.Run())
	}
	if os.Geteuid() != 0 {
		os.Exit(m.Run())
	}
	name := fmt.Sprintf("fa-test-%d-%d", os.Getpid(), time.Now().UnixNano()%1e6)
	if out, err := exec.Command(ipPath(), "netns", "add", name).CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "netnstest: ip netns add: %v: %s\n", err, out)
		os.Exit(1)
	}
	// ip netns exec also gives the child a mount namespace of its own:
	// namespaces the tests bind-mount vanish with it, even after a crash.
	cmd := exec.Command(ipPath(), append([]string{"netns", "exec", name, os.Args[0]}, os.Args[1:]...)...)
	cmd.Env = append(os.Environ(), envName+"="+name)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	err := cmd.Run()
	if out, derr := exec.Command(ipPath(), "netns", "del", name).CombinedOutput(); derr != nil {
		fmt.Fprintf(os.Stderr, "netnstest: ip netns del %s: %v: %s\n", name, derr, out)
	}
	var ee *exec.ExitError
	switch {
	case err == nil:
		os.Exit(0)
	case errors.As(err, &ee):
		os.Exit(ee.ExitCode())
	default:
		fmt.Fprintln(os.Stderr, "netnstest:", err)
		os.Exit(1)
	}
}

// Require skips t unless it runs as root inside the test namespace.
func Require(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (CAP_NET_ADMIN) to create network namespaces")
	}
	if os.Getenv(envName) == "" {
		t.Skip("needs the test network namespace: call netnstest.Main from TestMain")
	}
}

// Name is the test namespace's name, empty outside it.
func Name() string { return os.Getenv(envName) }

func ipPath() string {
	if p, err := exec.LookPath("ip"); err == nil {
		return p
	}
	for _, p := range []string{"/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip"} {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	return "ip"
}

// Run runs a command and fails t with its output if it fails.
func Run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := Try(name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

// Try runs a command and returns its combined output.
func Try(name string, args ...string) (string, error) {
	if name == "ip" {
		name = ipPath()
	}
	out, err := exec.Command(name, args...).CombinedOutput()
	return string(out), err
}

// In runs a command inside the network namespace bound at nsPath (and
// the caller's mount namespace) and returns its combined output.
func In(nsPath, name string, args ...string) (string, error) {
	return Try("nsenter", append([]string{"--net=" + nsPath, "--", name}, args...)...)
}

// NewNS creates a named namespace (ip netns add) for the test and deletes
// it at cleanup. It returns the namespace's path.
func NewNS(t testing.TB, name string) string {
	t.Helper()
	Run(t, "ip", "netns", "add", name)
	t.Cleanup(func() { _, _ = Try("ip", "netns", "del", name) })
	Run(t, "ip", "-n", name, "link", "set", "lo", "up")
	return "/run/netns/" + name
}

// Peer is a namespace wired to a bridge with a veth, standing in for a VM
// in tests of host-side rules: what those rules see is frames on a port.
type Peer struct {
	NS     string // namespace path
	HostIf string // the veth end on the bridge
	IP     string // the peer's address, without prefix
	MAC    string
}

// NewPeer creates namespace name with eth0 (ip/24, mac, default route via
// gw) whose veth peer h<name> is a port of bridge.
func NewPeer(t testing.TB, name, bridge, ip, gw, mac string) Peer {
	t.Helper()
	nsPath := NewNS(t, name)
	host := "h" + name
	if len(host) > 15 {
		t.Fatalf("peer name %q too long", name)
	}
	Run(t, "ip", "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", name)
	Run(t, "ip", "link", "set", host, "master", bridge, "up")
	Run(t, "ip", "-n", name, "link", "set", "eth0", "address", mac, "up")
	Run(t, "ip", "-n", name, "addr", "add", ip+"/24", "dev", "eth0")
	Run(t, "ip", "-n", name, "route", "add", "default", "via", gw)
	return Peer{NS: nsPath, HostIf: host, IP: ip, MAC: mac}
}

// Do runs fn on a thread inside the namespace at nsPath; sockets fn
// opens stay in that namespace.
func Do(nsPath string, fn func() error) error {
	return ns.WithNetNSPath(nsPath, func(ns.NetNS) error { return fn() })
}
