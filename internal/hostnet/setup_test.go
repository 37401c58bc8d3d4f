package hostnet

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fireactions/fireactions/internal/config"
	"github.com/fireactions/fireactions/internal/network"
	"github.com/fireactions/fireactions/internal/network/netnstest"
)

func TestMain(m *testing.M) { netnstest.Main(m) }

// testOptions returns options for a bridge of the test's own in temp
// directories.
func testOptions(t *testing.T, bridge, subnet, gw string) Options {
	t.Helper()
	var cfg config.Config
	cfg.Network = config.Network{Bridge: bridge, Subnet: subnet, Gateway: gw, ConfDir: filepath.Join(t.TempDir(), "conf.d")}
	cfg.RegistryCache.Enabled = true
	cfg.RegistryCache.Squid.Enabled = true
	cfg.ApplyDefaults()
	opts := OptionsFromConfig(&cfg, t.TempDir())
	opts.Conflist.IPAMDataDir = filepath.Join(t.TempDir(), "ipam")
	return opts
}

func ruleset(t *testing.T) string {
	t.Helper()
	return netnstest.Run(t, "nft", "list", "ruleset")
}

func listSet(t *testing.T, bridge, set string) string {
	t.Helper()
	return netnstest.Run(t, "nft", "list", "set", "bridge", TableName(bridge), set)
}

func readSysctl(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile(forwardSysctl)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

func TestSetupIdempotentAndTeardown(t *testing.T) {
	netnstest.Require(t)
	ctx := context.Background()
	opts := testOptions(t, "fatest0", "10.201.0.0/24", "10.201.0.1")
	if err := os.WriteFile(forwardSysctl, []byte("0\n"), 0o644); err != nil {
		t.Fatal(err)
	}

	steps, err := Setup(ctx, opts)
	if err != nil {
		t.Fatalf("setup: %v", err)
	}
	for _, s := range steps {
		if !s.Changed {
			t.Errorf("first setup: step %q reports no change", s.What)
		}
	}
	first := ruleset(t)
	for _, want := range []string{
		"table inet fireactions_fatest0",
		"table bridge fireactions_fatest0",
		// per-source meter, not one shared limit
		"update @ratelimit4 { ip saddr limit rate over 100/second burst 200 packets }",
		"iifname \"fatest0\" oifname \"fatest0\" counter packets 0 bytes 0 drop",
		"ip daddr 169.254.169.254 tcp dport 80 dnat ip to 10.201.0.1:8169",
		"ip daddr 10.201.0.1 tcp dport 8169 ct status dnat accept",
		"ip daddr @blocked4 counter packets 0 bytes 0 drop",
		"ip6 daddr @blocked6 counter packets 0 bytes 0 drop",
		"169.254.0.0/16",
		"100.100.100.200",
		"fd00:ec2::254",
		"ip saddr 10.201.0.0/24 ip daddr != 10.201.0.0/24 oifname != \"fatest0\" masquerade",
		"iifname @vm_ports counter packets 0 bytes 0 drop",
		"oifname @vm_ports counter packets 0 bytes 0 drop",
		"iifname @vm_ports jump from_vm",
		"type ifname . ether_addr . ipv4_addr",
		"iifname . ether saddr . ip saddr @ports return",
		"iifname . ether saddr . arp saddr ip @ports return",
		"elements = { 53, 3128, 3129, 5000 }",
	} {
		if !strings.Contains(first, want) {
			t.Errorf("ruleset lacks %q", want)
		}
	}
	if t.Failed() {
		t.Logf("ruleset:\n%s", first)
	}
	addr := netnstest.Run(t, "ip", "-4", "addr", "show", "dev", "fatest0")
	if !strings.Contains(addr, "inet 10.201.0.1/24") || !strings.Contains(addr, "UP") {
		t.Errorf("bridge address or state wrong:\n%s", addr)
	}
	// The bridge keeps its own MAC when a port with a lower one joins.
	netnstest.Run(t, "ip", "link", "add", "fatest0p", "address", "02:00:00:00:00:01", "type", "veth", "peer", "name", "fatest0q")
	netnstest.Run(t, "ip", "link", "set", "fatest0p", "master", "fatest0", "up")
	if out := netnstest.Run(t, "ip", "link", "show", "fatest0"); !strings.Contains(out, BridgeMAC("fatest0").String()) {
		t.Errorf("bridge MAC is not %s:\n%s", BridgeMAC("fatest0"), out)
	}
	netnstest.Run(t, "ip", "link", "del", "fatest0p")
	if v := readSysctl(t); v != "1" {
		t.Errorf("ip_forward = %s, want 1", v)
	}
	conf := network.ConflistPath(opts.Network.ConfDir, opts.Network.Name)
	data, err := os.ReadFile(conf)
	if err != nil {
		t.Fatalf("conflist: %v", err)
	}
	var list struct {
		Plugins []struct{ Type string } `json:"plugins"`
	}
	if err := json.Unmarshal(data, &list); err != nil {
		t.Fatal(err)
	}
	var types []string
	for _, p := range list.Plugins {
		types = append(types, p.Type)
	}
	if got := strings.Join(types, ","); got != "bridge,firewall,tc-redirect-tap" {
		t.Errorf("conflist plugins = %s", got)
	}

	// Second run: nothing to change, same ruleset.
	steps, err = Setup(ctx, opts)
	if err != nil {
		t.Fatalf("second setup: %v", err)
	}
	for _, s := range steps {
		if s.Changed {
			t.Errorf("second setup changed %q", s.What)
		}
	}
	if second := ruleset(t); second != first {
		t.Errorf("second setup changed the ruleset:\n--- first\n%s\n--- second\n%s", first, second)
	}

	if _, err := Teardown(ctx, opts, false); err != nil {
		t.Fatalf("teardown: %v", err)
	}
	if rs := ruleset(t); strings.Contains(rs, "fireactions_fatest0") {
		t.Errorf("tables left after teardown:\n%s", rs)
	}
	if out, err := netnstest.Try("ip", "link", "show", "fatest0"); err == nil {
		t.Errorf("bridge left after teardown:\n%s", out)
	}
	if _, err := os.Stat(conf); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("conflist left after teardown: %v", err)
	}
	if v := readSysctl(t); v != "0" {
		t.Errorf("ip_forward = %s after teardown, want 0 (restored)", v)
	}
	// Teardown twice is fine.
	if _, err := Teardown(ctx, opts, false); err != nil {
		t.Fatalf("second teardown: %v", err)
	}
}

