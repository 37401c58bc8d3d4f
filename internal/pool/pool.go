package pool

import (
	"context"
	"crypto/rand"
	"fmt"
	"log/slog"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/fireactions/fireactions/internal/config"
	"github.com/fireactions/fireactions/internal/github"
)

// State is where a runner is in its life.
type State string

const (
	// StateRegistering: the runner's JIT configuration is being requested.
	StateRegistering State = "registering"
	// StateStarting: the VM start was requested.
	StateStarting State = "starting"
	// StateBooting: the VM runs; its runner has not reported idle yet.
	StateBooting State = "booting"
	// StateIdle: the runner listens for a job.
	StateIdle State = "idle"
	// StateBusy: the runner runs its job.
	StateBusy State = "busy"
	// StateStopping: the VM is being stopped.
	StateStopping State = "stopping"
	// StateEnded: the VM is gone but GitHub may still have the runner;
	// deregistration is retried until it succeeds.
	StateEnded State = "ended"
)

// active reports whether a runner counts towards the pool's size.
func (s State) active() bool {
	switch s {
	case StateRegistering, StateStarting, StateBooting, StateIdle, StateBusy:
		return true
	}
	return false
}

// Failure is the last thing that went wrong in a pool.
type Failure struct {
	Reason  string    `json:"reason"`
	Message string    `json:"message"`
	At      time.Time `json:"at"`
}

// Status is a pool as the API shows it.
type Status struct {
	Name    string         `json:"name"`
	Scaling config.Scaling `json:"scaling"`
	Scope   string         `json:"scope"`
	Labels  []string       `json:"labels"`
	// MinRunners and MaxRunners are in effect: the configured values or
	// what the API set.
	MinRunners int  `json:"min_runners"`
	MaxRunners int  `json:"max_runners"`
	Paused     bool `json:"paused"`
	Draining   bool `json:"draining"`
	// Desired is the size the pool works towards.
	Desired  int `json:"desired"`
	Current  int `json:"current"`
	Starting int `json:"starting"`
	Idle     int `json:"idle"`
	Busy     int `json:"busy"`
	// Stopping counts VMs being stopped; Orphans runners whose VM is gone
	// while GitHub still has them (deregistration is retried).
	Stopping int `json:"stopping"`
	Orphans  int `json:"orphans"`
	// JobsInFlight is the demand: TotalAssignedJobs (scale set) or the
	// queued and running jobs seen through webhooks (labels).
	JobsInFlight int                `json:"jobs_in_flight"`
	Statistics   *github.Statistics `json:"statistics,omitempty"`
	ScaleSetID   int                `json:"scale_set_id,omitempty"`
	// SessionError is why the scale set session is down, if it is.
	SessionError string `json:"session_error,omitempty"`
	// Failures counts consecutive failures; new VMs wait until
	// BackoffUntil.
	Failures     int       `json:"failures"`
	BackoffUntil time.Time `json:"backoff_until,omitzero"`
	LastFailure  *Failure  `json:"last_failure,omitempty"`
}

// VMStatus is a runner VM as the API shows it.
type VMStatus struct {
	ID       string    `json:"id"`
	Pool     string    `json:"pool"`
	RunnerID int64     `json:"runner_id,omitempty"`
	State    State     `json:"state"`
	Created  time.Time `json:"created"`
	Started  time.Time `json:"started,omitzero"`
	IdleAt   time.Time `json:"idle_at,omitzero"`
	BusyAt   time.Time `json:"busy_at,omitzero"`
	// StopReason says why the VM is being stopped.
	StopReason string `json:"stop_reason,omitempty"`
	Exit       *Exit  `json:"exit,omitempty"`
}

// pool is one configured pool and its reconcile loop.
type pool struct {
	m     *Manager
	cfg   config.Pool
	scope github.Scope
	log   *slog.Logger
	kickC chan struct{}
	doneC chan struct{} // closed when the pool's loops have returned
	// ctx lives as long as the pool: runners' goroutines run under it,
	// whichever loop launched them.
	ctx    context.Context
	cancel context.CancelFunc

	// reconcileMu serializes reconcile passes, so that the session loop's
	// synchronous pass and the loop's own never interleave.
	reconcileMu sync.Mutex

	mu           sync.Mutex
	runners      map[string]*runner
	orphans      map[string]record
	over         poolState
	draining     bool
	set          *github.ScaleSet
	sess         *github.Session
	stats        *github.Statistics
	sessionErr   string
	jobs         map[int64]*webhookJob
	failures     int
	backoffUntil time.Time
	lastFailure  *Failure
	desired      int
	backoffTimer *time.Timer
	sessCancel   context.CancelFunc
}

