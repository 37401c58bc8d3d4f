package nomad

import (
	"context"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/hashicorp/nomad/plugins/drivers"
	"golang.org/x/sys/unix"

	"github.com/fireactions/fireactions/internal/config"
	"github.com/fireactions/fireactions/internal/hostnet"
	"github.com/fireactions/fireactions/internal/network"
	"github.com/fireactions/fireactions/internal/network/netnstest"
)

// guestNetScript prints the guest's address and whether the gateway
// answers.
const guestNetScript = `ip -4 addr show | sed -n 's/.*inet \([0-9./]*\) .*/addr=\1/p'
ping -c 1 -W 5 GW >/dev/null 2>&1 && echo gw=ok || echo gw=fail`

// A task on a CNI network (Network) and one on a static NIC (Nic): each
// guest gets its address, reaches its gateway, and the address is handed
// to Nomad as the driver network. Everything stays in the test's own
// network namespace.
func TestNetworks(t *testing.T) {
	netnstest.Require(t)
	if _, err := network.FindPlugin(network.PluginDirs(config.Network{BinDirs: config.DefaultCNIBinDirs}), "tc-redirect-tap"); err != nil {
		t.Skipf("needs the tc-redirect-tap CNI plugin (run scripts/build-cni.sh): %v", err)
	}
	e := newEnv(t)
	t.Cleanup(func() { _ = unix.Unmount(e.pc.NetNSDir, unix.MNT_DETACH) })

	// The CNI network, set up as `fireactions host setup` does.
	var cfg config.Config
	cfg.Network = config.Network{
		Name: "nomadnet", Bridge: "fanomad0", Subnet: "10.211.7.0/24", Gateway: "10.211.7.1",
		ConfDir: e.pc.CNIConfDir, DNS: []string{"10.211.7.1"},
	}
	cfg.ApplyDefaults()
	hostOpts := hostnet.OptionsFromConfig(&cfg, e.dir)
	hostOpts.Conflist.IPAMDataDir = filepath.Join(e.dir, "ipam")
	if _, err := hostnet.Setup(context.Background(), hostOpts); err != nil {
		t.Fatalf("host setup: %v", err)
	}
	t.Cleanup(func() { _, _ = hostnet.Teardown(context.Background(), hostOpts, true) })
	e.pc.Bridge = cfg.Network.Bridge

	// The static NIC's tap exists, with the gateway's address on the host
	// end (an existing tap is used as it is).
	netnstest.Run(t, "ip", "tuntap", "add", "dev", "fanomadtap0", "mode", "tap")
	netnstest.Run(t, "ip", "addr", "add", "192.168.77.1/24", "dev", "fanomadtap0")
	netnstest.Run(t, "ip", "link", "set", "fanomadtap0", "up")
	t.Cleanup(func() { _, _ = netnstest.Try("ip", "link", "del", "fanomadtap0") })

	_, h := e.driver(t)
	ref := e.busybox(t, "net", v1.Config{Env: []string{"PATH=/bin"}})
	cniTask := task(t, h, "cni", &TaskConfig{OCIImage: ref, Mem: 128, Network: "nomadnet",
		Command: "/bin/sh", Args: []string{"-c", strings.ReplaceAll(guestNetScript, "GW", "10.211.7.1")}}, 256)
	staticTask := task(t, h, "static", &TaskConfig{OCIImage: ref, Mem: 128,
		Nic:     &Nic{Ip: "192.168.77.10/24", Gateway: "192.168.77.1", Interface: "fanomadtap0", Nameservers: []string{"192.168.77.1"}},
		Command: "/bin/sh", Args: []string{"-c", strings.ReplaceAll(guestNetScript, "GW", "192.168.77.1")}}, 256)

	_, cniNet, err := h.StartTask(cniTask)
	if err != nil {
		t.Fatal(err)
	}
	_, staticNet, err := h.StartTask(staticTask)
	if err != nil {
		t.Fatal(err)
	}
	if cniNet == nil || !netip.MustParsePrefix("10.211.7.0/24").Contains(netip.MustParseAddr(cniNet.IP)) || !cniNet.AutoAdvertise {
		t.Errorf("CNI task's driver network: %+v", cniNet)
	}
	if staticNet == nil || staticNet.IP != "192.168.77.10" {
		t.Errorf("static task's driver network: %+v", staticNet)
	}
	for _, c := range []struct {
		tc   *drivers.TaskConfig
		addr string
	}{{cniTask, cniNet.IP + "/24"}, {staticTask, "192.168.77.10/24"}} {
		if res := wait(t, h, c.tc.ID); !res.Successful() {
			t.Errorf("%s: %+v", c.tc.Name, res)
		}
		out := waitLog(t, c.tc, "stdout", "gw=")
		for _, want := range []string{"addr=" + c.addr + "\n", "gw=ok\n"} {
			if !strings.Contains(out, want) {
				t.Errorf("%s: no %q in:\n%s", c.tc.Name, want, out)
			}
		}
		st, err := h.InspectTask(c.tc.ID)
		if err != nil || st.NetworkOverride == nil || st.DriverAttributes["ip"] == "" {
			t.Errorf("%s: InspectTask %+v, %v", c.tc.Name, st, err)
		}
	}
	for _, tc := range []*drivers.TaskConfig{cniTask, staticTask} {
		if err := h.DestroyTask(tc.ID, false); err != nil {
			t.Fatal(err)
		}
	}
	e.requireClean(t)
	if out, err := netnstest.Try("ip", "netns", "list"); err == nil && strings.Contains(out, "cni") {
		t.Errorf("network namespaces left: %s", out)
	}
	if _, err := netnstest.Try("ip", "link", "show", "fanomadtap0"); err != nil {
		t.Error("the tap the task was given is gone: an existing tap must be left alone")
	}
}
