package pool

import (
	"context"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/fireactions/fireactions/internal/agent"
	"github.com/fireactions/fireactions/internal/config"
	"github.com/fireactions/fireactions/internal/github"
	"github.com/fireactions/fireactions/internal/github/githubtest"
	"github.com/fireactions/fireactions/internal/metadata"
)

func TestScaleSetScalesOnDemand(t *testing.T) {
	e := newEnv(t, testPool("ci", config.ScalingScaleSet, 0, 3))
	e.start()
	e.waitFor("the scale set session", func() bool { s := e.gh.ScaleSets(); return len(s) == 1 && s[0].Sessions == 1 })
	if n := e.status("ci").Current; n != 0 {
		t.Fatalf("min 0 but %d runners before any job", n)
	}
	// Two jobs: two runners, each takes one.
	j1, vm1 := e.startJob("ci")
	j2, vm2 := e.startJob("ci")
	e.waitFor("two busy runners", func() bool { return e.inState("ci", StateBusy) == 2 })
	if st := e.status("ci"); st.Desired != 2 || st.JobsInFlight != 2 {
		t.Fatalf("status %+v, want desired 2 from 2 assigned jobs", st)
	}
	// Jobs end: the VMs power off and nothing replaces them.
	e.finishJob(j1, vm1)
	e.finishJob(j2, vm2)
	e.waitFor("the pool back to zero", func() bool {
		return len(e.m.VMs()) == 0 && e.status("ci").Desired == 0 && len(e.rt.live()) == 0
	})
	e.waitFor("no registrations left", func() bool { return e.registered() == 0 && len(e.records()) == 0 })
	// Capacity is respected: five jobs, three runners.
	for range 5 {
		if _, err := e.gh.QueueJob("ci", nil); err != nil {
			t.Fatal(err)
		}
	}
	e.waitFor("three runners for five jobs", func() bool { return e.status("ci").Idle == 3 })
	time.Sleep(300 * time.Millisecond) // a few more passes: still three
	if st := e.status("ci"); st.Current != 3 || len(e.rt.live()) != 3 {
		t.Fatalf("max_runners 3 but %+v", st)
	}
	e.noLeaks()
	if e.obs.bootCount() < 5 {
		t.Errorf("boot-to-idle observed %d times, want at least 5", e.obs.bootCount())
	}
}

func TestWarmMinimumKept(t *testing.T) {
	e := newEnv(t, testPool("warm", config.ScalingScaleSet, 2, 5))
	e.start()
	e.waitFor("two idle runners", func() bool { return e.status("warm").Idle == 2 })
	id, vm := e.startJob("warm")
	// One runner busy: min 2 idle beyond the job in flight.
	e.waitFor("one busy and two idle", func() bool { st := e.status("warm"); return st.Busy == 1 && st.Idle == 2 })
	if st := e.status("warm"); st.Desired != 3 {
		t.Fatalf("desired %d, want min 2 + 1 assigned job", st.Desired)
	}
	e.finishJob(id, vm)
	e.waitFor("back to two idle", func() bool {
		st := e.status("warm")
		return st.Idle == 2 && st.Current == 2 && len(e.rt.live()) == 2
	})
	e.waitFor("GitHub matches the VMs", func() bool { return e.registered() == 2 })
	e.noLeaks()
}

