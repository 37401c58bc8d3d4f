package qemu_test

import (
	"bytes"
	"context"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/fireactions/fireactions/internal/guest"
	"github.com/fireactions/fireactions/internal/metadata"
	"github.com/fireactions/fireactions/internal/vm"
	"github.com/fireactions/fireactions/internal/vm/vmtest"
)

// initSpec returns a spec booting a busybox image with fireactions-init
// running args in app mode.
func initSpec(t *testing.T, id string, args ...string) vm.Spec {
	t.Helper()
	vmtest.RequireQEMU(t)
	kernel, _ := vmtest.Kernel(t)
	dir := t.TempDir()
	return vm.Spec{
		ID:        id,
		Kernel:    kernel,
		Initrd:    vmtest.BaseInitrd(t),
		BootArgs:  "quiet",
		VCPUs:     1,
		MemoryMiB: 256,
		Drives: []vm.Drive{
			{Path: vmtest.BusyboxRootfs(t, dir, nil), ReadOnly: true, Role: vm.RoleBase},
			{Path: vmtest.Scratch(t, dir, 64<<20), Role: vm.RoleScratch},
		},
		Guest: &guest.Config{
			Mode:       guest.ModeApp,
			Process:    guest.Process{Args: args},
			BindMounts: []string{},
		},
	}
}

func output(t *testing.T, m *vm.Manager, id string) (stdout, stderr, console string) {
	t.Helper()
	var o, e, c bytes.Buffer
	if err := m.Logs(context.Background(), id, vm.LogOptions{Stdout: &o, Stderr: &e, Console: &c}); err != nil {
		t.Fatal(err)
	}
	return o.String(), e.String(), c.String()
}

func TestWorkloadExitCode(t *testing.T) {
	spec := initSpec(t, "exitcode", "sh", "-c", "echo out; echo err >&2; exit 7")
	m := newManager(t, t.TempDir())
	if _, err := m.Start(waitCtx(t), newBackend(), spec); err != nil {
		t.Fatal(err)
	}
	es, err := m.Wait(waitCtx(t), spec.ID)
	if err != nil {
		t.Fatal(err)
	}
	stdout, stderr, console := output(t, m, spec.ID)
	if es.Reason != vm.ReasonWorkloadExit || !es.WorkloadExited || es.Code != 7 {
		t.Fatalf("exit = %+v, want workload-exit 7; console:\n%s", es, console)
	}
	if stdout != "out\n" || stderr != "err\n" {
		t.Fatalf("stdout %q, stderr %q; want \"out\\n\", \"err\\n\"", stdout, stderr)
	}
	st, _ := m.Inspect(spec.ID)
	if st.GuestStartedAt.IsZero() || st.GuestStartedAt.Before(st.StartedAt) {
		t.Fatalf("guest start not recorded: started %v, guest started %v", st.StartedAt, st.GuestStartedAt)
	}
}

// Stop's first step, the guest init's stop frame, is enough for a
// cooperative guest: the workload gets SIGTERM, the init reports and
// powers off.
func TestStopThroughGuestInit(t *testing.T) {
	spec := initSpec(t, "initstop", "sh", "-c", "echo ready; exec sleep 1000")
	m := newManager(t, t.TempDir())
	if _, err := m.Start(waitCtx(t), newBackend(), spec); err != nil {
		t.Fatal(err)
	}
	waitForConsole(t, m, spec.ID, "ready")
	es, err := m.Stop(waitCtx(t), spec.ID, 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if es.Reason != vm.ReasonStopped || !es.WorkloadExited || es.Signal != int(syscall.SIGTERM) {
		t.Fatalf("exit = %+v, want stopped with the workload killed by SIGTERM", es)
	}
	st, _ := m.Inspect(spec.ID)
	if got := stepActions(st); !slices.Equal(got, []string{"guest-stop"}) {
		t.Fatalf("stop steps = %v, want only guest-stop (%+v)", got, st.Stop)
	}
}

func TestSignalWorkload(t *testing.T) {
	spec := initSpec(t, "signal", "sh", "-c", `trap 'echo got-usr1; exit 3' USR1; echo ready; while :; do sleep 0.1; done`)
	m := newManager(t, t.TempDir())
	if _, err := m.Start(waitCtx(t), newBackend(), spec); err != nil {
		t.Fatal(err)
	}
	waitForConsole(t, m, spec.ID, "ready")
	if err := m.Signal(waitCtx(t), spec.ID, int(syscall.SIGUSR1)); err != nil {
		t.Fatal(err)
	}
	es, err := m.Wait(waitCtx(t), spec.ID)
	if err != nil {
		t.Fatal(err)
	}
	if stdout, _, _ := output(t, m, spec.ID); es.Code != 3 || !strings.Contains(stdout, "got-usr1") {
		t.Fatalf("exit = %+v, stdout %q; want code 3 after got-usr1", es, stdout)
	}
}

func metadataDoc(t *testing.T, in metadata.Input) []byte {
	t.Helper()
	d, err := metadata.New(in)
	if err != nil {
		t.Fatal(err)
	}
	b, err := d.JSON()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// The owner dies while the workload waits for a go-ahead it polls from the
// metadata service; a new manager adopts the VM, gives the go-ahead by
// updating the metadata and gets the workload's exit code.
func TestReattachGetsWorkloadExit(t *testing.T) {
	spec := initSpec(t, "reattach-init", "sh", "-c", `
id=$(wget -qO- http://169.254.169.254/latest/meta-data/instance-id)
echo "instance $id"
until wget -qO /dev/null http://169.254.169.254/latest/meta-data/go; do sleep 0.2; done
exit 5`)
	spec.Metadata = metadataDoc(t, metadata.Input{InstanceID: "i-reattach"})
	root := t.TempDir()
	startInChild(t, root, spec)

	m := newManager(t, root)
	res, err := m.Recover(waitCtx(t), vm.RecoverOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Adopted) != 1 {
		t.Fatalf("recover = %+v, want the VM adopted", res)
	}
	waitForConsole(t, m, spec.ID, "instance i-reattach")
	doc := metadataDoc(t, metadata.Input{InstanceID: "i-reattach", Metadata: map[string]string{"go": "now"}})
	if err := m.UpdateMetadata(waitCtx(t), spec.ID, doc); err != nil {
		t.Fatal(err)
	}
	es, err := m.Wait(waitCtx(t), spec.ID)
	if err != nil {
		t.Fatal(err)
	}
	if es.Reason != vm.ReasonWorkloadExit || es.Code != 5 {
		_, _, console := output(t, m, spec.ID)
		t.Fatalf("exit = %+v, want workload-exit 5; console:\n%s", es, console)
	}
	st, _ := m.Inspect(spec.ID)
	if err := m.Remove(context.Background(), spec.ID); err != nil {
		t.Fatal(err)
	}
	assertGone(t, st.Dir, spec.Drives[1].Path)
}
