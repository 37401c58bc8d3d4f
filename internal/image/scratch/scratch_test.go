package scratch

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

func debugfs(t *testing.T, args ...string) string {
	t.Helper()
	bin := "/usr/sbin/debugfs"
	if p, err := exec.LookPath("debugfs"); err == nil {
		bin = p
	}
	out, err := exec.Command(bin, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("debugfs %v: %v\n%s", args, err, out)
	}
	return string(out)
}

// Clones are independent: writing into one changes neither the template
// nor another clone.
func TestClonesAreIndependent(t *testing.T) {
	tpl, err := New(filepath.Join(t.TempDir(), "templates"))
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a.ext4"), filepath.Join(dir, "b.ext4")
	const size = 64 << 20
	for _, p := range []string{a, b} {
		if err := tpl.Create(context.Background(), p, size); err != nil {
			t.Fatal(err)
		}
	}
	src := filepath.Join(dir, "hello")
	os.WriteFile(src, []byte("hello from a"), 0o644)
	debugfs(t, "-w", "-R", "write "+src+" hello", a)
	if out := debugfs(t, "-R", "cat /hello", a); !strings.Contains(out, "hello from a") {
		t.Fatalf("write into a failed:\n%s", out)
	}
	templates, _ := filepath.Glob(filepath.Join(tpl.dir, "*.img"))
	if len(templates) != 1 {
		t.Fatalf("templates: %v", templates)
	}
	for _, p := range []string{b, templates[0]} {
		if out := debugfs(t, "-R", "ls /", p); strings.Contains(out, "hello") {
			t.Errorf("%s sees a's file:\n%s", p, out)
		}
	}
	// The template keeps only its metadata allocated.
	fi, _ := os.Stat(templates[0])
	if alloc := fi.Sys().(*syscall.Stat_t).Blocks * 512; alloc > 2<<20 {
		t.Errorf("template of %d bytes allocates %d bytes; want it sparse", size, alloc)
	}
}

func TestDigHoles(t *testing.T) {
	p := filepath.Join(t.TempDir(), "f")
	data := make([]byte, 1<<20)
	copy(data[8192:], "not zero")
	os.WriteFile(p, data, 0o644)
	if err := digHoles(p); err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(p)
	if string(got) != string(data) {
		t.Fatal("content changed")
	}
	fi, _ := os.Stat(p)
	if alloc := fi.Sys().(*syscall.Stat_t).Blocks * 512; alloc > 64<<10 {
		t.Errorf("%d bytes still allocated after punching the zeros of a 1MiB file with one non-zero block", alloc)
	}
}
