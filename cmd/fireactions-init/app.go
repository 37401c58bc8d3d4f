//go:build linux

package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/fireactions/fireactions/internal/guest"
)

const defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// drainWait bounds how long the exit report waits for the output pipes to
// close after every process was killed; only a process stuck in an
// uninterruptible sleep keeps them open.
const drainWait = 5 * time.Second

// runApp runs the workload as a child, relays its output and the host's
// signals, reaps every orphan (PID 1's duty), and once the workload has
// exited reports its status and powers off.
func (in *initProcess) runApp() {
	p := in.cfg.Process
	user, err := guest.LookupUser(os.DirFS("/"), p.User)
	if err != nil {
		in.fail(fmt.Errorf("process.user: %w", err))
	}
	env := buildEnv(p.Env, user.Home, in.cfg.Hostname)
	argv0, err := lookPath(p.Args[0], env)
	if err != nil {
		in.fail(err)
	}
	wd := p.WorkingDir
	if wd == "" {
		wd = "/"
	}
	// As container runtimes do, a missing working directory is created.
	if err := os.MkdirAll(wd, 0o755); err != nil {
		in.fail(fmt.Errorf("process.working_dir: %w", err))
	}
	stopSig := unix.SIGTERM
	if p.StopSignal != "" {
		n, err := guest.ParseSignal(p.StopSignal)
		if err != nil {
			in.fail(fmt.Errorf("process.stop_signal: %w", err))
		}
		stopSig = unix.Signal(n)
	}

	null, err := os.Open("/dev/null")
	if err != nil {
		in.fail(fmt.Errorf("open /dev/null: %w", err))
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		in.fail(err)
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		in.fail(err)
	}
	// Only these three descriptors reach the workload: not the console,
	// so nothing it does can write to the frame channel except through
	// its pipes (a root workload can still open the console device, and
	// its writes there are noise without the key).
	pid, err := syscall.ForkExec(argv0, p.Args, &syscall.ProcAttr{
		Dir:   wd,
		Env:   env,
		Files: []uintptr{null.Fd(), outW.Fd(), errW.Fd()},
		Sys: &syscall.SysProcAttr{
			Setsid:     true,
			Credential: &syscall.Credential{Uid: user.UID, Gid: user.GID, Groups: user.Groups},
		},
	})
	null.Close()
	outW.Close()
	errW.Close()
	if err != nil {
		in.fail(fmt.Errorf("start %s: %w", strings.Join(p.Args, " "), err))
	}
	in.fw.WriteJSON(guest.FrameStarted, guest.Started{PID: pid, Mode: guest.ModeApp})

	var outputs sync.WaitGroup
	for _, s := range []struct {
		r *os.File
		t guest.FrameType
	}{{outR, guest.FrameStdout}, {errR, guest.FrameStderr}} {
		outputs.Add(1)
		go func() {
			defer outputs.Done()
			io.Copy(in.fw.Stream(s.t), s.r)
			s.r.Close()
		}()
	}
	host := make(chan guest.Frame, 8)
	go in.readHost(host)

	var (
		status   unix.WaitStatus
		exited   bool
		stopping bool
		killNow  <-chan time.Time
	)
	stop := func(grace time.Duration) {
		if stopping {
			return
		}
		stopping = true
		unix.Kill(pid, stopSig)
		killNow = time.After(grace)
	}
	for !exited {
		select {
		case sig := <-in.sigs:
			switch sig {
			case unix.SIGCHLD:
				exited = reap(pid, &status)
			case unix.SIGINT, unix.SIGTERM:
				stop(in.cfg.EffectiveStopGrace())
			}
		case f := <-host:
			switch f.Type {
			case guest.FrameSignal:
				var req guest.SignalRequest
				if f.DecodeJSON(&req) == nil && req.Signal > 0 && req.Signal <= 64 {
					unix.Kill(pid, unix.Signal(req.Signal))
				}
			case guest.FrameStop:
				var req guest.StopRequest
				f.DecodeJSON(&req)
				grace := req.Grace
				if grace <= 0 {
					grace = in.cfg.EffectiveStopGrace()
				}
				stop(grace)
			}
		case <-killNow:
			unix.Kill(-1, unix.SIGKILL)
		}
	}

	// The workload is gone; whatever it left running goes too, which also
	// closes the last writers of the output pipes.
	unix.Kill(-1, unix.SIGKILL)
	drained := make(chan struct{})
	go func() {
		outputs.Wait()
		close(drained)
	}()
	select {
	case <-drained:
	case <-time.After(drainWait):
		in.log("output still open %s after the workload exited; reporting without it", drainWait)
	}
	reapAll()

	exit := guest.Exit{Reason: "exited"}
	switch {
	case status.Signaled():
		exit.Signal = int(status.Signal())
		exit.Code = 128 + exit.Signal
		exit.Reason = "signaled"
	default:
		exit.Code = status.ExitStatus()
	}
	if stopping {
		exit.Reason = "stopped"
	}
	in.fw.WriteJSON(guest.FrameExit, exit)
	for i := len(in.extraMounts) - 1; i >= 0; i-- {
		unix.Unmount(in.extraMounts[i], 0)
	}
	powerOff()
}

