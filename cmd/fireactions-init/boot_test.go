//go:build linux

package main

// Boot tests: the real init in a real kernel under QEMU. They prove the
// guest side of the microVM runtime with a deliberately minimal launcher;
// the production launcher is internal/vm.

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/Microsoft/hcsshim/ext4/tar2ext4"

	"github.com/fireactions/fireactions/internal/guest"
	"github.com/fireactions/fireactions/internal/initramfs"
)

// bootTimeout only stops a wedged QEMU from hanging the test run; nothing
// asserts on durations.
const bootTimeout = 3 * time.Minute

type fixture struct {
	kernel, modules string
	initBin         string
	base            string // shared initramfs part
	rootfs          string // read-only base ext4
	rootfsSum       string
	dir             string
}

var (
	fixtureOnce sync.Once
	fix         *fixture
	fixErr      error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if fix != nil {
		os.RemoveAll(fix.dir)
	}
	os.Exit(code)
}

func needHost(t testing.TB) {
	t.Helper()
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		t.Fatalf("qemu-system-x86_64 is required (Debian package qemu-system-x86): %v", err)
	}
	for _, tool := range []string{"mkfs.ext4", "debugfs"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is required (Debian package e2fsprogs): %v", tool, err)
		}
	}
}

func getFixture(t testing.TB) *fixture {
	t.Helper()
	needHost(t)
	fixtureOnce.Do(func() { fix, fixErr = buildFixture() })
	if fixErr != nil {
		t.Fatal(fixErr)
	}
	return fix
}

func buildFixture() (*fixture, error) {
	dir, err := os.MkdirTemp("", "fireactions-init-test-")
	if err != nil {
		return nil, err
	}
	f := &fixture{dir: dir}

	// The kernel: Debian's cloud kernel, prepared by scripts/test-kernel.sh
	// (`make test` runs it and passes its result in the environment).
	f.kernel, f.modules = os.Getenv("FIREACTIONS_TEST_KERNEL"), os.Getenv("FIREACTIONS_TEST_MODULES")
	if f.kernel != "" && f.modules != "" {
		return f, f.finish()
	}
	out, err := exec.Command("../../scripts/test-kernel.sh").Output()
	if err != nil {
		var stderr []byte
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = ee.Stderr
		}
		return nil, fmt.Errorf("scripts/test-kernel.sh failed, so there is no guest kernel: %v\n%s%s", err, out, stderr)
	}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if v, ok := strings.CutPrefix(line, "KERNEL="); ok {
			f.kernel = v
		}
		if v, ok := strings.CutPrefix(line, "MODULES="); ok {
			f.modules = v
		}
	}
	if f.kernel == "" || f.modules == "" {
		return nil, fmt.Errorf("scripts/test-kernel.sh printed no KERNEL=/MODULES= lines:\n%s", out)
	}
	return f, f.finish()
}

// finish builds what the boot tests share once the kernel is known.
func (f *fixture) finish() error {
	dir := f.dir
	var err error

	// The init, built as `make build` builds it.
	initBin := filepath.Join(dir, "fireactions-init")
	f.initBin = initBin
	cmd := exec.Command(goTool(), "build", "-trimpath", "-ldflags=-s -w", "-o", initBin, ".")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("build fireactions-init: %v\n%s", err, out)
	}
	f.base, err = initramfs.Base(context.Background(), dir, initBin, f.modules, initramfs.DefaultModules)
	if err != nil {
		return err
	}

	f.rootfs = filepath.Join(dir, "base.ext4")
	if err := buildRootfs(f.rootfs); err != nil {
		return err
	}
	f.rootfsSum, err = sha256File(f.rootfs)
	return err
}

func goTool() string {
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	return filepath.Join(runtime.GOROOT(), "bin", "go")
}

