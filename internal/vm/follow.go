package vm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// follower reads a growing file like `tail -f`: at end of file it waits for
// the file to change (inotify) instead of returning io.EOF, until done is
// closed; then it drains what is left and reports io.EOF. The console log is
// written by the VMM itself, so a follower started by any process, at any
// time, sees the whole console stream from the beginning.
type follower struct {
	ctx  context.Context
	f    *os.File
	done <-chan struct{}

	ino    *os.File // inotify instance in Go's poller
	wake   chan struct{}
	closed chan struct{}
}

// follow opens path for following. A nil done means read to the current end
// of file only.
func follow(ctx context.Context, path string, done <-chan struct{}) (*follower, error) {
	fl := &follower{ctx: ctx, done: done, wake: make(chan struct{}, 1), closed: make(chan struct{})}
	if done != nil {
		// Watch before opening, so a write between open and the first
		// read cannot go unnoticed.
		fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
		if err != nil {
			return nil, fmt.Errorf("inotify: %w", err)
		}
		if _, err := unix.InotifyAddWatch(fd, path, unix.IN_MODIFY|unix.IN_CLOSE_WRITE); err != nil {
			unix.Close(fd)
			return nil, fmt.Errorf("watch %s: %w", path, err)
		}
		fl.ino = os.NewFile(uintptr(fd), "inotify")
		go fl.pump()
	}
	f, err := os.Open(path)
	if err != nil {
		fl.Close()
		return nil, err
	}
	fl.f = f
	return fl, nil
}

func (fl *follower) pump() {
	buf := make([]byte, 4096)
	for {
		if _, err := fl.ino.Read(buf); err != nil {
			return
		}
		select {
		case fl.wake <- struct{}{}:
		default:
		}
	}
}

func (fl *follower) Read(p []byte) (int, error) {
	for {
		n, err := fl.f.Read(p)
		if n > 0 || (err != nil && !errors.Is(err, io.EOF)) {
			return n, err
		}
		if fl.done == nil {
			return 0, io.EOF
		}
		select {
		case <-fl.done:
			// The writer is gone: whatever it wrote is in the file now.
			fl.done = nil
		case <-fl.wake:
		case <-fl.closed:
			return 0, io.EOF
		case <-fl.ctx.Done():
			return 0, fl.ctx.Err()
		}
	}
}

func (fl *follower) Close() error {
	select {
	case <-fl.closed:
		return nil
	default:
		close(fl.closed)
	}
	if fl.ino != nil {
		fl.ino.Close()
	}
	if fl.f != nil {
		return fl.f.Close()
	}
	return nil
}
