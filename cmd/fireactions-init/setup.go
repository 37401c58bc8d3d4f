//go:build linux

package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/fireactions/fireactions/internal/guest"
	"github.com/fireactions/fireactions/internal/guest/netconf"
)

// Mount points inside the initramfs while the root is assembled.
const (
	newRoot      = "/mnt/root"
	baseMount    = "/mnt/base"
	scratchMount = "/mnt/scratch"
	// On the scratch disk: the overlay's upper and work directories and
	// the directories behind Config.BindMounts.
	scratchUpper  = scratchMount + "/root"
	scratchWork   = scratchMount + "/work"
	scratchVolume = scratchMount + "/volumes"
)

// deviceWait bounds the wait for disks and NICs to appear once their
// drivers are loaded; generous because emulated (TCG) guests are slow.
const deviceWait = 30 * time.Second

func mountFS(src, target, fstype string, flags uintptr, data string) error {
	if err := os.MkdirAll(target, 0o755); err != nil {
		return fmt.Errorf("mount %s: %w", target, err)
	}
	if err := unix.Mount(src, target, fstype, flags, data); err != nil {
		return fmt.Errorf("mount %s on %s (type %s, options %q): %w", src, target, fstype, data, err)
	}
	return nil
}

func mountEarly() error {
	if err := mountFS("devtmpfs", "/dev", "devtmpfs", unix.MS_NOSUID, "mode=0755"); err != nil {
		return err
	}
	if err := mountFS("proc", "/proc", "proc", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		return err
	}
	return mountFS("sysfs", "/sys", "sysfs", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "")
}

// loadModules loads the given module files in order, or those listed in
// guest.ModulesOrder when none are given. Modules already present (loaded
// or built in) are fine.
func loadModules(paths []string) error {
	if len(paths) == 0 {
		f, err := os.Open(guest.ModulesOrder)
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("read module list: %w", err)
		}
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if p := strings.TrimSpace(sc.Text()); p != "" {
				paths = append(paths, p)
			}
		}
		f.Close()
		if err := sc.Err(); err != nil {
			return fmt.Errorf("read module list: %w", err)
		}
	}
	for _, p := range paths {
		f, err := os.Open(p)
		if err != nil {
			return fmt.Errorf("load kernel module: %w", err)
		}
		err = unix.FinitModule(int(f.Fd()), "", 0)
		f.Close()
		if err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("load kernel module %s: %w (was it built for this kernel?)", p, err)
		}
	}
	return nil
}

// findDrive waits for the block device of d to appear and returns its path.
func findDrive(ctx context.Context, d guest.Drive) (string, error) {
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		if d.Serial != "" {
			if dev := deviceBySerial(d.Serial); dev != "" {
				return dev, nil
			}
		} else if st, err := os.Stat(d.Device); err == nil && st.Mode()&os.ModeDevice != 0 {
			return d.Device, nil
		}
		select {
		case <-ctx.Done():
			want := "device " + d.Device
			if d.Serial != "" {
				want = fmt.Sprintf("serial %q", d.Serial)
			}
			return "", fmt.Errorf("%s drive (%s) did not appear within %s; block devices: %s (is virtio_blk loaded and the disk attached?)",
				d.Role, want, deviceWait, blockInventory())
		case <-tick.C:
		}
	}
}

func deviceBySerial(serial string) string {
	ents, _ := os.ReadDir("/sys/block")
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join("/sys/block", e.Name(), "serial"))
		if err != nil {
			continue
		}
		if strings.TrimRight(string(b), "\x00 \n") == serial {
			dev := "/dev/" + e.Name()
			if _, err := os.Stat(dev); err == nil {
				return dev
			}
		}
	}
	return ""
}

func blockInventory() string {
	ents, _ := os.ReadDir("/sys/block")
	var out []string
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), "loop") || strings.HasPrefix(e.Name(), "ram") {
			continue
		}
		s := e.Name()
		if b, err := os.ReadFile(filepath.Join("/sys/block", e.Name(), "serial")); err == nil {
			s += fmt.Sprintf(" (serial %q)", strings.TrimRight(string(b), "\x00 \n"))
		}
		out = append(out, s)
	}
	if len(out) == 0 {
		return "none"
	}
	return strings.Join(out, ", ")
}