func sha256File(p string) (string, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// systemInitScript stands in for systemd in the system-mode test.
const systemInitScript = `#!/bin/sh
echo "system-init pid=$$ host=$(hostname)"
reboot -f
`

// buildRootfs makes the image base the way production does (a tar stream
// converted by hcsshim's tar2ext4): Debian's busybox-static with its
// applet links, a passwd/group with an unprivileged user, and a
// /sbin/init script for system mode.
func buildRootfs(dst string) error {
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		return fmt.Errorf("needs Debian's busybox-static at /bin/busybox: %w", err)
	}
	list, err := exec.Command("/bin/busybox", "--list-full").Output()
	if err != nil {
		return fmt.Errorf("busybox --list-full: %w", err)
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	dirs := map[string]bool{}
	addDir := func(name string, mode int64, uid int) {
		if dirs[name] {
			return
		}
		dirs[name] = true
		tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: name + "/", Mode: mode, Uid: uid, Gid: uid})
	}
	addFile := func(name string, mode int64, data []byte) {
		addDir(filepath.Dir(name), 0o755, 0)
		tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode, Size: int64(len(data))})
		tw.Write(data)
	}
	for _, d := range []string{"bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "root", "home", "var", "var/lib", "dev", "proc", "sys", "run"} {
		addDir(d, 0o755, 0)
	}
	addDir("tmp", 0o1777, 0)
	addDir("home/app", 0o755, 1000)
	addFile("bin/busybox", 0o755, bb)
	for _, applet := range strings.Fields(string(list)) {
		if applet == "bin/busybox" || applet == "sbin/init" || applet == "linuxrc" {
			continue
		}
		addDir(filepath.Dir(applet), 0o755, 0)
		tw.WriteHeader(&tar.Header{Typeflag: tar.TypeSymlink, Name: applet, Linkname: "/bin/busybox", Mode: 0o777})
	}
	addFile("sbin/init", 0o755, []byte(systemInitScript))
	addFile("etc/passwd", 0o644, []byte("root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n"))
	addFile("etc/group", 0o644, []byte("root:x:0:\nwheel:x:10:app\napp:x:1000:\n"))
	addFile("etc/base-marker", 0o644, []byte("from the base image\n"))
	if err := tw.Close(); err != nil {
		return err
	}
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	defer out.Close()
	if err := tar2ext4.ConvertTarToExt4(&buf, out, tar2ext4.MaximumDiskSize(256<<20)); err != nil {
		return fmt.Errorf("tar2ext4: %w", err)
	}
	return out.Close()
}

func makeExt4(t testing.TB, name string, size int64) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(size)
	f.Close()
	out, err := exec.Command("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1", "-i", "16384", p).CombinedOutput()
	if err != nil {
		t.Fatalf("mkfs.ext4: %v\n%s", err, out)
	}
	return p
}

// debugfsCat reads a file out of an unmounted ext4 image.
func debugfsCat(t *testing.T, image, path string) string {
	t.Helper()
	out, err := exec.Command("debugfs", "-R", "cat "+path, image).Output()
	if err != nil {
		t.Fatalf("debugfs cat %s: %v", path, err)
	}
	return string(out)
}

type extraDisk struct {
	path       string
	mountPoint string
	readOnly   bool
}

type vmSpec struct {
	cfg guest.Config // drives and key are filled in
	// modules replaces initramfs.DefaultModules in the base part.
	modules []string
	nicMAC  string
	extras  []extraDisk
	// onFrame sees every frame from the guest and may answer through w.
	onFrame func(f guest.Frame, w *guest.FrameWriter)
}

type vmResult struct {
	stdout, stderr strings.Builder
	started        *guest.Started
	exit           *guest.Exit
	errText        string
	logs, noise    []string
	rejected       uint64
	scratch        string
	console        string // everything QEMU printed, for failure messages
}

func (r *vmResult) String() string {
	return fmt.Sprintf("exit=%+v error=%q\nstdout:\n%s\nstderr:\n%s\nconsole:\n%s", r.exit, r.errText, r.stdout.String(), r.stderr.String(), r.console)
}

