// Package guest owns the contract between the host and fireactions-init, the
// PID 1 of every microVM: the boot configuration the host writes into the
// per-VM initramfs (Config), the authenticated console protocol both sides
// speak over the serial port (FrameWriter, FrameReader) and the resolution of
// an image's user specification against its /etc/passwd and /etc/group.
//
// It is imported by the host and by the static init binary, so it depends on
// the standard library and golang.org/x/sys only.
package guest

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"path"
	"strings"
	"time"
)

// Paths inside the initramfs.
const (
	// ConfigPath is where the per-VM initramfs part puts the JSON Config.
	ConfigPath = "/fireactions/config.json"
	// ModulesDir holds the decompressed kernel modules of the base part.
	ModulesDir = "/fireactions/modules"
	// ModulesOrder lists the modules of ModulesDir, one path a line, in
	// load order (dependencies first).
	ModulesOrder = "/fireactions/modules.order"
)

// MMDSAddress is the link-local address of the metadata service; the init
// routes it to the interface marked MMDS.
const MMDSAddress = "169.254.169.254"

// DefaultStopGrace is how long the init waits after the stop signal before
// it kills the workload, when neither the Config nor the stop frame says.
const DefaultStopGrace = 10 * time.Second

// DefaultBindMounts are the guest paths backed by a directory on the scratch
// disk when Config.BindMounts is nil: overlay2 and containerd's snapshotter
// refuse an overlayfs upper directory, they need a real filesystem.
var DefaultBindMounts = []string{"/var/lib/docker", "/var/lib/containerd"}

// Mode selects what the init does once the root filesystem is assembled.
type Mode string

const (
	// ModeApp runs Config.Process as a supervised child and powers off
	// when it exits, reporting its exit status.
	ModeApp Mode = "app"
	// ModeSystem switches root and execs the image's /sbin/init.
	ModeSystem Mode = "system"
)

// DriveRole says what the init does with a drive.
type DriveRole string

const (
	// RoleBase is the read-only image (ext4), the overlay's lower layer.
	RoleBase DriveRole = "base"
	// RoleScratch is the per-VM writable disk (ext4) holding the overlay's
	// upper and work directories and the bind-mounted directories.
	RoleScratch DriveRole = "scratch"
	// RoleExtra is an additional disk mounted at MountPoint.
	RoleExtra DriveRole = "extra"
)

// Config is what the host tells the init. It travels as JSON in the per-VM
// initramfs part at ConfigPath; the init deletes the file once read so the
// console key does not stay on a filesystem the workload can reach.
type Config struct {
	Mode     Mode   `json:"mode"`
	Hostname string `json:"hostname,omitempty"`
	// Process is the workload of app mode; ignored in system mode.
	Process Process `json:"process"`
	// Drives must contain exactly one base and one scratch drive.
	Drives     []Drive     `json:"drives"`
	Interfaces []Interface `json:"interfaces,omitempty"`
	// Modules are paths inside the initramfs of kernel modules to load, in
	// order. Empty means every module listed in ModulesOrder.
	Modules []string `json:"modules,omitempty"`
	// ConsoleKey authenticates console frames in both directions. It must
	// be random and unique to the VM (see NewConsoleKey).
	ConsoleKey []byte `json:"console_key"`
	// ClockUnixNano is the host's time when the VM was configured; the
	// guest adds its own uptime and sets its clock to the sum.
	ClockUnixNano int64 `json:"clock_unix_nano,omitempty"`
	// BindMounts are guest paths bind-mounted from directories on the
	// scratch disk. nil means DefaultBindMounts; empty means none.
	BindMounts []string `json:"bind_mounts"`
	// Sysctls are written to /proc/sys before the workload starts, e.g.
	// {"net.ipv4.ip_forward": "1"}.
	Sysctls map[string]string `json:"sysctls,omitempty"`
	// StopGrace is how long a graceful stop waits between the stop signal
	// and SIGKILL. Zero means DefaultStopGrace.
	StopGrace time.Duration `json:"stop_grace,omitempty"`
}

