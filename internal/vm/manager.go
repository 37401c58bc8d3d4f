// Package vm owns the life of microVMs independent of the VMM: the Spec a
// VM is booted from, the Backend interface VMMs implement (Firecracker,
// QEMU), and the Manager that starts, watches, stops, re-attaches to and
// cleans up VMs through per-VM state directories (<data-dir>/vms/<id>/).
//
// A VMM process is never tied to a request's context or to the fireactions
// process: it runs in its own session and is found again after a restart
// through its recorded pid, process start time and command line. The
// serial console log, written by the VMM itself, is the stream of record
// for the guest's output and its authenticated exit report, so a manager
// that attaches late still learns how the VM ended.
package vm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/fireactions/fireactions/internal/guest"
	"github.com/fireactions/fireactions/internal/initramfs"
)

// Errors callers can test for.
var (
	ErrNotFound = errors.New("no such VM")
	ErrExists   = errors.New("VM already exists")
	// ErrNotAttached: the VM runs but this manager does not own it (another
	// fireactions process does, or Recover/Adopt was not called).
	ErrNotAttached = errors.New("VM is not attached to this manager")
)

// Options configure a Manager.
type Options struct {
	// Root is the directory holding one directory per VM, normally
	// <data-dir>/vms.
	Root string
	// Backends are the backends VMs may use; Recover needs the backend a
	// VM was started with.
	Backends []Backend
	Logger   *slog.Logger
}

// Manager starts and supervises VMs under Root. Several fireactions
// processes may use the same Root: each VM is owned (supervised) by at most
// one of them at a time, through a lock the kernel releases when the owner
// dies.
type Manager struct {
	root     string
	backends map[string]Backend
	log      *slog.Logger

	ctx    context.Context // ends on Close: supervisors detach
	cancel context.CancelFunc

	mu  sync.Mutex
	vms map[string]*machine
}

// NewManager returns a manager over opts.Root, creating it if needed.
func NewManager(opts Options) (*Manager, error) {
	if opts.Root == "" {
		return nil, errors.New("vm manager: root directory required")
	}
	if err := os.MkdirAll(opts.Root, 0o700); err != nil {
		return nil, fmt.Errorf("vm manager: %w", err)
	}
	l := opts.Logger
	if l == nil {
		l = slog.Default()
	}
	m := &Manager{root: opts.Root, backends: map[string]Backend{}, log: l, vms: map[string]*machine{}}
	for _, b := range opts.Backends {
		m.backends[b.Name()] = b
	}
	m.ctx, m.cancel = context.WithCancel(context.Background())
	return m, nil
}

// Root returns the directory holding the VM directories.
func (m *Manager) Root() string { return m.root }

// machine is a VM owned by this manager.
type machine struct {
	id     string
	dir    string
	lock   *ownerLock
	handle Handle
	proc   *Process
	log    *slog.Logger

	mu       sync.Mutex
	st       *State
	frames   frameFacts
	stopping bool
	done     chan struct{} // closed once the exit is recorded (or on detach)

	exitFrame chan struct{} // closed when the guest reported its end
	frameOnce sync.Once
	fw        *guest.FrameWriter // host-to-guest frames, once needed
	consoleIn io.Writer
}

// frameFacts is what the console told us.
type frameFacts struct {
	exit         *guest.Exit
	guestError   string
	panicLine    string
	shutdownLine string
}

func (m *Manager) dir(id string) string { return filepath.Join(m.root, id) }

