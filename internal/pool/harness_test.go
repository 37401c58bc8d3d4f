package pool

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fireactions/fireactions/internal/agent"
	"github.com/fireactions/fireactions/internal/config"
	"github.com/fireactions/fireactions/internal/github"
	"github.com/fireactions/fireactions/internal/github/githubtest"
)

// fakeRuntime stands in for internal/runtime: its VMs are goroutines that
// play the agent and the runner against the fake GitHub.
type fakeRuntime struct {
	t  testing.TB
	gh *githubtest.Server

	mu  sync.Mutex
	vms map[string]*fakeVM
	// startErr, when set, fails Start.
	startErr error
	// hang, when true, makes new VMs never report idle.
	hang bool
	// started counts Start calls; startedC receives each VM's id.
	started  int
	startedC chan string
}

func newFakeRuntime(t testing.TB, gh *githubtest.Server) *fakeRuntime {
	return &fakeRuntime{t: t, gh: gh, vms: map[string]*fakeVM{}, startedC: make(chan string, 1000)}
}

type fakeVM struct {
	rt     *fakeRuntime
	id     string
	labels map[string]string
	spec   VMSpec

	mu      sync.Mutex
	changed chan struct{}
	out     []byte
	exited  bool
	exit    Exit
	removed bool
	done    chan struct{}
}

func (rt *fakeRuntime) Start(ctx context.Context, spec VMSpec) (Machine, error) {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	rt.started++
	if rt.startErr != nil {
		return nil, rt.startErr
	}
	if spec.JITConfig == "" || spec.Labels[LabelPool] == "" {
		return nil, errors.New("fake runtime: spec without JIT config or pool label")
	}
	vm := &fakeVM{rt: rt, id: spec.ID, labels: spec.Labels, spec: spec, changed: make(chan struct{}), done: make(chan struct{})}
	rt.vms[spec.ID] = vm
	rt.startedC <- spec.ID
	hang := rt.hang
	go vm.boot(hang)
	return vm, nil
}

// boot plays the agent and a runner: it reads the JIT configuration,
// connects to the fake GitHub and reports idle.
func (vm *fakeVM) boot(hang bool) {
	vm.report(agent.StateStarting)
	if hang {
		return
	}
	jr, err := githubtest.DecodeJITConfig(vm.spec.JITConfig.Reveal())
	if err != nil || jr.Name != vm.id {
		vm.finish(Exit{Reason: "workload-exit", Code: 1, Message: fmt.Sprintf("bad JIT config: %v %+v", err, jr)})
		return
	}
	if err := vm.rt.gh.ConnectRunner(jr.Name); err != nil {
		vm.finish(Exit{Reason: "workload-exit", Code: 1, Message: err.Error()})
		return
	}
	vm.report(agent.StateIdle)
}

func (vm *fakeVM) report(s agent.State) {
	vm.write(agent.Report{State: s, Runner: vm.id, Time: time.Now()}.Line())
}

func (vm *fakeVM) write(b []byte) {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if vm.exited {
		return
	}
	vm.out = append(vm.out, b...)
	close(vm.changed)
	vm.changed = make(chan struct{})
}

// finish ends the VM (the guest powered off, crashed, or was stopped).
func (vm *fakeVM) finish(ex Exit) {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if vm.exited {
		return
	}
	vm.exited, vm.exit = true, ex
	close(vm.changed)
	vm.changed = make(chan struct{})
	close(vm.done)
}

func (vm *fakeVM) ID() string                { return vm.id }
func (vm *fakeVM) Labels() map[string]string { return vm.labels }

