// Package runtimetest helps the tests of the runtime and of its users (the
// vm CLI, the runner pools, the Nomad driver) boot real microVMs from real
// images: a busybox image with every applet, pushed to an in-process
// registry, runtime options wired to the test kernel, the guest init and
// the qemu backend, and a check that nothing of a VM is left on the host.
// It is imported by tests only.
package runtimetest

import (
	"archive/tar"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/fireactions/fireactions/internal/image/imagetest"
	"github.com/fireactions/fireactions/internal/runtime"
	"github.com/fireactions/fireactions/internal/vm"
	"github.com/fireactions/fireactions/internal/vm/qemu"
	"github.com/fireactions/fireactions/internal/vm/vmtest"
)

// BusyboxLayer is a layer with Debian's static busybox as /bin/busybox, a
// link in /bin for each of its applets, root and nobody in /etc/passwd,
// and files (path to content; a path ending in ".sh" or in a bin/ or sbin/
// directory is executable).
func BusyboxLayer(t testing.TB, files map[string]string) v1.Layer {
	t.Helper()
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Fatalf("needs Debian's busybox-static (/bin/busybox): %v", err)
	}
	list, err := exec.Command("/bin/busybox", "--list").Output()
	if err != nil {
		t.Fatalf("/bin/busybox --list: %v", err)
	}
	entries := []imagetest.Entry{
		{Name: "bin/", Type: tar.TypeDir},
		{Name: "bin/busybox", Body: string(bb), Mode: 0o755},
		{Name: "etc/", Type: tar.TypeDir},
		{Name: "etc/passwd", Body: "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"},
		{Name: "etc/group", Body: "root:x:0:\nnogroup:x:65534:\n"},
		{Name: "root/", Type: tar.TypeDir, Mode: 0o700},
		{Name: "tmp/", Type: tar.TypeDir, Mode: 0o1777},
	}
	for _, applet := range strings.Fields(string(list)) {
		if applet != "busybox" {
			entries = append(entries, imagetest.Entry{Name: "bin/" + applet, Type: tar.TypeSymlink, Link: "busybox"})
		}
	}
	names := make([]string, 0, len(files))
	for n := range files {
		names = append(names, n)
	}
	sort.Strings(names)
	// Parent directories of the extra files, shallowest first.
	have := map[string]bool{"bin": true, "etc": true, "root": true, "tmp": true}
	var dirs []string
	for _, n := range names {
		for d := filepath.Dir(n); d != "." && !have[d]; d = filepath.Dir(d) {
			have[d] = true
			dirs = append(dirs, d)
		}
	}
	sort.Strings(dirs)
	for _, d := range dirs {
		entries = append(entries, imagetest.Entry{Name: d + "/", Type: tar.TypeDir})
	}
	for _, n := range names {
		mode := int64(0o644)
		if strings.HasSuffix(n, ".sh") || strings.HasPrefix(n, "bin/") || strings.HasPrefix(n, "sbin/") || strings.Contains(n, "/bin/") || strings.Contains(n, "/sbin/") {
			mode = 0o755
		}
		entries = append(entries, imagetest.Entry{Name: n, Body: files[n], Mode: mode})
	}
	return imagetest.Layer(t, imagetest.Tar(t, entries...))
}

// PushBusybox builds a busybox image with cfg as its run config and files
// added, pushes it to reg as repo:latest and returns the reference.
func PushBusybox(t testing.TB, reg *imagetest.Registry, repo string, cfg v1.Config, files map[string]string) string {
	t.Helper()
	img := imagetest.Image(t, "linux/amd64", cfg, BusyboxLayer(t, files))
	ref := fmt.Sprintf("%s/%s:latest", reg.Host, repo)
	imagetest.Push(t, ref, img, nil)
	return ref
}

// Kernel returns the test kernel and its modules directory
// (scripts/test-kernel.sh, cached).
func Kernel(t testing.TB) (vmlinux, modules string) {
	t.Helper()
	vmtest.RequireQEMU(t)
	return vmtest.Kernel(t)
}

// Options returns runtime options over dataDir with the test kernel, the
// guest init built from this tree and the qemu backend. The metadata
// helper QEMU runs is the test binary itself: its TestMain must hand
// qemu.MetadataHelperArg to qemu.MetadataHelperMain (see HelperMain).
func Options(t testing.TB, dataDir string) runtime.Options {
	t.Helper()
	kernel, mods := Kernel(t)
	return runtime.Options{
		DataDir:       dataDir,
		Kernel:        kernel,
		KernelModules: mods,
		Init:          vmtest.Init(t),
		Backends:      []vm.Backend{qemu.New(qemu.Options{})},
	}
}

// HelperMain runs the metadata helper when the test binary was started as
// one, and then does not return. Call it first in TestMain.
func HelperMain() {
	if len(os.Args) > 1 && os.Args[1] == qemu.MetadataHelperArg {
		os.Exit(qemu.MetadataHelperMain(os.Args[2:]))
	}
}

// Leftovers lists what VMs of dataDir left on the host: processes whose
// command line names the data directory (VMMs, metadata helpers), VM
// directories, instance records, scratch disks and image leases.
func Leftovers(t testing.TB, dataDir string) []string {
	t.Helper()
	var out []string
	for _, pid := range vm.ProcessesMatching(dataDir) {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		out = append(out, fmt.Sprintf("process %d: %s", pid, strings.ReplaceAll(string(b), "\x00", " ")))
	}
	for _, d := range []string{"vms", "instances", "scratch"} {
		ents, _ := os.ReadDir(filepath.Join(dataDir, d))
		for _, e := range ents {
			out = append(out, filepath.Join(d, e.Name()))
		}
	}
	leases, _ := filepath.Glob(filepath.Join(dataDir, "images", "leases", "*", "*.json"))
	for _, l := range leases {
		rel, _ := filepath.Rel(dataDir, l)
		out = append(out, rel)
	}
	return out
}

// RequireNoLeftovers fails the test when Leftovers finds anything.
func RequireNoLeftovers(t testing.TB, dataDir string) {
	t.Helper()
	if l := Leftovers(t, dataDir); len(l) > 0 {
		t.Fatalf("left behind in %s:\n  %s", dataDir, strings.Join(l, "\n  "))
	}
}
