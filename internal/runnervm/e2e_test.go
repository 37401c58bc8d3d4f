package runnervm_test

import (
	"archive/tar"
	"bytes"
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/fireactions/fireactions/internal/agent"
	"github.com/fireactions/fireactions/internal/config"
	"github.com/fireactions/fireactions/internal/github"
	"github.com/fireactions/fireactions/internal/github/githubtest"
	"github.com/fireactions/fireactions/internal/image/imagetest"
	"github.com/fireactions/fireactions/internal/pool"
	"github.com/fireactions/fireactions/internal/runnervm"
	"github.com/fireactions/fireactions/internal/runtime"
	"github.com/fireactions/fireactions/internal/runtime/runtimetest"
)

func TestMain(m *testing.M) {
	runtimetest.HelperMain()
	os.Exit(m.Run())
}

// fakeRunSh is the image's actions runner. It accepts the JIT configuration
// (GitHub's format: base64 JSON whose .runner member is base64 JSON),
// prints what the real runner prints, and "runs" a job when the host tells
// it GitHub assigned it one. A real runner learns that from GitHub over the
// network; these guests have none, so the test plays that part with
// signals through the guest init and the agent: SIGUSR1 starts the job,
// SIGUSR2 completes it. The pool's behaviour follows only from the fake
// GitHub's messages and the agent's reports.
const fakeRunSh = `#!/bin/sh
[ "$1" = --jitconfig ] && [ -n "$2" ] || { echo "usage: run.sh --jitconfig CONFIG" >&2; exit 2; }
runner=$(echo "$2" | base64 -d | sed -n 's/.*"\.runner":"\([^"]*\)".*/\1/p' | base64 -d | sed -n 's/.*"agentName":"\([^"]*\)".*/\1/p')
[ -n "$runner" ] || { echo "unreadable JIT configuration" >&2; exit 3; }
echo "Connected to GitHub as $runner (uid $(id -u))"
echo "$(date -u '+%F %TZ'): Listening for Jobs"
job=0
finished=0
trap 'job=1' USR1
trap 'finished=1' USR2
while [ $job = 0 ]; do sleep 0.1; done
echo "$(date -u '+%F %TZ'): Running job: build"
while [ $finished = 0 ]; do sleep 0.1; done
echo "$(date -u '+%F %TZ'): Job build completed with result: Succeeded"
`

// systemInit is the /sbin/init of the system-mode test image: where a real
// image boots systemd, which starts the agent's unit, it starts the agent
// installed by fireactions-init.
const systemInit = `#!/bin/sh
/run/fireactions/bin/fireactions-agent
reboot -f
`

// pushRunnerImage builds the test runner image: busybox, a runner user and
// the fake run.sh, plus extra files.
func pushRunnerImage(t *testing.T, reg *imagetest.Registry, repo, runSh string, extra ...string) string {
	t.Helper()
	files := map[string]string{"home/runner/run.sh": runSh}
	for i := 0; i+1 < len(extra); i += 2 {
		files[extra[i]] = extra[i+1]
	}
	users := imagetest.Layer(t, imagetest.Tar(t,
		imagetest.Entry{Name: "etc/", Type: tar.TypeDir},
		imagetest.Entry{Name: "etc/passwd", Body: "root:x:0:0:root:/root:/bin/sh\nrunner:x:1001:1001::/home/runner:/bin/sh\n"},
		imagetest.Entry{Name: "etc/group", Body: "root:x:0:\nrunner:x:1001:\n"},
	))
	img := imagetest.Image(t, "linux/amd64", v1.Config{Cmd: []string{"/bin/sh"}},
		runtimetest.BusyboxLayer(t, files), users)
	ref := reg.Host + "/" + repo + ":latest"
	imagetest.Push(t, ref, img, nil)
	return ref
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}
func (s *syncBuffer) String() string { s.mu.Lock(); defer s.mu.Unlock(); return s.b.String() }

type e2e struct {
	t       *testing.T
	gh      *githubtest.Server
	cfg     *config.Config
	dataDir string
	logs    *syncBuffer
	log     *slog.Logger
	rt      *runtime.Runtime
	m       *pool.Manager
}

