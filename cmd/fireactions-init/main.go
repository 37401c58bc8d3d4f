//go:build linux

// Command fireactions-init is the PID 1 of every fireactions microVM. The
// host puts it into the VM's initramfs as /init together with a
// guest.Config; it loads kernel modules, assembles the root filesystem
// (read-only image base + scratch disk under overlayfs), configures the
// network and clock, then either supervises the workload process (app
// mode) or hands over to the image's /sbin/init (system mode). Everything
// it reports to the host travels as authenticated frames on the serial
// console (see package guest).
//
// It must be built static (CGO_ENABLED=0) and uses the standard library and
// golang.org/x/sys only: the initramfs has no libc and no tools.
package main

import (
	"errors"
	"fmt"
	"os"
	"os/signal"
	"runtime/debug"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/fireactions/fireactions/internal/agent"
	"github.com/fireactions/fireactions/internal/guest"
)

// setupDeadline bounds everything between kernel start and the workload
// start: a wedged step becomes an error frame and a power-off instead of a
// VM that hangs until the host's own deadline.
const setupDeadline = 2 * time.Minute

func main() {
	if runAsAgent() {
		os.Exit(agent.Main(os.Args[1:]))
	}
	if os.Getpid() != 1 {
		fmt.Fprintln(os.Stderr, "fireactions-init is the PID 1 of fireactions microVMs: fireactions puts it into each VM's initramfs; it is not meant to be run by hand")
		os.Exit(2)
	}
	in := &initProcess{}
	defer func() {
		// PID 1 must never return or panic: the kernel would panic with it.
		if r := recover(); r != nil {
			in.fail(fmt.Errorf("init panicked: %v\n%s", r, debug.Stack()))
		}
		in.fail(errors.New("init returned without powering off"))
	}()
	in.run()
}

// initProcess is the state of PID 1.
type initProcess struct {
	cfg     *guest.Config
	console *os.File
	termios *unix.Termios // the console's settings before raw mode
	fw      *guest.FrameWriter

	mu    sync.Mutex
	phase string
	// extraMounts are unmounted, in reverse, before power-off so that
	// writable extra disks are left clean.
	extraMounts []string

	// sigs receives the signals PID 1 acts on.
	sigs chan os.Signal
}

func (in *initProcess) setPhase(p string) {
	in.mu.Lock()
	in.phase = p
	in.mu.Unlock()
}

func (in *initProcess) run() {
	// Signals PID 1 gets before it is ready are queued, not lost: Go's
	// default for SIGINT/SIGTERM is to exit, which would panic the kernel.
	in.sigs = make(chan os.Signal, 32)
	signal.Notify(in.sigs, unix.SIGCHLD, unix.SIGINT, unix.SIGTERM)
	// Signals nobody should send to PID 1 are caught and dropped rather
	// than ignored: caught signals reset to default in the workload, while
	// ignored ones would be inherited by it.
	signal.Notify(make(chan os.Signal, 1), unix.SIGHUP, unix.SIGQUIT, unix.SIGUSR1, unix.SIGUSR2,
		unix.SIGPIPE, unix.SIGABRT, unix.SIGSTKFLT, unix.SIGSYS, unix.SIGTRAP)

	in.setPhase("reading the configuration")
	data, readErr := os.ReadFile(guest.ConfigPath)

	in.setPhase("mounting /dev, /proc and /sys")
	if err := mountEarly(); err != nil {
		in.fail(err)
	}
	in.openConsole()
	if readErr != nil {
		in.fail(fmt.Errorf("read %s (the host writes it into the initramfs): %w", guest.ConfigPath, readErr))
	}
	cfg, err := guest.ParseConfig(data)
	if err != nil {
		in.fail(err)
	}
	in.cfg = cfg
	// The key now lives only in this process's memory.
	os.Remove(guest.ConfigPath)
	in.fw = guest.NewWriter(in.console, cfg.ConsoleKey)

	watchdog := time.AfterFunc(setupDeadline, func() {
		in.mu.Lock()
		phase := in.phase
		in.mu.Unlock()
		in.fail(fmt.Errorf("boot did not finish within %s; stuck %s", setupDeadline, phase))
	})

	if cfg.Mode == guest.ModeApp {
		// Ctrl-Alt-Del (Firecracker's SendCtrlAltDel, QEMU's
		// send-key) becomes SIGINT to PID 1, a graceful stop.
		if err := unix.Reboot(unix.LINUX_REBOOT_CMD_CAD_OFF); err != nil {
			in.log("cannot route Ctrl-Alt-Del to init: %v", err)
		}
	}
	in.setPhase("setting the clock")
	setClock(cfg.ClockUnixNano)

	in.setPhase("loading kernel modules")
	if err := loadModules(cfg.Modules); err != nil {
		in.fail(err)
	}
	in.setPhase("assembling the root filesystem")
	if err := in.assembleRoot(); err != nil {
		in.fail(err)
	}
	in.setPhase("configuring the network")
	if err := in.configureNetwork(); err != nil {
		in.fail(err)
	}
	in.setPhase("switching to the new root")
	if err := switchRoot(newRoot); err != nil {
		in.fail(err)
	}
	in.setPhase("preparing the new root")
	if err := in.finishRoot(); err != nil {
		in.fail(err)
	}
	withAgent := agentRequested()
	if withAgent {
		in.setPhase("installing the guest agent")
		if err := in.installAgent(); err != nil {
			in.fail(err)
		}
	}
	watchdog.Stop()
	in.log("guest ready %.2fs after kernel start", uptime().Seconds())

	switch cfg.Mode {
	case guest.ModeSystem:
		in.runSystem(withAgent)
	default:
		in.runApp()
	}
}