func (vm *fakeVM) FollowStdout(ctx context.Context, w io.Writer) error {
	off := 0
	for {
		vm.mu.Lock()
		chunk := vm.out[off:]
		off = len(vm.out)
		exited, ch := vm.exited, vm.changed
		vm.mu.Unlock()
		if len(chunk) > 0 {
			if _, err := w.Write(chunk); err != nil {
				return err
			}
		}
		if exited {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func (vm *fakeVM) Logs(ctx context.Context, follow bool, w io.Writer) error {
	vm.mu.Lock()
	out := bytes.Clone(vm.out)
	vm.mu.Unlock()
	_, err := w.Write(out)
	return err
}

func (vm *fakeVM) Wait(ctx context.Context) (Exit, error) {
	select {
	case <-vm.done:
		vm.mu.Lock()
		defer vm.mu.Unlock()
		return vm.exit, nil
	case <-ctx.Done():
		return Exit{}, ctx.Err()
	}
}

func (vm *fakeVM) Stop(ctx context.Context, grace time.Duration) error {
	vm.finish(Exit{Reason: "stopped", Code: 143})
	return nil
}

func (vm *fakeVM) Remove(ctx context.Context) error {
	vm.finish(Exit{Reason: "stopped", Code: 137})
	vm.rt.mu.Lock()
	defer vm.rt.mu.Unlock()
	vm.mu.Lock()
	vm.removed = true
	vm.mu.Unlock()
	delete(vm.rt.vms, vm.id)
	return nil
}

// Recover returns the live VMs and removes the ended ones, as the real
// runtime does.
func (rt *fakeRuntime) Recover(ctx context.Context) ([]Machine, error) {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	var out []Machine
	for id, vm := range rt.vms {
		vm.mu.Lock()
		exited := vm.exited
		vm.mu.Unlock()
		if exited {
			delete(rt.vms, id)
			continue
		}
		out = append(out, vm)
	}
	return out, nil
}

func (rt *fakeRuntime) live() []*fakeVM {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	var out []*fakeVM
	for _, vm := range rt.vms {
		vm.mu.Lock()
		exited := vm.exited
		vm.mu.Unlock()
		if !exited {
			out = append(out, vm)
		}
	}
	return out
}

func (rt *fakeRuntime) vm(id string) *fakeVM {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	return rt.vms[id]
}

// syncBuffer is a log sink safe for concurrent writers.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// recorder is an Observer that remembers what it saw.
type recorder struct {
	mu       sync.Mutex
	created  int
	failures map[string]int
	messages []string
	boots    int
	jobs     int
}

func (r *recorder) RunnerCreated(string) { r.mu.Lock(); r.created++; r.mu.Unlock() }
func (r *recorder) RunnerFailed(_, reason, msg string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.failures == nil {
		r.failures = map[string]int{}
	}
	r.failures[reason]++
	r.messages = append(r.messages, msg)
}
func (r *recorder) BootToIdle(string, time.Duration)  { r.mu.Lock(); r.boots++; r.mu.Unlock() }
func (r *recorder) JobDuration(string, time.Duration) { r.mu.Lock(); r.jobs++; r.mu.Unlock() }
func (r *recorder) bootCount() int                    { r.mu.Lock(); defer r.mu.Unlock(); return r.boots }

func (vm *fakeVM) exitReason() string { vm.mu.Lock(); defer vm.mu.Unlock(); return vm.exit.Reason }

func (rt *fakeRuntime) startCount() int { rt.mu.Lock(); defer rt.mu.Unlock(); return rt.started }

func (r *recorder) failed(reason string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.failures[reason]
}

// env is one test's world: a fake GitHub, a fake runtime, a state
// directory and a manager.
type env struct {
	t     testing.TB
	gh    *githubtest.Server
	rt    *fakeRuntime
	cfg   *config.Config
	dir   string
	logs  *syncBuffer
	obs   *recorder
	m     *Manager
	tweak func(*Options)
}

func testPool(name string, scaling config.Scaling, minR, maxR int) config.Pool {
	p := config.Pool{
		Name: name, Scaling: scaling, MinRunners: minR, MaxRunners: maxR,
		Runner: config.Runner{Organization: "acme"},
		Timeouts: config.Timeouts{
			Boot: config.Duration(30 * time.Second), MaxJob: config.Duration(time.Hour),
		},
	}
	p.Runner.NamePrefix = name
	return p
}

func newEnv(t testing.TB, pools ...config.Pool) *env {
	t.Helper()
	key, pem, err := githubtest.AppKey()
	if err != nil {
		t.Fatal(err)
	}
	gh := githubtest.New(t, &key.PublicKey, func(o *githubtest.Options) { o.LongPoll = 300 * time.Millisecond })
	gh.InstallOrg("acme")
	cfg := &config.Config{
		GitHub: config.GitHub{AppID: gh.AppID(), PrivateKey: config.Secret(pem), APIURL: gh.APIURL()},
		Pools:  pools,
	}
	cfg.ApplyDefaults()
	e := &env{t: t, gh: gh, rt: newFakeRuntime(t, gh), cfg: cfg, dir: t.TempDir(), logs: &syncBuffer{}, obs: &recorder{}}
	t.Cleanup(func() {
		if e.m != nil {
			e.m.Close()
		}
		e.checkSecrets()
	})
	return e
}

func (e *env) logger() *slog.Logger {
	return slog.New(slog.NewTextHandler(e.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

func (e *env) client() *github.Client {
	c, err := github.New(e.cfg.GitHub, github.WithLogger(e.logger()),
		github.WithRetryPolicy(github.RetryPolicy{MaxRetries: 1, BaseDelay: 10 * time.Millisecond, MaxDelay: 20 * time.Millisecond,
			MaxRateLimitWait: 50 * time.Millisecond}))
	if err != nil {
		e.t.Fatal(err)
	}
	return c
}

func (e *env) options() Options {
	o := Options{
		Config: e.cfg, GitHub: e.client(), Runtime: e.rt, StateDir: filepath.Join(e.dir, "pools"),
		Logger: e.logger(), Observer: e.obs,
		Backoff:      Backoff{Initial: 50 * time.Millisecond, Max: 400 * time.Millisecond},
		Resync:       200 * time.Millisecond,
		StopGrace:    time.Second,
		SessionRetry: 100 * time.Millisecond,
		Session:      github.SessionOptions{ConflictWait: 100 * time.Millisecond, ConflictAttempts: 100},
	}
	if e.tweak != nil {
		e.tweak(&o)
	}
	return o
}

// start builds and starts a manager (a fresh daemon over the same state).
func (e *env) start() *Manager {
	e.t.Helper()
	m, err := New(e.options())
	if err != nil {
		e.t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := m.Start(ctx); err != nil {
		e.t.Fatal(err)
	}
	e.m = m
	return m
}

// waitFor polls cond until it holds; it fails the test after a generous
// bound (a liveness check, not a timing assertion).
func (e *env) waitFor(what string, cond func() bool) {
	e.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			e.t.Fatalf("timed out waiting for %s\npools: %+v\nvms: %+v\nGitHub runners: %+v\nlogs:\n%s",
				what, e.m.Pools(), e.m.VMs(), e.gh.Runners(), tail(e.logs.String(), 60))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func tail(s string, n int) string {
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func (e *env) status(pool string) Status {
	e.t.Helper()
	st, err := e.m.Pool(pool)
	if err != nil {
		e.t.Fatal(err)
	}
	return st
}

// inState counts a pool's VMs in a state.
func (e *env) inState(pool string, s State) int {
	n := 0
	for _, v := range e.m.VMs() {
		if v.Pool == pool && v.State == s {
			n++
		}
	}
	return n
}

func (e *env) vmsIn(pool string, s State) []VMStatus {
	var out []VMStatus
	for _, v := range e.m.VMs() {
		if v.Pool == pool && v.State == s {
			out = append(out, v)
		}
	}
	return out
}

// registered counts runners GitHub has.
func (e *env) registered() int { return len(e.gh.Runners()) }

// records lists the runner records on disk.
func (e *env) records() []string {
	paths, _ := filepath.Glob(filepath.Join(e.dir, "pools", "*", "runners", "*.json"))
	var out []string
	for _, p := range paths {
		out = append(out, strings.TrimSuffix(filepath.Base(p), ".json"))
	}
	return out
}

// noLeaks waits until every runner GitHub has is backed by a live VM of
// ours and the other way round (VMs being stopped settle first).
func (e *env) noLeaks() {
	e.t.Helper()
	e.waitFor("GitHub's runners and the live VMs to match", func() bool { return e.leak() == "" })
}

func (e *env) leak() string {
	live := map[string]bool{}
	for _, vm := range e.rt.live() {
		live[vm.id] = true
	}
	names := map[string]bool{}
	for _, r := range e.gh.Runners() {
		names[r.Name] = true
		if !live[r.Name] {
			return fmt.Sprintf("GitHub still has runner %s (%d) but no VM runs it", r.Name, r.ID)
		}
	}
	for id := range live {
		if !names[id] {
			return fmt.Sprintf("VM %s runs but GitHub has no runner for it", id)
		}
	}
	return ""
}

// checkSecrets fails the test if any credential or JIT configuration the
// fake GitHub issued appears in a log line or a state file.
func (e *env) checkSecrets() {
	logs := e.logs.String()
	var files []string
	filepath.Walk(e.dir, func(p string, info os.FileInfo, err error) error {
		if err == nil && !info.IsDir() {
			if b, err := os.ReadFile(p); err == nil {
				files = append(files, string(b))
			}
		}
		return nil
	})
	for _, s := range e.gh.Secrets() {
		if strings.Contains(logs, s) {
			e.t.Errorf("a secret issued by GitHub (%d bytes) appears in the logs", len(s))
		}
		for _, f := range files {
			if strings.Contains(f, s) {
				e.t.Errorf("a secret issued by GitHub (%d bytes) appears in a state file", len(s))
			}
		}
	}
}

// runJob queues a job on a scale-set pool and has runner vm take it: the
// agent reports busy once GitHub handed it the job.
func (e *env) startJob(pool string) (int64, *fakeVM) {
	e.t.Helper()
	e.waitFor("the scale set session", func() bool {
		for _, s := range e.gh.ScaleSets() {
			if s.Name == pool && s.Sessions == 1 {
				return true
			}
		}
		return false
	})
	id, err := e.gh.QueueJob(pool, nil)
	if err != nil {
		e.t.Fatal(err)
	}
	var taker *fakeVM
	e.waitFor("the job to be assigned and a runner idle", func() bool {
		assigned := false
		for _, j := range e.gh.Jobs() {
			if j.ID == id && j.State == githubtest.JobAssigned {
				assigned = true
			}
		}
		if !assigned {
			return false
		}
		for _, v := range e.vmsIn(pool, StateIdle) {
			if err := e.gh.StartJob(id, v.ID); err == nil {
				taker = e.rt.vm(v.ID)
				return true
			}
		}
		return false
	})
	taker.report(agent.StateBusy)
	return id, taker
}

// finishJob completes a job: GitHub removes the ephemeral runner, the agent
// reports done and the VM powers off.
func (e *env) finishJob(id int64, vm *fakeVM) {
	e.t.Helper()
	if err := e.gh.CompleteJob(id); err != nil {
		e.t.Fatal(err)
	}
	vm.report(agent.StateDone)
	vm.finish(Exit{Reason: "workload-exit"})
}
