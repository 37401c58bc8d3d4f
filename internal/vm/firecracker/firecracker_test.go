package firecracker_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/fireactions/fireactions/internal/vm"
	"github.com/fireactions/fireactions/internal/vm/vmtest"
)

// The scenarios of the qemu backend's tests, run through the firecracker
// backend and fakefc.

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
		VCPUs:     1,
		MemoryMiB: 256,
	}
}

func newManager(t *testing.T, root string) *vm.Manager {
	t.Helper()
	m, err := vm.NewManager(vm.Options{Root: root, Backends: []vm.Backend{newBackend(t)}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
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

// sendConsole types text on the guest's serial console: the VMM's stdin
// FIFO, which any process may open.
func sendConsole(t *testing.T, m *vm.Manager, id, text string) {
	t.Helper()
	st, err := m.Inspect(id)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(st.Details["console_input"], os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteString(text); err != nil {
		t.Fatal(err)
	}
}

func TestGuestShutdown(t *testing.T) {
	spec := busyboxSpec(t, "shutdown", `echo "hello from the guest"; reboot -f`)
	m := newManager(t, t.TempDir())
	st, err := m.Start(waitCtx(t), newBackend(t), spec)
	if err != nil {
		t.Fatal(err)
	}
	if st.Status != vm.StatusRunning || st.Pid == 0 || st.PidStartTime == 0 {
		t.Fatalf("state after start: %+v", st)
	}
	if st.Details["firecracker_version"] == "" || st.Details["api_socket"] != filepath.Join(st.Dir, "firecracker.sock") {
		t.Fatalf("details: %v", st.Details)
	}
	es, err := m.Wait(waitCtx(t), spec.ID)
	if err != nil {
		t.Fatal(err)
	}
	// Firecracker exits 0 when the guest resets.
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
	if got.Status != vm.StatusExited || got.Exit == nil || got.Exit.Reason != vm.ReasonGuestShutdown {
		t.Fatalf("persisted state: %+v", got)
	}
	// Firecracker's log (the fake's) went to vmm.log from its first line.
	if l := vm.TailFile(got.VMMLog, 1<<16); !strings.Contains(l, "received a PUT request on \"/actions\"") {
		t.Fatalf("vmm.log lacks the VMM's log:\n%s", l)
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
	st, err := m.Start(waitCtx(t), newBackend(t), spec)
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
	if es.Reason != vm.ReasonVMMCrash || es.VMM.Signal != int(syscall.SIGKILL) || !strings.Contains(es.Message, "killed") {
		t.Fatalf("exit = %+v, want vmm-crash by SIGKILL", es)
	}
	if err := m.Remove(context.Background(), spec.ID); err != nil {
		t.Fatal(err)
	}
	// The guest (the fake's QEMU) died with its VMM.
	assertGone(t, st.Dir)
}

// A guest that ignores the shutdown request (busybox sh as PID 1) is ended
// by SIGTERM to the VMM within the deadline.
func TestStopHungGuest(t *testing.T) {
	spec := busyboxSpec(t, "hung", `echo up; exec sleep 1000`)
	m := newManager(t, t.TempDir())
	if _, err := m.Start(waitCtx(t), newBackend(t), spec); err != nil {
		t.Fatal(err)
	}
	es, err := m.Stop(waitCtx(t), spec.ID, 3*time.Second)
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
	if st.Stop.Steps[0].Error != "" {
		t.Fatalf("SendCtrlAltDel failed: %+v", st.Stop.Steps[0])
	}
	for _, s := range st.Stop.Steps {
		if s.At.After(st.Stop.Deadline) {
			t.Errorf("step %s ran after the deadline %v", s.Action, st.Stop.Deadline)
		}
	}
}

// A wedged VMM (SIGSTOP: its API does not answer, SIGTERM stays pending) is
// ended by SIGKILL, the last step, within the deadline.
func TestStopWedgedVMMReachesSIGKILL(t *testing.T) {
	spec := busyboxSpec(t, "wedged", `echo up; exec sleep 1000`)
	m := newManager(t, t.TempDir())
	st, err := m.Start(waitCtx(t), newBackend(t), spec)
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
		t.Errorf("a stopped VMM cannot have answered SendCtrlAltDel: %+v", st.Stop.Steps[0])
	}
	if err := m.Remove(context.Background(), spec.ID); err != nil {
		t.Fatal(err)
	}
	assertGone(t, st.Dir)
}

func TestStartErrorCarriesVMMText(t *testing.T) {
	spec := busyboxSpec(t, "badkernel", `reboot -f`)
	junk := filepath.Join(t.TempDir(), "not-a-kernel")
	if err := os.WriteFile(junk, bytes.Repeat([]byte{0}, 4096), 0o644); err != nil {
		t.Fatal(err)
	}
	spec.Kernel = junk
	root := t.TempDir()
	m := newManager(t, root)
	_, err := m.Start(waitCtx(t), newBackend(t), spec)
	if err == nil {
		t.Fatal("a VM with a junk kernel started")
	}
	// The API's fault message, as Firecracker words it.
	if !strings.Contains(err.Error(), "[PUT /actions] Start microVM error: Cannot load kernel") {
		t.Fatalf("error lacks the VMM's fault message: %v", err)
	}
	assertGone(t, filepath.Join(root, spec.ID))
}

// Start bypassing the manager's validation: the backend sends what it is
// given, the fake refuses it as the swagger file says, and the error
// carries the fault message.
func TestSwaggerRejectionSurfaces(t *testing.T) {
	spec := busyboxSpec(t, "swagger", `reboot -f`)
	spec.VCPUs = 64
	spec = spec.WithDefaults()
	dir := t.TempDir()
	layout := vm.Layout{Dir: dir, ConsoleLog: filepath.Join(dir, "console.log"), VMMLog: filepath.Join(dir, "vmm.log")}
	h, err := newBackend(t).Start(waitCtx(t), &spec, layout)
	if err == nil {
		h.Process().Signal(syscall.SIGKILL)
		t.Fatal("a VM with 64 vCPUs started")
	}
	for _, want := range []string{"[PUT /machine-config]", "vcpu_count in body should be less than or equal to 32", "firecracker did not start (killed by signal SIGKILL)"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q: %v", want, err)
		}
	}
	// The VMM was killed and nothing else of it runs.
	for _, pid := range vm.ProcessesMatching(dir) {
		t.Errorf("process %d still runs", pid)
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
		if _, err := m.Start(waitCtx(t), newBackend(t), spec); err != nil {
			t.Fatal(err)
		}
	}
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
		if !strings.Contains(out, hex.EncodeToString(sum[:])) {
			t.Fatalf("%s: the guest read a different base (want sha256 %x):\n%s", id, sum, out)
		}
	}
	after, _ := os.ReadFile(base)
	if !bytes.Equal(after, want) {
		t.Fatal("the read-only base changed")
	}
}

func TestMetadataFromGuest(t *testing.T) {
	for _, v := range []vm.MMDSVersion{vm.MMDSv1, vm.MMDSv2} {
		t.Run(string(v), func(t *testing.T) {
			script := `
nic=$(nic_by_mac "$(cmdline mmds_mac)")
ip link set "$nic" up
ip addr add 169.254.169.15/24 dev "$nic"
hdr=""
get() { if [ -n "$hdr" ]; then wget -qO- --header "$hdr" "$1"; else wget -qO- "$1"; fi; }
if [ "$(cmdline mmds_v)" = V2 ]; then
  echo "unauthenticated=$(wget -qO- http://169.254.169.254/latest/meta-data/instance-id 2>&1 || echo refused)"
  tok=$(printf 'PUT /latest/api/token HTTP/1.0\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n' | nc 169.254.169.254 80 | tail -n 1)
  hdr="X-metadata-token: $tok"
fi
echo "instance-id=$(get http://169.254.169.254/latest/meta-data/instance-id)"
echo "listing=$(get http://169.254.169.254/latest/meta-data/ | tr '\n' ,)"
reboot -f
`
			spec := busyboxSpec(t, "mmds-"+strings.ToLower(string(v)), script)
			spec.Metadata = []byte(`{"latest":{"meta-data":{"instance-id":"i-0123abcd","local-hostname":"mmds"},"user-data":"#cloud-config\n"}}`)
			spec.MMDSVersion = v
			devs, err := newBackend(t).GuestDevices(&spec)
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
			spec.BootArgs = "mmds_mac=" + mac + " mmds_v=" + string(v)
			m := newManager(t, t.TempDir())
			st, err := m.Start(waitCtx(t), newBackend(t), spec)
			if err != nil {
				t.Fatal(err)
			}
			tap := st.Details["mmds_tap"]
			if _, err := os.Stat("/sys/class/net/" + tap); err != nil {
				t.Fatalf("the metadata tap %q does not exist while the VM runs: %v", tap, err)
			}
			if _, err := m.Wait(waitCtx(t), spec.ID); err != nil {
				t.Fatal(err)
			}
			out := logs(t, m, spec.ID)
			if !strings.Contains(out, "instance-id=i-0123abcd") {
				t.Fatalf("the guest did not read its instance-id:\n%s\nVMM log:\n%s", out, vm.TailFile(st.VMMLog, 4096))
			}
			if !regexp.MustCompile(`(?m)^listing=instance-id,local-hostname\r?$`).MatchString(out) {
				t.Fatalf("the guest did not list its meta-data:\n%s", out)
			}
			if v == vm.MMDSv2 && !strings.Contains(out, "401") && !strings.Contains(out, "unauthenticated=refused") {
				t.Fatalf("V2 answered without a session token:\n%s", out)
			}
			if err := m.Remove(context.Background(), spec.ID); err != nil {
				t.Fatal(err)
			}
			assertGone(t, st.Dir)
			// The tap was Firecracker's own and went with it.
			if _, err := os.Stat("/sys/class/net/" + tap); !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("the metadata tap %s outlived the VM (%v)", tap, err)
			}
		})
	}
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
	waitForConsole(t, m, spec.ID, "waiting")
	sendConsole(t, m, spec.ID, "hello-again\n")
	es, err := m.Wait(waitCtx(t), spec.ID)
	if err != nil {
		t.Fatal(err)
	}
	// The VMM is not our child: its exit status is unknown; the kernel's
	// last words tell a guest shutdown.
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
	spec.Metadata = []byte(`{"latest":{"meta-data":{"instance-id":"i-dead"}}}`)
	pid := startInChild(t, root, spec)
	// The VM dies while nobody watches it.
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(root, spec.ID)
	for len(vm.ProcessesMatching(dir)) > 0 {
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
}

func TestCloseLeavesVMRunning(t *testing.T) {
	spec := busyboxSpec(t, "detach", `echo up; exec sleep 1000`)
	root := t.TempDir()
	m, err := vm.NewManager(vm.Options{Root: root, Backends: []vm.Backend{newBackend(t)}})
	if err != nil {
		t.Fatal(err)
	}
	st, err := m.Start(waitCtx(t), newBackend(t), spec)
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

// BenchmarkStartOverhead measures the host side of Start, from a Spec to
// InstanceStart acknowledged by fakefc, without networking; the guest's
// boot is not included (and fakefc answers InstanceStart once QEMU is
// spawned).
func BenchmarkStartOverhead(b *testing.B) {
	vmtest.RequireQEMU(b)
	kernel, mods := vmtest.Kernel(b)
	initrd := vmtest.BusyboxInitrd(b, mods, `exec sleep 1000`)
	backend := firecrackerBackend(b)
	m, err := vm.NewManager(vm.Options{Root: b.TempDir(), Backends: []vm.Backend{backend}})
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	ctx := context.Background()
	b.ReportAllocs()
	var total time.Duration
	for i := 0; b.Loop(); i++ {
		spec := vm.Spec{ID: "bench-" + strconv.Itoa(i), Kernel: kernel, Initrd: initrd, VCPUs: 1, MemoryMiB: 128}
		st, err := m.Start(ctx, backend, spec)
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

func firecrackerBackend(tb testing.TB) vm.Backend { return newBackend(tb) }