func fsType(d guest.Drive) string {
	if d.FSType == "" {
		return "ext4"
	}
	return d.FSType
}

// assembleRoot mounts the base read-only and the scratch disk, stacks them
// with overlayfs at newRoot, adds the bind mounts and extra disks, and
// moves /dev, /proc and /sys into it. The base and scratch mounts are then
// detached: the overlay and bind mounts keep them alive while nothing in
// the guest can reach the scratch disk's raw upper directory.
func (in *initProcess) assembleRoot() error {
	ctx, cancel := context.WithTimeout(context.Background(), deviceWait)
	defer cancel()
	cfg := in.cfg
	base, _ := cfg.Drive(guest.RoleBase)
	scratch, _ := cfg.Drive(guest.RoleScratch)
	baseDev, err := findDrive(ctx, base)
	if err != nil {
		return err
	}
	scratchDev, err := findDrive(ctx, scratch)
	if err != nil {
		return err
	}
	if err := mountFS(baseDev, baseMount, fsType(base), unix.MS_RDONLY, ""); err != nil {
		return fmt.Errorf("base drive: %w", err)
	}
	if err := mountFS(scratchDev, scratchMount, fsType(scratch), 0, ""); err != nil {
		return fmt.Errorf("scratch drive: %w", err)
	}
	for _, d := range []string{scratchUpper, scratchWork, scratchVolume} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fmt.Errorf("scratch drive: %w", err)
		}
	}
	opts := fmt.Sprintf("lowerdir=%s,upperdir=%s,workdir=%s", baseMount, scratchUpper, scratchWork)
	if err := mountFS("overlay", newRoot, "overlay", 0, opts); err != nil {
		return fmt.Errorf("root overlay: %w", err)
	}

	for _, p := range cfg.EffectiveBindMounts() {
		src := filepath.Join(scratchVolume, url.PathEscape(strings.TrimPrefix(path.Clean(p), "/")))
		dst := filepath.Join(newRoot, p)
		if err := os.MkdirAll(src, 0o755); err != nil {
			return fmt.Errorf("bind mount %s: %w", p, err)
		}
		if st, err := os.Stat(dst); err == nil {
			// Keep the owner and mode the image gave the directory.
			var sys unix.Stat_t
			if unix.Stat(dst, &sys) == nil {
				os.Chown(src, int(sys.Uid), int(sys.Gid))
			}
			os.Chmod(src, st.Mode().Perm())
		}
		if err := mountFS(src, dst, "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind mount %s from the scratch disk: %w", p, err)
		}
	}

	// Shallow mount points first, so /data/sub lands on /data's disk.
	extras := []guest.Drive{}
	for _, d := range cfg.Drives {
		if d.Role == guest.RoleExtra {
			extras = append(extras, d)
		}
	}
	sort.SliceStable(extras, func(i, j int) bool {
		return strings.Count(path.Clean(extras[i].MountPoint), "/") < strings.Count(path.Clean(extras[j].MountPoint), "/")
	})
	for _, d := range extras {
		dev, err := findDrive(ctx, d)
		if err != nil {
			return err
		}
		var flags uintptr
		if d.ReadOnly {
			flags = unix.MS_RDONLY
		}
		if err := mountFS(dev, filepath.Join(newRoot, d.MountPoint), fsType(d), flags, ""); err != nil {
			return fmt.Errorf("extra drive for %s: %w", d.MountPoint, err)
		}
		in.extraMounts = append(in.extraMounts, path.Clean(d.MountPoint))
	}

	for _, m := range []string{"/dev", "/proc", "/sys"} {
		if err := os.MkdirAll(newRoot+m, 0o755); err != nil {
			return fmt.Errorf("move %s: %w", m, err)
		}
		if err := unix.Mount(m, newRoot+m, "", unix.MS_MOVE, ""); err != nil {
			return fmt.Errorf("move %s into the new root: %w", m, err)
		}
	}
	for _, m := range []string{baseMount, scratchMount} {
		if err := unix.Unmount(m, unix.MNT_DETACH); err != nil {
			return fmt.Errorf("detach %s: %w", m, err)
		}
	}
	return nil
}