func TestSetupKeepsExistingBridgeAndConflist(t *testing.T) {
	netnstest.Require(t)
	ctx := context.Background()
	opts := testOptions(t, "fatest1", "10.202.0.0/24", "10.202.0.1")
	netnstest.Run(t, "ip", "link", "add", "fatest1", "type", "bridge")
	t.Cleanup(func() { _, _ = netnstest.Try("ip", "link", "del", "fatest1") })
	conf := network.ConflistPath(opts.Network.ConfDir, opts.Network.Name)
	if err := os.MkdirAll(filepath.Dir(conf), 0o755); err != nil {
		t.Fatal(err)
	}
	before := []byte(`{"cniVersion":"1.0.0","name":"fireactions","plugins":[{"type":"bridge"}]}`)
	if err := os.WriteFile(conf, before, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Setup(ctx, opts); err != nil {
		t.Fatal(err)
	}
	if _, err := Teardown(ctx, opts, false); err != nil {
		t.Fatal(err)
	}
	if _, err := netnstest.Try("ip", "link", "show", "fatest1"); err != nil {
		t.Errorf("teardown deleted a bridge setup did not create")
	}
	if got, _ := os.ReadFile(conf); string(got) != string(before) {
		t.Errorf("teardown did not restore the previous conflist: %s", got)
	}
}

func TestSetupRejectsNonBridge(t *testing.T) {
	netnstest.Require(t)
	opts := testOptions(t, "fatest2", "10.203.0.0/24", "10.203.0.1")
	netnstest.Run(t, "ip", "link", "add", "fatest2", "type", "veth", "peer", "name", "fatest2p")
	t.Cleanup(func() { _, _ = netnstest.Try("ip", "link", "del", "fatest2") })
	_, err := Setup(context.Background(), opts)
	if err == nil || !strings.Contains(err.Error(), "network.bridge: fatest2 exists and is a veth device") {
		t.Fatalf("err = %v", err)
	}
}

// fakeVM is a VM stand-in: a namespace whose eth0 is a bridge port.
type fakeVM struct{ netnstest.Peer }

func newFakeVM(t *testing.T, name, bridge, ip, gw, mac string) fakeVM {
	t.Helper()
	return fakeVM{netnstest.NewPeer(t, name, bridge, ip, gw, mac)}
}

func (v fakeVM) port(bridge string) network.Port {
	return network.Port{Bridge: bridge, HostInterface: v.HostIf, MAC: v.MAC, IP: v.IP}
}

// dial connects from inside v's namespace, from local (empty: any).
func (v fakeVM) dial(addr, local string) error {
	return netnstest.Do(v.NS, func() error {
		d := net.Dialer{Timeout: 700 * time.Millisecond}
		if local != "" {
			d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(local)}
		}
		c, err := d.Dial("tcp", addr)
		if err != nil {
			return err
		}
		// Wait for the server's greeting: a connection the host accepted
		// but whose replies were dropped would not deliver it.
		_ = c.SetReadDeadline(time.Now().Add(700 * time.Millisecond))
		buf := make([]byte, 64)
		n, err := c.Read(buf)
		c.Close()
		if err != nil {
			return err
		}
		if !strings.HasPrefix(string(buf[:n]), "hello ") {
			return fmt.Errorf("greeting %q", buf[:n])
		}
		return nil
	})
}

