package nomad

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/hashicorp/nomad/plugins/drivers"

	"github.com/fireactions/fireactions/internal/image/imagetest"
	"github.com/fireactions/fireactions/internal/runtime/runtimetest"
	"github.com/fireactions/fireactions/internal/vm"
	"github.com/fireactions/fireactions/internal/vm/vmtest"
)

// requireClean fails when the driver left anything of its VMs behind.
func (e *env) requireClean(t *testing.T) {
	t.Helper()
	runtimetest.RequireNoLeftovers(t, e.pc.DataDir)
	if ents, _ := os.ReadDir(filepath.Join(e.pc.DataDir, "nomad")); len(ents) > 0 {
		var names []string
		for _, ent := range ents {
			names = append(names, ent.Name())
		}
		t.Errorf("driver files left: %v", names)
	}
}

// A task's image config (Entrypoint, Cmd, Env) runs with the task's
// environment; exit codes, stdout and stderr reach Nomad; Vcpus, Mem and
// DisableHt shape the VM; the task events carry the start-up's timings.
func TestStartWaitExitCodesAndLogs(t *testing.T) {
	e := newEnv(t)
	d, h := e.driver(t)
	evs := collectEvents(t, h)
	ref := e.busybox(t, "app", v1.Config{
		Entrypoint: []string{"/bin/sh", "-c"},
		Cmd: []string{`echo "out:$IMG_ENV:$FROM_JOB:$NOMAD_TASK_NAME"; echo to-stderr >&2
echo "cpus:$(nproc)"
echo "memkb:$(sed -n 's/^MemTotal: *\([0-9]*\) kB/\1/p' /proc/meminfo)"`},
		Env: []string{"PATH=/bin", "IMG_ENV=from-image", "FROM_JOB=image-default"},
	})

	// The image's own command, two hyper-threads on one core, 256 MiB
	// (more than the 128 MB the task reserves: a warning event).
	okTask := task(t, h, "ok", &TaskConfig{OCIImage: ref, Vcpus: 2, Mem: 256}, 128)
	okHandle, net, err := h.StartTask(okTask)
	if err != nil {
		t.Fatal(err)
	}
	if net != nil {
		t.Errorf("a task without a network got a driver network: %+v", net)
	}
	// The Args override keeps nothing of the image's command; DisableHt
	// gives each vCPU a core of its own; the task's user runs it.
	failTask := task(t, h, "fail", &TaskConfig{OCIImage: ref, Vcpus: 2, DisableHt: true, Mem: 192,
		Command: "/bin/sh", Args: []string{"-c", `echo "cpus:$(nproc) uid:$(id -u)"; echo failing >&2; exit 3`}}, 256)
	failTask.User = "nobody"
	if _, _, err := h.StartTask(failTask); err != nil {
		t.Fatal(err)
	}

	okRes := wait(t, h, okHandle.Config.ID)
	if !okRes.Successful() {
		t.Errorf("ok task: %+v", okRes)
	}
	failRes := wait(t, h, failTask.ID)
	if failRes.ExitCode != 3 || failRes.Signal != 0 || failRes.Err != nil {
		t.Errorf("fail task: %+v, want exit code 3", failRes)
	}

	out := waitLog(t, okTask, "stdout", "memkb:")
	for _, want := range []string{"out:from-image:job-value:ok\n", "cpus:2\n"} {
		if !strings.Contains(out, want) {
			t.Errorf("ok stdout: no %q in:\n%s", want, out)
		}
	}
	if strings.Contains(out, "to-stderr") {
		t.Errorf("stderr leaked into stdout:\n%s", out)
	}
	waitLog(t, okTask, "stderr", "to-stderr\n")
	memkb := 0
	for _, l := range strings.Split(out, "\n") {
		if v, ok := strings.CutPrefix(l, "memkb:"); ok {
			memkb, _ = strconv.Atoi(v)
		}
	}
	// The kernel keeps some memory for itself: MemTotal is below 256 MiB
	// but far above the default's share of a smaller VM.
	if memkb <= 200_000 || memkb > 256<<10 {
		t.Errorf("guest MemTotal = %d kB, want a 256 MiB VM", memkb)
	}
	waitLog(t, failTask, "stdout", "cpus:2 uid:65534\n")
	waitLog(t, failTask, "stderr", "failing\n")
	// Hyper-threading as the VMM was told: two threads of one core, or
	// with DisableHt one thread on each of two cores. (Under TCG the
	// guest kernel sees cores either way: QEMU's emulated CPU does not
	// describe its threads; with KVM it does.)
	if got := vmmArg(t, d, okTask.ID, "-smp"); got != "2,sockets=1,cores=1,threads=2" {
		t.Errorf("ok task: -smp %s, want 2 threads on 1 core", got)
	}
	if got := vmmArg(t, d, failTask.ID, "-smp"); got != "2,sockets=1,cores=2,threads=1" {
		t.Errorf("DisableHt task: -smp %s, want 2 cores of 1 thread", got)
	}

	// Events: the pull with its time, the cache hit of the second task,
	// the boot, the memory warning.
	evs.waitEvent(t, okTask.ID, "Image pulled and converted in")
	evs.waitEvent(t, okTask.ID, "Guest booted in")
	evs.waitEvent(t, okTask.ID, "exceeds the task's memory reservation of 128 MB")
	evs.waitEvent(t, failTask.ID, "Image found in the cache")
	evs.waitEvent(t, failTask.ID, "VMM started in")

	st, err := h.InspectTask(failTask.ID)
	if err != nil {
		t.Fatal(err)
	}
	if st.State != drivers.TaskStateExited || st.ExitResult == nil || st.ExitResult.ExitCode != 3 || st.DriverAttributes["backend"] != "qemu" {
		t.Errorf("InspectTask: %+v", st)
	}

	for _, id := range []string{okTask.ID, failTask.ID} {
		if err := h.DestroyTask(id, false); err != nil {
			t.Fatal(err)
		}
		if _, err := h.InspectTask(id); err == nil || !strings.Contains(err.Error(), drivers.ErrTaskNotFound.Error()) {
			t.Errorf("InspectTask after destroy: %v", err)
		}
	}
	e.requireClean(t)
}

