package vm

import (
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"regexp"
	"time"

	"github.com/fireactions/fireactions/internal/guest"
)

// Defaults applied by Spec.withDefaults.
const (
	DefaultVCPUs       = 1
	DefaultMemoryMiB   = 512
	DefaultStopTimeout = 10 * time.Second
	// DefaultExitGrace is how long the VMM may keep running after the guest
	// reported its workload's exit before the manager stops it.
	DefaultExitGrace = 10 * time.Second
)

// DriveRole says what a drive is for; it decides ownership (a scratch drive
// belongs to its VM and is deleted with it) and how the guest finds it.
type DriveRole string

const (
	// RoleBase is the read-only image shared by many VMs.
	RoleBase DriveRole = "base"
	// RoleScratch is the VM's own writable disk, deleted with the VM.
	RoleScratch DriveRole = "scratch"
	// RoleExtra is a user disk (`path:ro|rw`); it outlives the VM.
	RoleExtra DriveRole = "extra"
)

// Drive is a block device backed by a raw image file.
type Drive struct {
	Path     string    `json:"path"`
	ReadOnly bool      `json:"read_only,omitempty"`
	Role     DriveRole `json:"role"`
	// MountPoint is where the guest init mounts an extra drive.
	MountPoint string `json:"mount_point,omitempty"`
}

// Interface is a network interface backed by a host tap device.
type Interface struct {
	TapName string `json:"tap_name"`
	// MAC is derived from the VM id and the interface's index when empty.
	MAC string `json:"mac,omitempty"`
	// GuestIP is the guest's address in CIDR form (10.0.0.2/24).
	GuestIP string   `json:"guest_ip,omitempty"`
	Gateway string   `json:"gateway,omitempty"`
	DNS     []string `json:"dns,omitempty"`
	MTU     int      `json:"mtu,omitempty"`
}

// MMDSVersion selects the metadata service protocol.
type MMDSVersion string

const (
	// MMDSv1 answers plain GETs (what cloud-init expects by default).
	MMDSv1 MMDSVersion = "V1"
	// MMDSv2 requires a session token from PUT /latest/api/token.
	MMDSv2 MMDSVersion = "V2"
)

// Vsock is a virtio-vsock device (Firecracker: a host Unix socket UDSPath
// multiplexes guest ports).
type Vsock struct {
	GuestCID uint32 `json:"guest_cid"`
	UDSPath  string `json:"uds_path"`
}

// Spec is everything a backend needs to boot one microVM.
type Spec struct {
	// ID names the VM: letters, digits, '-', '_' and '.', at most 64, first
	// a letter or digit. It appears in the VMM's command line, which is how
	// a restarted manager recognises its processes.
	ID string `json:"id"`
	// Labels are free-form; Recover can be limited to VMs with a label.
	Labels map[string]string `json:"labels,omitempty"`

	Kernel        string `json:"kernel"`
	KernelModules string `json:"kernel_modules,omitempty"`
	// Initrd is the initramfs. With Guest set it is the shared base part and
	// the manager appends the VM's own part (its guest config) in a per-VM
	// copy; without Guest it is used as is.
	Initrd   string `json:"initrd,omitempty"`
	BootArgs string `json:"boot_args,omitempty"`

	VCPUs       int    `json:"vcpus"`
	MemoryMiB   int    `json:"memory_mib"`
	SMT         bool   `json:"smt,omitempty"`
	CPUTemplate string `json:"cpu_template,omitempty"`

	Drives     []Drive     `json:"drives,omitempty"`
	Interfaces []Interface `json:"interfaces,omitempty"`
	// NetNS is the network namespace (a path such as /var/run/netns/NAME)
	// the VMM runs in, where its tap devices are; empty means the host's.
	NetNS string `json:"netns,omitempty"`

	// Metadata is the MMDS document (JSON) the guest reads from
	// http://169.254.169.254; nil means no metadata service.
	Metadata    json.RawMessage `json:"-"`
	MMDSVersion MMDSVersion     `json:"mmds_version,omitempty"`

	Vsock *Vsock `json:"vsock,omitempty"`

	// ConsoleLog and VMMLog default to files in the VM's directory. Either
	// way they belong to the VM and are deleted with it.
	ConsoleLog string `json:"console_log,omitempty"`
	VMMLog     string `json:"vmm_log,omitempty"`

	// Guest, when set, is the configuration of fireactions-init. The
	// manager fills Drives, Interfaces, ConsoleKey and ClockUnixNano; the
	// caller sets the rest (mode, process, hostname...).
	Guest *guest.Config `json:"-"`

	// StopTimeout bounds Stop when the caller gives no deadline.
	StopTimeout time.Duration `json:"stop_timeout,omitempty"`
	// ExitGrace bounds how long the VMM may outlive its workload.
	ExitGrace time.Duration `json:"exit_grace,omitempty"`
	// Timeout is the VM's maximum lifetime; zero means none. When it
	// expires the VM is stopped and Wait reports ReasonTimeout.
	Timeout time.Duration `json:"timeout,omitempty"`
}

var idPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`)

// cpuTemplates are Firecracker's static CPU templates.
var cpuTemplates = map[string]bool{"": true, "None": true, "T2": true, "T2S": true, "T2CL": true, "T2A": true, "C3": true}

// Validate checks the spec and names every bad field with its fix.
func (s *Spec) Validate() error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("vm spec: %s: %s", field, fmt.Sprintf(format, args...)))
	}
	if !idPattern.MatchString(s.ID) {
		bad("id", "%q must be 1-64 letters, digits, '-', '_' or '.', starting with a letter or digit", s.ID)
	}
	checkFile := func(field, path string) {
		if path == "" {
			bad(field, "required")
			return
		}
		fi, err := os.Stat(path)
		switch {
		case err != nil:
			bad(field, "%v", err)
		case !fi.Mode().IsRegular():
			bad(field, "%s is not a regular file", path)
		}
	}
	checkFile("kernel", s.Kernel)
	if s.Initrd != "" || s.Guest != nil {
		checkFile("initrd", s.Initrd)
	}
	if s.KernelModules != "" {
		if fi, err := os.Stat(s.KernelModules); err != nil || !fi.IsDir() {
			bad("kernel_modules", "%s is not a directory", s.KernelModules)
		}
	}
	if s.VCPUs < 1 || s.VCPUs > 32 {
		bad("vcpus", "%d is outside 1..32", s.VCPUs)
	}
	if s.SMT && s.VCPUs%2 != 0 {
		bad("vcpus", "%d is odd: with smt on, give an even number of vCPUs (2 threads per core) or turn smt off", s.VCPUs)
	}
	if s.MemoryMiB < 64 {
		bad("memory_mib", "%d is below the 64 MiB a Linux guest needs", s.MemoryMiB)
	}
	if !cpuTemplates[s.CPUTemplate] {
		bad("cpu_template", "%q is not one of None, T2, T2S, T2CL, T2A, C3", s.CPUTemplate)
	}
	roles := map[DriveRole]int{}
	for i, d := range s.Drives {
		f := fmt.Sprintf("drives[%d]", i)
		roles[d.Role]++
		switch d.Role {
		case RoleBase:
			if !d.ReadOnly {
				bad(f+".read_only", "the base drive is shared between VMs and must be read-only")
			}
		case RoleScratch:
			if d.ReadOnly {
				bad(f+".read_only", "the scratch drive must be writable")
			}
		case RoleExtra:
		default:
			bad(f+".role", "%q is not base, scratch or extra", d.Role)
		}
		checkFile(f+".path", d.Path)
	}
	if roles[RoleBase] > 1 || roles[RoleScratch] > 1 {
		bad("drives", "at most one base and one scratch drive (have %d and %d)", roles[RoleBase], roles[RoleScratch])
	}
	if s.Guest != nil {
		if roles[RoleBase] != 1 || roles[RoleScratch] != 1 {
			bad("drives", "the guest init needs exactly one base and one scratch drive")
		}
		for i, d := range s.Drives {
			if d.Role == RoleExtra && d.MountPoint == "" {
				bad(fmt.Sprintf("drives[%d].mount_point", i), "required for an extra drive")
			}
		}
	}
	taps := map[string]bool{}
	for i, n := range s.Interfaces {
		f := fmt.Sprintf("interfaces[%d]", i)
		if n.TapName == "" || len(n.TapName) > 15 {
			bad(f+".tap_name", "%q must be a tap device name of 1-15 characters", n.TapName)
		}
		if taps[n.TapName] {
			bad(f+".tap_name", "%q is used twice", n.TapName)
		}
		taps[n.TapName] = true
		if n.MAC != "" {
			if hw, err := net.ParseMAC(n.MAC); err != nil || len(hw) != 6 || hw[0]&1 != 0 {
				bad(f+".mac", "%q is not a unicast MAC such as 06:00:ac:10:00:02", n.MAC)
			}
		}
		var prefix netip.Prefix
		if n.GuestIP != "" {
			p, err := netip.ParsePrefix(n.GuestIP)
			if err != nil {
				bad(f+".guest_ip", "%q is not an address in CIDR form such as 10.0.0.2/24", n.GuestIP)
			}
			prefix = p
		}
		if n.Gateway != "" {
			gw, err := netip.ParseAddr(n.Gateway)
			switch {
			case err != nil:
				bad(f+".gateway", "%q is not an IP address", n.Gateway)
			case !prefix.IsValid():
				bad(f+".gateway", "needs guest_ip")
			case !prefix.Masked().Contains(gw):
				bad(f+".gateway", "%s is outside %s", gw, prefix.Masked())
			}
		}
		for j, d := range n.DNS {
			if _, err := netip.ParseAddr(d); err != nil {
				bad(fmt.Sprintf("%s.dns[%d]", f, j), "%q is not an IP address", d)
			}
		}
		if n.MTU != 0 && (n.MTU < 68 || n.MTU > 65535) {
			bad(f+".mtu", "%d is outside 68..65535", n.MTU)
		}
	}
	if s.NetNS != "" {
		if _, err := os.Stat(s.NetNS); err != nil {
			bad("netns", "%v", err)
		}
	}
	if len(s.Metadata) > 0 && !json.Valid(s.Metadata) {
		bad("metadata", "not a JSON document")
	}
	switch s.MMDSVersion {
	case "", MMDSv1, MMDSv2:
	default:
		bad("mmds_version", "%q is not V1 or V2", s.MMDSVersion)
	}
	if s.Vsock != nil && s.Vsock.GuestCID < 3 {
		bad("vsock.guest_cid", "%d is reserved: use 3 or more", s.Vsock.GuestCID)
	}
	for _, d := range []struct {
		name string
		v    time.Duration
	}{{"stop_timeout", s.StopTimeout}, {"exit_grace", s.ExitGrace}, {"timeout", s.Timeout}} {
		if d.v < 0 {
			bad(d.name, "must not be negative")
		}
	}
	return errors.Join(errs...)
}

// WithDefaults returns a copy with defaults filled in and MACs derived.
func (s Spec) WithDefaults() Spec {
	if s.VCPUs == 0 {
		s.VCPUs = DefaultVCPUs
	}
	if s.MemoryMiB == 0 {
		s.MemoryMiB = DefaultMemoryMiB
	}
	if s.MMDSVersion == "" {
		s.MMDSVersion = MMDSv1
	}
	if s.StopTimeout == 0 {
		s.StopTimeout = DefaultStopTimeout
	}
	if s.ExitGrace == 0 {
		s.ExitGrace = DefaultExitGrace
	}
	s.Drives = append([]Drive(nil), s.Drives...)
	s.Interfaces = append([]Interface(nil), s.Interfaces...)
	for i := range s.Interfaces {
		if s.Interfaces[i].MAC == "" {
			s.Interfaces[i].MAC = DeriveMAC(s.ID, fmt.Sprintf("nic%d", i))
		}
	}
	return s
}

// DeriveMAC returns a stable locally administered unicast MAC for the VM id
// and a purpose, so a re-created VM keeps its addresses.
func DeriveMAC(id, purpose string) string {
	h := sha256.Sum256([]byte(id + "\x00" + purpose))
	return net.HardwareAddr{0x06, 0xfa, h[0], h[1], h[2], h[3]}.String()
}
