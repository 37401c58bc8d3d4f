// Package hostnet owns the host side of the VM network that is shared by
// all VMs: the bridge and its address, IPv4 forwarding, NAT for the VM
// subnet, the per-bridge nftables isolation tables (no VM-to-VM traffic,
// VM-to-host only on the ports the configuration needs, no link-local or
// cloud metadata destinations, a new-connection rate limit per source
// address, anti-spoofing per VM port), the installed CNI configuration
// list, and the preflight checks of `fireactions host check`.
//
// Setup and Teardown act on the network namespace of the calling process,
// so tests run them inside a namespace they created.
package hostnet

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"

	"github.com/fireactions/fireactions/internal/config"
	"github.com/fireactions/fireactions/internal/network"
)

// DefaultMetadataPort is the gateway port the metadata service listens
// on; VM connections to 169.254.169.254:80 are redirected to it.
const DefaultMetadataPort = 8169

// RateLimit bounds how many new connections one VM address may open (to
// the host or through it): Rate per Per, with bursts of up to Burst.
type RateLimit struct {
	Rate uint64
	// Per is time.Second, time.Minute or time.Hour; zero means a second.
	Per   time.Duration
	Burst uint32
}

// DefaultRateLimit is generous for CI jobs (parallel package downloads)
// and still stops one VM from flooding the host's conntrack table.
var DefaultRateLimit = RateLimit{Rate: 100, Per: time.Second, Burst: 200}

// Options configure Setup and Teardown.
type Options struct {
	Network       config.Network
	RegistryCache config.RegistryCache
	// StateDir records what Setup changed so Teardown reverts exactly
	// that; required. Use <data-dir>/hostnet.
	StateDir string
	// MetadataPort is where 169.254.169.254:80 is redirected on the
	// gateway; 0 means DefaultMetadataPort.
	MetadataPort int
	// RateLimit of new connections per VM address; zero means
	// DefaultRateLimit.
	RateLimit RateLimit
	// Conflist tunes the installed CNI configuration list.
	Conflist network.ConflistOptions
	Logger   *slog.Logger
}

// OptionsFromConfig returns the options for cfg (defaults applied) with
// state under dataDir.
func OptionsFromConfig(cfg *config.Config, dataDir string) Options {
	return Options{
		Network:       cfg.Network,
		RegistryCache: cfg.RegistryCache,
		StateDir:      filepath.Join(dataDir, "hostnet"),
	}
}

