package network

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// createNetNS creates a persistent network namespace bound at dir/name, the
// way `ip netns add` does when dir is /run/netns: the namespace outlives
// this process until removeNetNS unmounts it.
func createNetNS(dir, name string) (string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("create netns dir: %w", err)
	}
	if err := makeSharedMount(dir); err != nil {
		return "", err
	}
	path := filepath.Join(dir, name)
	f, err := os.OpenFile(path, os.O_RDONLY|os.O_CREATE|os.O_EXCL, 0o444)
	if err != nil {
		return "", fmt.Errorf("create netns %s: %w", path, err)
	}
	f.Close()

	errc := make(chan error, 1)
	// A dedicated, locked thread enters the new namespace. It is never
	// unlocked: when the goroutine ends, the runtime discards the thread
	// instead of reusing it in the wrong namespace, even if switching back
	// failed.
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()))
		if err != nil {
			errc <- err
			return
		}
		defer orig.Close()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("unshare: %w", err)
			return
		}
		// A new namespace's loopback is down; QEMU's user-mode NIC (the
		// metadata service's guestfwd) builds its socket pairs on it.
		if lo, lerr := netlink.LinkByName("lo"); lerr != nil {
			err = fmt.Errorf("find lo: %w", lerr)
		} else if lerr := netlink.LinkSetUp(lo); lerr != nil {
			err = fmt.Errorf("set lo up: %w", lerr)
		}
		if err == nil {
			err = unix.Mount(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()), path, "none", unix.MS_BIND, "")
			if err != nil {
				err = fmt.Errorf("bind mount: %w", err)
			}
		}
		if serr := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); serr != nil && err == nil {
			err = fmt.Errorf("return to the original netns: %w", serr)
		}
		errc <- err
	}()
	if err := <-errc; err != nil {
		_ = unix.Unmount(path, unix.MNT_DETACH)
		_ = os.Remove(path)
		return "", fmt.Errorf("create netns %s: %w", path, err)
	}
	return path, nil
}

// makeSharedMount makes dir a shared mount point, bind-mounting it onto
// itself first if needed, so namespaces bound under it are visible to
// processes in other mount namespaces that see dir (what iproute2 does for
// /run/netns).
func makeSharedMount(dir string) error {
	err := unix.Mount("", dir, "none", unix.MS_SHARED|unix.MS_REC, "")
	if err == nil {
		return nil
	}
	if !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("make %s a shared mount: %w", dir, err)
	}
	if err := unix.Mount(dir, dir, "none", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("bind mount %s onto itself: %w", dir, err)
	}
	if err := unix.Mount("", dir, "none", unix.MS_SHARED|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("make %s a shared mount: %w", dir, err)
	}
	return nil
}

// removeNetNS unbinds and deletes a namespace made by createNetNS. The
// namespace itself (and every interface in it) goes away once no process
// holds it any more. A missing path is not an error.
func removeNetNS(path string) error {
	if err := unix.Unmount(path, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("unmount netns %s: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove netns %s: %w", path, err)
	}
	return nil
}
