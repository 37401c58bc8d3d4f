package vm

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// RecoverOptions limit Recover.
type RecoverOptions struct {
	// Match selects the VMs to recover; nil means all. VMs that do not
	// match are left alone (e.g. a daemon recovers its pools' VMs, not the
	// ones a user started with `fireactions vm run --detach`).
	Match func(*State) bool
}

// Skipped is a VM Recover left alone.
type Skipped struct {
	ID     string
	Reason string
}

// RecoverResult says what Recover did with each VM.
type RecoverResult struct {
	// Adopted VMs were running; this manager now owns them.
	Adopted []*State
	// Cleaned VMs were not running any more; everything of theirs was
	// removed. Their Exit says how they ended as far as it can be known.
	Cleaned []*State
	// Skipped VMs are owned by another live process or could not be
	// handled.
	Skipped []Skipped
}

// Recover takes over every VM under Root that no live process owns: a VM
// whose VMM still runs (same pid, same start time, its directory in the
// command line) is re-attached and supervised again; any other is cleaned
// up entirely (leftover processes, sockets, initrd, scratch disk, logs,
// directory). Call it once at start-up.
func (m *Manager) Recover(ctx context.Context, opts RecoverOptions) (RecoverResult, error) {
	var res RecoverResult
	ents, err := os.ReadDir(m.root)
	if err != nil {
		return res, fmt.Errorf("recover vms: %w", err)
	}
	for _, e := range ents {
		id := e.Name()
		if !e.IsDir() || !idPattern.MatchString(id) || m.owned(id) != nil {
			continue
		}
		st, adopted, err := m.take(ctx, id, opts.Match, true)
		switch {
		case errors.Is(err, errNoMatch):
		case err != nil:
			res.Skipped = append(res.Skipped, Skipped{ID: id, Reason: err.Error()})
		case adopted:
			res.Adopted = append(res.Adopted, st)
		default:
			res.Cleaned = append(res.Cleaned, st)
		}
	}
	return res, nil
}

// Adopt takes ownership of one VM not owned by a live process, so that it
// can be waited for, stopped or signalled from here. A VM that is no longer
// running gets its exit recorded (it is not removed; see Remove).
func (m *Manager) Adopt(ctx context.Context, id string) (*State, error) {
	if mc := m.owned(id); mc != nil {
		return mc.snapshot(), nil
	}
	if !idPattern.MatchString(id) {
		return nil, fmt.Errorf("vm %q: %w", id, ErrNotFound)
	}
	st, _, err := m.take(ctx, id, nil, false)
	return st, err
}

var errNoMatch = errors.New("not selected")

// take locks a VM directory and either adopts the running VM or records
// its end (and with clean, removes it).
func (m *Manager) take(ctx context.Context, id string, match func(*State) bool, clean bool) (*State, bool, error) {
	dir := m.dir(id)
	lock, err := tryLock(dir)
	if errors.Is(err, errLocked) {
		return nil, false, fmt.Errorf("vm %s is owned by another fireactions process (pid %d)", id, lockHolder(dir))
	}
	if errors.Is(err, fs.ErrNotExist) {
		return nil, false, fmt.Errorf("vm %s: %w", id, ErrNotFound)
	}
	if err != nil {
		return nil, false, err
	}
	st, err := readState(dir)
	if err != nil {
		if !clean {
			lock.release()
			return nil, false, fmt.Errorf("vm %s: %w", id, err)
		}
		// A VM directory without a readable state: its creator died
		// before the first write. Nothing in it can be running except a
		// VMM started in the instant before; the sweep finds that too.
		m.log.Warn("removing vm directory without state", "vm", id, "err", err)
		m.sweep(ctx, dir)
		os.RemoveAll(dir)
		lock.release()
		return &State{ID: id, Dir: dir}, false, nil
	}
	if match != nil && !match(st) {
		lock.release()
		return nil, false, errNoMatch
	}
	log := m.log.With("vm", id, "backend", st.Backend)
	b := m.backend(st.Backend)
	if st.Status != StatusExited && st.Pid > 0 {
		proc, err := AttachProcess(st.Pid, st.PidStartTime, st.Marker())
		if err == nil {
			if b == nil {
				proc.Release()
				lock.release()
				return nil, false, fmt.Errorf("vm %s runs with backend %q, which this manager does not have", id, st.Backend)
			}
			h, err := b.Attach(ctx, st, proc)
			if err == nil {
				return m.adopt(st, lock, h, proc), true, nil
			}
			log.Error("re-attach failed; killing the VMM", "err", err)
			_ = proc.Signal(syscall.SIGKILL)
			waitGone(ctx, proc.Done())
			proc.Release()
		} else if !errors.Is(err, ErrNotOurs) {
			lock.release()
			return nil, false, fmt.Errorf("vm %s: %w", id, err)
		}
	}
	// Not running: learn how it ended from what it left behind.
	if st.Exit == nil {
		var facts frameFacts
		if fl, err := follow(ctx, st.ConsoleLog, nil); err == nil {
			_ = scanConsole(fl, st.ConsoleKey, nil, &facts, nil)
			fl.Close()
		}
		es := classify(facts, st.Stop, ProcessExit{}, false, lastLines(TailFile(st.VMMLog, 1024), 3))
		if st.Pid == 0 {
			es = ExitStatus{Reason: ReasonVMMCrash, Message: "the VMM never started (its starter died)", At: time.Now()}
		}
		st.Exit = &es
		st.Status = StatusExited
		st.ExitedAt = es.At
		log.Info("vm ended while unattended", "reason", es.Reason, "message", es.Message)
	}
	if !clean {
		err := writeState(dir, st)
		lock.release()
		return st, false, err
	}
	m.cleanup(ctx, st)
	lock.release()
	log.Info("cleaned up vm")
	return st, false, nil
}

