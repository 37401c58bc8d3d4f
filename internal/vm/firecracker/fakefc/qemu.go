package main

import (
	"bufio"
	"bytes"
	"context"
	"debug/elf"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/fireactions/fireactions/internal/vm/qmp"
)

// qemu is the guest: a qemu-system-x86_64 child of the fake.
type qemu struct {
	qmpPath string
	log     *logger

	mu  sync.Mutex
	qmp *qmp.Client
}

// The metadata network the fake gives an MMDS interface: a restricted
// user-mode network whose only reachable peer is the MMDS address.
const (
	mmdsNet  = "169.254.0.0/16"
	mmdsHost = "169.254.0.1"
)

// start boots the configured guest; v.mu is held.
func (v *vmm) start() error {
	if v.boot == nil {
		return fmt.Errorf("Cannot start microvm without kernel configuration.")
	}
	if err := checkKernel(v.boot.KernelImagePath); err != nil {
		return fmt.Errorf("Cannot load kernel due to invalid memory configuration or invalid kernel image: %v", err)
	}
	bin, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		return fmt.Errorf("fakefc needs qemu-system-x86_64 (Debian package qemu-system-x86): %v", err)
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	kvm := kvmUsable()
	g := &qemu{qmpPath: filepath.Join(v.dir, "fakefc-qmp.sock"), log: v.log}
	args := []string{
		"-name", v.opts.id,
		"-M", "microvm,x-option-roms=off,isa-serial=on,rtc=on",
		"-nodefaults", "-no-user-config", "-display", "none",
		// A guest reset ends QEMU, as it ends Firecracker.
		"-no-reboot",
	}
	if kvm {
		args = append(args, "-accel", "kvm", "-cpu", "host")
	} else {
		args = append(args, "-accel", "tcg", "-cpu", "max")
	}
	threads := 1
	if v.machine.Smt {
		threads = 2
	}
	cores := max(v.machine.VcpuCount/threads, 1)
	bootArgs := v.boot.BootArgs
	if !kvm {
		// What a Linux guest needs under TCG, the fake's business as the
		// VMM: the TSC calibration sometimes never finishes otherwise.
		bootArgs = addArg(addArg(bootArgs, "tsc_early_khz", "2000000"), "lpj", "4000000")
	}
	args = append(args,
		"-smp", fmt.Sprintf("%d,sockets=1,cores=%d,threads=%d", v.machine.VcpuCount, cores, threads),
		"-m", strconv.Itoa(v.machine.MemSizeMib),
		"-kernel", v.boot.KernelImagePath,
		"-append", bootArgs,
		// The console is the fake's own stdin and stdout.
		"-chardev", "stdio,id=console,signal=off", "-serial", "chardev:console",
		"-qmp", "unix:"+g.qmpPath+",server=on,wait=off",
	)
	if v.boot.InitrdPath != "" {
		args = append(args, "-initrd", v.boot.InitrdPath)
	}
	// Firecracker attaches a root device first, then the others in the
	// order they were configured.
	ordered := make([]drive, 0, len(v.drives))
	for _, d := range v.drives {
		if d.IsRootDevice {
			ordered = append(ordered, d)
		}
	}
	for _, d := range v.drives {
		if !d.IsRootDevice {
			ordered = append(ordered, d)
		}
	}
	for i, d := range ordered {
		id := "drive" + strconv.Itoa(i)
		opt := fmt.Sprintf("id=%s,if=none,format=raw,file=%s", id, strings.ReplaceAll(d.PathOnHost, ",", ",,"))
		if d.IsReadOnly {
			opt += ",readonly=on"
		}
		args = append(args, "-drive", opt, "-device", "virtio-blk-device,drive="+id)
	}
	var extra []*os.File
	for i, n := range v.nics {
		id := "net" + strconv.Itoa(i)
		if v.mmdsAllowed(n.IfaceID) {
			sock, err := v.mmds.listen(filepath.Join(v.dir, "fakefc-mmds.sock"), v.log)
			if err != nil {
				return err
			}
			fwd := fmt.Sprintf("tcp:%s:80-cmd:%s", v.mmdsCfg.IPv4Address, shellJoin([]string{self, relayArg, sock}))
			args = append(args, "-netdev", fmt.Sprintf("user,id=%s,restrict=on,ipv6=off,net=%s,host=%s,guestfwd=%s",
				id, mmdsNet, mmdsHost, strings.ReplaceAll(fwd, ",", ",,")))
		} else {
			// The tap opened at PUT /network-interfaces goes to QEMU:
			// a tap has one attached queue unless multi-queue.
			extra = append(extra, n.tap)
			args = append(args, "-netdev", fmt.Sprintf("tap,id=%s,fd=%d", id, 2+len(extra)))
		}
		dev := "virtio-net-device,netdev=" + id
		if n.GuestMAC != "" {
			dev += ",mac=" + n.GuestMAC
		}
		args = append(args, "-device", dev)
	}
	if v.vsock != nil {
		// No guest device: the host side exists so that clients find it.
		l, err := net.Listen("unix", v.vsock.UDSPath)
		if err != nil {
			return fmt.Errorf("Cannot create backend for vsock device: %v", err)
		}
		v.vsock.listener = l
		v.log.Warnf("vsock: fakefc has no guest vsock device; %s accepts no guest connections", v.vsock.UDSPath)
	}

	stderr, err := g.logPipe()
	if err != nil {
		return err
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, stderr
	cmd.ExtraFiles = extra
	// QEMU must not outlive the fake: killed, the fake takes it along.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	started := make(chan error, 1)
	go func() {
		// The parent-death signal fires when the thread that forked
		// exits, so that thread stays locked to this goroutine, which
		// lives as long as QEMU.
		runtime.LockOSThread()
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		stderr.Close()
		started <- nil
		err := cmd.Wait()
		v.guestExited(err)
	}()
	if err := <-started; err != nil {
		stderr.Close()
		return fmt.Errorf("start %s: %v", bin, err)
	}
	v.log.Infof("guest started: %s %s", bin, strings.Join(args, " "))
	v.guest = g
	return nil
}

// guestExited ends the fake the way Firecracker ends: status 0 when the
// guest reset itself, an error status otherwise.
func (v *vmm) guestExited(err error) {
	code := exitOK
	if err != nil {
		v.log.Errorf("Vmm is stopping: the guest (qemu) failed: %v", err)
		code = exitGeneric
	} else {
		v.log.Infof("Vmm is stopping: the guest reset itself")
	}
	v.exitCode <- code
}

// logPipe copies QEMU's stderr into the log, line by line, and returns
// its write end.
func (g *qemu) logPipe() (*os.File, error) {
	r, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	go func() {
		defer r.Close()
		sc := bufio.NewScanner(r)
		for sc.Scan() {
			g.log.Warnf("qemu: %s", sc.Text())
		}
	}()
	return w, nil
}

// qmpCommand runs a QMP command, connecting on first use.
func (g *qemu) qmpCommand(cmd string) error {
	if g == nil {
		return fmt.Errorf("no guest")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.qmp == nil || isClosed(g.qmp.Done()) {
		var conn net.Conn
		var err error
		for {
			var d net.Dialer
			conn, err = d.DialContext(ctx, "unix", g.qmpPath)
			if err == nil || ctx.Err() != nil {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		if err != nil {
			return fmt.Errorf("qmp: %v", err)
		}
		c, err := qmp.Connect(ctx, conn, nil)
		if err != nil {
			conn.Close()
			return fmt.Errorf("qmp: %v", err)
		}
		g.qmp = c
	}
	_, err := g.qmp.Execute(ctx, cmd, nil)
	return err
}

func isClosed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// checkKernel accepts what Firecracker's x86_64 loader accepts: an ELF
// vmlinux.
func checkKernel(path string) error {
	f, err := elf.Open(path)
	if err != nil {
		return fmt.Errorf("Loader(Elf(%v))", err)
	}
	defer f.Close()
	if f.Machine != elf.EM_X86_64 {
		return fmt.Errorf("Loader(Elf(the kernel is for %v, not x86_64))", f.Machine)
	}
	return nil
}

// addArg appends key=val to a kernel command line that lacks key.
func addArg(args, key, val string) string {
	for _, w := range strings.Fields(args) {
		if w == key || strings.HasPrefix(w, key+"=") {
			return args
		}
	}
	return strings.TrimSpace(args + " " + key + "=" + val)
}

// shellJoin quotes argv for the shell-style parser slirp applies to a
// guestfwd command (no shell runs).
func shellJoin(argv []string) string {
	q := make([]string, len(argv))
	for i, s := range argv {
		q[i] = "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
	}
	return strings.Join(q, " ")
}

func kvmUsable() bool {
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return false
	}
	f.Close()
	return true
}

// ifreq is struct ifreq with the flags member of its union.
type ifreq struct {
	name  [unix.IFNAMSIZ]byte
	flags uint16
	_     [22]byte
}

// openTap opens a tap as Firecracker does (creating it if it does not exist
// and the process may).
func openTap(name string) (*os.File, error) {
	if len(name) >= unix.IFNAMSIZ || name == "" || bytes.ContainsAny([]byte(name), "/ ") {
		return nil, fmt.Errorf("invalid tap name %q", name)
	}
	f, err := os.OpenFile("/dev/net/tun", os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	var req ifreq
	copy(req.name[:], name)
	req.flags = unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.TUNSETIFF, uintptr(unsafe.Pointer(&req))); errno != 0 {
		f.Close()
		return nil, fmt.Errorf("TUNSETIFF %s: %v", name, errno)
	}
	return f, nil
}
