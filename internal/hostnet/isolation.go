package hostnet

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/fireactions/fireactions/internal/network"
)

// Isolation registers VM ports in the bridge isolation table Setup
// installed; it implements network.PortFilter. Once registered, a port
// only passes frames with its VM's MAC and IPv4 address, and none after it
// is revoked. (A port is unfiltered before its registration: the VM is not
// running yet then.)
type Isolation struct {
	// bridge is the bridge Setup manages: a port on it without the table
	// is an error (the host was not set up). Ports on other bridges (CNI
	// networks fireactions does not manage) are left alone.
	bridge string
	mu     sync.Mutex
}

var _ network.PortFilter = (*Isolation)(nil)

// NewIsolation returns the port filter for the bridge Setup manages.
func NewIsolation(bridge string) *Isolation { return &Isolation{bridge: bridge} }

// portSets returns the bridge table's vm_ports and ports sets, or nils
// when the table is absent and p is on a bridge Setup does not manage.
func (i *Isolation) portSets(c *nftables.Conn, p network.Port) (*nftables.Set, *nftables.Set, error) {
	t, err := c.ListTableOfFamily(TableName(p.Bridge), nftables.TableFamilyBridge)
	if err != nil || t == nil {
		if p.Bridge == i.bridge {
			return nil, nil, fmt.Errorf("isolation table bridge %s is missing: run `fireactions host setup`", TableName(p.Bridge))
		}
		return nil, nil, nil
	}
	vmPorts, err := c.GetSetByName(t, setVMPorts)
	if err != nil {
		return nil, nil, fmt.Errorf("isolation table %s: set %s: %w (re-run `fireactions host setup`)", t.Name, setVMPorts, err)
	}
	ports, err := c.GetSetByName(t, setPorts)
	if err != nil {
		return nil, nil, fmt.Errorf("isolation table %s: set %s: %w (re-run `fireactions host setup`)", t.Name, setPorts, err)
	}
	return vmPorts, ports, nil
}

func elements(p network.Port) (vmPort, port nftables.SetElement, err error) {
	mac, err := net.ParseMAC(p.MAC)
	if err != nil || len(mac) != 6 {
		return vmPort, port, fmt.Errorf("port %s: bad MAC %q", p.HostInterface, p.MAC)
	}
	ip, err := netip.ParseAddr(p.IP)
	if err != nil || !ip.Is4() {
		return vmPort, port, fmt.Errorf("port %s: bad IPv4 address %q", p.HostInterface, p.IP)
	}
	if p.HostInterface == "" || len(p.HostInterface) > 15 {
		return vmPort, port, fmt.Errorf("port: bad interface name %q", p.HostInterface)
	}
	return vmPortElement(p.HostInterface), portElement(p.HostInterface, mac, ip), nil
}

// AllowPort lets frames from p.HostInterface through when they carry p's
// MAC and IPv4 address.
func (i *Isolation) AllowPort(_ context.Context, p network.Port) error {
	vmPort, port, err := elements(p)
	if err != nil {
		return err
	}
	i.mu.Lock()
	defer i.mu.Unlock()
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	vmPorts, ports, err := i.portSets(c, p)
	if err != nil || vmPorts == nil {
		return err
	}
	// One transaction: the port is never filtered without its address.
	if err := c.SetAddElements(ports, []nftables.SetElement{port}); err != nil {
		return fmt.Errorf("allow port %s: %w", p.HostInterface, err)
	}
	if err := c.SetAddElements(vmPorts, []nftables.SetElement{vmPort}); err != nil {
		return fmt.Errorf("allow port %s: %w", p.HostInterface, err)
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("allow port %s: %w", p.HostInterface, err)
	}
	return nil
}

// RevokePort removes p's address registration, so frames from the port
// are dropped from then on; once the interface itself is gone (after CNI
// DEL) it also forgets the port's name. Call it before and after deleting
// the port. An unknown port is not an error.
func (i *Isolation) RevokePort(_ context.Context, p network.Port) error {
	vmPort, port, err := elements(p)
	if err != nil {
		return err
	}
	i.mu.Lock()
	defer i.mu.Unlock()
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	vmPorts, ports, err := i.portSets(c, p)
	if vmPorts == nil {
		// Without the table there is nothing to revoke (torn down).
		return nil
	}
	if err != nil {
		return err
	}
	del := []struct {
		set *nftables.Set
		e   nftables.SetElement
	}{{ports, port}}
	if _, err := netlink.LinkByName(p.HostInterface); err != nil {
		del = append(del, struct {
			set *nftables.Set
			e   nftables.SetElement
		}{vmPorts, vmPort})
	}
	// Deleting an absent element fails the whole batch, so each element
	// goes in a transaction of its own.
	for _, d := range del {
		if err := c.SetDeleteElements(d.set, []nftables.SetElement{d.e}); err != nil {
			return fmt.Errorf("revoke port %s: %w", p.HostInterface, err)
		}
		if err := c.Flush(); err != nil && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("revoke port %s: %w", p.HostInterface, err)
		}
	}
	return nil
}
