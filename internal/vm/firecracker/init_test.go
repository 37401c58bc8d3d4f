package firecracker_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"os"
	"os/exec"
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
// running args in app mode, with a 64 MiB scratch disk.
func initSpec(t *testing.T, id string, args ...string) vm.Spec {
	t.Helper()
	vmtest.RequireQEMU(t)
	return imageSpec(t, id, args...)
}

// imageSpec is initSpec for any VMM.
func imageSpec(t *testing.T, id string, args ...string) vm.Spec {
	t.Helper()
	kernel, _ := vmtest.Kernel(t)
	dir := t.TempDir()
	return vm.Spec{
		ID:        id,
		Kernel:    kernel,
		Initrd:    vmtest.BaseInitrd(t),
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

// run boots spec and waits for its end.
func run(t *testing.T, spec vm.Spec) (vm.ExitStatus, *vm.Manager) {
	t.Helper()
	m := newManager(t, t.TempDir())
	if _, err := m.Start(waitCtx(t), newBackend(t), spec); err != nil {
		t.Fatal(err)
	}
	es, err := m.Wait(waitCtx(t), spec.ID)
	if err != nil {
		t.Fatal(err)
	}
	return es, m
}

func TestWorkloadExitCode(t *testing.T) {
	spec := initSpec(t, "exitcode", "sh", "-c", "echo out; echo err >&2; exit 7")
	es, m := run(t, spec)
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

func TestWorkloadExitZeroAndSignal(t *testing.T) {
	spec := initSpec(t, "exitzero", "true")
	if es, _ := run(t, spec); es.Reason != vm.ReasonWorkloadExit || es.Code != 0 || es.Signal != 0 {
		t.Fatalf("exit = %+v, want workload-exit 0", es)
	}
	spec = initSpec(t, "killed", "sh", "-c", "kill -KILL $$")
	if es, _ := run(t, spec); es.Reason != vm.ReasonWorkloadExit || !es.WorkloadExited || es.Signal != int(syscall.SIGKILL) {
		t.Fatalf("exit = %+v, want the workload killed by SIGKILL", es)
	}
}

func TestEnvWorkdirUser(t *testing.T) {
	spec := initSpec(t, "env", "sh", "-c", `echo "foo=$FOO"; pwd; id -u; id -g`)
	spec.Guest.Process.Env = []string{"FOO=bar baz"}
	spec.Guest.Process.WorkingDir = "/srv/work"
	spec.Guest.Process.User = "nobody"
	es, m := run(t, spec)
	stdout, _, console := output(t, m, spec.ID)
	if es.Code != 0 || stdout != "foo=bar baz\n/srv/work\n65534\n65534\n" {
		t.Fatalf("exit %+v, stdout %q; console:\n%s", es, stdout, console)
	}
}

// Writes land on the scratch disk, never on the base; the drives arrive in
// spec order (base /dev/vda, scratch /dev/vdb) and the scratch disk has the
// size it was given.
func TestScratchWritesAndSize(t *testing.T) {
	spec := initSpec(t, "scratch", "sh", "-c", `
echo changed > /etc/passwd.new && mv /etc/passwd.new /etc/passwd
echo new > /bin/added
cat /bin/added
cat /sys/block/vdb/size
df -k / | tail -n 1
dd if=/dev/zero of=/big bs=1M count=100 2>/dev/null && echo "wrote 100M" || echo "disk full"`)
	base := spec.Drives[0].Path
	before := sha256File(t, base)
	es, m := run(t, spec)
	stdout, _, console := output(t, m, spec.ID)
	if es.Code != 0 {
		t.Fatalf("exit %+v; console:\n%s", es, console)
	}
	lines := strings.Split(strings.TrimSpace(stdout), "\n")
	if len(lines) != 4 || lines[0] != "new" || lines[1] != "131072" || lines[3] != "disk full" {
		t.Fatalf("stdout %q: want the file, 131072 sectors (64 MiB) on /dev/vdb, and a full disk at 100 MiB", stdout)
	}
	if after := sha256File(t, base); after != before {
		t.Fatal("the base image changed")
	}
	// The scratch disk holds the overlay's upper layer.
	out, err := exec.Command("debugfs", "-R", "cat /root/bin/added", spec.Drives[1].Path).Output()
	if err != nil || strings.TrimSpace(string(out)) != "new" {
		t.Fatalf("scratch disk lacks /root/bin/added: %q %v", out, err)
	}
}

func sha256File(t *testing.T, path string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

// Stop's first step, the guest init's stop frame, travels over the console
// FIFO and is enough for a cooperative guest.
func TestStopThroughGuestInit(t *testing.T) {
	spec := initSpec(t, "initstop", "sh", "-c", "echo ready; exec sleep 1000")
	m := newManager(t, t.TempDir())
	if _, err := m.Start(waitCtx(t), newBackend(t), spec); err != nil {
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
	if _, err := m.Start(waitCtx(t), newBackend(t), spec); err != nil {
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

// The owner dies while the workload polls the metadata service for a
// go-ahead; a new manager adopts the VM, gives the go-ahead with PUT /mmds
// and gets the workload's exit code. The guest init finds the metadata
// interface through the guest config, as in production.
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

// A VM in a network namespace the test made, on a tap there: the VMM runs
// inside the namespace and the guest reaches the host side of its tap.
func TestNetworkInNamespace(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to create a network namespace and a tap")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("needs ip (Debian package iproute2)")
	}
	const ns = "fatest-fcnet"
	sh := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %v: %v: %s", args, err, out)
		}
	}
	_ = exec.Command("ip", "netns", "del", ns).Run()
	sh("netns", "add", ns)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
	sh("-n", ns, "tuntap", "add", "dev", "fctap0", "mode", "tap")
	sh("-n", ns, "addr", "add", "10.99.0.1/24", "dev", "fctap0")
	sh("-n", ns, "link", "set", "fctap0", "up")

	spec := initSpec(t, "netns", "sh", "-c", `ping -c 1 -W 10 10.99.0.1 >/dev/null && echo reached`)
	spec.NetNS = "/var/run/netns/" + ns
	spec.Interfaces = []vm.Interface{{TapName: "fctap0", GuestIP: "10.99.0.2/24", Gateway: "10.99.0.1"}}
	es, m := run(t, spec)
	stdout, _, console := output(t, m, spec.ID)
	if es.Code != 0 || stdout != "reached\n" {
		t.Fatalf("exit %+v, stdout %q; console:\n%s", es, stdout, console)
	}
}
