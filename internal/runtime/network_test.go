package runtime_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"golang.org/x/sys/unix"

	"github.com/fireactions/fireactions/internal/config"
	"github.com/fireactions/fireactions/internal/hostnet"
	"github.com/fireactions/fireactions/internal/image/imagetest"
	"github.com/fireactions/fireactions/internal/network"
	"github.com/fireactions/fireactions/internal/network/netnstest"
	"github.com/fireactions/fireactions/internal/runtime"
	"github.com/fireactions/fireactions/internal/runtime/runtimetest"
)

// A VM on a CNI network gets its address from the attachment, reaches its
// gateway, and leaves no namespace, record or address reservation behind.
func TestRunOnCNINetwork(t *testing.T) {
	netnstest.Require(t)
	if _, err := network.FindPlugin(network.PluginDirs(config.Network{BinDirs: config.DefaultCNIBinDirs}), "tc-redirect-tap"); err != nil {
		t.Skipf("needs the tc-redirect-tap CNI plugin (scripts/build-cni.sh): %v", err)
	}
	dir := t.TempDir()
	var cfg config.Config
	cfg.Network = config.Network{
		Name: "rtnet", Bridge: "rtbr0", Subnet: "10.231.7.0/24", Gateway: "10.231.7.1",
		ConfDir: filepath.Join(dir, "conf.d"),
	}
	cfg.ApplyDefaults()
	hopts := hostnet.OptionsFromConfig(&cfg, dir)
	hopts.Conflist.IPAMDataDir = filepath.Join(dir, "ipam")
	if _, err := hostnet.Setup(context.Background(), hopts); err != nil {
		t.Fatalf("host setup: %v", err)
	}
	t.Cleanup(func() { _, _ = hostnet.Teardown(context.Background(), hopts, true) })
	nsDir := filepath.Join(dir, "netns")
	t.Cleanup(func() { _ = unix.Unmount(nsDir, unix.MNT_DETACH) })
	nm, err := network.New(network.Options{
		Network: cfg.Network, StateDir: filepath.Join(dir, "network"), NetNSDir: nsDir,
		PortFilter: hostnet.NewIsolation(cfg.Network.Bridge),
	})
	if err != nil {
		t.Fatal(err)
	}

	reg := imagetest.NewRegistry(t)
	ref := runtimetest.PushBusybox(t, reg, "net", v1.Config{Entrypoint: []string{"/bin/sh", "-c"}, Env: []string{"PATH=/bin"}}, nil)
	data := filepath.Join(dir, "data")
	opts := runtimetest.Options(t, data)
	opts.Network = nm
	rt, err := runtime.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	defer rt.Close()
	ctx := ctxFor(t)
	inst, err := rt.Run(ctx, runtime.Request{
		ID: "netvm", Image: ref, Pull: insecure(), MemoryMiB: 256, Network: runtime.Network{UseCNI: true},
		Args: []string{fmt.Sprintf(`ip -4 -o addr show | awk '{print "addr=" $4}'; ping -c 1 -W 5 %s >/dev/null && echo gw=ok`, cfg.Network.Gateway)},
	})
	if err != nil {
		t.Fatal(err)
	}
	att := inst.Network()
	if att == nil || !strings.HasPrefix(att.GuestIP, "10.231.7.") {
		t.Fatalf("attachment %+v", att)
	}
	if in, _ := inst.Inspect(); in.Network == nil || in.Network.GuestIP != att.GuestIP {
		t.Errorf("inspect does not show the attachment: %+v", in.Network)
	}
	if es, err := inst.Wait(ctx); err != nil || es.Code != 0 {
		t.Fatalf("wait: %s, %v", es, err)
	}
	stdout, stderr := output(t, inst)
	if !strings.Contains(stdout, "addr="+att.GuestIP) || !strings.Contains(stdout, "gw=ok") {
		t.Errorf("guest saw:\n%s%s\nwant addr=%s and gw=ok", stdout, stderr, att.GuestIP)
	}
	if err := inst.Remove(ctx); err != nil {
		t.Fatal(err)
	}
	runtimetest.RequireNoLeftovers(t, data)
	if l, err := nm.List(); err != nil || len(l) != 0 {
		t.Errorf("attachments after remove: %+v, %v", l, err)
	}
	if ents, _ := os.ReadDir(nsDir); len(ents) != 0 {
		t.Errorf("namespaces after remove: %v", ents)
	}
}
