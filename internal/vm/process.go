package vm

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// ErrNotOurs means a pid recorded in a state file now belongs to another
// process (or to none): the VMM is gone.
var ErrNotOurs = errors.New("process is gone or the pid was reused")

// ProcessExit is how a VMM process ended. It is only known to the process's
// parent; a re-attached manager sees the process vanish without a status.
type ProcessExit struct {
	Known  bool `json:"known"`
	Code   int  `json:"code"`
	Signal int  `json:"signal,omitempty"`
}

func (e ProcessExit) String() string {
	switch {
	case !e.Known:
		return "exit status unknown (not our child)"
	case e.Signal != 0:
		return "killed by signal " + unix.SignalName(syscall.Signal(e.Signal))
	}
	return "exit code " + strconv.Itoa(e.Code)
}

// Process is a VMM process: either our child (started by StartProcess) or a
// process found again through its pid and start time (AttachProcess). It is
// signalled through a pidfd so a recycled pid can never receive a signal meant
// for the VMM.
type Process struct {
	Pid int
	// StartTime is field 22 of /proc/<pid>/stat (clock ticks after boot):
	// with the pid it identifies the process across pid reuse.
	StartTime uint64

	pidfd int
	cmd   *exec.Cmd // nil when attached

	done     chan struct{}
	mu       sync.Mutex
	exit     ProcessExit
	closed   bool
	waitFile *os.File // attached: the pidfd in Go's poller
}

// StartProcess starts cmd in a new session, so that neither a terminal's
// Ctrl-C nor the death of this process reaches the VMM: its lifetime is
// owned explicitly through Signal. The caller keeps no context on it.
func StartProcess(cmd *exec.Cmd) (*Process, error) {
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Setsid = true
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &Process{Pid: cmd.Process.Pid, cmd: cmd, pidfd: -1, done: make(chan struct{})}
	// The child cannot have been reaped yet (only our Wait below reaps it),
	// so /proc/<pid> is the child even if it already exited.
	st, err := ProcStartTime(p.Pid)
	if err != nil {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		return nil, fmt.Errorf("read start time of pid %d: %w", p.Pid, err)
	}
	p.StartTime = st
	go func() {
		err := cmd.Wait()
		e := ProcessExit{Known: true}
		var ee *exec.ExitError
		switch {
		case err == nil:
		case errors.As(err, &ee):
			ws, _ := ee.Sys().(syscall.WaitStatus)
			if ws.Signaled() {
				e.Signal = int(ws.Signal())
			} else {
				e.Code = ws.ExitStatus()
			}
		default:
			e.Known = false
		}
		p.mu.Lock()
		p.exit = e
		p.mu.Unlock()
		close(p.done)
	}()
	return p, nil
}

// AttachProcess finds the process pid again. It fails with ErrNotOurs unless
// the process is alive, started at startTime and its command line contains
// marker (the VM id): three checks that defend against pid reuse.
func AttachProcess(pid int, startTime uint64, marker string) (*Process, error) {
	if pid <= 0 {
		return nil, fmt.Errorf("pid %d: %w", pid, ErrNotOurs)
	}
	// Open the pidfd first and verify afterwards: if the checks pass while
	// the pidfd's process is still alive, the pidfd refers to our process.
	fd, err := unix.PidfdOpen(pid, unix.PIDFD_NONBLOCK)
	if err != nil {
		if errors.Is(err, unix.ESRCH) {
			return nil, fmt.Errorf("pid %d: %w", pid, ErrNotOurs)
		}
		return nil, fmt.Errorf("pidfd_open %d: %w", pid, err)
	}
	fail := func(err error) (*Process, error) {
		unix.Close(fd)
		return nil, err
	}
	st, err := ProcStartTime(pid)
	if err != nil || st != startTime {
		return fail(fmt.Errorf("pid %d: %w", pid, ErrNotOurs))
	}
	if ok, err := cmdlineContains(pid, marker); err != nil || !ok {
		return fail(fmt.Errorf("pid %d: command line lacks %q: %w", pid, marker, ErrNotOurs))
	}
	if exited(fd) {
		return fail(fmt.Errorf("pid %d: %w", pid, ErrNotOurs))
	}
	// A non-blocking pidfd registered with Go's poller: waiting for its
	// readability (process exit) then parks a goroutine, not a thread.
	f := os.NewFile(uintptr(fd), "pidfd")
	p := &Process{Pid: pid, StartTime: startTime, pidfd: fd, waitFile: f, done: make(chan struct{})}
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("pidfd %d: %w", pid, err)
	}
	go func() {
		_ = rc.Read(func(fd uintptr) bool { return exited(int(fd)) })
		close(p.done)
	}()
	return p, nil
}