// startDaemon opens the runtime and starts a pool manager over the data
// directory, as `fireactions serve` does.
func (e *e2e) startDaemon() {
	t := e.t
	opts := runtimetest.Options(t, e.dataDir)
	opts.Logger = e.log
	rt, err := runtime.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	adapter, err := runnervm.New(runnervm.Options{Runtime: rt, NoNetwork: true, Insecure: true, Logger: e.log})
	if err != nil {
		t.Fatal(err)
	}
	client, err := github.New(e.cfg.GitHub, github.WithLogger(e.log))
	if err != nil {
		t.Fatal(err)
	}
	m, err := pool.New(pool.Options{Config: e.cfg, GitHub: client, Runtime: adapter, StateDir: filepath.Join(e.dataDir, "pools"),
		Logger: e.log, Resync: time.Second, StopGrace: 10 * time.Second,
		Backoff: pool.Backoff{Initial: time.Second, Max: 5 * time.Second},
		Session: github.SessionOptions{ConflictWait: 200 * time.Millisecond, ConflictAttempts: 50}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := m.Start(ctx); err != nil {
		t.Fatal(err)
	}
	e.rt, e.m = rt, m
}

// crash stops the daemon as kill -9 would leave things: VMs keep running,
// nothing is deregistered, the session is not closed.
func (e *e2e) crash() {
	e.m.Close()
	e.rt.Close()
	e.gh.DropSessions()
}

func (e *e2e) waitFor(what string, cond func() bool) {
	e.t.Helper()
	deadline := time.Now().Add(3 * time.Minute)
	for !cond() {
		if time.Now().After(deadline) {
			e.t.Fatalf("timed out waiting for %s\npools %+v\nvms %+v\nrunners %+v\nlogs:\n%s", what, e.m.Pools(), e.m.VMs(), e.gh.Runners(), lastLines(e.logs.String(), 80))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func lastLines(s string, n int) string {
	l := strings.Split(s, "\n")
	if len(l) > n {
		l = l[len(l)-n:]
	}
	return strings.Join(l, "\n")
}

func (e *e2e) vms(state pool.State) []pool.VMStatus {
	var out []pool.VMStatus
	for _, v := range e.m.VMs() {
		if v.State == state {
			out = append(out, v)
		}
	}
	return out
}

// signal sends a signal to a runner VM's workload (the agent, which
// forwards it to the runner).
func (e *e2e) signal(id string, sig syscall.Signal) {
	e.t.Helper()
	inst, err := e.rt.Attach(context.Background(), id)
	if err == nil {
		err = inst.Signal(context.Background(), sig)
	}
	if err != nil {
		e.t.Fatalf("signal %s: %v", id, err)
	}
}

func TestRunnerVMsEndToEnd(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the guest agent switches to the runner user and the runtime manages VM files")
	}
	reg := imagetest.NewRegistry(t)
	kernel, mods := runtimetest.Kernel(t)
	key, pem, err := githubtest.AppKey()
	if err != nil {
		t.Fatal(err)
	}
	gh := githubtest.New(t, &key.PublicKey, func(o *githubtest.Options) { o.LongPoll = time.Second })
	gh.InstallOrg("acme")

	vmShape := config.VM{Mode: config.VMModeApp, VCPUs: 1, MemoryMiB: 256, Kernel: kernel, KernelModules: mods,
		KernelArgs: "quiet", DiskSize: 256 << 20}
	sysShape := vmShape
	sysShape.Mode = config.VMModeSystem
	cfg := &config.Config{
		GitHub: config.GitHub{AppID: gh.AppID(), PrivateKey: config.Secret(pem), APIURL: gh.APIURL()},
		Pools: []config.Pool{
			{Name: "e2e", MinRunners: 1, MaxRunners: 2, Runner: config.Runner{Organization: "acme",
				Image: pushRunnerImage(t, reg, "runner", fakeRunSh)}, VM: vmShape,
				Timeouts: config.Timeouts{Boot: config.Duration(2 * time.Minute), MaxJob: config.Duration(time.Hour)}},
			// System mode: the image's init starts the agent, which reports
			// over the console with the key the guest init handed over.
			{Name: "sys", MinRunners: 1, MaxRunners: 1, Runner: config.Runner{Organization: "acme",
				Image: pushRunnerImage(t, reg, "system", fakeRunSh, "sbin/init", systemInit)}, VM: sysShape,
				Timeouts: config.Timeouts{Boot: config.Duration(2 * time.Minute), MaxJob: config.Duration(time.Hour)}},
			// Its runner never gets to "Listening for Jobs".
			{Name: "stuck", MinRunners: 1, MaxRunners: 1, Runner: config.Runner{Organization: "acme",
				Image: pushRunnerImage(t, reg, "stuck", "#!/bin/sh\necho 'Connecting...'\nexec sleep 3600\n")}, VM: vmShape,
				Timeouts: config.Timeouts{Boot: config.Duration(20 * time.Second), MaxJob: config.Duration(time.Hour)}},
		},
	}
	cfg.ApplyDefaults()
	e := &e2e{t: t, gh: gh, cfg: cfg, dataDir: t.TempDir(), logs: &syncBuffer{}}
	e.log = slog.New(slog.NewTextHandler(e.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	e.startDaemon()
	t.Cleanup(func() {
		if t.Failed() {
			return
		}
		for _, s := range gh.Secrets() {
			if strings.Contains(e.logs.String(), s) {
				t.Errorf("a secret GitHub issued (%d bytes) is in the logs", len(s))
			}
		}
	})

	// The warm minimum: one VM boots, its agent reports idle.
	e.waitFor("an idle runner", func() bool { st, _ := e.m.Pool("e2e"); return st.Idle == 1 })
	e.waitFor("the system-mode runner idle", func() bool { st, _ := e.m.Pool("sys"); return st.Idle == 1 })
	first := e.vms(pool.StateIdle)[0]

	// A job: GitHub assigns it to the scale set, the pool grows to
	// min + 1, the first runner takes it.
	job, err := gh.QueueJob("e2e", nil)
	if err != nil {
		t.Fatal(err)
	}
	e.waitFor("a second runner for the assigned job", func() bool { st, _ := e.m.Pool("e2e"); return st.Desired == 2 && st.Idle == 2 })
	if err := gh.StartJob(job, first.ID); err != nil {
		t.Fatal(err)
	}
	e.signal(first.ID, syscall.SIGUSR1)
	e.waitFor("the first runner busy", func() bool { v, err := e.m.VM(first.ID); return err == nil && v.State == pool.StateBusy })

	// The stuck pool's VM passes its boot deadline: stopped, deregistered,
	// failure recorded; the next one is tried.
	e.waitFor("a boot timeout", func() bool {
		st, _ := e.m.Pool("stuck")
		return st.LastFailure != nil && st.LastFailure.Reason == "boot_timeout"
	})

	// The job completes: GitHub drops the ephemeral runner, the runner
	// exits, the agent reports done and the VM powers off. The pool goes
	// back to its minimum: the second runner stays idle.
	if err := gh.CompleteJob(job); err != nil {
		t.Fatal(err)
	}
	e.signal(first.ID, syscall.SIGUSR2)
	e.waitFor("the first VM gone", func() bool { _, err := e.m.VM(first.ID); return err != nil })
	var logs bytes.Buffer
	st, _ := e.m.Pool("e2e")
	if st.Current != 1 || st.Idle != 1 {
		t.Fatalf("after the job: %+v", st)
	}
	second := e.vms(pool.StateIdle)[0]
	if err := e.m.Logs(context.Background(), second.ID, false, &logs); err != nil || !strings.Contains(logs.String(), "Listening for Jobs") ||
		!strings.Contains(logs.String(), "as "+second.ID+" (uid 1001)") {
		t.Fatalf("runner output %q %v", logs.String(), err)
	}

	// The daemon is killed; while it is down nothing changes. A new one
	// adopts the live VM (no new registration) and goes on.
	e.crash()
	regs := gh.CountCalls("POST", "/_actions/*/_apis/runtime/runnerscalesets/*/generatejitconfig")
	e.startDaemon()
	e.waitFor("the idle runner adopted", func() bool {
		v, err := e.m.VM(second.ID)
		return err == nil && v.State == pool.StateIdle
	})
	if n := gh.CountCalls("POST", "/_actions/*/_apis/runtime/runnerscalesets/*/generatejitconfig"); n != regs {
		t.Errorf("%d new registrations after the restart; the live VM should have been adopted", n-regs)
	}

	// A VM dies in the middle of its job: it is replaced, and its runner
	// is deregistered once GitHub lets go of it.
	job2, _ := gh.QueueJob("e2e", nil)
	e.waitFor("two idle runners", func() bool { st, _ := e.m.Pool("e2e"); return st.Idle == 2 })
	if err := gh.StartJob(job2, second.ID); err != nil {
		t.Fatal(err)
	}
	e.signal(second.ID, syscall.SIGUSR1)
	e.waitFor("the second runner busy", func() bool { v, err := e.m.VM(second.ID); return err == nil && v.State == pool.StateBusy })
	e.signal(second.ID, syscall.SIGKILL)
	e.waitFor("the dead VM's runner kept for deregistration", func() bool {
		_, err := e.m.VM(second.ID)
		st, _ := e.m.Pool("e2e")
		return err != nil && st.Orphans == 1
	})
	gh.CompleteJob(job2)
	e.waitFor("deregistered and back to one idle runner", func() bool {
		st, _ := e.m.Pool("e2e")
		for _, r := range gh.Runners() {
			if r.Name == second.ID {
				return false
			}
		}
		return st.Orphans == 0 && st.Idle == 1 && st.Current == 1
	})

	// SIGTERM: the drain deregisters and stops everything.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := e.m.Drain(ctx); err != nil {
		t.Fatal(err)
	}
	if rs := gh.Runners(); len(rs) != 0 {
		t.Errorf("registrations left after the drain: %+v", rs)
	}
	if recs, _ := filepath.Glob(filepath.Join(e.dataDir, "pools", "*", "runners", "*.json")); len(recs) != 0 {
		t.Errorf("runner records left: %v", recs)
	}
	e.rt.Close()
	runtimetest.RequireNoLeftovers(t, e.dataDir)
	_ = agent.KernelArg
}
