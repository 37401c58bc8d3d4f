package hostnet

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/google/nftables"
	"golang.org/x/sys/unix"

	"github.com/fireactions/fireactions/internal/config"
	"github.com/fireactions/fireactions/internal/network"
)

// CheckOptions say what the preflight checks look at.
type CheckOptions struct {
	// Backends are the configured backends (auto, firecracker, qemu);
	// empty means auto.
	Backends []config.Backend
	// Kernels are the kernel files the configuration names.
	Kernels []string
	Network config.Network
	DataDir string
	// MinFree is the free space the data directory needs; 0 means
	// DefaultMinFree.
	MinFree config.ByteSize
	// FirecrackerBin and QEMUBin override the binaries looked up in PATH.
	FirecrackerBin string
	QEMUBin        string
	// KVMDevice overrides /dev/kvm (tests).
	KVMDevice string
}

// DefaultMinFree is the free space `host check` wants in the data dir:
// room for a runner image base and a few scratch disks.
const DefaultMinFree = config.ByteSize(10 << 30)

// Check is the result of one preflight check.
type Check struct {
	Name   string
	OK     bool
	Detail string
	// Fix says how to make a failed check pass.
	Fix string
	// Needed is set when a configured backend or the configuration cannot
	// work without this check passing.
	Needed bool
}

// Verdict says whether one configured backend can run here.
type Verdict struct {
	Configured config.Backend
	// Uses is the backend that would run ("" when none can).
	Uses   config.Backend
	Reason string
}

// Report is the outcome of the preflight.
type Report struct {
	Checks   []Check
	Verdicts []Verdict
}

// OK reports whether every configured backend can run and every needed
// check passed.
func (r *Report) OK() bool {
	for _, v := range r.Verdicts {
		if v.Uses == "" {
			return false
		}
	}
	for _, c := range r.Checks {
		if c.Needed && !c.OK {
			return false
		}
	}
	return true
}

// Preflight runs every check. It changes nothing on the host.
func Preflight(ctx context.Context, o CheckOptions) *Report {
	if o.MinFree == 0 {
		o.MinFree = DefaultMinFree
	}
	if len(o.Backends) == 0 {
		o.Backends = []config.Backend{config.BackendAuto}
	}
	kvm := checkKVM(o.KVMDevice)
	fc := checkBinary(ctx, "firecracker", o.FirecrackerBin, "firecracker", []string{"--version"},
		"install a Firecracker release binary (github.com/firecracker-microvm/firecracker/releases) as /usr/local/bin/firecracker, or use --backend qemu")
	qemu := checkBinary(ctx, "qemu", o.QEMUBin, "qemu-system-x86_64", []string{"--version"},
		"apt-get install qemu-system-x86")
	kernels := checkKernels(o.Kernels)
	kernels.Needed = true

	fcOK := kvm.OK && fc.OK && kernels.OK
	qemuOK := qemu.OK && kernels.OK
	r := &Report{}
	seen := map[config.Backend]bool{}
	for _, b := range o.Backends {
		if seen[b] {
			continue
		}
		seen[b] = true
		v := Verdict{Configured: b}
		switch b {
		case config.BackendFirecracker:
			kvm.Needed, fc.Needed = true, true
			if fcOK {
				v.Uses, v.Reason = b, "/dev/kvm, firecracker and the kernel are usable"
			} else {
				v.Reason = "cannot run: " + firstFailure(kvm, fc, kernels)
			}
		case config.BackendQEMU:
			qemu.Needed = true
			if qemuOK {
				v.Uses, v.Reason = b, "qemu and the kernel are usable"
				if !kvm.OK {
					v.Reason += "; no usable /dev/kvm: software emulation (TCG), slow"
				}
			} else {
				v.Reason = "cannot run: " + firstFailure(qemu, kernels)
			}
		default:
			switch {
			case fcOK:
				kvm.Needed, fc.Needed = true, true
				v.Uses, v.Reason = config.BackendFirecracker, "/dev/kvm and firecracker are usable"
			case qemuOK:
				qemu.Needed = true
				v.Uses, v.Reason = config.BackendQEMU, "firecracker cannot run ("+firstFailure(kvm, fc)+"), qemu can"
			default:
				qemu.Needed = true
				v.Reason = "cannot run: neither firecracker (" + firstFailure(kvm, fc, kernels) + ") nor qemu (" + firstFailure(qemu, kernels) + ")"
			}
		}
		r.Verdicts = append(r.Verdicts, v)
	}
	cni := checkCNI(o.Network)
	cni.Needed = true
	nft := checkNftables()
	nft.Needed = true
	disk := checkDisk(o.DataDir, o.MinFree)
	disk.Needed = true
	r.Checks = []Check{kvm, fc, qemu, kernels, cni, nft, disk}
	return r
}

