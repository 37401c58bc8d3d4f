package nomad

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// taskHandleVersion is the version of TaskState in the task handles this
// driver writes.
const taskHandleVersion = 1

// TaskState is what Nomad persists for a task (the handle's driver state)
// and hands back to RecoverTask after the plugin or the agent restarted.
// It identifies the VM the task runs in, so recovery re-attaches to that
// VM and never starts another.
type TaskState struct {
	// VMID names the VM (and its runtime instance).
	VMID string
	// Pid and PidStartTime identify the VMM process: after a restart the
	// VM must still be run by this very process (not a reused pid).
	Pid          int
	PidStartTime uint64
	// VMDir is the VM's state directory, Backend the VMM kind.
	VMDir   string
	Backend string
	// Sockets are the VMM's control sockets (QMP and console for QEMU,
	// the API socket for Firecracker), as the VM layer recorded them.
	Sockets map[string]string
	// NetNS is the VM's network namespace (CNI), IP the guest's address.
	NetNS string
	IP    string
	// LogPath is the task's Log file, empty without one.
	LogPath string
	// ShipperPid and ShipperStartTime identify the process copying the
	// VM's output into Nomad's log fifos (see ShipperMain); zero when the
	// task has no output to deliver.
	ShipperPid       int
	ShipperStartTime uint64
	StartedAt        time.Time
}

// streamOffsets counts the bytes of each output stream already delivered
// (stdout and stderr to Nomad's fifos, console messages to the Log file),
// so that a restarted log shipper continues the output instead of
// repeating it: the VM layer replays a VM's output from its beginning. The counts live
// in a small file under the data directory, rewritten in place after each
// delivery; a crash between a delivery and its count repeats at most that
// one chunk.
type streamOffsets struct {
	mu sync.Mutex
	f  *os.File
	n  [3]int64
}

// Stream indexes of streamOffsets.
const (
	streamStdout = iota
	streamStderr
	streamConsole
)

func offsetsPath(dataDir, vmID string) string {
	return filepath.Join(dataDir, "nomad", vmID+".offsets")
}

// shipperLogPath is where a VM's log shipper writes its diagnostics.
func shipperLogPath(dataDir, vmID string) string {
	return filepath.Join(dataDir, "nomad", vmID+".shipper.log")
}

// errOffsetsBusy: another process holds the offsets file.
var errOffsetsBusy = errors.New("another log shipper holds the offsets")

// openOffsets opens (creating) an offsets file and reads the counts it
// holds.
func openOffsets(p string) (*streamOffsets, error) {
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		return nil, fmt.Errorf("output offsets: %w", err)
	}
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("output offsets: %w", err)
	}
	// One writer per VM: the lock lives as long as the shipper.
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, errOffsetsBusy
		}
		return nil, fmt.Errorf("output offsets: lock %s: %w", p, err)
	}
	o := &streamOffsets{f: f}
	var buf [24]byte
	if _, err := f.ReadAt(buf[:], 0); err == nil {
		for i := range o.n {
			o.n[i] = int64(binary.LittleEndian.Uint64(buf[8*i:]))
		}
	} else if !errors.Is(err, io.EOF) {
		f.Close()
		return nil, fmt.Errorf("output offsets: %w", err)
	}
	return o, nil
}

// add records n more bytes of stream i.
func (o *streamOffsets) add(i int, n int) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.n[i] += int64(n)
	var buf [24]byte
	for j := range o.n {
		binary.LittleEndian.PutUint64(buf[8*j:], uint64(o.n[j]))
	}
	_, _ = o.f.WriteAt(buf[:], 0)
}

func (o *streamOffsets) get(i int) int64 {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.n[i]
}

func (o *streamOffsets) close() {
	o.f.Close()
}

// resumeWriter writes a stream to w, dropping the first skip bytes (those
// delivered before a restart) and counting what passes through.
type resumeWriter struct {
	w      io.Writer
	skip   int64
	offs   *streamOffsets
	stream int
}

func newResumeWriter(w io.Writer, offs *streamOffsets, stream int) *resumeWriter {
	return &resumeWriter{w: w, skip: offs.get(stream), offs: offs, stream: stream}
}

func (r *resumeWriter) Write(p []byte) (int, error) {
	total := len(p)
	if r.skip > 0 {
		k := int(min(r.skip, int64(len(p))))
		r.skip -= int64(k)
		p = p[k:]
	}
	if len(p) == 0 {
		return total, nil
	}
	n, err := r.w.Write(p)
	if n > 0 {
		r.offs.add(r.stream, n)
	}
	if err != nil {
		return total - len(p) + n, err
	}
	return total, nil
}
