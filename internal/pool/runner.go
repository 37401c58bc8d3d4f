package pool

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"time"

	"github.com/fireactions/fireactions/internal/agent"
	"github.com/fireactions/fireactions/internal/config"
	"github.com/fireactions/fireactions/internal/github"
	"github.com/fireactions/fireactions/internal/metadata"
)

// runner is one runner and its VM. rec and the other fields are guarded by
// the pool's mu; the runner's own goroutine drives its life.
type runner struct {
	rec     record
	machine Machine
	// stopC wakes the runner's goroutine when pending is set.
	stopC   chan struct{}
	pending *stopRequest
	// stopReason is why the VM is being stopped (empty: it ended by
	// itself).
	stopReason string
	// stopIssued is set once the VM's stop was requested from the runtime;
	// stoppingSince is when the runner stopped counting, for a VM that
	// should end by itself (job done, agent failed) but does not.
	stopIssued    bool
	stoppingSince time.Time
	exit          *Exit
	jobDone       bool
	jobObserved   bool
	deregistered  bool
}

// politeStop names the stops that deregister first and give way to a job.
var politeStop = map[string]bool{"scale_down": true, "idle_ttl": true, "drain": true}

// stopRequest asks a runner's goroutine to stop its VM.
type stopRequest struct {
	reason string
	// deregisterFirst stops the VM only once GitHub accepted the
	// deregistration: GitHub refuses it for a runner that took a job, so
	// an idle runner that just became busy is never stopped.
	deregisterFirst bool
}

func newRunner(rec record) *runner {
	return &runner{rec: rec, stopC: make(chan struct{}, 1)}
}

// rank orders states so that reports replayed after a restart, or late
// ones, never move a runner backwards.
func rank(s State) int {
	switch s {
	case StateRegistering:
		return 0
	case StateStarting:
		return 1
	case StateBooting:
		return 2
	case StateIdle:
		return 3
	case StateBusy:
		return 4
	case StateStopping:
		return 5
	}
	return 6
}

func (r *runner) statusLocked() VMStatus {
	st := VMStatus{
		ID: r.rec.Name, Pool: r.rec.Pool, RunnerID: r.rec.RunnerID, State: r.rec.State,
		Created: r.rec.Created, Started: r.rec.Started, IdleAt: r.rec.IdleAt, BusyAt: r.rec.BusyAt,
		StopReason: r.stopReason,
	}
	if r.exit != nil {
		e := *r.exit
		st.Exit = &e
	}
	return st
}

// launchLocked adds a runner and starts its goroutine.
func (p *pool) launchLocked(ctx context.Context) {
	rec := record{
		Name: newRunnerName(p.cfg.Runner.NamePrefix), Pool: p.cfg.Name,
		ScopeKind: string(p.scope.Kind), ScopeName: p.scope.Name,
		State: StateRegistering, Created: time.Now(),
	}
	r := newRunner(rec)
	p.runners[rec.Name] = r
	p.m.wg.Add(1)
	go func() {
		defer p.m.wg.Done()
		p.life(ctx, r)
	}()
}

// requestStopLocked hands a stop request to the runner's goroutine. A
// forceful request replaces a polite (deregister-first) one.
func (p *pool) requestStopLocked(r *runner, req stopRequest) {
	if r.pending != nil && !(r.pending.deregisterFirst && !req.deregisterFirst) {
		return
	}
	cp := req
	r.pending = &cp
	if r.rec.State.active() && r.rec.State != StateBusy {
		r.rec.State = StateStopping
		r.stopReason = req.reason
	}
	select {
	case r.stopC <- struct{}{}:
	default:
	}
}

// persistLocked writes the runner's record.
func (p *pool) persistLocked(r *runner) {
	if err := p.m.store.saveRunner(r.rec); err != nil {
		p.log.Error("persist runner state", "vm", r.rec.Name, "error", err)
	}
}