// openConsole opens the console for frames and puts it into raw mode: no
// echo of host frames back to the host, no CR/LF rewriting, no signals
// from control characters.
func (in *initProcess) openConsole() {
	f, err := os.OpenFile("/dev/console", os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		// The kernel's own stdout for init is the console too.
		f = os.NewFile(1, "/dev/console")
	}
	in.console = f
	fd := int(f.Fd())
	t, err := unix.IoctlGetTermios(fd, unix.TCGETS)
	if err != nil {
		return
	}
	saved := *t
	in.termios = &saved
	t.Iflag &^= unix.IGNBRK | unix.BRKINT | unix.PARMRK | unix.ISTRIP | unix.INLCR | unix.IGNCR | unix.ICRNL | unix.IXON
	t.Oflag &^= unix.OPOST
	t.Lflag &^= unix.ECHO | unix.ECHONL | unix.ICANON | unix.ISIG | unix.IEXTEN
	t.Cflag &^= unix.CSIZE | unix.PARENB
	t.Cflag |= unix.CS8
	t.Cc[unix.VMIN] = 1
	t.Cc[unix.VTIME] = 0
	unix.IoctlSetTermios(fd, unix.TCSETS, t)
}

// restoreConsole gives the console back its boot settings, for the image's
// init and getty in system mode.
func (in *initProcess) restoreConsole() {
	if in.termios != nil {
		unix.IoctlSetTermios(int(in.console.Fd()), unix.TCSETS, in.termios)
	}
}

// log sends a progress message to the host.
func (in *initProcess) log(format string, args ...any) {
	if in.fw != nil {
		in.fw.WriteFrame(guest.FrameLog, truncate(fmt.Sprintf(format, args...)))
	}
}

func truncate(s string) []byte {
	if len(s) > guest.MaxPayload {
		s = s[:guest.MaxPayload-3] + "..."
	}
	return []byte(s)
}

var failOnce sync.Once

// fail reports err to the host and powers off. It never returns.
func (in *initProcess) fail(err error) {
	failOnce.Do(func() {
		msg := "fireactions-init: " + err.Error()
		if in.fw != nil {
			in.fw.WriteFrame(guest.FrameError, truncate(msg))
		} else {
			// No key yet: plain text, which the host logs as console
			// output, and the missing exit frame tells it boot failed.
			out := in.console
			if out == nil {
				out = os.Stdout
			}
			fmt.Fprintln(out, msg)
		}
		powerOff()
	})
	select {}
}

// powerOff flushes the disks and ends the VM. Restart, not power-off: QEMU
// runs with -no-reboot and Firecracker exits on a guest reboot (reboot=k),
// while neither handles an ACPI-less power-off on microvm.
func powerOff() {
	unix.Sync()
	for {
		unix.Reboot(unix.LINUX_REBOOT_CMD_RESTART)
		unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
		time.Sleep(time.Second)
	}
}

// uptime is the time since the kernel started.
func uptime() time.Duration {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts); err != nil {
		return 0
	}
	return time.Duration(ts.Nano())
}

// setClock sets the clock to the host's time at configuration plus the time
// since the kernel started, unless the guest clock (from an RTC) is
// already later: the sum underestimates by the VMM's own start-up time.
func setClock(hostUnixNano int64) {
	if hostUnixNano <= 0 {
		return
	}
	want := hostUnixNano + int64(uptime())
	if time.Now().UnixNano() >= want {
		return
	}
	tv := unix.NsecToTimeval(want)
	unix.Settimeofday(&tv)
}