// Process describes the app-mode workload, as an OCI image config would.
type Process struct {
	// Args is the command, already resolved by the host (Entrypoint + Cmd,
	// or Entrypoint + the user's override). Args[0] without a slash is
	// looked up in the PATH of Env.
	Args []string `json:"args"`
	// Env entries are KEY=VALUE. The init adds PATH, HOME and HOSTNAME
	// when missing.
	Env        []string `json:"env,omitempty"`
	WorkingDir string   `json:"working_dir,omitempty"`
	// User is "", "uid", "uid:gid", "name" or "name:group", resolved in the
	// image's /etc/passwd and /etc/group. Empty means root.
	User string `json:"user,omitempty"`
	// StopSignal is sent on a graceful stop: a name ("SIGTERM", "TERM") or
	// a number ("15"). Empty means SIGTERM.
	StopSignal string `json:"stop_signal,omitempty"`
}

// Drive is a virtio block device and what to do with it.
//
// The init finds a drive by Serial when it is set (the virtio-blk serial,
// /sys/block/vdX/serial: QEMU sets it with `-device
// virtio-blk-device,serial=...`), otherwise by Device. Firecracker answers
// the serial request with an identifier derived from the backing file, not
// the drive_id, so the firecracker backend relies on attachment order:
// drives appear as /dev/vda, /dev/vdb, ... in the order they were added.
type Drive struct {
	Role   DriveRole `json:"role"`
	Serial string    `json:"serial,omitempty"`
	Device string    `json:"device,omitempty"`
	// FSType defaults to ext4.
	FSType string `json:"fstype,omitempty"`
	// MountPoint is the absolute guest path of an extra drive.
	MountPoint string `json:"mount_point,omitempty"`
	// ReadOnly mounts an extra drive read-only. The base drive is always
	// read-only and the scratch drive always read-write.
	ReadOnly bool `json:"read_only,omitempty"`
}

// Interface is the static configuration of one network interface, found in
// the guest by its MAC address.
type Interface struct {
	MAC string `json:"mac"`
	// Address is the guest address in CIDR form, e.g. "10.0.0.2/24".
	Address string `json:"address,omitempty"`
	// Gateway, when set, becomes the default route.
	Gateway     string   `json:"gateway,omitempty"`
	MTU         int      `json:"mtu,omitempty"`
	Nameservers []string `json:"nameservers,omitempty"`
	// MMDS routes 169.254.169.254 through this interface.
	MMDS bool `json:"mmds,omitempty"`
}

// EffectiveBindMounts returns BindMounts, or DefaultBindMounts when nil.
func (c *Config) EffectiveBindMounts() []string {
	if c.BindMounts == nil {
		return DefaultBindMounts
	}
	return c.BindMounts
}

// EffectiveStopGrace returns StopGrace, or DefaultStopGrace when zero.
func (c *Config) EffectiveStopGrace() time.Duration {
	if c.StopGrace <= 0 {
		return DefaultStopGrace
	}
	return c.StopGrace
}

// Drive returns the first drive with the given role.
func (c *Config) Drive(role DriveRole) (Drive, bool) {
	for _, d := range c.Drives {
		if d.Role == role {
			return d, true
		}
	}
	return Drive{}, false
}

// Marshal validates the config and encodes it as JSON.
func (c *Config) Marshal() ([]byte, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return json.Marshal(c)
}

// ParseConfig decodes and validates a Config; unknown fields are errors so
// a host and init of different versions fail loudly rather than half-work.
func ParseConfig(data []byte) (*Config, error) {
	dec := json.NewDecoder(strings.NewReader(string(data)))
	dec.DisallowUnknownFields()
	var c Config
	if err := dec.Decode(&c); err != nil {
		return nil, fmt.Errorf("decode guest config: %w", err)
	}
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return &c, nil
}

