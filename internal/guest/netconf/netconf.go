//go:build linux

// Package netconf configures a guest's network interfaces from its
// guest.Config over rtnetlink, the way `ip link/addr/route` would, so the
// init needs no tools from the image (plain images have no `ip`) and the
// guest kernel's ignored `ip=` boot argument does not matter. Standard
// library and golang.org/x/sys only: it is linked into the static init.
package netconf

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/fireactions/fireactions/internal/guest"
)

// Configure brings up the loopback interface, then for each interface,
// found by MAC address (waiting for its driver until ctx ends): MTU, link
// up, address, default route through Gateway, and a link route to the
// metadata service when MMDS is set.
func Configure(ctx context.Context, ifaces []guest.Interface) error {
	c, err := dial()
	if err != nil {
		return err
	}
	defer c.close()
	lo, err := net.InterfaceByName("lo")
	if err != nil {
		return fmt.Errorf("network: loopback: %w", err)
	}
	if err := c.setLink(lo.Index, 0); err != nil {
		return fmt.Errorf("network: bring up lo: %w", err)
	}
	if len(ifaces) == 0 {
		return nil
	}
	byMAC, err := waitForLinks(ctx, ifaces)
	if err != nil {
		return err
	}
	for _, nic := range ifaces {
		link := byMAC[normMAC(nic.MAC)]
		if err := c.configure(link, nic); err != nil {
			return fmt.Errorf("network: %s (%s): %w", link.Name, nic.MAC, err)
		}
	}
	return nil
}

func normMAC(s string) string {
	hw, err := net.ParseMAC(s)
	if err != nil {
		return strings.ToLower(s)
	}
	return hw.String()
}

// waitForLinks polls until every configured MAC belongs to an interface:
// virtio_net probes devices as its module loads, but not necessarily
// before the load call returns.
func waitForLinks(ctx context.Context, ifaces []guest.Interface) (map[string]net.Interface, error) {
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		links, err := net.Interfaces()
		if err != nil {
			return nil, fmt.Errorf("network: list interfaces: %w", err)
		}
		byMAC := map[string]net.Interface{}
		for _, l := range links {
			if len(l.HardwareAddr) > 0 {
				byMAC[l.HardwareAddr.String()] = l
			}
		}
		var missing []string
		for _, nic := range ifaces {
			if _, ok := byMAC[normMAC(nic.MAC)]; !ok {
				missing = append(missing, nic.MAC)
			}
		}
		if len(missing) == 0 {
			return byMAC, nil
		}
		select {
		case <-ctx.Done():
			var have []string
			for _, l := range links {
				have = append(have, l.Name+"="+l.HardwareAddr.String())
			}
			return nil, fmt.Errorf("network: no interface with MAC %s appeared (have %s): is the NIC attached and its driver (virtio_net) loaded?",
				strings.Join(missing, ", "), strings.Join(have, ", "))
		case <-tick.C:
		}
	}
}

func (c *conn) configure(link net.Interface, nic guest.Interface) error {
	if err := c.setLink(link.Index, nic.MTU); err != nil {
		return fmt.Errorf("link up: %w", err)
	}
	if nic.Address != "" {
		prefix, err := netip.ParsePrefix(nic.Address)
		if err != nil {
			return fmt.Errorf("address %q: %w", nic.Address, err)
		}
		if err := c.addAddr(link.Index, prefix); err != nil {
			return fmt.Errorf("add address %s: %w", prefix, err)
		}
	}
	if nic.Gateway != "" {
		gw, err := netip.ParseAddr(nic.Gateway)
		if err != nil {
			return fmt.Errorf("gateway %q: %w", nic.Gateway, err)
		}
		def := netip.PrefixFrom(netip.IPv4Unspecified(), 0)
		if gw.Is6() {
			def = netip.PrefixFrom(netip.IPv6Unspecified(), 0)
		}
		if err := c.addRoute(link.Index, def, gw, unix.RT_SCOPE_UNIVERSE); err != nil {
			return fmt.Errorf("default route via %s: %w", gw, err)
		}
	}
	if nic.MMDS {
		dst := netip.PrefixFrom(netip.MustParseAddr(guest.MMDSAddress), 32)
		if err := c.addRoute(link.Index, dst, netip.Addr{}, unix.RT_SCOPE_LINK); err != nil {
			return fmt.Errorf("route to the metadata service %s: %w", dst, err)
		}
	}
	return nil
}

// conn is a request/acknowledge rtnetlink socket.
type conn struct {
	fd  int
	seq uint32
}

func dial() (*conn, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("network: netlink socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("network: netlink bind: %w", err)
	}
	return &conn{fd: fd}, nil
}

func (c *conn) close() { unix.Close(c.fd) }

var ne = binary.NativeEndian

// attr appends a netlink attribute, padded to four bytes.
func attr(b []byte, typ uint16, data []byte) []byte {
	l := unix.SizeofRtAttr + len(data)
	b = ne.AppendUint16(b, uint16(l))
	b = ne.AppendUint16(b, typ)
	b = append(b, data...)
	for l%4 != 0 {
		b = append(b, 0)
		l++
	}
	return b
}

func u32(v uint32) []byte { return ne.AppendUint32(nil, v) }