func newPool(m *Manager, cfg config.Pool, over poolState) (*pool, error) {
	scope, err := github.ScopeOf(cfg.Runner)
	if err != nil {
		return nil, fmt.Errorf("pool %s: %w", cfg.Name, err)
	}
	return &pool{
		m: m, cfg: cfg, scope: scope,
		log:     m.log.With("pool", cfg.Name),
		kickC:   make(chan struct{}, 1),
		doneC:   make(chan struct{}),
		runners: map[string]*runner{},
		orphans: map[string]record{},
		over:    over,
		jobs:    map[int64]*webhookJob{},
	}, nil
}

// kick asks the loop for a reconcile pass soon.
func (p *pool) kick() {
	select {
	case p.kickC <- struct{}{}:
	default:
	}
}

// limitsLocked returns min and max in effect.
func (p *pool) limitsLocked() (int, int) {
	lo, hi := p.cfg.MinRunners, p.cfg.MaxRunners
	if p.over.Min != nil {
		lo = *p.over.Min
	}
	if p.over.Max != nil {
		hi = *p.over.Max
	}
	return lo, hi
}

// inFlightLocked is the demand the pool serves on top of its warm minimum.
func (p *pool) inFlightLocked() int {
	if p.cfg.Scaling == config.ScalingScaleSet {
		if p.stats == nil {
			return 0
		}
		return p.stats.TotalAssignedJobs
	}
	busy := 0
	for _, r := range p.runners {
		if r.rec.State == StateBusy {
			busy++
		}
	}
	return max(len(p.jobs), busy)
}

// desiredLocked applies actions-runner-controller's rule:
// min(max, min + jobs in flight).
func (p *pool) desiredLocked() int {
	lo, hi := p.limitsLocked()
	return min(hi, lo+p.inFlightLocked())
}

// run is the pool's loop: a reconcile pass whenever something changed,
// and a periodic one that also retries deregistrations.
func (p *pool) run(ctx context.Context) {
	t := time.NewTicker(p.m.opts.Resync)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-p.kickC:
		case <-t.C:
			p.sweepOrphans(ctx)
		}
		p.reconcile(ctx)
	}
}

// reconcile compares the pool's runners with what it wants and acts: it
// requests new runners (each started by a goroutine of its own, so a pass
// never waits for GitHub or a VMM) and stops idle runners beyond the
// desired size. Busy runners are never stopped to scale down.
func (p *pool) reconcile(ctx context.Context) {
	p.reconcileMu.Lock()
	defer p.reconcileMu.Unlock()
	p.mu.Lock()
	defer p.mu.Unlock()
	if ctx.Err() != nil {
		return
	}
	desired := p.desiredLocked()
	p.desired = desired
	if p.draining {
		return
	}
	active, total := 0, len(p.runners)
	for _, r := range p.runners {
		if r.rec.State.active() {
			active++
		}
	}
	_, hi := p.limitsLocked()
	now := time.Now()
	canLaunch := !p.over.Paused && (p.cfg.Scaling != config.ScalingScaleSet || p.set != nil)
	if canLaunch && active < desired {
		if now.Before(p.backoffUntil) {
			p.armBackoffLocked()
		} else {
			n := min(desired-active, hi-total)
			if p.failures > 0 {
				// After a failure, one runner probes before the pool grows
				// again at full speed.
				n = min(n, 1)
			}
			for range max(0, n) {
				p.launchLocked(p.ctx)
			}
		}
	}
	if active > desired {
		p.scaleDownLocked(active - desired)
	}
}

