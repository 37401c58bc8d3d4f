package runtime

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"path"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/fireactions/fireactions/internal/guest"
	"github.com/fireactions/fireactions/internal/image"
	"github.com/fireactions/fireactions/internal/metadata"
	"github.com/fireactions/fireactions/internal/network"
	"github.com/fireactions/fireactions/internal/vm"
)

// DefaultDiskSize is the scratch disk size when a request gives none. The
// disk is sparse: only what the guest writes takes space.
const DefaultDiskSize = 4 << 30

// Errors callers can test for.
var (
	// ErrExists: an instance with that id already exists.
	ErrExists = errors.New("instance already exists")
	// ErrNotFound: no instance with that id.
	ErrNotFound = errors.New("no such instance")
)

// Request describes one microVM to run.
type Request struct {
	// ID names the instance (and its VM); empty means a generated one (12
	// hex digits). 1-64 letters, digits, '-', '_', '.'.
	ID string

	// Exactly one of Image (an OCI reference, pulled into the cache as
	// Pull says) and BootDisk (a prebuilt ext4 file, used read-only) is
	// the root file system.
	Image    string
	Pull     image.PullOptions
	BootDisk string

	// Mode is app (run one process, report its exit) or system (exec the
	// image's /sbin/init). Empty means app, or system for a boot disk
	// without a command.
	Mode guest.Mode
	// Entrypoint, when non-nil, replaces the image's Entrypoint and drops
	// its Cmd; Args, when non-nil, replaces the image's Cmd (keeping the
	// Entrypoint), as `docker run IMAGE ARGS...` does.
	Entrypoint []string
	Args       []string
	// Env entries (KEY=VALUE) are merged over the image's Env.
	Env []string
	// WorkingDir, User and StopSignal override the image's.
	WorkingDir string
	User       string
	StopSignal string

	// Kernel and KernelModules override the runtime's defaults;
	// KernelArgs are appended to the boot arguments.
	Kernel        string
	KernelModules string
	KernelArgs    string
	// Modules are extra kernel modules for the initramfs (e.g.
	// initramfs.DockerModules).
	Modules []string

	VCPUs       int
	MemoryMiB   int
	SMT         bool
	CPUTemplate string
	// DiskSize is the scratch disk's size in bytes; 0 means
	// DefaultDiskSize.
	DiskSize int64
	// Disks are extra disks (see ParseDisk).
	Disks []Disk
	// BindMounts are guest paths backed by the scratch disk; nil means
	// guest.DefaultBindMounts (/var/lib/docker, /var/lib/containerd).
	BindMounts []string
	Sysctls    map[string]string

	Network  Network
	Hostname string
	// Metadata is the metadata document's input; InstanceID and Hostname
	// default to the instance's. NoMetadata turns the metadata service
	// off.
	Metadata    metadata.Input
	MMDSVersion vm.MMDSVersion
	NoMetadata  bool

	// Labels tag the instance for its owner (pool name, Nomad allocation
	// id, ...); Recover can select instances by them.
	Labels map[string]string
	// Backend names the backend (auto, firecracker, qemu); empty means the
	// runtime's default.
	Backend string

	// StopTimeout is the default deadline of Stop; Timeout the VM's
	// maximum lifetime (0: none).
	StopTimeout time.Duration
	Timeout     time.Duration

	// Events, when set, receives the phases of the start-up as they
	// happen (pull, scratch, network, initramfs, boot).
	Events func(Event)
}

// Disk is an extra disk attached to the VM and mounted by the guest init.
type Disk struct {
	Path       string
	ReadOnly   bool
	MountPoint string
}

// ParseDisk reads the seed's disk syntax, "PATH:ro" or "PATH:rw", with an
// optional mount point: "PATH:rw:/data". Without one the disk is mounted at
// /mnt/disk<index>.
func ParseDisk(s string, index int) (Disk, error) {
	parts := strings.Split(s, ":")
	if len(parts) < 2 || len(parts) > 3 || parts[0] == "" {
		return Disk{}, fmt.Errorf("disk %q: write PATH:ro or PATH:rw, optionally followed by :MOUNTPOINT", s)
	}
	d := Disk{Path: parts[0], MountPoint: fmt.Sprintf("/mnt/disk%d", index)}
	switch parts[1] {
	case "ro":
		d.ReadOnly = true
	case "rw":
	default:
		return Disk{}, fmt.Errorf("disk %q: access %q is not ro or rw", s, parts[1])
	}
	if len(parts) == 3 {
		if !path.IsAbs(parts[2]) || path.Clean(parts[2]) == "/" {
			return Disk{}, fmt.Errorf("disk %q: mount point %q must be an absolute path other than /", s, parts[2])
		}
		d.MountPoint = path.Clean(parts[2])
	}
	if !filepath.IsAbs(d.Path) {
		abs, err := filepath.Abs(d.Path)
		if err != nil {
			return Disk{}, fmt.Errorf("disk %q: %w", s, err)
		}
		d.Path = abs
	}
	return d, nil
}

// Network is a VM's network: none (the zero value), a CNI network by name,
// or a static NIC on a host tap.
type Network struct {
	// CNI is the CNI network's name; "default" or empty with UseCNI means
	// the network manager's default network.
	CNI    string
	UseCNI bool
	Static *network.StaticNIC
}

// None reports whether the VM gets no network interface.
func (n Network) None() bool { return !n.UseCNI && n.Static == nil }