// boot runs one VM to its end with a minimal QEMU microvm command line.
func boot(t testing.TB, spec vmSpec) *vmResult {
	t.Helper()
	f := getFixture(t)
	res := &vmResult{scratch: makeExt4(t, "scratch.ext4", 512<<20)}
	key, err := guest.NewConsoleKey()
	if err != nil {
		t.Fatal(err)
	}
	cfg := spec.cfg
	cfg.ConsoleKey = key
	cfg.ClockUnixNano = time.Now().UnixNano()
	// The base is found by serial, the scratch disk by virtio order:
	// both ways the backends identify drives.
	cfg.Drives = []guest.Drive{
		{Role: guest.RoleBase, Serial: "base"},
		{Role: guest.RoleScratch, Device: "/dev/vdb"},
	}
	args := []string{
		"-M", "microvm", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-cpu", "max", "-m", "256", "-smp", "1",
		"-kernel", f.kernel,
		"-append", "console=ttyS0 quiet panic=-1 tsc_early_khz=2000000 lpj=4000000",
		"-drive", "id=base,file=" + f.rootfs + ",format=raw,if=none,readonly=on",
		"-device", "virtio-blk-device,drive=base,serial=base",
		"-drive", "id=scratch,file=" + res.scratch + ",format=raw,if=none",
		"-device", "virtio-blk-device,drive=scratch",
		"-serial", "stdio",
	}
	for i, x := range spec.extras {
		id := fmt.Sprintf("extra%d", i)
		drive := "id=" + id + ",file=" + x.path + ",format=raw,if=none"
		if x.readOnly {
			drive += ",readonly=on"
		}
		args = append(args, "-drive", drive, "-device", "virtio-blk-device,drive="+id+",serial="+id)
		cfg.Drives = append(cfg.Drives, guest.Drive{Role: guest.RoleExtra, Serial: id, MountPoint: x.mountPoint, ReadOnly: x.readOnly})
	}
	if spec.nicMAC != "" {
		// User-mode networking with restrict=on: a NIC the guest can
		// configure, with no path out of QEMU.
		args = append(args, "-netdev", "user,id=n0,restrict=on", "-device", "virtio-net-device,netdev=n0,mac="+spec.nicMAC)
	}
	base := f.base
	if spec.modules != nil {
		base, err = initramfs.Base(context.Background(), f.dir, f.initBin, f.modules, spec.modules)
		if err != nil {
			t.Fatal(err)
		}
	}
	initrd := filepath.Join(t.TempDir(), "initrd")
	if err := initramfs.WriteInitrd(initrd, base, cfg); err != nil {
		t.Fatal(err)
	}
	args = append(args, "-initrd", initrd)

	ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "qemu-system-x86_64", args...)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var console bytes.Buffer
	fr := guest.NewReader(io.TeeReader(stdout, &console), key)
	fw := guest.NewWriter(stdin, key)
	for {
		fm, err := fr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		switch fm.Type {
		case guest.FrameNoise:
			res.noise = append(res.noise, string(fm.Payload))
		case guest.FrameStdout:
			res.stdout.Write(fm.Payload)
		case guest.FrameStderr:
			res.stderr.Write(fm.Payload)
		case guest.FrameLog:
			res.logs = append(res.logs, string(fm.Payload))
		case guest.FrameError:
			res.errText = string(fm.Payload)
		case guest.FrameStarted:
			res.started = new(guest.Started)
			if err := fm.DecodeJSON(res.started); err != nil {
				t.Error(err)
			}
		case guest.FrameExit:
			res.exit = new(guest.Exit)
			if err := fm.DecodeJSON(res.exit); err != nil {
				t.Error(err)
			}
		}
		if spec.onFrame != nil && fm.Type != guest.FrameNoise {
			spec.onFrame(fm, fw)
		}
	}
	werr := cmd.Wait()
	stdin.Close()
	res.rejected = fr.Rejected()
	res.console = console.String()
	if ctx.Err() != nil {
		t.Fatalf("QEMU did not exit within %s: the guest hung\n%s", bootTimeout, res)
	}
	if werr != nil {
		t.Fatalf("qemu: %v\n%s\n%s", werr, stderr.String(), res)
	}
	return res
}

func appConfig(script string) guest.Config {
	return guest.Config{Mode: guest.ModeApp, Process: guest.Process{Args: []string{"/bin/sh", "-c", script}}}
}

func wantExit(t *testing.T, r *vmResult, code, signal int, reason string) {
	t.Helper()
	if r.errText != "" {
		t.Fatalf("guest reported an error: %s\n%s", r.errText, r)
	}
	if r.exit == nil {
		t.Fatalf("no exit frame\n%s", r)
	}
	if r.exit.Code != code || r.exit.Signal != signal || r.exit.Reason != reason {
		t.Errorf("exit = %+v, want code %d signal %d reason %q\n%s", *r.exit, code, signal, reason, r)
	}
}

// lines returns "key=value" lines of output as a map.
func lines(s string) map[string]string {
	m := map[string]string{}
	sc := bufio.NewScanner(strings.NewReader(s))
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), "="); ok {
			m[k] = v
		}
	}
	return m
}