// reap collects every exited child; it reports whether pid was among them.
func reap(pid int, status *unix.WaitStatus) bool {
	found := false
	for {
		var ws unix.WaitStatus
		got, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil || got <= 0 {
			return found
		}
		if got == pid {
			*status = ws
			found = true
		}
	}
}

// reapAll waits for the processes just killed, for at most drainWait.
func reapAll() {
	deadline := time.Now().Add(drainWait)
	for time.Now().Before(deadline) {
		var ws unix.WaitStatus
		got, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		if errors.Is(err, unix.ECHILD) {
			return
		}
		if got <= 0 {
			time.Sleep(5 * time.Millisecond)
		}
	}
}

// readHost delivers the host's frames; everything else typed on the
// console (noise) is dropped.
func (in *initProcess) readHost(out chan<- guest.Frame) {
	r := guest.NewReader(in.console, in.cfg.ConsoleKey)
	for {
		f, err := r.Next()
		if err != nil {
			return
		}
		if f.Type == guest.FrameSignal || f.Type == guest.FrameStop {
			out <- f
		}
	}
}

// buildEnv adds what a process expects and an image may not set.
func buildEnv(env []string, home, hostname string) []string {
	out := append([]string(nil), env...)
	has := func(k string) bool {
		for _, e := range env {
			if strings.HasPrefix(e, k+"=") {
				return true
			}
		}
		return false
	}
	if !has("PATH") {
		out = append(out, "PATH="+defaultPath)
	}
	if !has("HOME") {
		out = append(out, "HOME="+home)
	}
	if hostname != "" && !has("HOSTNAME") {
		out = append(out, "HOSTNAME="+hostname)
	}
	return out
}

// lookPath resolves a command name in the PATH of the workload's
// environment, not the init's.
func lookPath(name string, env []string) (string, error) {
	if strings.Contains(name, "/") {
		if err := isExecutable(name); err != nil {
			return "", fmt.Errorf("process.args[0]: %w", err)
		}
		return name, nil
	}
	pathList := defaultPath
	for _, e := range env {
		if v, ok := strings.CutPrefix(e, "PATH="); ok {
			pathList = v
		}
	}
	for _, dir := range filepath.SplitList(pathList) {
		if dir == "" {
			dir = "."
		}
		p := filepath.Join(dir, name)
		if isExecutable(p) == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("process.args[0]: %q: executable file not found in $PATH (%s)", name, pathList)
}

func isExecutable(p string) error {
	st, err := os.Stat(p)
	if err != nil {
		return err
	}
	if st.IsDir() {
		return fmt.Errorf("%s is a directory", p)
	}
	if st.Mode()&0o111 == 0 {
		return fmt.Errorf("%s is not executable", p)
	}
	return nil
}
