package network

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"

	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"
)

// Kind says how a VM is attached.
type Kind string

const (
	// KindCNI is a CNI network in a network namespace of the VM's own.
	KindCNI Kind = "cni"
	// KindStatic is a host tap device with an address given by the user.
	KindStatic Kind = "static"
)

// Attachment is what a VMM and the guest need to use a VM's network. Its
// fields are strings in the forms vm.Interface and guest.Interface take.
type Attachment struct {
	VMID string `json:"vm_id"`
	Kind Kind   `json:"kind"`
	// Network is the CNI network name (empty for a static NIC).
	Network string `json:"network,omitempty"`
	// NetNSPath is the VM's network namespace, where TapName lives. Empty
	// means the namespace of the caller (static NICs). The VMM must open
	// the tap there: see OpenTap.
	NetNSPath string `json:"netns_path,omitempty"`
	TapName   string `json:"tap_name"`
	// MAC is the guest interface's address. With CNI it equals the MAC of
	// the VM's veth, which the host's anti-spoofing rules expect.
	MAC string `json:"mac"`
	// GuestIP is the guest's own address with the prefix length, e.g.
	// 10.200.0.7/24 (never the network address).
	GuestIP       string   `json:"guest_ip,omitempty"`
	Gateway       string   `json:"gateway,omitempty"`
	Nameservers   []string `json:"nameservers,omitempty"`
	SearchDomains []string `json:"search_domains,omitempty"`
	MTU           int      `json:"mtu,omitempty"`
	// Bridge and HostInterface are the host side of a CNI attachment: the
	// bridge and the VM's veth port on it.
	Bridge        string `json:"bridge,omitempty"`
	HostInterface string `json:"host_interface,omitempty"`
}

// Addr returns the guest's address without the prefix length.
func (a *Attachment) Addr() (netip.Addr, error) {
	p, err := netip.ParsePrefix(a.GuestIP)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("attachment %s: guest ip %q: %w", a.VMID, a.GuestIP, err)
	}
	return p.Addr(), nil
}

// OpenTap opens the VM's tap device for a VMM that takes a file descriptor
// (QEMU: -netdev tap,fd=N with the file in cmd.ExtraFiles). The tun file
// is opened inside the VM's namespace, because the kernel resolves the tap
// name in the namespace the file was opened in; after that the descriptor
// works from any namespace, so the VMM itself can run in the host's. The
// file has IFF_VNET_HDR set (virtio-net offloads) and is close-on-exec;
// the caller closes it once the VMM holds its copy.
func (a *Attachment) OpenTap() (*os.File, error) {
	if a.NetNSPath == "" {
		return openTap(a.TapName)
	}
	var f *os.File
	err := ns.WithNetNSPath(a.NetNSPath, func(ns.NetNS) error {
		var err error
		f, err = openTap(a.TapName)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("open tap %s in %s: %w", a.TapName, a.NetNSPath, err)
	}
	return f, nil
}

func openTap(name string) (*os.File, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open /dev/net/tun: %w", err)
	}
	flags := uint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
	err = setIff(fd, name, flags)
	if errors.Is(err, unix.EINVAL) {
		// A tap created multi-queue (ip tuntap add ... multi_queue) only
		// accepts queue attachments; one queue is all a VMM needs.
		err = setIff(fd, name, flags|unix.IFF_MULTI_QUEUE)
	}
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("attach to tap %s: %w", name, err)
	}
	return os.NewFile(uintptr(fd), "/dev/net/tun:"+name), nil
}

func setIff(fd int, name string, flags uint16) error {
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return err
	}
	ifr.SetUint16(flags)
	return unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr)
}

// StaticNIC is a NIC whose addresses the user gives (the Nomad driver's
// Nic block): the guest gets IP, the host side is the tap Interface.
type StaticNIC struct {
	// IP is the guest's address in CIDR form, e.g. 192.168.50.10/24.
	IP      string `json:"ip"`
	Gateway string `json:"gateway,omitempty"`
	// Interface is the host tap device. It is created if it does not
	// exist, and then removed on Detach; an existing tap is left alone.
	Interface   string   `json:"interface"`
	Nameservers []string `json:"nameservers,omitempty"`
}

// Validate names every bad field with its fix.
func (s *StaticNIC) Validate() error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("nic.%s: %s", field, fmt.Sprintf(format, args...)))
	}
	p, err := netip.ParsePrefix(s.IP)
	switch {
	case err != nil:
		bad("ip", "%q is not an address in CIDR form such as 192.168.50.10/24", s.IP)
	case !p.Addr().Is4():
		bad("ip", "%q: only IPv4 is supported", s.IP)
	case p.Bits() < 31 && p.Addr() == p.Masked().Addr():
		bad("ip", "%s is the network address of %s; give the guest's own address, e.g. %s/%d", p.Addr(), p.Masked(), p.Masked().Addr().Next(), p.Bits())
	}
	if s.Gateway != "" {
		gw, err := netip.ParseAddr(s.Gateway)
		switch {
		case err != nil:
			bad("gateway", "%q is not an IP address", s.Gateway)
		case p.IsValid() && !p.Masked().Contains(gw):
			bad("gateway", "%s is outside %s", gw, p.Masked())
		case p.IsValid() && gw == p.Addr():
			bad("gateway", "%s is the guest's own address", gw)
		}
	}
	if s.Interface == "" || len(s.Interface) > 15 || !validIfName(s.Interface) {
		bad("interface", "%q must be a tap device name of 1-15 characters without '/', ':' or spaces", s.Interface)
	}
	for i, n := range s.Nameservers {
		if _, err := netip.ParseAddr(n); err != nil {
			bad(fmt.Sprintf("nameservers[%d]", i), "%q is not an IP address", n)
		}
	}
	return errors.Join(errs...)
}

func validIfName(s string) bool {
	if s == "." || s == ".." {
		return false
	}
	for _, r := range s {
		if r == '/' || r == ':' || r <= ' ' || r > '~' {
			return false
		}
	}
	return true
}

// Request says how to attach a VM.
type Request struct {
	// Network is the CNI network to join; empty means the default network
	// (Options.Network.Name). Ignored when Static is set.
	Network string
	// Static attaches the VM to a host tap with fixed addresses instead.
	Static *StaticNIC
	// MAC overrides the guest MAC; empty means DeriveMAC(vmID, 0).
	MAC string
}

func parseMAC(s string) (net.HardwareAddr, error) {
	hw, err := net.ParseMAC(s)
	if err != nil || !validMAC(hw) {
		return nil, fmt.Errorf("mac: %q is not a unicast MAC such as 06:fa:00:00:00:01", s)
	}
	return hw, nil
}