// life registers a runner, starts its VM and watches it to its end.
func (p *pool) life(ctx context.Context, r *runner) {
	p.mu.Lock()
	rec := r.rec
	set := p.set
	p.mu.Unlock()
	// The record comes first: no registration may exist that no record
	// names.
	if err := p.m.store.saveRunner(rec); err != nil {
		p.fail("state", err, true)
		p.forget(r)
		return
	}
	jit, err := p.register(ctx, set, rec.Name)
	if err != nil {
		if ctx.Err() != nil {
			return // shutting down; the record lets the next start resolve it
		}
		p.fail("github", err, true)
		if refused(err) {
			p.forget(r)
			return
		}
		// GitHub may have created the runner although the answer was an
		// error (a timeout or a server error, say): resolve it by name.
		p.endRunner(r)
		return
	}
	p.mu.Lock()
	r.rec.RunnerID = jit.RunnerID
	cancelled := p.draining || r.pending != nil
	if r.rec.State == StateRegistering {
		r.rec.State = StateStarting
	}
	r.rec.Started = time.Now()
	p.persistLocked(r)
	spec := p.specLocked(r, jit)
	p.mu.Unlock()
	if cancelled {
		p.endRunner(r)
		return
	}

	m, err := p.m.rt.Start(ctx, spec)
	if err != nil {
		if ctx.Err() == nil {
			p.fail("vm_start", err, true)
		}
		// A runner registered for a VM that did not start is deregistered
		// at once.
		p.endRunner(r)
		return
	}
	p.m.obs.RunnerCreated(p.cfg.Name)
	p.mu.Lock()
	r.machine = m
	if r.rec.State == StateStarting {
		r.rec.State = StateBooting
	}
	p.persistLocked(r)
	p.mu.Unlock()
	p.log.Info("runner VM started", "vm", rec.Name, "runner_id", jit.RunnerID)
	p.kick()
	p.watch(ctx, r)
}

// refused reports whether GitHub answered a registration with a refusal
// that created nothing (rate limit, credentials, permissions, bad input),
// as opposed to a server error or a lost answer, after which the runner
// may exist.
func refused(err error) bool {
	for _, kind := range []error{github.ErrRateLimited, github.ErrUnauthorized, github.ErrForbidden,
		github.ErrNotInstalled, github.ErrInvalid, github.ErrNotFound, github.ErrConflict} {
		if errors.Is(err, kind) {
			return true
		}
	}
	return false
}

func (p *pool) register(ctx context.Context, set *github.ScaleSet, name string) (github.JITConfig, error) {
	if p.cfg.Scaling == config.ScalingScaleSet {
		if set == nil {
			return github.JITConfig{}, errors.New("no scale set yet")
		}
		return set.GenerateJITConfig(ctx, name)
	}
	return p.m.gh.GenerateJITConfig(ctx, p.scope, name, p.cfg.Runner.Labels, p.cfg.Runner.GroupID)
}

func (p *pool) specLocked(r *runner, jit github.JITConfig) VMSpec {
	name := r.rec.Name
	network := p.cfg.Network
	if network == "" {
		network = p.m.opts.Config.Network.Name
	}
	spec := VMSpec{
		ID: name, Pool: p.cfg.Name, Image: p.cfg.Runner.Image, Pull: p.cfg.Runner.ImagePullPolicy,
		VM: p.cfg.VM, Network: network,
		Labels: map[string]string{
			LabelPool: p.cfg.Name, LabelRunner: name, LabelRunnerID: strconv.FormatInt(jit.RunnerID, 10),
		},
		Metadata: metadata.Input{
			InstanceID: name, Hostname: name, RunnerID: strconv.FormatInt(jit.RunnerID, 10), Pool: p.cfg.Name,
			Metadata: p.cfg.VM.Metadata, UserData: p.cfg.VM.UserData, RegistryCache: p.m.opts.RegistryCache,
		},
		JITConfig:  jit.EncodedJITConfig,
		KernelArgs: agent.KernelArg,
	}
	if p.cfg.VM.Mode == config.VMModeApp {
		spec.Args = append([]string(nil), p.m.opts.AgentArgs...)
	}
	return spec
}

type waitResult struct {
	exit Exit
	err  error
}

