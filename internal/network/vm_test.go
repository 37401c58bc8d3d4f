package network_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"

	"github.com/fireactions/fireactions/internal/guest"
	"github.com/fireactions/fireactions/internal/hostnet"
	"github.com/fireactions/fireactions/internal/metadata"
	"github.com/fireactions/fireactions/internal/network"
	"github.com/fireactions/fireactions/internal/network/mmds"
	"github.com/fireactions/fireactions/internal/network/netnstest"
	"github.com/fireactions/fireactions/internal/vm"
	"github.com/fireactions/fireactions/internal/vm/qemu"
	"github.com/fireactions/fireactions/internal/vm/vmtest"
)

// These tests boot real guests (qemu backend, the test kernel, the
// fireactions init) on networks made by this package, inside the test's
// network namespace.

// serveDNS answers A queries for name with addr on udp addr:53 (the
// resolver the guests are given), NXDOMAIN for anything else.
func serveDNS(t *testing.T, listen, name string, addr netip.Addr) {
	t.Helper()
	pc, err := net.ListenPacket("udp", net.JoinHostPort(listen, "53"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	go func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			var p dnsmessage.Parser
			h, err := p.Start(buf[:n])
			if err != nil {
				continue
			}
			q, err := p.Question()
			if err != nil {
				continue
			}
			resp := dnsmessage.Builder{}
			rh := dnsmessage.Header{ID: h.ID, Response: true, Authoritative: true, RecursionAvailable: true}
			found := strings.EqualFold(q.Name.String(), name+".") && q.Type == dnsmessage.TypeA
			if !found && q.Type != dnsmessage.TypeAAAA {
				rh.RCode = dnsmessage.RCodeNameError
			}
			resp = dnsmessage.NewBuilder(nil, rh)
			resp.EnableCompression()
			_ = resp.StartQuestions()
			_ = resp.Question(q)
			if found {
				_ = resp.StartAnswers()
				_ = resp.AResource(dnsmessage.ResourceHeader{Name: q.Name, Class: dnsmessage.ClassINET, TTL: 60}, dnsmessage.AResource{A: addr.As4()})
			}
			out, err := resp.Finish()
			if err == nil {
				_, _ = pc.WriteTo(out, from)
			}
		}
	}()
}

// serveHTTP answers "hello" on a TCP address of the host.
func serveHTTP(t *testing.T, addr string) {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { fmt.Fprint(w, "hello") })}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
}

