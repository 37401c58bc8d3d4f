// Package vmtest helps tests boot real guests: it provides the test kernel
// (scripts/test-kernel.sh), busybox initramfs images with a test-specific
// /init script, and small ext4 disk images. It is imported by tests only.
package vmtest

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/fireactions/fireactions/internal/initramfs"
)

// RequireQEMU skips the test when QEMU cannot run here.
func RequireQEMU(tb testing.TB) {
	tb.Helper()
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		tb.Skip("needs qemu-system-x86_64 (Debian package qemu-system-x86)")
	}
}

var kernel struct {
	once          sync.Once
	vmlinux, mods string
	err           error
	output        string
}

// RepoRoot returns the directory holding go.mod.
func RepoRoot(tb testing.TB) string {
	tb.Helper()
	dir, err := os.Getwd()
	if err != nil {
		tb.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			tb.Fatal("go.mod not found above the test's directory")
		}
		dir = parent
	}
}

// Kernel returns the test kernel (PVH ELF vmlinux) and its modules
// directory, fetching them once per test binary with scripts/test-kernel.sh
// (cached across runs).
func Kernel(tb testing.TB) (vmlinux, modules string) {
	tb.Helper()
	kernel.once.Do(func() {
		cmd := exec.Command("bash", filepath.Join(RepoRoot(tb), "scripts", "test-kernel.sh"))
		var out, errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errb
		kernel.err = cmd.Run()
		kernel.output = errb.String()
		sc := bufio.NewScanner(&out)
		for sc.Scan() {
			if v, ok := strings.CutPrefix(sc.Text(), "KERNEL="); ok {
				kernel.vmlinux = v
			}
			if v, ok := strings.CutPrefix(sc.Text(), "MODULES="); ok {
				kernel.mods = v
			}
		}
	})
	if kernel.err != nil || kernel.vmlinux == "" {
		tb.Fatalf("scripts/test-kernel.sh: %v\n%s", kernel.err, kernel.output)
	}
	return kernel.vmlinux, kernel.mods
}

// CacheDir is where tests keep artifacts between runs:
// ${FIREACTIONS_CACHE:-$HOME/.cache/fireactions}/vmtest.
func CacheDir(tb testing.TB) string {
	tb.Helper()
	base := os.Getenv("FIREACTIONS_CACHE")
	if base == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			tb.Fatal(err)
		}
		base = filepath.Join(home, ".cache", "fireactions")
	}
	dir := filepath.Join(base, "vmtest")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		tb.Fatal(err)
	}
	return dir
}

var initBin struct {
	once sync.Once
	path string
	err  error
}

// Init returns a fireactions-init binary: $FIREACTIONS_INIT if set,
// otherwise one built from this tree (once per test binary).
func Init(tb testing.TB) string {
	tb.Helper()
	if p := os.Getenv(initramfs.InitEnv); p != "" {
		return p
	}
	initBin.once.Do(func() {
		dir := CacheDir(tb)
		tmp, err := os.CreateTemp(dir, ".fireactions-init-*")
		if err != nil {
			initBin.err = err
			return
		}
		tmp.Close()
		defer os.Remove(tmp.Name())
		cmd := exec.Command("go", "build", "-o", tmp.Name(), "./cmd/fireactions-init")
		cmd.Dir = RepoRoot(tb)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			initBin.err = fmt.Errorf("build fireactions-init: %v: %s", err, out)
			return
		}
		// Renamed into place so concurrent test binaries never read a
		// half-written file.
		initBin.path = filepath.Join(dir, initramfs.InitName)
		initBin.err = os.Rename(tmp.Name(), initBin.path)
	})
	if initBin.err != nil {
		tb.Fatal(initBin.err)
	}
	return initBin.path
}

// BaseInitrd returns the shared initramfs part with fireactions-init and
// the default modules, built by internal/initramfs (cached by content).
func BaseInitrd(tb testing.TB) string {
	tb.Helper()
	_, mods := Kernel(tb)
	p, err := initramfs.Base(context.Background(), CacheDir(tb), Init(tb), mods, initramfs.DefaultModules)
	if err != nil {
		tb.Fatal(err)
	}
	return p
}

// BusyboxRootfs makes a read-only-ready ext4 image of a tiny busybox
// system (every applet linked in /bin, root and nobody in /etc/passwd)
// plus extra files, for the guest init to boot as an image.
func BusyboxRootfs(tb testing.TB, dir string, extra map[string]string) string {
	tb.Helper()
	src := tb.TempDir()
	for _, d := range []string{"bin", "etc", "tmp", "root", "proc", "sys", "dev", "run", "var/lib"} {
		if err := os.MkdirAll(filepath.Join(src, d), 0o755); err != nil {
			tb.Fatal(err)
		}
	}
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		tb.Fatalf("needs /bin/busybox (Debian package busybox-static): %v", err)
	}
	if err := os.WriteFile(filepath.Join(src, "bin", "busybox"), bb, 0o755); err != nil {
		tb.Fatal(err)
	}
	list, err := exec.Command("/bin/busybox", "--list").Output()
	if err != nil {
		tb.Fatal(err)
	}
	for _, applet := range strings.Fields(string(list)) {
		if applet == "busybox" {
			continue
		}
		if err := os.Symlink("busybox", filepath.Join(src, "bin", applet)); err != nil {
			tb.Fatal(err)
		}
	}
	files := map[string]string{
		"etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
		"etc/group":  "root:x:0:\nnogroup:x:65534:\n",
	}
	for k, v := range extra {
		files[k] = v
	}
	for name, content := range files {
		p := filepath.Join(src, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			tb.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			tb.Fatal(err)
		}
	}
	return mkfs(tb, dir, 32<<20, src)
}