// watch follows a running VM: the agent's reports, the host-side
// deadlines, stop requests and the VM's end. It returns when the VM has
// ended and the runner is dealt with, or when ctx ends (the daemon stops
// without draining: the VM keeps running for the next daemon to adopt).
func (p *pool) watch(ctx context.Context, r *runner) {
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	reports := make(chan agent.Report, 16)
	go p.readReports(wctx, r, reports)
	exitC := make(chan waitResult, 1)
	go func() {
		ex, err := r.machine.Wait(wctx)
		exitC <- waitResult{ex, err}
	}()
	stopping := false
	for {
		p.mu.Lock()
		deadline, why := p.deadlineLocked(r)
		p.mu.Unlock()
		var timer *time.Timer
		var timerC <-chan time.Time
		if !stopping && !deadline.IsZero() {
			timer = time.NewTimer(time.Until(deadline))
			timerC = timer.C
		}
		select {
		case <-ctx.Done():
			stopTimer(timer)
			return
		case rep := <-reports:
			p.onReport(r, rep)
		case res := <-exitC:
			stopTimer(timer)
			if res.err != nil {
				if ctx.Err() != nil {
					return
				}
				res.exit = Exit{Reason: "unknown", Message: res.err.Error()}
			}
			p.ended(r, res.exit)
			return
		case <-timerC:
			stopping = p.deadlinePassed(ctx, r, why)
		case <-r.stopC:
			p.mu.Lock()
			req := r.pending
			r.pending = nil
			p.mu.Unlock()
			if req == nil || stopping {
				break
			}
			if req.deregisterFirst && !p.deregisterIdle(ctx, r) {
				break
			}
			stopping = true
			p.stopVM(ctx, r, req.reason)
		}
		stopTimer(timer)
	}
}

func stopTimer(t *time.Timer) {
	if t != nil {
		t.Stop()
	}
}

// deadlineLocked returns the host-side deadline of the runner's state.
func (p *pool) deadlineLocked(r *runner) (time.Time, string) {
	t := p.cfg.Timeouts
	switch r.rec.State {
	case StateStarting, StateBooting:
		return r.rec.Started.Add(t.Boot.Std()), "boot_timeout"
	case StateIdle:
		if t.IdleTTL > 0 {
			return r.rec.IdleAt.Add(t.IdleTTL.Std()), "idle_ttl"
		}
	case StateBusy:
		return r.rec.BusyAt.Add(t.MaxJob.Std()), "max_job"
	case StateStopping:
		if !r.stopIssued && !r.stoppingSince.IsZero() {
			// The guest should power off by itself; if it does not, the
			// host stops it.
			return r.stoppingSince.Add(p.m.opts.StopGrace), "linger"
		}
	}
	return time.Time{}, ""
}

// deadlinePassed stops a runner whose deadline passed; it reports whether
// the VM is being stopped.
func (p *pool) deadlinePassed(ctx context.Context, r *runner, why string) bool {
	switch why {
	case "boot_timeout":
		p.fail(why, fmt.Errorf("runner %s did not report idle within %s", r.rec.Name, p.cfg.Timeouts.Boot.Std()), true)
	case "idle_ttl":
		p.log.Info("runner idle for too long; replacing it", "vm", r.rec.Name, "idle_ttl", p.cfg.Timeouts.IdleTTL.Std())
		p.mu.Lock()
		r.rec.State = StateStopping
		r.stopReason = why
		p.mu.Unlock()
		if !p.deregisterIdle(ctx, r) {
			return false
		}
	case "max_job":
		p.fail(why, fmt.Errorf("runner %s ran its job for longer than %s", r.rec.Name, p.cfg.Timeouts.MaxJob.Std()), false)
	case "linger":
		p.log.Warn("runner VM did not power off after its runner ended; stopping it", "vm", r.rec.Name)
		p.mu.Lock()
		why = r.stopReason
		p.mu.Unlock()
	}
	p.stopVM(ctx, r, why)
	return true
}

