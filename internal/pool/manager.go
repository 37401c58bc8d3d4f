package pool

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sort"
	"sync"
	"time"

	"github.com/fireactions/fireactions/internal/agent"
	"github.com/fireactions/fireactions/internal/config"
	"github.com/fireactions/fireactions/internal/github"
	"github.com/fireactions/fireactions/internal/registrycache"
)

// ErrNotFound is returned for an unknown pool or VM.
var ErrNotFound = errors.New("not found")

// Backoff bounds the wait after repeated failures of a pool.
type Backoff struct {
	// Initial is the first wait; each further failure doubles it. Default 5s.
	Initial time.Duration
	// Max caps the wait. Default 5m.
	Max time.Duration
}

// Options configure a Manager.
type Options struct {
	// Config is the daemon's validated configuration.
	Config  *config.Config
	GitHub  GitHub
	Runtime Runtime
	// StateDir holds the pools' state (<data-dir>/pools).
	StateDir string
	Logger   *slog.Logger
	Observer Observer
	// RegistryCache is what every VM is told about the registry cache,
	// nil when it is off.
	RegistryCache *registrycache.GuestConfig
	// AgentArgs is the process of app-mode VMs; default agent.GuestArgs.
	AgentArgs []string
	Backoff   Backoff
	// Resync is the period of the full reconcile pass that also retries
	// deregistrations. Default 30s.
	Resync time.Duration
	// StopGrace bounds each VM stop. Default 30s.
	StopGrace time.Duration
	// SessionRetry is the wait before a failed scale set session is opened
	// again. Default 10s.
	SessionRetry time.Duration
	// Session tunes the scale set message sessions.
	Session github.SessionOptions
}

// Manager runs every pool of the configuration.
type Manager struct {
	opts  Options
	log   *slog.Logger
	gh    GitHub
	rt    Runtime
	obs   Observer
	store *store

	pools []*pool
	byNam map[string]*pool

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu sync.Mutex
	// retired holds records of runners of pools no longer configured
	// whose deregistration failed so far.
	retired map[string]record
	started bool
	closed  bool
}

// New checks the options and builds the pools; Start runs them.
func New(opts Options) (*Manager, error) {
	if opts.Config == nil || opts.GitHub == nil || opts.Runtime == nil || opts.StateDir == "" {
		return nil, errors.New("pool: Config, GitHub, Runtime and StateDir are required")
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.Observer == nil {
		opts.Observer = nopObserver{}
	}
	if opts.AgentArgs == nil {
		opts.AgentArgs = agent.GuestArgs
	}
	if opts.Backoff.Initial <= 0 {
		opts.Backoff.Initial = 5 * time.Second
	}
	if opts.Backoff.Max <= 0 {
		opts.Backoff.Max = 5 * time.Minute
	}
	opts.Backoff.Max = max(opts.Backoff.Max, opts.Backoff.Initial)
	if opts.Resync <= 0 {
		opts.Resync = 30 * time.Second
	}
	if opts.StopGrace <= 0 {
		opts.StopGrace = 30 * time.Second
	}
	if opts.SessionRetry <= 0 {
		opts.SessionRetry = 10 * time.Second
	}
	st, err := newStore(opts.StateDir)
	if err != nil {
		return nil, err
	}
	m := &Manager{
		opts: opts, log: opts.Logger.With("component", "pool"), gh: opts.GitHub, rt: opts.Runtime,
		obs: opts.Observer, store: st, byNam: map[string]*pool{}, retired: map[string]record{},
	}
	m.ctx, m.cancel = context.WithCancel(context.Background())
	for _, pc := range opts.Config.Pools {
		if pc.Runner.Enterprise != "" && opts.Config.GitHub.TokenFile == "" {
			return nil, fmt.Errorf("pool %s: enterprise runners need a personal access token (classic) with the manage_runners:enterprise scope; set github.token_file (GitHub Apps cannot manage them)", pc.Name)
		}
		over, err := st.loadPool(pc.Name)
		if err != nil {
			return nil, err
		}
		p, err := newPool(m, pc, over)
		if err != nil {
			return nil, err
		}
		m.pools = append(m.pools, p)
		m.byNam[pc.Name] = p
	}
	return m, nil
}

// Start recovers what an earlier daemon left and starts every pool's
// loop. VMs that still run are adopted, dead ones were cleaned up by the
// runtime, and every runner this daemon registered that no live VM backs
// is deregistered (now, or retried until GitHub lets it go).
func (m *Manager) Start(ctx context.Context) error {
	m.mu.Lock()
	if m.started {
		m.mu.Unlock()
		return errors.New("pool: already started")
	}
	m.started = true
	m.mu.Unlock()
	if err := m.recover(ctx); err != nil {
		return err
	}
	for _, p := range m.pools {
		pctx, cancel := context.WithCancel(m.ctx)
		p.ctx, p.cancel = pctx, cancel
		var loops sync.WaitGroup
		loops.Add(1)
		m.wg.Add(1)
		go func() {
			defer m.wg.Done()
			defer loops.Done()
			p.run(pctx)
		}()
		if p.cfg.Scaling == config.ScalingScaleSet {
			loops.Add(1)
			m.wg.Add(1)
			go func() {
				defer m.wg.Done()
				defer loops.Done()
				p.runSession(pctx)
			}()
		}
		go func() {
			loops.Wait()
			close(p.doneC)
		}()
		p.mu.Lock()
		for _, r := range p.runners {
			m.wg.Add(1)
			go func() {
				defer m.wg.Done()
				p.watch(pctx, r)
			}()
		}
		p.mu.Unlock()
		p.kick()
	}
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		t := time.NewTicker(m.opts.Resync)
		defer t.Stop()
		for {
			select {
			case <-m.ctx.Done():
				return
			case <-t.C:
				m.sweepRetired(m.ctx)
			}
		}
	}()
	return nil
}

