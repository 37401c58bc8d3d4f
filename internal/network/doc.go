// Package network owns a microVM's host-side network attachment: a CNI
// network driven through libcni in a network namespace of its own (one per
// VM), or a static NIC on a host tap device. It derives deterministic MACs
// from VM ids, renders the default CNI configuration list, and keeps a
// per-VM record on disk next to libcni's result cache, so that a restarted
// process can detach what an earlier one attached (CNI DEL with the cached
// configuration and result) and remove leftovers after a crash.
//
// The VMM reaches the VM's tap through the Attachment: QEMU gets a file
// descriptor from OpenTap (opened inside the VM's namespace, passed as
// -netdev tap,fd=N), Firecracker is started inside NetNSPath and opens
// TapName itself.
package network
