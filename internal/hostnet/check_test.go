package hostnet

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/fireactions/fireactions/internal/config"
	"github.com/fireactions/fireactions/internal/network"
)

// checkFixture makes fake binaries, kernels and CNI plugins, so the
// preflight's verdicts do not depend on the machine.
type checkFixture struct {
	dir, fc, qemu, elf, bz, bins string
}

func newCheckFixture(t *testing.T) checkFixture {
	t.Helper()
	d := t.TempDir()
	// No tc-redirect-tap from the developer's cache.
	t.Setenv("FIREACTIONS_CACHE", filepath.Join(d, "cache"))
	f := checkFixture{dir: d, fc: filepath.Join(d, "firecracker"), qemu: filepath.Join(d, "qemu"),
		elf: filepath.Join(d, "vmlinux"), bz: filepath.Join(d, "bzImage"), bins: filepath.Join(d, "cni")}
	write := func(p, s string, mode os.FileMode) {
		if err := os.WriteFile(p, []byte(s), mode); err != nil {
			t.Fatal(err)
		}
	}
	write(f.fc, "#!/bin/sh\necho 'Firecracker v1.7.0'\n", 0o755)
	write(f.qemu, "#!/bin/sh\necho 'QEMU emulator version 7.2.22'\n", 0o755)
	write(f.elf, "\x7fELF\x02\x01\x01", 0o644)
	write(f.bz, "MZ\x00\x00HdrS", 0o644)
	if err := os.MkdirAll(f.bins, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, p := range network.Plugins {
		write(filepath.Join(f.bins, p), "#!/bin/sh\n", 0o755)
	}
	return f
}

func (f checkFixture) options(b ...config.Backend) CheckOptions {
	return CheckOptions{
		Backends: b, Kernels: []string{f.elf}, Network: config.Network{BinDirs: []string{f.bins}},
		DataDir: f.dir, MinFree: 1, FirecrackerBin: f.fc, QEMUBin: f.qemu,
		KVMDevice: filepath.Join(f.dir, "no-kvm"),
	}
}

func find(t *testing.T, r *Report, name string) Check {
	t.Helper()
	for _, c := range r.Checks {
		if c.Name == name {
			return c
		}
	}
	t.Fatalf("no check %q", name)
	return Check{}
}

func TestPreflightVerdicts(t *testing.T) {
	f := newCheckFixture(t)
	ctx := context.Background()
	nftOK := os.Geteuid() == 0 // the nftables check needs CAP_NET_ADMIN

	// auto without KVM: qemu.
	r := Preflight(ctx, f.options())
	if v := r.Verdicts[0]; v.Uses != config.BackendQEMU || !strings.Contains(v.Reason, "firecracker cannot run (/dev/kvm") {
		t.Errorf("auto verdict %+v", v)
	}
	if c := find(t, r, "/dev/kvm"); c.OK || c.Needed || !strings.Contains(c.Fix, "kvm_intel") {
		t.Errorf("kvm check %+v", c)
	}
	if c := find(t, r, "firecracker"); !c.OK || !strings.Contains(c.Detail, "Firecracker v1.7.0") {
		t.Errorf("firecracker check %+v", c)
	}
	if c := find(t, r, "CNI plugins"); !c.OK {
		t.Errorf("CNI check %+v", c)
	}
	if r.OK() != nftOK {
		t.Errorf("OK() = %v with nftables usable = %v: %+v", r.OK(), nftOK, r.Checks)
	}

	// firecracker without KVM cannot run, whatever else is fine.
	r = Preflight(ctx, f.options(config.BackendFirecracker))
	if v := r.Verdicts[0]; v.Uses != "" || !strings.Contains(v.Reason, "/dev/kvm") || r.OK() {
		t.Errorf("firecracker verdict %+v, OK %v", v, r.OK())
	}
	if c := find(t, r, "/dev/kvm"); !c.Needed {
		t.Error("/dev/kvm not needed for firecracker")
	}

	// A file that is not KVM is not usable either.
	o := f.options(config.BackendFirecracker)
	o.KVMDevice = f.elf
	if c := find(t, Preflight(ctx, o), "/dev/kvm"); c.OK || !strings.Contains(c.Detail, "KVM_GET_API_VERSION") {
		t.Errorf("fake kvm %+v", c)
	}

	// qemu missing.
	o = f.options(config.BackendQEMU)
	o.QEMUBin = filepath.Join(f.dir, "nope")
	r = Preflight(ctx, o)
	if v := r.Verdicts[0]; v.Uses != "" || r.OK() {
		t.Errorf("qemu missing: %+v", v)
	}

	// A compressed kernel is refused with the fix.
	o = f.options(config.BackendQEMU)
	o.Kernels = []string{f.bz}
	r = Preflight(ctx, o)
	if c := find(t, r, "kernel"); c.OK || !strings.Contains(c.Detail, "not an ELF vmlinux") || !strings.Contains(c.Fix, "docs/kernels.md") || r.OK() {
		t.Errorf("bzImage kernel %+v", c)
	}

	// Missing plugins, and too little disk space.
	o = f.options(config.BackendQEMU)
	o.Network.BinDirs = []string{filepath.Join(f.dir, "empty")}
	o.MinFree = 1 << 62
	r = Preflight(ctx, o)
	if c := find(t, r, "CNI plugins"); c.OK || !strings.Contains(c.Fix, "containernetworking-plugins") || !strings.Contains(c.Fix, "scripts/build-cni.sh") {
		t.Errorf("CNI check %+v", c)
	}
	if c := find(t, r, "disk space"); c.OK || !strings.Contains(c.Detail, "GiB free") {
		t.Errorf("disk check %+v", c)
	}
	if r.OK() {
		t.Error("OK with needed checks failing")
	}
}