func (m *Manager) recover(ctx context.Context) error {
	recs, rerr := m.store.runners()
	if rerr != nil {
		m.log.Error("some runner records are unreadable; their runners may stay registered", "error", rerr)
	}
	machines, err := m.rt.Recover(ctx)
	if err != nil {
		return fmt.Errorf("recover runner VMs: %w", err)
	}
	live := map[string]Machine{}
	for _, mc := range machines {
		if mc.Labels()[LabelPool] == "" {
			continue
		}
		live[mc.ID()] = mc
	}
	adopted, cleaned := 0, 0
	for _, rec := range recs {
		p := m.byNam[rec.Pool]
		mc := live[rec.Name]
		delete(live, rec.Name)
		if p != nil && mc != nil && rec.State.active() && rec.RunnerID != 0 {
			r := newRunner(rec)
			r.machine = mc
			if r.rec.State == StateStarting || r.rec.State == StateRegistering {
				r.rec.State = StateBooting
			}
			p.runners[rec.Name] = r
			adopted++
			m.log.Info("adopted runner VM", "pool", rec.Pool, "vm", rec.Name, "state", r.rec.State)
			continue
		}
		if mc != nil {
			m.removeMachine(ctx, mc, "its runner is no longer wanted")
		}
		cleaned++
		rec.State = StateEnded
		if p != nil {
			p.orphans[rec.Name] = rec
		} else {
			m.retired[rec.Name] = rec
		}
	}
	for _, mc := range live {
		m.log.Warn("runner VM without a record; removing it", "vm", mc.ID(), "pool", mc.Labels()[LabelPool])
		m.removeMachine(ctx, mc, "no record")
	}
	m.log.Info("recovered pool state", "adopted", adopted, "to_deregister", cleaned)
	for _, p := range m.pools {
		p.sweepOrphans(ctx)
	}
	m.sweepRetired(ctx)
	return nil
}

func (m *Manager) removeMachine(ctx context.Context, mc Machine, why string) {
	m.log.Info("removing runner VM", "vm", mc.ID(), "why", why)
	if err := mc.Remove(ctx); err != nil {
		m.log.Warn("remove runner VM", "vm", mc.ID(), "error", err)
	}
}

func (m *Manager) sweepRetired(ctx context.Context) {
	m.mu.Lock()
	recs := make([]record, 0, len(m.retired))
	for _, r := range m.retired {
		recs = append(recs, r)
	}
	m.mu.Unlock()
	for _, rec := range recs {
		if err := m.deregister(ctx, rec); err != nil {
			m.log.Debug("runner of a removed pool still registered", "vm", rec.Name, "error", err)
			continue
		}
		m.mu.Lock()
		delete(m.retired, rec.Name)
		m.mu.Unlock()
		if err := m.store.deleteRunner(rec.Pool, rec.Name); err != nil {
			m.log.Error("forget runner", "vm", rec.Name, "error", err)
		}
	}
}

