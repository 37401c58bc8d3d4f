package network

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/vishvananda/netlink"
)

// attachStatic attaches a VM to a host tap with user-given addresses. The
// guest gets exactly the address given (host part included); the tap is
// created when missing, and only then removed again on Detach.
func (m *Manager) attachStatic(ctx context.Context, vmID string, s *StaticNIC, hw net.HardwareAddr) (att *Attachment, err error) {
	if err := s.Validate(); err != nil {
		return nil, fmt.Errorf("attach %s: %w", vmID, err)
	}
	prefix := netip.MustParsePrefix(s.IP)
	rec := &record{VMID: vmID, Kind: KindStatic, Tap: s.Interface, Created: time.Now().UTC()}

	link, err := netlink.LinkByName(s.Interface)
	var notFound netlink.LinkNotFoundError
	switch {
	case errors.As(err, &notFound):
		// Record the ownership before creating, so a crash between the
		// two leaves a tap that Cleanup knows to remove.
		rec.TapCreated = true
	case err != nil:
		return nil, fmt.Errorf("attach %s: look up tap %s: %w", vmID, s.Interface, err)
	default:
		tt, ok := link.(*netlink.Tuntap)
		if !ok || tt.Mode != netlink.TUNTAP_MODE_TAP {
			return nil, fmt.Errorf("attach %s: nic.interface: %s exists and is a %s device, not a tap; name a tap or a free name", vmID, s.Interface, link.Type())
		}
	}
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
	if rec.TapCreated {
		if link, err = createTap(s.Interface); err != nil {
			return nil, fmt.Errorf("attach %s: %w", vmID, err)
		}
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return nil, fmt.Errorf("attach %s: set %s up: %w", vmID, s.Interface, err)
	}
	att = &Attachment{
		VMID:          vmID,
		Kind:          KindStatic,
		TapName:       s.Interface,
		MAC:           hw.String(),
		GuestIP:       prefix.String(),
		Gateway:       s.Gateway,
		Nameservers:   append([]string(nil), s.Nameservers...),
		MTU:           link.Attrs().MTU,
		HostInterface: s.Interface,
	}
	rec.Attachment = att
	if err := m.rec.save(rec); err != nil {
		return nil, fmt.Errorf("attach %s: %w", vmID, err)
	}
	m.log.Info("attached", "vm", vmID, "tap", s.Interface, "created", rec.TapCreated, "ip", att.GuestIP)
	return att, nil
}

// createTap makes a persistent single-queue tap with virtio-net headers,
// the shape both QEMU and Firecracker accept.
func createTap(name string) (netlink.Link, error) {
	attrs := netlink.NewLinkAttrs()
	attrs.Name = name
	tap := &netlink.Tuntap{
		LinkAttrs: attrs,
		Mode:      netlink.TUNTAP_MODE_TAP,
		Queues:    1,
		Flags:     netlink.TUNTAP_ONE_QUEUE | netlink.TUNTAP_VNET_HDR,
	}
	if err := netlink.LinkAdd(tap); err != nil {
		return nil, fmt.Errorf("create tap %s: %w", name, err)
	}
	for _, f := range tap.Fds {
		f.Close()
	}
	l, err := netlink.LinkByName(name)
	if err != nil {
		return nil, fmt.Errorf("create tap %s: %w", name, err)
	}
	return l, nil
}

// deleteLink removes a link; a missing one is not an error.
func deleteLink(name string) error {
	l, err := netlink.LinkByName(name)
	var notFound netlink.LinkNotFoundError
	if errors.As(err, &notFound) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("look up %s: %w", name, err)
	}
	if err := netlink.LinkDel(l); err != nil {
		return fmt.Errorf("delete %s: %w", name, err)
	}
	return nil
}
