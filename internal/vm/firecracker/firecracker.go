// Package firecracker is the production VM backend: Firecracker microVMs
// configured through firecracker-go-sdk, run directly or under the jailer.
//
// It owns the translation of a vm.Spec into Firecracker's configuration, the
// VMM process's start (its own session, never bound to a context, its exit
// status reaped here), the files the VMM writes (log, metrics, console) and
// the reconnection to a running VMM's API socket after a restart. The
// serial console is the VMM's stdout, written straight into the VM's console
// log, and its stdin, a FIFO the VMM itself keeps open, so both survive the
// death of the fireactions process. The metadata document is served by
// Firecracker's MMDS on an interface of its own.
package firecracker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"strings"
	"sync"
	"time"

	"github.com/fireactions/fireactions/internal/guest"
	"github.com/fireactions/fireactions/internal/vm"
	"github.com/fireactions/fireactions/internal/vm/qemu"
)

// Name is the backend's name.
const Name = "firecracker"

// Default executables, looked up in PATH.
const (
	DefaultBinary       = "firecracker"
	DefaultJailerBinary = "jailer"
)

// DefaultLogLevel is Firecracker's log level unless Options say otherwise.
const DefaultLogLevel = "Info"

// Options configure the backend.
type Options struct {
	// Binary is the firecracker executable; default DefaultBinary from
	// PATH.
	Binary string
	// Jailer, when set, runs every VMM through Firecracker's jailer.
	Jailer *JailerOptions
	// LogLevel is Firecracker's: Error, Warning, Info or Debug.
	LogLevel string
	Logger   *slog.Logger
}

// JailerOptions configure the jailer. The jailer chroots the VMM, drops it
// to UID/GID, puts it into its own cgroup and network namespace, and execs
// it in place (same pid).
type JailerOptions struct {
	// Binary is the jailer executable; default DefaultJailerBinary from
	// PATH.
	Binary string
	// UID and GID the VMM runs as. They need read access to the kernel
	// and base images and write access to extra read-write drives; the
	// backend gives them the per-VM files (initrd, scratch disk, logs).
	UID, GID int
	// ChrootBaseDir holds the jails (<base>/firecracker/<id>/root); default
	// /srv/jailer. It must be on the same filesystem as the data directory
	// and the images: the VM's files are hard-linked into the jail.
	ChrootBaseDir string
	// CgroupVersion is "1" or "2" (default "2").
	CgroupVersion string
	// CgroupArgs are limits the jailer writes into the VM's cgroup, each
	// "<file>=<value>", e.g. "cpu.max=100000 100000", "memory.max=1G".
	CgroupArgs []string
	// ParentCgroup is the cgroup the VM's cgroup is created in; default
	// "firecracker".
	ParentCgroup string
	// NumaNode pins the VMM to a NUMA node's CPUs and memory.
	NumaNode int
}

// DefaultChrootBaseDir is the jailer's default.
const DefaultChrootBaseDir = "/srv/jailer"

// Backend runs VMs with Firecracker.
type Backend struct {
	opts Options
	log  *slog.Logger

	mu  sync.Mutex
	bin binaryInfo // the last binary that ran --version
}

// binaryInfo identifies a checked executable: a replaced file is checked
// again.
type binaryInfo struct {
	path, version string
	size          int64
	mtime         time.Time
}

// New returns the Firecracker backend.
func New(opts Options) *Backend {
	if opts.Binary == "" {
		opts.Binary = DefaultBinary
	}
	if opts.LogLevel == "" {
		opts.LogLevel = DefaultLogLevel
	}
	if j := opts.Jailer; j != nil {
		c := *j
		if c.Binary == "" {
			c.Binary = DefaultJailerBinary
		}
		if c.ChrootBaseDir == "" {
			c.ChrootBaseDir = DefaultChrootBaseDir
		}
		if c.CgroupVersion == "" {
			c.CgroupVersion = "2"
		}
		if c.ParentCgroup == "" {
			c.ParentCgroup = "firecracker"
		}
		opts.Jailer = &c
	}
	l := opts.Logger
	if l == nil {
		l = slog.Default()
	}
	return &Backend{opts: opts, log: l.With("backend", Name)}
}

// Name implements vm.Backend.
func (b *Backend) Name() string { return Name }

