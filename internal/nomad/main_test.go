package nomad

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	hclog "github.com/hashicorp/go-hclog"
	"github.com/hashicorp/nomad/helper/uuid"
	nstructs "github.com/hashicorp/nomad/nomad/structs"
	"github.com/hashicorp/nomad/plugins/base"
	"github.com/hashicorp/nomad/plugins/drivers"
	dtestutil "github.com/hashicorp/nomad/plugins/drivers/testutils"

	"github.com/fireactions/fireactions/internal/image/imagetest"
	"github.com/fireactions/fireactions/internal/network/netnstest"
	"github.com/fireactions/fireactions/internal/runtime/runtimetest"
	"github.com/fireactions/fireactions/internal/vm"
	"github.com/fireactions/fireactions/internal/vm/vmtest"
)

func TestMain(m *testing.M) {
	// QEMU runs this binary as the metadata helper, and the driver runs
	// it as the log shipper.
	runtimetest.HelperMain()
	if len(os.Args) > 1 && os.Args[1] == ShipperArg {
		os.Exit(ShipperMain(os.Args[2:]))
	}
	// Static NICs and CNI networks need a network namespace of their own;
	// every test runs in it, which changes nothing for the others.
	netnstest.Main(m)
}

// syncBuffer collects the plugin's log output.
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

// testWriter sends log lines to t.Log until the test ends.
type testWriter struct {
	mu   sync.Mutex
	t    testing.TB
	done bool
}

func (w *testWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Log(strings.TrimRight(string(p), "\n"))
	}
	return len(p), nil
}

// env is one test's plugin setup: the test kernel and init, directories
// private to the test, and a registry with the test images.
type env struct {
	dir  string
	pc   PluginConfig
	reg  *imagetest.Registry
	logs *syncBuffer
}

func newEnv(t *testing.T) *env {
	t.Helper()
	vmtest.RequireQEMU(t)
	kernel, mods := runtimetest.Kernel(t)
	dir := t.TempDir()
	e := &env{dir: dir, logs: &syncBuffer{}}
	e.pc = PluginConfig{
		Kernel:            kernel,
		KernelModules:     mods,
		Init:              vmtest.Init(t),
		DataDir:           filepath.Join(dir, "data"),
		ImageCacheDir:     filepath.Join(dir, "images"),
		Backend:           "qemu",
		AllowedImagePaths: []string{filepath.Join(dir, "allowed")},
		AllowedDiskPaths:  []string{filepath.Join(dir, "allowed")},
		CNIConfDir:        filepath.Join(dir, "cni"),
		NetNSDir:          filepath.Join(dir, "netns"),
	}
	for _, d := range []string{"allowed", "cni"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() {
		// Whatever a failed test left running is killed, so the next
		// tests and the temporary directory's removal are not disturbed.
		for _, pid := range vm.ProcessesMatching(dir) {
			if p, err := os.FindProcess(pid); err == nil {
				_ = p.Kill()
			}
		}
	})
	return e
}

// registry returns the test's in-process registry, started on first use.
func (e *env) registry(t *testing.T) *imagetest.Registry {
	if e.reg == nil {
		e.reg = imagetest.NewRegistry(t)
	}
	return e.reg
}

// busybox pushes a busybox image with cfg and returns its reference.
func (e *env) busybox(t *testing.T, repo string, cfg v1.Config) string {
	t.Helper()
	return runtimetest.PushBusybox(t, e.registry(t), repo, cfg, nil)
}

// harness is Nomad's driver harness. Its Kill is not used: it closes the
// client (whose shutdown request stops the gRPC server) and stops the
// server itself at the same time, a data race inside go-plugin. The alloc
// dir clean-up closes the client, which stops the server once; a harness
// without alloc dirs idles until the test binary exits.
type harness struct {
	*dtestutil.DriverHarness
}

