package initramfs

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"
)

// DefaultModules are what fireactions-init needs from a kernel that builds
// them as modules (Debian's): the virtio-mmio transport, block and network
// drivers, overlayfs for the root and ext4 for the disks. Built-in ones are
// skipped.
var DefaultModules = []string{"virtio_mmio", "virtio_blk", "virtio_net", "overlay", "ext4"}

// DockerModules are what Docker (bridge networking with iptables-nft or
// iptables-legacy, overlay2 storage) needs inside a guest whose kernel has
// them as modules. The image's own modprobe cannot load them because the
// image carries no /lib/modules for the guest kernel, so the init loads them
// at boot when they are included in the base initramfs.
var DockerModules = []string{
	"overlay", "bridge", "br_netfilter", "veth",
	"nf_tables", "nft_compat", "nft_chain_nat", "nf_nat", "nf_conntrack",
	"xt_MASQUERADE", "xt_conntrack", "xt_addrtype", "xt_nat", "xt_mark",
	"ip_tables", "iptable_filter", "iptable_nat", "ip6_tables", "ip6table_filter", "ip6table_nat",
}

// moduleName returns the kernel's name for a module file:
// ".../net/virtio-net.ko.xz" -> "virtio_net".
func moduleName(path string) string {
	base := filepath.Base(path)
	if i := strings.Index(base, ".ko"); i >= 0 {
		base = base[:i]
	}
	return strings.ReplaceAll(base, "-", "_")
}

// ResolveModules returns the files of the wanted modules and of everything
// they depend on, dependencies first, as absolute paths. modulesDir is a
// kernel's lib/modules/<version> directory; dependencies come from its
// modules.dep. A wanted module that modules.builtin lists is skipped; one
// that is neither there nor in modules.dep is an error.
func ResolveModules(modulesDir string, wanted []string) ([]string, error) {
	if len(wanted) == 0 {
		return nil, nil
	}
	if modulesDir == "" {
		return nil, fmt.Errorf("kernel modules %s requested but no modules directory given (--kernel-modules DIR, the kernel's lib/modules/<version>)", strings.Join(wanted, ", "))
	}
	deps, err := readModulesDep(modulesDir)
	if err != nil {
		return nil, err
	}
	builtin, err := readBuiltin(modulesDir)
	if err != nil {
		return nil, err
	}
	var (
		order []string
		state = map[string]int{} // 1 visiting, 2 done
	)
	var visit func(name, from string) error
	visit = func(name, from string) error {
		switch state[name] {
		case 1:
			return fmt.Errorf("kernel module %s: dependency cycle through %s in %s", from, name, filepath.Join(modulesDir, "modules.dep"))
		case 2:
			return nil
		}
		e, ok := deps[name]
		if !ok {
			return fmt.Errorf("kernel module %s (needed by %s) is listed in %s but its own entry is missing", name, from, filepath.Join(modulesDir, "modules.dep"))
		}
		state[name] = 1
		// modules.dep lists the whole closure with the deepest last, so
		// visiting it backwards reaches leaves first; the recursion keeps
		// the order right whatever the list order is.
		for i := len(e.deps) - 1; i >= 0; i-- {
			if err := visit(e.deps[i], name); err != nil {
				return err
			}
		}
		state[name] = 2
		order = append(order, filepath.Join(modulesDir, e.path))
		return nil
	}
	for _, w := range wanted {
		name := moduleName(w)
		if _, ok := deps[name]; !ok {
			if builtin[name] {
				continue
			}
			return nil, fmt.Errorf("kernel module %q is neither in %s nor built into the kernel (modules.builtin): use a kernel that has it, or drop it from the module list",
				w, filepath.Join(modulesDir, "modules.dep"))
		}
		if err := visit(name, name); err != nil {
			return nil, err
		}
	}
	return order, nil
}

type depEntry struct {
	path string
	deps []string
}

func readModulesDep(dir string) (map[string]depEntry, error) {
	p := filepath.Join(dir, "modules.dep")
	f, err := os.Open(p)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%s is missing: generate it with `depmod -b <root> <version>` (Debian package kmod), where <root>/lib/modules/<version> is %s", p, dir)
	}
	if err != nil {
		return nil, fmt.Errorf("read modules.dep: %w", err)
	}
	defer f.Close()
	out := map[string]depEntry{}
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || line[0] == '#' {
			continue
		}
		mod, rest, ok := strings.Cut(line, ":")
		if !ok {
			return nil, fmt.Errorf("%s: malformed line %q", p, line)
		}
		e := depEntry{path: mod}
		for _, d := range strings.Fields(rest) {
			e.deps = append(e.deps, moduleName(d))
		}
		out[moduleName(mod)] = e
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read %s: %w", p, err)
	}
	return out, nil
}

func readBuiltin(dir string) (map[string]bool, error) {
	data, err := os.ReadFile(filepath.Join(dir, "modules.builtin"))
	if errors.Is(err, os.ErrNotExist) {
		return map[string]bool{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read modules.builtin: %w", err)
	}
	out := map[string]bool{}
	for _, line := range strings.Fields(string(data)) {
		out[moduleName(line)] = true
	}
	return out, nil
}

// readModule returns a module file's ELF contents, decompressing .ko.xz,
// .ko.zst and .ko.gz: finit_module in the guest then needs no decompressor
// and the kernel no CONFIG_MODULE_DECOMPRESS.
func readModule(path string) ([]byte, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read kernel module: %w", err)
	}
	var r io.Reader
	switch {
	case strings.HasSuffix(path, ".ko"):
		r = bytes.NewReader(data)
	case strings.HasSuffix(path, ".ko.xz"):
		xr, err := xz.NewReader(bytes.NewReader(data))
		if err != nil {
			return nil, fmt.Errorf("decompress %s: %w", path, err)
		}
		r = xr
	case strings.HasSuffix(path, ".ko.zst"):
		zr, err := zstd.NewReader(bytes.NewReader(data))
		if err != nil {
			return nil, fmt.Errorf("decompress %s: %w", path, err)
		}
		defer zr.Close()
		r = zr
	case strings.HasSuffix(path, ".ko.gz"):
		gr, err := gzip.NewReader(bytes.NewReader(data))
		if err != nil {
			return nil, fmt.Errorf("decompress %s: %w", path, err)
		}
		r = gr
	default:
		return nil, fmt.Errorf("kernel module %s: unknown file type (want .ko, .ko.xz, .ko.zst or .ko.gz)", path)
	}
	out, err := io.ReadAll(r)
	if err != nil {
		return nil, fmt.Errorf("decompress %s: %w", path, err)
	}
	if !bytes.HasPrefix(out, []byte("\x7fELF")) {
		return nil, fmt.Errorf("kernel module %s does not decompress to an ELF object", path)
	}
	return out, nil
}