func TestScaleDownStopsOnlyIdleRunners(t *testing.T) {
	e := newEnv(t, testPool("p", config.ScalingScaleSet, 3, 5))
	e.start()
	e.waitFor("three idle runners", func() bool { return e.status("p").Idle == 3 })
	id, busyVM := e.startJob("p")
	e.waitFor("the busy runner replaced", func() bool { st := e.status("p"); return st.Busy == 1 && st.Idle == 3 })
	zero := 0
	if _, err := e.m.Scale("p", &zero, nil); err != nil {
		t.Fatal(err)
	}
	e.waitFor("only the busy runner left", func() bool {
		return len(e.m.VMs()) == 1 && e.inState("p", StateBusy) == 1 && len(e.rt.live()) == 1
	})
	if e.rt.live()[0] != busyVM {
		t.Fatal("scale-down stopped the busy runner")
	}
	e.waitFor("idle runners deregistered", func() bool { return e.registered() == 1 })
	// The size set at run time is persisted.
	if st := e.status("p"); st.MinRunners != 0 || st.MaxRunners != 5 {
		t.Fatalf("limits %d..%d after scale", st.MinRunners, st.MaxRunners)
	}
	e.finishJob(id, busyVM)
	e.waitFor("empty pool", func() bool { return len(e.m.VMs()) == 0 && e.registered() == 0 })

	// Bad sizes are refused.
	neg, one, two := -1, 1, 2
	if _, err := e.m.Scale("p", &neg, nil); !errors.Is(err, ErrInvalid) {
		t.Errorf("negative min: %v", err)
	}
	if _, err := e.m.Scale("p", &two, &one); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "more than max_runners") {
		t.Errorf("min over max: %v", err)
	}
	if _, err := e.m.Scale("nope", &one, nil); !errors.Is(err, ErrNotFound) {
		t.Errorf("unknown pool: %v", err)
	}
}

func TestIdleRunnerThatTookAJobIsNotStopped(t *testing.T) {
	// GitHub gives the job to the runner while the pool is about to stop
	// it: the deregistration is refused and the runner stays.
	e := newEnv(t, testPool("p", config.ScalingLabels, 1, 2))
	e.start()
	e.waitFor("an idle runner", func() bool { return e.status("p").Idle == 1 })
	v := e.vmsIn("p", StateIdle)[0]
	job, err := e.gh.QueueJob("", []string{"self-hosted", "fireactions"})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.gh.StartJob(job, v.ID); err != nil {
		t.Fatal(err)
	}
	zero := 0
	if _, err := e.m.Scale("p", &zero, nil); err != nil {
		t.Fatal(err)
	}
	e.waitFor("the runner marked busy", func() bool { return e.inState("p", StateBusy) == 1 })
	if len(e.rt.live()) != 1 {
		t.Fatal("the VM of a runner running a job was stopped")
	}
	e.finishJob(job, e.rt.vm(v.ID))
	e.waitFor("empty pool", func() bool { return len(e.m.VMs()) == 0 && e.registered() == 0 })
}

func TestVMDiesMidJobIsReplacedAndDeregistered(t *testing.T) {
	e := newEnv(t, testPool("p", config.ScalingScaleSet, 1, 3))
	e.start()
	e.waitFor("an idle runner", func() bool { return e.status("p").Idle == 1 })
	job, vm := e.startJob("p")
	e.waitFor("busy plus a warm one", func() bool { st := e.status("p"); return st.Busy == 1 && st.Idle == 1 })
	vm.finish(Exit{Reason: "vmm-crash", Message: "qemu-system-x86_64: terminating on signal 9"})
	// GitHub still believes the runner runs the job: deregistration is
	// refused and retried.
	e.waitFor("an orphan retried", func() bool { return e.status("p").Orphans == 1 })
	st := e.status("p")
	if st.LastFailure == nil || st.LastFailure.Reason != "vm_exit" || !strings.Contains(st.LastFailure.Message, "terminating on signal 9") {
		t.Fatalf("last failure %+v, want the VMM's words", st.LastFailure)
	}
	// GitHub gives up on the job (the runner is gone): the retry succeeds.
	if err := e.gh.CompleteJob(job); err != nil {
		t.Fatal(err)
	}
	e.waitFor("orphan deregistered and pool at min", func() bool {
		st := e.status("p")
		return st.Orphans == 0 && st.Idle == 1 && st.Current == 1 && e.registered() == 1 && len(e.records()) == 1
	})
	e.noLeaks()
}

func TestBootTimeoutReplacesTheVM(t *testing.T) {
	p := testPool("slow", config.ScalingScaleSet, 1, 2)
	p.Timeouts.Boot = config.Duration(300 * time.Millisecond)
	e := newEnv(t, p)
	e.rt.hang = true
	e.start()
	e.waitFor("two boot timeouts", func() bool { return e.obs.failed("boot_timeout") >= 2 })
	st := e.status("slow")
	if st.Failures < 2 || st.LastFailure == nil || st.LastFailure.Reason != "boot_timeout" {
		t.Fatalf("status %+v", st)
	}
	// Every timed-out VM was stopped and its runner deregistered.
	e.waitFor("at most one VM and registration at a time", func() bool { return len(e.rt.live()) <= 1 && e.registered() <= 1 })
	e.rt.mu.Lock()
	e.rt.hang = false
	e.rt.mu.Unlock()
	// VMs started while hanging still time out; then a healthy one clears
	// the backoff.
	e.waitFor("a healthy idle runner and the backoff cleared", func() bool {
		st := e.status("slow")
		return st.Idle == 1 && st.Failures == 0 && st.BackoffUntil.IsZero()
	})
	e.waitFor("one registration", func() bool { return e.registered() == 1 })
	e.noLeaks()
}