// vmmArg returns the value of a VMM command line option of the task's VM
// (the QEMU backend records its command line).
func vmmArg(t *testing.T, d *Driver, taskID, opt string) string {
	t.Helper()
	info, err := d.runtime().Inspect(vmIDOf(t, d, taskID))
	if err != nil || info.VM == nil {
		t.Fatalf("inspect: %v", err)
	}
	var data struct{ Args []string }
	if err := json.Unmarshal(info.VM.BackendData, &data); err != nil {
		t.Fatal(err)
	}
	if i := slices.Index(data.Args, opt); i >= 0 && i+1 < len(data.Args) {
		return data.Args[i+1]
	}
	t.Fatalf("no %s in %q", opt, data.Args)
	return ""
}

// SignalTask reaches the guest's process; StopTask sends the task's kill
// signal to it first, and stops a VM whose workload ignores it within the
// kill timeout.
func TestSignalAndStop(t *testing.T) {
	e := newEnv(t)
	d, h := e.driver(t)
	ref := e.busybox(t, "waiter", v1.Config{Env: []string{"PATH=/bin"}})

	polite := task(t, h, "polite", &TaskConfig{OCIImage: ref, Mem: 128, Command: "/bin/sh", Args: []string{"-c",
		`trap 'echo got-usr1' USR1; trap 'echo got-term; exit 7' TERM; echo ready; while :; do sleep 1; done`}}, 256)
	stubborn := task(t, h, "stubborn", &TaskConfig{OCIImage: ref, Mem: 128, Command: "/bin/sh", Args: []string{"-c",
		`trap '' TERM INT; echo ready; while :; do sleep 1; done`}}, 256)
	for _, tc := range []*drivers.TaskConfig{polite, stubborn} {
		if _, _, err := h.StartTask(tc); err != nil {
			t.Fatal(err)
		}
	}
	waitLog(t, polite, "stdout", "ready")
	waitLog(t, stubborn, "stdout", "ready")

	// Stats: the VMM's usage, which includes the guest's memory.
	ctx, cancel := context.WithCancel(testCtx(t))
	stats, err := h.TaskStats(ctx, polite.ID, 100*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	var usage *drivers.TaskResourceUsage
	for range 2 {
		usage = <-stats
	}
	cancel()
	if usage == nil || usage.ResourceUsage.MemoryStats.RSS < 16<<20 || !slices.Contains(usage.ResourceUsage.CpuStats.Measured, "Percent") {
		t.Errorf("TaskStats: %+v", usage)
	}

	if err := h.SignalTask(polite.ID, "SIGUSR1"); err != nil {
		t.Fatal(err)
	}
	waitLog(t, polite, "stdout", "got-usr1")
	if err := h.SignalTask(polite.ID, "SIGNOPE"); err == nil {
		t.Error("SignalTask accepted an unknown signal")
	}

	if err := h.StopTask(polite.ID, 30*time.Second, "SIGTERM"); err != nil {
		t.Fatal(err)
	}
	res := wait(t, h, polite.ID)
	if res.ExitCode != 7 {
		t.Errorf("polite task: %+v, want the exit code of its TERM trap (7)", res)
	}
	waitLog(t, polite, "stdout", "got-term")

	const killTimeout = 8 * time.Second
	if err := h.StopTask(stubborn.ID, killTimeout, "SIGTERM"); err != nil {
		t.Fatal(err)
	}
	res = wait(t, h, stubborn.ID)
	if res.Successful() {
		t.Errorf("stubborn task: %+v, want it killed", res)
	}
	// The VM's record: stopped, with its end no later than the deadline
	// the kill timeout set.
	info, err := d.runtime().Inspect(vmIDOf(t, d, stubborn.ID))
	if err != nil {
		t.Fatal(err)
	}
	stop := info.VM.Stop
	if stop == nil || info.VM.ExitedAt.After(stop.Deadline) || stop.Deadline.Sub(stop.RequestedAt) > killTimeout {
		t.Errorf("stop record %+v, exited at %s: want the VM ended within the kill timeout", stop, info.VM.ExitedAt)
	}

	for _, tc := range []*drivers.TaskConfig{polite, stubborn} {
		if err := h.DestroyTask(tc.ID, false); err != nil {
			t.Fatal(err)
		}
	}
	e.requireClean(t)
}

func vmIDOf(t *testing.T, d *Driver, taskID string) string {
	t.Helper()
	th, err := d.handle(taskID)
	if err != nil {
		t.Fatal(err)
	}
	return th.state.VMID
}

// After the plugin restarts, RecoverTask re-attaches to the running VM (no
// second VM boots), output continues without repeats, and a VM that ended
// while no plugin ran reports its exit code.
func TestRecoverAfterPluginRestart(t *testing.T) {
	e := newEnv(t)
	d1, h1 := e.driver(t)
	ref := e.busybox(t, "ticker", v1.Config{Env: []string{"PATH=/bin"}})

	ticker := task(t, h1, "ticker", &TaskConfig{OCIImage: ref, Mem: 128, Command: "/bin/sh", Args: []string{"-c",
		`i=0; while [ $i -lt 100000 ]; do echo tick-$i; i=$((i+1)); sleep 0.2; done`}}, 256)
	brief := task(t, h1, "brief", &TaskConfig{OCIImage: ref, Mem: 128, Command: "/bin/sh", Args: []string{"-c",
		`echo brief-start; sleep 6; echo brief-done; exit 5`}}, 256)
	tickerHandle, _, err := h1.StartTask(ticker)
	if err != nil {
		t.Fatal(err)
	}
	briefHandle, _, err := h1.StartTask(brief)
	if err != nil {
		t.Fatal(err)
	}
	waitLog(t, ticker, "stdout", "tick-3\n")
	waitLog(t, brief, "stdout", "brief-start")
	before := e.vmmProcesses()
	if len(before) != 2 {
		t.Fatalf("want 2 VMMs, have %v", before)
	}
	tickerPid := vmmPid(t, d1, ticker.ID)

	// The plugin goes away (as when Nomad restarts it): the VMs run on.
	d1.Shutdown()
	// The brief task ends while no plugin runs.
	ctx := testCtx(t)
	for len(e.vmmProcesses()) != 1 {
		select {
		case <-ctx.Done():
			t.Fatalf("the brief task's VM did not end: VMMs %v", e.vmmProcesses())
		case <-time.After(100 * time.Millisecond):
		}
	}

	d2, h2 := e.driver(t)
	if err := h2.RecoverTask(tickerHandle); err != nil {
		t.Fatal(err)
	}
	if err := h2.RecoverTask(briefHandle); err != nil {
		t.Fatal(err)
	}
	// Recovering twice is harmless.
	if err := h2.RecoverTask(tickerHandle); err != nil {
		t.Fatal(err)
	}
	if after := e.vmmProcesses(); len(after) != 1 || after[0] != tickerPid || vmmPid(t, d2, ticker.ID) != tickerPid {
		t.Fatalf("after recovery the VMMs are %v, want only the ticker's %d", after, tickerPid)
	}
	res := wait(t, h2, brief.ID)
	if res.ExitCode != 5 {
		t.Errorf("brief task: %+v, want exit code 5", res)
	}
	waitLog(t, brief, "stdout", "brief-done")

	st, err := h2.InspectTask(ticker.ID)
	if err != nil || st.State != drivers.TaskStateRunning {
		t.Fatalf("ticker after recovery: %+v, %v", st, err)
	}
	// Output keeps flowing into the same log, with no tick repeated or
	// lost across the restart.
	waitLog(t, ticker, "stdout", "\ntick-30\n")
	if err := h2.StopTask(ticker.ID, 20*time.Second, "SIGTERM"); err != nil {
		t.Fatal(err)
	}
	wait(t, h2, ticker.ID)
	out := logFile(t, ticker, "stdout")
	lines := strings.Split(strings.TrimSpace(out), "\n")
	for i, l := range lines {
		if l != fmt.Sprintf("tick-%d", i) {
			t.Fatalf("line %d of the ticker's output is %q, want tick-%d:\n%s", i, l, i, out)
		}
	}

	// A task whose VM is gone is not recovered, and nothing boots.
	gone := *tickerHandle
	var gst TaskState
	if err := gone.GetDriverState(&gst); err != nil {
		t.Fatal(err)
	}
	gst.VMID = "no-such-vm"
	if err := gone.SetDriverState(&gst); err != nil {
		t.Fatal(err)
	}
	gone.Config = gone.Config.Copy()
	gone.Config.ID += "-gone"
	if err := h2.RecoverTask(&gone); err == nil {
		t.Error("RecoverTask succeeded for a VM that does not exist")
	}
	if len(e.vmmProcesses()) != 0 {
		t.Errorf("VMMs running after a failed recovery: %v", e.vmmProcesses())
	}

	for _, tc := range []*drivers.TaskConfig{ticker, brief} {
		if err := h2.DestroyTask(tc.ID, false); err != nil {
			t.Fatal(err)
		}
	}
	e.requireClean(t)
}

func vmmPid(t *testing.T, d *Driver, taskID string) int {
	t.Helper()
	info, err := d.runtime().Inspect(vmIDOf(t, d, taskID))
	if err != nil || info.VM == nil {
		t.Fatalf("inspect: %v", err)
	}
	return info.VM.Pid
}

// OCIAuth pulls from a registry that requires it (Debian's
// docker-registry with htpasswd); the password shows up in no process's
// arguments, no log line, no event and no task state.
func TestOCIAuthPrivateRegistry(t *testing.T) {
	const user, password = "nomad-user", "pw-Zq81-never-shown"
	e := newEnv(t)
	d, h := e.driver(t)
	evs := collectEvents(t, h)
	reg := imagetest.NewDockerRegistry(t, user, password)
	img := imagetest.Image(t, "linux/amd64", v1.Config{Cmd: []string{"/bin/sh", "-c", "echo private-hello"}, Env: []string{"PATH=/bin"}},
		runtimetest.BusyboxLayer(t, nil))
	ref := reg.Host + "/private/app:latest"
	imagetest.Push(t, ref, img, &authn.Basic{Username: user, Password: password})

	anon := task(t, h, "anon", &TaskConfig{OCIImage: ref, Mem: 128}, 256)
	if _, _, err := h.StartTask(anon); err == nil || !strings.Contains(strings.ToLower(err.Error()), "unauthorized") {
		t.Fatalf("pull without OCIAuth: %v, want unauthorized", err)
	}
	wrong := task(t, h, "wrong", &TaskConfig{OCIImage: ref, Mem: 128, OCIAuth: &OCIAuth{Username: user, Password: "wrong"}}, 256)
	if _, _, err := h.StartTask(wrong); err == nil {
		t.Fatal("pull with a wrong password succeeded")
	}

	tc := task(t, h, "private", &TaskConfig{OCIImage: ref, Mem: 128, OCIAuth: &OCIAuth{Username: user, Password: password}}, 256)
	th, _, err := h.StartTask(tc)
	if err != nil {
		t.Fatal(err)
	}
	// While the VM runs: no process carries the password.
	for _, pid := range vm.ProcessesMatching(password) {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		t.Errorf("process %d has the password in its arguments: %q", pid, b)
	}
	if res := wait(t, h, tc.ID); !res.Successful() {
		t.Errorf("private task: %+v", res)
	}
	waitLog(t, tc, "stdout", "private-hello")
	if strings.Contains(string(th.DriverState), password) {
		t.Error("the task state holds the password")
	}
	if strings.Contains(e.logs.String(), password) {
		t.Error("the plugin's log holds the password")
	}
	for _, m := range evs.messages(tc.ID) {
		if strings.Contains(m, password) {
			t.Errorf("task event holds the password: %s", m)
		}
	}
	if out, err := exec.Command("grep", "-rl", password, e.pc.DataDir).Output(); err == nil {
		t.Errorf("files under the data directory hold the password:\n%s", out)
	}
	if err := h.DestroyTask(tc.ID, false); err != nil {
		t.Fatal(err)
	}
	e.requireClean(t)
	_ = d
}

// A BootDisk task boots a prebuilt ext4 root from an allowed path, with an
// extra disk and the console log in the Log file.
func TestBootDiskWithDisksAndLog(t *testing.T) {
	e := newEnv(t)
	_, h := e.driver(t)
	allowed := filepath.Join(e.dir, "allowed")
	boot := vmtest.BusyboxRootfs(t, allowed, map[string]string{"etc/marker": "from-the-boot-disk\n"})
	data := vmtest.Scratch(t, allowed, 32<<20)

	tc := task(t, h, "bootdisk", &TaskConfig{
		BootDisk: boot, Mem: 128, Log: "local/console.log",
		Disks:   []string{data + ":rw:/data"},
		Command: "/bin/sh", Args: []string{"-c", `cat /etc/marker; echo written >/data/proof; echo ok-$(cat /data/proof)`},
	}, 256)
	if _, _, err := h.StartTask(tc); err != nil {
		t.Fatal(err)
	}
	if res := wait(t, h, tc.ID); !res.Successful() {
		t.Errorf("boot disk task: %+v", res)
	}
	out := waitLog(t, tc, "stdout", "ok-written")
	if !strings.Contains(out, "from-the-boot-disk\n") {
		t.Errorf("stdout:\n%s", out)
	}
	logBytes, err := os.ReadFile(filepath.Join(tc.TaskDir().Dir, "local", "console.log"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(logBytes), "guest ready") {
		t.Errorf("Log file: no guest init messages in:\n%s", logBytes)
	}
	if strings.Contains(string(logBytes), "ok-written") {
		t.Errorf("Log file has the workload's output:\n%s", logBytes)
	}
	if err := h.DestroyTask(tc.ID, false); err != nil {
		t.Fatal(err)
	}
	// The extra disk outlives the VM, with what the guest wrote.
	if got := imagetest.Cat(t, data, "/proof"); got != "written\n" {
		t.Errorf("extra disk /proof = %q", got)
	}
	e.requireClean(t)
}

// Destroying a running task needs force, and then kills its VM.
func TestDestroyRunningTask(t *testing.T) {
	e := newEnv(t)
	_, h := e.driver(t)
	ref := e.busybox(t, "sleeper", v1.Config{Cmd: []string{"/bin/sh", "-c", "echo up; exec sleep 600"}, Env: []string{"PATH=/bin"}})
	tc := task(t, h, "sleeper", &TaskConfig{OCIImage: ref, Mem: 128}, 256)
	if _, _, err := h.StartTask(tc); err != nil {
		t.Fatal(err)
	}
	waitLog(t, tc, "stdout", "up")
	if err := h.DestroyTask(tc.ID, false); err == nil {
		t.Fatal("DestroyTask without force removed a running task")
	}
	if len(e.vmmProcesses()) != 1 {
		t.Fatal("the VM is gone after a refused destroy")
	}
	if err := h.DestroyTask(tc.ID, true); err != nil {
		t.Fatal(err)
	}
	if err := h.DestroyTask(tc.ID, true); err == nil || !strings.Contains(err.Error(), drivers.ErrTaskNotFound.Error()) {
		t.Errorf("second destroy: %v", err)
	}
	e.requireClean(t)
}

// Exec is not offered: the capability says so and the call explains.
func TestExecNotSupported(t *testing.T) {
	e := newEnv(t)
	_, h := e.driver(t)
	caps, err := h.Capabilities()
	if err != nil {
		t.Fatal(err)
	}
	if caps.Exec || !caps.SendSignals {
		t.Errorf("capabilities: %+v", caps)
	}
	if _, err := h.ExecTask("no-such-task", []string{"true"}, time.Second); err == nil || !strings.Contains(err.Error(), "not found") {
		t.Errorf("ExecTask of an unknown task: %v", err)
	}
}

// A VM whose allocation Nomad deleted while no plugin ran is removed by
// the next plugin (after its start-up grace, here called directly).
func TestOrphanedVMRemoved(t *testing.T) {
	e := newEnv(t)
	d1, h1 := e.driver(t)
	ref := e.busybox(t, "orphan", v1.Config{Cmd: []string{"/bin/sh", "-c", "echo up; exec sleep 600"}, Env: []string{"PATH=/bin"}})
	tc := taskConfig(t, "orphan", &TaskConfig{OCIImage: ref, Mem: 128}, 256)
	tc.AllocDir = filepath.Join(t.TempDir(), "alloc")
	if err := os.MkdirAll(filepath.Join(tc.AllocDir, "orphan", "local"), 0o755); err != nil {
		t.Fatal(err)
	}
	keep := task(t, h1, "kept", &TaskConfig{OCIImage: ref, Mem: 128}, 256)
	for _, c := range []*drivers.TaskConfig{tc, keep} {
		if _, _, err := h1.StartTask(c); err != nil {
			t.Fatal(err)
		}
	}
	d1.Shutdown()
	if err := os.RemoveAll(tc.AllocDir); err != nil {
		t.Fatal(err)
	}

	d2, _ := e.driver(t)
	d2.removeOrphans(testCtx(t))
	if n := len(e.vmmProcesses()); n != 1 {
		t.Fatalf("%d VMMs after the orphan clean-up, want the kept task's only", n)
	}
	infos, err := d2.runtime().List()
	if err != nil {
		t.Fatal(err)
	}
	if len(infos) != 1 || infos[0].Labels[labelTask] != "kept" {
		t.Fatalf("instances after the clean-up: %+v", infos)
	}
	if err := d2.runtime().Remove(testCtx(t), infos[0].ID); err != nil {
		t.Fatal(err)
	}
}
