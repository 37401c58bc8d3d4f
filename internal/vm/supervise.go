package vm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"syscall"
	"time"

	"github.com/fireactions/fireactions/internal/guest"
)

// supervise watches an owned VM until its VMM exits (then records how it
// ended) or the manager closes (then detaches, leaving the VM running). It
// enforces the VM's lifetime deadline and stops a VMM that outlives its
// workload's reported exit by more than ExitGrace.
func (m *Manager) supervise(mc *machine) {
	ctx, cancel := context.WithCancel(m.ctx)
	defer cancel()
	consoleDone := make(chan struct{})
	go func() {
		defer close(consoleDone)
		if err := mc.readConsole(ctx); err != nil && !errors.Is(err, context.Canceled) {
			mc.log.Warn("read console log", "err", err)
		}
	}()

	mc.mu.Lock()
	deadline, grace, stopTimeout := mc.st.Deadline, mc.st.ExitGrace, mc.st.StopTimeout
	mc.mu.Unlock()
	var deadlineC, graceC <-chan time.Time
	if !deadline.IsZero() {
		t := time.NewTimer(time.Until(deadline))
		defer t.Stop()
		deadlineC = t.C
	}
	exitFrame := mc.exitFrame
	for {
		select {
		case <-mc.proc.Done():
			select {
			case <-consoleDone:
			case <-ctx.Done():
				m.detach(mc)
				return
			}
			m.finish(mc)
			return
		case <-exitFrame:
			exitFrame = nil
			t := time.NewTimer(grace)
			defer t.Stop()
			graceC = t.C
		case <-graceC:
			graceC = nil
			mc.log.Warn("the VMM outlived its workload's exit; stopping it", "grace", grace)
			go m.escalate(context.Background(), mc, ReasonWorkloadExit, time.Now().Add(stopTimeout))
		case <-deadlineC:
			deadlineC = nil
			mc.log.Warn("vm reached its lifetime deadline; stopping it", "deadline", deadline)
			go m.escalate(context.Background(), mc, ReasonTimeout, time.Now().Add(stopTimeout))
		case <-ctx.Done():
			m.detach(mc)
			return
		}
	}
}

// readConsole follows the console log from its start until the VMM has
// exited and its output is drained, collecting what the guest reported.
func (mc *machine) readConsole(ctx context.Context) error {
	mc.mu.Lock()
	path, key := mc.st.ConsoleLog, mc.st.ConsoleKey
	mc.mu.Unlock()
	fl, err := follow(ctx, path, mc.proc.Done())
	if err != nil {
		return err
	}
	defer fl.Close()
	return scanConsole(fl, key, func(f guest.Frame) {
		mc.mu.Lock()
		defer mc.mu.Unlock()
		switch f.Type {
		case guest.FrameStarted:
			if mc.st.GuestStartedAt.IsZero() {
				mc.st.GuestStartedAt = time.Now()
				if err := writeState(mc.dir, mc.st); err != nil {
					mc.log.Warn("persist vm state", "err", err)
				}
				mc.log.Info("workload started", "after", mc.st.GuestStartedAt.Sub(mc.st.StartedAt))
			}
		case guest.FrameExit, guest.FrameError:
			mc.frameOnce.Do(func() { close(mc.exitFrame) })
		}
	}, &mc.frames, &mc.mu)
}

// scanConsole decodes a console stream, records its facts in facts (under
// mu, if given) and calls onFrame for every frame.
func scanConsole(r io.Reader, key []byte, onFrame func(guest.Frame), facts *frameFacts, mu interface {
	Lock()
	Unlock()
}) error {
	fr := guest.NewReader(r, key)
	for {
		f, err := fr.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		if mu != nil {
			mu.Lock()
		}
		switch f.Type {
		case guest.FrameExit:
			var e guest.Exit
			if f.DecodeJSON(&e) == nil {
				facts.exit = &e
			}
		case guest.FrameError:
			facts.guestError = string(f.Payload)
		case guest.FrameNoise:
			// Kernel lines that tell a guest-side end from a VMM death when
			// the VMM's own exit status is unknown.
			if i := bytes.Index(f.Payload, []byte("Kernel panic - not syncing")); i >= 0 && facts.panicLine == "" {
				facts.panicLine = string(f.Payload[i:])
			}
			if i := bytes.Index(f.Payload, []byte("reboot: ")); i >= 0 {
				facts.shutdownLine = string(f.Payload[i:])
			}
		}
		if mu != nil {
			mu.Unlock()
		}
		if onFrame != nil {
			onFrame(f)
		}
	}
}

