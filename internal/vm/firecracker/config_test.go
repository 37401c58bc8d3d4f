package firecracker

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	fc "github.com/firecracker-microvm/firecracker-go-sdk"
	"github.com/firecracker-microvm/firecracker-go-sdk/client/models"
	ops "github.com/firecracker-microvm/firecracker-go-sdk/client/operations"

	"github.com/fireactions/fireactions/internal/vm"
	"github.com/fireactions/fireactions/internal/vm/qemu"
)

func touch(t *testing.T, dir, name string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestBootArgs(t *testing.T) {
	if got := bootArgs(""); got != "console=ttyS0 reboot=k panic=-1 quiet" {
		t.Errorf("bootArgs(\"\") = %q", got)
	}
	got := strings.Fields(bootArgs("console=hvc0 loglevel=7 panic=5 init=/x -- a b"))
	for _, w := range []string{"console=hvc0", "panic=5", "reboot=k", "init=/x", "--", "a", "b"} {
		if !slices.Contains(got, w) {
			t.Errorf("%v lacks %s", got, w)
		}
	}
	if slices.Contains(got, "quiet") || slices.Contains(got, "console=ttyS0") || slices.Contains(got, "panic=-1") {
		t.Errorf("%v overrides the caller", got)
	}
	// Order and repeated keys survive (the SDK's own handler loses both).
	if got := bootArgs("console=tty0 console=ttyS0 quiet"); got != "console=tty0 console=ttyS0 quiet reboot=k panic=-1" {
		t.Errorf("bootArgs = %q", got)
	}
}

func TestInstanceID(t *testing.T) {
	if got := instanceID("vm-1"); got != "vm-1" {
		t.Errorf("instanceID(vm-1) = %q", got)
	}
	a, b := instanceID("a_b.c"), instanceID("a.b_c")
	if a == b || !strings.HasPrefix(a, "a-b-c-") {
		t.Errorf("instanceID: %q and %q", a, b)
	}
	long := instanceID(strings.Repeat("x_", 32))
	if len(long) > 64 {
		t.Errorf("instanceID of a 64-byte id is %d bytes", len(long))
	}
	for _, id := range []string{a, b, long} {
		for _, r := range id {
			if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-' || r == 'x') {
				t.Errorf("%q has %q, which Firecracker refuses", id, r)
			}
		}
	}
}

func TestDiskName(t *testing.T) {
	for i, want := range map[int]string{0: "vda", 1: "vdb", 25: "vdz", 26: "vdaa", 27: "vdab", 701: "vdzz", 702: "vdaaa"} {
		if got := diskName(i); got != want {
			t.Errorf("diskName(%d) = %s, want %s", i, got, want)
		}
	}
}

func testSpec(t *testing.T) (vm.Spec, vm.Layout) {
	dir := t.TempDir()
	vmDir := filepath.Join(dir, "vms", "vm_1")
	if err := os.MkdirAll(vmDir, 0o700); err != nil {
		t.Fatal(err)
	}
	spec := vm.Spec{
		ID: "vm_1", Kernel: touch(t, dir, "vmlinux"), Initrd: touch(t, dir, "initrd"),
		VCPUs: 2, SMT: true, MemoryMiB: 512, CPUTemplate: "T2",
		Drives: []vm.Drive{
			{Path: touch(t, dir, "base.ext4"), ReadOnly: true, Role: vm.RoleBase},
			{Path: touch(t, dir, "scratch.ext4"), Role: vm.RoleScratch},
			{Path: touch(t, dir, "cache.ext4"), Role: vm.RoleExtra, MountPoint: "/cache"},
		},
		Interfaces:  []vm.Interface{{TapName: "tap0", GuestIP: "10.0.0.2/24", Gateway: "10.0.0.1", MTU: 1400}},
		Metadata:    []byte(`{"latest":{}}`),
		MMDSVersion: vm.MMDSv2,
		Vsock:       &vm.Vsock{GuestCID: 3, UDSPath: filepath.Join(vmDir, "vsock.sock")},
	}.WithDefaults()
	layout := vm.Layout{Dir: vmDir, ConsoleLog: filepath.Join(vmDir, "console.log"), VMMLog: filepath.Join(vmDir, "vmm.log"),
		Initrd: filepath.Join(vmDir, "initrd")}
	return spec, layout
}