// TestBootAppIdentityAndNetwork: an unprivileged workload with the image's
// Env, WorkingDir and User, a static address on a NIC, and separated
// stdout/stderr.
func TestBootAppIdentityAndNetwork(t *testing.T) {
	t.Parallel()
	cfg := appConfig(`
echo uid=$(id -u)
echo gid=$(id -g)
echo groups="$(id -G)"
echo pwd=$(pwd)
echo foo=$FOO
echo home=$HOME
echo path=$PATH
echo hostname=$(hostname)
echo etc_hostname=$(cat /etc/hostname)
echo mtu=$(cat /sys/class/net/eth0/mtu)
echo addr=$(ip -o -4 addr show dev eth0 | awk '{print $4}')
echo default=$(ip route | awk '$1 == "default" {print $3}')
echo mmds=$(ip route show 169.254.169.254)
echo resolv=$(grep nameserver /etc/resolv.conf)
echo stdin=$(cat)
echo tty=$(tty)
echo to-stderr >&2
exit 0`)
	cfg.Hostname = "guest-a"
	cfg.Process.Env = []string{"FOO=bar baz"}
	cfg.Process.WorkingDir = "/home/app/work"
	cfg.Process.User = "app"
	cfg.Interfaces = []guest.Interface{{MAC: "52:54:00:12:34:56", Address: "10.0.2.15/24", Gateway: "10.0.2.2",
		MTU: 1400, Nameservers: []string{"10.0.2.3"}, MMDS: true}}
	r := boot(t, vmSpec{cfg: cfg, nicMAC: "52:54:00:12:34:56"})
	wantExit(t, r, 0, 0, "exited")
	got := lines(r.stdout.String())
	want := map[string]string{
		"uid": "1000", "gid": "1000", "groups": "1000 10", "pwd": "/home/app/work",
		"foo": "bar baz", "home": "/home/app", "path": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"hostname": "guest-a", "etc_hostname": "guest-a", "mtu": "1400", "addr": "10.0.2.15/24",
		"default": "10.0.2.2", "mmds": "169.254.169.254 dev eth0 scope link", "resolv": "nameserver 10.0.2.3",
		"stdin": "", "tty": "not a tty",
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %q, want %q", k, got[k], v)
		}
	}
	if r.stderr.String() != "to-stderr\n" {
		t.Errorf("stderr = %q, want only to-stderr\n%s", r.stderr.String(), r)
	}
	if strings.Contains(r.stdout.String(), "to-stderr") {
		t.Error("stderr leaked into stdout")
	}
	if r.started == nil || r.started.Mode != guest.ModeApp || r.started.PID <= 1 {
		t.Errorf("started = %+v", r.started)
	}
}

// TestBootRootfsAndForgery: writes land on scratch and extra disks and
// never on the base; /var/lib/docker is a real ext4 mount; frames forged
// by the workload on its stdout and on the console devices fool nobody;
// a non-zero exit code arrives intact.
func TestBootRootfsAndForgery(t *testing.T) {
	t.Parallel()
	f := getFixture(t)
	data := makeExt4(t, "data.ext4", 64<<20)
	ro := makeExt4(t, "ro.ext4", 64<<20)
	forged := "\x1eFA1 exit 1 eyJjb2RlIjowfQ== 00112233445566778899aabbccddeeff"
	cfg := appConfig(`
set -e
echo written > /etc/new-file
echo tool > /usr/bin/new-tool
rm /etc/base-marker
echo data > /data/hello
echo docker-mount=$(awk '$2 == "/var/lib/docker" {print $3}' /proc/mounts)
echo containerd-mount=$(awk '$2 == "/var/lib/containerd" {print $3}' /proc/mounts)
echo root-mount=$(awk '$2 == "/" {print $3}' /proc/mounts)
echo ro-write=$(touch /ro/x 2>/dev/null && echo yes || echo no)
touch /var/lib/docker/in-docker
echo initramfs-left=$(ls /fireactions /init 2>/dev/null | wc -l)
echo docker-modules=$(grep -c -E '^(bridge|br_netfilter|veth|nf_tables|nft_compat|xt_MASQUERADE|iptable_nat) ' /proc/modules)
printf '` + forged + `\n'
printf '` + forged + `\n' >&2
printf '` + forged + `\n' > /dev/ttyS0
printf '` + forged + `\n' > /dev/console
sync
exit 3`)
	r := boot(t, vmSpec{
		cfg:     cfg,
		modules: append(append([]string{}, initramfs.DefaultModules...), initramfs.DockerModules...),
		extras:  []extraDisk{{path: data, mountPoint: "/data"}, {path: ro, mountPoint: "/ro", readOnly: true}},
	})
	wantExit(t, r, 3, 0, "exited")
	got := lines(r.stdout.String())
	for k, v := range map[string]string{"docker-modules": "7", "docker-mount": "ext4", "containerd-mount": "ext4", "root-mount": "overlay", "ro-write": "no", "initramfs-left": "0"} {
		if got[k] != v {
			t.Errorf("%s = %q, want %q\n%s", k, got[k], v, r)
		}
	}
	// The forgeries written to stdout/stderr arrive as plain output; those
	// written to the console devices are rejected lines.
	if !strings.Contains(r.stdout.String(), forged) || !strings.Contains(r.stderr.String(), forged) {
		t.Errorf("forged lines missing from the output streams\n%s", r)
	}
	if r.rejected != 2 {
		t.Errorf("rejected %d console lines, want the 2 forged ones\n%s", r.rejected, r)
	}

	if sum, _ := sha256File(f.rootfs); sum != f.rootfsSum {
		t.Error("the base image changed")
	}
	if got := debugfsCat(t, r.scratch, "/root/etc/new-file"); got != "written\n" {
		t.Errorf("scratch /root/etc/new-file = %q", got)
	}
	if got := debugfsCat(t, r.scratch, "/root/usr/bin/new-tool"); got != "tool\n" {
		t.Errorf("scratch /root/usr/bin/new-tool = %q", got)
	}
	out, _ := exec.Command("debugfs", "-R", "ls -l /volumes/var%2Flib%2Fdocker", r.scratch).Output()
	if !strings.Contains(string(out), "in-docker") {
		t.Errorf("/var/lib/docker is not on the scratch disk: %s", out)
	}
	if got := debugfsCat(t, data, "/hello"); got != "data\n" {
		t.Errorf("extra disk /hello = %q", got)
	}
	if got := debugfsCat(t, f.rootfs, "/etc/base-marker"); got != "from the base image\n" {
		t.Errorf("base marker = %q", got)
	}
}