func firstFailure(cs ...Check) string {
	for _, c := range cs {
		if !c.OK {
			return c.Name + ": " + c.Detail
		}
	}
	return "unknown"
}

func checkKVM(dev string) Check {
	if dev == "" {
		dev = "/dev/kvm"
	}
	c := Check{Name: "/dev/kvm"}
	fd, err := unix.Open(dev, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		c.Detail = fmt.Sprintf("open %s: %v", dev, err)
		switch {
		case errors.Is(err, unix.ENOENT):
			c.Fix = "enable hardware virtualisation (VT-x/AMD-V, or nested virtualisation for a VM host) and load kvm_intel or kvm_amd; without it only --backend qemu works, in slow software emulation"
		case errors.Is(err, unix.EACCES), errors.Is(err, unix.EPERM):
			c.Fix = "run as root or add the user to the kvm group (usermod -aG kvm USER)"
		default:
			c.Fix = "check that the kvm module is loaded (modprobe kvm_intel or kvm_amd)"
		}
		return c
	}
	defer unix.Close(fd)
	const kvmGetAPIVersion = 0xAE00 // _IO(KVMIO, 0x00)
	v, err := unix.IoctlRetInt(fd, kvmGetAPIVersion)
	if err != nil || v != 12 {
		c.Detail = fmt.Sprintf("%s does not answer KVM_GET_API_VERSION with 12 (got %d, %v)", dev, v, err)
		c.Fix = "the device is not a working KVM: check dmesg for kvm errors"
		return c
	}
	c.OK, c.Detail = true, "usable (KVM API 12)"
	return c
}

func checkBinary(ctx context.Context, name, path, bin string, versionArgs []string, fix string) Check {
	c := Check{Name: name}
	if path == "" {
		p, err := exec.LookPath(bin)
		if err != nil {
			c.Detail, c.Fix = bin+" not found in PATH", fix
			return c
		}
		path = p
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, path, versionArgs...).CombinedOutput()
	line := strings.TrimSpace(strings.SplitN(string(out), "\n", 2)[0])
	if err != nil {
		c.Detail = fmt.Sprintf("%s %s: %v %s", path, strings.Join(versionArgs, " "), err, line)
		c.Fix = fix
		return c
	}
	c.OK, c.Detail = true, fmt.Sprintf("%s: %s", path, line)
	return c
}

func checkKernels(paths []string) Check {
	c := Check{Name: "kernel"}
	if len(paths) == 0 {
		paths = []string{config.DefaultKernel}
	}
	var bad, good []string
	for _, p := range paths {
		if err := checkELF(p); err != nil {
			bad = append(bad, err.Error())
		} else {
			good = append(good, p)
		}
	}
	if len(bad) > 0 {
		c.Detail = strings.Join(bad, "; ")
		c.Fix = "install an uncompressed ELF vmlinux there (see docs/kernels.md; scripts/test-kernel.sh prepares Debian's cloud kernel), or point pools[].vm.kernel at one"
		return c
	}
	c.OK, c.Detail = true, strings.Join(good, ", ")+": ELF vmlinux"
	return c
}