// Start boots spec with backend b and returns once the VMM runs; the guest
// may still be booting. The VM is supervised until it exits, is stopped, or
// the manager is closed.
func (m *Manager) Start(ctx context.Context, b Backend, spec Spec) (*State, error) {
	t0 := time.Now()
	spec = spec.WithDefaults()
	if err := spec.Validate(); err != nil {
		return nil, err
	}
	m.mu.Lock()
	m.backends[b.Name()] = b
	m.mu.Unlock()
	dir := m.dir(spec.ID)
	if err := os.Mkdir(dir, 0o700); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return nil, fmt.Errorf("vm %s: %w (remove it first)", spec.ID, ErrExists)
		}
		return nil, fmt.Errorf("vm %s: %w", spec.ID, err)
	}
	lock, err := tryLock(dir)
	if err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("vm %s: %w", spec.ID, err)
	}
	layout := newLayout(dir, &spec)
	st := &State{
		ID: spec.ID, Backend: b.Name(), Labels: spec.Labels, Status: StatusStarting,
		OwnerPid: os.Getpid(), Dir: dir, ConsoleLog: layout.ConsoleLog, VMMLog: layout.VMMLog,
		VCPUs: spec.VCPUs, MemoryMiB: spec.MemoryMiB, Drives: spec.Drives,
		StopTimeout: spec.StopTimeout, ExitGrace: spec.ExitGrace, CreatedAt: t0,
	}
	for _, d := range spec.Drives {
		if d.Role == RoleScratch {
			st.Owned = append(st.Owned, d.Path)
		}
	}
	for _, p := range []string{layout.ConsoleLog, layout.VMMLog} {
		if !within(dir, p) {
			st.Owned = append(st.Owned, p)
		}
	}
	log := m.log.With("vm", spec.ID, "backend", b.Name())
	mc := &machine{id: spec.ID, dir: dir, lock: lock, st: st, log: log,
		done: make(chan struct{}), exitFrame: make(chan struct{})}

	fail := func(err error) (*State, error) {
		m.removeFiles(st)
		lock.release()
		return nil, err
	}
	// Recorded before anything runs, so a crash from here on leaves a
	// state Recover can clean up.
	if err := writeState(dir, st); err != nil {
		return fail(err)
	}
	if err := m.prepareFiles(&spec, layout, st, b); err != nil {
		return fail(fmt.Errorf("vm %s: %w", spec.ID, err))
	}
	if err := writeState(dir, st); err != nil {
		return fail(err)
	}
	h, err := b.Start(ctx, &spec, layout)
	if err != nil {
		return fail(fmt.Errorf("vm %s: %w", spec.ID, err))
	}
	proc := h.Process()
	now := time.Now()
	mc.handle, mc.proc = h, proc
	st.Status = StatusRunning
	st.Pid, st.PidStartTime = proc.Pid, proc.StartTime
	st.BackendData = h.Persist()
	st.Details = h.Details()
	if pm, ok := h.(ProcessMarker); ok {
		st.ProcessMarker = pm.ProcessMarker()
	}
	st.StartedAt = now
	st.StartOverhead = Duration(now.Sub(t0))
	if spec.Timeout > 0 {
		st.Deadline = t0.Add(spec.Timeout)
	}
	if err := writeState(dir, st); err != nil {
		_ = proc.Signal(syscall.SIGKILL)
		<-proc.Done()
		h.Close()
		return fail(err)
	}
	log.Info("vm started", "pid", proc.Pid, "overhead", now.Sub(t0))
	m.mu.Lock()
	m.vms[spec.ID] = mc
	m.mu.Unlock()
	go m.supervise(mc)
	return mc.snapshot(), nil
}

// prepareFiles writes what the VMM reads: empty logs (the console log must
// exist before anyone follows it), the metadata document and the per-VM
// initrd with the guest config.
func (m *Manager) prepareFiles(spec *Spec, layout Layout, st *State, b Backend) error {
	for _, p := range []string{layout.ConsoleLog, layout.VMMLog} {
		f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
		if err != nil {
			return err
		}
		f.Close()
	}
	if layout.Metadata != "" {
		if err := writeFileAtomic(layout.Metadata, spec.Metadata); err != nil {
			return fmt.Errorf("write metadata: %w", err)
		}
	}
	devs, err := b.GuestDevices(spec)
	if err != nil {
		return err
	}
	for i, n := range devs.Interfaces {
		nic := NIC{MAC: n.MAC, Address: n.Address, Gateway: n.Gateway, MMDS: n.MMDS}
		if i < len(spec.Interfaces) {
			nic.TapName = spec.Interfaces[i].TapName
		}
		st.NICs = append(st.NICs, nic)
	}
	if spec.Guest == nil {
		return nil
	}
	cfg := *spec.Guest
	key, err := guest.NewConsoleKey()
	if err != nil {
		return err
	}
	cfg.Drives = devs.Drives
	cfg.Interfaces = devs.Interfaces
	cfg.ConsoleKey = key
	cfg.ClockUnixNano = time.Now().UnixNano()
	if err := initramfs.WriteInitrd(layout.Initrd, spec.Initrd, cfg); err != nil {
		return err
	}
	st.ConsoleKey = key
	return nil
}

func writeFileAtomic(path string, data []byte) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

func within(dir, p string) bool {
	rel, err := filepath.Rel(dir, p)
	return err == nil && rel != ".." && !filepath.IsAbs(rel) && (len(rel) < 3 || rel[:3] != "../")
}

func (mc *machine) snapshot() *State {
	mc.mu.Lock()
	defer mc.mu.Unlock()
	return cloneState(mc.st)
}