func TestGuestDevices(t *testing.T) {
	spec, _ := testSpec(t)
	d, err := New(Options{}).GuestDevices(&spec)
	if err != nil {
		t.Fatal(err)
	}
	var devs []string
	for _, dr := range d.Drives {
		devs = append(devs, dr.Device+":"+string(dr.Role))
		if dr.Serial != "" {
			t.Errorf("drive %+v has a serial: Firecracker does not pass it", dr)
		}
	}
	if want := []string{"/dev/vda:base", "/dev/vdb:scratch", "/dev/vdc:extra"}; !slices.Equal(devs, want) {
		t.Errorf("drives %v, want %v", devs, want)
	}
	if len(d.Interfaces) != 2 || d.Interfaces[0].MAC != spec.Interfaces[0].MAC || d.Interfaces[0].MTU != 1400 ||
		!d.Interfaces[1].MMDS || d.Interfaces[1].MAC != mmdsMAC("vm_1") || d.Interfaces[1].Address != mmdsGuestAddr {
		t.Errorf("interfaces %+v", d.Interfaces)
	}
}

func TestSDKConfig(t *testing.T) {
	spec, layout := testSpec(t)
	b := New(Options{})
	p, err := b.newPlan(&spec, layout, "/usr/bin/firecracker")
	if err != nil {
		t.Fatal(err)
	}
	cfg := p.sdkConfig()
	var drives []string
	for _, d := range cfg.Drives {
		drives = append(drives, fc.StringValue(d.DriveID)+":"+fc.StringValue(d.PathOnHost))
		if fc.BoolValue(d.IsRootDevice) {
			t.Errorf("drive %s is a root device: Firecracker would attach it first", fc.StringValue(d.DriveID))
		}
	}
	if want := []string{"base:" + spec.Drives[0].Path, "scratch:" + spec.Drives[1].Path, "extra2:" + spec.Drives[2].Path}; !slices.Equal(drives, want) {
		t.Errorf("drives %v, want %v", drives, want)
	}
	if !fc.BoolValue(cfg.Drives[0].IsReadOnly) || fc.BoolValue(cfg.Drives[1].IsReadOnly) || fc.StringValue(cfg.Drives[2].CacheType) != models.DriveCacheTypeWriteback {
		t.Errorf("drive flags: %+v", cfg.Drives)
	}
	if cfg.InitrdPath != layout.Initrd || cfg.SocketPath != filepath.Join(layout.Dir, "firecracker.sock") || cfg.VMID != instanceID("vm_1") {
		t.Errorf("paths: initrd %s, socket %s, id %s", cfg.InitrdPath, cfg.SocketPath, cfg.VMID)
	}
	mc := cfg.MachineCfg
	if fc.Int64Value(mc.VcpuCount) != 2 || fc.Int64Value(mc.MemSizeMib) != 512 || !fc.BoolValue(mc.Smt) || mc.CPUTemplate != "T2" {
		t.Errorf("machine config %+v", mc)
	}
	if n := cfg.NetworkInterfaces; len(n) != 2 || n[0].AllowMMDS || n[0].StaticConfiguration.HostDevName != "tap0" ||
		!n[1].AllowMMDS || n[1].StaticConfiguration.HostDevName != tapName(layout.Dir) || len(tapName(layout.Dir)) > 15 {
		t.Errorf("interfaces %+v", n)
	}
	if cfg.MmdsVersion != fc.MMDSv2 || cfg.MmdsAddress.String() != "169.254.169.254" {
		t.Errorf("MMDS %s at %s", cfg.MmdsVersion, cfg.MmdsAddress)
	}
	if cfg.ForwardSignals == nil || len(cfg.ForwardSignals) != 0 {
		t.Errorf("ForwardSignals %v: the SDK would forward this process's signals to the VMM", cfg.ForwardSignals)
	}
	if !cfg.Seccomp.Enabled || cfg.JailerCfg != nil || len(cfg.VsockDevices) != 1 {
		t.Errorf("seccomp %v, jailer %v, vsock %v", cfg.Seccomp, cfg.JailerCfg, cfg.VsockDevices)
	}
	// The VM directory is in the command line (how a restarted manager
	// recognises the VMM), through the log and metrics paths.
	args := strings.Join(p.vmmArgs("Info"), " ")
	if want := "--log-path " + layout.VMMLog + " --level Info --show-level --metrics-path " + filepath.Join(layout.Dir, "metrics.json"); args != want {
		t.Errorf("vmm args %q, want %q", args, want)
	}
}

