package runtime_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/fireactions/fireactions/internal/guest"
	"github.com/fireactions/fireactions/internal/image"
	"github.com/fireactions/fireactions/internal/image/imagetest"
	"github.com/fireactions/fireactions/internal/metadata"
	"github.com/fireactions/fireactions/internal/network/netnstest"
	"github.com/fireactions/fireactions/internal/runtime"
	"github.com/fireactions/fireactions/internal/runtime/runtimetest"
	"github.com/fireactions/fireactions/internal/vm"
	"github.com/fireactions/fireactions/internal/vm/qemu"
)

// helperEnv makes the test binary a "previous fireactions process": it
// starts VMs with the runtime, reports them and waits to be killed.
const helperEnv = "FIREACTIONS_RUNTIME_TEST_HELPER"

func TestMain(m *testing.M) {
	runtimetest.HelperMain()
	if spec := os.Getenv(helperEnv); spec != "" {
		os.Exit(runAndHang(spec))
	}
	// The network test needs a namespace of its own; every test runs in
	// it, which changes nothing for the others.
	netnstest.Main(m)
}

// helperSpec is what the parent hands runAndHang.
type helperSpec struct {
	Options runtime.Options
	Runs    []helperRun
}

type helperRun struct {
	ID, Image string
	Args      []string
	Labels    map[string]string
}

func runAndHang(spec string) int {
	var hs helperSpec
	if err := json.Unmarshal([]byte(spec), &hs); err != nil {
		fmt.Println("ERROR", err)
		return 1
	}
	hs.Options.Backends = []vm.Backend{qemu.New(qemu.Options{})}
	rt, err := runtime.New(hs.Options)
	if err != nil {
		fmt.Println("ERROR", err)
		return 1
	}
	for _, r := range hs.Runs {
		inst, err := rt.Run(context.Background(), runtime.Request{ID: r.ID, Image: r.Image, Args: r.Args, Labels: r.Labels,
			Pull: image.PullOptions{Insecure: true}, MemoryMiB: 256})
		if err != nil {
			fmt.Println("ERROR", err)
			return 1
		}
		in, _ := inst.Inspect()
		fmt.Println("STARTED", inst.ID(), in.Pid)
	}
	select {}
}

func ctxFor(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// newRuntime opens a runtime over a fresh data directory and checks at the
// end of the test that nothing is left.
func newRuntime(t *testing.T) (*runtime.Runtime, string) {
	t.Helper()
	dir := t.TempDir()
	rt, err := runtime.New(runtimetest.Options(t, dir))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rt.Close() })
	return rt, dir
}

// appImage is a busybox image whose config sets what the guest must honour.
func appImage(t *testing.T, reg *imagetest.Registry) string {
	return runtimetest.PushBusybox(t, reg, "app", v1.Config{
		Entrypoint: []string{"/bin/sh", "-c"},
		Cmd:        []string{`echo "out:$FOO:$BAR:$(pwd):$(id -u)"; echo err >&2; exit 3`},
		Env:        []string{"PATH=/bin", "FOO=from-image", "BAR=from-image"},
		WorkingDir: "/srv/app",
		User:       "nobody",
		StopSignal: "SIGUSR1",
	}, nil)
}

type eventLog struct {
	mu sync.Mutex
	ev []runtime.Event
}

func (l *eventLog) add(e runtime.Event) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if e.Progress == nil {
		l.ev = append(l.ev, e)
	}
}

func (l *eventLog) done(p runtime.Phase) (runtime.Event, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, e := range l.ev {
		if e.Phase == p && e.Done {
			return e, true
		}
	}
	return runtime.Event{}, false
}

func output(t *testing.T, inst *runtime.Instance) (string, string) {
	t.Helper()
	var o, e bytes.Buffer
	if err := inst.Output(ctxFor(t), &o, &e); err != nil {
		t.Fatal(err)
	}
	return o.String(), e.String()
}

