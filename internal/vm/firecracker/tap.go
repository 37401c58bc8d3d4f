package firecracker

import (
	"fmt"
	"os"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The metadata interface's tap. Without the jailer Firecracker runs as root
// and creates it itself when it opens the name (TUNSETIFF on a name that
// does not exist creates a non-persistent tap): the tap lives exactly as
// long as the VMM, and nothing is left to clean up whatever way the VMM
// ends. Under the jailer the VMM cannot create devices, so the backend
// creates a persistent tap owned by the jail's uid and gid, and Cleanup
// deletes it. The tap's host side is never brought up and has no address:
// Firecracker answers MMDS traffic inside the VMM, and anything else the
// guest sends on that interface goes nowhere.

// inNetNS runs f with the calling thread in the network namespace at path
// (empty: the current one).
func inNetNS(path string, f func() error) error {
	if path == "" {
		return f()
	}
	ns, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("network namespace: %w", err)
	}
	defer ns.Close()
	runtime.LockOSThread()
	orig, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("network namespace: %w", err)
	}
	defer orig.Close()
	if err := unix.Setns(int(ns.Fd()), unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("enter network namespace %s: %w", path, err)
	}
	ferr := f()
	if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
		// Leave the thread locked: the runtime discards it when this
		// goroutine ends, so nothing else runs in the wrong namespace.
		return ferr
	}
	runtime.UnlockOSThread()
	return ferr
}

// ifreq is struct ifreq with the flags member of its union.
type ifreq struct {
	name  [unix.IFNAMSIZ]byte
	flags uint16
	_     [22]byte
}

// openTap opens /dev/net/tun and attaches it to the tap called name with
// the flags Firecracker uses, creating the tap if needed.
func openTap(name string) (*os.File, error) {
	f, err := os.OpenFile("/dev/net/tun", os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	var req ifreq
	copy(req.name[:], name)
	req.flags = unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.TUNSETIFF, uintptr(unsafe.Pointer(&req))); errno != 0 {
		f.Close()
		return nil, fmt.Errorf("TUNSETIFF %s: %w", name, errno)
	}
	return f, nil
}

func tapIoctl(f *os.File, req, arg uintptr) error {
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), req, arg); errno != 0 {
		return errno
	}
	return nil
}

// createPersistentTap creates tap name in netns, owned by uid and gid.
func createPersistentTap(netns, name string, uid, gid int) error {
	return inNetNS(netns, func() error {
		f, err := openTap(name)
		if err != nil {
			return fmt.Errorf("create tap %s: %w", name, err)
		}
		defer f.Close()
		for _, op := range []struct {
			req, arg uintptr
		}{{unix.TUNSETOWNER, uintptr(uid)}, {unix.TUNSETGROUP, uintptr(gid)}, {unix.TUNSETPERSIST, 1}} {
			if err := tapIoctl(f, op.req, op.arg); err != nil {
				return fmt.Errorf("create tap %s: %w", name, err)
			}
		}
		return nil
	})
}

// deletePersistentTap removes a tap made by createPersistentTap: attached
// and made non-persistent, it disappears when closed. A tap that is gone
// already is briefly created by the attach and disappears the same way.
func deletePersistentTap(netns, name string) error {
	return inNetNS(netns, func() error {
		f, err := openTap(name)
		if err != nil {
			return fmt.Errorf("delete tap %s: %w", name, err)
		}
		defer f.Close()
		if err := tapIoctl(f, unix.TUNSETPERSIST, 0); err != nil {
			return fmt.Errorf("delete tap %s: %w", name, err)
		}
		return nil
	})
}
