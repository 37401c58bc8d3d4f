package network_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/fireactions/fireactions/internal/config"
	"github.com/fireactions/fireactions/internal/hostnet"
	"github.com/fireactions/fireactions/internal/network"
	"github.com/fireactions/fireactions/internal/network/netnstest"
)

// helperEnv makes the test binary act as a separate fireactions process
// (see runHelper), so tests can kill it mid-operation.
const helperEnv = "FIREACTIONS_NETWORK_HELPER"

func TestMain(m *testing.M) {
	switch os.Getenv(helperEnv) {
	case "":
	case "vm":
		os.Exit(runVMHelper())
	default:
		os.Exit(runHelper())
	}
	netnstest.Main(m)
}

// env is one test's host network: a bridge set up by hostnet in the test
// namespace, with every directory private to the test.
type env struct {
	cfg      config.Network
	hostOpts hostnet.Options
	opts     network.Options
	ipamDir  string
}

var subnetSeq = 30

func newEnv(t testing.TB, mtu int) *env {
	t.Helper()
	netnstest.Require(t)
	if _, err := network.FindPlugin(network.PluginDirs(config.Network{BinDirs: config.DefaultCNIBinDirs}), "tc-redirect-tap"); err != nil {
		t.Skipf("needs tc-redirect-tap (run scripts/build-cni.sh): %v", err)
	}
	subnetSeq++
	dir := t.TempDir()
	var cfg config.Config
	cfg.Network = config.Network{
		Name:    fmt.Sprintf("fanet%d", subnetSeq),
		Bridge:  fmt.Sprintf("fabr%d", subnetSeq),
		Subnet:  fmt.Sprintf("10.210.%d.0/24", subnetSeq),
		Gateway: fmt.Sprintf("10.210.%d.1", subnetSeq),
		ConfDir: filepath.Join(dir, "conf.d"),
		MTU:     mtu,
		DNS:     []string{fmt.Sprintf("10.210.%d.1", subnetSeq)},
	}
	cfg.ApplyDefaults()
	e := &env{cfg: cfg.Network, ipamDir: filepath.Join(dir, "ipam")}
	e.hostOpts = hostnet.OptionsFromConfig(&cfg, dir)
	e.hostOpts.Conflist.IPAMDataDir = e.ipamDir
	if _, err := hostnet.Setup(context.Background(), e.hostOpts); err != nil {
		t.Fatalf("host setup: %v", err)
	}
	t.Cleanup(func() { _, _ = hostnet.Teardown(context.Background(), e.hostOpts, true) })
	e.opts = network.Options{
		Network:    cfg.Network,
		StateDir:   filepath.Join(dir, "network"),
		NetNSDir:   netnsDir(t, dir),
		PortFilter: hostnet.NewIsolation(cfg.Network.Bridge),
	}
	return e
}

// netnsDir is a namespace directory under dir; the manager makes it a
// mount point, undone at cleanup so the temporary directory can go.
func netnsDir(t testing.TB, dir string) string {
	d := filepath.Join(dir, "netns")
	t.Cleanup(func() { _ = unix.Unmount(d, unix.MNT_DETACH) })
	return d
}

