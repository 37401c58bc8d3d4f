package vm

import (
	"context"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/fireactions/fireactions/internal/guest"
)

func touch(t *testing.T, dir, name string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestSpecValidateNamesFields(t *testing.T) {
	dir := t.TempDir()
	kernel := touch(t, dir, "vmlinux")
	good := Spec{ID: "vm-1", Kernel: kernel, VCPUs: 2, MemoryMiB: 256}.WithDefaults()
	if err := good.Validate(); err != nil {
		t.Fatalf("valid spec rejected: %v", err)
	}
	cases := []struct {
		name  string
		edit  func(*Spec)
		field string
	}{
		{"id", func(s *Spec) { s.ID = "../x" }, "id:"},
		{"kernel", func(s *Spec) { s.Kernel = filepath.Join(dir, "missing") }, "kernel:"},
		{"smt odd", func(s *Spec) { s.SMT, s.VCPUs = true, 3 }, "vcpus: 3 is odd"},
		{"memory", func(s *Spec) { s.MemoryMiB = 16 }, "memory_mib:"},
		{"template", func(s *Spec) { s.CPUTemplate = "T9" }, "cpu_template:"},
		{"base rw", func(s *Spec) { s.Drives = []Drive{{Path: kernel, Role: RoleBase}} }, "drives[0].read_only:"},
		{"role", func(s *Spec) { s.Drives = []Drive{{Path: kernel, Role: "boot"}} }, "drives[0].role:"},
		{"drive path", func(s *Spec) { s.Drives = []Drive{{Path: "/nope", Role: RoleExtra}} }, "drives[0].path:"},
		{"tap", func(s *Spec) { s.Interfaces = []Interface{{TapName: strings.Repeat("t", 16)}} }, "interfaces[0].tap_name:"},
		{"mac", func(s *Spec) { s.Interfaces = []Interface{{TapName: "tap0", MAC: "01:00:00:00:00:01"}} }, "interfaces[0].mac:"},
		{"gateway", func(s *Spec) {
			s.Interfaces = []Interface{{TapName: "tap0", GuestIP: "10.0.0.2/24", Gateway: "10.1.0.1"}}
		}, "interfaces[0].gateway: 10.1.0.1 is outside 10.0.0.0/24"},
		{"metadata", func(s *Spec) { s.Metadata = []byte("{") }, "metadata:"},
		{"mmds", func(s *Spec) { s.MMDSVersion = "V3" }, "mmds_version:"},
		{"vsock", func(s *Spec) { s.Vsock = &Vsock{GuestCID: 2} }, "vsock.guest_cid:"},
		{"guest drives", func(s *Spec) { s.Guest = &guest.Config{}; s.Initrd = kernel }, "drives: the guest init needs"},
		{"timeout", func(s *Spec) { s.Timeout = -time.Second }, "timeout:"},
	}
	for _, c := range cases {
		s := good
		c.edit(&s)
		err := s.Validate()
		if err == nil || !strings.Contains(err.Error(), "vm spec: "+c.field) {
			t.Errorf("%s: error %v, want one naming %q", c.name, err, c.field)
		}
	}
}

func TestWithDefaultsDerivesStableMACs(t *testing.T) {
	s := Spec{ID: "a", Interfaces: []Interface{{TapName: "t0"}, {TapName: "t1", MAC: "06:00:00:00:00:01"}}}.WithDefaults()
	again := Spec{ID: "a", Interfaces: []Interface{{TapName: "t0"}}}.WithDefaults()
	if s.Interfaces[0].MAC == "" || s.Interfaces[0].MAC != again.Interfaces[0].MAC {
		t.Fatalf("derived MACs %q and %q differ", s.Interfaces[0].MAC, again.Interfaces[0].MAC)
	}
	if s.Interfaces[1].MAC != "06:00:00:00:00:01" {
		t.Fatalf("explicit MAC replaced: %q", s.Interfaces[1].MAC)
	}
	if s.VCPUs != DefaultVCPUs || s.MemoryMiB != DefaultMemoryMiB || s.MMDSVersion != MMDSv1 || s.StopTimeout != DefaultStopTimeout {
		t.Fatalf("defaults not applied: %+v", s)
	}
	if DeriveMAC("a", "nic0") == DeriveMAC("b", "nic0") {
		t.Fatal("different VMs got the same MAC")
	}
}

func TestStopPlan(t *testing.T) {
	now := time.Unix(1000, 0)
	actions := func(steps []stopStep) []string {
		var a []string
		for i, s := range steps {
			a = append(a, s.action)
			if i > 0 && s.at.Before(steps[i-1].at) {
				t.Errorf("step %s is due before %s", s.action, steps[i-1].action)
			}
		}
		return a
	}
	steps, grace := stopPlan(now, now.Add(10*time.Second), true)
	if got := strings.Join(actions(steps), ","); got != "guest-stop,shutdown,sigterm,sigkill" {
		t.Fatalf("plan with init = %s", got)
	}
	last := steps[len(steps)-1].at
	if !last.Before(now.Add(10*time.Second)) || grace <= 0 || now.Add(grace).After(steps[1].at) {
		t.Fatalf("plan %+v, grace %v: the init's grace must end before the power button, SIGKILL before the deadline", steps, grace)
	}
	steps, _ = stopPlan(now, now.Add(10*time.Second), false)
	if got := strings.Join(actions(steps), ","); got != "shutdown,sigterm,sigkill" {
		t.Fatalf("plan without init = %s", got)
	}
	steps, _ = stopPlan(now, now.Add(120*time.Millisecond), true)
	if got := strings.Join(actions(steps), ","); got != "sigterm,sigkill" {
		t.Fatalf("short plan = %s", got)
	}
	steps, _ = stopPlan(now, now, true)
	if got := strings.Join(actions(steps), ","); got != "sigkill" || !steps[0].at.Equal(now) {
		t.Fatalf("immediate plan = %s at %v", got, steps[0].at)
	}
}

func TestClassify(t *testing.T) {
	exit7 := &guest.Exit{Code: 7}
	cases := []struct {
		name   string
		facts  frameFacts
		stop   *StopRecord
		vmm    ProcessExit
		event  bool
		reason Reason
	}{
		{"workload", frameFacts{exit: exit7}, nil, ProcessExit{Known: true}, false, ReasonWorkloadExit},
		{"workload, VMM outlived it", frameFacts{exit: exit7}, &StopRecord{Reason: ReasonWorkloadExit}, ProcessExit{Known: true, Signal: 9}, false, ReasonWorkloadExit},
		{"stopped", frameFacts{exit: exit7}, &StopRecord{Reason: ReasonStopped}, ProcessExit{Known: true}, false, ReasonStopped},
		{"timeout", frameFacts{}, &StopRecord{Reason: ReasonTimeout}, ProcessExit{Known: true, Signal: 9}, false, ReasonTimeout},
		{"init error", frameFacts{guestError: "mount: no base"}, nil, ProcessExit{Known: true}, false, ReasonGuestError},
		{"killed VMM", frameFacts{}, nil, ProcessExit{Known: true, Signal: 9}, false, ReasonVMMCrash},
		{"failed VMM", frameFacts{shutdownLine: "reboot: Power down"}, nil, ProcessExit{Known: true, Code: 1}, false, ReasonVMMCrash},
		{"guest reboot, child", frameFacts{shutdownLine: "reboot: Restarting system"}, nil, ProcessExit{Known: true}, false, ReasonGuestShutdown},
		{"guest, QMP event", frameFacts{}, nil, ProcessExit{}, true, ReasonGuestShutdown},
		{"guest, kernel line", frameFacts{shutdownLine: "reboot: Power down"}, nil, ProcessExit{}, false, ReasonGuestShutdown},
		{"panic", frameFacts{panicLine: "Kernel panic - not syncing: x"}, nil, ProcessExit{}, false, ReasonGuestShutdown},
		{"vanished", frameFacts{}, nil, ProcessExit{}, false, ReasonVMMCrash},
		{"exit 0 without guest shutdown", frameFacts{}, nil, ProcessExit{Known: true}, false, ReasonVMMCrash},
	}
	for _, c := range cases {
		es := classify(c.facts, c.stop, c.vmm, c.event, "vmm said")
		if es.Reason != c.reason {
			t.Errorf("%s: reason %s, want %s (%+v)", c.name, es.Reason, c.reason, es)
		}
		if c.facts.exit != nil && (!es.WorkloadExited || es.Code != 7) {
			t.Errorf("%s: workload exit lost: %+v", c.name, es)
		}
	}
	if es := classify(frameFacts{}, nil, ProcessExit{Known: true, Signal: 9}, false, "boom"); !strings.Contains(es.Message, "boom") || !strings.Contains(es.Message, "killed") {
		t.Errorf("crash message %q lacks the VMM's words", es.Message)
	}
}

func TestScanConsoleFindsFramesAmongNoise(t *testing.T) {
	key, err := guest.NewConsoleKey()
	if err != nil {
		t.Fatal(err)
	}
	var log strings.Builder
	log.WriteString("[    0.1] booting\n")
	fw := guest.NewWriter(&log, key)
	fw.WriteJSON(guest.FrameStarted, guest.Started{PID: 1, Mode: guest.ModeApp})
	log.WriteString("[    1.0] Kernel panic - not syncing: pretend\n")
	// A workload cannot forge a frame without the key.
	guest.NewWriter(&log, []byte("not the key, not the key")).WriteJSON(guest.FrameExit, guest.Exit{Code: 99})
	fw.WriteJSON(guest.FrameExit, guest.Exit{Code: 3})
	log.WriteString("[    2.0] reboot: Restarting system\n")
	var facts frameFacts
	var types []guest.FrameType
	if err := scanConsole(strings.NewReader(log.String()), key, func(f guest.Frame) { types = append(types, f.Type) }, &facts, nil); err != nil {
		t.Fatal(err)
	}
	if facts.exit == nil || facts.exit.Code != 3 {
		t.Fatalf("exit = %+v, want the authentic code 3", facts.exit)
	}
	if !strings.HasPrefix(facts.panicLine, "Kernel panic") || facts.shutdownLine != "reboot: Restarting system" {
		t.Fatalf("facts = %+v", facts)
	}
	if types[1] != guest.FrameStarted {
		t.Fatalf("frames = %v", types)
	}
}

func TestStateRoundTripAndLock(t *testing.T) {
	dir := t.TempDir()
	st := &State{ID: "x", Backend: "qemu", Status: StatusRunning, Pid: 42, PidStartTime: 7, Dir: dir,
		ConsoleKey: []byte{1, 2, 3}, StartOverhead: Duration(1500 * time.Microsecond), CreatedAt: time.Now().Round(0)}
	if err := writeState(dir, st); err != nil {
		t.Fatal(err)
	}
	got, err := readState(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got.Pid != 42 || got.PidStartTime != 7 || string(got.ConsoleKey) != "\x01\x02\x03" || got.StartOverhead != st.StartOverhead || !got.CreatedAt.Equal(st.CreatedAt) {
		t.Fatalf("round trip: %+v", got)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 1 {
		t.Fatalf("temporary files left: %v", ents)
	}

	l, err := tryLock(dir)
	if err != nil {
		t.Fatal(err)
	}
	// flock conflicts between open file descriptions, even in one process.
	if _, err := tryLock(dir); !errors.Is(err, errLocked) {
		t.Fatalf("second lock: %v, want errLocked", err)
	}
	if lockHolder(dir) != os.Getpid() {
		t.Fatalf("lock holder %d, want %d", lockHolder(dir), os.Getpid())
	}
	l.release()
	if lockHolder(dir) != 0 {
		t.Fatal("a released lock still reports a holder")
	}
	l2, err := tryLock(dir)
	if err != nil {
		t.Fatalf("lock after release: %v", err)
	}
	l2.release()
}

func TestFollowerSeesAppendsUntilDone(t *testing.T) {
	p := filepath.Join(t.TempDir(), "console.log")
	if err := os.WriteFile(p, []byte("one\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	fl, err := follow(context.Background(), p, done)
	if err != nil {
		t.Fatal(err)
	}
	defer fl.Close()
	got := make(chan string)
	go func() {
		b, _ := io.ReadAll(fl)
		got <- string(b)
	}()
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString("two\n")
	f.WriteString("three\n")
	f.Close()
	close(done)
	if s := <-got; s != "one\ntwo\nthree\n" {
		t.Fatalf("followed %q", s)
	}
}

func TestFollowerStopsOnContext(t *testing.T) {
	p := filepath.Join(t.TempDir(), "console.log")
	os.WriteFile(p, nil, 0o600)
	ctx, cancel := context.WithCancel(context.Background())
	fl, err := follow(ctx, p, make(chan struct{}))
	if err != nil {
		t.Fatal(err)
	}
	defer fl.Close()
	errc := make(chan error)
	go func() {
		_, err := io.ReadAll(fl)
		errc <- err
	}()
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("read after cancel: %v", err)
	}
}

func TestAttachProcessDefendsAgainstPidReuse(t *testing.T) {
	marker := t.TempDir()
	// The marker rides along as sleep's argv[0].
	cmd := exec.Command("sleep", "1000")
	cmd.Args[0] = marker
	p, err := StartProcess(cmd)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Signal(syscall.SIGKILL)
	if _, err := AttachProcess(p.Pid, p.StartTime+1, marker); !errors.Is(err, ErrNotOurs) {
		t.Fatalf("attach with a wrong start time: %v, want ErrNotOurs", err)
	}
	if _, err := AttachProcess(p.Pid, p.StartTime, marker+"-other"); !errors.Is(err, ErrNotOurs) {
		t.Fatalf("attach with a wrong marker: %v, want ErrNotOurs", err)
	}
	a, err := AttachProcess(p.Pid, p.StartTime, marker)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Release()
	if a.Exited() {
		t.Fatal("attached process reported exited")
	}
	if err := a.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-a.Done()
	<-p.Done()
	if e := p.Exit(); !e.Known || e.Signal != int(syscall.SIGKILL) {
		t.Fatalf("child exit = %+v", e)
	}
	if e := a.Exit(); e.Known {
		t.Fatalf("an attached process cannot know the exit status: %+v", e)
	}
	if _, err := AttachProcess(p.Pid, p.StartTime, marker); !errors.Is(err, ErrNotOurs) {
		t.Fatalf("attach to a dead process: %v, want ErrNotOurs", err)
	}
}

func TestNamesDir(t *testing.T) {
	dir := "/var/lib/fireactions/vms/vm1"
	for cmdline, want := range map[string]bool{
		"qemu\x00-pidfile\x00" + dir + "/vmm.pid\x00":  true,
		"helper\x00--doc\x00" + dir + "/metadata.json": true,
		"x\x00" + dir: true,
		"qemu\x00-pidfile\x00/var/lib/fireactions/vms/vm10/vmm.pid\x00": false,
		"qemu\x00-name\x00vm1\x00":                                      false,
	} {
		if got := namesDir(cmdline, dir); got != want {
			t.Errorf("namesDir(%q) = %v, want %v", cmdline, got, want)
		}
	}
}

func TestUnixSocketWithLongPath(t *testing.T) {
	dir := filepath.Join(t.TempDir(), strings.Repeat("d", 60), strings.Repeat("e", 60))
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, "qmp.sock")
	if len(p) < maxSunPath {
		t.Fatalf("path %q is not long enough to test", p)
	}
	f, err := ListenUnix(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	c, err := DialUnix(context.Background(), p)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if fi, err := os.Stat(p); err != nil || fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket file: %v %v", fi, err)
	}
}

type fakeBackend struct {
	name string
	err  error
}

func (f fakeBackend) Name() string                           { return f.name }
func (f fakeBackend) Available() error                       { return f.err }
func (f fakeBackend) Describe() string                       { return f.name + " (described)" }
func (fakeBackend) GuestDevices(*Spec) (GuestDevices, error) { return GuestDevices{}, nil }
func (fakeBackend) Start(context.Context, *Spec, Layout) (Handle, error) {
	return nil, errors.New("fake")
}
func (fakeBackend) Attach(context.Context, *State, *Process) (Handle, error) {
	return nil, errors.New("fake")
}
func (fakeBackend) Cleanup(*State) error { return nil }

func TestSelectBackend(t *testing.T) {
	fc := fakeBackend{name: "firecracker", err: errors.New("no /dev/kvm")}
	qemu := fakeBackend{name: "qemu"}
	b, reason, err := SelectBackend("auto", fc, qemu)
	if err != nil || b.Name() != "qemu" || reason != "firecracker: no /dev/kvm; using qemu (described)" {
		t.Fatalf("auto = %v, %q, %v", b, reason, err)
	}
	if _, _, err := SelectBackend("firecracker", fc, qemu); err == nil || !strings.Contains(err.Error(), "no /dev/kvm") {
		t.Fatalf("explicit unusable backend: %v", err)
	}
	if _, _, err := SelectBackend("xen", fc, qemu); err == nil || !strings.Contains(err.Error(), "firecracker, qemu") {
		t.Fatalf("unknown backend: %v", err)
	}
	if _, _, err := SelectBackend("", fc); err == nil || !strings.Contains(err.Error(), "no usable VM backend") {
		t.Fatalf("nothing usable: %v", err)
	}
}
