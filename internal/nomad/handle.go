package nomad

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/nomad/plugins/drivers"

	"github.com/fireactions/fireactions/internal/guest"
	"github.com/fireactions/fireactions/internal/runtime"
	"github.com/fireactions/fireactions/internal/vm"
)

// streamDrainTimeout bounds how long the exit report waits for the log
// shipper to deliver the rest of the output after the VM ended, so that
// `nomad alloc logs` shows the whole output of a task that just exited.
// The shipper normally ends as soon as the console log is drained; it only
// takes this long when nothing reads Nomad's fifos.
const streamDrainTimeout = 30 * time.Second

// taskHandle is one task's VM, owned by this plugin process.
type taskHandle struct {
	taskID string
	tc     *drivers.TaskConfig
	inst   *runtime.Instance
	state  TaskState
	log    *slog.Logger
	// shipper copies the VM's output to Nomad's fifos; nil when there is
	// nothing to copy.
	shipper *vm.Process

	// ctx ends when the driver shuts down (the VM keeps running) or the
	// task is destroyed.
	ctx    context.Context
	cancel context.CancelFunc

	mu          sync.Mutex
	status      drivers.TaskState
	startedAt   time.Time
	completedAt time.Time
	exit        *drivers.ExitResult
	done        chan struct{} // closed once exit is set
}

func newHandle(parent context.Context, taskID string, tc *drivers.TaskConfig, inst *runtime.Instance, st TaskState, shipper *vm.Process, log *slog.Logger) *taskHandle {
	ctx, cancel := context.WithCancel(parent)
	return &taskHandle{
		taskID: taskID, tc: tc, inst: inst, state: st, shipper: shipper, log: log,
		ctx: ctx, cancel: cancel,
		status: drivers.TaskStateRunning, startedAt: st.StartedAt,
		done: make(chan struct{}),
	}
}

// run waits for the VM to end and for its output to be delivered, then
// records the exit. It returns early, recording nothing, when the driver
// shuts down: the VM runs on and a restarted plugin recovers it.
func (h *taskHandle) run() {
	es, err := h.inst.Wait(h.ctx)
	if h.ctx.Err() != nil {
		return
	}
	if h.shipper != nil {
		t := time.NewTimer(streamDrainTimeout)
		select {
		case <-h.shipper.Done():
		case <-t.C:
			h.log.Warn("the VM's output was not fully delivered to Nomad's log fifos", "waited", streamDrainTimeout)
		case <-h.ctx.Done():
		}
		t.Stop()
	}
	res := exitResult(es, err)
	h.log.Info("task ended", "reason", es.Reason, "exit_code", res.ExitCode, "signal", res.Signal, "err", res.Err)
	h.mu.Lock()
	h.exit = res
	h.status = drivers.TaskStateExited
	h.completedAt = es.At
	if h.completedAt.IsZero() {
		h.completedAt = time.Now()
	}
	h.mu.Unlock()
	close(h.done)
}

// release lets go of the shipper process (it runs on until it is done).
func (h *taskHandle) release() {
	if h.shipper != nil {
		h.shipper.Release()
	}
}

// exitResult translates how a VM ended into Nomad's terms. The workload's
// own exit code and signal are reported when the guest init sent them;
// otherwise the VM's end is described by an error.
func exitResult(es vm.ExitStatus, err error) *drivers.ExitResult {
	if err != nil {
		return &drivers.ExitResult{ExitCode: 1, Err: fmt.Errorf("waiting for the VM: %w", err)}
	}
	if es.WorkloadExited {
		return &drivers.ExitResult{ExitCode: es.Code, Signal: es.Signal}
	}
	switch es.Reason {
	case vm.ReasonGuestShutdown:
		// A system-mode guest that powered off by itself.
		if es.Message != "" {
			return &drivers.ExitResult{ExitCode: 1, Err: fmt.Errorf("the guest shut down: %s", es.Message)}
		}
		return &drivers.ExitResult{}
	case vm.ReasonStopped, vm.ReasonTimeout:
		// Stopped before the workload reported: the VM was powered off
		// or its VMM killed.
		if es.VMM.Signal != 0 {
			return &drivers.ExitResult{ExitCode: 128 + es.VMM.Signal, Signal: es.VMM.Signal}
		}
		return &drivers.ExitResult{}
	case vm.ReasonGuestError:
		return &drivers.ExitResult{ExitCode: 1, Err: fmt.Errorf("the guest init failed: %s", es.Message)}
	default:
		return &drivers.ExitResult{ExitCode: 1, Err: fmt.Errorf("the VM ended (%s)", es)}
	}
}

// exited reports whether the task has ended.
func (h *taskHandle) exited() bool {
	select {
	case <-h.done:
		return true
	default:
		return false
	}
}

func (h *taskHandle) taskStatus() *drivers.TaskStatus {
	h.mu.Lock()
	defer h.mu.Unlock()
	st := &drivers.TaskStatus{
		ID:          h.taskID,
		Name:        h.tc.Name,
		State:       h.status,
		StartedAt:   h.startedAt,
		CompletedAt: h.completedAt,
		ExitResult:  h.exit.Copy(),
		DriverAttributes: map[string]string{
			"vm_id":   h.state.VMID,
			"backend": h.state.Backend,
			"pid":     fmt.Sprint(h.state.Pid),
			"vm_dir":  h.state.VMDir,
		},
	}
	if h.state.IP != "" {
		st.DriverAttributes["ip"] = h.state.IP
		st.NetworkOverride = &drivers.DriverNetwork{IP: h.state.IP, AutoAdvertise: true}
	}
	if h.state.NetNS != "" {
		st.DriverAttributes["netns"] = h.state.NetNS
	}
	return st
}

// stop ends the task within timeout: the task's kill signal to the guest
// process first; if the workload has not ended by half the timeout, the
// VM's stop escalation (the image's stop signal and SIGKILL inside the
// guest, the power button, SIGTERM and SIGKILL to the VMM) within what is
// left. Every wait ends as soon as the VM has exited.
func (h *taskHandle) stop(ctx context.Context, timeout time.Duration, signal string) error {
	if h.exited() {
		return nil
	}
	if timeout <= 0 {
		timeout = vm.DefaultStopTimeout
	}
	deadline := time.Now().Add(timeout)
	if signal != "" {
		sig, err := parseSignal(signal)
		if err != nil {
			return err
		}
		if err := h.inst.Signal(ctx, sig); err != nil {
			h.log.Warn("sending the kill signal to the guest process failed; stopping the VM", "signal", signal, "err", err)
		} else {
			t := time.NewTimer(timeout / 2)
			select {
			case <-h.done:
				t.Stop()
				return nil
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
				return ctx.Err()
			}
		}
	}
	left := time.Until(deadline)
	if left <= 0 {
		left = time.Millisecond
	}
	_, err := h.inst.Stop(ctx, left)
	if err != nil && errors.Is(err, vm.ErrNotAttached) && h.exited() {
		return nil
	}
	return err
}

// signal sends a signal to the guest's workload.
func (h *taskHandle) signal(ctx context.Context, signal string) error {
	sig, err := parseSignal(signal)
	if err != nil {
		return err
	}
	return h.inst.Signal(ctx, sig)
}

func parseSignal(s string) (syscall.Signal, error) {
	n, err := guest.ParseSignal(s)
	if err != nil {
		return 0, fmt.Errorf("signal %q: %w", s, err)
	}
	return syscall.Signal(n), nil
}