// String is the network in ParseNetwork's syntax (static: "static:TAP").
func (n Network) String() string {
	switch {
	case n.Static != nil:
		return "static:" + n.Static.Interface
	case n.UseCNI && n.CNI == "":
		return "cni"
	case n.UseCNI:
		return "cni:" + n.CNI
	}
	return "none"
}

// ParseNetwork reads "none", "cni" (the default CNI network) or
// "cni:NAME".
func ParseNetwork(s string) (Network, error) {
	switch {
	case s == "" || s == "none":
		return Network{}, nil
	case s == "cni":
		return Network{UseCNI: true}, nil
	case strings.HasPrefix(s, "cni:") && len(s) > 4:
		return Network{UseCNI: true, CNI: s[4:]}, nil
	}
	return Network{}, fmt.Errorf("network %q: use none, cni (the default CNI network) or cni:NAME", s)
}

var idPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`)

// CheckID reports whether id can name an instance.
func CheckID(id string) error {
	if !idPattern.MatchString(id) {
		return fmt.Errorf("instance id %q: use 1-64 letters, digits, '-', '_' or '.', starting with a letter or digit", id)
	}
	return nil
}

// NewID returns a fresh instance id: 12 hex digits, usable as a host name.
func NewID() string {
	var b [6]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// hostnameFor derives a host name from an id ('_' is not allowed in host
// names).
func hostnameFor(id string) string {
	return strings.ReplaceAll(id, "_", "-")
}

// validate checks the request and names every bad field with its fix.
func (r *Request) validate() error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", field, fmt.Sprintf(format, args...)))
	}
	if r.ID != "" {
		if err := CheckID(r.ID); err != nil {
			bad("id", "%v", err)
		}
	}
	switch {
	case r.Image == "" && r.BootDisk == "":
		bad("image", "required: give an OCI image reference or a boot disk")
	case r.Image != "" && r.BootDisk != "":
		bad("boot_disk", "give either an image or a boot disk, not both")
	}
	switch r.Mode {
	case "", guest.ModeApp, guest.ModeSystem:
	default:
		bad("mode", "%q is not app or system", r.Mode)
	}
	for i, e := range r.Env {
		if k, _, ok := strings.Cut(e, "="); !ok || k == "" {
			bad(fmt.Sprintf("env[%d]", i), "%q is not KEY=VALUE", e)
		}
	}
	if r.WorkingDir != "" && !path.IsAbs(r.WorkingDir) {
		bad("working_dir", "%q must be an absolute path", r.WorkingDir)
	}
	if r.StopSignal != "" {
		if _, err := guest.ParseSignal(r.StopSignal); err != nil {
			bad("stop_signal", "%v", err)
		}
	}
	if r.VCPUs < 0 {
		bad("vcpus", "must not be negative")
	}
	if r.MemoryMiB < 0 {
		bad("memory_mib", "must not be negative")
	}
	if r.DiskSize < 0 {
		bad("disk_size", "must not be negative")
	} else if r.DiskSize != 0 && r.DiskSize < 16<<20 {
		bad("disk_size", "%d bytes is too small for the scratch file system: give at least 16MiB", r.DiskSize)
	}
	for i, d := range r.Disks {
		if d.Path == "" {
			bad(fmt.Sprintf("disks[%d].path", i), "required")
		}
		if !path.IsAbs(d.MountPoint) || path.Clean(d.MountPoint) == "/" {
			bad(fmt.Sprintf("disks[%d].mount_point", i), "%q must be an absolute path other than /", d.MountPoint)
		}
	}
	if r.Network.Static != nil {
		if r.Network.UseCNI {
			bad("network", "a CNI network and a static NIC are exclusive")
		}
		if err := r.Network.Static.Validate(); err != nil {
			errs = append(errs, err)
		}
	}
	if r.StopTimeout < 0 || r.Timeout < 0 {
		bad("timeout", "must not be negative")
	}
	return errors.Join(errs...)
}

// process resolves the workload's command line from the image's config
// and the request's overrides, as `docker run` does.
func (r *Request) process(cfg image.ImageConfig) guest.Process {
	var args []string
	switch {
	case r.Entrypoint != nil:
		args = append(append(args, r.Entrypoint...), r.Args...)
	case r.Args != nil:
		args = append(append(args, cfg.Entrypoint...), r.Args...)
	default:
		args = append(append(args, cfg.Entrypoint...), cfg.Cmd...)
	}
	p := guest.Process{
		Args:       args,
		Env:        mergeEnv(cfg.Env, r.Env),
		WorkingDir: cfg.WorkingDir,
		User:       cfg.User,
		StopSignal: cfg.StopSignal,
	}
	if r.WorkingDir != "" {
		p.WorkingDir = r.WorkingDir
	}
	if r.User != "" {
		p.User = r.User
	}
	if r.StopSignal != "" {
		p.StopSignal = r.StopSignal
	}
	return p
}

// DefaultPath is the PATH a workload gets when neither the image nor the
// request sets one (the OCI/Docker default).
const DefaultPath = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// mergeEnv returns base with every KEY of over replaced or appended, in
// order, plus a default PATH when none is set.
func mergeEnv(base, over []string) []string {
	out := make([]string, 0, len(base)+len(over)+1)
	index := map[string]int{}
	add := func(e string) {
		k, _, _ := strings.Cut(e, "=")
		if i, ok := index[k]; ok {
			out[i] = e
			return
		}
		index[k] = len(out)
		out = append(out, e)
	}
	for _, e := range base {
		add(e)
	}
	for _, e := range over {
		add(e)
	}
	if _, ok := index["PATH"]; !ok {
		out = append(out, DefaultPath)
	}
	return out
}
