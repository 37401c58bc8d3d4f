package cli

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/fireactions/fireactions/internal/image"
	"github.com/fireactions/fireactions/internal/image/imagetest"
	"github.com/fireactions/fireactions/internal/runtime"
	"github.com/fireactions/fireactions/internal/runtime/runtimetest"
	"github.com/fireactions/fireactions/internal/vm"
	"github.com/fireactions/fireactions/internal/vm/qemu"
	"github.com/fireactions/fireactions/internal/vm/vmtest"
)

// asMainEnv makes the test binary behave as the fireactions executable, so
// tests can signal and kill a real `fireactions vm run` process.
const asMainEnv = "FIREACTIONS_CLI_TEST_AS_MAIN"

func TestMain(m *testing.M) {
	// QEMU runs the executable (this binary) to serve each metadata
	// connection: through the hidden command, as with the real binary.
	if len(os.Args) > 1 && os.Args[1] == qemu.MetadataHelperArg || os.Getenv(asMainEnv) != "" {
		os.Exit(Main(os.Args[1:], os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
}

// vmEnv is one test's data directory, test kernel, guest init and image.
type vmEnv struct {
	dir, missingConfig, ref string
}

func newVMEnv(t *testing.T) *vmEnv {
	t.Helper()
	kernel, _ := runtimetest.Kernel(t)
	t.Setenv(envKernel, kernel)
	t.Setenv(envKernelModules, "") // found next to the kernel
	t.Setenv("FIREACTIONS_INIT", vmtest.Init(t))
	e := &vmEnv{dir: t.TempDir(), missingConfig: filepath.Join(t.TempDir(), "none.yaml")}
	t.Cleanup(func() {
		// Whatever a failed test left running goes with it.
		for _, pid := range vm.ProcessesMatching(e.dir) {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	})
	reg := imagetest.NewRegistry(t)
	e.ref = runtimetest.PushBusybox(t, reg, "cli", v1.Config{
		Entrypoint: []string{"/bin/sh", "-c"},
		Cmd:        []string{`echo "env=$FOO wd=$(pwd) uid=$(id -u)"; echo to-stderr >&2; exit 3`},
		Env:        []string{"PATH=/bin", "FOO=image"},
		WorkingDir: "/work",
		User:       "nobody",
	}, nil)
	return e
}

func (e *vmEnv) args(args ...string) []string {
	return append([]string{"--config", e.missingConfig, "--data-dir", e.dir}, args...)
}

// cli runs the command line in this process.
func (e *vmEnv) cli(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	code := Main(e.args(args...), &out, &errb)
	return code, out.String(), errb.String()
}

// run is `vm run --insecure REF -- script` plus flags before the image.
func (e *vmEnv) run(t *testing.T, script string, flags ...string) (int, string, string) {
	t.Helper()
	args := append(append([]string{"vm", "run", "--insecure", "--memory", "256"}, flags...), e.ref)
	if script != "" {
		args = append(args, "--", script)
	}
	return e.cli(t, args...)
}

func (e *vmEnv) baseSum(t *testing.T) [32]byte {
	t.Helper()
	s, err := image.Open(filepath.Join(e.dir, "images"), image.Options{})
	if err != nil {
		t.Fatal(err)
	}
	img, err := s.Get(e.ref, "")
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(img.BasePath)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

func TestVMRunImageConfigExitCodesAndScratch(t *testing.T) {
	e := newVMEnv(t)

	// The image's own process, Env, WorkingDir and User; its exit code.
	code, stdout, stderr := e.run(t, "")
	if code != 3 {
		t.Errorf("exit code %d, want the workload's 3\nstderr:\n%s", code, stderr)
	}
	if stdout != "env=image wd=/work uid=65534\n" {
		t.Errorf("stdout %q: want the image's Env, WorkingDir and User, and nothing else", stdout)
	}
	if !strings.Contains(stderr, "to-stderr\n") || !strings.Contains(stderr, "using qemu") {
		t.Errorf("stderr should hold the workload's stderr and which backend was picked and why:\n%s", stderr)
	}
	sum := e.baseSum(t)

	// A command override, flags over the image's config, a write to the
	// root file system and the scratch size as the guest sees it.
	code, stdout, stderr = e.run(t, `echo "env=$FOO wd=$(pwd) uid=$(id -u)"; echo data >/bin/written-by-vm; df -k / | awk 'NR==2 {print "size=" $2}'`,
		"-e", "FOO=flag", "--user", "0", "--workdir", "/tmp", "--disk-size", "300MiB")
	if code != 0 {
		t.Fatalf("exit code %d\n%s%s", code, stdout, stderr)
	}
	if !strings.HasPrefix(stdout, "env=flag wd=/tmp uid=0\n") {
		t.Errorf("stdout %q: -e, --workdir and --user override the image's", stdout)
	}
	var size int
	if _, err := fmt.Sscanf(stdout[strings.Index(stdout, "size="):], "size=%d", &size); err != nil || size < 250_000 || size > 300*1024 {
		t.Errorf("root file system of %d KiB (%v); want about the 300MiB scratch disk", size, err)
	}
	if e.baseSum(t) != sum {
		t.Error("the VM's writes changed the read-only base")
	}
	code, stdout, _ = e.run(t, `test -e /bin/written-by-vm && echo leaked || echo clean`)
	if code != 0 || stdout != "clean\n" {
		t.Errorf("a later VM sees an earlier VM's writes: %q (exit %d)", stdout, code)
	}

	// Death by signal: 128+9, like a shell.
	if code, _, stderr := e.run(t, `kill -KILL $$`); code != 137 {
		t.Errorf("killed workload: exit code %d, want 137\n%s", code, stderr)
	}
	// A workload that outlives --timeout is stopped: 124, like timeout(1).
	if code, _, stderr := e.run(t, `echo started; exec sleep 600`, "--timeout", "3s", "--stop-timeout", "5s"); code != exitTimeout || !strings.Contains(stderr, "--timeout") {
		t.Errorf("--timeout: exit code %d, want %d\n%s", code, exitTimeout, stderr)
	}
	runtimetest.RequireNoLeftovers(t, e.dir)
}

func TestVMDetachLsLogsStopRm(t *testing.T) {
	e := newVMEnv(t)
	code, stdout, stderr := e.run(t, `echo bg-started; exec sleep 600`, "--detach", "--name", "bg")
	if code != 0 || stdout != "bg\n" {
		t.Fatalf("run --detach: exit %d, stdout %q\n%s", code, stdout, stderr)
	}
	waitForCLI(t, func() bool {
		_, out, _ := e.cli(t, "vm", "logs", "bg")
		return out == "bg-started\n"
	})

	// A second VM from the same base while the first runs.
	if code, stdout, stderr := e.run(t, `echo second`); code != 0 || stdout != "second\n" {
		t.Fatalf("second VM: exit %d, %q\n%s", code, stdout, stderr)
	}
	code, stdout, _ = e.cli(t, "vm", "ls")
	if code != 0 || !strings.Contains(stdout, "ID") || !regexpLine(stdout, "bg", e.ref, "running", "qemu") {
		t.Errorf("vm ls:\n%s", stdout)
	}
	var list []runtime.Info
	_, stdout, _ = e.cli(t, "vm", "ls", "--json")
	if err := json.Unmarshal([]byte(stdout), &list); err != nil || len(list) != 1 || list[0].ID != "bg" || list[0].State != runtime.StateRunning || list[0].Pid == 0 {
		t.Fatalf("vm ls --json: %v\n%s", err, stdout)
	}
	if code, _, stderr := e.cli(t, "vm", "rm", "bg"); code == 0 || !strings.Contains(stderr, "vm stop bg") {
		t.Errorf("vm rm of a running VM: exit %d, %s", code, stderr)
	}

	code, stdout, stderr = e.cli(t, "vm", "stop", "--time", "20s", "bg")
	if code != 0 || !strings.HasPrefix(stdout, "bg: stopped") {
		t.Fatalf("vm stop: exit %d, %q\n%s", code, stdout, stderr)
	}
	if vm.ProcessesMatching(filepath.Join(e.dir, "vms", "bg")) != nil {
		t.Error("the VMM still runs after vm stop")
	}
	_, stdout, _ = e.cli(t, "vm", "ls")
	if !regexpLine(stdout, "bg", "exited") {
		t.Errorf("vm ls after stop:\n%s", stdout)
	}
	if _, stdout, _ := e.cli(t, "vm", "logs", "bg"); stdout != "bg-started\n" {
		t.Errorf("logs of a stopped VM: %q", stdout)
	}
	if code, stdout, stderr := e.cli(t, "vm", "rm", "bg"); code != 0 || stdout != "bg\n" {
		t.Fatalf("vm rm: %d %q %s", code, stdout, stderr)
	}
	runtimetest.RequireNoLeftovers(t, e.dir)
}

// regexpLine reports whether one line of out holds all the fields.
func regexpLine(out string, fields ...string) bool {
	for _, l := range strings.Split(out, "\n") {
		f := strings.Fields(l)
		ok := len(f) > 0
		for _, want := range fields {
			found := false
			for _, x := range f {
				if x == want {
					found = true
				}
			}
			ok = ok && found
		}
		if ok {
			return true
		}
	}
	return false
}

func waitForCLI(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met in time")
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// child starts `fireactions vm run ... -- script` as a process of its own
// and returns once the workload printed "ready".
func (e *vmEnv) child(t *testing.T, script string) (*exec.Cmd, *bytes.Buffer, *bytes.Buffer) {
	t.Helper()
	cmd := exec.Command(os.Args[0], e.args("vm", "run", "--insecure", "--memory", "256", e.ref, "--", script)...)
	cmd.Env = append(os.Environ(), asMainEnv+"=1")
	var stderr, rest bytes.Buffer
	cmd.Stderr = &stderr
	pipe, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	r := bufio.NewReader(pipe)
	line, err := r.ReadString('\n')
	if err != nil || line != "ready\n" {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("child: %q, %v\n%s", line, err, stderr.String())
	}
	go io.Copy(&rest, r)
	return cmd, &rest, &stderr
}

func TestVMRunCtrlCStopsAndRemoves(t *testing.T) {
	e := newVMEnv(t)
	cmd, stdout, stderr := e.child(t, `trap 'echo got-term; exit 5' TERM; echo ready; while :; do sleep 0.2; done`)
	if err := cmd.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	err := cmd.Wait()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 5 {
		t.Fatalf("vm run after Ctrl-C: %v; want the workload's exit code 5 (its TERM trap ran)\n%s", err, stderr)
	}
	if !strings.Contains(stdout.String(), "got-term") {
		t.Errorf("the workload did not get its stop signal: %q", stdout)
	}
	runtimetest.RequireNoLeftovers(t, e.dir)
}

func TestVMRunKill9ThenLsCleansUp(t *testing.T) {
	e := newVMEnv(t)
	cmd, _, _ := e.child(t, `echo ready; exec sleep 600`)
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	cmd.Wait()
	// The VM outlives its process (it runs in its own session)...
	ents, _ := os.ReadDir(filepath.Join(e.dir, "vms"))
	if len(ents) != 1 || vm.ProcessesMatching(filepath.Join(e.dir, "vms", ents[0].Name())) == nil {
		t.Fatalf("expected the orphaned VM to be running: %v", ents)
	}
	// ...until the next vm command finds its owner gone.
	code, stdout, stderr := e.cli(t, "vm", "ls")
	if code != 0 || strings.Count(stdout, "\n") != 1 {
		t.Errorf("vm ls: exit %d\n%s%s", code, stdout, stderr)
	}
	runtimetest.RequireNoLeftovers(t, e.dir)
}

func TestVMCommandErrors(t *testing.T) {
	e := &vmEnv{dir: t.TempDir(), missingConfig: filepath.Join(t.TempDir(), "none.yaml"), ref: "127.0.0.1:1/none:latest"}
	t.Setenv(envKernel, filepath.Join(e.dir, "no-vmlinux"))
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"vm", "run", e.ref}, "scripts/test-kernel.sh"},
		{[]string{"vm", "run", "--net", "bridge", e.ref}, "--net"},
		{[]string{"vm", "run", "--pull", "sometimes", e.ref}, "--pull"},
		{[]string{"vm", "run", "-e", "NOEQUALS", e.ref}, "KEY=VALUE"},
		{[]string{"vm", "run", "--disk-size", "lots", e.ref}, "--disk-size"},
		{[]string{"vm", "run", "--backend", "xen", e.ref}, "--backend"},
		{[]string{"vm", "run", "--disk", "/x:maybe", e.ref}, "--disk"},
		{[]string{"vm", "run", e.ref, "echo", "hi"}, "put the command after --"},
		{[]string{"vm", "stop", "nosuch"}, "no such"},
		{[]string{"vm", "logs", "nosuch"}, "no such"},
		{[]string{"vm", "rm", "nosuch"}, "no such"},
	} {
		code, _, stderr := e.cli(t, c.args...)
		if code == 0 || !strings.Contains(stderr, c.want) {
			t.Errorf("%s: exit %d, stderr %q; want an error mentioning %q", strings.Join(c.args, " "), code, stderr, c.want)
		}
	}
}

func TestExitFor(t *testing.T) {
	for _, c := range []struct {
		es   vm.ExitStatus
		want int
	}{
		{vm.ExitStatus{Reason: vm.ReasonWorkloadExit, WorkloadExited: true}, 0},
		{vm.ExitStatus{Reason: vm.ReasonWorkloadExit, WorkloadExited: true, Code: 42}, 42},
		{vm.ExitStatus{Reason: vm.ReasonStopped, WorkloadExited: true, Code: 143, Signal: 15}, 143},
		{vm.ExitStatus{Reason: vm.ReasonStopped}, exitStopped},
		{vm.ExitStatus{Reason: vm.ReasonTimeout}, exitTimeout},
		{vm.ExitStatus{Reason: vm.ReasonTimeout, WorkloadExited: true, Code: 143, Signal: 15}, exitTimeout},
		{vm.ExitStatus{Reason: vm.ReasonGuestShutdown}, 0},
		{vm.ExitStatus{Reason: vm.ReasonGuestShutdown, Message: "Kernel panic - not syncing"}, exitVMFailed},
		{vm.ExitStatus{Reason: vm.ReasonGuestError, Message: "sh: not found"}, exitVMFailed},
		{vm.ExitStatus{Reason: vm.ReasonVMMCrash}, exitVMFailed},
	} {
		err := exitFor("x", c.es)
		got := 0
		var ee *ExitError
		if errors.As(err, &ee) {
			got = ee.Code
		} else if err != nil {
			got = -1
		}
		if got != c.want {
			t.Errorf("%s: exit %d, want %d", c.es, got, c.want)
		}
	}
}