func (e *env) manager(t testing.TB) *network.Manager {
	t.Helper()
	m, err := network.New(e.opts)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// leftovers lists everything of the network's VMs still on the host:
// namespaces, veths on the bridge, IPAM reservations, libcni cache files,
// records, registered ports and iptables rules naming a VM.
func (e *env) leftovers(t testing.TB, ids ...string) []string {
	t.Helper()
	var out []string
	if ents, _ := os.ReadDir(e.opts.NetNSDir); len(ents) > 0 {
		for _, x := range ents {
			out = append(out, "netns "+x.Name())
		}
	}
	links := netnstest.Run(t, "ip", "-o", "link", "show", "master", e.cfg.Bridge)
	if strings.TrimSpace(links) != "" {
		out = append(out, "bridge ports: "+links)
	}
	if ents, _ := os.ReadDir(filepath.Join(e.ipamDir, e.cfg.Name)); len(ents) > 0 {
		for _, x := range ents {
			if x.Name() != "lock" && !strings.HasPrefix(x.Name(), "last_reserved_ip") {
				out = append(out, "ipam "+x.Name())
			}
		}
	}
	if ents, _ := os.ReadDir(filepath.Join(e.opts.StateDir, "cni", "results")); len(ents) > 0 {
		for _, x := range ents {
			out = append(out, "cni cache "+x.Name())
		}
	}
	if ents, _ := os.ReadDir(e.opts.StateDir); len(ents) > 0 {
		for _, x := range ents {
			if strings.HasSuffix(x.Name(), ".json") {
				out = append(out, "record "+x.Name())
			}
		}
	}
	for _, set := range []string{"vm_ports", "ports"} {
		s := netnstest.Run(t, "nft", "list", "set", "bridge", hostnet.TableName(e.cfg.Bridge), set)
		if strings.Contains(s, "elements") {
			out = append(out, "nft set "+set+": "+s)
		}
	}
	rules := netnstest.Run(t, "iptables-save")
	for _, id := range ids {
		if strings.Contains(rules, id) {
			out = append(out, "iptables rules naming "+id)
		}
	}
	return out
}

func TestDeriveMAC(t *testing.T) {
	a, b := network.DeriveMAC("vm-1", 0), network.DeriveMAC("vm-1", 0)
	if a.String() != b.String() {
		t.Fatalf("not deterministic: %s vs %s", a, b)
	}
	if a[0]&2 == 0 || a[0]&1 != 0 {
		t.Errorf("%s is not a locally administered unicast address", a)
	}
	seen := map[string]string{}
	for _, id := range []string{"vm-1", "vm-2", "vm-10", "runner-abc"} {
		for i := range 3 {
			m := network.DeriveMAC(id, i).String()
			if prev, dup := seen[m]; dup {
				t.Errorf("%s/%d and %s share %s", id, i, prev, m)
			}
			seen[m] = fmt.Sprintf("%s/%d", id, i)
		}
	}
}

func TestRenderConflist(t *testing.T) {
	var cfg config.Config
	cfg.ApplyDefaults()
	cfg.Network.MTU = 1400
	cfg.Network.DNS = []string{"10.200.0.1"}
	data, err := network.RenderConflist(cfg.Network, network.ConflistOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		`"cniVersion": "1.0.0"`, `"name": "fireactions"`, `"type": "bridge"`, `"bridge": "fireactions0"`,
		`"isGateway": true`, `"ipMasq": true`, `"mtu": 1400`, `"type": "host-local"`,
		`"subnet": "10.200.0.0/24"`, `"gateway": "10.200.0.1"`, `"type": "firewall"`,
		`"type": "tc-redirect-tap"`, `"nameservers": [`,
	} {
		if !strings.Contains(string(data), want) {
			t.Errorf("conflist lacks %s:\n%s", want, data)
		}
	}
	cfg.Network.Subnet = "10.200.0/24"
	if _, err := network.RenderConflist(cfg.Network, network.ConflistOptions{}); err == nil || !strings.Contains(err.Error(), "network.subnet") {
		t.Errorf("bad subnet: err = %v", err)
	}
}

func TestStaticNICValidate(t *testing.T) {
	for _, tc := range []struct {
		nic  network.StaticNIC
		want string
	}{
		{network.StaticNIC{IP: "192.168.50.10/24", Gateway: "192.168.50.1", Interface: "tap7"}, ""},
		{network.StaticNIC{IP: "192.168.50.0/24", Interface: "tap7"}, "nic.ip: 192.168.50.0 is the network address of 192.168.50.0/24; give the guest's own address, e.g. 192.168.50.1/24"},
		{network.StaticNIC{IP: "192.168.50.10", Interface: "tap7"}, "nic.ip: \"192.168.50.10\" is not an address in CIDR form"},
		{network.StaticNIC{IP: "192.168.50.10/24", Gateway: "10.0.0.1", Interface: "tap7"}, "nic.gateway: 10.0.0.1 is outside 192.168.50.0/24"},
		{network.StaticNIC{IP: "192.168.50.10/24", Interface: "a-very-long-tap-name"}, "nic.interface"},
		{network.StaticNIC{IP: "192.168.50.10/24", Interface: "tap7", Nameservers: []string{"dns"}}, "nic.nameservers[0]"},
	} {
		err := tc.nic.Validate()
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%+v: %v", tc.nic, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%+v: err = %v, want %q", tc.nic, err, tc.want)
		}
	}
}