func (o *Options) fill() error {
	if o.StateDir == "" {
		return errors.New("hostnet: Options.StateDir is required (use <data-dir>/hostnet)")
	}
	if o.MetadataPort == 0 {
		o.MetadataPort = DefaultMetadataPort
	}
	if o.MetadataPort < 1 || o.MetadataPort > 65535 {
		return fmt.Errorf("hostnet: metadata port %d is not a TCP port", o.MetadataPort)
	}
	if o.RateLimit.Rate == 0 {
		o.RateLimit = DefaultRateLimit
	}
	if o.RateLimit.Per == 0 {
		o.RateLimit.Per = time.Second
	}
	switch o.RateLimit.Per {
	case time.Second, time.Minute, time.Hour:
	default:
		return fmt.Errorf("hostnet: rate limit period %s: use a second, a minute or an hour", o.RateLimit.Per)
	}
	if o.RateLimit.Burst == 0 {
		o.RateLimit.Burst = uint32(o.RateLimit.Rate)
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	return nil
}

// rules derives the isolation ruleset from the options.
func (o *Options) rules() (rules, error) {
	n := o.Network
	subnet, err := netip.ParsePrefix(n.Subnet)
	if err != nil {
		return rules{}, fmt.Errorf("network.subnet: %q is not a CIDR such as 10.200.0.0/24", n.Subnet)
	}
	gw, err := netip.ParseAddr(n.Gateway)
	if err != nil || !gw.Is4() || !subnet.Contains(gw) {
		return rules{}, fmt.Errorf("network.gateway: %q is not an IPv4 address inside %s", n.Gateway, subnet)
	}
	if n.Bridge == "" || len(n.Bridge) > 15 {
		return rules{}, fmt.Errorf("network.bridge: %q is not an interface name of 1-15 characters", n.Bridge)
	}
	r := rules{
		bridge:    n.Bridge,
		subnet:    subnet.Masked(),
		hostAddrs: []netip.Addr{gw},
		tcpPorts:  []uint16{53},
		udpPorts:  []uint16{53},
		mmdsPort:  uint16(o.MetadataPort),
		rate:      o.RateLimit,
	}
	rc := o.RegistryCache
	if rc.Enabled {
		if a, err := netip.ParseAddr(rc.Gateway); err == nil && a.Is4() && a != gw {
			r.hostAddrs = append(r.hostAddrs, a)
		}
		if rc.Zot.Port > 0 {
			r.tcpPorts = append(r.tcpPorts, uint16(rc.Zot.Port))
		}
		if rc.Squid.Enabled {
			for _, p := range []int{rc.Squid.HTTPPort, rc.Squid.HTTPSPort} {
				if p > 0 {
					r.tcpPorts = append(r.tcpPorts, uint16(p))
				}
			}
		}
	}
	return r, nil
}

// state is what Setup changed on the host, for Teardown.
type state struct {
	Bridge        string `json:"bridge"`
	BridgeCreated bool   `json:"bridge_created,omitempty"`
	// ForwardBefore is net.ipv4.ip_forward before Setup first set it.
	ForwardBefore string `json:"ip_forward_before,omitempty"`
	Conflist      string `json:"conflist,omitempty"`
	// ConflistBefore is the file Setup replaced (nil: there was none).
	ConflistBefore []byte `json:"conflist_before,omitempty"`
	ConflistHad    bool   `json:"conflist_had,omitempty"`
}

func statePath(dir, bridge string) string { return filepath.Join(dir, bridge+".json") }

func loadState(dir, bridge string) (*state, error) {
	data, err := os.ReadFile(statePath(dir, bridge))
	if errors.Is(err, os.ErrNotExist) {
		return &state{Bridge: bridge}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read host setup state: %w", err)
	}
	var st state
	if err := json.Unmarshal(data, &st); err != nil {
		return nil, fmt.Errorf("host setup state %s: %w", statePath(dir, bridge), err)
	}
	return &st, nil
}

func saveState(dir string, st *state) error {
	data, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("host setup state dir: %w", err)
	}
	return writeFileAtomic(statePath(dir, st.Bridge), data, 0o600)
}

func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*.tmp")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer os.Remove(tmp.Name())
	_, err = tmp.Write(data)
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Chmod(tmp.Name(), mode)
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// Step is one thing Setup or Teardown did or found already done.
type Step struct {
	What    string
	Changed bool
}

func (s Step) String() string {
	if s.Changed {
		return s.What
	}
	return s.What + " (already)"
}

// Setup prepares the host for VMs on the configured network; running it
// again changes nothing that is already right (VM ports registered in the
// isolation table are kept).
func Setup(ctx context.Context, opts Options) ([]Step, error) {
	if err := opts.fill(); err != nil {
		return nil, err
	}
	r, err := opts.rules()
	if err != nil {
		return nil, err
	}
	conflist, err := network.RenderConflist(opts.Network, opts.Conflist)
	if err != nil {
		return nil, err
	}
	st, err := loadState(opts.StateDir, r.bridge)
	if err != nil {
		return nil, err
	}
	var steps []Step

	step, err := ensureBridge(opts, r, st)
	if err != nil {
		return steps, err
	}
	steps = append(steps, step)

	step, err = ensureForwarding(opts.StateDir, st)
	if err != nil {
		return steps, err
	}
	steps = append(steps, step)

	if err := ctx.Err(); err != nil {
		return steps, err
	}
	step, err = installTables(r)
	if err != nil {
		return steps, err
	}
	steps = append(steps, step)

	step, err = installConflist(opts, st, conflist)
	if err != nil {
		return steps, err
	}
	steps = append(steps, step)
	if err := saveState(opts.StateDir, st); err != nil {
		return steps, err
	}
	opts.Logger.Info("host network ready", "bridge", r.bridge, "subnet", r.subnet, "table", TableName(r.bridge))
	return steps, nil
}