// checkELF wants an uncompressed ELF kernel: what Firecracker and QEMU's
// microvm machine boot directly.
func checkELF(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	var magic [4]byte
	if _, err := f.ReadAt(magic[:], 0); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	if !bytes.Equal(magic[:], []byte("\x7fELF")) {
		return fmt.Errorf("%s is not an ELF vmlinux (a compressed bzImage?)", path)
	}
	return nil
}

func checkCNI(n config.Network) Check {
	c := Check{Name: "CNI plugins"}
	dirs := network.PluginDirs(n)
	var missing, found []string
	for _, p := range network.Plugins {
		if path, err := network.FindPlugin(dirs, p); err != nil {
			missing = append(missing, p)
		} else {
			found = append(found, path)
		}
	}
	// The bridge plugin's ipMasq and the firewall plugin drive iptables.
	if _, err := exec.LookPath("iptables"); err != nil {
		missing = append(missing, "iptables (binary)")
	}
	if len(missing) > 0 {
		c.Detail = fmt.Sprintf("missing %s in %s", strings.Join(missing, ", "), strings.Join(dirs, ":"))
		var fixes []string
		for _, m := range missing {
			switch m {
			case "tc-redirect-tap":
				fixes = append(fixes, "build tc-redirect-tap with scripts/build-cni.sh (make does it) into "+network.CacheBinDir()+" or copy it into a network.bin_dirs directory")
			case "iptables (binary)":
				fixes = append(fixes, "apt-get install iptables")
			default:
				fixes = append(fixes, "apt-get install containernetworking-plugins (or add their directory to network.bin_dirs)")
			}
		}
		c.Fix = strings.Join(dedupe(fixes), "; ")
		return c
	}
	c.OK, c.Detail = true, strings.Join(found, ", ")
	return c
}

func dedupe(s []string) []string {
	var out []string
	seen := map[string]bool{}
	for _, x := range s {
		if !seen[x] {
			seen[x] = true
			out = append(out, x)
		}
	}
	return out
}

func checkNftables() Check {
	c := Check{Name: "nftables"}
	conn, err := nftables.New()
	if err == nil {
		_, err = conn.ListTables()
	}
	if err != nil {
		c.Detail = "netlink: " + err.Error()
		switch {
		case errors.Is(err, unix.EPERM), errors.Is(err, unix.EACCES):
			c.Fix = "run as root (CAP_NET_ADMIN is needed to install the isolation rules)"
		default:
			c.Fix = "load nf_tables (modprobe nf_tables nft_chain_nat nft_ct nft_limit nft_masq nft_nat), and on Debian apt-get install nftables"
		}
		return c
	}
	c.OK, c.Detail = true, "kernel nf_tables reachable"
	if p, err := exec.LookPath("nft"); err == nil {
		if out, err := exec.Command(p, "--version").Output(); err == nil {
			c.Detail += "; " + strings.TrimSpace(string(out))
		}
	}
	return c
}

func checkDisk(dir string, min config.ByteSize) Check {
	c := Check{Name: "disk space"}
	// The data dir may not exist yet: measure the filesystem it will be on.
	p := dir
	for {
		if _, err := os.Stat(p); err == nil || p == "/" || p == "." {
			break
		}
		p = filepath.Dir(p)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(p, &st); err != nil {
		c.Detail, c.Fix = fmt.Sprintf("statfs %s: %v", p, err), "create the data directory or set data_dir"
		return c
	}
	free := config.ByteSize(st.Bavail * uint64(st.Bsize))
	c.Detail = fmt.Sprintf("%s free in %s (want %s)", gib(free), dir, gib(min))
	if free < min {
		c.Fix = "free space there, or set data_dir to a larger filesystem"
		return c
	}
	c.OK = true
	return c
}

func gib(b config.ByteSize) string { return fmt.Sprintf("%.1f GiB", float64(b)/(1<<30)) }