func TestJailerCommand(t *testing.T) {
	spec, layout := testSpec(t)
	spec.NetNS = "/var/run/netns/pool-a"
	base := t.TempDir()
	b := New(Options{Jailer: &JailerOptions{
		Binary: "/bin/true", UID: 1234, GID: 5678, ChrootBaseDir: base,
		CgroupArgs: []string{"cpu.max=50000 100000", "memory.max=1073741824"},
	}})
	p, err := b.newPlan(&spec, layout, "/usr/local/bin/firecracker")
	if err != nil {
		t.Fatal(err)
	}
	cmd := p.jail.command(p, "Info", nil, nil, nil)
	args := strings.Join(cmd.Args, " ")
	// NUMA node 0's CPUs become cpuset limits when the host has NUMA
	// information.
	numa := ""
	if cpus, err := os.ReadFile("/sys/devices/system/node/node0/cpulist"); err == nil {
		numa = " --cgroup cpuset.mems=0 --cgroup cpuset.cpus=" + strings.TrimSpace(string(cpus))
	}
	id := instanceID("vm_1")
	d := layout.Dir
	want := "/bin/true --id " + id + " --uid 1234 --gid 5678 --exec-file /usr/local/bin/firecracker" + numa +
		" --cgroup cpu.max=50000 100000 --cgroup memory.max=1073741824 --cgroup-version 2 --parent-cgroup firecracker" +
		" --chroot-base-dir " + base + " --netns /var/run/netns/pool-a" +
		" -- --api-sock " + d + "/firecracker.sock --log-path " + d + "/vmm.log --level Info --show-level --metrics-path " + d + "/metrics.json"
	if args != want {
		t.Errorf("jailer command\n got %s\nwant %s", args, want)
	}
	root := filepath.Join(base, "firecracker", id, "root")
	if p.data.APISocket != root+d+"/firecracker.sock" || p.data.Vsock != root+d+"/vsock.sock" {
		t.Errorf("host paths: socket %s, vsock %s", p.data.APISocket, p.data.Vsock)
	}
	cfg := p.sdkConfig()
	if cfg.KernelImagePath != d+"/kernel" || cfg.InitrdPath != d+"/initrd" || fc.StringValue(cfg.Drives[1].PathOnHost) != d+"/drive1" {
		t.Errorf("paths inside the jail: kernel %s, initrd %s, drive %s", cfg.KernelImagePath, cfg.InitrdPath, fc.StringValue(cfg.Drives[1].PathOnHost))
	}
	// The SDK accepts the configuration and puts the API socket where the
	// backend will look for it.
	m, err := fc.NewMachine(context.Background(), cfg, fc.WithProcessRunner(cmd))
	if err != nil {
		t.Fatal(err)
	}
	if m.Cfg.SocketPath != p.data.APISocket {
		t.Errorf("SDK socket %s, backend %s", m.Cfg.SocketPath, p.data.APISocket)
	}
	if got := p.data.Jail.Cgroups; !slices.Equal(got, []string{"/sys/fs/cgroup/firecracker/" + id}) {
		t.Errorf("cgroups %v", got)
	}
}