// Available implements vm.Backend: Firecracker needs /dev/kvm opened
// read-write and a firecracker binary whose --version runs. The error names
// everything that is missing and how to fix it.
func (b *Backend) Available() error {
	var problems []string
	if err := qemu.KVMUsable(); err != nil {
		problems = append(problems, err.Error()+" (Firecracker needs KVM: use a host with hardware virtualization, or --backend qemu)")
	}
	if _, _, err := b.binary(context.Background()); err != nil {
		problems = append(problems, err.Error())
	}
	if j := b.opts.Jailer; j != nil {
		if _, err := exec.LookPath(j.Binary); err != nil {
			problems = append(problems, fmt.Sprintf("jailer %q not found: install it from the same Firecracker release, or turn the jailer off", j.Binary))
		}
	}
	if len(problems) > 0 {
		return errors.New(strings.Join(problems, "; "))
	}
	return nil
}

// Describe implements vm.Describer.
func (b *Backend) Describe() string {
	_, version, err := b.binary(context.Background())
	if err != nil {
		return Name
	}
	s := Name + " " + version
	if b.opts.Jailer != nil {
		s += " (jailer)"
	}
	return s
}

// binary finds the firecracker executable and returns its path and version.
// The version check runs once per executable file, not once per VM.
func (b *Backend) binary(ctx context.Context) (path, version string, err error) {
	path, err = exec.LookPath(b.opts.Binary)
	if err != nil {
		return "", "", fmt.Errorf("no firecracker binary: %q not found; install a release from https://github.com/firecracker-microvm/firecracker/releases into PATH or give its path", b.opts.Binary)
	}
	fi, err := os.Stat(path)
	if err != nil {
		return "", "", fmt.Errorf("firecracker binary: %w", err)
	}
	b.mu.Lock()
	c := b.bin
	b.mu.Unlock()
	if c.path == path && c.size == fi.Size() && c.mtime.Equal(fi.ModTime()) {
		return path, c.version, nil
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, path, "--version").CombinedOutput()
	if err != nil {
		return "", "", fmt.Errorf("firecracker binary %s does not run (%s --version: %v: %s)", path, path, err, strings.TrimSpace(string(out)))
	}
	version, _, _ = strings.Cut(strings.TrimSpace(string(out)), "\n")
	version = strings.TrimPrefix(strings.TrimSpace(version), "Firecracker ")
	b.mu.Lock()
	b.bin = binaryInfo{path: path, version: version, size: fi.Size(), mtime: fi.ModTime()}
	b.mu.Unlock()
	return path, version, nil
}

// The metadata interface: the guest reaches MMDS at guest.MMDSAddress
// through an interface of its own, addressed like the QEMU backend's
// metadata NIC so the guest sees the same thing on both backends.
const mmdsGuestAddr = "169.254.169.15/24"

// mmdsMAC is the metadata interface's MAC address.
func mmdsMAC(id string) string { return vm.DeriveMAC(id, "mmds") }

// GuestDevices implements vm.Backend. Firecracker answers a virtio-blk
// serial request with an identifier derived from the backing file, so the
// guest finds drives by attachment order: /dev/vda, /dev/vdb, ... in spec
// order (no drive is a root device, which Firecracker would move first).
// With metadata, a last interface carries only MMDS traffic.
func (b *Backend) GuestDevices(spec *vm.Spec) (vm.GuestDevices, error) {
	var d vm.GuestDevices
	for i, dr := range spec.Drives {
		d.Drives = append(d.Drives, guest.Drive{
			Role:       guest.DriveRole(dr.Role),
			Device:     "/dev/" + diskName(i),
			MountPoint: dr.MountPoint,
			ReadOnly:   dr.ReadOnly,
		})
	}
	for _, n := range spec.Interfaces {
		d.Interfaces = append(d.Interfaces, guest.Interface{
			MAC: n.MAC, Address: n.GuestIP, Gateway: n.Gateway, MTU: n.MTU, Nameservers: n.DNS,
		})
	}
	if len(spec.Metadata) > 0 {
		d.Interfaces = append(d.Interfaces, guest.Interface{MAC: mmdsMAC(spec.ID), Address: mmdsGuestAddr, MMDS: true})
	}
	return d, nil
}

// diskName is the name Linux gives the i-th virtio disk: vda..vdz, vdaa...
func diskName(i int) string {
	var s []byte
	for n := i; ; n = n/26 - 1 {
		s = append([]byte{byte('a' + n%26)}, s...)
		if n < 26 {
			break
		}
	}
	return "vd" + string(s)
}