// deregisterIdle deregisters a runner believed idle before its VM is
// stopped. When GitHub refuses because the runner took a job, the runner
// is busy and stays; other errors leave it idle for a later attempt.
func (p *pool) deregisterIdle(ctx context.Context, r *runner) bool {
	p.mu.Lock()
	rec := r.rec
	p.mu.Unlock()
	if rec.RunnerID == 0 {
		return true
	}
	err := p.m.gh.DeleteRunner(ctx, p.scope, rec.RunnerID)
	p.mu.Lock()
	defer p.mu.Unlock()
	switch {
	case err == nil:
		r.deregistered = true
		return true
	case errors.Is(err, github.ErrRunnerBusy):
		p.log.Info("runner took a job; keeping it", "vm", rec.Name)
		p.markBusyLocked(r)
	default:
		p.log.Warn("deregister idle runner failed; keeping it for now", "vm", rec.Name, "error", err)
		if r.rec.State == StateStopping {
			r.rec.State = StateIdle
			r.stopReason = ""
		}
	}
	p.kick()
	return false
}

// stopVM stops the VM in the background; watch sees it end.
func (p *pool) stopVM(ctx context.Context, r *runner, reason string) {
	p.mu.Lock()
	if r.rec.State != StateEnded {
		r.rec.State = StateStopping
	}
	r.stopReason = reason
	r.stopIssued = true
	p.persistLocked(r)
	m := r.machine
	p.mu.Unlock()
	p.log.Info("stopping runner VM", "vm", r.rec.Name, "reason", reason)
	p.kick()
	go func() {
		if err := m.Stop(context.WithoutCancel(ctx), p.m.opts.StopGrace); err != nil {
			p.log.Warn("stop runner VM", "vm", r.rec.Name, "error", err)
		}
	}()
}

// readReports turns the VM's stdout into agent reports.
func (p *pool) readReports(ctx context.Context, r *runner, out chan<- agent.Report) {
	pr, pw := io.Pipe()
	go func() {
		pw.CloseWithError(r.machine.FollowStdout(ctx, pw))
	}()
	defer pr.Close()
	sc := bufio.NewScanner(pr)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		rep, ok, err := agent.ParseReport(sc.Bytes())
		switch {
		case !ok:
			continue
		case err != nil:
			p.log.Warn("unreadable agent report", "vm", r.rec.Name, "error", err)
			continue
		}
		select {
		case out <- rep:
		case <-ctx.Done():
			return
		}
	}
}

// onReport applies an agent report.
func (p *pool) onReport(r *runner, rep agent.Report) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.log.Debug("agent report", "vm", r.rec.Name, "state", rep.State)
	switch rep.State {
	case agent.StateIdle:
		if rank(r.rec.State) >= rank(StateIdle) {
			return
		}
		r.rec.State = StateIdle
		r.rec.IdleAt = time.Now()
		p.persistLocked(r)
		if !r.rec.Started.IsZero() {
			p.m.obs.BootToIdle(p.cfg.Name, r.rec.IdleAt.Sub(r.rec.Started))
		}
		p.log.Info("runner idle", "vm", r.rec.Name, "boot_to_idle", r.rec.IdleAt.Sub(r.rec.Started).Round(time.Millisecond))
		p.mu.Unlock()
		p.succeeded()
		p.mu.Lock()
	case agent.StateBusy:
		p.markBusyLocked(r)
	case agent.StateDone:
		p.markDoneLocked(r)
	case agent.StateFailed:
		msg := rep.Message
		p.mu.Unlock()
		p.fail("agent", fmt.Errorf("runner %s: %s", r.rec.Name, msg), true)
		p.mu.Lock()
		if r.rec.State.active() {
			r.rec.State = StateStopping
			r.stopReason = "agent_failed"
			r.stoppingSince = time.Now()
		}
	}
	p.kick()
}

// markBusyLocked records that the runner took a job (the agent said so,
// or GitHub did).
func (p *pool) markBusyLocked(r *runner) {
	if r.rec.State == StateBusy || r.jobDone {
		return
	}
	// A runner being stopped politely (deregistration first) that took a
	// job after all stays; one being stopped forcefully goes anyway.
	if r.rec.State == StateStopping && !politeStop[r.stopReason] {
		return
	}
	r.rec.State = StateBusy
	r.stopReason = ""
	if r.rec.BusyAt.IsZero() {
		r.rec.BusyAt = time.Now()
	}
	p.persistLocked(r)
	p.log.Info("runner busy", "vm", r.rec.Name)
	p.kick()
}