func ensureBridge(opts Options, r rules, st *state) (Step, error) {
	n := opts.Network
	changed := false
	link, err := netlink.LinkByName(r.bridge)
	var notFound netlink.LinkNotFoundError
	switch {
	case errors.As(err, &notFound):
		// Recorded first: a crash right after creating must not make the
		// bridge look like someone else's.
		st.BridgeCreated = true
		if err := saveState(opts.StateDir, st); err != nil {
			return Step{}, err
		}
		attrs := netlink.NewLinkAttrs()
		attrs.Name = r.bridge
		attrs.HardwareAddr = BridgeMAC(r.bridge)
		if n.MTU > 0 {
			attrs.MTU = n.MTU
		}
		if err := netlink.LinkAdd(&netlink.Bridge{LinkAttrs: attrs}); err != nil {
			return Step{}, fmt.Errorf("create bridge %s: %w", r.bridge, err)
		}
		if link, err = netlink.LinkByName(r.bridge); err != nil {
			return Step{}, fmt.Errorf("bridge %s: %w", r.bridge, err)
		}
		changed = true
	case err != nil:
		return Step{}, fmt.Errorf("look up bridge %s: %w", r.bridge, err)
	case link.Type() != "bridge":
		return Step{}, fmt.Errorf("network.bridge: %s exists and is a %s device, not a bridge; choose another name", r.bridge, link.Type())
	}
	// A bridge without a MAC of its own takes the lowest of its ports'
	// so it would change as VMs come and go: the bridge plugin's CHECK
	// then fails for every VM attached before, and guests' ARP caches go
	// stale.
	if mac := BridgeMAC(r.bridge); link.Attrs().HardwareAddr.String() != mac.String() {
		if err := netlink.LinkSetHardwareAddr(link, mac); err != nil {
			return Step{}, fmt.Errorf("set %s address %s: %w", r.bridge, mac, err)
		}
		changed = true
	}
	if n.MTU > 0 && link.Attrs().MTU != n.MTU {
		if err := netlink.LinkSetMTU(link, n.MTU); err != nil {
			return Step{}, fmt.Errorf("set %s mtu %d: %w", r.bridge, n.MTU, err)
		}
		changed = true
	}
	gw := r.hostAddrs[0]
	want := &net.IPNet{IP: gw.AsSlice(), Mask: net.CIDRMask(r.subnet.Bits(), 32)}
	addrs, err := netlink.AddrList(link, netlink.FAMILY_V4)
	if err != nil {
		return Step{}, fmt.Errorf("addresses of %s: %w", r.bridge, err)
	}
	have := false
	for _, a := range addrs {
		have = have || a.IPNet.String() == want.String()
	}
	if !have {
		if err := netlink.AddrAdd(link, &netlink.Addr{IPNet: want}); err != nil {
			return Step{}, fmt.Errorf("add %s to %s: %w", want, r.bridge, err)
		}
		changed = true
	}
	if link.Attrs().Flags&net.FlagUp == 0 {
		if err := netlink.LinkSetUp(link); err != nil {
			return Step{}, fmt.Errorf("set %s up: %w", r.bridge, err)
		}
		changed = true
	}
	return Step{What: fmt.Sprintf("bridge %s with %s", r.bridge, want), Changed: changed}, nil
}

// BridgeMAC is the fixed address Setup gives a bridge: locally
// administered, unicast, derived from the bridge's name (0a:fa:…, apart
// from the VMs' 06:fa:…).
func BridgeMAC(bridge string) net.HardwareAddr {
	h := sha256.Sum256([]byte("fireactions bridge\x00" + bridge))
	return net.HardwareAddr{0x0a, 0xfa, h[0], h[1], h[2], h[3]}
}

// forwardSysctl is per network namespace: the kernel resolves /proc/sys/net
// for the namespace of the process that opens it.
const forwardSysctl = "/proc/sys/net/ipv4/ip_forward"