func (in *initProcess) configureNetwork() error {
	ctx, cancel := context.WithTimeout(context.Background(), deviceWait)
	defer cancel()
	if err := netconf.Configure(ctx, in.cfg.Interfaces); err != nil {
		return err
	}
	if h := in.cfg.Hostname; h != "" {
		if err := unix.Sethostname([]byte(h)); err != nil {
			return fmt.Errorf("set host name %q: %w", h, err)
		}
	}
	return nil
}

// switchRoot makes dir the root, as busybox's switch_root does: initramfs
// (rootfs) cannot be pivot_root'ed away, so its files are deleted to free
// their memory, dir is moved over / and the process chroots into it.
func switchRoot(dir string) error {
	var st unix.Stat_t
	if err := unix.Stat("/", &st); err != nil {
		return fmt.Errorf("switch root: %w", err)
	}
	removeTree("/", st.Dev)
	if err := unix.Chdir(dir); err != nil {
		return fmt.Errorf("switch root: %w", err)
	}
	if err := unix.Mount(dir, "/", "", unix.MS_MOVE, ""); err != nil {
		return fmt.Errorf("switch root: move %s to /: %w", dir, err)
	}
	if err := unix.Chroot("."); err != nil {
		return fmt.Errorf("switch root: chroot: %w", err)
	}
	if err := unix.Chdir("/"); err != nil {
		return fmt.Errorf("switch root: %w", err)
	}
	return nil
}

// removeTree deletes what lies on device dev under dir, leaving other
// mounts (the new root) alone.
func removeTree(dir string, dev uint64) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, e := range ents {
		p := filepath.Join(dir, e.Name())
		var st unix.Stat_t
		if unix.Lstat(p, &st) != nil || st.Dev != dev {
			continue
		}
		if st.Mode&unix.S_IFMT == unix.S_IFDIR {
			removeTree(p, dev)
			unix.Rmdir(p)
		} else {
			unix.Unlink(p)
		}
	}
}

// finishRoot mounts the remaining API filesystems in the new root and
// writes what the configuration asks for.
func (in *initProcess) finishRoot() error {
	app := in.cfg.Mode == guest.ModeApp
	mounts := []struct {
		src, target, fstype string
		flags               uintptr
		data                string
	}{
		{"tmpfs", "/run", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=0755"},
		{"devpts", "/dev/pts", "devpts", unix.MS_NOSUID | unix.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620,gid=5"},
		{"tmpfs", "/dev/shm", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777"},
	}
	if app {
		// The image's init mounts these itself in system mode.
		mounts = append(mounts, struct {
			src, target, fstype string
			flags               uintptr
			data                string
		}{"tmpfs", "/tmp", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777"})
	}
	for _, m := range mounts {
		if err := mountFS(m.src, m.target, m.fstype, m.flags, m.data); err != nil {
			return err
		}
	}
	if app {
		// Docker and systemd-less workloads want the unified hierarchy;
		// a kernel without cgroup2 just goes without.
		if err := mountFS("cgroup2", "/sys/fs/cgroup", "cgroup2", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
			in.log("no cgroup2: %v", err)
		}
	}
	for name, target := range map[string]string{
		"/dev/fd": "/proc/self/fd", "/dev/stdin": "/proc/self/fd/0",
		"/dev/stdout": "/proc/self/fd/1", "/dev/stderr": "/proc/self/fd/2",
	} {
		os.Symlink(target, name)
	}
	if err := netconf.WriteFiles("/", in.cfg.Hostname, in.cfg.Interfaces); err != nil {
		return err
	}
	keys := make([]string, 0, len(in.cfg.Sysctls))
	for k := range in.cfg.Sysctls {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		p := filepath.Join("/proc/sys", strings.ReplaceAll(k, ".", "/"))
		if err := os.WriteFile(p, []byte(in.cfg.Sysctls[k]), 0); err != nil {
			return fmt.Errorf("sysctl %s=%s: %w", k, in.cfg.Sysctls[k], err)
		}
	}
	return nil
}