func cloneState(st *State) *State {
	c := *st
	c.Labels = cloneMap(st.Labels)
	c.Owned = slices.Clone(st.Owned)
	c.NICs = slices.Clone(st.NICs)
	c.Drives = slices.Clone(st.Drives)
	c.Details = cloneMap(st.Details)
	if st.Stop != nil {
		s := *st.Stop
		s.Steps = slices.Clone(st.Stop.Steps)
		c.Stop = &s
	}
	if st.Exit != nil {
		e := *st.Exit
		c.Exit = &e
	}
	return &c
}

func cloneMap(m map[string]string) map[string]string {
	if m == nil {
		return nil
	}
	c := make(map[string]string, len(m))
	for k, v := range m {
		c[k] = v
	}
	return c
}

// update changes the state under the lock and persists it.
func (mc *machine) update(f func(st *State)) {
	mc.mu.Lock()
	defer mc.mu.Unlock()
	f(mc.st)
	if err := writeState(mc.dir, mc.st); err != nil {
		mc.log.Error("persist vm state", "err", err)
	}
}

func (m *Manager) owned(id string) *machine {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.vms[id]
}

// Wait blocks until the VM has exited and returns how it ended. It works
// for VMs this manager owns and for VMs whose exit is already recorded.
func (m *Manager) Wait(ctx context.Context, id string) (ExitStatus, error) {
	mc := m.owned(id)
	if mc == nil {
		st, err := m.Inspect(id)
		if err != nil {
			return ExitStatus{}, err
		}
		if st.Exit != nil {
			return *st.Exit, nil
		}
		return ExitStatus{}, fmt.Errorf("vm %s: %w", id, ErrNotAttached)
	}
	select {
	case <-mc.done:
	case <-ctx.Done():
		return ExitStatus{}, ctx.Err()
	}
	st := mc.snapshot()
	if st.Exit == nil {
		return ExitStatus{}, fmt.Errorf("vm %s: %w (manager closed)", id, ErrNotAttached)
	}
	return *st.Exit, nil
}

// Inspect returns the VM's recorded state.
func (m *Manager) Inspect(id string) (*State, error) {
	if mc := m.owned(id); mc != nil {
		return mc.snapshot(), nil
	}
	if !idPattern.MatchString(id) {
		return nil, fmt.Errorf("vm %q: %w", id, ErrNotFound)
	}
	st, err := readState(m.dir(id))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("vm %s: %w", id, ErrNotFound)
	}
	if err != nil {
		return nil, err
	}
	st.OwnerPid = lockHolder(m.dir(id))
	return st, nil
}

// List returns the state of every VM under Root, sorted by creation.
func (m *Manager) List() ([]*State, error) {
	ents, err := os.ReadDir(m.root)
	if err != nil {
		return nil, fmt.Errorf("list vms: %w", err)
	}
	var out []*State
	for _, e := range ents {
		if !e.IsDir() {
			continue
		}
		st, err := m.Inspect(e.Name())
		if err != nil {
			continue
		}
		out = append(out, st)
	}
	slices.SortFunc(out, func(a, b *State) int { return a.CreatedAt.Compare(b.CreatedAt) })
	return out, nil
}

// Signal sends sig to the guest's workload through the guest init.
func (m *Manager) Signal(ctx context.Context, id string, sig int) error {
	mc := m.owned(id)
	if mc == nil {
		return fmt.Errorf("vm %s: %w", id, ErrNotAttached)
	}
	return mc.sendFrame(ctx, guest.FrameSignal, guest.SignalRequest{Signal: sig})
}

func (mc *machine) sendFrame(ctx context.Context, t guest.FrameType, v any) error {
	mc.mu.Lock()
	if mc.st.ConsoleKey == nil {
		mc.mu.Unlock()
		return fmt.Errorf("vm %s: the guest has no fireactions init to receive %s requests", mc.id, t)
	}
	if mc.fw == nil {
		w, err := mc.handle.ConsoleInput(ctx)
		if err != nil {
			mc.mu.Unlock()
			return fmt.Errorf("vm %s: console: %w", mc.id, err)
		}
		// The guest accepts only sequence numbers above the last it saw,
		// and a re-attached manager starts a new writer: advance it past
		// the frames earlier owners sent (counted in the state) without
		// sending them again.
		sw := &switchWriter{}
		fw := guest.NewWriter(sw, mc.st.ConsoleKey)
		for range mc.st.HostFrames {
			_ = fw.WriteFrame(guest.FrameLog, nil)
		}
		sw.w = w
		mc.fw, mc.consoleIn = fw, w
	}
	// Count the frame before sending it: after a crash in between, the
	// next owner skips a number, which the guest tolerates; reusing one it
	// would not.
	mc.st.HostFrames++
	err := writeState(mc.dir, mc.st)
	fw, w := mc.fw, mc.consoleIn
	mc.mu.Unlock()
	if err != nil {
		return err
	}
	// Written without the machine lock, and bounded: a VMM that stopped
	// reading its console must not wedge the supervisor.
	if d, ok := w.(interface{ SetWriteDeadline(time.Time) error }); ok {
		deadline, has := ctx.Deadline()
		if !has {
			deadline = time.Now().Add(consoleWriteTimeout)
		}
		_ = d.SetWriteDeadline(deadline)
	}
	return fw.WriteJSON(t, v)
}