func TestIdleTTLReplacesIdleRunners(t *testing.T) {
	p := testPool("ttl", config.ScalingScaleSet, 1, 1)
	p.Timeouts.IdleTTL = config.Duration(200 * time.Millisecond)
	e := newEnv(t, p)
	e.start()
	e.waitFor("three runners started in turn", func() bool { return e.obs.bootCount() >= 3 })
	e.waitFor("one idle runner and registration", func() bool {
		return len(e.rt.live()) == 1 && e.registered() == 1 && e.status("ttl").Idle == 1
	})
	if n := e.obs.failed("idle_ttl"); n != 0 {
		t.Errorf("an idle TTL counted as failure %d times", n)
	}
}

func TestMaxJobStopsTheVM(t *testing.T) {
	p := testPool("long", config.ScalingScaleSet, 0, 1)
	p.Timeouts.MaxJob = config.Duration(200 * time.Millisecond)
	e := newEnv(t, p)
	e.start()
	job, vm := e.startJob("long")
	e.waitFor("the VM stopped", func() bool { return vm.exitReason() == "stopped" })
	if e.obs.failed("max_job") != 1 {
		t.Errorf("max_job failures %d", e.obs.failed("max_job"))
	}
	if err := e.gh.CompleteJob(job); err != nil {
		t.Fatal(err)
	}
	e.waitFor("runner deregistered", func() bool { return e.registered() == 0 && len(e.records()) == 0 })
}

func TestVMStartFailureDeregistersAtOnce(t *testing.T) {
	e := newEnv(t, testPool("p", config.ScalingLabels, 2, 2))
	e.rt.startErr = errors.New("qemu did not start (exit code 1): qemu-system-x86_64: -accel kvm: Could not access KVM kernel module: No such file or directory")
	e.start()
	e.waitFor("three failed starts", func() bool { return e.obs.failed("vm_start") >= 3 })
	st := e.status("p")
	if st.LastFailure == nil || !strings.Contains(st.LastFailure.Message, "Could not access KVM kernel module") {
		t.Fatalf("the VMM's error text is not in the status: %+v", st.LastFailure)
	}
	if st.BackoffUntil.IsZero() && st.Failures == 0 {
		t.Fatalf("no backoff: %+v", st)
	}
	// Registrations never outlive their failed VM.
	e.waitFor("no registrations", func() bool { return e.registered() == 0 })
	jit := e.gh.CountCalls("POST", "/orgs/acme/actions/runners/generate-jitconfig")
	dels := e.gh.CountCalls("DELETE", "/orgs/acme/actions/runners/*")
	if dels < jit-1 || jit < 3 {
		t.Fatalf("%d registrations, %d deregistrations", jit, dels)
	}
	// Exponential backoff: far fewer attempts than a tight loop would make.
	before := e.rt.startCount()
	time.Sleep(500 * time.Millisecond)
	during := e.rt.startCount() - before
	e.rt.mu.Lock()
	e.rt.startErr = nil
	e.rt.mu.Unlock()
	if during > 5 {
		t.Errorf("%d start attempts within 500ms while failing; backoff is not working", during)
	}
	e.waitFor("two idle runners after recovery", func() bool { return e.status("p").Idle == 2 })
	e.noLeaks()
}

