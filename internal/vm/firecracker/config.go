package firecracker

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"

	fc "github.com/firecracker-microvm/firecracker-go-sdk"
	"github.com/firecracker-microvm/firecracker-go-sdk/client/models"

	"github.com/fireactions/fireactions/internal/guest"
	"github.com/fireactions/fireactions/internal/vm"
)

// Files of a VM directory that belong to this backend.
const (
	apiSocketName   = "firecracker.sock"
	consoleFIFOName = "console.in"
	stderrName      = "vmm.stderr"
	metricsName     = "metrics.json"
)

// maxSunPath is the room for a socket path in struct sockaddr_un, NUL
// included. Firecracker binds its API socket at the path it is given.
const maxSunPath = 108

// plan is everything Start decides before anything runs: where each file
// is on the host and where the VMM sees it (the same path, except under the
// jailer), and the SDK configuration built from them.
type plan struct {
	spec   *vm.Spec
	layout vm.Layout
	bin    string

	data persisted

	// What the VMM is told. Under the jailer these are paths inside the
	// jail, where the VM directory is mirrored (see jail.go); otherwise
	// they are the host paths.
	vmmSocket, vmmLog, vmmMetrics string
	kernel, initrd                string
	drives                        []string
	vsock                         string

	jail *jailPlan
}

// instanceID turns a VM id into Firecracker's instance id (and the jail's
// name), which allows only letters, digits and '-', at most 64. An id that
// needs changes gets a hash suffix so distinct ids stay distinct.
func instanceID(id string) string {
	ok := true
	var b strings.Builder
	for _, r := range id {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' {
			b.WriteRune(r)
		} else {
			b.WriteByte('-')
			ok = false
		}
	}
	if ok {
		return id
	}
	h := sha256.Sum256([]byte(id))
	s := b.String()
	if len(s) > 55 {
		s = s[:55]
	}
	return s + "-" + hex.EncodeToString(h[:4])
}

// tapName is the name of the metadata interface's host tap: unique per VM
// directory, at most 15 bytes.
func tapName(dir string) string {
	h := sha256.Sum256([]byte(dir))
	return "fcmmds" + hex.EncodeToString(h[:4])
}

func (b *Backend) newPlan(spec *vm.Spec, layout vm.Layout, bin string) (*plan, error) {
	p := &plan{spec: spec, layout: layout, bin: bin}
	p.data = persisted{
		APISocket:   layout.Path(apiSocketName),
		ConsoleFIFO: layout.Path(consoleFIFOName),
		Stderr:      layout.Path(stderrName),
		Metrics:     layout.Path(metricsName),
		InstanceID:  instanceID(spec.ID),
		NetNS:       spec.NetNS,
	}
	p.vmmSocket, p.vmmLog, p.vmmMetrics = p.data.APISocket, layout.VMMLog, p.data.Metrics
	p.kernel = spec.Kernel
	p.initrd = spec.Initrd
	if layout.Initrd != "" {
		p.initrd = layout.Initrd
	}
	for _, d := range spec.Drives {
		p.drives = append(p.drives, d.Path)
	}
	if spec.Vsock != nil {
		p.vsock = spec.Vsock.UDSPath
		p.data.Vsock = spec.Vsock.UDSPath
	}
	if len(spec.Metadata) > 0 {
		p.data.MMDS = true
		p.data.MMDSTap = tapName(layout.Dir)
	}
	if j := b.opts.Jailer; j != nil {
		jp, err := newJailPlan(j, p)
		if err != nil {
			return nil, err
		}
		p.jail = jp
	}
	// Firecracker binds the path it is given (the host path, or the path
	// inside the jail); this process dials long paths through
	// vm.DialUnix.
	if n := len(p.vmmSocket); n >= maxSunPath {
		return nil, fmt.Errorf("API socket path %s is %d bytes, more than a Unix socket address holds (%d): use a shorter data directory", p.vmmSocket, n, maxSunPath-1)
	}
	return p, nil
}

// vmmArgs are firecracker's own arguments (under the jailer, the ones after
// "--"). The log and metrics paths are given on the command line rather
// than through the API so that the VMM logs from its first line on, and
// because they put the VM directory into the VMM's command line, which is
// how a restarted manager recognises the process.
func (p *plan) vmmArgs(level string) []string {
	a := []string{
		"--log-path", p.vmmLog, "--level", level, "--show-level",
		"--metrics-path", p.vmmMetrics,
	}
	if p.jail != nil {
		// The jailer passes --id itself, and the socket path is the
		// jail-relative one.
		return append([]string{"--api-sock", p.vmmSocket}, a...)
	}
	return a
}