// Scratch makes an empty ext4 image of size bytes (sparse).
func Scratch(tb testing.TB, dir string, size int64) string {
	tb.Helper()
	return mkfs(tb, dir, size, "")
}

func mkfs(tb testing.TB, dir string, size int64, src string) string {
	tb.Helper()
	f, err := os.CreateTemp(dir, "disk-*.ext4")
	if err != nil {
		tb.Fatal(err)
	}
	f.Close()
	if err := os.Truncate(f.Name(), size); err != nil {
		tb.Fatal(err)
	}
	args := []string{"-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1"}
	if src != "" {
		args = append(args, "-d", src)
	}
	out, err := exec.Command("mkfs.ext4", append(args, f.Name())...).CombinedOutput()
	if err != nil {
		tb.Fatalf("mkfs.ext4 (Debian package e2fsprogs): %v: %s", err, out)
	}
	return f.Name()
}

// GuestModules are the modules a busybox test guest loads: block and
// network devices on virtio-mmio.
var GuestModules = []string{"virtio_mmio", "virtio_blk", "virtio_net"}

// Prelude starts every busybox /init: a usable shell environment with
// /proc, /sys, /dev and the virtio drivers loaded.
const Prelude = `#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /sbin /usr/bin /usr/sbin /tmp
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod "$m"; done
# cmdline VAR: the value of VAR= on the kernel command line.
cmdline() { tr ' ' '\n' </proc/cmdline | sed -n "s/^$1=//p"; }
# nic_by_mac MAC: the interface name with that address.
nic_by_mac() { for i in /sys/class/net/*; do [ "$(cat $i/address)" = "$1" ] && basename $i; done; }
`

// BusyboxInitrd writes a newc initramfs holding Debian's static busybox,
// the GuestModules (with dependencies) from modulesDir and /init = Prelude
// + script, and returns its path.
func BusyboxInitrd(tb testing.TB, modulesDir, script string) string {
	tb.Helper()
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		tb.Fatalf("needs /bin/busybox (Debian package busybox-static): %v", err)
	}
	mods, err := initramfs.ResolveModules(modulesDir, GuestModules)
	if err != nil {
		tb.Fatal(err)
	}
	var buf bytes.Buffer
	w := &cpio{w: &buf}
	w.dir("bin")
	w.dir("mods")
	w.file("bin/busybox", 0o755, bb)
	w.symlink("bin/sh", "busybox")
	var order strings.Builder
	for _, m := range mods {
		data, err := os.ReadFile(m)
		if err != nil {
			tb.Fatal(err)
		}
		name := "mods/" + filepath.Base(m)
		w.file(name, 0o644, data)
		order.WriteString("/" + name + "\n")
	}
	w.file("modules.order", 0o644, []byte(order.String()))
	w.file("init", 0o755, []byte(Prelude+script))
	w.trailer()
	p := filepath.Join(tb.TempDir(), "initrd.cpio")
	if err := os.WriteFile(p, buf.Bytes(), 0o644); err != nil {
		tb.Fatal(err)
	}
	return p
}

// Ext4 makes an ext4 image of size bytes holding the files (name to
// content) and returns its path.
func Ext4(tb testing.TB, dir string, size int64, files map[string]string) string {
	tb.Helper()
	src := tb.TempDir()
	for name, content := range files {
		p := filepath.Join(src, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			tb.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			tb.Fatal(err)
		}
	}
	return mkfs(tb, dir, size, src)
}

// cpio writes the newc format the kernel unpacks.
type cpio struct {
	w   *bytes.Buffer
	ino int
}

func (c *cpio) entry(name string, mode uint32, data []byte) {
	c.ino++
	fmt.Fprintf(c.w, "070701%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x",
		c.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name)+1, 0)
	c.w.WriteString(name + "\x00")
	c.pad()
	c.w.Write(data)
	c.pad()
}

func (c *cpio) pad() {
	for c.w.Len()%4 != 0 {
		c.w.WriteByte(0)
	}
}

func (c *cpio) dir(name string)                         { c.entry(name, 0o040755, nil) }
func (c *cpio) file(name string, perm uint32, b []byte) { c.entry(name, 0o100000|perm, b) }
func (c *cpio) symlink(name, target string)             { c.entry(name, 0o120777, []byte(target)) }
func (c *cpio) trailer()                                { c.entry("TRAILER!!!", 0, nil) }