// classify decides how a VM ended from what is known about it.
func classify(facts frameFacts, stop *StopRecord, vmm ProcessExit, guestShutdown bool, vmmLog string) ExitStatus {
	es := ExitStatus{VMM: vmm, At: time.Now()}
	if facts.exit != nil {
		es.WorkloadExited = true
		es.Code, es.Signal = facts.exit.Code, facts.exit.Signal
		es.Message = facts.exit.Reason
	}
	vmmFailed := vmm.Known && (vmm.Signal != 0 || vmm.Code != 0)
	switch {
	case stop != nil && (stop.Reason == ReasonStopped || stop.Reason == ReasonTimeout):
		es.Reason = stop.Reason
	case facts.exit != nil:
		es.Reason = ReasonWorkloadExit
	case facts.guestError != "":
		es.Reason = ReasonGuestError
		es.Message = facts.guestError
	case vmmFailed:
		es.Reason = ReasonVMMCrash
		es.Message = "VMM " + vmm.String()
		if vmmLog != "" {
			es.Message += ": " + vmmLog
		}
	case guestShutdown || facts.shutdownLine != "" || facts.panicLine != "":
		es.Reason = ReasonGuestShutdown
		if facts.panicLine != "" {
			es.Message = facts.panicLine
		}
	default:
		es.Reason = ReasonVMMCrash
		es.Message = "the VMM exited without a guest shutdown (" + vmm.String() + ")"
		if vmmLog != "" {
			es.Message += ": " + vmmLog
		}
	}
	return es
}

// finish records the exit of an owned VM and releases it.
func (m *Manager) finish(mc *machine) {
	mc.mu.Lock()
	es := classify(mc.frames, mc.st.Stop, mc.proc.Exit(), mc.handle.GuestShutdown(), lastLines(TailFile(mc.st.VMMLog, 1024), 3))
	mc.st.Status = StatusExited
	mc.st.ExitedAt = es.At
	mc.st.Exit = &es
	if err := writeState(mc.dir, mc.st); err != nil {
		mc.log.Error("persist vm state", "err", err)
	}
	mc.mu.Unlock()
	mc.log.Info("vm exited", "reason", es.Reason, "code", es.Code, "signal", es.Signal, "message", es.Message)
	m.release(mc)
}

// detach lets go of an owned VM that keeps running.
func (m *Manager) detach(mc *machine) {
	mc.log.Info("detaching from vm; it keeps running")
	mc.proc.Release()
	m.release(mc)
}

func (m *Manager) release(mc *machine) {
	mc.handle.Close()
	m.mu.Lock()
	if m.vms[mc.id] == mc {
		delete(m.vms, mc.id)
	}
	m.mu.Unlock()
	mc.lock.release()
	close(mc.done)
}

func lastLines(s string, n int) string {
	lines := bytes.Split([]byte(s), []byte("\n"))
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return string(bytes.Join(lines, []byte("; ")))
}

// Stop stops the VM gracefully within timeout (zero: the spec's
// StopTimeout) and returns how it ended. The escalation, each step taken
// only while the VMM still runs and each bounded by the deadline:
//
//  1. a stop frame to the guest init (when the guest has one), which
//     signals the workload and powers off;
//  2. the ACPI power button (QEMU) or Ctrl-Alt-Del (Firecracker);
//  3. SIGTERM to the VMM;
//  4. SIGKILL to the VMM.
//
// If ctx ends first, the escalation jumps to SIGKILL.
func (m *Manager) Stop(ctx context.Context, id string, timeout time.Duration) (ExitStatus, error) {
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
	if timeout <= 0 {
		mc.mu.Lock()
		timeout = mc.st.StopTimeout
		mc.mu.Unlock()
	}
	m.escalate(ctx, mc, ReasonStopped, time.Now().Add(timeout))
	select {
	case <-mc.done:
	case <-ctx.Done():
		return ExitStatus{}, ctx.Err()
	}
	st := mc.snapshot()
	if st.Exit == nil {
		return ExitStatus{}, fmt.Errorf("vm %s: %w (manager closed while stopping)", id, ErrNotAttached)
	}
	return *st.Exit, nil
}

