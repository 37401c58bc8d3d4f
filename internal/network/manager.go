package network

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/containernetworking/cni/libcni"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/fireactions/fireactions/internal/config"
)

const (
	// DefaultNetNSDir is where VM namespaces are bound, the directory
	// `ip netns` uses, so `ip netns exec fireactions-<id> ...` works.
	DefaultNetNSDir = "/run/netns"
	// NetNSPrefix starts the name of every namespace fireactions creates.
	NetNSPrefix = "fireactions-"
	// VMIfName is the VM's veth inside its namespace; tc-redirect-tap
	// mirrors it to VMTapName.
	VMIfName = "eth0"
	// VMTapName is the tap the VMM attaches to, inside the VM's namespace
	// (so every VM can use the same name).
	VMTapName = "tap0"
	// undoTimeout bounds the clean-up of a failed Attach, which must run
	// even when the caller's context is already cancelled.
	undoTimeout = time.Minute
)

// ErrAttached is returned by Attach for a VM that is already attached.
var ErrAttached = errors.New("already attached")

// ErrNotAttached is returned by Get and Check for a VM without attachment.
var ErrNotAttached = errors.New("not attached")

// idPattern is what both CNI (container ids) and the VM layer accept.
var idPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`)

// Port is a VM's port on a CNI bridge: the host-side veth and the only
// source MAC and IPv4 address frames from it may carry.
type Port struct {
	Bridge        string `json:"bridge"`
	HostInterface string `json:"host_interface"`
	MAC           string `json:"mac"`
	IP            string `json:"ip"`
}

// PortFilter registers VM ports with the host's isolation rules
// (hostnet.Isolation implements it). Both methods are idempotent. The
// manager calls RevokePort before CNI DEL (to cut the port off) and again
// after it (to forget the deleted interface).
type PortFilter interface {
	AllowPort(ctx context.Context, p Port) error
	RevokePort(ctx context.Context, p Port) error
}

// Options configure a Manager.
type Options struct {
	// Network is the default network and where CNI configuration lists
	// and plugins are found (ConfDir, BinDirs).
	Network config.Network
	// StateDir holds one record per attached VM; required. Use
	// <data-dir>/network.
	StateDir string
	// CacheDir is libcni's result cache; empty means StateDir/cni.
	CacheDir string
	// NetNSDir is where VM namespaces are bound; empty means /run/netns.
	NetNSDir string
	// PluginDirs is the CNI plugin search path; empty means
	// PluginDirs(Network).
	PluginDirs []string
	// PortFilter receives every CNI port (anti-spoofing). Required for CNI
	// attachments: the isolation table `fireactions host setup` installs
	// drops frames from ports it was not told about.
	PortFilter PortFilter
	// ResolvConf supplies nameservers when the network gives none; empty
	// means /etc/resolv.conf.
	ResolvConf string
	Logger     *slog.Logger
}

// Manager attaches VMs to networks and detaches them, in this process or
// after a restart. It is safe for concurrent use; operations on one VM id
// are serialised.
type Manager struct {
	opts Options
	cni  *libcni.CNIConfig
	rec  records
	log  *slog.Logger

	mu   sync.Mutex
	busy map[string]chan struct{}
}

// New returns a Manager. It creates nothing on the host until Attach.
func New(opts Options) (*Manager, error) {
	if opts.StateDir == "" {
		return nil, errors.New("network: Options.StateDir is required (use <data-dir>/network)")
	}
	if opts.CacheDir == "" {
		opts.CacheDir = filepath.Join(opts.StateDir, "cni")
	}
	if opts.NetNSDir == "" {
		opts.NetNSDir = DefaultNetNSDir
	}
	if len(opts.PluginDirs) == 0 {
		opts.PluginDirs = PluginDirs(opts.Network)
	}
	if opts.ResolvConf == "" {
		opts.ResolvConf = "/etc/resolv.conf"
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	return &Manager{
		opts: opts,
		cni:  libcni.NewCNIConfigWithCacheDir(opts.PluginDirs, opts.CacheDir, nil),
		rec:  records{dir: opts.StateDir},
		log:  opts.Logger.With("component", "network"),
		busy: map[string]chan struct{}{},
	}, nil
}

// lock serialises operations on one VM id.
func (m *Manager) lock(ctx context.Context, id string) (func(), error) {
	for {
		m.mu.Lock()
		ch, held := m.busy[id]
		if !held {
			ch = make(chan struct{})
			m.busy[id] = ch
			m.mu.Unlock()
			return func() {
				m.mu.Lock()
				delete(m.busy, id)
				m.mu.Unlock()
				close(ch)
			}, nil
		}
		m.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

func checkID(id string) error {
	if !idPattern.MatchString(id) {
		return fmt.Errorf("vm id %q: use 1-64 letters, digits, '-', '_' or '.', starting with a letter or digit", id)
	}
	return nil
}

// Attach connects VM vmID as req says and returns what the VMM and the
// guest need. On error nothing of the attachment is left behind.
func (m *Manager) Attach(ctx context.Context, vmID string, req Request) (*Attachment, error) {
	if err := checkID(vmID); err != nil {
		return nil, fmt.Errorf("attach: %w", err)
	}
	hw := DeriveMAC(vmID, 0)
	if req.MAC != "" {
		var err error
		if hw, err = parseMAC(req.MAC); err != nil {
			return nil, fmt.Errorf("attach %s: %w", vmID, err)
		}
	}
	unlock, err := m.lock(ctx, vmID)
	if err != nil {
		return nil, fmt.Errorf("attach %s: %w", vmID, err)
	}
	defer unlock()
	if _, err := os.Stat(m.rec.path(vmID)); err == nil {
		return nil, fmt.Errorf("attach %s: %w (detach it first)", vmID, ErrAttached)
	}
	if req.Static != nil {
		return m.attachStatic(ctx, vmID, req.Static, hw)
	}
	return m.attachCNI(ctx, vmID, req.Network, hw)
}

func (m *Manager) attachCNI(ctx context.Context, vmID, network string, hw net.HardwareAddr) (att *Attachment, err error) {
	if network == "" {
		network = m.opts.Network.Name
	}
	if m.opts.PortFilter == nil {
		return nil, fmt.Errorf("attach %s: network.Options.PortFilter is required for CNI networks (use hostnet.NewIsolation)", vmID)
	}
	list, err := libcni.LoadConfList(m.opts.Network.ConfDir, network)
	if err != nil {
		return nil, fmt.Errorf("attach %s: CNI network %q: %w (run `fireactions host setup` to install the default network)", vmID, network, err)
	}
	rec := &record{
		VMID:     vmID,
		Kind:     KindCNI,
		Network:  list.Name,
		NetNS:    filepath.Join(m.opts.NetNSDir, NetNSPrefix+vmID),
		IfName:   VMIfName,
		Conflist: list.Bytes,
		// IgnoreUnknown: every plugin of the chain sees every argument.
		// MAC is the bridge plugin's (the VM's veth gets the VM's MAC);
		// TC_REDIRECT_TAP_NAME is tc-redirect-tap's.
		CNIArgs: [][2]string{{"IgnoreUnknown", "1"}, {"MAC", hw.String()}, {"TC_REDIRECT_TAP_NAME", VMTapName}},
		Created: time.Now().UTC(),
	}
	// The record exists before anything it describes, so a crash at any
	// later point leaves something Cleanup can find.
	if err := m.rec.save(rec); err != nil {
		return nil, fmt.Errorf("attach %s: %w", vmID, err)
	}
	defer func() {
		if err != nil {
			uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), undoTimeout)
			defer cancel()
			if uerr := m.undo(uctx, rec); uerr != nil {
				m.log.Error("undo failed attachment", "vm", vmID, "err", uerr)
			}
		}
	}()
	if _, err := createNetNS(m.opts.NetNSDir, NetNSPrefix+vmID); err != nil {
		return nil, fmt.Errorf("attach %s: %w", vmID, err)
	}
	res, err := m.cni.AddNetworkList(ctx, list, m.runtimeConf(rec))
	if err != nil {
		return nil, fmt.Errorf("attach %s: CNI ADD %s: %w", vmID, list.Name, err)
	}
	cur, err := current.NewResultFromResult(res)
	if err != nil {
		return nil, fmt.Errorf("attach %s: CNI result: %w", vmID, err)
	}
	att, err = m.fromResult(vmID, rec, cur)
	if err != nil {
		return nil, fmt.Errorf("attach %s: %w", vmID, err)
	}
	if att.MAC != hw.String() {
		m.log.Warn("the CNI chain ignored the requested MAC", "vm", vmID, "want", hw.String(), "got", att.MAC)
	}
	ip, _ := att.Addr()
	port := Port{Bridge: att.Bridge, HostInterface: att.HostInterface, MAC: att.MAC, IP: ip.String()}
	rec.Port = &port
	if err := m.rec.save(rec); err != nil {
		return nil, fmt.Errorf("attach %s: %w", vmID, err)
	}
	if err := m.opts.PortFilter.AllowPort(ctx, port); err != nil {
		return nil, fmt.Errorf("attach %s: register port: %w", vmID, err)
	}
	rec.Attachment = att
	if err := m.rec.save(rec); err != nil {
		return nil, fmt.Errorf("attach %s: %w", vmID, err)
	}
	m.log.Info("attached", "vm", vmID, "network", list.Name, "ip", att.GuestIP, "mac", att.MAC, "netns", att.NetNSPath)
	return att, nil
}

func (m *Manager) runtimeConf(rec *record) *libcni.RuntimeConf {
	return &libcni.RuntimeConf{
		ContainerID: rec.VMID,
		NetNS:       rec.NetNS,
		IfName:      rec.IfName,
		Args:        rec.CNIArgs,
	}
}

// fromResult finds the VM's interface in a CNI result: tc-redirect-tap
// reports it with the VM id as its sandbox, and an IP configuration
// pointing at it.
func (m *Manager) fromResult(vmID string, rec *record, cur *current.Result) (*Attachment, error) {
	vmIdx := -1
	for i, ifc := range cur.Interfaces {
		if ifc.Sandbox == vmID {
			vmIdx = i
		}
	}
	if vmIdx < 0 {
		return nil, fmt.Errorf("CNI network %s gave no VM interface: its chain must end with tc-redirect-tap", rec.Network)
	}
	vmIfc := cur.Interfaces[vmIdx]
	var ipc *current.IPConfig
	for _, c := range cur.IPs {
		if c.Interface != nil && *c.Interface == vmIdx && c.Address.IP.To4() != nil {
			ipc = c
			break
		}
	}
	if ipc == nil {
		return nil, fmt.Errorf("CNI network %s gave no IPv4 address for the VM", rec.Network)
	}
	addr, _ := netip.AddrFromSlice(ipc.Address.IP.To4())
	ones, _ := ipc.Address.Mask.Size()
	att := &Attachment{
		VMID:      vmID,
		Kind:      KindCNI,
		Network:   rec.Network,
		NetNSPath: rec.NetNS,
		TapName:   vmIfc.Name,
		MAC:       vmIfc.Mac,
		GuestIP:   netip.PrefixFrom(addr, ones).String(),
		MTU:       vmIfc.Mtu,
	}
	if hw, err := net.ParseMAC(vmIfc.Mac); err == nil {
		att.MAC = hw.String()
	}
	if gw := ipc.Gateway.To4(); gw != nil {
		att.Gateway = gw.String()
	}
	att.Nameservers = append(att.Nameservers, cur.DNS.Nameservers...)
	att.SearchDomains = append(att.SearchDomains, cur.DNS.Search...)
	if len(att.Nameservers) == 0 {
		att.Nameservers = hostNameservers(m.opts.ResolvConf)
		if len(att.Nameservers) == 0 {
			m.log.Warn("the VM gets no nameserver: set network.nameservers", "vm", vmID)
		}
	}
	// Host-side interfaces carry no sandbox; the bridge plugin reports the
	// bridge and the VM's veth port.
	for _, ifc := range cur.Interfaces {
		if ifc.Sandbox != "" {
			continue
		}
		l, err := netlink.LinkByName(ifc.Name)
		if err != nil {
			continue
		}
		switch l.Type() {
		case "bridge":
			att.Bridge = ifc.Name
		case "veth":
			att.HostInterface = ifc.Name
		}
	}
	if att.HostInterface == "" {
		return nil, fmt.Errorf("CNI network %s gave no host-side veth: the chain must start with the bridge plugin", rec.Network)
	}
	if att.MTU == 0 {
		mtu, err := linkMTU(rec.NetNS, att.TapName)
		if err != nil {
			return nil, err
		}
		att.MTU = mtu
	}
	return att, nil
}

// linkMTU reads an interface's MTU inside a namespace.
func linkMTU(nsPath, name string) (int, error) {
	h, err := netns.GetFromPath(nsPath)
	if err != nil {
		return 0, fmt.Errorf("open netns %s: %w", nsPath, err)
	}
	defer h.Close()
	nl, err := netlink.NewHandleAt(h)
	if err != nil {
		return 0, fmt.Errorf("netlink in %s: %w", nsPath, err)
	}
	defer nl.Close()
	l, err := nl.LinkByName(name)
	if err != nil {
		return 0, fmt.Errorf("%s in %s: %w", name, nsPath, err)
	}
	return l.Attrs().MTU, nil
}

// hostNameservers returns the non-loopback nameservers of a resolv.conf;
// a loopback resolver (systemd-resolved's 127.0.0.53) is unreachable from
// a VM.
func hostNameservers(path string) []string {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	var out []string
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 || f[0] != "nameserver" {
			continue
		}
		a, err := netip.ParseAddr(f[1])
		if err != nil || a.IsLoopback() || a.Zone() != "" {
			continue
		}
		out = append(out, a.String())
	}
	return out
}

// Get returns VM vmID's attachment, read from its record, so it works in a
// process that did not make it.
func (m *Manager) Get(vmID string) (*Attachment, error) {
	if err := checkID(vmID); err != nil {
		return nil, err
	}
	rec, err := m.rec.load(vmID)
	if errors.Is(err, os.ErrNotExist) || (err == nil && rec.Attachment == nil) {
		return nil, fmt.Errorf("network %s: %w", vmID, ErrNotAttached)
	}
	if err != nil {
		return nil, err
	}
	return rec.Attachment, nil
}

// List returns every complete attachment on record.
func (m *Manager) List() ([]*Attachment, error) {
	ids, err := m.rec.ids()
	if err != nil {
		return nil, err
	}
	var out []*Attachment
	for _, id := range ids {
		if rec, err := m.rec.load(id); err == nil && rec.Attachment != nil {
			out = append(out, rec.Attachment)
		}
	}
	return out, nil
}

// Check verifies that VM vmID's attachment is still in place: CNI CHECK
// for a CNI network, the tap's existence for a static NIC.
func (m *Manager) Check(ctx context.Context, vmID string) error {
	if err := checkID(vmID); err != nil {
		return err
	}
	rec, err := m.rec.load(vmID)
	if errors.Is(err, os.ErrNotExist) || (err == nil && rec.Attachment == nil) {
		return fmt.Errorf("check %s: %w", vmID, ErrNotAttached)
	}
	if err != nil {
		return err
	}
	if rec.Kind == KindStatic {
		l, err := netlink.LinkByName(rec.Tap)
		if err != nil {
			return fmt.Errorf("check %s: tap %s: %w", vmID, rec.Tap, err)
		}
		if _, ok := l.(*netlink.Tuntap); !ok {
			return fmt.Errorf("check %s: %s is a %s, not a tap", vmID, rec.Tap, l.Type())
		}
		return nil
	}
	list, rt, err := m.delConf(rec)
	if err != nil {
		return fmt.Errorf("check %s: %w", vmID, err)
	}
	if err := m.cni.CheckNetworkList(ctx, list, rt); err != nil {
		return fmt.Errorf("check %s: CNI CHECK %s: %w", vmID, list.Name, err)
	}
	return nil
}

// Detach undoes VM vmID's attachment: CNI DEL (releasing its address),
// its namespace, its port registration, a tap fireactions created, and the
// record. It works from the record alone, so a restarted process can
// detach what an earlier one attached. Detaching an unknown VM is a no-op.
// When a step fails the record is kept so Cleanup can retry.
func (m *Manager) Detach(ctx context.Context, vmID string) error {
	if err := checkID(vmID); err != nil {
		return fmt.Errorf("detach: %w", err)
	}
	unlock, err := m.lock(ctx, vmID)
	if err != nil {
		return fmt.Errorf("detach %s: %w", vmID, err)
	}
	defer unlock()
	rec, err := m.rec.load(vmID)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("detach %s: %w", vmID, err)
	}
	if err := m.undo(ctx, rec); err != nil {
		return fmt.Errorf("detach %s: %w", vmID, err)
	}
	m.log.Info("detached", "vm", vmID)
	return nil
}

// delConf returns the configuration list and runtime arguments to tear an
// attachment down with: libcni's cached copy when there is one (what ADD
// really ran), else the record's.
func (m *Manager) delConf(rec *record) (*libcni.NetworkConfigList, *libcni.RuntimeConf, error) {
	rt := m.runtimeConf(rec)
	cached, crt, err := m.cni.GetNetworkListCachedConfig(&libcni.NetworkConfigList{Name: rec.Network}, rt)
	if err == nil && cached != nil {
		list, err := libcni.ConfListFromBytes(cached)
		if err == nil {
			return list, crt, nil
		}
		m.log.Warn("unreadable cached CNI config; using the record's", "vm", rec.VMID, "err", err)
	}
	if len(rec.Conflist) == 0 {
		return nil, nil, fmt.Errorf("no CNI configuration recorded for network %s", rec.Network)
	}
	list, err := libcni.ConfListFromBytes(rec.Conflist)
	if err != nil {
		return nil, nil, fmt.Errorf("recorded CNI configuration: %w", err)
	}
	return list, rt, nil
}

// undo removes everything rec describes, in reverse order of creation.
func (m *Manager) undo(ctx context.Context, rec *record) error {
	var errs []error
	revoke := func() {
		if rec.Port != nil && m.opts.PortFilter != nil {
			if err := m.opts.PortFilter.RevokePort(ctx, *rec.Port); err != nil {
				errs = append(errs, fmt.Errorf("revoke port: %w", err))
			}
		}
	}
	// Before DEL: frames from the port are dropped from now on.
	revoke()
	switch rec.Kind {
	case KindCNI:
		list, rt, err := m.delConf(rec)
		if err == nil {
			err = m.cni.DelNetworkList(ctx, list, rt)
		}
		if err != nil {
			// Keep the namespace: DEL needs it to clean inside, and the
			// record to retry.
			errs = append(errs, fmt.Errorf("CNI DEL %s: %w", rec.Network, err))
			return errors.Join(errs...)
		}
		if err := removeNetNS(rec.NetNS); err != nil {
			errs = append(errs, err)
		}
		// After DEL: the port is gone, the filter forgets it.
		revoke()
	case KindStatic:
		if rec.TapCreated {
			if err := deleteLink(rec.Tap); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	return m.rec.remove(rec.VMID)
}

// Cleanup detaches every VM on record, or in libcni's cache, that is not
// in live: what a crashed process left behind. It returns the ids it
// cleaned up.
func (m *Manager) Cleanup(ctx context.Context, live []string) ([]string, error) {
	ids, err := m.rec.ids()
	if err != nil {
		return nil, err
	}
	var removed []string
	var errs []error
	for _, id := range ids {
		if slices.Contains(live, id) {
			continue
		}
		if err := m.Detach(ctx, id); err != nil {
			errs = append(errs, err)
			continue
		}
		removed = append(removed, id)
	}
	// Attachments libcni cached without a record of ours: only possible if
	// the record was lost; DEL them with the cached configuration.
	cached, err := m.cni.GetCachedAttachments("")
	if err != nil {
		errs = append(errs, fmt.Errorf("list CNI cache: %w", err))
	}
	for _, a := range cached {
		if slices.Contains(live, a.ContainerID) || slices.Contains(ids, a.ContainerID) {
			continue
		}
		list, err := libcni.ConfListFromBytes(a.Config)
		if err == nil {
			err = m.cni.DelNetworkList(ctx, list, &libcni.RuntimeConf{
				ContainerID: a.ContainerID, NetNS: a.NetNS, IfName: a.IfName, Args: a.CniArgs,
			})
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("cleanup %s: CNI DEL %s: %w", a.ContainerID, a.Network, err))
			continue
		}
		if filepath.Dir(a.NetNS) == m.opts.NetNSDir && strings.HasPrefix(filepath.Base(a.NetNS), NetNSPrefix) {
			if err := removeNetNS(a.NetNS); err != nil {
				errs = append(errs, err)
			}
		}
		removed = append(removed, a.ContainerID)
	}
	if len(removed) > 0 {
		m.log.Info("cleaned up network leftovers", "vms", removed)
	}
	return removed, errors.Join(errs...)
}