// Validate checks every field and names the offending one.
func (c *Config) Validate() error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("guest config: %s: %s", field, fmt.Sprintf(format, args...)))
	}
	switch c.Mode {
	case ModeApp:
		if len(c.Process.Args) == 0 || c.Process.Args[0] == "" {
			bad("process.args", "required in app mode (the image has no Entrypoint or Cmd: give a command)")
		}
	case ModeSystem:
	default:
		bad("mode", "%q is not %q or %q", c.Mode, ModeApp, ModeSystem)
	}
	if c.Hostname != "" && !validHostname(c.Hostname) {
		bad("hostname", "%q is not a valid host name (letters, digits, '-' and '.', at most 64 characters)", c.Hostname)
	}
	for i, e := range c.Process.Env {
		if k, _, ok := strings.Cut(e, "="); !ok || k == "" {
			bad(fmt.Sprintf("process.env[%d]", i), "%q is not KEY=VALUE", e)
		}
	}
	if wd := c.Process.WorkingDir; wd != "" && !path.IsAbs(wd) {
		bad("process.working_dir", "%q must be an absolute path", wd)
	}
	if c.Process.StopSignal != "" {
		if _, err := ParseSignal(c.Process.StopSignal); err != nil {
			bad("process.stop_signal", "%v", err)
		}
	}
	counts := map[DriveRole]int{}
	for i, d := range c.Drives {
		field := fmt.Sprintf("drives[%d]", i)
		counts[d.Role]++
		switch d.Role {
		case RoleBase, RoleScratch:
		case RoleExtra:
			if !path.IsAbs(d.MountPoint) || path.Clean(d.MountPoint) == "/" {
				bad(field+".mount_point", "%q must be an absolute path other than /", d.MountPoint)
			}
		default:
			bad(field+".role", "%q is not base, scratch or extra", d.Role)
		}
		if d.Serial == "" && d.Device == "" {
			bad(field, "set serial or device so the guest can find the disk")
		}
		if d.Device != "" && !strings.HasPrefix(d.Device, "/dev/") {
			bad(field+".device", "%q must be a /dev path such as /dev/vda", d.Device)
		}
		if len(d.Serial) > 20 {
			bad(field+".serial", "%q is longer than the 20 bytes virtio-blk carries", d.Serial)
		}
	}
	if counts[RoleBase] != 1 {
		bad("drives", "need exactly one base drive, have %d", counts[RoleBase])
	}
	if counts[RoleScratch] != 1 {
		bad("drives", "need exactly one scratch drive, have %d", counts[RoleScratch])
	}
	mmds := 0
	for i, nic := range c.Interfaces {
		field := fmt.Sprintf("interfaces[%d]", i)
		if _, err := net.ParseMAC(nic.MAC); err != nil {
			bad(field+".mac", "%q: %v", nic.MAC, err)
		}
		var prefix netip.Prefix
		if nic.Address != "" {
			p, err := netip.ParsePrefix(nic.Address)
			if err != nil {
				bad(field+".address", "%q is not an address in CIDR form such as 10.0.0.2/24", nic.Address)
			}
			prefix = p
		}
		if nic.Gateway != "" {
			gw, err := netip.ParseAddr(nic.Gateway)
			switch {
			case err != nil:
				bad(field+".gateway", "%q is not an IP address", nic.Gateway)
			case nic.Address == "":
				bad(field+".gateway", "needs address to be set")
			case prefix.IsValid() && !prefix.Masked().Contains(gw):
				bad(field+".gateway", "%s is outside %s", gw, prefix.Masked())
			}
		}
		if nic.MTU != 0 && (nic.MTU < 68 || nic.MTU > 65535) {
			bad(field+".mtu", "%d is outside 68..65535", nic.MTU)
		}
		for j, ns := range nic.Nameservers {
			if _, err := netip.ParseAddr(ns); err != nil {
				bad(fmt.Sprintf("%s.nameservers[%d]", field, j), "%q is not an IP address", ns)
			}
		}
		if nic.MMDS {
			mmds++
		}
	}
	if mmds > 1 {
		bad("interfaces", "%d interfaces are marked mmds, at most one may be", mmds)
	}
	for i, m := range c.Modules {
		if !path.IsAbs(m) {
			bad(fmt.Sprintf("modules[%d]", i), "%q must be an absolute path inside the initramfs", m)
		}
	}
	if len(c.ConsoleKey) < 16 {
		bad("console_key", "must be at least 16 random bytes (see guest.NewConsoleKey)")
	}
	for i, p := range c.EffectiveBindMounts() {
		if !path.IsAbs(p) || path.Clean(p) == "/" {
			bad(fmt.Sprintf("bind_mounts[%d]", i), "%q must be an absolute path other than /", p)
		}
	}
	for k := range c.Sysctls {
		if k == "" || strings.ContainsAny(k, "/ ") || strings.Contains(k, "..") {
			bad("sysctls", "%q is not a sysctl name such as net.ipv4.ip_forward", k)
		}
	}
	if c.StopGrace < 0 {
		bad("stop_grace", "must not be negative")
	}
	return errors.Join(errs...)
}

func validHostname(h string) bool {
	if len(h) > 64 {
		return false
	}
	for _, label := range strings.Split(h, ".") {
		if label == "" || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for _, r := range label {
			if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-') {
				return false
			}
		}
	}
	return true
}
