package nomad

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/hashicorp/nomad/plugins/drivers"

	"github.com/fireactions/fireactions/internal/runtime"
	"github.com/fireactions/fireactions/internal/vm"
)

// StartTask implements drivers.DriverPlugin: it validates the task's
// config, then has the runtime pull the image (through the shared cache),
// create the scratch disk, attach the network and boot the VM. The VM
// outlives this call and the plugin process.
func (d *Driver) StartTask(tc *drivers.TaskConfig) (*drivers.TaskHandle, *drivers.DriverNetwork, error) {
	rt, pc := d.runtime(), d.pluginConfig()
	if rt == nil {
		return nil, nil, errors.New("the plugin is not configured")
	}
	d.tasksMu.RLock()
	_, exists := d.tasks[tc.ID]
	d.tasksMu.RUnlock()
	if exists {
		return nil, nil, fmt.Errorf("task %s is already started", tc.ID)
	}
	var cfg TaskConfig
	if err := tc.DecodeDriverConfig(&cfg); err != nil {
		return nil, nil, fmt.Errorf("decoding the task config: %w", err)
	}
	p, err := buildPlan(tc, &cfg, pc)
	if err != nil {
		return nil, nil, fmt.Errorf("invalid task config: %w", err)
	}
	log := d.log.With("task", tc.Name, "alloc_id", tc.AllocID, "vm", p.req.ID)
	for _, w := range p.warnings {
		log.Warn(w)
		d.emit(tc, w, map[string]string{"warning": "true"})
	}
	p.req.Events = func(ev runtime.Event) { d.startEvent(tc, ev) }
	if p.logPath != "" {
		// The file is created here so a wrong path fails the start, not
		// the output copy later.
		f, err := os.OpenFile(p.logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
		if err != nil {
			return nil, nil, fmt.Errorf("%s: %w", "Log", err)
		}
		f.Close()
	}

	// Only the start-up is bounded by the driver's life: the VM is not.
	inst, err := rt.Run(d.ctx, p.req)
	if err != nil {
		return nil, nil, err
	}
	st, err := taskState(inst, p.logPath)
	if err != nil {
		_ = inst.Remove(context.WithoutCancel(d.ctx))
		return nil, nil, err
	}
	shipper, err := shipperFor(d.shipperSpec(tc, st), st)
	if err != nil {
		_ = inst.Remove(context.WithoutCancel(d.ctx))
		return nil, nil, err
	}
	if shipper != nil {
		st.ShipperPid, st.ShipperStartTime = shipper.Pid, shipper.StartTime
	}
	th := drivers.NewTaskHandle(taskHandleVersion)
	th.Config = tc
	th.State = drivers.TaskStateRunning
	if err := th.SetDriverState(&st); err != nil {
		_ = inst.Remove(context.WithoutCancel(d.ctx))
		return nil, nil, fmt.Errorf("encoding the task state: %w", err)
	}
	h := newHandle(d.ctx, tc.ID, tc, inst, st, shipper, log)
	d.tasksMu.Lock()
	d.tasks[tc.ID] = h
	d.tasksMu.Unlock()
	go h.run()
	go d.reportBoot(h)

	var net *drivers.DriverNetwork
	if st.IP != "" {
		net = &drivers.DriverNetwork{IP: st.IP, AutoAdvertise: true}
	}
	log.Info("task started", "backend", st.Backend, "pid", st.Pid, "ip", st.IP)
	return th, net, nil
}

// shipperSpec is the log shipper of a task's VM.
func (d *Driver) shipperSpec(tc *drivers.TaskConfig, st TaskState) shipperSpec {
	dataDir := d.runtime().DataDir()
	return shipperSpec{
		VMDir: st.VMDir, Stdout: tc.StdoutPath, Stderr: tc.StderrPath, Console: st.LogPath,
		Offsets: offsetsPath(dataDir, st.VMID), LogFile: shipperLogPath(dataDir, st.VMID),
	}
}

// taskState describes the instance for the task handle.
func taskState(inst *runtime.Instance, logPath string) (TaskState, error) {
	info, err := inst.Inspect()
	if err != nil {
		return TaskState{}, fmt.Errorf("inspecting VM %s: %w", inst.ID(), err)
	}
	if info.VM == nil {
		return TaskState{}, fmt.Errorf("VM %s has no state", inst.ID())
	}
	st := TaskState{
		VMID:         inst.ID(),
		Pid:          info.VM.Pid,
		PidStartTime: info.VM.PidStartTime,
		VMDir:        info.VM.Dir,
		Backend:      info.VM.Backend,
		Sockets:      sockets(info.VM),
		LogPath:      logPath,
		StartedAt:    info.VM.StartedAt,
	}
	if att := inst.Network(); att != nil {
		st.NetNS = att.NetNSPath
		if ip, err := att.Addr(); err == nil {
			st.IP = ip.String()
		}
	}
	return st, nil
}

// sockets picks the VMM's control sockets and pipes out of the VM's
// backend details.
func sockets(st *vm.State) map[string]string {
	out := map[string]string{}
	for k, v := range st.Details {
		if strings.HasSuffix(k, "_socket") || k == "console_input" || k == "vsock_uds" {
			out[k] = v
		}
	}
	return out
}

// startEvent turns the runtime's start-up phases into task events with
// their timings.
func (d *Driver) startEvent(tc *drivers.TaskConfig, ev runtime.Event) {
	if ev.Progress != nil {
		return
	}
	ann := map[string]string{"phase": string(ev.Phase)}
	var msg string
	switch {
	case ev.Phase == runtime.PhaseBackend:
		msg = "VM backend: " + ev.Message
	case !ev.Done && ev.Phase == runtime.PhasePull:
		msg = "Pulling and converting the image"
	case !ev.Done && ev.Phase == runtime.PhaseBoot:
		msg = "Booting the VM"
	case !ev.Done:
		return
	case ev.Err != nil:
		msg = fmt.Sprintf("%s failed after %s: %v", phaseName(ev.Phase), ev.Duration.Round(time.Millisecond), ev.Err)
	default:
		ann["duration"] = ev.Duration.String()
		msg = fmt.Sprintf("%s in %s", phaseName(ev.Phase), ev.Duration.Round(time.Millisecond))
		if ev.Message != "" {
			msg += ": " + ev.Message
		}
		if ev.Phase == runtime.PhasePull {
			if ev.Cached {
				ann["cached"] = "true"
				msg = "Image found in the cache: " + ev.Message
			} else {
				msg = fmt.Sprintf("Image pulled and converted in %s", ev.Duration.Round(time.Millisecond))
			}
		}
	}
	d.emit(tc, msg, ann)
}

func phaseName(p runtime.Phase) string {
	switch p {
	case runtime.PhasePull:
		return "Image pull"
	case runtime.PhaseScratch:
		return "Scratch disk created"
	case runtime.PhaseNetwork:
		return "Network attached"
	case runtime.PhaseInitramfs:
		return "Initramfs ready"
	case runtime.PhaseBoot:
		return "VMM started"
	case runtime.PhaseStarted:
		return "Guest booted"
	}
	return string(p)
}

// reportBoot emits the event of the guest reaching its workload, with the
// guest's boot time.
func (d *Driver) reportBoot(h *taskHandle) {
	_, err := h.inst.WaitStarted(h.ctx, func(ev runtime.Event) {
		d.emit(h.tc, fmt.Sprintf("Guest booted in %s, workload started", ev.Duration.Round(time.Millisecond)),
			map[string]string{"phase": string(ev.Phase), "duration": ev.Duration.String()})
	})
	if err != nil && h.ctx.Err() == nil {
		h.log.Debug("the workload did not start", "err", err)
	}
}

// RecoverTask implements drivers.DriverPlugin: it re-attaches to the VM
// named in the task state. It never boots a VM: if that VM is gone, or a
// different process now has its pid, recovery fails and Nomad decides
// what to do with the task.
func (d *Driver) RecoverTask(th *drivers.TaskHandle) error {
	if th == nil || th.Config == nil {
		return errors.New("RecoverTask: no task handle")
	}
	rt := d.runtime()
	if rt == nil {
		return errors.New("the plugin is not configured")
	}
	d.tasksMu.RLock()
	_, exists := d.tasks[th.Config.ID]
	d.tasksMu.RUnlock()
	if exists {
		return nil
	}
	var st TaskState
	if err := th.GetDriverState(&st); err != nil {
		return fmt.Errorf("decoding the task state: %w", err)
	}
	if st.VMID == "" {
		return errors.New("the task state names no VM")
	}
	log := d.log.With("task", th.Config.Name, "alloc_id", th.Config.AllocID, "vm", st.VMID)
	// The VM must still be the one the task started: same VMM process
	// (pid and start time). Checked before taking it over, so a mismatch
	// leaves it alone.
	if info, err := rt.Inspect(st.VMID); err != nil {
		return fmt.Errorf("re-attaching to VM %s: %w", st.VMID, err)
	} else if info.VM != nil && info.VM.Pid != 0 && (info.VM.Pid != st.Pid || info.VM.PidStartTime != st.PidStartTime) {
		return fmt.Errorf("VM %s is run by pid %d, not by the task's pid %d: not re-attaching", st.VMID, info.VM.Pid, st.Pid)
	}
	ctx, cancel := context.WithTimeout(d.ctx, recoverTimeout)
	defer cancel()
	inst, err := rt.Attach(ctx, st.VMID)
	if err != nil {
		return fmt.Errorf("re-attaching to VM %s: %w", st.VMID, err)
	}
	info, err := inst.Inspect()
	if err != nil {
		return fmt.Errorf("re-attaching to VM %s: %w", st.VMID, err)
	}
	shipper, err := shipperFor(d.shipperSpec(th.Config, st), st)
	if err != nil {
		// The VM is recovered; only its output is not delivered.
		log.Warn("no log shipper for the recovered task", "err", err)
	}
	h := newHandle(d.ctx, th.Config.ID, th.Config, inst, st, shipper, log)
	d.tasksMu.Lock()
	d.tasks[th.Config.ID] = h
	d.tasksMu.Unlock()
	go h.run()
	state := "running"
	if info.State == runtime.StateExited {
		state = "exited while the plugin was away"
	}
	log.Info("re-attached to the task's VM", "pid", st.Pid, "state", state)
	return nil
}

// WaitTask implements drivers.DriverPlugin: the channel receives the
// workload's exit code and signal once the VM has ended.
func (d *Driver) WaitTask(ctx context.Context, taskID string) (<-chan *drivers.ExitResult, error) {
	h, err := d.handle(taskID)
	if err != nil {
		return nil, err
	}
	ch := make(chan *drivers.ExitResult, 1)
	go func() {
		defer close(ch)
		var res *drivers.ExitResult
		select {
		case <-h.done:
			h.mu.Lock()
			res = h.exit.Copy()
			h.mu.Unlock()
		case <-ctx.Done():
			res = &drivers.ExitResult{Err: ctx.Err()}
		case <-d.ctx.Done():
			res = &drivers.ExitResult{Err: errors.New("the driver is shutting down")}
		}
		select {
		case ch <- res:
		case <-ctx.Done():
		}
	}()
	return ch, nil
}

// StopTask implements drivers.DriverPlugin: the task's kill signal to the
// guest's process, then the VM's stop escalation, all within timeout.
func (d *Driver) StopTask(taskID string, timeout time.Duration, signal string) error {
	h, err := d.handle(taskID)
	if err != nil {
		return err
	}
	// A little beyond the deadline, so the escalation's own SIGKILL step
	// can complete.
	ctx, cancel := context.WithTimeout(d.ctx, timeout+30*time.Second)
	defer cancel()
	h.log.Info("stopping task", "timeout", timeout, "signal", signal)
	return h.stop(ctx, timeout, signal)
}

// DestroyTask implements drivers.DriverPlugin: it removes the VM and
// everything it holds (disks, network, image lease, state). A running
// task is only destroyed with force, which kills its VM.
func (d *Driver) DestroyTask(taskID string, force bool) error {
	h, err := d.handle(taskID)
	if err != nil {
		return err
	}
	if !h.exited() && !force {
		return fmt.Errorf("task %s is still running: stop it first, or destroy with force", taskID)
	}
	h.cancel()
	ctx, cancel := context.WithTimeout(context.WithoutCancel(d.ctx), 2*time.Minute)
	defer cancel()
	if err := h.inst.Remove(ctx); err != nil && !errors.Is(err, runtime.ErrNotFound) {
		return fmt.Errorf("removing VM %s: %w", h.state.VMID, err)
	}
	h.release()
	dataDir := d.runtime().DataDir()
	_ = os.Remove(offsetsPath(dataDir, h.state.VMID))
	_ = os.Remove(shipperLogPath(dataDir, h.state.VMID))
	d.tasksMu.Lock()
	delete(d.tasks, taskID)
	d.tasksMu.Unlock()
	h.log.Info("task destroyed")
	return nil
}

// InspectTask implements drivers.DriverPlugin.
func (d *Driver) InspectTask(taskID string) (*drivers.TaskStatus, error) {
	h, err := d.handle(taskID)
	if err != nil {
		return nil, err
	}
	return h.taskStatus(), nil
}

// TaskStats implements drivers.DriverPlugin: every interval, the VMM
// process's CPU and memory use (which include the guest's), until ctx ends
// or the task exits.
func (d *Driver) TaskStats(ctx context.Context, taskID string, interval time.Duration) (<-chan *drivers.TaskResourceUsage, error) {
	h, err := d.handle(taskID)
	if err != nil {
		return nil, err
	}
	if interval <= 0 {
		interval = time.Second
	}
	d.mu.RLock()
	tracker := &usageTracker{compute: d.compute}
	d.mu.RUnlock()
	ch := make(chan *drivers.TaskResourceUsage)
	go func() {
		defer close(ch)
		t := time.NewTimer(0)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-h.done:
				return
			case <-h.ctx.Done():
				return
			case <-t.C:
				t.Reset(interval)
			}
			s, err := readProc(h.state.Pid)
			if err != nil {
				if h.exited() {
					return
				}
				h.log.Debug("reading VMM usage", "err", err)
				continue
			}
			select {
			case ch <- tracker.usage(s):
			case <-ctx.Done():
				return
			case <-h.done:
				return
			}
		}
	}()
	return ch, nil
}