func TestCNIAttachCheckDetach(t *testing.T) {
	e := newEnv(t, 1400)
	m := e.manager(t)
	ctx := context.Background()

	a, err := m.Attach(ctx, "vm-a", network.Request{})
	if err != nil {
		t.Fatalf("attach: %v", err)
	}
	b, err := m.Attach(ctx, "vm-b", network.Request{MAC: "06:fa:01:02:03:04"})
	if err != nil {
		t.Fatalf("attach b: %v", err)
	}
	subnet := netip.MustParsePrefix(e.cfg.Subnet)
	for _, att := range []*network.Attachment{a, b} {
		p, err := netip.ParsePrefix(att.GuestIP)
		if err != nil || !subnet.Contains(p.Addr()) || p.Bits() != 24 || p.Addr() == subnet.Addr() || p.Addr().String() == e.cfg.Gateway {
			t.Errorf("%s: guest ip %q is not a host address in %s", att.VMID, att.GuestIP, subnet)
		}
		if att.Gateway != e.cfg.Gateway || att.TapName != network.VMTapName || att.MTU != 1400 ||
			att.Bridge != e.cfg.Bridge || att.Network != e.cfg.Name || len(att.Nameservers) != 1 || att.Nameservers[0] != e.cfg.Gateway {
			t.Errorf("%s: attachment %+v", att.VMID, att)
		}
		out, err := netnstest.In(att.NetNSPath, "ip", "-o", "link", "show", att.TapName)
		if err != nil || !strings.Contains(out, "mtu 1400") {
			t.Errorf("%s: tap in the VM namespace: %v\n%s", att.VMID, err, out)
		}
		if err := m.Check(ctx, att.VMID); err != nil {
			t.Errorf("check %s: %v", att.VMID, err)
		}
	}
	if a.GuestIP == b.GuestIP {
		t.Errorf("both VMs got %s", a.GuestIP)
	}
	if a.MAC != network.DeriveMAC("vm-a", 0).String() || b.MAC != "06:fa:01:02:03:04" {
		t.Errorf("MACs %s, %s", a.MAC, b.MAC)
	}
	// The guest MAC is the VM veth's, which the anti-spoofing rules check.
	if out, _ := netnstest.In(a.NetNSPath, "ip", "-o", "link", "show", network.VMIfName); !strings.Contains(out, a.MAC) {
		t.Errorf("veth MAC is not the guest MAC %s:\n%s", a.MAC, out)
	}
	ports := netnstest.Run(t, "nft", "list", "set", "bridge", hostnet.TableName(e.cfg.Bridge), "ports")
	for _, att := range []*network.Attachment{a, b} {
		if !strings.Contains(ports, att.HostInterface) || !strings.Contains(ports, strings.Split(att.GuestIP, "/")[0]) {
			t.Errorf("port of %s not registered:\n%s", att.VMID, ports)
		}
	}
	if _, err := m.Attach(ctx, "vm-a", network.Request{}); !errors.Is(err, network.ErrAttached) {
		t.Errorf("second attach: err = %v, want ErrAttached", err)
	}

	// The tap opens from outside its namespace, as QEMU's fd= needs.
	f, err := a.OpenTap()
	if err != nil {
		t.Fatalf("open tap: %v", err)
	}
	ifr, _ := unix.NewIfreq("")
	if err := unix.IoctlIfreq(int(f.Fd()), unix.TUNGETIFF, ifr); err != nil {
		t.Fatalf("TUNGETIFF: %v", err)
	}
	if ifr.Name() != network.VMTapName || ifr.Uint16()&unix.IFF_TAP == 0 || ifr.Uint16()&unix.IFF_VNET_HDR == 0 {
		t.Errorf("tap fd is %s flags %#x", ifr.Name(), ifr.Uint16())
	}
	f.Close()

	// While attached, every kind of leftover the checker looks for exists,
	// so its silence after Detach means something.
	present := strings.Join(e.leftovers(t, "vm-a", "vm-b"), "\n")
	for _, kind := range []string{"netns fireactions-vm-a", "bridge ports", "ipam 10.210.", "cni cache", "record vm-a.json", "nft set vm_ports", "nft set ports", "iptables rules naming vm-a"} {
		if !strings.Contains(present, kind) {
			t.Errorf("while attached, no %q among:\n%s", kind, present)
		}
	}

	// A new manager (a restarted process) sees and detaches them.
	m2 := e.manager(t)
	list, err := m2.List()
	if err != nil || len(list) != 2 {
		t.Fatalf("list after restart: %v %v", list, err)
	}
	got, err := m2.Get("vm-a")
	if err != nil || got.GuestIP != a.GuestIP {
		t.Fatalf("get after restart: %+v %v", got, err)
	}
	for _, id := range []string{"vm-a", "vm-b"} {
		if err := m2.Detach(ctx, id); err != nil {
			t.Fatalf("detach %s: %v", id, err)
		}
	}
	if err := m2.Detach(ctx, "vm-a"); err != nil {
		t.Errorf("second detach: %v", err)
	}
	if err := m.Check(ctx, "vm-a"); !errors.Is(err, network.ErrNotAttached) {
		t.Errorf("check after detach: %v", err)
	}
	if left := e.leftovers(t, "vm-a", "vm-b"); len(left) > 0 {
		t.Errorf("leftovers after detach:\n%s", strings.Join(left, "\n"))
	}
}