func TestRunHonoursImageConfigAndReleasesEverything(t *testing.T) {
	reg := imagetest.NewRegistry(t)
	ref := appImage(t, reg)
	rt, dir := newRuntime(t)
	ctx := ctxFor(t)

	var events eventLog
	inst, err := rt.Run(ctx, runtime.Request{
		Image: ref, Pull: insecure(), Env: []string{"BAR=from-request"},
		Labels: map[string]string{"owner": "test"}, Events: events.add, MemoryMiB: 256,
	})
	if err != nil {
		t.Fatal(err)
	}
	// While it runs, the base is leased and the resources are on record.
	_, digest := inst.Image()
	leases, err := rt.Images().Leases(digest)
	if err != nil || len(leases) != 1 || leases[0].ID != inst.ID() {
		t.Fatalf("leases on %s: %+v, %v; want one named %s", digest, leases, err, inst.ID())
	}
	in, err := inst.Inspect()
	if err != nil || in.Labels["owner"] != "test" || in.Image != ref || in.Backend != "qemu" {
		t.Fatalf("inspect: %+v, %v", in, err)
	}
	if _, err := inst.WaitStarted(ctx, events.add); err != nil {
		t.Fatal(err)
	}
	es, err := inst.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	stdout, stderr := output(t, inst)
	if !es.WorkloadExited || es.Code != 3 {
		t.Errorf("exit: %s; want the workload's code 3", es)
	}
	if want := "out:from-image:from-request:/srv/app:65534\n"; stdout != want {
		t.Errorf("stdout %q, want %q (image Env and WorkingDir, request Env over it, image User)", stdout, want)
	}
	if stderr != "err\n" {
		t.Errorf("stderr %q, want %q", stderr, "err\n")
	}
	for _, p := range []runtime.Phase{runtime.PhaseBackend, runtime.PhasePull, runtime.PhaseScratch, runtime.PhaseInitramfs, runtime.PhaseBoot, runtime.PhaseStarted} {
		if _, ok := events.done(p); !ok {
			t.Errorf("no %s event; got %+v", p, events.ev)
		}
	}
	if e, _ := events.done(runtime.PhasePull); e.Cached {
		t.Errorf("first pull reported as cached")
	}
	if err := inst.Remove(ctx); err != nil {
		t.Fatal(err)
	}
	runtimetest.RequireNoLeftovers(t, dir)
	if _, err := rt.Inspect(inst.ID()); !errors.Is(err, runtime.ErrNotFound) {
		t.Errorf("inspect after remove: %v, want ErrNotFound", err)
	}

	// Again from the cache, with the command and the entrypoint replaced.
	var again eventLog
	inst, err = rt.Run(ctx, runtime.Request{ID: "override", Image: ref, Pull: insecure(), Events: again.add, MemoryMiB: 256,
		Args: []string{`echo "args:$0:$(id -u)"`}, User: "0", WorkingDir: "/tmp"})
	if err != nil {
		t.Fatal(err)
	}
	if es, err := inst.Wait(ctx); err != nil || !es.WorkloadExited || es.Code != 0 {
		t.Fatalf("override: %s, %v", es, err)
	}
	if stdout, _ := output(t, inst); stdout != "args:/bin/sh:0\n" {
		t.Errorf("stdout %q: args after the image's Entrypoint [/bin/sh -c], user 0", stdout)
	}
	if e, _ := again.done(runtime.PhasePull); !e.Cached {
		t.Errorf("second pull of the same image not served from the cache: %+v", e)
	}
	if err := inst.Remove(ctx); err != nil {
		t.Fatal(err)
	}
	runtimetest.RequireNoLeftovers(t, dir)
}

func insecure() image.PullOptions { return image.PullOptions{Insecure: true} }

func TestRunFailuresLeaveNothing(t *testing.T) {
	reg := imagetest.NewRegistry(t)
	ref := appImage(t, reg)
	rt, dir := newRuntime(t)
	ctx := ctxFor(t)

	// The VMM refuses the kernel: the image was pulled and leased, the
	// scratch disk made, the initramfs built; all of it must go.
	bad := filepath.Join(t.TempDir(), "vmlinux")
	if err := os.WriteFile(bad, bytes.Repeat([]byte("not a kernel "), 400), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := rt.Run(ctx, runtime.Request{ID: "badkernel", Image: ref, Pull: insecure(), Kernel: bad})
	if err == nil || !strings.Contains(err.Error(), "kernel") {
		t.Fatalf("run with a broken kernel: %v; want QEMU's complaint about the kernel", err)
	}
	runtimetest.RequireNoLeftovers(t, dir)

	// No such image.
	if _, err := rt.Run(ctx, runtime.Request{Image: reg.Host + "/nothing:here", Pull: insecure()}); err == nil {
		t.Fatal("run of a missing image succeeded")
	}
	runtimetest.RequireNoLeftovers(t, dir)

	// An image without a command.
	empty := runtimetest.PushBusybox(t, reg, "nocmd", v1.Config{}, nil)
	if _, err := rt.Run(ctx, runtime.Request{Image: empty, Pull: insecure()}); err == nil || !strings.Contains(err.Error(), "no Entrypoint or Cmd") {
		t.Fatalf("run of an image without a command: %v", err)
	}
	runtimetest.RequireNoLeftovers(t, dir)

	// Cancelled while starting.
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := rt.Run(cctx, runtime.Request{Image: ref, Pull: insecure()}); !errors.Is(err, context.Canceled) {
		t.Fatalf("run with a cancelled context: %v", err)
	}
	runtimetest.RequireNoLeftovers(t, dir)

	// Bad requests name the field.
	for _, c := range []struct {
		req  runtime.Request
		want string
	}{
		{runtime.Request{}, "image: required"},
		{runtime.Request{Image: ref, BootDisk: "/x"}, "boot_disk: give either"},
		{runtime.Request{Image: ref, Env: []string{"NOEQUALS"}}, "env[0]"},
		{runtime.Request{Image: ref, ID: "no/slash"}, "instance id"},
		{runtime.Request{Image: ref, DiskSize: 1 << 10}, "disk_size"},
		{runtime.Request{Image: ref, Mode: "vm"}, "mode"},
		{runtime.Request{Image: ref, Network: runtime.Network{UseCNI: true}}, "no network manager"},
	} {
		_, err := rt.Run(ctx, c.req)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("run %+v: %v; want an error naming %q", c.req, err, c.want)
		}
	}
	runtimetest.RequireNoLeftovers(t, dir)
}

