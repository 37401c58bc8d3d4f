package qemu

import (
	"fmt"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/fireactions/fireactions/internal/guest"
	"github.com/fireactions/fireactions/internal/vm"
)

// The metadata network: a restricted user-mode (slirp) NIC whose only
// reachable peer is the guestfwd at guest.MMDSAddress. Nothing on it is
// NATed or forwarded to the host or beyond.
const (
	mmdsNet       = "169.254.169.0/24"
	mmdsHost      = "169.254.169.1"
	mmdsGuestAddr = "169.254.169.15/24"
	mmdsPort      = 80
)

// Fixed file descriptors of the inherited listening sockets (ExtraFiles
// start at 3).
const (
	consoleFD = 3
	qmpFD     = 4
)

// cmdline is the input of buildArgs.
type cmdline struct {
	spec *vm.Spec
	dir  string // the VM directory
	// kvm selects -accel kvm -cpu host; otherwise TCG.
	kvm        bool
	initrd     string
	consoleLog string
	// metadataCmd is the argv run by QEMU for each guest connection to the
	// metadata address; nil means no metadata NIC.
	metadataCmd []string
}

// driveSerial is the virtio-blk serial the guest init finds a drive by.
func driveSerial(i int, d vm.Drive) string {
	switch d.Role {
	case vm.RoleBase, vm.RoleScratch:
		return string(d.Role)
	}
	return "extra" + strconv.Itoa(i)
}

// mmdsMAC is the metadata NIC's MAC address.
func mmdsMAC(id string) string { return vm.DeriveMAC(id, "mmds") }

// buildArgs returns qemu-system-x86_64's arguments for a microvm guest.
func buildArgs(c cmdline) []string {
	s := c.spec
	a := []string{
		"-name", s.ID,
		// The VM directory in the command line is how a restarted manager
		// recognises its VMM (vm.AttachProcess) and finds strays.
		"-pidfile", filepath.Join(c.dir, "vmm.pid"),
		// microvm: no PCI, no firmware option ROMs, devices on virtio-mmio
		// (announced through ACPI, so ACPI stays on), a 16550 for the
		// console and an RTC so the guest has a clock before the init
		// sets it.
		"-M", "microvm,x-option-roms=off,isa-serial=on,rtc=on",
		"-nodefaults", "-no-user-config",
		// -display none rather than -nographic: nothing may use the
		// VMM's stdio, which is a log file.
		"-display", "none",
		// A guest reboot ends the VM (the guest init reboots to exit).
		"-no-reboot",
	}
	if c.kvm {
		a = append(a, "-accel", "kvm", "-cpu", "host")
	} else {
		a = append(a, "-accel", "tcg", "-cpu", "max")
	}
	threads := 1
	if s.SMT {
		threads = 2
	}
	a = append(a,
		"-smp", fmt.Sprintf("%d,sockets=1,cores=%d,threads=%d", s.VCPUs, s.VCPUs/threads, threads),
		"-m", strconv.Itoa(s.MemoryMiB),
		"-kernel", s.Kernel,
		"-append", bootArgs(s.BootArgs, c.kvm),
	)
	if c.initrd != "" {
		a = append(a, "-initrd", c.initrd)
	}
	// The console is a socket the VMM listens on (inherited fd) and a log
	// file it appends to whether or not anyone is connected: the log is
	// the stream of record, the socket carries host-to-guest frames.
	a = append(a,
		"-chardev", fmt.Sprintf("socket,id=console,fd=%d,server=on,wait=off,logfile=%s,logappend=on", consoleFD, optEscape(c.consoleLog)),
		"-serial", "chardev:console",
		"-chardev", fmt.Sprintf("socket,id=qmp,fd=%d,server=on,wait=off", qmpFD),
		"-mon", "chardev=qmp,mode=control",
	)
	for i, d := range s.Drives {
		id := "drive" + strconv.Itoa(i)
		opt := fmt.Sprintf("id=%s,if=none,format=raw,file=%s", id, optEscape(d.Path))
		if d.ReadOnly {
			opt += ",readonly=on"
		} else {
			// Blocks the guest discards (fstrim, ext4 discard) are
			// punched out of the sparse file.
			opt += ",discard=unmap,detect-zeroes=unmap"
		}
		a = append(a, "-drive", opt,
			"-device", fmt.Sprintf("virtio-blk-device,drive=%s,serial=%s", id, driveSerial(i, d)))
	}
	for i, n := range s.Interfaces {
		id := "net" + strconv.Itoa(i)
		a = append(a, "-netdev", fmt.Sprintf("tap,id=%s,ifname=%s,script=no,downscript=no", id, optEscape(n.TapName)))
		dev := fmt.Sprintf("virtio-net-device,netdev=%s,mac=%s", id, n.MAC)
		if n.MTU != 0 {
			dev += ",host_mtu=" + strconv.Itoa(n.MTU)
		}
		a = append(a, "-device", dev)
	}
	if c.metadataCmd != nil {
		fwd := fmt.Sprintf("tcp:%s:%d-cmd:%s", guest.MMDSAddress, mmdsPort, shellJoin(c.metadataCmd))
		a = append(a,
			"-netdev", fmt.Sprintf("user,id=mmds,restrict=on,ipv6=off,net=%s,host=%s,guestfwd=%s", mmdsNet, mmdsHost, optEscape(fwd)),
			"-device", fmt.Sprintf("virtio-net-device,netdev=mmds,mac=%s", mmdsMAC(s.ID)))
	}
	return a
}

// bootArgs adds what a microvm guest needs to the caller's arguments,
// unless the caller already chose a value.
func bootArgs(args string, kvm bool) string {
	words := strings.Fields(args)
	has := func(key string) bool {
		for _, w := range words {
			if w == key || strings.HasPrefix(w, key+"=") {
				return true
			}
		}
		return false
	}
	add := func(key, val string) {
		if !has(key) {
			words = append(words, key+"="+val)
		}
	}
	add("console", "ttyS0")
	// A panicking guest reboots at once, which ends the VM (-no-reboot)
	// instead of leaving it hung until a deadline.
	add("panic", "-1")
	if !kvm {
		// Under TCG the TSC calibration sometimes never finishes; give
		// the kernel the numbers instead.
		add("tsc_early_khz", "2000000")
		add("lpj", "4000000")
	}
	return strings.Join(words, " ")
}

// optEscape escapes a value for QEMU's option syntax, where ',' separates
// options and ',,' is a literal comma.
func optEscape(s string) string { return strings.ReplaceAll(s, ",", ",,") }

// shellJoin quotes argv for the shell-style parser (g_shell_parse_argv)
// slirp applies to a guestfwd cmd: no shell runs, but quoting rules apply.
func shellJoin(argv []string) string {
	q := make([]string, len(argv))
	for i, s := range argv {
		q[i] = "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
	}
	return strings.Join(q, " ")
}