func TestAttachUnknownNetwork(t *testing.T) {
	e := newEnv(t, 0)
	m := e.manager(t)
	_, err := m.Attach(context.Background(), "vm-x", network.Request{Network: "nope"})
	if err == nil || !strings.Contains(err.Error(), `CNI network "nope"`) || !strings.Contains(err.Error(), "fireactions host setup") {
		t.Fatalf("err = %v", err)
	}
	if left := e.leftovers(t, "vm-x"); len(left) > 0 {
		t.Errorf("leftovers after a failed attach:\n%s", strings.Join(left, "\n"))
	}
}

func TestAttachFailureRollsBack(t *testing.T) {
	e := newEnv(t, 0)
	// A plugin directory where tc-redirect-tap fails, after bridge and
	// host-local have done their part.
	bin := t.TempDir()
	for _, p := range []string{"bridge", "host-local", "firewall"} {
		path, err := network.FindPlugin(network.PluginDirs(e.cfg), p)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(path, filepath.Join(bin, p)); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(bin, "tc-redirect-tap"), []byte("#!/bin/sh\n[ \"$CNI_COMMAND\" = DEL ] && exit 0\necho '{\"code\":999,\"msg\":\"injected failure\"}'\nexit 1\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	e.opts.PluginDirs = []string{bin}
	m := e.manager(t)
	_, err := m.Attach(context.Background(), "vm-f", network.Request{})
	if err == nil || !strings.Contains(err.Error(), "injected failure") {
		t.Fatalf("err = %v", err)
	}
	if left := e.leftovers(t, "vm-f"); len(left) > 0 {
		t.Errorf("leftovers after a failed attach:\n%s", strings.Join(left, "\n"))
	}
}

// runHelper is the body of a helper process: it attaches one VM and then
// waits to be killed, or dies at a chosen point.
func runHelper() int {
	var opts network.Options
	opts.Network.Name = os.Getenv("NET_NAME")
	opts.Network.ConfDir = os.Getenv("NET_CONFDIR")
	opts.StateDir = os.Getenv("NET_STATEDIR")
	opts.NetNSDir = os.Getenv("NET_NETNSDIR")
	opts.PluginDirs = filepath.SplitList(os.Getenv("NET_PLUGINS"))
	var filter network.PortFilter = hostnet.NewIsolation(os.Getenv("NET_BRIDGE"))
	if os.Getenv(helperEnv) == "hang-in-filter" {
		filter = hangingFilter{}
	}
	opts.PortFilter = filter
	m, err := network.New(opts)
	if err != nil {
		fmt.Println("error:", err)
		return 1
	}
	att, err := m.Attach(context.Background(), os.Getenv("NET_VM"), network.Request{})
	if err != nil {
		fmt.Println("error:", err)
		return 1
	}
	fmt.Println("attached", att.GuestIP)
	select {}
}

// hangingFilter blocks in AllowPort: the helper is killed while its CNI
// ADD is done but its attachment is not complete.
type hangingFilter struct{}

func (hangingFilter) AllowPort(context.Context, network.Port) error {
	fmt.Println("in AllowPort")
	select {}
}
func (hangingFilter) RevokePort(context.Context, network.Port) error { return nil }

// startHelper runs the test binary as a helper process that attaches vmID
// and returns once it prints a line starting with ready (at once when
// ready is empty), leaving the helper running.
func startHelper(t *testing.T, e *env, mode, vmID, ready string, pluginDirs []string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(),
		helperEnv+"="+mode,
		"NET_NAME="+e.cfg.Name, "NET_CONFDIR="+e.cfg.ConfDir, "NET_STATEDIR="+e.opts.StateDir,
		"NET_NETNSDIR="+e.opts.NetNSDir, "NET_PLUGINS="+strings.Join(pluginDirs, string(filepath.ListSeparator)),
		"NET_BRIDGE="+e.cfg.Bridge, "NET_VM="+vmID)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	if ready == "" {
		go func() { _, _ = io.Copy(io.Discard, out) }()
		return cmd
	}
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		if strings.HasPrefix(sc.Text(), ready) {
			return cmd
		}
		if strings.HasPrefix(sc.Text(), "error:") {
			t.Fatalf("helper: %s", sc.Text())
		}
	}
	t.Fatalf("helper exited before %q", ready)
	return nil
}