func TestGitHubErrorsBackOff(t *testing.T) {
	e := newEnv(t, testPool("p", config.ScalingLabels, 1, 1))
	// The client retries each request once; eight 500s fail four
	// registrations.
	e.gh.FailNext("POST /orgs/*/actions/runners/generate-jitconfig", http.StatusInternalServerError, 8)
	e.start()
	e.waitFor("an idle runner despite the errors", func() bool { return e.status("p").Idle == 1 })
	if n := e.obs.failed("github"); n < 2 {
		t.Fatalf("%d registration failures recorded", n)
	}
	// Rate limits: the next registrations are refused until the reset,
	// which is further away than the client waits in place.
	e.gh.RateLimit(4, time.Now().Add(2*time.Second))
	vm := e.vmsIn("p", StateIdle)[0]
	e.rt.vm(vm.ID).finish(Exit{Reason: "guest-shutdown"})
	e.waitFor("rate limit failures", func() bool {
		st := e.status("p")
		return st.LastFailure != nil && strings.Contains(st.LastFailure.Message, "rate limit")
	})
	e.waitFor("recovered after the rate limit", func() bool { return e.status("p").Idle == 1 })
	e.waitFor("one registration", func() bool { return e.registered() == 1 })
	e.noLeaks()
}

func TestDrainWaitsForBusyRunners(t *testing.T) {
	e := newEnv(t, testPool("a", config.ScalingScaleSet, 1, 3), testPool("b", config.ScalingLabels, 2, 2))
	e.start()
	e.waitFor("idle runners in both pools", func() bool { return e.status("a").Idle == 1 && e.status("b").Idle == 2 })
	job, vm := e.startJob("a")
	e.waitFor("a busy runner", func() bool { return e.status("a").Busy == 1 })
	done := make(chan error, 1)
	go func() { done <- e.m.Drain(context.Background()) }()
	e.waitFor("only the busy runner left", func() bool { return len(e.rt.live()) == 1 && e.registered() == 1 })
	if e.rt.live()[0] != vm {
		t.Fatal("the drain stopped a busy runner")
	}
	e.waitFor("the session closed", func() bool { return e.gh.ScaleSets()[0].Sessions == 0 })
	started := e.rt.startCount()
	select {
	case err := <-done:
		t.Fatalf("drain returned with a busy runner: %v", err)
	case <-time.After(200 * time.Millisecond):
	}
	e.finishJob(job, vm)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if e.rt.startCount() != started {
		t.Error("runners were started while draining")
	}
	if e.registered() != 0 || len(e.records()) != 0 || len(e.rt.live()) != 0 {
		t.Fatalf("after drain: %d registrations, records %v, %d VMs", e.registered(), e.records(), len(e.rt.live()))
	}
}

func TestDrainDeadlineStopsBusyRunners(t *testing.T) {
	e := newEnv(t, testPool("a", config.ScalingScaleSet, 0, 2))
	e.start()
	job, vm := e.startJob("a")
	e.waitFor("a busy runner", func() bool { return e.status("a").Busy == 1 })
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if err := e.m.Drain(ctx); err == nil || !strings.Contains(err.Error(), "drain deadline passed") {
		t.Fatalf("drain: %v", err)
	}
	if vm.exitReason() != "stopped" {
		t.Fatalf("busy VM not stopped at the deadline: %s", vm.exitReason())
	}
	// GitHub still has the busy runner: its record stays for the next
	// start, which deregisters it once GitHub lets go.
	if len(e.records()) != 1 {
		t.Fatalf("records %v, want the busy runner's", e.records())
	}
	if err := e.gh.CompleteJob(job); err != nil {
		t.Fatal(err)
	}
	e.gh.AddRunners(githubtest.Org("acme"), "stray", 0)
	e.start()
	e.waitFor("record resolved", func() bool { return len(e.records()) == 0 && e.registered() == 0 })
}