// driver returns a configured driver behind Nomad's plugin harness (the
// gRPC client and server Nomad itself uses).
func (e *env) driver(t *testing.T) (*Driver, *harness) {
	t.Helper()
	tw := &testWriter{t: t}
	t.Cleanup(func() { tw.mu.Lock(); tw.done = true; tw.mu.Unlock() })
	logger := hclog.New(&hclog.LoggerOptions{Name: "test", Level: hclog.Debug, Output: io.MultiWriter(tw, e.logs)})
	d := NewDriver(logger)
	h := &harness{DriverHarness: dtestutil.NewDriverHarness(t, d)}
	var data []byte
	if err := base.MsgPackEncode(&data, &e.pc); err != nil {
		t.Fatal(err)
	}
	if err := h.SetConfig(&base.Config{PluginConfig: data}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(d.Shutdown)
	return d, h
}

// task describes a task of a new allocation with cfg as its config, and
// makes its allocation directory with Nomad's log collector running.
func task(t *testing.T, h *harness, name string, cfg *TaskConfig, memoryMB int64) *drivers.TaskConfig {
	t.Helper()
	tc := taskConfig(t, name, cfg, memoryMB)
	cleanup := h.MkAllocDir(tc, true)
	t.Cleanup(cleanup)
	return tc
}

// bareTask is task without Nomad's log collector, for tasks that never
// start: its allocation directory is a plain directory tree. (The
// harness's own alloc dir clean-up also closes its connection.)
func bareTask(t *testing.T, name string, cfg *TaskConfig) *drivers.TaskConfig {
	t.Helper()
	tc := taskConfig(t, name, cfg, 256)
	tc.AllocDir = t.TempDir()
	if err := os.MkdirAll(filepath.Join(tc.AllocDir, name, "local"), 0o755); err != nil {
		t.Fatal(err)
	}
	return tc
}

func taskConfig(t *testing.T, name string, cfg *TaskConfig, memoryMB int64) *drivers.TaskConfig {
	t.Helper()
	allocID := uuid.Generate()
	tc := &drivers.TaskConfig{
		ID:      fmt.Sprintf("%s/%s/%s", allocID, name, uuid.Generate()[:8]),
		AllocID: allocID,
		Name:    name,
		JobName: "test-job",
		Env:     map[string]string{"FROM_JOB": "job-value"},
		Resources: &drivers.Resources{
			NomadResources: &nstructs.AllocatedTaskResources{
				Memory: nstructs.AllocatedMemoryResources{MemoryMB: memoryMB},
				Cpu:    nstructs.AllocatedCpuResources{CpuShares: 500},
			},
			LinuxResources: &drivers.LinuxResources{MemoryLimitBytes: memoryMB << 20, CPUShares: 500},
		},
	}
	if err := tc.EncodeConcreteDriverConfig(cfg); err != nil {
		t.Fatal(err)
	}
	return tc
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// wait returns the task's exit result.
func wait(t *testing.T, h *harness, taskID string) *drivers.ExitResult {
	t.Helper()
	ctx := testCtx(t)
	ch, err := h.WaitTask(ctx, taskID)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case res := <-ch:
		if res == nil {
			t.Fatal("WaitTask: channel closed without a result")
		}
		return res
	case <-ctx.Done():
		t.Fatalf("task %s did not end", taskID)
	}
	return nil
}

// logFile returns what Nomad's log collector wrote for the task's stream
// ("stdout" or "stderr") so far.
func logFile(t *testing.T, tc *drivers.TaskConfig, stream string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(tc.TaskDir().LogDir, fmt.Sprintf("%s.%s.0", tc.Name, stream)))
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	return string(b)
}

// waitLog waits until the task's stream contains want; the log collector
// writes asynchronously.
func waitLog(t *testing.T, tc *drivers.TaskConfig, stream, want string) string {
	t.Helper()
	ctx := testCtx(t)
	for {
		out := logFile(t, tc, stream)
		if strings.Contains(out, want) {
			return out
		}
		select {
		case <-ctx.Done():
			t.Fatalf("%s of %s: no %q in:\n%s", stream, tc.Name, want, out)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// vmmProcesses lists the VMM processes of the test's data directory.
func (e *env) vmmProcesses() []int {
	var out []int
	for _, pid := range vm.ProcessesMatching(filepath.Join(e.pc.DataDir, "vms")) {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if argv0, _, _ := strings.Cut(string(b), "\x00"); strings.Contains(filepath.Base(argv0), "qemu-system") {
			out = append(out, pid)
		}
	}
	return out
}

// events collects the driver's task events.
type events struct {
	mu  sync.Mutex
	evs []*drivers.TaskEvent
}

func collectEvents(t *testing.T, h *harness) *events {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	ch, err := h.TaskEvents(ctx)
	if err != nil {
		t.Fatal(err)
	}
	e := &events{}
	go func() {
		for ev := range ch {
			e.mu.Lock()
			e.evs = append(e.evs, ev)
			e.mu.Unlock()
		}
	}()
	return e
}

// messages returns the messages of the task's events so far.
func (e *events) messages(taskID string) []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	var out []string
	for _, ev := range e.evs {
		if ev.TaskID == taskID {
			out = append(out, ev.Message)
		}
	}
	return out
}

// waitEvent waits for an event of the task whose message contains want.
func (e *events) waitEvent(t *testing.T, taskID, want string) {
	t.Helper()
	ctx := testCtx(t)
	for {
		for _, m := range e.messages(taskID) {
			if strings.Contains(m, want) {
				return
			}
		}
		select {
		case <-ctx.Done():
			t.Fatalf("no task event %q among:\n%s", want, strings.Join(e.messages(taskID), "\n"))
		case <-time.After(50 * time.Millisecond):
		}
	}
}
