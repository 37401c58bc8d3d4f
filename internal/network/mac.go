package network

import (
	"crypto/sha256"
	"fmt"
	"net"
)

// DeriveMAC returns the MAC of a VM's index-th interface: locally
// administered, unicast, and a pure function of the VM id, so a VM that is
// re-created under the same id keeps its address (and the ARP caches of its
// peers stay valid). It hashes the id the same way as vm.DeriveMAC with
// purpose "nic<index>", so both layers agree on the address.
func DeriveMAC(vmID string, index int) net.HardwareAddr {
	h := sha256.Sum256([]byte(vmID + "\x00" + fmt.Sprintf("nic%d", index)))
	// 0x06: bit 1 set (locally administered), bit 0 clear (unicast).
	return net.HardwareAddr{0x06, 0xfa, h[0], h[1], h[2], h[3]}
}

// validMAC reports whether hw is a 6-byte unicast address.
func validMAC(hw net.HardwareAddr) bool {
	return len(hw) == 6 && hw[0]&1 == 0
}