// startInChild runs reqs from a child process that is then killed with
// SIGKILL, leaving its VMs without an owner. It returns the VMM pids.
func startInChild(t *testing.T, opts runtime.Options, reqs ...helperRun) map[string]int {
	t.Helper()
	opts.Backends = nil
	b, err := json.Marshal(helperSpec{Options: opts, Runs: reqs})
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"="+string(b))
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pids := map[string]int{}
	dec := make([]byte, 0, 4096)
	buf := make([]byte, 4096)
	for len(pids) < len(reqs) {
		n, err := out.Read(buf)
		dec = append(dec, buf[:n]...)
		for {
			i := bytes.IndexByte(dec, '\n')
			if i < 0 {
				break
			}
			line := string(dec[:i])
			dec = dec[i+1:]
			var id string
			var pid int
			if _, err := fmt.Sscanf(line, "STARTED %s %d", &id, &pid); err == nil {
				pids[id] = pid
			} else {
				cmd.Process.Kill()
				cmd.Wait()
				t.Fatalf("helper: %s", line)
			}
		}
		if err != nil && len(pids) < len(reqs) {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatalf("helper output: %v", err)
		}
	}
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	cmd.Wait()
	return pids
}

func TestRecoverAfterKill9(t *testing.T) {
	reg := imagetest.NewRegistry(t)
	ref := runtimetest.PushBusybox(t, reg, "sleeper", v1.Config{Entrypoint: []string{"/bin/sh", "-c"}, Env: []string{"PATH=/bin"}}, nil)
	dir := t.TempDir()
	opts := runtimetest.Options(t, dir)
	ctx := ctxFor(t)

	pool := map[string]string{"pool": "a"}
	pids := startInChild(t, opts,
		helperRun{ID: "live", Image: ref, Labels: pool, Args: []string{`trap 'echo "got-usr1 k=$(wget -q -O - http://169.254.169.254/latest/meta-data/k)"' USR1; echo up; while :; do sleep 0.2; done`}},
		helperRun{ID: "dead", Image: ref, Labels: pool, Args: []string{"sleep 600"}},
		helperRun{ID: "other", Image: ref, Labels: map[string]string{"pool": "b"}, Args: []string{"sleep 600"}},
	)
	// The VMM of "dead" dies while nobody owns it.
	if err := syscall.Kill(pids["dead"], syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return gone(pids["dead"]) })

	rt, err := runtime.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	defer rt.Close()
	res, err := rt.Recover(ctx, runtime.RecoverOptions{Match: func(l map[string]string) bool { return l["pool"] == "a" }})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Adopted) != 1 || res.Adopted[0].ID() != "live" || res.Adopted[0].Labels()["pool"] != "a" {
		t.Fatalf("adopted %+v; want the live VM with its labels", res.Adopted)
	}
	if len(res.Cleaned) != 1 || res.Cleaned[0].ID != "dead" || res.Cleaned[0].Labels["pool"] != "a" || res.Cleaned[0].Exit == nil {
		t.Fatalf("cleaned %+v; want the dead VM with its labels and exit", res.Cleaned)
	}
	if _, err := rt.Inspect("dead"); !errors.Is(err, runtime.ErrNotFound) {
		t.Errorf("dead VM still there: %v", err)
	}
	// "other" was not selected: it still runs, and still holds its lease.
	if in, err := rt.Inspect("other"); err != nil || in.State != runtime.StateRunning {
		t.Errorf("other: %+v, %v; want it left running", in, err)
	}

	// The adopted VM is fully controllable: signal, stop, remove.
	live := res.Adopted[0]
	if _, err := live.WaitStarted(ctx, nil); err != nil {
		t.Fatal(err)
	}
	var o bytes.Buffer
	waitFor(t, func() bool {
		o.Reset()
		_ = live.Logs(ctx, vm.LogOptions{Stdout: &o})
		return strings.Contains(o.String(), "up")
	})
	// New metadata, then a signal that makes the workload read it.
	if err := live.UpdateMetadata(ctx, metadata.Input{Metadata: map[string]string{"k": "v2"}}); err != nil {
		t.Fatal(err)
	}
	if err := live.Signal(ctx, syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool {
		o.Reset()
		_ = live.Logs(ctx, vm.LogOptions{Stdout: &o})
		return strings.Contains(o.String(), "got-usr1 k=v2")
	})
	es, err := live.Stop(ctx, 20*time.Second)
	if err != nil || es.Reason != vm.ReasonStopped {
		t.Fatalf("stop: %s, %v", es, err)
	}
	if err := live.Remove(ctx); err != nil {
		t.Fatal(err)
	}
	// Attach takes over the unselected one; Remove then frees it all.
	other, err := rt.Attach(ctx, "other")
	if err != nil {
		t.Fatal(err)
	}
	if other.Labels()["pool"] != "b" {
		t.Errorf("attached labels %v", other.Labels())
	}
	if err := other.Remove(ctx); err != nil {
		t.Fatal(err)
	}
	runtimetest.RequireNoLeftovers(t, dir)
}