func kill9(t *testing.T, cmd *exec.Cmd) {
	t.Helper()
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = cmd.Wait()
}

func TestCleanupAfterKill(t *testing.T) {
	e := newEnv(t, 0)
	dirs := network.PluginDirs(e.cfg)

	// 1. Fully attached, then the process is killed.
	kill9(t, startHelper(t, e, "attach", "vm-k1", "attached", dirs))
	// 2. Killed between CNI ADD and the end of the attachment.
	kill9(t, startHelper(t, e, "hang-in-filter", "vm-k2", "in AllowPort", dirs))
	// 3. Killed in the middle of CNI ADD: tc-redirect-tap hangs after
	//    bridge and host-local reserved an address; libcni cached nothing.
	bin := t.TempDir()
	for _, p := range []string{"bridge", "host-local", "firewall", "tc-redirect-tap"} {
		path, err := network.FindPlugin(dirs, p)
		if err != nil {
			t.Fatal(err)
		}
		if p == "tc-redirect-tap" {
			// ADD announces itself and hangs; DEL runs the real plugin.
			// It records its pid: the sleep outlives the killed helper
			// and the test ends it.
			script := fmt.Sprintf("#!/bin/sh\nif [ \"$CNI_COMMAND\" = ADD ]; then echo $$ >%s/in-add.tmp; mv %s/in-add.tmp %s/in-add; exec sleep 600; fi\nexec %s\n", bin, bin, bin, path)
			if err := os.WriteFile(filepath.Join(bin, p), []byte(script), 0o755); err != nil {
				t.Fatal(err)
			}
			continue
		}
		if err := os.Symlink(path, filepath.Join(bin, p)); err != nil {
			t.Fatal(err)
		}
	}
	h3 := startHelper(t, e, "attach", "vm-k3", "", append([]string{bin}, dirs...))
	for i := 0; ; i++ {
		if _, err := os.Stat(filepath.Join(bin, "in-add")); err == nil {
			break
		}
		if i == 600 {
			t.Fatal("the helper never reached tc-redirect-tap ADD")
		}
		time.Sleep(100 * time.Millisecond)
	}
	kill9(t, h3)
	if pid, err := os.ReadFile(filepath.Join(bin, "in-add")); err == nil {
		var p int
		if _, err := fmt.Sscan(string(pid), &p); err == nil && p > 1 {
			_ = syscall.Kill(p, syscall.SIGKILL)
		}
	}

	if left := e.leftovers(t); len(left) == 0 {
		t.Fatal("the killed helpers left nothing behind; the test proves nothing")
	}
	m := e.manager(t)
	removed, err := m.Cleanup(context.Background(), nil)
	if err != nil {
		t.Fatalf("cleanup: %v", err)
	}
	if len(removed) != 3 {
		t.Errorf("cleanup removed %v, want 3 VMs", removed)
	}
	if left := e.leftovers(t, "vm-k1", "vm-k2", "vm-k3"); len(left) > 0 {
		t.Errorf("leftovers after cleanup:\n%s", strings.Join(left, "\n"))
	}
}