// deregister removes a runner from GitHub. A record without a runner id
// (the registration's answer never arrived) is resolved by name. A runner
// GitHub no longer has is not an error.
func (m *Manager) deregister(ctx context.Context, rec record) error {
	id := rec.RunnerID
	if id == 0 {
		r, err := m.gh.RunnerByName(ctx, rec.scope(), rec.Name)
		if errors.Is(err, github.ErrNotFound) {
			return nil
		}
		if err != nil {
			return err
		}
		id = r.ID
	}
	return m.gh.DeleteRunner(ctx, rec.scope(), id)
}

// Drain stops taking work and ends every runner: idle and booting ones at
// once (deregistered first), busy ones when their job ends, and whatever
// still runs when ctx ends (the one drain deadline for all pools) is
// stopped and deregistered. Then the pools stop.
func (m *Manager) Drain(ctx context.Context) error {
	m.log.Info("draining: no new runners; waiting for busy runners")
	for _, p := range m.pools {
		p.beginDrain()
	}
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	remaining := func() int {
		n := 0
		for _, p := range m.pools {
			p.mu.Lock()
			n += len(p.runners)
			p.mu.Unlock()
		}
		return n
	}
	var err error
wait:
	for remaining() > 0 {
		select {
		case <-tick.C:
		case <-ctx.Done():
			err = fmt.Errorf("drain deadline passed with %d runners left; stopping them", remaining())
			m.log.Warn(err.Error())
			break wait
		}
	}
	if err != nil {
		for _, p := range m.pools {
			p.mu.Lock()
			for _, r := range p.runners {
				p.requestStopLocked(r, stopRequest{reason: "drain_timeout"})
			}
			p.mu.Unlock()
		}
		// Stopping takes at most StopGrace; deregistration a little more.
		stopCtx, cancel := context.WithTimeout(context.Background(), m.opts.StopGrace+time.Minute)
		defer cancel()
		for remaining() > 0 && stopCtx.Err() == nil {
			select {
			case <-tick.C:
			case <-stopCtx.Done():
			}
		}
	}
	for _, p := range m.pools {
		p.sweepOrphans(context.WithoutCancel(ctx))
	}
	m.Close()
	m.log.Info("drained")
	return err
}

// Close stops the pools' loops and session without touching VMs or
// registrations: a daemon started later adopts them.
func (m *Manager) Close() {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return
	}
	m.closed = true
	m.mu.Unlock()
	m.cancel()
	m.wg.Wait()
}

func (m *Manager) pool(name string) (*pool, error) {
	p := m.byNam[name]
	if p == nil {
		return nil, fmt.Errorf("pool %q: %w", name, ErrNotFound)
	}
	return p, nil
}

// Pools returns the status of every pool, in configuration order.
func (m *Manager) Pools() []Status {
	out := make([]Status, 0, len(m.pools))
	for _, p := range m.pools {
		out = append(out, p.status())
	}
	return out
}

// Pool returns one pool's status.
func (m *Manager) Pool(name string) (Status, error) {
	p, err := m.pool(name)
	if err != nil {
		return Status{}, err
	}
	return p.status(), nil
}

// ErrInvalid is returned for a scale request that makes no sense.
var ErrInvalid = errors.New("invalid request")