type stopStep struct {
	action string
	at     time.Time
}

// stopPlan spreads the escalation over [now, deadline]: SIGKILL keeps a
// tenth of the time (at least 50 ms, at most 2 s) to take effect, SIGTERM
// a fifth before it (100 ms to 5 s); the graceful steps share the rest.
// A step without room before the deadline is left out; SIGKILL never is.
// With the guest init, the stop frame's grace (stop signal to SIGKILL
// inside the guest) is half the graceful window, leaving the init time to
// report and power off before the power button is pressed.
func stopPlan(now, deadline time.Time, guestInit bool) (steps []stopStep, grace time.Duration) {
	total := deadline.Sub(now)
	killReserve := min(max(total/10, 50*time.Millisecond), 2*time.Second)
	termReserve := min(max(total/5, 100*time.Millisecond), 5*time.Second)
	killAt := deadline.Add(-killReserve)
	termAt := killAt.Add(-termReserve)
	if !killAt.After(now) {
		return []stopStep{{"sigkill", now}}, 0
	}
	if !termAt.After(now) {
		return []stopStep{{"sigterm", now}, {"sigkill", killAt}}, 0
	}
	window := termAt.Sub(now)
	if guestInit {
		steps = append(steps, stopStep{"guest-stop", now}, stopStep{"shutdown", now.Add(window * 3 / 4)})
		grace = window / 2
	} else {
		steps = append(steps, stopStep{"shutdown", now})
	}
	return append(steps, stopStep{"sigterm", termAt}, stopStep{"sigkill", killAt}), grace
}

// escalate runs the stop escalation unless one is already running; either
// way it returns once the VMM has exited or SIGKILL was sent and the
// deadline passed.
func (m *Manager) escalate(ctx context.Context, mc *machine, reason Reason, deadline time.Time) {
	now := time.Now()
	mc.mu.Lock()
	if mc.stopping || mc.proc.Exited() {
		mc.mu.Unlock()
		return
	}
	mc.stopping = true
	if mc.st.Stop == nil {
		mc.st.Stop = &StopRecord{Reason: reason, RequestedAt: now, Deadline: deadline}
	} else {
		// Resumed after re-attach: keep the original request.
		reason, deadline = mc.st.Stop.Reason, mc.st.Stop.Deadline
	}
	mc.st.Status = StatusStopping
	if err := writeState(mc.dir, mc.st); err != nil {
		mc.log.Warn("persist vm state", "err", err)
	}
	guestInit := mc.st.ConsoleKey != nil
	mc.mu.Unlock()

	steps, grace := stopPlan(now, deadline, guestInit)
	actions := map[string]func(ctx context.Context) error{
		"guest-stop": func(ctx context.Context) error {
			return mc.sendFrame(ctx, guest.FrameStop, guest.StopRequest{Grace: grace})
		},
		"shutdown": mc.handle.Shutdown,
		"sigterm":  func(context.Context) error { return mc.proc.Signal(syscall.SIGTERM) },
		"sigkill":  func(context.Context) error { return mc.proc.Signal(syscall.SIGKILL) },
	}
	mc.log.Info("stopping vm", "reason", reason, "deadline", deadline, "timeout", deadline.Sub(now))
	hurry := ctx.Done()
	for i, s := range steps {
		last := i == len(steps)-1
		t := time.NewTimer(time.Until(s.at))
		select {
		case <-mc.proc.Done():
		case <-mc.done: // detached
		case <-hurry:
		case <-t.C:
		}
		t.Stop()
		if mc.proc.Exited() || isDone(mc.done) {
			return
		}
		if !last && isDone(hurry) {
			// The caller gave up waiting: kill now, skipping the
			// graceful steps.
			continue
		}
		// A step may take until the next one is due, never longer.
		due := time.Now().Add(time.Second)
		if !last {
			due = steps[i+1].at
		}
		stepCtx, cancel := context.WithDeadline(context.Background(), due)
		rec := StopStep{Action: s.action, At: time.Now()}
		err := actions[s.action](stepCtx)
		cancel()
		if err != nil {
			rec.Error = err.Error()
			mc.log.Warn("stop step failed", "step", s.action, "err", err)
		} else {
			mc.log.Info("stop step", "step", s.action)
		}
		mc.update(func(st *State) { st.Stop.Steps = append(st.Stop.Steps, rec) })
	}
}

func isDone(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}