// The jail mirrors the VM directory with hard links to what the VMM opens,
// owned by the jail's user where the VMM writes; Cleanup removes it.
func TestJailPrepareAndCleanup(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to give files to another user")
	}
	spec, layout := testSpec(t)
	for _, f := range []string{layout.VMMLog, layout.Initrd, filepath.Join(layout.Dir, metricsName)} {
		touch(t, filepath.Dir(f), filepath.Base(f))
	}
	base := filepath.Join(filepath.Dir(filepath.Dir(layout.Dir)), "jails")
	b := New(Options{Jailer: &JailerOptions{Binary: "/bin/true", UID: 4321, GID: 4321, ChrootBaseDir: base}})
	p, err := b.newPlan(&spec, layout, "/usr/bin/firecracker")
	if err != nil {
		t.Fatal(err)
	}
	if err := p.jail.prepare(p); err != nil {
		t.Fatal(err)
	}
	mirror := filepath.Join(p.jail.root, layout.Dir)
	for name, host := range map[string]string{
		"kernel": spec.Kernel, "initrd": layout.Initrd, "drive0": spec.Drives[0].Path,
		"drive1": spec.Drives[1].Path, "vmm.log": layout.VMMLog,
	} {
		in, err := os.Stat(filepath.Join(mirror, name))
		if err != nil {
			t.Fatal(err)
		}
		out, _ := os.Stat(host)
		if !os.SameFile(in, out) {
			t.Errorf("%s in the jail is not %s", name, host)
		}
	}
	owner := func(p string) uint32 {
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		return fi.Sys().(*syscall.Stat_t).Uid
	}
	if owner(spec.Drives[1].Path) != 4321 || owner(layout.Initrd) != 4321 || owner(layout.VMMLog) != 4321 || owner(mirror) != 4321 {
		t.Error("the scratch disk, initrd, log and jail directory must belong to the jail's user")
	}
	if owner(spec.Drives[0].Path) == 4321 || owner(spec.Kernel) == 4321 {
		t.Error("shared files (base, kernel) must keep their owner")
	}
	if err := p.data.Jail.cleanup(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(p.jail.dir); !os.IsNotExist(err) {
		t.Errorf("jail %s is still there", p.jail.dir)
	}
	if _, err := os.Stat(spec.Drives[1].Path); err != nil {
		t.Errorf("cleanup removed the host file: %v", err)
	}
}

func TestAvailable(t *testing.T) {
	err := New(Options{Binary: "/nonexistent/firecracker"}).Available()
	if err == nil || !strings.Contains(err.Error(), `no firecracker binary: "/nonexistent/firecracker" not found`) {
		t.Errorf("Available() = %v, want the missing binary named", err)
	}
	err = New(Options{Binary: "/bin/false"}).Available()
	if err == nil || !strings.Contains(err.Error(), "firecracker binary /bin/false does not run") {
		t.Errorf("Available() = %v, want the failing binary named", err)
	}
	err = New(Options{Binary: "/bin/true"}).Available()
	if kvm := qemu.KVMUsable(); kvm != nil {
		if err == nil || !strings.Contains(err.Error(), "/dev/kvm") || strings.Contains(err.Error(), "binary") {
			t.Errorf("Available() = %v, want only the KVM problem", err)
		}
	} else if err != nil {
		t.Errorf("Available() = %v with KVM and a binary", err)
	}
}

func TestFaultMessage(t *testing.T) {
	err := &ops.PutMachineConfigurationBadRequest{Payload: &models.Error{FaultMessage: "vcpu_count is wrong"}}
	if got := faultMessage(err); got != "[PUT /machine-config] vcpu_count is wrong" {
		t.Errorf("faultMessage = %q", got)
	}
}