func TestCleanupKeepsLiveVMs(t *testing.T) {
	e := newEnv(t, 0)
	m := e.manager(t)
	ctx := context.Background()
	for _, id := range []string{"live-1", "dead-1"} {
		if _, err := m.Attach(ctx, id, network.Request{}); err != nil {
			t.Fatal(err)
		}
	}
	removed, err := m.Cleanup(ctx, []string{"live-1"})
	if err != nil || len(removed) != 1 || removed[0] != "dead-1" {
		t.Fatalf("cleanup: %v %v", removed, err)
	}
	if err := m.Check(ctx, "live-1"); err != nil {
		t.Errorf("live VM broken by cleanup: %v", err)
	}
	if err := m.Detach(ctx, "live-1"); err != nil {
		t.Fatal(err)
	}
	if left := e.leftovers(t, "live-1", "dead-1"); len(left) > 0 {
		t.Errorf("leftovers:\n%s", strings.Join(left, "\n"))
	}
}

func TestStaticNIC(t *testing.T) {
	netnstest.Require(t)
	dir := t.TempDir()
	m, err := network.New(network.Options{StateDir: filepath.Join(dir, "network"), NetNSDir: netnsDir(t, dir)})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	nic := &network.StaticNIC{IP: "192.168.77.10/24", Gateway: "192.168.77.1", Interface: "fatap0", Nameservers: []string{"192.168.77.53"}}
	att, err := m.Attach(ctx, "static-1", network.Request{Static: nic})
	if err != nil {
		t.Fatalf("attach: %v", err)
	}
	// The guest gets the host address given, not the network address.
	if att.GuestIP != "192.168.77.10/24" || att.Gateway != "192.168.77.1" || att.TapName != "fatap0" ||
		att.NetNSPath != "" || len(att.Nameservers) != 1 || att.Nameservers[0] != "192.168.77.53" ||
		att.MAC != network.DeriveMAC("static-1", 0).String() || att.MTU != 1500 {
		t.Errorf("attachment %+v", att)
	}
	if out := netnstest.Run(t, "ip", "-d", "link", "show", "fatap0"); !strings.Contains(out, "tun type tap") {
		t.Errorf("fatap0 is not a tap:\n%s", out)
	}
	f, err := att.OpenTap()
	if err != nil {
		t.Fatalf("open tap: %v", err)
	}
	f.Close()
	if err := m.Check(ctx, "static-1"); err != nil {
		t.Errorf("check: %v", err)
	}
	if err := m.Detach(ctx, "static-1"); err != nil {
		t.Fatal(err)
	}
	if _, err := netnstest.Try("ip", "link", "show", "fatap0"); err == nil {
		t.Error("detach left the tap fireactions created")
	}

	// An existing tap is used and left alone.
	netnstest.Run(t, "ip", "tuntap", "add", "fatap1", "mode", "tap")
	t.Cleanup(func() { _, _ = netnstest.Try("ip", "link", "del", "fatap1") })
	nic.Interface = "fatap1"
	if _, err := m.Attach(ctx, "static-2", network.Request{Static: nic}); err != nil {
		t.Fatal(err)
	}
	if err := m.Detach(ctx, "static-2"); err != nil {
		t.Fatal(err)
	}
	if _, err := netnstest.Try("ip", "link", "show", "fatap1"); err != nil {
		t.Error("detach removed a tap fireactions did not create")
	}

	// Something that is not a tap is refused.
	netnstest.Run(t, "ip", "link", "add", "faveth0", "type", "veth", "peer", "name", "faveth1")
	t.Cleanup(func() { _, _ = netnstest.Try("ip", "link", "del", "faveth0") })
	nic.Interface = "faveth0"
	if _, err := m.Attach(ctx, "static-3", network.Request{Static: nic}); err == nil || !strings.Contains(err.Error(), "not a tap") {
		t.Errorf("veth as tap: err = %v", err)
	}
	// Left attached by a process that died: Cleanup in a new one
	// removes the tap.
	nic.Interface = "fatap2"
	if _, err := m.Attach(ctx, "static-4", network.Request{Static: nic}); err != nil {
		t.Fatal(err)
	}
	m2, _ := network.New(network.Options{StateDir: filepath.Join(dir, "network"), NetNSDir: filepath.Join(dir, "netns")})
	if removed, err := m2.Cleanup(ctx, nil); err != nil || len(removed) != 1 {
		t.Errorf("cleanup: %v %v", removed, err)
	}
	if _, err := netnstest.Try("ip", "link", "show", "fatap2"); err == nil {
		t.Error("cleanup left the tap fireactions created")
	}
}

