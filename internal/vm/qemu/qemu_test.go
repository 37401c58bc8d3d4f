package qemu_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/fireactions/fireactions/internal/metadata"
	"github.com/fireactions/fireactions/internal/vm"
	"github.com/fireactions/fireactions/internal/vm/qemu"
	"github.com/fireactions/fireactions/internal/vm/vmtest"
)

// busyboxSpec returns a spec booting the test kernel with a busybox /init
// running script.
func busyboxSpec(t *testing.T, id, script string) vm.Spec {
	t.Helper()
	vmtest.RequireQEMU(t)
	kernel, mods := vmtest.Kernel(t)
	return vm.Spec{
		ID:        id,
		Kernel:    kernel,
		Initrd:    vmtest.BusyboxInitrd(t, mods, script),
		BootArgs:  "quiet",
		VCPUs:     1,
		MemoryMiB: 256,
	}
}

func newManager(t *testing.T, root string) *vm.Manager {
	t.Helper()
	m, err := vm.NewManager(vm.Options{Root: root, Backends: []vm.Backend{newBackend()}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// A failed test must not leave VMs running: remove whatever this
		// manager can take (VMs owned by another manager are that one's).
		removeAll(m)
		m.Close()
	})
	return m
}

func removeAll(m *vm.Manager) {
	sts, _ := m.List()
	for _, st := range sts {
		_ = m.Remove(context.Background(), st.ID)
	}
}

func logs(t *testing.T, m *vm.Manager, id string) string {
	t.Helper()
	var buf bytes.Buffer
	if err := m.Logs(context.Background(), id, vm.LogOptions{Stdout: &buf}); err != nil {
		t.Fatal(err)
	}
	return buf.String()
}

// assertGone checks that nothing of a VM is left: no process naming its
// directory, no directory, none of the given files.
func assertGone(t *testing.T, dir string, files ...string) {
	t.Helper()
	for _, pid := range vm.ProcessesMatching(dir) {
		b, _ := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "cmdline"))
		t.Errorf("process %d still runs: %s", pid, strings.ReplaceAll(string(b), "\x00", " "))
	}
	for _, p := range append([]string{dir}, files...) {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s is still there (%v)", p, err)
		}
	}
}

func TestGuestShutdown(t *testing.T) {
	spec := busyboxSpec(t, "shutdown", `echo "hello from the guest"; reboot -f`)
	m := newManager(t, t.TempDir())
	st, err := m.Start(waitCtx(t), newBackend(), spec)
	if err != nil {
		t.Fatal(err)
	}
	if st.Status != vm.StatusRunning || st.Pid == 0 || st.PidStartTime == 0 {
		t.Fatalf("state after start: %+v", st)
	}
	es, err := m.Wait(waitCtx(t), spec.ID)
	if err != nil {
		t.Fatal(err)
	}
	if es.Reason != vm.ReasonGuestShutdown || !es.VMM.Known || es.VMM.Code != 0 {
		t.Fatalf("exit = %+v, want guest-shutdown with VMM exit 0", es)
	}
	if out := logs(t, m, spec.ID); !strings.Contains(out, "hello from the guest") {
		t.Fatalf("console log lacks the guest's output:\n%s", out)
	}
	got, err := m.Inspect(spec.ID)
	if err != nil {
		t.Fatal(err)
	}
	if got.Status != vm.StatusExited || got.Exit == nil || got.Exit.Reason != vm.ReasonGuestShutdown || got.ExitedAt.IsZero() {
		t.Fatalf("persisted state: %+v", got)
	}
	if got.Details["accelerator"] == "" {
		t.Fatalf("details lack the accelerator: %v", got.Details)
	}
	dir := got.Dir
	if err := m.Remove(context.Background(), spec.ID); err != nil {
		t.Fatal(err)
	}
	assertGone(t, dir)
}