// serve listens on addr (in the namespace nsPath, or the test's when
// empty) and greets every client with "hello <client address>".
func serve(t *testing.T, nsPath, addr string) <-chan string {
	t.Helper()
	var ln net.Listener
	listen := func() error {
		var err error
		ln, err = net.Listen("tcp", addr)
		return err
	}
	var err error
	if nsPath == "" {
		err = listen()
	} else {
		err = netnstest.Do(nsPath, listen)
	}
	if err != nil {
		t.Fatalf("listen %s: %v", addr, err)
	}
	t.Cleanup(func() { ln.Close() })
	peers := make(chan string, 100)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			host, _, _ := net.SplitHostPort(c.RemoteAddr().String())
			select {
			case peers <- host:
			default:
			}
			fmt.Fprintf(c, "hello %s\n", host)
			c.Close()
		}
	}()
	return peers
}

func TestIsolation(t *testing.T) {
	netnstest.Require(t)
	ctx := context.Background()
	const br, gw = "faiso0", "10.204.0.1"
	opts := testOptions(t, br, "10.204.0.0/24", gw)
	if _, err := Setup(ctx, opts); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _, _ = Teardown(ctx, opts, true) })
	a := newFakeVM(t, "fa-iso-a", br, "10.204.0.10", gw, "06:fa:00:00:00:0a")
	b := newFakeVM(t, "fa-iso-b", br, "10.204.0.11", gw, "06:fa:00:00:00:0b")
	iso := NewIsolation(br)

	dns := serve(t, "", gw+":53")
	serve(t, "", gw+":2222")
	mmds := serve(t, "", fmt.Sprintf("%s:%d", gw, DefaultMetadataPort))
	serve(t, b.NS, b.IP+":9000")

	for _, v := range []fakeVM{a, b} {
		if err := iso.AllowPort(ctx, v.port(br)); err != nil {
			t.Fatal(err)
		}
	}
	if err := a.dial(gw+":53", ""); err != nil {
		t.Fatalf("VM to host DNS port: %v", err)
	}
	if got := <-dns; got != a.IP {
		t.Errorf("host saw %s, want %s", got, a.IP)
	}
	if err := a.dial(gw+":2222", ""); err == nil {
		t.Error("VM reached a host port that is not allowed")
	}
	if err := a.dial(b.IP+":9000", ""); err == nil {
		t.Error("VM reached another VM")
	}

	// The metadata service: 169.254.169.254:80 lands on the gateway port,
	// with the VM's own source address; the port itself is closed.
	if err := a.dial("169.254.169.254:80", ""); err != nil {
		t.Fatalf("VM to metadata service: %v", err)
	}
	if got := <-mmds; got != a.IP {
		t.Errorf("metadata service saw %s, want %s", got, a.IP)
	}
	if err := a.dial(fmt.Sprintf("%s:%d", gw, DefaultMetadataPort), ""); err == nil {
		t.Error("VM reached the metadata port directly")
	}

	// Spoofing: A using B's address, or another MAC, is dropped.
	netnstest.Run(t, "ip", "-n", "fa-iso-a", "addr", "add", b.IP+"/32", "dev", "eth0")
	if err := a.dial(gw+":53", b.IP); err == nil {
		t.Error("VM with a spoofed source address reached the host")
	}
	netnstest.Run(t, "ip", "-n", "fa-iso-a", "addr", "del", b.IP+"/32", "dev", "eth0")
	netnstest.Run(t, "ip", "-n", "fa-iso-a", "link", "set", "eth0", "address", "06:fa:00:00:00:99")
	netnstest.Run(t, "ip", "-n", "fa-iso-a", "neigh", "flush", "all")
	if err := a.dial(gw+":53", ""); err == nil {
		t.Error("VM with a spoofed MAC reached the host")
	}
	netnstest.Run(t, "ip", "-n", "fa-iso-a", "link", "set", "eth0", "address", a.MAC)

	// Setup again keeps the registered ports.
	if _, err := Setup(ctx, opts); err != nil {
		t.Fatal(err)
	}
	if err := a.dial(gw+":53", ""); err != nil {
		t.Fatalf("after a second setup: %v", err)
	}
	// Teardown refuses while VMs are on the bridge.
	if _, err := Teardown(ctx, opts, false); !errors.Is(err, ErrBridgeInUse) {
		t.Errorf("teardown with VMs attached: err = %v, want ErrBridgeInUse", err)
	}
	// Revoked: dropped again.
	if err := iso.RevokePort(ctx, a.port(br)); err != nil {
		t.Fatal(err)
	}
	if err := a.dial(gw+":53", ""); err == nil {
		t.Error("a revoked VM port reached the host")
	}
	if set := listSet(t, br, "vm_ports"); !strings.Contains(set, `"`+a.HostIf+`"`) {
		t.Errorf("the port's name left vm_ports while its interface exists:\n%s", set)
	}
	if set := listSet(t, br, "ports"); strings.Contains(set, a.IP) {
		t.Errorf("the revoked address is still registered:\n%s", set)
	}
	// Once the interface is gone, a second revoke forgets the name.
	netnstest.Run(t, "ip", "link", "del", a.HostIf)
	if err := iso.RevokePort(ctx, a.port(br)); err != nil {
		t.Errorf("second revoke: %v", err)
	}
	for _, set := range []string{"vm_ports", "ports"} {
		if out := listSet(t, br, set); strings.Contains(out, a.HostIf) {
			t.Errorf("revoked port left in set %s:\n%s", set, out)
		}
	}
	a = newFakeVM(t, "fa-iso-a2", br, "10.204.0.12", gw, "06:fa:00:00:00:0c")
	if err := iso.AllowPort(ctx, a.port(br)); err != nil {
		t.Fatal(err)
	}

	// Control: without the isolation tables, VM-to-VM works, so the
	// failures above were the tables' doing.
	netnstest.Run(t, "nft", "delete", "table", "bridge", TableName(br))
	netnstest.Run(t, "nft", "delete", "table", "inet", TableName(br))
	if err := a.dial(b.IP+":9000", ""); err != nil {
		t.Errorf("control: VM to VM without the tables: %v", err)
	}
}