func ensureForwarding(stateDir string, st *state) (Step, error) {
	cur, err := os.ReadFile(forwardSysctl)
	if err != nil {
		return Step{}, fmt.Errorf("read net.ipv4.ip_forward: %w", err)
	}
	v := strings.TrimSpace(string(cur))
	if v == "1" {
		return Step{What: "net.ipv4.ip_forward=1"}, nil
	}
	if st.ForwardBefore == "" {
		st.ForwardBefore = v
		if err := saveState(stateDir, st); err != nil {
			return Step{}, err
		}
	}
	if err := os.WriteFile(forwardSysctl, []byte("1\n"), 0o644); err != nil {
		return Step{}, fmt.Errorf("set net.ipv4.ip_forward=1: %w", err)
	}
	return Step{What: "net.ipv4.ip_forward=1", Changed: true}, nil
}

// installTables replaces both isolation tables in one transaction,
// carrying over the registered VM ports.
func installTables(r rules) (Step, error) {
	c, err := nftables.New()
	if err != nil {
		return Step{}, fmt.Errorf("nftables: %w", err)
	}
	vmPorts, ports, existed, err := currentPorts(c, r.bridge)
	if err != nil {
		return Step{}, err
	}
	if err := buildInet(c, r); err != nil {
		return Step{}, fmt.Errorf("nftables table inet %s: %w", TableName(r.bridge), err)
	}
	if err := buildBridge(c, r.bridge, vmPorts, ports); err != nil {
		return Step{}, fmt.Errorf("nftables table bridge %s: %w", TableName(r.bridge), err)
	}
	if err := c.Flush(); err != nil {
		return Step{}, fmt.Errorf("install nftables tables %s: %w", TableName(r.bridge), err)
	}
	return Step{What: fmt.Sprintf("nftables tables inet+bridge %s, %d VM ports kept", TableName(r.bridge), len(ports)), Changed: !existed}, nil
}

// currentPorts reads the VM ports registered in the bridge table, so a
// re-run of Setup keeps running VMs connected.
func currentPorts(c *nftables.Conn, bridge string) (vmPorts, ports []nftables.SetElement, existed bool, err error) {
	t, err := c.ListTableOfFamily(TableName(bridge), nftables.TableFamilyBridge)
	if err != nil || t == nil {
		return nil, nil, false, nil // no table yet
	}
	read := func(name string) ([]nftables.SetElement, error) {
		s, err := c.GetSetByName(t, name)
		if err != nil {
			return nil, nil // an older table without this set
		}
		elems, err := c.GetSetElements(s)
		if err != nil {
			return nil, fmt.Errorf("read set %s of %s: %w", name, t.Name, err)
		}
		out := make([]nftables.SetElement, 0, len(elems))
		for _, e := range elems {
			// Drop ports whose interface is gone (a VM that was never
			// detached); the interface name leads every key.
			name := string(bytes.TrimRight(e.Key[:min(16, len(e.Key))], "\x00"))
			if _, err := netlink.LinkByName(name); err != nil {
				continue
			}
			out = append(out, nftables.SetElement{Key: e.Key})
		}
		return out, nil
	}
	if vmPorts, err = read(setVMPorts); err != nil {
		return nil, nil, true, err
	}
	if ports, err = read(setPorts); err != nil {
		return nil, nil, true, err
	}
	return vmPorts, ports, true, nil
}

func installConflist(opts Options, st *state, data []byte) (Step, error) {
	path := network.ConflistPath(opts.Network.ConfDir, opts.Network.Name)
	what := "CNI network " + opts.Network.Name + " in " + path
	old, err := os.ReadFile(path)
	switch {
	case err == nil && bytes.Equal(old, data):
		return Step{What: what}, nil
	case err == nil:
		if st.Conflist == "" {
			st.ConflistBefore, st.ConflistHad = old, true
		}
	case errors.Is(err, os.ErrNotExist):
	default:
		return Step{}, fmt.Errorf("read %s: %w", path, err)
	}
	st.Conflist = path
	if err := saveState(opts.StateDir, st); err != nil {
		return Step{}, err
	}
	if err := os.MkdirAll(opts.Network.ConfDir, 0o755); err != nil {
		return Step{}, fmt.Errorf("network.conf_dir: %w", err)
	}
	if err := writeFileAtomic(path, data, 0o644); err != nil {
		return Step{}, err
	}
	return Step{What: what, Changed: true}, nil
}