// markDoneLocked records that the runner's job is over: the VM ends by
// itself and no longer counts towards the pool's size.
func (p *pool) markDoneLocked(r *runner) {
	if r.jobDone {
		return
	}
	r.jobDone = true
	if !r.rec.BusyAt.IsZero() && !r.jobObserved {
		r.jobObserved = true
		p.m.obs.JobDuration(p.cfg.Name, time.Since(r.rec.BusyAt))
	}
	if r.rec.State.active() {
		r.rec.State = StateStopping
		r.stopReason = "job_done"
		r.stoppingSince = time.Now()
		p.persistLocked(r)
	}
	p.kick()
}

// ended deals with a VM that has ended, however it ended.
func (p *pool) ended(r *runner, ex Exit) {
	p.mu.Lock()
	r.exit = &ex
	reason, state, jobDone := r.stopReason, r.rec.State, r.jobDone
	name := r.rec.Name
	p.mu.Unlock()
	msg := ex.Message
	if msg == "" {
		msg = ex.Reason
	}
	switch {
	case reason != "" || jobDone:
	case state == StateBusy:
		p.fail("vm_exit", fmt.Errorf("runner %s's VM ended during its job: %s", name, msg), false)
	case state != StateIdle:
		p.fail("vm_exit", fmt.Errorf("runner %s's VM ended before its runner was idle: %s", name, msg), true)
	}
	p.log.Info("runner VM ended", "vm", name, "reason", ex.Reason, "stop_reason", reason)
	p.endRunner(r)
}

// endRunner deregisters the runner if GitHub still has it, removes its
// VM and forgets it. A runner that cannot be deregistered now becomes an
// orphan, retried on every resync until GitHub lets it go.
func (p *pool) endRunner(r *runner) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	p.mu.Lock()
	rec, m, done := r.rec, r.machine, r.deregistered
	p.mu.Unlock()
	var err error
	if !done {
		err = p.m.deregister(ctx, rec)
	}
	if m != nil {
		if rerr := m.Remove(ctx); rerr != nil {
			p.log.Warn("remove runner VM", "vm", rec.Name, "error", rerr)
		}
	}
	p.mu.Lock()
	delete(p.runners, rec.Name)
	if err != nil {
		p.log.Warn("deregistration failed; will retry", "vm", rec.Name, "runner_id", rec.RunnerID, "error", err)
		r.rec.State = StateEnded
		p.orphans[rec.Name] = r.rec
		p.persistLocked(r)
	} else if derr := p.m.store.deleteRunner(rec.Pool, rec.Name); derr != nil {
		p.log.Error("forget runner", "vm", rec.Name, "error", derr)
	}
	p.mu.Unlock()
	p.kick()
}

// forget drops a runner that never registered.
func (p *pool) forget(r *runner) {
	p.mu.Lock()
	delete(p.runners, r.rec.Name)
	p.mu.Unlock()
	if err := p.m.store.deleteRunner(r.rec.Pool, r.rec.Name); err != nil {
		p.log.Error("forget runner", "vm", r.rec.Name, "error", err)
	}
	p.kick()
}

// sweepOrphans retries the deregistration of ended runners.
func (p *pool) sweepOrphans(ctx context.Context) {
	p.mu.Lock()
	recs := make([]record, 0, len(p.orphans))
	for _, rec := range p.orphans {
		recs = append(recs, rec)
	}
	p.mu.Unlock()
	for _, rec := range recs {
		if err := p.m.deregister(ctx, rec); err != nil {
			p.log.Debug("orphan still registered", "vm", rec.Name, "runner_id", rec.RunnerID, "error", err)
			continue
		}
		p.mu.Lock()
		delete(p.orphans, rec.Name)
		p.mu.Unlock()
		if err := p.m.store.deleteRunner(rec.Pool, rec.Name); err != nil {
			p.log.Error("forget runner", "vm", rec.Name, "error", err)
		}
	}
}