func TestRateLimitIsPerSource(t *testing.T) {
	netnstest.Require(t)
	ctx := context.Background()
	const br, gw = "farate0", "10.205.0.1"
	opts := testOptions(t, br, "10.205.0.0/24", gw)
	// One new connection a minute after a burst of two: A runs out within
	// the test, and does not get tokens back before it ends.
	opts.RateLimit = RateLimit{Rate: 1, Per: time.Minute, Burst: 2}
	if _, err := Setup(ctx, opts); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _, _ = Teardown(ctx, opts, true) })
	if rs := ruleset(t); !strings.Contains(rs, "update @ratelimit4 { ip saddr limit rate over 1/minute burst 2 packets }") {
		t.Fatalf("rate limit rule missing:\n%s", rs)
	}
	a := newFakeVM(t, "fa-rate-a", br, "10.205.0.10", gw, "06:fa:00:00:01:0a")
	b := newFakeVM(t, "fa-rate-b", br, "10.205.0.11", gw, "06:fa:00:00:01:0b")
	iso := NewIsolation(br)
	for _, v := range []fakeVM{a, b} {
		if err := iso.AllowPort(ctx, v.port(br)); err != nil {
			t.Fatal(err)
		}
	}
	serve(t, "", gw+":53")
	ok, failed := 0, 0
	for range 8 {
		if err := a.dial(gw+":53", ""); err != nil {
			failed++
		} else {
			ok++
		}
	}
	if ok == 0 || failed == 0 {
		t.Fatalf("A: %d connections accepted, %d dropped; want some of each", ok, failed)
	}
	// B has a budget of its own.
	if err := b.dial(gw+":53", ""); err != nil {
		t.Errorf("B was limited by A's connections: %v", err)
	}
	if rs := ruleset(t); !strings.Contains(rs, "10.205.0.10") {
		t.Errorf("the meter holds no entry for A:\n%s", rs)
	}
}