func TestVMMCrash(t *testing.T) {
	spec := busyboxSpec(t, "crash", `echo up; exec sleep 1000`)
	m := newManager(t, t.TempDir())
	st, err := m.Start(waitCtx(t), newBackend(), spec)
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(st.Pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	es, err := m.Wait(waitCtx(t), spec.ID)
	if err != nil {
		t.Fatal(err)
	}
	if es.Reason != vm.ReasonVMMCrash || es.VMM.Signal != int(syscall.SIGKILL) {
		t.Fatalf("exit = %+v, want vmm-crash by SIGKILL", es)
	}
	if !strings.Contains(es.Message, "killed") {
		t.Fatalf("message %q does not say the VMM was killed", es.Message)
	}
}

// stepActions lists the stop steps taken, in order.
func stepActions(st *vm.State) []string {
	var a []string
	if st.Stop != nil {
		for _, s := range st.Stop.Steps {
			a = append(a, s.Action)
		}
	}
	return a
}

// A guest that ignores the power button (busybox init handles no ACPI
// events) is ended by SIGTERM to QEMU, which QEMU honours.
func TestStopHungGuest(t *testing.T) {
	spec := busyboxSpec(t, "hung", `echo up; exec sleep 1000`)
	m := newManager(t, t.TempDir())
	if _, err := m.Start(waitCtx(t), newBackend(), spec); err != nil {
		t.Fatal(err)
	}
	// Room enough for QEMU to act on SIGTERM on a loaded machine before
	// SIGKILL is due.
	es, err := m.Stop(waitCtx(t), spec.ID, 6*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if es.Reason != vm.ReasonStopped {
		t.Fatalf("exit = %+v, want stopped", es)
	}
	st, _ := m.Inspect(spec.ID)
	if got, want := stepActions(st), []string{"shutdown", "sigterm"}; !slices.Equal(got, want) {
		t.Fatalf("stop steps = %v, want %v (%+v)", got, want, st.Stop)
	}
	if st.Stop.Deadline.IsZero() || st.Stop.Steps[1].At.After(st.Stop.Deadline) {
		t.Fatalf("a step ran after the deadline: %+v", st.Stop)
	}
}

// A wedged VMM (stopped with SIGSTOP: no QMP answer, SIGTERM stays
// pending) is ended by SIGKILL, the last step, within the deadline.
func TestStopWedgedVMMReachesSIGKILL(t *testing.T) {
	spec := busyboxSpec(t, "wedged", `echo up; exec sleep 1000`)
	m := newManager(t, t.TempDir())
	st, err := m.Start(waitCtx(t), newBackend(), spec)
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(st.Pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	es, err := m.Stop(waitCtx(t), spec.ID, 3*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if es.Reason != vm.ReasonStopped || es.VMM.Signal != int(syscall.SIGKILL) {
		t.Fatalf("exit = %+v, want stopped, VMM killed by SIGKILL", es)
	}
	st, _ = m.Inspect(spec.ID)
	if got, want := stepActions(st), []string{"shutdown", "sigterm", "sigkill"}; !slices.Equal(got, want) {
		t.Fatalf("stop steps = %v, want %v (%+v)", got, want, st.Stop)
	}
	if st.Stop.Steps[0].Error == "" {
		t.Errorf("the power button of a stopped VMM cannot have been pressed: %+v", st.Stop.Steps[0])
	}
	for _, s := range st.Stop.Steps {
		if s.At.After(st.Stop.Deadline) {
			t.Errorf("step %s ran after the deadline %v", s.Action, st.Stop.Deadline)
		}
	}
}

func TestStartErrorCarriesQEMUText(t *testing.T) {
	spec := busyboxSpec(t, "badkernel", `reboot -f`)
	junk := filepath.Join(t.TempDir(), "not-a-kernel")
	if err := os.WriteFile(junk, bytes.Repeat([]byte{0}, 4096), 0o644); err != nil {
		t.Fatal(err)
	}
	spec.Kernel = junk
	root := t.TempDir()
	m := newManager(t, root)
	_, err := m.Start(waitCtx(t), newBackend(), spec)
	if err == nil {
		t.Fatal("a VM with a junk kernel started")
	}
	// QEMU's own words, from its stderr.
	if !regexp.MustCompile(`qemu(-system-x86_64)?: `).MatchString(err.Error()) {
		t.Fatalf("error lacks QEMU's message: %v", err)
	}
	assertGone(t, filepath.Join(root, spec.ID))
}

func TestStartErrorWithoutKVM(t *testing.T) {
	if qemu.KVMUsable() == nil {
		t.Skip("needs a host without usable /dev/kvm")
	}
	spec := busyboxSpec(t, "nokvm", `reboot -f`)
	b := qemu.New(qemu.Options{Accel: qemu.AccelKVM})
	if err := b.Available(); err == nil || !strings.Contains(err.Error(), "kvm") {
		t.Fatalf("Available() = %v, want a KVM error", err)
	}
	m := newManager(t, t.TempDir())
	_, err := m.Start(waitCtx(t), b, spec)
	if err == nil || !strings.Contains(err.Error(), "Could not access KVM kernel module") {
		t.Fatalf("error = %v, want QEMU's KVM message", err)
	}
}

func TestTwoVMsShareReadOnlyBase(t *testing.T) {
	// Each guest prints the base disk's checksum once both run, then
	// waits for the host's go on its console.
	script := `
echo "base $(sha256sum /dev/vda)"
read -r line
echo "got $line"
reboot -f
`
	dir := t.TempDir()
	base := vmtest.Ext4(t, dir, 8<<20, map[string]string{"hello.txt": "shared base\n"})
	want, err := os.ReadFile(base)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(want)
	m := newManager(t, t.TempDir())
	ids := []string{"share-a", "share-b"}
	for _, id := range ids {
		spec := busyboxSpec(t, id, script)
		spec.Drives = []vm.Drive{{Path: base, ReadOnly: true, Role: vm.RoleBase}}
		if _, err := m.Start(waitCtx(t), newBackend(), spec); err != nil {
			t.Fatal(err)
		}
	}
	// Both VMMs hold the base open at once.
	for _, id := range ids {
		st, _ := m.Inspect(id)
		if st.Status != vm.StatusRunning {
			t.Fatalf("%s: %s while both should run", id, st.Status)
		}
	}
	for _, id := range ids {
		waitForConsole(t, m, id, "base ")
		sendConsole(t, m, id, "go-"+id+"\n")
	}
	for _, id := range ids {
		es, err := m.Wait(waitCtx(t), id)
		if err != nil {
			t.Fatal(err)
		}
		out := logs(t, m, id)
		if es.Reason != vm.ReasonGuestShutdown || !strings.Contains(out, "got go-"+id) {
			t.Fatalf("%s: exit %+v, console:\n%s", id, es, out)
		}
		if !strings.Contains(out, hex(sum[:])) {
			t.Fatalf("%s: the guest read a different base (want sha256 %s):\n%s", id, hex(sum[:]), out)
		}
	}
	after, _ := os.ReadFile(base)
	if !bytes.Equal(after, want) {
		t.Fatal("the read-only base changed")
	}
}

func hex(b []byte) string {
	const digits = "0123456789abcdef"
	s := make([]byte, 0, 2*len(b))
	for _, c := range b {
		s = append(s, digits[c>>4], digits[c&15])
	}
	return string(s)
}

// waitForConsole follows the console until it shows want.
func waitForConsole(t *testing.T, m *vm.Manager, id, want string) {
	t.Helper()
	ctx, cancel := context.WithCancel(waitCtx(t))
	defer cancel()
	w := &watchWriter{want: []byte(want), found: cancel}
	err := m.Logs(ctx, id, vm.LogOptions{Follow: true, Stdout: w})
	if !w.seen {
		t.Fatalf("console of %s never showed %q (%v):\n%s", id, want, err, w.buf.String())
	}
}

type watchWriter struct {
	buf   bytes.Buffer
	want  []byte
	seen  bool
	found func()
}

func (w *watchWriter) Write(p []byte) (int, error) {
	w.buf.Write(p)
	if !w.seen && bytes.Contains(w.buf.Bytes(), w.want) {
		w.seen = true
		w.found()
	}
	return len(p), nil
}

// sendConsole types text on the guest's serial console.
func sendConsole(t *testing.T, m *vm.Manager, id, text string) {
	t.Helper()
	st, err := m.Inspect(id)
	if err != nil {
		t.Fatal(err)
	}
	c, err := vm.DialUnix(waitCtx(t), st.Details["console_socket"])
	if err != nil {
		t.Fatal(err)
	}
	// Closed only at the end of the test: QEMU drops input still queued
	// when the client goes away.
	t.Cleanup(func() { c.Close() })
	if _, err := c.Write([]byte(text)); err != nil {
		t.Fatal(err)
	}
}

func TestMetadataFromGuest(t *testing.T) {
	script := `
nic=$(nic_by_mac "$(cmdline mmds_mac)")
ip link set "$nic" up
ip addr add 169.254.169.15/24 dev "$nic"
echo "instance-id=$(wget -qO- http://169.254.169.254/latest/meta-data/instance-id)"
echo "listing=$(wget -qO- http://169.254.169.254/latest/meta-data/ | tr '\n' ,)"
reboot -f
`
	spec := busyboxSpec(t, "mmds", script)
	spec.Metadata = metadataDoc(t, metadata.Input{InstanceID: "i-0123abcd", Hostname: "mmds", UserData: "#cloud-config\n"})
	devs, err := newBackend().GuestDevices(&spec)
	if err != nil {
		t.Fatal(err)
	}
	var mac string
	for _, n := range devs.Interfaces {
		if n.MMDS {
			mac = n.MAC
		}
	}
	if mac == "" {
		t.Fatalf("no MMDS interface in %+v", devs.Interfaces)
	}
	spec.BootArgs += " mmds_mac=" + mac
	m := newManager(t, t.TempDir())
	st, err := m.Start(waitCtx(t), newBackend(), spec)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.Wait(waitCtx(t), spec.ID); err != nil {
		t.Fatal(err)
	}
	// The per-connection helpers end with the guest's connections.
	for ctx := waitCtx(t); len(vm.ProcessesMatching(st.Dir)) > 0; {
		if ctx.Err() != nil {
			t.Fatalf("metadata helpers outlive the VM: %v", vm.ProcessesMatching(st.Dir))
		}
		time.Sleep(10 * time.Millisecond)
	}
	out := logs(t, m, spec.ID)
	if !strings.Contains(out, "instance-id=i-0123abcd") {
		t.Fatalf("the guest did not read its instance-id:\n%s\nVMM log:\n%s", out, vm.TailFile(st.VMMLog, 4096))
	}
	if !regexp.MustCompile(`(?m)^listing=instance-id,local-hostname\r?$`).MatchString(out) {
		t.Fatalf("the guest did not list its meta-data:\n%s", out)
	}
	dir := st.Dir
	if err := m.Remove(context.Background(), spec.ID); err != nil {
		t.Fatal(err)
	}
	// No metadata helper outlives the VM.
	assertGone(t, dir)
}

func TestReattachAfterOwnerKilled(t *testing.T) {
	spec := busyboxSpec(t, "reattach", `echo waiting; read -r line; echo "got $line"; reboot -f`)
	root := t.TempDir()
	pid := startInChild(t, root, spec)

	m := newManager(t, root)
	res, err := m.Recover(waitCtx(t), vm.RecoverOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Adopted) != 1 || res.Adopted[0].ID != spec.ID || res.Adopted[0].Pid != pid {
		t.Fatalf("recover = %+v, want %s (pid %d) adopted", res, spec.ID, pid)
	}
	if res.Adopted[0].OwnerPid != os.Getpid() {
		t.Fatalf("owner pid %d, want ours %d", res.Adopted[0].OwnerPid, os.Getpid())
	}
	waitForConsole(t, m, spec.ID, "waiting")
	sendConsole(t, m, spec.ID, "hello-again\n")
	es, err := m.Wait(waitCtx(t), spec.ID)
	if err != nil {
		t.Fatal(err)
	}
	// QEMU is not our child: its exit status is unknown; the QMP event and
	// the kernel's last words tell a guest shutdown.
	if es.Reason != vm.ReasonGuestShutdown || es.VMM.Known {
		t.Fatalf("exit = %+v, want guest-shutdown with unknown VMM status", es)
	}
	if out := logs(t, m, spec.ID); !strings.Contains(out, "got hello-again") {
		t.Fatalf("console:\n%s", out)
	}
	st, _ := m.Inspect(spec.ID)
	if err := m.Remove(context.Background(), spec.ID); err != nil {
		t.Fatal(err)
	}
	assertGone(t, st.Dir)
}

func TestRecoverCleansDeadVM(t *testing.T) {
	spec := busyboxSpec(t, "dead", `echo up; exec sleep 1000`)
	root := t.TempDir()
	outside := t.TempDir()
	scratch := vmtest.Ext4(t, outside, 8<<20, nil)
	spec.Drives = []vm.Drive{{Path: scratch, Role: vm.RoleScratch}}
	spec.ConsoleLog = filepath.Join(outside, "console.log")
	spec.Metadata = metadataDoc(t, metadata.Input{InstanceID: "i-dead"})
	pid := startInChild(t, root, spec)
	// The VM dies while nobody watches it.
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(root, spec.ID)
	for ctx := waitCtx(t); len(vm.ProcessesMatching(dir)) > 0; {
		if ctx.Err() != nil {
			t.Fatal("the killed VMM does not go away")
		}
		time.Sleep(10 * time.Millisecond) // the kill takes effect
	}

	m := newManager(t, root)
	res, err := m.Recover(waitCtx(t), vm.RecoverOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Cleaned) != 1 || len(res.Adopted) != 0 {
		t.Fatalf("recover = %+v, want the VM cleaned", res)
	}
	if ex := res.Cleaned[0].Exit; ex == nil || ex.Reason != vm.ReasonVMMCrash {
		t.Fatalf("cleaned VM's exit = %+v, want vmm-crash", ex)
	}
	assertGone(t, dir, scratch, spec.ConsoleLog)
	if _, err := m.Inspect(spec.ID); !errors.Is(err, vm.ErrNotFound) {
		t.Fatalf("Inspect after cleanup: %v", err)
	}
}

func TestRecoverLeavesOtherOwnersAlone(t *testing.T) {
	spec := busyboxSpec(t, "owned", `echo up; exec sleep 1000`)
	root := t.TempDir()
	owner := newManager(t, root)
	if _, err := owner.Start(waitCtx(t), newBackend(), spec); err != nil {
		t.Fatal(err)
	}
	other := newManager(t, root)
	res, err := other.Recover(waitCtx(t), vm.RecoverOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Skipped) != 1 || len(res.Adopted)+len(res.Cleaned) != 0 {
		t.Fatalf("recover = %+v, want the owned VM skipped", res)
	}
	if err := other.Remove(context.Background(), spec.ID); err == nil {
		t.Fatal("removed a VM another manager owns")
	}
	if err := owner.Remove(context.Background(), spec.ID); err != nil {
		t.Fatal(err)
	}
}

func TestLifetimeTimeout(t *testing.T) {
	spec := busyboxSpec(t, "timeout", `echo up; exec sleep 1000`)
	spec.Timeout = 3 * time.Second
	spec.StopTimeout = 2 * time.Second
	m := newManager(t, t.TempDir())
	if _, err := m.Start(waitCtx(t), newBackend(), spec); err != nil {
		t.Fatal(err)
	}
	es, err := m.Wait(waitCtx(t), spec.ID)
	if err != nil {
		t.Fatal(err)
	}
	if es.Reason != vm.ReasonTimeout {
		t.Fatalf("exit = %+v, want timeout", es)
	}
}

func TestCloseLeavesVMRunning(t *testing.T) {
	spec := busyboxSpec(t, "detach", `echo up; exec sleep 1000`)
	root := t.TempDir()
	m, err := vm.NewManager(vm.Options{Root: root, Backends: []vm.Backend{newBackend()}})
	if err != nil {
		t.Fatal(err)
	}
	st, err := m.Start(waitCtx(t), newBackend(), spec)
	if err != nil {
		t.Fatal(err)
	}
	m.Close()
	if _, err := vm.AttachProcess(st.Pid, st.PidStartTime, st.Dir); err != nil {
		t.Fatalf("the VMM did not survive Close: %v", err)
	}
	m2 := newManager(t, root)
	if _, err := m2.Adopt(waitCtx(t), spec.ID); err != nil {
		t.Fatal(err)
	}
	if err := m2.Remove(context.Background(), spec.ID); err != nil {
		t.Fatal(err)
	}
	assertGone(t, st.Dir)
}

// BenchmarkStartOverhead measures the host side of Start, from a Spec to a
// VMM ready for control (QMP answered), without networking; the guest's
// boot is not included.
func BenchmarkStartOverhead(b *testing.B) {
	vmtest.RequireQEMU(b)
	kernel, mods := vmtest.Kernel(b)
	initrd := vmtest.BusyboxInitrd(b, mods, `exec sleep 1000`)
	m, err := vm.NewManager(vm.Options{Root: b.TempDir(), Backends: []vm.Backend{newBackend()}})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { removeAll(m); m.Close() })
	ctx := context.Background()
	b.ReportAllocs()
	var total time.Duration
	for i := 0; b.Loop(); i++ {
		spec := vm.Spec{ID: "bench-" + strconv.Itoa(i), Kernel: kernel, Initrd: initrd, VCPUs: 1, MemoryMiB: 128}
		st, err := m.Start(ctx, newBackend(), spec)
		if err != nil {
			b.Fatal(err)
		}
		total += time.Duration(st.StartOverhead)
		b.StopTimer()
		if err := m.Remove(ctx, spec.ID); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
	b.ReportMetric(float64(total.Microseconds())/1000/float64(b.N), "ms/start")
}

// BenchmarkMemoryPerVM reports what each supervised VM costs the
// fireactions process (Go heap and goroutines, measured with three VMs
// running) and the resident size of each idle QEMU (128 MiB guests).
func BenchmarkMemoryPerVM(b *testing.B) {
	vmtest.RequireQEMU(b)
	kernel, mods := vmtest.Kernel(b)
	initrd := vmtest.BusyboxInitrd(b, mods, `echo ready; exec sleep 1000`)
	const n = 3
	ctx := context.Background()
	var heap, goroutines, rss float64
	for i := 0; b.Loop(); i++ {
		m, err := vm.NewManager(vm.Options{Root: b.TempDir(), Backends: []vm.Backend{newBackend()}})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { removeAll(m); m.Close() })
		before, g0 := heapInUse(), runtime.NumGoroutine()
		var ids []string
		for j := range n {
			spec := vm.Spec{ID: fmt.Sprintf("mem-%d-%d", i, j), Kernel: kernel, Initrd: initrd, BootArgs: "quiet", VCPUs: 1, MemoryMiB: 128}
			if _, err := m.Start(ctx, newBackend(), spec); err != nil {
				b.Fatal(err)
			}
			ids = append(ids, spec.ID)
		}
		for _, id := range ids {
			waitForConsoleB(b, m, id, "ready")
		}
		heap += float64(heapInUse()-before) / n
		goroutines += float64(runtime.NumGoroutine()-g0) / n
		for _, id := range ids {
			st, _ := m.Inspect(id)
			rss += float64(vmRSS(st.Pid)) / n
		}
		for _, id := range ids {
			if err := m.Remove(ctx, id); err != nil {
				b.Fatal(err)
			}
		}
		m.Close()
	}
	b.ReportMetric(heap/float64(b.N), "heap-B/vm")
	b.ReportMetric(goroutines/float64(b.N), "goroutines/vm")
	b.ReportMetric(rss/float64(b.N)/(1<<20), "qemu-RSS-MiB/vm")
}

func heapInUse() int64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return int64(ms.HeapInuse)
}

// vmRSS returns a process's resident set size in bytes.
func vmRSS(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.Fields(v)[0], 10, 64)
			return kb << 10
		}
	}
	return 0
}

func waitForConsoleB(b *testing.B, m *vm.Manager, id, want string) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	w := &watchWriter{want: []byte(want), found: cancel}
	_ = m.Logs(ctx, id, vm.LogOptions{Follow: true, Stdout: w})
	if !w.seen {
		b.Fatalf("console of %s never showed %q:\n%s", id, want, w.buf.String())
	}
}