func TestRestartAdoptsLiveVMsAndCleansDeadOnes(t *testing.T) {
	e := newEnv(t, testPool("p", config.ScalingScaleSet, 3, 4))
	m1 := e.start()
	e.waitFor("three idle runners", func() bool { return e.status("p").Idle == 3 })
	job, busyVM := e.startJob("p")
	e.waitFor("busy + 3 idle", func() bool { st := e.status("p"); return st.Busy == 1 && st.Idle == 3 })
	// The daemon dies (nothing is cleaned up, the session is not closed).
	m1.opts.Runtime = nil
	m1.cancel()
	m1.wg.Wait()
	e.gh.DropSessions() // GitHub lets the dead daemon's session lapse
	// While it is down one idle VM dies.
	idle := e.vmsIn("p", StateIdle)
	dead := e.rt.vm(idle[0].ID)
	dead.finish(Exit{Reason: "guest-shutdown"})
	regsBefore := e.gh.CountCalls("POST", "/_actions/**")

	e.start()
	e.waitFor("adopted and replaced", func() bool {
		st := e.status("p")
		return st.Busy == 1 && st.Idle == 3 && len(e.rt.live()) == 4
	})
	// The live VMs were adopted, not replaced: only the dead one's runner
	// was deregistered and one new runner registered.
	e.waitFor("dead runner deregistered", func() bool {
		for _, r := range e.gh.Runners() {
			if r.Name == dead.id {
				return false
			}
		}
		return true
	})
	if n := e.gh.CountCalls("POST", "/_actions/*/_apis/runtime/runnerscalesets/*/generatejitconfig") - 0; n != 5 {
		t.Errorf("%d JIT configurations in total, want 5 (4 first, 1 replacement)", n)
	}
	_ = regsBefore
	e.noLeaks()
	e.finishJob(job, busyVM)
	e.waitFor("back to 3 idle", func() bool { st := e.status("p"); return st.Current == 3 && e.registered() == 3 })
	e.noLeaks()
}

func TestRestartResolvesRegistrationWithoutAnswer(t *testing.T) {
	// A daemon died between asking for a JIT configuration and getting the
	// answer: its record has a name but no runner id.
	e := newEnv(t, testPool("p", config.ScalingLabels, 0, 1))
	ids := e.gh.AddRunners(githubtest.Org("acme"), "p-lost", 1)
	rec := record{Name: "p-lost-1", Pool: "p", ScopeKind: "organization", ScopeName: "acme", State: StateRegistering, Created: time.Now()}
	st, _ := newStore(filepath.Join(e.dir, "pools"))
	if err := st.saveRunner(rec); err != nil {
		t.Fatal(err)
	}
	// And a pool that is no longer configured left a runner behind.
	gone := e.gh.AddRunners(githubtest.Org("acme"), "old", 1)
	if err := st.saveRunner(record{Name: "old-1", Pool: "removed", ScopeKind: "organization", ScopeName: "acme", RunnerID: gone[0], State: StateIdle, Created: time.Now()}); err != nil {
		t.Fatal(err)
	}
	e.start()
	e.waitFor("both deregistered", func() bool { return e.registered() == 0 && len(e.records()) == 0 })
	_ = ids
}

func TestLabelsModeGrowsOnWebhooks(t *testing.T) {
	e := newEnv(t, testPool("lab", config.ScalingLabels, 1, 3))
	e.start()
	e.waitFor("warm runner", func() bool { return e.status("lab").Idle == 1 })
	ctx := context.Background()
	ev := func(action string, id int64, runner string, labels ...string) {
		if err := e.m.HandleWorkflowJob(ctx, github.WorkflowJobEvent{Action: action, JobID: id, Labels: labels, RunnerName: runner, Organization: "acme"}); err != nil {
			t.Fatal(err)
		}
	}
	ev("queued", 1, "", "self-hosted", "fireactions")
	ev("queued", 2, "", "fireactions")
	ev("queued", 3, "", "gpu")                                                                                                              // labels the pool lacks
	e.m.HandleWorkflowJob(ctx, github.WorkflowJobEvent{Action: "queued", JobID: 4, Labels: []string{"fireactions"}, Organization: "other"}) // other org
	e.waitFor("grown to max", func() bool { return e.status("lab").Idle == 3 })
	if st := e.status("lab"); st.JobsInFlight != 2 || st.Desired != 3 {
		t.Fatalf("status %+v", st)
	}
	v := e.vmsIn("lab", StateIdle)[0]
	ev("in_progress", 1, v.ID, "fireactions")
	e.waitFor("busy from the webhook", func() bool { return e.inState("lab", StateBusy) == 1 })
	ev("in_progress", 2, "someone-else", "fireactions")
	ev("completed", 1, v.ID, "fireactions")
	e.rt.vm(v.ID).finish(Exit{Reason: "workload-exit"})
	e.waitFor("back to the warm minimum", func() bool { st := e.status("lab"); return st.Current == 1 && st.JobsInFlight == 0 })
	e.waitFor("one registration", func() bool { return e.registered() == 1 })
	e.noLeaks()
}