func vmManager(t *testing.T) *vm.Manager {
	t.Helper()
	m, err := vm.NewManager(vm.Options{Root: t.TempDir(), Backends: []vm.Backend{qemu.New(qemu.Options{})}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

// vmParts are the files a test guest boots from.
type vmParts struct {
	Kernel, Initrd, Base, Scratch string
}

func newVMParts(t *testing.T) vmParts {
	t.Helper()
	vmtest.RequireQEMU(t)
	kernel, _ := vmtest.Kernel(t)
	dir := t.TempDir()
	return vmParts{
		Kernel:  kernel,
		Initrd:  vmtest.BaseInitrd(t),
		Base:    vmtest.BusyboxRootfs(t, dir, nil),
		Scratch: vmtest.Scratch(t, dir, 64<<20),
	}
}

// specFor is a busybox image run by the fireactions init with sh -c
// script, on the network of att: the VMM runs in the attachment's
// namespace and the guest init configures the interface from it.
func specFor(att *network.Attachment, p vmParts, script string) vm.Spec {
	return vm.Spec{
		ID:        att.VMID,
		Kernel:    p.Kernel,
		Initrd:    p.Initrd,
		BootArgs:  "quiet",
		VCPUs:     1,
		MemoryMiB: 256,
		NetNS:     att.NetNSPath,
		Interfaces: []vm.Interface{{
			TapName: att.TapName, MAC: att.MAC, GuestIP: att.GuestIP,
			Gateway: att.Gateway, DNS: att.Nameservers, MTU: att.MTU,
		}},
		Drives: []vm.Drive{
			{Path: p.Base, ReadOnly: true, Role: vm.RoleBase},
			{Path: p.Scratch, Role: vm.RoleScratch},
		},
		Guest: &guest.Config{
			Mode:       guest.ModeApp,
			Hostname:   att.VMID,
			Process:    guest.Process{Args: []string{"sh", "-c", script}},
			BindMounts: []string{},
		},
	}
}

func guestSpec(t *testing.T, att *network.Attachment, script string) vm.Spec {
	t.Helper()
	return specFor(att, newVMParts(t), script)
}

func stdout(t *testing.T, m *vm.Manager, id string) string {
	t.Helper()
	var o, c bytes.Buffer
	if err := m.Logs(context.Background(), id, vm.LogOptions{Stdout: &o, Stderr: &o, Console: &c}); err != nil {
		t.Fatal(err)
	}
	return o.String() + "\n--- console:\n" + c.String()
}

func vmCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func TestVMsOnCNINetwork(t *testing.T) {
	e := newEnv(t, 0)
	vmtest.RequireQEMU(t)
	gw := e.cfg.Gateway
	nm := e.manager(t)
	vms := vmManager(t)
	ctx := vmCtx(t)

	// Host services on the gateway: the metadata service, a resolver, and
	// a port VMs are not allowed to reach.
	srv := mmds.NewServer(nil)
	ln, err := mmds.Listen(fmt.Sprintf("%s:%d", gw, hostnet.DefaultMetadataPort))
	if err != nil {
		t.Fatal(err)
	}
	sctx, stop := context.WithCancel(context.Background())
	defer stop()
	go srv.Serve(sctx, ln)
	answer := netip.MustParseAddr(strings.TrimSuffix(gw, ".1") + ".99")
	serveDNS(t, gw, "ci.fireactions.test", answer)
	serveHTTP(t, gw+":2222")

	attach := func(id string) *network.Attachment {
		att, err := nm.Attach(ctx, id, network.Request{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = nm.Detach(context.Background(), id) })
		doc, err := metadata.New(metadata.Input{InstanceID: "i-" + id})
		if err != nil {
			t.Fatal(err)
		}
		h, err := metadata.NewHandler(doc, metadata.V1)
		if err != nil {
			t.Fatal(err)
		}
		ip, _ := att.Addr()
		if err := srv.Register(id, ip, h); err != nil {
			t.Fatal(err)
		}
		return att
	}
	a, b := attach("net-a"), attach("net-b")
	bIP, _ := b.Addr()

	// B serves HTTP and idles.
	if _, err := vms.Start(ctx, qemu.New(qemu.Options{}), guestSpec(t, b, `echo hello-from-b >/tmp/index.html; httpd -p 8080 -h /tmp; echo B-ready; exec sleep 600`)); err != nil {
		t.Fatal(err)
	}
	for !strings.Contains(stdout(t, vms, b.VMID), "B-ready") {
		select {
		case <-ctx.Done():
			t.Fatalf("B never got ready:\n%s", stdout(t, vms, b.VMID))
		case <-time.After(200 * time.Millisecond):
		}
	}
	// Control: B's server is up and reachable from the host.
	var body []byte
	for range 50 {
		resp, err := (&http.Client{Timeout: 2 * time.Second}).Get(fmt.Sprintf("http://%s:8080/index.html", bIP))
		if err == nil {
			body = make([]byte, 64)
			n, _ := resp.Body.Read(body)
			body = body[:n]
			resp.Body.Close()
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if !strings.Contains(string(body), "hello-from-b") {
		t.Fatalf("control: the host cannot reach B's server (%q)", body)
	}

	// busybox wget's own -T timeout crashes the static Debian build:
	// timeout(1) bounds it instead. The metadata fetch is the proof that
	// wget works, so the "blocked" results are the network's doing.
	script := fmt.Sprintf(`
ip -4 addr show | sed -n 's/.*inet \([0-9./]*\) .*/addr=\1/p'
ip route | sed -n 's/^default via \([0-9.]*\).*/route=\1/p'
ping -c 1 -W 3 %[1]s >/dev/null 2>&1 && echo gw=ok || echo gw=fail
echo "iid=$(timeout 10 wget -q -O - http://169.254.169.254/latest/meta-data/instance-id)"
nslookup ci.fireactions.test 2>/dev/null | sed -n 's/^Address: *\([0-9.]*\)$/dns=\1/p'
timeout 3 wget -q -O - http://%[2]s:8080/index.html >/dev/null 2>&1 && echo vm2vm=open || echo vm2vm=blocked
timeout 3 wget -q -O - http://%[1]s:2222/ >/dev/null 2>&1 && echo hostport=open || echo hostport=blocked
timeout 3 wget -q -O - http://%[1]s:%[3]d/latest/meta-data/instance-id >/dev/null 2>&1 && echo mmdsport=open || echo mmdsport=blocked
`, gw, bIP, hostnet.DefaultMetadataPort)
	if _, err := vms.Start(ctx, qemu.New(qemu.Options{}), guestSpec(t, a, script)); err != nil {
		t.Fatal(err)
	}
	es, err := vms.Wait(ctx, a.VMID)
	if err != nil {
		t.Fatal(err)
	}
	out := stdout(t, vms, a.VMID)
	if es.Reason != vm.ReasonWorkloadExit {
		t.Fatalf("A ended with %+v:\n%s", es, out)
	}
	for _, want := range []string{
		"addr=" + a.GuestIP, "route=" + gw, "gw=ok", "iid=i-net-a", "dns=" + answer.String(),
		"vm2vm=blocked", "hostport=blocked", "mmdsport=blocked",
	} {
		if !strings.Contains(out, want+"\n") {
			t.Errorf("guest A: no %q in:\n%s", want, out)
		}
	}

	// Stop B; detach both: nothing is left on the host.
	if _, err := vms.Stop(ctx, b.VMID, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{a.VMID, b.VMID} {
		if err := vms.Remove(ctx, id); err != nil {
			t.Fatal(err)
		}
		if err := nm.Detach(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	if left := e.leftovers(t, a.VMID, b.VMID); len(left) > 0 {
		t.Errorf("leftovers after the VMs stopped:\n%s", strings.Join(left, "\n"))
	}
}

func TestVMWithStaticNIC(t *testing.T) {
	netnstest.Require(t)
	vmtest.RequireQEMU(t)
	dir := t.TempDir()
	nm, err := network.New(network.Options{StateDir: dir + "/network", NetNSDir: netnsDir(t, dir)})
	if err != nil {
		t.Fatal(err)
	}
	ctx := vmCtx(t)
	nic := &network.StaticNIC{IP: "192.168.90.10/24", Gateway: "192.168.90.1", Interface: "fastatic0", Nameservers: []string{"192.168.90.1"}}
	att, err := nm.Attach(ctx, "static-vm", network.Request{Static: nic})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = nm.Detach(context.Background(), "static-vm") })
	// The host end of the tap plays the gateway and the resolver.
	netnstest.Run(t, "ip", "addr", "add", "192.168.90.1/24", "dev", "fastatic0")
	serveDNS(t, "192.168.90.1", "static.fireactions.test", netip.MustParseAddr("192.168.90.77"))

	vms := vmManager(t)
	script := `
ip -4 addr show | sed -n 's/.*inet \([0-9./]*\) .*/addr=\1/p'
ip route | sed -n 's/^default via \([0-9.]*\).*/route=\1/p'
sed -n 's/^nameserver /ns=/p' /etc/resolv.conf
ping -c 1 -W 3 192.168.90.1 >/dev/null 2>&1 && echo gw=ok || echo gw=fail
nslookup static.fireactions.test 2>/dev/null | sed -n 's/^Address: *\([0-9.]*\)$/dns=\1/p'
`
	if _, err := vms.Start(ctx, qemu.New(qemu.Options{}), guestSpec(t, att, script)); err != nil {
		t.Fatal(err)
	}
	if _, err := vms.Wait(ctx, att.VMID); err != nil {
		t.Fatal(err)
	}
	out := stdout(t, vms, att.VMID)
	// The guest has the host address given, not the network address.
	for _, want := range []string{"addr=192.168.90.10/24", "route=192.168.90.1", "ns=192.168.90.1", "gw=ok", "dns=192.168.90.77"} {
		if !strings.Contains(out, want+"\n") {
			t.Errorf("guest: no %q in:\n%s", want, out)
		}
	}
	if err := vms.Remove(ctx, att.VMID); err != nil {
		t.Fatal(err)
	}
	if err := nm.Detach(ctx, att.VMID); err != nil {
		t.Fatal(err)
	}
	if _, err := netnstest.Try("ip", "link", "show", "fastatic0"); err == nil {
		t.Error("the tap fireactions created is still there")
	}
}

// runVMHelper is the helper process of TestKillDuringVMRun: a fireactions
// stand-in that attaches a VM, boots it and waits to be killed.
func runVMHelper() int {
	var opts network.Options
	opts.Network.Name = os.Getenv("NET_NAME")
	opts.Network.ConfDir = os.Getenv("NET_CONFDIR")
	opts.StateDir = os.Getenv("NET_STATEDIR")
	opts.NetNSDir = os.Getenv("NET_NETNSDIR")
	opts.PluginDirs = filepath.SplitList(os.Getenv("NET_PLUGINS"))
	opts.PortFilter = hostnet.NewIsolation(os.Getenv("NET_BRIDGE"))
	nm, err := network.New(opts)
	if err != nil {
		fmt.Println("error:", err)
		return 1
	}
	var parts vmParts
	if err := json.Unmarshal([]byte(os.Getenv("VM_PARTS")), &parts); err != nil {
		fmt.Println("error:", err)
		return 1
	}
	ctx := context.Background()
	att, err := nm.Attach(ctx, os.Getenv("NET_VM"), network.Request{})
	if err != nil {
		fmt.Println("error:", err)
		return 1
	}
	vms, err := vm.NewManager(vm.Options{Root: os.Getenv("VM_ROOT"), Backends: []vm.Backend{qemu.New(qemu.Options{})}})
	if err != nil {
		fmt.Println("error:", err)
		return 1
	}
	if _, err := vms.Start(ctx, qemu.New(qemu.Options{}), specFor(att, parts, "echo up; exec sleep 600")); err != nil {
		fmt.Println("error:", err)
		return 1
	}
	fmt.Println("booted")
	select {}
}

// TestKillDuringVMRun kills -9 a process that attached and booted a VM;
// a restarted process adopts the VM, stops it and cleans the network up:
// no namespace, veth, tap, rule or address reservation is left.
func TestKillDuringVMRun(t *testing.T) {
	e := newEnv(t, 0)
	parts := newVMParts(t)
	root := t.TempDir()
	pj, _ := json.Marshal(parts)
	t.Setenv("VM_PARTS", string(pj))
	t.Setenv("VM_ROOT", root)
	kill9(t, startHelper(t, e, "vm", "killed-vm", "booted", network.PluginDirs(e.cfg)))

	if left := e.leftovers(t, "killed-vm"); len(left) == 0 {
		t.Fatal("nothing left behind by the killed process; the test proves nothing")
	}
	ctx := vmCtx(t)
	vms, err := vm.NewManager(vm.Options{Root: root, Backends: []vm.Backend{qemu.New(qemu.Options{})}})
	if err != nil {
		t.Fatal(err)
	}
	defer vms.Close()
	res, err := vms.Recover(ctx, vm.RecoverOptions{})
	if err != nil || len(res.Adopted) != 1 {
		t.Fatalf("recover: %+v %v", res, err)
	}
	dir := res.Adopted[0].Dir
	if _, err := vms.Stop(ctx, "killed-vm", 10*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := vms.Remove(ctx, "killed-vm"); err != nil {
		t.Fatal(err)
	}
	// The restarted process keeps no VM: every attachment is a leftover.
	nm := e.manager(t)
	if removed, err := nm.Cleanup(ctx, nil); err != nil || len(removed) != 1 {
		t.Fatalf("cleanup: %v %v", removed, err)
	}
	if left := e.leftovers(t, "killed-vm"); len(left) > 0 {
		t.Errorf("leftovers:\n%s", strings.Join(left, "\n"))
	}
	if pids := vm.ProcessesMatching(dir); len(pids) > 0 {
		t.Errorf("VMM processes left: %v", pids)
	}
}

// BenchmarkStartWithNetwork measures the host-side start overhead of a VM
// with networking: CNI attach (namespace, ADD of the whole chain, port
// registration) plus the VM layer's start overhead (Spec to VMM started,
// guest boot excluded). Teardown is outside the timer.
func BenchmarkStartWithNetwork(b *testing.B) {
	e := newEnv(b, 0)
	vmtest.RequireQEMU(b)
	kernel, mods := vmtest.Kernel(b)
	initrd := vmtest.BusyboxInitrd(b, mods, `exec sleep 1000`)
	nm := e.manager(b)
	vms, err := vm.NewManager(vm.Options{Root: b.TempDir(), Backends: []vm.Backend{qemu.New(qemu.Options{})}})
	if err != nil {
		b.Fatal(err)
	}
	defer vms.Close()
	ctx := context.Background()
	var attach, start time.Duration
	for i := 0; b.Loop(); i++ {
		id := fmt.Sprintf("bench-vm-%d", i)
		t0 := time.Now()
		att, err := nm.Attach(ctx, id, network.Request{})
		if err != nil {
			b.Fatal(err)
		}
		attach += time.Since(t0)
		st, err := vms.Start(ctx, qemu.New(qemu.Options{}), vm.Spec{
			ID: id, Kernel: kernel, Initrd: initrd, VCPUs: 1, MemoryMiB: 128, NetNS: att.NetNSPath,
			Interfaces: []vm.Interface{{TapName: att.TapName, MAC: att.MAC, GuestIP: att.GuestIP, Gateway: att.Gateway, MTU: att.MTU}},
		})
		if err != nil {
			b.Fatal(err)
		}
		start += time.Duration(st.StartOverhead)
		b.StopTimer()
		if err := vms.Remove(ctx, id); err != nil {
			b.Fatal(err)
		}
		if err := nm.Detach(ctx, id); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
	b.ReportMetric(float64(attach.Microseconds())/1000/float64(b.N), "attach-ms/op")
	b.ReportMetric(float64(start.Microseconds())/1000/float64(b.N), "vmstart-ms/op")
	b.ReportMetric(float64((attach+start).Microseconds())/1000/float64(b.N), "total-ms/op")
}