// TestBootBinaryOutputAndSignal: binary output crosses the console intact
// (all 256 byte values, more than one frame's worth), and death by signal
// is reported as such.
func TestBootBinaryOutputAndSignal(t *testing.T) {
	t.Parallel()
	r := boot(t, vmSpec{cfg: appConfig(`
head -c 196608 /dev/urandom > /tmp/blob
sha256sum /tmp/blob | cut -d' ' -f1 >&2
cat /tmp/blob
kill -9 $$
echo after`)})
	wantExit(t, r, 137, 9, "signaled")
	sum := sha256.Sum256([]byte(r.stdout.String()))
	if got, want := hex.EncodeToString(sum[:]), strings.TrimSpace(r.stderr.String()); got != want || r.stdout.Len() != 196608 {
		t.Errorf("stdout: %d bytes, sha256 %s; the guest wrote 196608 bytes, sha256 %s", r.stdout.Len(), got, want)
	}
}

// TestBootSignalAndStop: the host's signal frame reaches the workload and
// its stop frame delivers the image's stop signal, after which the guest
// reports and powers off.
func TestBootSignalAndStop(t *testing.T) {
	t.Parallel()
	cfg := appConfig(`
trap 'echo got-usr2' USR2
trap 'echo got-stop-signal; exit 7' USR1
echo ready
while :; do sleep 0.1; done`)
	cfg.Process.StopSignal = "SIGUSR1"
	var stdout strings.Builder
	sentSignal, sentStop := false, false
	r := boot(t, vmSpec{cfg: cfg, onFrame: func(f guest.Frame, w *guest.FrameWriter) {
		if f.Type != guest.FrameStdout {
			return
		}
		stdout.Write(f.Payload)
		switch {
		case !sentSignal && strings.Contains(stdout.String(), "ready\n"):
			sentSignal = true
			w.WriteJSON(guest.FrameSignal, guest.SignalRequest{Signal: 12}) // SIGUSR2
		case !sentStop && strings.Contains(stdout.String(), "got-usr2\n"):
			sentStop = true
			w.WriteJSON(guest.FrameStop, guest.StopRequest{})
		}
	}})
	wantExit(t, r, 7, 0, "stopped")
	if r.stdout.String() != "ready\ngot-usr2\ngot-stop-signal\n" {
		t.Errorf("stdout = %q", r.stdout.String())
	}
}