// gone reports whether pid has exited (a zombie counts).
func gone(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	i := bytes.LastIndexByte(b, ')')
	return i >= 0 && len(b) > i+2 && b[i+2] == 'Z'
}

// waitFor polls cond until it holds or the test's patience ends.
func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met in time")
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func TestBootDiskSystemMode(t *testing.T) {
	reg := imagetest.NewRegistry(t)
	// A root file system with its own init, used as a prebuilt boot disk.
	ref := runtimetest.PushBusybox(t, reg, "system", v1.Config{}, map[string]string{
		"sbin/init": "#!/bin/sh\necho system-init-$$ on $(hostname)\nreboot -f\n",
	})
	rt, dir := newRuntime(t)
	ctx := ctxFor(t)
	img, err := rt.Images().Pull(ctx, ref, insecure())
	if err != nil {
		t.Fatal(err)
	}
	disk := filepath.Join(t.TempDir(), "boot.ext4")
	data, err := os.ReadFile(img.BasePath)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(disk, data, 0o644); err != nil {
		t.Fatal(err)
	}
	inst, err := rt.Run(ctx, runtime.Request{ID: "sys", BootDisk: disk, Hostname: "bootdisk", MemoryMiB: 256})
	if err != nil {
		t.Fatal(err)
	}
	if inst.Mode() != guest.ModeSystem {
		t.Errorf("mode %s; a boot disk without a command boots its own init", inst.Mode())
	}
	es, err := inst.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	stdout, _ := output(t, inst)
	if es.Reason != vm.ReasonGuestShutdown || !strings.Contains(stdout, "system-init-1 on bootdisk") {
		t.Errorf("exit %s, console:\n%s\nwant the image's init as PID 1 and a guest shutdown", es, stdout)
	}
	if err := inst.Remove(ctx); err != nil {
		t.Fatal(err)
	}
	runtimetest.RequireNoLeftovers(t, dir)
	if _, err := os.Stat(disk); err != nil {
		t.Errorf("the boot disk belongs to the user and must stay: %v", err)
	}
}

func TestParseDiskAndNetwork(t *testing.T) {
	d, err := runtime.ParseDisk("/data/x.ext4:ro", 2)
	if err != nil || d != (runtime.Disk{Path: "/data/x.ext4", ReadOnly: true, MountPoint: "/mnt/disk2"}) {
		t.Errorf("ParseDisk ro: %+v, %v", d, err)
	}
	d, err = runtime.ParseDisk("/data/x.ext4:rw:/var/cache", 0)
	if err != nil || d != (runtime.Disk{Path: "/data/x.ext4", MountPoint: "/var/cache"}) {
		t.Errorf("ParseDisk rw with mount point: %+v, %v", d, err)
	}
	for _, bad := range []string{"/x", "/x:rx", ":ro", "/x:ro:relative", "/x:ro:/", "/x:ro:/a:b"} {
		if _, err := runtime.ParseDisk(bad, 0); err == nil {
			t.Errorf("ParseDisk(%q) accepted", bad)
		}
	}
	for in, want := range map[string]string{"": "none", "none": "none", "cni": "cni", "cni:build": "cni:build"} {
		n, err := runtime.ParseNetwork(in)
		if err != nil || n.String() != want {
			t.Errorf("ParseNetwork(%q) = %v, %v; want %s", in, n, err, want)
		}
	}
	for _, bad := range []string{"bridge", "cni:", "host"} {
		if _, err := runtime.ParseNetwork(bad); err == nil {
			t.Errorf("ParseNetwork(%q) accepted", bad)
		}
	}
	if id := runtime.NewID(); runtime.CheckID(id) != nil || len(id) != 12 || slices.Contains([]string{runtime.NewID(), runtime.NewID()}, id) {
		t.Errorf("NewID %q", id)
	}
}