// Scale changes a pool's minimum and/or maximum at run time; nil leaves a
// value as it is. The change is persisted and survives restarts.
func (m *Manager) Scale(name string, minRunners, maxRunners *int) (Status, error) {
	p, err := m.pool(name)
	if err != nil {
		return Status{}, err
	}
	p.mu.Lock()
	lo, hi := p.limitsLocked()
	if minRunners != nil {
		lo = *minRunners
	}
	if maxRunners != nil {
		hi = *maxRunners
	}
	switch {
	case lo < 0:
		p.mu.Unlock()
		return Status{}, fmt.Errorf("min_runners %d is negative: %w", lo, ErrInvalid)
	case hi < 1:
		p.mu.Unlock()
		return Status{}, fmt.Errorf("max_runners %d: want at least 1: %w", hi, ErrInvalid)
	case lo > hi:
		p.mu.Unlock()
		return Status{}, fmt.Errorf("min_runners %d is more than max_runners %d: %w", lo, hi, ErrInvalid)
	}
	over := p.over
	over.Min, over.Max = &lo, &hi
	if err := m.store.savePool(name, over); err != nil {
		p.mu.Unlock()
		return Status{}, err
	}
	p.over = over
	if p.sess != nil && !p.over.Paused {
		p.sess.SetMaxCapacity(hi)
	}
	p.mu.Unlock()
	p.log.Info("pool scaled", "min_runners", lo, "max_runners", hi)
	p.kick()
	return p.status(), nil
}

// Pause stops a pool from starting runners (and, in scale-set mode, from
// taking jobs); its runners live on until they end. Resume undoes it.
func (m *Manager) Pause(name string) (Status, error) { return m.setPaused(name, true) }

// Resume lets a paused pool start runners again.
func (m *Manager) Resume(name string) (Status, error) { return m.setPaused(name, false) }

func (m *Manager) setPaused(name string, paused bool) (Status, error) {
	p, err := m.pool(name)
	if err != nil {
		return Status{}, err
	}
	p.mu.Lock()
	over := p.over
	over.Paused = paused
	if err := m.store.savePool(name, over); err != nil {
		p.mu.Unlock()
		return Status{}, err
	}
	p.over = over
	if p.sess != nil {
		if paused {
			p.sess.SetMaxCapacity(0)
		} else {
			_, hi := p.limitsLocked()
			p.sess.SetMaxCapacity(hi)
		}
	}
	p.mu.Unlock()
	p.log.Info("pool paused", "paused", paused)
	p.kick()
	return p.status(), nil
}

// VMs lists every runner VM of every pool, by pool then creation.
func (m *Manager) VMs() []VMStatus {
	var out []VMStatus
	for _, p := range m.pools {
		vs := p.vms()
		sort.Slice(vs, func(i, j int) bool { return vs[i].Created.Before(vs[j].Created) })
		out = append(out, vs...)
	}
	return out
}

func (m *Manager) find(id string) (*pool, *runner, error) {
	for _, p := range m.pools {
		p.mu.Lock()
		r := p.runners[id]
		p.mu.Unlock()
		if r != nil {
			return p, r, nil
		}
	}
	return nil, nil, fmt.Errorf("vm %q: %w", id, ErrNotFound)
}

// VM returns one runner VM's status.
func (m *Manager) VM(id string) (VMStatus, error) {
	p, r, err := m.find(id)
	if err != nil {
		return VMStatus{}, err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return r.statusLocked(), nil
}

// StopVM stops a runner VM now, busy or not, and deregisters its runner;
// the pool replaces it if it still wants one.
func (m *Manager) StopVM(id string) (VMStatus, error) {
	p, r, err := m.find(id)
	if err != nil {
		return VMStatus{}, err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.requestStopLocked(r, stopRequest{reason: "api"})
	return r.statusLocked(), nil
}

// Logs copies a runner VM's output (console, runner) to w.
func (m *Manager) Logs(ctx context.Context, id string, follow bool, w io.Writer) error {
	p, r, err := m.find(id)
	if err != nil {
		return err
	}
	p.mu.Lock()
	mc := r.machine
	p.mu.Unlock()
	if mc == nil {
		return fmt.Errorf("vm %q has not started yet", id)
	}
	return mc.Logs(ctx, follow, w)
}

// HandleWorkflowJob feeds a verified workflow_job webhook to the pools in
// labels mode whose scope and labels it matches.
func (m *Manager) HandleWorkflowJob(_ context.Context, e github.WorkflowJobEvent) error {
	for _, p := range m.pools {
		p.onWebhook(e)
	}
	return nil
}

func (p *pool) beginDrain() {
	p.mu.Lock()
	p.draining = true
	for _, r := range p.runners {
		if r.rec.State != StateBusy {
			p.requestStopLocked(r, stopRequest{reason: "drain", deregisterFirst: true})
		}
	}
	p.mu.Unlock()
	p.stopSession()
}