// TestBootStopKillsAfterGrace: a workload that ignores the stop signal is
// killed when the grace period ends.
func TestBootStopKillsAfterGrace(t *testing.T) {
	t.Parallel()
	cfg := appConfig(`trap '' TERM; echo ready; while :; do sleep 0.1; done`)
	sent := false
	r := boot(t, vmSpec{cfg: cfg, onFrame: func(f guest.Frame, w *guest.FrameWriter) {
		if f.Type == guest.FrameStdout && !sent {
			sent = true
			w.WriteJSON(guest.FrameStop, guest.StopRequest{Grace: 500 * time.Millisecond})
		}
	}})
	wantExit(t, r, 137, 9, "stopped")
}

// TestBootSystemMode: the image's /sbin/init becomes PID 1.
func TestBootSystemMode(t *testing.T) {
	t.Parallel()
	r := boot(t, vmSpec{cfg: guest.Config{Mode: guest.ModeSystem, Hostname: "sys-guest"}})
	if r.errText != "" || r.exit != nil {
		t.Fatalf("system mode: error %q exit %+v\n%s", r.errText, r.exit, r)
	}
	if r.started == nil || r.started.Mode != guest.ModeSystem || r.started.PID != 1 {
		t.Errorf("started = %+v", r.started)
	}
	if !strings.Contains(strings.Join(r.noise, "\n"), "system-init pid=1 host=sys-guest") {
		t.Errorf("the image's init did not run as PID 1\n%s", r)
	}
}

// TestBootErrors: a failure in the guest becomes an error frame and the
// VM ends instead of hanging.
func TestBootErrors(t *testing.T) {
	t.Parallel()
	cfg := appConfig("")
	cfg.Process.Args = []string{"no-such-command"}
	r := boot(t, vmSpec{cfg: cfg})
	if r.exit != nil || !strings.Contains(r.errText, `"no-such-command": executable file not found in $PATH`) {
		t.Errorf("error = %q, exit = %+v\n%s", r.errText, r.exit, r)
	}
}

// TestNotPID1: started by hand, the init refuses to do anything.
func TestNotPID1(t *testing.T) {
	f := getFixture(t)
	out, err := exec.Command(f.initBin).CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 2 || !strings.Contains(string(out), "not meant to be run by hand") {
		t.Errorf("exit %v, output %q", err, out)
	}
}

// TestKernelModules: the module lists resolve against the test kernel, with
// dependencies first and built-in ext4 skipped.
func TestKernelModules(t *testing.T) {
	f := getFixture(t)
	for name, list := range map[string][]string{"default": initramfs.DefaultModules, "docker": initramfs.DockerModules} {
		files, err := initramfs.ResolveModules(f.modules, list)
		if err != nil {
			t.Errorf("%s: %v", name, err)
			continue
		}
		pos := map[string]int{}
		for i, p := range files {
			pos[strings.TrimSuffix(filepath.Base(p), ".ko")] = i
		}
		if _, ok := pos["ext4"]; ok {
			t.Errorf("%s: ext4 is built into the cloud kernel but was resolved to a file", name)
		}
		for _, dep := range [][2]string{{"virtio_ring", "virtio"}, {"virtio", "virtio_mmio"}, {"failover", "net_failover"},
			{"net_failover", "virtio_net"}, {"nf_conntrack", "nf_nat"}, {"x_tables", "ip_tables"}} {
			a, okA := pos[dep[0]]
			b, okB := pos[dep[1]]
			if okA != okB || (okA && a > b) {
				t.Errorf("%s: %s must come before %s: %v", name, dep[0], dep[1], files)
			}
		}
	}
}

// BenchmarkBootToWorkload measures, with this host's accelerator (TCG when
// there is no /dev/kvm), the time from starting QEMU to the workload's
// start and to the end of the VM, for a trivial app-mode workload.
func BenchmarkBootToWorkload(b *testing.B) {
	getFixture(b)
	var toStart, toEnd time.Duration
	for i := 0; i < b.N; i++ {
		begin := time.Now()
		var started time.Time
		r := boot(b, vmSpec{cfg: appConfig("true"), onFrame: func(f guest.Frame, _ *guest.FrameWriter) {
			if f.Type == guest.FrameStarted {
				started = time.Now()
			}
		}})
		if r.exit == nil || r.exit.Code != 0 || started.IsZero() {
			b.Fatalf("boot failed\n%s", r)
		}
		toStart += started.Sub(begin)
		toEnd += time.Since(begin)
	}
	b.ReportMetric(float64(toStart.Milliseconds())/float64(b.N), "ms-to-workload/op")
	b.ReportMetric(float64(toEnd.Milliseconds())/float64(b.N), "ms-to-exit/op")
}