// exited reports whether the pidfd is readable, which happens when its
// process has terminated.
func exited(fd int) bool {
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	n, err := unix.Poll(fds, 0)
	return err == nil && n > 0
}

// Done is closed when the process has exited.
func (p *Process) Done() <-chan struct{} { return p.done }

// Exited reports whether the process has exited.
func (p *Process) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Exit returns how the process ended; Known is false while it runs and for
// attached processes.
func (p *Process) Exit() ProcessExit {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.exit
}

// Signal sends sig to the process. Signalling an exited process is not an
// error.
func (p *Process) Signal(sig syscall.Signal) error {
	if p.Exited() {
		return nil
	}
	var err error
	if p.cmd != nil {
		err = p.cmd.Process.Signal(sig)
		if errors.Is(err, os.ErrProcessDone) {
			return nil
		}
	} else {
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			return errors.New("process handle closed")
		}
		err = unix.PidfdSendSignal(p.pidfd, sig, nil, 0)
		p.mu.Unlock()
		if errors.Is(err, unix.ESRCH) {
			return nil
		}
	}
	if err != nil {
		return fmt.Errorf("signal %s to pid %d: %w", unix.SignalName(sig), p.Pid, err)
	}
	return nil
}

// Release stops watching an attached process; it keeps running. For a child
// nothing changes: the child is still reaped when it exits.
func (p *Process) Release() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed || p.waitFile == nil {
		return
	}
	p.closed = true
	p.waitFile.Close()
}

// ProcStartTime returns field 22 of /proc/<pid>/stat: the time the process
// started, in clock ticks after boot.
func ProcStartTime(pid int) (uint64, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, err
	}
	// The command name (field 2) is in parentheses and may hold spaces or
	// parentheses itself: fields are counted after the last ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: malformed", pid)
	}
	fields := strings.Fields(string(b[i+1:]))
	// fields[0] is field 3 (state), so field 22 is fields[19].
	if len(fields) < 20 {
		return 0, fmt.Errorf("/proc/%d/stat: only %d fields", pid, len(fields)+2)
	}
	return strconv.ParseUint(fields[19], 10, 64)
}

func cmdlineContains(pid int, marker string) (bool, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil {
		return false, err
	}
	return bytes.Contains(b, []byte(marker)), nil
}

// ProcessesMatching lists the pids whose command line contains marker. The
// cleanup paths use it to prove nothing of a VM is left running.
func ProcessesMatching(marker string) []int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	self := os.Getpid()
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		if ok, _ := cmdlineContains(pid, marker); ok {
			pids = append(pids, pid)
		}
	}
	return pids
}

// StartProcessInNetNS is StartProcess with the process placed in the
// network namespace at nsPath (empty: the caller's). The namespace is
// entered on a locked thread just for the fork, since a forked child
// inherits the namespaces of the thread that forked it.
func StartProcessInNetNS(cmd *exec.Cmd, nsPath string) (*Process, error) {
	if nsPath == "" {
		return StartProcess(cmd)
	}
	ns, err := os.Open(nsPath)
	if err != nil {
		return nil, fmt.Errorf("network namespace: %w", err)
	}
	defer ns.Close()
	orig, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		return nil, fmt.Errorf("network namespace: %w", err)
	}
	defer orig.Close()

	runtime.LockOSThread()
	if err := unix.Setns(int(ns.Fd()), unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread()
		return nil, fmt.Errorf("enter network namespace %s: %w", nsPath, err)
	}
	p, startErr := StartProcess(cmd)
	if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
		// Leave the thread locked: the runtime discards a locked thread
		// when its goroutine ends, so no other goroutine runs in the
		// wrong namespace.
		return p, startErr
	}
	runtime.UnlockOSThread()
	return p, startErr
}

// TailFile returns up to the last max bytes of path, trimmed, starting at a
// line boundary: the VMM's own error text for error messages.
func TailFile(path string, max int64) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return ""
	}
	off := fi.Size() - max
	if off < 0 {
		off = 0
	}
	b := make([]byte, fi.Size()-off)
	n, _ := f.ReadAt(b, off)
	b = b[:n]
	if off > 0 {
		if i := bytes.IndexByte(b, '\n'); i >= 0 {
			b = b[i+1:]
		}
	}
	return strings.TrimSpace(string(b))
}