func TestHostNameserversFallback(t *testing.T) {
	netnstest.Require(t)
	e := newEnv(t, 0)
	e.cfg.DNS = nil
	// Re-render the network without nameservers.
	e.hostOpts.Network.DNS = nil
	if _, err := hostnet.Setup(context.Background(), e.hostOpts); err != nil {
		t.Fatal(err)
	}
	rc := filepath.Join(t.TempDir(), "resolv.conf")
	if err := os.WriteFile(rc, []byte("nameserver 127.0.0.53\nnameserver 192.0.2.53\nsearch example\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	e.opts.ResolvConf = rc
	m := e.manager(t)
	att, err := m.Attach(context.Background(), "vm-dns", network.Request{})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Detach(context.Background(), "vm-dns")
	if len(att.Nameservers) != 1 || att.Nameservers[0] != "192.0.2.53" {
		t.Errorf("nameservers %v, want the host's non-loopback 192.0.2.53", att.Nameservers)
	}
}

// BenchmarkCNIAddDel measures one VM's CNI ADD + DEL with the default
// chain (bridge, host-local, firewall, tc-redirect-tap), the namespace and
// the port registration included.
func BenchmarkCNIAddDel(b *testing.B) {
	e := newEnv(b, 0)
	m := e.manager(b)
	ctx := context.Background()
	var add, del time.Duration
	for i := 0; b.Loop(); i++ {
		id := fmt.Sprintf("bench-%d", i)
		t0 := time.Now()
		if _, err := m.Attach(ctx, id, network.Request{}); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		if err := m.Detach(ctx, id); err != nil {
			b.Fatal(err)
		}
		add += t1.Sub(t0)
		del += time.Since(t1)
	}
	b.ReportMetric(float64(add.Milliseconds())/float64(b.N), "add-ms/op")
	b.ReportMetric(float64(del.Milliseconds())/float64(b.N), "del-ms/op")
}