// scaleDownLocked stops up to n idle runners, longest idle first.
func (p *pool) scaleDownLocked(n int) {
	var idle []*runner
	for _, r := range p.runners {
		if r.rec.State == StateIdle {
			idle = append(idle, r)
		}
	}
	sort.Slice(idle, func(i, j int) bool { return idle[i].rec.IdleAt.Before(idle[j].rec.IdleAt) })
	for _, r := range idle[:min(n, len(idle))] {
		p.log.Info("scaling down: stopping an idle runner", "vm", r.rec.Name)
		p.requestStopLocked(r, stopRequest{reason: "scale_down", deregisterFirst: true})
	}
}

// armBackoffLocked makes sure a pass runs when the backoff ends.
func (p *pool) armBackoffLocked() {
	if p.backoffTimer != nil {
		return
	}
	p.backoffTimer = time.AfterFunc(time.Until(p.backoffUntil), func() {
		p.mu.Lock()
		p.backoffTimer = nil
		p.mu.Unlock()
		p.kick()
	})
}

// fail records a failure; with backoff it delays the pool's next VMs
// exponentially (Backoff.Initial doubling to Backoff.Max).
func (p *pool) fail(reason string, err error, backoff bool) {
	msg := err.Error()
	p.m.obs.RunnerFailed(p.cfg.Name, reason, msg)
	p.mu.Lock()
	defer p.mu.Unlock()
	p.lastFailure = &Failure{Reason: reason, Message: msg, At: time.Now()}
	if !backoff {
		return
	}
	p.failures++
	d := p.m.opts.Backoff.Initial
	for i := 1; i < p.failures && d < p.m.opts.Backoff.Max; i++ {
		d *= 2
	}
	d = min(d, p.m.opts.Backoff.Max)
	p.backoffUntil = time.Now().Add(d)
	p.log.Warn("runner failed; backing off", "reason", reason, "error", msg, "failures", p.failures, "retry_in", d)
}

// succeeded ends a run of failures: a runner reached idle.
func (p *pool) succeeded() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.failures > 0 {
		p.log.Info("runner reached idle; backoff cleared", "after_failures", p.failures)
	}
	p.failures = 0
	p.backoffUntil = time.Time{}
}

// newRunnerName returns prefix-xxxxxxxx, unique enough across pools and
// restarts, valid as a runner name, a VM id and a host name.
func newRunnerName(prefix string) string {
	const alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
	b := make([]byte, 8)
	rand.Read(b)
	for i := range b {
		b[i] = alphabet[int(b[i])%len(alphabet)]
	}
	return prefix + "-" + string(b)
}

func (p *pool) status() Status {
	p.mu.Lock()
	defer p.mu.Unlock()
	lo, hi := p.limitsLocked()
	st := Status{
		Name: p.cfg.Name, Scaling: p.cfg.Scaling, Scope: p.scope.String(), Labels: slices.Clone(p.cfg.Runner.Labels),
		MinRunners: lo, MaxRunners: hi, Paused: p.over.Paused, Draining: p.draining,
		Desired: p.desiredLocked(), JobsInFlight: p.inFlightLocked(), SessionError: p.sessionErr,
		Failures: p.failures, Orphans: len(p.orphans),
	}
	if p.draining {
		st.Desired = 0
	}
	if p.backoffUntil.After(time.Now()) {
		st.BackoffUntil = p.backoffUntil
	}
	if p.lastFailure != nil {
		f := *p.lastFailure
		st.LastFailure = &f
	}
	if p.stats != nil {
		s := *p.stats
		st.Statistics = &s
	}
	if p.set != nil {
		st.ScaleSetID = p.set.ID
	}
	for _, r := range p.runners {
		switch r.rec.State {
		case StateRegistering, StateStarting, StateBooting:
			st.Starting++
		case StateIdle:
			st.Idle++
		case StateBusy:
			st.Busy++
		case StateStopping:
			st.Stopping++
		}
		if r.rec.State.active() {
			st.Current++
		}
	}
	return st
}

func (p *pool) vms() []VMStatus {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]VMStatus, 0, len(p.runners))
	for _, r := range p.runners {
		out = append(out, r.statusLocked())
	}
	return out
}

// runnerByName finds a runner of this pool by its (case-insensitive)
// name, as GitHub reports it in job messages and webhooks.
func (p *pool) runnerByNameLocked(name string) *runner {
	if r := p.runners[name]; r != nil {
		return r
	}
	for n, r := range p.runners {
		if strings.EqualFold(n, name) {
			return r
		}
	}
	return nil
}