// request sends one message and waits for its acknowledgement.
func (c *conn) request(typ, flags uint16, body []byte) error {
	c.seq++
	msg := make([]byte, 0, unix.SizeofNlMsghdr+len(body))
	msg = ne.AppendUint32(msg, uint32(unix.SizeofNlMsghdr+len(body)))
	msg = ne.AppendUint16(msg, typ)
	msg = ne.AppendUint16(msg, flags|unix.NLM_F_REQUEST|unix.NLM_F_ACK)
	msg = ne.AppendUint32(msg, c.seq)
	msg = ne.AppendUint32(msg, 0)
	msg = append(msg, body...)
	if err := unix.Sendto(c.fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return fmt.Errorf("netlink send: %w", err)
	}
	buf := make([]byte, 8192)
	for {
		n, _, err := unix.Recvfrom(c.fd, buf, 0)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return fmt.Errorf("netlink receive: %w", err)
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:n])
		if err != nil {
			return fmt.Errorf("netlink parse: %w", err)
		}
		for _, m := range msgs {
			if m.Header.Seq != c.seq || m.Header.Type != unix.NLMSG_ERROR {
				continue
			}
			if len(m.Data) < 4 {
				return errors.New("netlink: short error message")
			}
			if code := int32(ne.Uint32(m.Data[:4])); code != 0 {
				return unix.Errno(-code)
			}
			return nil
		}
	}
}

// setLink brings a link up and sets its MTU when mtu > 0.
func (c *conn) setLink(index, mtu int) error {
	b := make([]byte, 0, 32)
	b = append(b, unix.AF_UNSPEC, 0)
	b = ne.AppendUint16(b, 0)             // type
	b = ne.AppendUint32(b, uint32(index)) // index
	b = ne.AppendUint32(b, unix.IFF_UP)   // flags
	b = ne.AppendUint32(b, unix.IFF_UP)   // change
	if mtu > 0 {
		b = attr(b, unix.IFLA_MTU, u32(uint32(mtu)))
	}
	return c.request(unix.RTM_NEWLINK, 0, b)
}

func family(a netip.Addr) uint8 {
	if a.Is4() {
		return unix.AF_INET
	}
	return unix.AF_INET6
}

func (c *conn) addAddr(index int, p netip.Prefix) error {
	a := p.Addr()
	b := make([]byte, 0, 48)
	b = append(b, family(a), uint8(p.Bits()), 0, unix.RT_SCOPE_UNIVERSE)
	b = ne.AppendUint32(b, uint32(index))
	b = attr(b, unix.IFA_LOCAL, a.AsSlice())
	b = attr(b, unix.IFA_ADDRESS, a.AsSlice())
	return c.request(unix.RTM_NEWADDR, unix.NLM_F_CREATE|unix.NLM_F_REPLACE, b)
}

func (c *conn) addRoute(index int, dst netip.Prefix, gw netip.Addr, scope uint8) error {
	b := make([]byte, 0, 64)
	b = append(b, family(dst.Addr()), uint8(dst.Bits()), 0, 0,
		unix.RT_TABLE_MAIN, unix.RTPROT_BOOT, scope, unix.RTN_UNICAST)
	b = ne.AppendUint32(b, 0) // flags
	if dst.Bits() > 0 {
		b = attr(b, unix.RTA_DST, dst.Addr().AsSlice())
	}
	if gw.IsValid() {
		b = attr(b, unix.RTA_GATEWAY, gw.AsSlice())
	}
	b = attr(b, unix.RTA_OIF, u32(uint32(index)))
	return c.request(unix.RTM_NEWROUTE, unix.NLM_F_CREATE|unix.NLM_F_REPLACE, b)
}

// WriteFiles writes the name-resolution files of the root filesystem at
// root: /etc/resolv.conf from the interfaces' nameservers (when any; a
// symlink there, such as systemd-resolved's, is replaced by a file),
// /etc/hostname, and a /etc/hosts line for the host name when the file
// lacks one.
func WriteFiles(root, hostname string, ifaces []guest.Interface) error {
	var ns []string
	seen := map[string]bool{}
	for _, nic := range ifaces {
		for _, s := range nic.Nameservers {
			if !seen[s] {
				seen[s] = true
				ns = append(ns, s)
			}
		}
	}
	etc := filepath.Join(root, "etc")
	if err := os.MkdirAll(etc, 0o755); err != nil {
		return fmt.Errorf("network files: %w", err)
	}
	if len(ns) > 0 {
		var b strings.Builder
		b.WriteString("# written by fireactions-init\n")
		for _, s := range ns {
			fmt.Fprintf(&b, "nameserver %s\n", s)
		}
		if err := replaceFile(filepath.Join(etc, "resolv.conf"), b.String()); err != nil {
			return fmt.Errorf("network files: %w", err)
		}
	}
	if hostname == "" {
		return nil
	}
	if err := replaceFile(filepath.Join(etc, "hostname"), hostname+"\n"); err != nil {
		return fmt.Errorf("network files: %w", err)
	}
	hostsPath := filepath.Join(etc, "hosts")
	hosts, err := os.ReadFile(hostsPath)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("network files: %w", err)
	}
	if len(hosts) == 0 {
		hosts = []byte("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")
	}
	for _, line := range strings.Split(string(hosts), "\n") {
		if f := strings.Fields(line); len(f) > 1 && !strings.HasPrefix(f[0], "#") && slices.Contains(f[1:], hostname) {
			return nil
		}
	}
	if !bytes.HasSuffix(hosts, []byte("\n")) {
		hosts = append(hosts, '\n')
	}
	hosts = fmt.Appendf(hosts, "127.0.1.1\t%s\n", hostname)
	if err := replaceFile(hostsPath, string(hosts)); err != nil {
		return fmt.Errorf("network files: %w", err)
	}
	return nil
}

// replaceFile writes name, replacing a symlink rather than writing through
// it (it may point into the image's read-only or non-existent /run).
func replaceFile(name, content string) error {
	if fi, err := os.Lstat(name); err == nil && fi.Mode()&fs.ModeSymlink != 0 {
		if err := os.Remove(name); err != nil {
			return err
		}
	}
	return os.WriteFile(name, []byte(content), 0o644)
}