// ErrBridgeInUse is returned by Teardown while VMs are attached.
var ErrBridgeInUse = errors.New("bridge in use")

// Teardown reverts Setup: the isolation tables, the CNI configuration
// list (the previous file is restored), the bridge if Setup created it,
// and ip_forward if Setup changed it. It refuses while VM ports are on the
// bridge unless force is set.
func Teardown(ctx context.Context, opts Options, force bool) ([]Step, error) {
	if err := opts.fill(); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	bridge := opts.Network.Bridge
	st, err := loadState(opts.StateDir, bridge)
	if err != nil {
		return nil, err
	}
	link, lerr := netlink.LinkByName(bridge)
	if lerr == nil && !force {
		if ports := bridgePorts(link); len(ports) > 0 {
			return nil, fmt.Errorf("teardown %s: %w by %d VM port(s) (%s): stop the VMs first, or pass --force", bridge, ErrBridgeInUse, len(ports), strings.Join(ports, ", "))
		}
	}
	var steps []Step
	var errs []error

	step, err := deleteTables(bridge)
	if err != nil {
		errs = append(errs, err)
	} else {
		steps = append(steps, step)
	}

	if st.Conflist != "" {
		switch {
		case st.ConflistHad:
			err = writeFileAtomic(st.Conflist, st.ConflistBefore, 0o644)
			steps = append(steps, Step{What: "restored " + st.Conflist, Changed: true})
		default:
			err = os.Remove(st.Conflist)
			if errors.Is(err, os.ErrNotExist) {
				err = nil
			}
			steps = append(steps, Step{What: "removed " + st.Conflist, Changed: true})
		}
		if err != nil {
			errs = append(errs, err)
		}
	}

	if st.BridgeCreated && lerr == nil {
		if err := netlink.LinkDel(link); err != nil {
			errs = append(errs, fmt.Errorf("delete bridge %s: %w", bridge, err))
		} else {
			steps = append(steps, Step{What: "deleted bridge " + bridge, Changed: true})
		}
	}

	if st.ForwardBefore != "" && st.ForwardBefore != "1" && !otherSetups(opts.StateDir, bridge) {
		if err := os.WriteFile(forwardSysctl, []byte(st.ForwardBefore+"\n"), 0o644); err != nil {
			errs = append(errs, fmt.Errorf("restore net.ipv4.ip_forward: %w", err))
		} else {
			steps = append(steps, Step{What: "net.ipv4.ip_forward=" + st.ForwardBefore, Changed: true})
		}
	}
	if err := errors.Join(errs...); err != nil {
		// Keep the state so a second teardown can finish the job.
		return steps, err
	}
	if err := os.Remove(statePath(opts.StateDir, bridge)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return steps, fmt.Errorf("remove host setup state: %w", err)
	}
	return steps, nil
}

// otherSetups reports whether another bridge's setup still needs
// forwarding.
func otherSetups(dir, bridge string) bool {
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if strings.HasSuffix(e.Name(), ".json") && e.Name() != bridge+".json" {
			return true
		}
	}
	return false
}

// bridgePorts lists the interfaces enslaved to a bridge.
func bridgePorts(br netlink.Link) []string {
	links, err := netlink.LinkList()
	if err != nil {
		return nil
	}
	var out []string
	for _, l := range links {
		if l.Attrs().MasterIndex == br.Attrs().Index {
			out = append(out, l.Attrs().Name)
		}
	}
	return out
}

func deleteTables(bridge string) (Step, error) {
	c, err := nftables.New()
	if err != nil {
		return Step{}, fmt.Errorf("nftables: %w", err)
	}
	name := TableName(bridge)
	n := 0
	for _, fam := range []nftables.TableFamily{nftables.TableFamilyINet, nftables.TableFamilyBridge} {
		if t, err := c.ListTableOfFamily(name, fam); err == nil && t != nil {
			c.DelTable(t)
			n++
		}
	}
	if n == 0 {
		return Step{What: "nftables tables " + name + " absent"}, nil
	}
	if err := c.Flush(); err != nil {
		return Step{}, fmt.Errorf("delete nftables tables %s: %w", name, err)
	}
	return Step{What: "deleted nftables tables " + name, Changed: true}, nil
}
