package vm

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
)

// maxSunPath is the room for a path in struct sockaddr_un, NUL included.
const maxSunPath = 108

// shortPath calls f with a name for path that fits a sockaddr_un. Long
// paths (deep data directories) are reached through /proc/self/fd/<dirfd>/,
// which the kernel resolves like the directory itself.
func shortPath(path string, f func(string) error) error {
	if len(path) < maxSunPath {
		return f(path)
	}
	dir, err := os.Open(filepath.Dir(path))
	if err != nil {
		return err
	}
	defer dir.Close()
	alias := "/proc/self/fd/" + strconv.Itoa(int(dir.Fd())) + "/" + filepath.Base(path)
	if len(alias) >= maxSunPath {
		return fmt.Errorf("socket name %q is too long", filepath.Base(path))
	}
	return f(alias)
}

// ListenUnix creates a listening Unix socket at path (replacing a stale
// one) and returns it as a file to hand to a VMM, which then accepts on it.
// Creating the socket before the VMM starts means clients can connect at
// once: connections wait in the backlog until the VMM accepts.
func ListenUnix(path string) (*os.File, error) {
	_ = os.Remove(path)
	var l *net.UnixListener
	err := shortPath(path, func(p string) error {
		var err error
		l, err = net.ListenUnix("unix", &net.UnixAddr{Name: p, Net: "unix"})
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	// The file is what the VMM inherits; the socket file stays on disk
	// until the VM's directory is removed.
	l.SetUnlinkOnClose(false)
	f, err := l.File()
	l.Close()
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// DialUnix connects to the Unix socket at path.
func DialUnix(ctx context.Context, path string) (net.Conn, error) {
	var c net.Conn
	err := shortPath(path, func(p string) error {
		var d net.Dialer
		var err error
		c, err = d.DialContext(ctx, "unix", p)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("connect to %s: %w", path, err)
	}
	return c, nil
}