func TestPauseAndResume(t *testing.T) {
	e := newEnv(t, testPool("p", config.ScalingLabels, 1, 2))
	e.start()
	e.waitFor("idle runner", func() bool { return e.status("p").Idle == 1 })
	if _, err := e.m.Pause("p"); err != nil {
		t.Fatal(err)
	}
	vm := e.vmsIn("p", StateIdle)[0]
	e.rt.vm(vm.ID).finish(Exit{Reason: "guest-shutdown"})
	e.waitFor("VM gone", func() bool { return len(e.m.VMs()) == 0 })
	time.Sleep(300 * time.Millisecond)
	if n := len(e.m.VMs()); n != 0 || !e.status("p").Paused {
		t.Fatalf("paused pool started %d runners", n)
	}
	// Paused survives a restart.
	e.m.Close()
	e.start()
	if !e.status("p").Paused {
		t.Fatal("pause not persisted")
	}
	if _, err := e.m.Resume("p"); err != nil {
		t.Fatal(err)
	}
	e.waitFor("runner after resume", func() bool { return e.status("p").Idle == 1 })
}

func TestVMSpec(t *testing.T) {
	p := testPool("spec", config.ScalingLabels, 1, 1)
	p.VM.Mode = config.VMModeApp
	p.VM.Metadata = map[string]string{"team": "infra"}
	p.Runner.Labels = []string{"linux"}
	e := newEnv(t, p)
	e.start()
	id := <-e.rt.startedC
	spec := e.rt.vm(id).spec
	jr, err := githubtest.DecodeJITConfig(spec.JITConfig.Reveal())
	if err != nil || jr.Name != id {
		t.Fatalf("JIT config for %q: %+v %v", id, jr, err)
	}
	if spec.Labels[LabelPool] != "spec" || spec.Labels[LabelRunner] != id || spec.Labels[LabelRunnerID] != strconv.FormatInt(jr.ID, 10) {
		t.Errorf("labels %v", spec.Labels)
	}
	md := spec.Metadata
	if md.InstanceID != id || md.Hostname != id || md.RunnerID != strconv.FormatInt(jr.ID, 10) || md.Pool != "spec" || md.Metadata["team"] != "infra" {
		t.Errorf("metadata input %+v", md)
	}
	if _, err := metadata.New(md); err != nil {
		t.Errorf("metadata input is not valid: %v", err)
	}
	if !slices.Equal(spec.Args, agent.GuestArgs) || spec.KernelArgs != agent.KernelArg || spec.Network != "fireactions" {
		t.Errorf("args %v, kernel args %q, network %q", spec.Args, spec.KernelArgs, spec.Network)
	}
	if !strings.HasPrefix(id, "spec-") || len(id) != len("spec-")+8 {
		t.Errorf("runner name %q", id)
	}
	for _, r := range e.gh.Runners() {
		if r.Name == id && !slices.Equal(r.Labels, []string{"linux"}) {
			t.Errorf("runner labels %v", r.Labels)
		}
	}
	// The state file never holds the JIT configuration.
	data, err := os.ReadFile(filepath.Join(e.dir, "pools", "spec", "runners", id+".json"))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(data), spec.JITConfig.Reveal()) {
		t.Fatal("JIT configuration persisted")
	}
}

func TestVMThatDoesNotPowerOffIsStopped(t *testing.T) {
	e := newEnv(t, testPool("p", config.ScalingScaleSet, 0, 1))
	e.tweak = func(o *Options) { o.StopGrace = 200 * time.Millisecond }
	e.start()
	job, vm := e.startJob("p")
	e.waitFor("busy", func() bool { return e.status("p").Busy == 1 })
	if err := e.gh.CompleteJob(job); err != nil {
		t.Fatal(err)
	}
	// The agent reports done but the guest never powers off.
	vm.report(agent.StateDone)
	e.waitFor("the host to stop it", func() bool { return vm.exitReason() == "stopped" })
	e.waitFor("nothing left", func() bool { return len(e.m.VMs()) == 0 && e.registered() == 0 && len(e.records()) == 0 })
}
