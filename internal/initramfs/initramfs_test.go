package initramfs

import (
	"bytes"
	"compress/gzip"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/fireactions/fireactions/internal/guest"
)

// fakeModuleTree writes a lib/modules/<version> directory with a
// modules.dep shaped like depmod's and module files that are tiny ELF
// headers, some compressed the ways distributions compress them.
func fakeModuleTree(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "lib", "modules", "6.1.0-test")
	files := map[string]string{
		"kernel/drivers/virtio/virtio_ring.ko":   "",
		"kernel/drivers/virtio/virtio.ko":        "",
		"kernel/drivers/virtio/virtio_mmio.ko":   "",
		"kernel/drivers/block/virtio_blk.ko.xz":  "xz",
		"kernel/net/core/failover.ko.zst":        "zstd",
		"kernel/drivers/net/net_failover.ko.gz":  "gzip",
		"kernel/drivers/net/virtio_net.ko":       "",
		"kernel/fs/overlayfs/overlay.ko":         "",
		"kernel/drivers/misc/dash-name.ko":       "",
		"kernel/drivers/misc/needs_missing.ko":   "",
		"kernel/drivers/misc/unknown_format.ko7": "",
	}
	for name, comp := range files {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		content := []byte("\x7fELF module " + moduleName(name))
		switch comp {
		case "xz", "zstd":
			// The tools distributions use, with the kernel's xz flags.
			args := []string{"-q", "-c"}
			if comp == "xz" {
				args = []string{"--check=crc32", "--lzma2=dict=1MiB", "-c"}
			}
			cmd := exec.Command(comp, args...)
			cmd.Stdin = bytes.NewReader(content)
			out, err := cmd.Output()
			if err != nil {
				t.Fatalf("%s: %v", comp, err)
			}
			content = out
		case "gzip":
			var b bytes.Buffer
			zw := gzip.NewWriter(&b)
			zw.Write(content)
			zw.Close()
			content = b.Bytes()
		}
		if err := os.WriteFile(p, content, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	dep := `kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/block/virtio_blk.ko.xz: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/net/core/failover.ko.zst:
kernel/drivers/net/net_failover.ko.gz: kernel/net/core/failover.ko.zst
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko.gz kernel/net/core/failover.ko.zst kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/fs/overlayfs/overlay.ko:
kernel/drivers/misc/dash-name.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/misc/needs_missing.ko: kernel/drivers/misc/gone.ko
kernel/drivers/misc/unknown_format.ko7:
`
	if err := os.WriteFile(filepath.Join(dir, "modules.dep"), []byte(dep), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "modules.builtin"), []byte("kernel/fs/ext4/ext4.ko\nkernel/lib/crc16.ko\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

func TestResolveModules(t *testing.T) {
	dir := fakeModuleTree(t)
	got, err := ResolveModules(dir, []string{"virtio_mmio", "virtio-blk", "virtio_net", "ext4", "overlay", "dash_name"})
	if err != nil {
		t.Fatal(err)
	}
	var rel []string
	for _, p := range got {
		r, _ := filepath.Rel(dir, p)
		rel = append(rel, r)
	}
	want := []string{
		"kernel/drivers/virtio/virtio_ring.ko",
		"kernel/drivers/virtio/virtio.ko",
		"kernel/drivers/virtio/virtio_mmio.ko",
		"kernel/drivers/block/virtio_blk.ko.xz",
		"kernel/net/core/failover.ko.zst",
		"kernel/drivers/net/net_failover.ko.gz",
		"kernel/drivers/net/virtio_net.ko",
		"kernel/fs/overlayfs/overlay.ko",
		"kernel/drivers/misc/dash-name.ko",
	}
	if !reflect.DeepEqual(rel, want) {
		t.Errorf("order:\n got %q\nwant %q", rel, want)
	}

	for wanted, msg := range map[string]string{
		"nosuch":        `"nosuch" is neither in`,
		"needs_missing": "gone (needed by needs_missing)",
	} {
		_, err := ResolveModules(dir, []string{wanted})
		if err == nil || !strings.Contains(err.Error(), msg) {
			t.Errorf("%s: err = %v, want it to mention %q", wanted, err, msg)
		}
	}
	if _, err := ResolveModules("", []string{"virtio_blk"}); err == nil || !strings.Contains(err.Error(), "--kernel-modules") {
		t.Errorf("no dir: %v", err)
	}
	if _, err := ResolveModules(t.TempDir(), []string{"virtio_blk"}); err == nil || !strings.Contains(err.Error(), "depmod") {
		t.Errorf("no modules.dep: %v", err)
	}
	if got, err := ResolveModules("", nil); err != nil || got != nil {
		t.Errorf("nothing wanted: %v %v", got, err)
	}
}

// staticELF is a statically linked executable the tests can stand in for
// the init: Debian's busybox-static.
func staticELF(t *testing.T) string {
	t.Helper()
	const p = "/bin/busybox"
	if out, err := exec.Command("file", "-L", p).Output(); err != nil || !strings.Contains(string(out), "statically linked") {
		t.Fatalf("%s must be Debian's busybox-static (apt-get install busybox-static): %s %v", p, out, err)
	}
	return p
}

func cpioList(t *testing.T, archive []byte) string {
	t.Helper()
	cmd := exec.Command("cpio", "-itv", "--quiet")
	cmd.Stdin = bytes.NewReader(archive)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("cpio -itv: %v\n%s", err, out)
	}
	return string(out)
}

func TestBaseArchive(t *testing.T) {
	dir := fakeModuleTree(t)
	cache := t.TempDir()
	initBin := staticELF(t)
	ctx := context.Background()
	base, err := Base(ctx, cache, initBin, dir, []string{"virtio_blk", "virtio_net", "ext4"})
	if err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(base)
	if err != nil {
		t.Fatal(err)
	}
	if len(data)%4 != 0 {
		t.Errorf("archive length %d is not a multiple of 4", len(data))
	}
	list := cpioList(t, data)
	initSize, _ := os.Stat(initBin)
	for _, want := range []string{
		"drwxr-xr-x   2 root     root            0 Jan  1  1970 dev\n",
		"crw-------   1 root     root       5,   1 Jan  1  1970 dev/console\n",
		"drwxrwxrwt   2 root     root            0 Jan  1  1970 tmp\n",
		fmt.Sprintf("-rwxr-xr-x   1 root     root     %8d Jan  1  1970 init\n", initSize.Size()),
		" fireactions/modules/virtio_blk.ko\n",
		" fireactions/modules/failover.ko\n",
		" fireactions/modules/net_failover.ko\n",
		" fireactions/modules.order\n",
	} {
		if !strings.Contains(list, want) {
			t.Errorf("listing lacks %q:\n%s", want, list)
		}
	}
	if strings.Contains(list, "ext4") {
		t.Errorf("built-in ext4 was packed:\n%s", list)
	}

	// Extract and check contents: decompressed modules, load order file.
	out := t.TempDir()
	cmd := exec.Command("cpio", "-id", "--quiet", "--no-absolute-filenames", "--nonmatching", "dev/*")
	cmd.Dir = out
	cmd.Stdin = bytes.NewReader(data)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("cpio -id: %v\n%s", err, b)
	}
	for _, m := range []string{"virtio_blk", "failover", "net_failover"} {
		got, err := os.ReadFile(filepath.Join(out, "fireactions/modules", m+".ko"))
		if err != nil || string(got) != "\x7fELF module "+m {
			t.Errorf("%s: %q %v", m, got, err)
		}
	}
	order, _ := os.ReadFile(filepath.Join(out, strings.TrimPrefix(guest.ModulesOrder, "/")))
	wantOrder := "/fireactions/modules/virtio_ring.ko\n/fireactions/modules/virtio.ko\n/fireactions/modules/virtio_blk.ko\n" +
		"/fireactions/modules/failover.ko\n/fireactions/modules/net_failover.ko\n/fireactions/modules/virtio_net.ko\n"
	if string(order) != wantOrder {
		t.Errorf("modules.order:\n%s\nwant\n%s", order, wantOrder)
	}

	// Same inputs: the cached archive, untouched.
	st1, _ := os.Stat(base)
	again, err := Base(ctx, cache, initBin, dir, []string{"virtio_blk", "virtio_net", "ext4"})
	if err != nil || again != base {
		t.Fatalf("second build = %s, %v; want the cached %s", again, err, base)
	}
	st2, _ := os.Stat(base)
	if !st1.ModTime().Equal(st2.ModTime()) {
		t.Error("cached archive was rewritten")
	}
	// Different content: a different archive.
	os.WriteFile(filepath.Join(dir, "kernel/drivers/virtio/virtio.ko"), []byte("\x7fELF changed"), 0o644)
	changed, err := Base(ctx, cache, initBin, dir, []string{"virtio_blk", "virtio_net"})
	if err != nil || changed == base {
		t.Errorf("changed module gave %s, %v", changed, err)
	}
}

func TestBaseRejectsBadInputs(t *testing.T) {
	dir := fakeModuleTree(t)
	ctx := context.Background()
	if _, err := Base(ctx, t.TempDir(), "/bin/ls", "", nil); err == nil || !strings.Contains(err.Error(), "CGO_ENABLED=0") {
		t.Errorf("dynamic init: %v", err)
	}
	notELF := filepath.Join(t.TempDir(), "init")
	os.WriteFile(notELF, []byte("#!/bin/sh\n"), 0o755)
	if _, err := Base(ctx, t.TempDir(), notELF, "", nil); err == nil || !strings.Contains(err.Error(), "not an ELF") {
		t.Errorf("script init: %v", err)
	}
	if _, err := Base(ctx, t.TempDir(), staticELF(t), dir, []string{"unknown_format"}); err == nil || !strings.Contains(err.Error(), "unknown file type") {
		t.Errorf("odd module file: %v", err)
	}
}

func testConfig() guest.Config {
	return guest.Config{
		Mode:       guest.ModeApp,
		Process:    guest.Process{Args: []string{"/bin/true"}},
		Drives:     []guest.Drive{{Role: guest.RoleBase, Device: "/dev/vda"}, {Role: guest.RoleScratch, Device: "/dev/vdb"}},
		ConsoleKey: bytes.Repeat([]byte{7}, 32),
	}
}

func TestPerVMAndInitrd(t *testing.T) {
	var buf bytes.Buffer
	if err := PerVM(&buf, testConfig()); err != nil {
		t.Fatal(err)
	}
	list := cpioList(t, buf.Bytes())
	if !strings.Contains(list, "-rw-------   1 root     root ") || !strings.Contains(list, " fireactions/config.json\n") {
		t.Errorf("per-VM listing:\n%s", list)
	}
	bad := testConfig()
	bad.Mode = "nope"
	if err := PerVM(&buf, bad); err == nil || !strings.Contains(err.Error(), "mode") {
		t.Errorf("invalid config: %v", err)
	}

	base, err := Base(context.Background(), t.TempDir(), staticELF(t), "", nil)
	if err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(t.TempDir(), "initrd")
	if err := WriteInitrd(dst, base, testConfig()); err != nil {
		t.Fatal(err)
	}
	baseData, _ := os.ReadFile(base)
	all, _ := os.ReadFile(dst)
	if !bytes.HasPrefix(all, baseData) {
		t.Fatal("initrd does not start with the base part")
	}
	// GNU cpio reads one archive at a time: the second starts right after
	// the first's trailer, 4-byte aligned, as the kernel requires.
	rest := all[len(baseData):]
	if len(baseData)%4 != 0 || !strings.Contains(cpioList(t, rest), "fireactions/config.json") {
		t.Error("per-VM part is not a separate archive at an aligned offset")
	}
	if fi, _ := os.Stat(dst); fi.Mode().Perm() != 0o600 {
		t.Errorf("initrd mode %v, want 0600", fi.Mode().Perm())
	}
	if err := WriteInitrd(dst, base, guest.Config{}); err == nil {
		t.Error("invalid config accepted")
	}
	if _, err := os.Stat(dst); !os.IsNotExist(err) {
		t.Error("failed WriteInitrd left a file behind")
	}
}

func TestFindInit(t *testing.T) {
	p := filepath.Join(t.TempDir(), InitName)
	os.WriteFile(p, []byte("x"), 0o755)
	t.Setenv(InitEnv, p)
	if got, err := FindInit(); err != nil || got != p {
		t.Errorf("FindInit with %s = %s, %v", InitEnv, got, err)
	}
	t.Setenv(InitEnv, p+".missing")
	if _, err := FindInit(); err == nil || !strings.Contains(err.Error(), InitEnv) {
		t.Errorf("missing override: %v", err)
	}
	t.Setenv(InitEnv, "")
	binDir := t.TempDir()
	t.Setenv("PATH", binDir)
	if _, err := os.Stat("/usr/lib/fireactions/" + InitName); err == nil {
		t.Fatalf("/usr/lib/fireactions/%s exists on this machine; the not-found case cannot be checked", InitName)
	}
	if _, err := FindInit(); err == nil || !strings.Contains(err.Error(), "make build") {
		t.Errorf("not found: %v", err)
	}
	onPath := filepath.Join(binDir, InitName)
	os.WriteFile(onPath, []byte("x"), 0o755)
	if got, err := FindInit(); err != nil || got != onPath {
		t.Errorf("on PATH: %s, %v", got, err)
	}
}