// sdkConfig is the SDK's view of the VM. Logging is configured on the
// command line (vmmArgs), so the SDK's log and metrics fields stay empty.
func (p *plan) sdkConfig() fc.Config {
	s := p.spec
	cfg := fc.Config{
		SocketPath:      p.vmmSocket,
		KernelImagePath: p.kernel,
		InitrdPath:      p.initrd,
		KernelArgs:      bootArgs(s.BootArgs),
		Drives:          p.sdkDrives(),
		VMID:            p.data.InstanceID,
		NetNS:           s.NetNS,
		MachineCfg: models.MachineConfiguration{
			VcpuCount:  fc.Int64(int64(s.VCPUs)),
			MemSizeMib: fc.Int64(int64(s.MemoryMiB)),
			Smt:        fc.Bool(s.SMT),
		},
		NetworkInterfaces: p.sdkInterfaces(),
		// Never forward this process's signals (a terminal's Ctrl-C) to
		// the VMM: its lifetime is owned explicitly. A nil list would
		// mean the SDK's defaults.
		ForwardSignals: []os.Signal{},
		// Firecracker's default seccomp filters stay on; a disabled
		// config would add --no-seccomp.
		Seccomp: fc.SeccompConfig{Enabled: true},
	}
	if s.CPUTemplate != "" {
		cfg.MachineCfg.CPUTemplate = models.CPUTemplate(s.CPUTemplate)
	}
	if p.data.MMDS {
		cfg.MmdsAddress = mmdsAddress
		cfg.MmdsVersion = fc.MMDSv1
		if s.MMDSVersion == vm.MMDSv2 {
			cfg.MmdsVersion = fc.MMDSv2
		}
	}
	if s.Vsock != nil {
		cfg.VsockDevices = []fc.VsockDevice{{ID: "vsock0", Path: p.vsock, CID: s.Vsock.GuestCID}}
	}
	if p.jail != nil {
		cfg.JailerCfg = p.jail.sdkConfig(p)
	}
	return cfg
}

// bootArgs adds what a Firecracker guest needs to the caller's arguments,
// unless the caller already chose a value.
func bootArgs(args string) string {
	words := strings.Fields(args)
	has := func(key string) bool {
		for _, w := range words {
			if w == key || strings.HasPrefix(w, key+"=") {
				return true
			}
		}
		return false
	}
	add := func(key, val string) {
		if has(key) {
			return
		}
		if val == "" {
			words = append(words, key)
		} else {
			words = append(words, key+"="+val)
		}
	}
	add("console", "ttyS0")
	// A reboot through the keyboard controller is what makes Firecracker
	// exit (with status 0), and a panicking guest reboots at once.
	add("reboot", "k")
	add("panic", "-1")
	if !has("debug") && !has("loglevel") {
		add("quiet", "")
	}
	return strings.Join(words, " ")
}

// drive IDs name drives in the API; the guest does not see them.
func driveID(i int, d vm.Drive) string {
	switch d.Role {
	case vm.RoleBase, vm.RoleScratch:
		return string(d.Role)
	}
	return fmt.Sprintf("extra%d", i)
}

func (p *plan) sdkDrives() []models.Drive {
	var out []models.Drive
	for i, d := range p.spec.Drives {
		md := models.Drive{
			DriveID:      fc.String(driveID(i, d)),
			PathOnHost:   fc.String(p.drives[i]),
			IsReadOnly:   fc.Bool(d.ReadOnly),
			IsRootDevice: fc.Bool(false),
		}
		// A user's disk outlives the VM: honour the guest's flushes. The
		// scratch disk dies with the VM, so Firecracker's default (flushes
		// ignored) is the faster choice there.
		if d.Role == vm.RoleExtra && !d.ReadOnly {
			md.CacheType = fc.String(models.DriveCacheTypeWriteback)
		}
		out = append(out, md)
	}
	return out
}

func (p *plan) sdkInterfaces() fc.NetworkInterfaces {
	var out fc.NetworkInterfaces
	for _, n := range p.spec.Interfaces {
		out = append(out, fc.NetworkInterface{StaticConfiguration: &fc.StaticNetworkConfiguration{
			MacAddress: n.MAC, HostDevName: n.TapName,
		}})
	}
	if p.data.MMDS {
		out = append(out, fc.NetworkInterface{
			StaticConfiguration: &fc.StaticNetworkConfiguration{MacAddress: mmdsMAC(p.spec.ID), HostDevName: p.data.MMDSTap},
			AllowMMDS:           true,
		})
	}
	return out
}

var mmdsAddress = net.ParseIP(guest.MMDSAddress)

// jailPath is where a host path is found from inside a jail rooted at root.
func jailPath(root, p string) string { return filepath.Join(root, p) }