// adopt makes this manager the owner of a running VM it re-attached to.
func (m *Manager) adopt(st *State, lock *ownerLock, h Handle, proc *Process) *State {
	mc := &machine{id: st.ID, dir: st.Dir, lock: lock, handle: h, proc: proc,
		st: st, log: m.log.With("vm", st.ID, "backend", st.Backend), done: make(chan struct{}), exitFrame: make(chan struct{})}
	st.OwnerPid = os.Getpid()
	st.BackendData = h.Persist()
	if d := h.Details(); d != nil {
		st.Details = d
	}
	if st.Stop == nil {
		st.Status = StatusRunning
	}
	if err := writeState(st.Dir, st); err != nil {
		mc.log.Warn("persist vm state", "err", err)
	}
	m.mu.Lock()
	m.vms[st.ID] = mc
	m.mu.Unlock()
	mc.log.Info("re-attached to running vm", "pid", proc.Pid)
	go m.supervise(mc)
	if st.Stop != nil {
		// The previous owner died while stopping it: finish the job
		// within the original deadline.
		go m.escalate(context.Background(), mc, st.Stop.Reason, st.Stop.Deadline)
	}
	return mc.snapshot()
}

func (m *Manager) backend(name string) Backend {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.backends[name]
}

// Remove deletes a VM: it kills the VMM if it still runs (use Stop first
// for a graceful end), then removes its processes, sockets, disks, logs
// and directory.
func (m *Manager) Remove(ctx context.Context, id string) error {
	if mc := m.owned(id); mc != nil {
		m.escalate(ctx, mc, ReasonStopped, time.Now())
		// A stop already under way plans for its own deadline; removal
		// does not wait for it.
		_ = mc.proc.Signal(syscall.SIGKILL)
		select {
		case <-mc.done:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if !idPattern.MatchString(id) {
		return fmt.Errorf("vm %q: %w", id, ErrNotFound)
	}
	dir := m.dir(id)
	lock, err := tryLock(dir)
	if errors.Is(err, errLocked) {
		return fmt.Errorf("vm %s is owned by another fireactions process (pid %d): stop it there", id, lockHolder(dir))
	}
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("vm %s: %w", id, ErrNotFound)
	}
	if err != nil {
		return err
	}
	defer lock.release()
	st, err := readState(dir)
	if err != nil {
		m.sweep(ctx, dir)
		return os.RemoveAll(dir)
	}
	m.cleanup(ctx, st)
	if _, err := os.Stat(dir); err == nil {
		return fmt.Errorf("vm %s: directory %s is still there", id, dir)
	}
	return nil
}

// cleanup kills whatever of the VM still runs and deletes its files.
func (m *Manager) cleanup(ctx context.Context, st *State) {
	if st.Pid > 0 {
		if p, err := AttachProcess(st.Pid, st.PidStartTime, st.Marker()); err == nil {
			_ = p.Signal(syscall.SIGKILL)
			waitGone(ctx, p.Done())
			p.Release()
		}
	}
	m.sweep(ctx, st.Dir)
	if b := m.backend(st.Backend); b != nil {
		if err := b.Cleanup(st); err != nil {
			m.log.Warn("backend cleanup", "vm", st.ID, "err", err)
		}
	}
	m.removeFiles(st)
}

// sweep kills every process whose command line names the VM directory: a
// VMM whose pid was never recorded, helpers it spawned. Backends put the
// directory in their VMM's command line for this.
func (m *Manager) sweep(ctx context.Context, dir string) {
	for _, pid := range ProcessesMatching(dir) {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err != nil || !namesDir(string(b), dir) {
			continue
		}
		fd, err := unix.PidfdOpen(pid, 0)
		if err != nil {
			continue
		}
		m.log.Warn("killing leftover process of vm", "dir", dir, "pid", pid, "cmdline", strings.ReplaceAll(string(b), "\x00", " "))
		_ = unix.PidfdSendSignal(fd, syscall.SIGKILL, nil, 0)
		waitPidfd(ctx, fd)
		unix.Close(fd)
	}
}

// namesDir reports whether a NUL-separated command line mentions dir
// itself or a path inside it (and not merely a sibling with a longer name).
func namesDir(cmdline, dir string) bool {
	for s := cmdline; ; {
		i := strings.Index(s, dir)
		if i < 0 {
			return false
		}
		rest := s[i+len(dir):]
		if rest == "" || rest[0] == '/' || rest[0] == 0 || rest[0] == ',' || rest[0] == '\'' {
			return true
		}
		s = rest
	}
}

// killWait bounds the wait for a SIGKILLed process to disappear.
const killWait = 5 * time.Second

func waitGone(ctx context.Context, done <-chan struct{}) {
	t := time.NewTimer(killWait)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
	case <-ctx.Done():
	}
}

func waitPidfd(ctx context.Context, fd int) {
	deadline := time.Now().Add(killWait)
	for ctx.Err() == nil && time.Now().Before(deadline) {
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		if n, err := unix.Poll(fds, 100); err == nil && n > 0 {
			return
		} else if err != nil && !errors.Is(err, unix.EINTR) {
			return
		}
	}
}