// consoleWriteTimeout bounds a frame write when the caller set no deadline.
const consoleWriteTimeout = 10 * time.Second

// switchWriter discards writes until w is set.
type switchWriter struct{ w io.Writer }

func (s *switchWriter) Write(p []byte) (int, error) {
	if s.w == nil {
		return len(p), nil
	}
	return s.w.Write(p)
}

// UpdateMetadata replaces the VM's metadata document; the guest's next
// request sees it. The VM must have been started with metadata.
func (m *Manager) UpdateMetadata(ctx context.Context, id string, doc []byte) error {
	mc := m.owned(id)
	if mc == nil {
		return fmt.Errorf("vm %s: %w", id, ErrNotAttached)
	}
	if !json.Valid(doc) {
		return fmt.Errorf("vm %s: metadata: not a JSON document", id)
	}
	if err := mc.handle.UpdateMetadata(ctx, doc); err != nil {
		return fmt.Errorf("vm %s: update metadata: %w", id, err)
	}
	return nil
}

// Close detaches from every VM without stopping them: they keep running
// and a later manager can Recover them.
func (m *Manager) Close() error {
	m.cancel()
	m.mu.Lock()
	vms := m.vms
	m.vms = map[string]*machine{}
	m.mu.Unlock()
	for _, mc := range vms {
		<-mc.done
	}
	return nil
}

// removeFiles deletes everything of a VM that is no longer running: owned
// files outside its directory, then the directory.
func (m *Manager) removeFiles(st *State) {
	for _, p := range st.Owned {
		if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
			m.log.Warn("remove vm file", "vm", st.ID, "path", p, "err", err)
		}
	}
	if err := os.RemoveAll(st.Dir); err != nil {
		m.log.Warn("remove vm directory", "vm", st.ID, "err", err)
	}
}

// LogOptions select what Logs writes where.
type LogOptions struct {
	// Follow keeps reading until the VM exits.
	Follow bool
	// Stdout and Stderr receive the workload's output (app mode).
	Stdout, Stderr io.Writer
	// Console receives everything else on the console: kernel messages,
	// init progress, the output of a system-mode guest or of a guest
	// without the fireactions init. nil discards it when the guest speaks
	// the frame protocol, and sends it to Stdout otherwise.
	Console io.Writer
}

// Logs copies the VM's console log, decoded, to the writers in opts. It
// works for any VM under Root, owned or not, running or exited.
func (m *Manager) Logs(ctx context.Context, id string, opts LogOptions) error {
	st, err := m.Inspect(id)
	if err != nil {
		return err
	}
	var done <-chan struct{}
	if opts.Follow && st.Status != StatusExited {
		if mc := m.owned(id); mc != nil && mc.proc != nil {
			done = mc.proc.Done()
		} else if p, err := AttachProcess(st.Pid, st.PidStartTime, st.Marker()); err == nil {
			defer p.Release()
			done = p.Done()
		}
	}
	if opts.Follow && done == nil {
		// Not running (any more): read what there is.
		c := make(chan struct{})
		close(c)
		done = c
	}
	fl, err := follow(ctx, st.ConsoleLog, done)
	if err != nil {
		return fmt.Errorf("vm %s: console log: %w", id, err)
	}
	defer fl.Close()
	orDiscard := func(w io.Writer) io.Writer {
		if w == nil {
			return io.Discard
		}
		return w
	}
	if st.ConsoleKey == nil {
		w := opts.Console
		if w == nil {
			w = opts.Stdout
		}
		_, err := io.Copy(orDiscard(w), fl)
		return err
	}
	stdout, stderr, console := orDiscard(opts.Stdout), orDiscard(opts.Stderr), orDiscard(opts.Console)
	fr := guest.NewReader(fl, st.ConsoleKey)
	for {
		f, err := fr.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		switch f.Type {
		case guest.FrameStdout:
			_, err = stdout.Write(f.Payload)
		case guest.FrameStderr:
			_, err = stderr.Write(f.Payload)
		case guest.FrameNoise, guest.FrameLog:
			_, err = console.Write(append(f.Payload, '\n'))
		case guest.FrameError:
			_, err = fmt.Fprintf(console, "fireactions-init: error: %s\n", f.Payload)
		}
		if err != nil {
			return err
		}
	}
}
