// Package initramfs builds the initial RAM filesystems microVMs boot with.
//
// A VM's initrd is two concatenated newc cpio archives, which the kernel
// unpacks in order: the base part shared by every VM that uses the same init
// binary and kernel modules (built once and cached by content hash), and a
// tiny per-VM part holding that VM's guest.Config. Appending the per-VM part
// costs a file copy, not a rebuild.
package initramfs

import (
	"bytes"
	"context"
	"crypto/sha256"
	"debug/elf"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strings"

	"github.com/fireactions/fireactions/internal/guest"
)

// builderVersion changes whenever the layout of the base part changes, so
// archives cached by an older builder are not reused.
const builderVersion = "fireactions-initramfs/1"

// InitEnv names the environment variable that overrides where FindInit
// looks for the init binary.
const InitEnv = "FIREACTIONS_INIT"

// InitName is the file name of the guest init binary.
const InitName = "fireactions-init"

// Base returns the path of the shared initramfs part for initBinary and the
// given kernel modules (resolved with ResolveModules in modulesDir,
// dependencies included), building it in cacheDir when no archive with the
// same content exists yet. It holds /init, the decompressed modules under
// guest.ModulesDir and their load order in guest.ModulesOrder. modulesDir
// may be empty when modules is.
func Base(ctx context.Context, cacheDir, initBinary, modulesDir string, modules []string) (string, error) {
	initData, err := os.ReadFile(initBinary)
	if err != nil {
		return "", fmt.Errorf("initramfs: read init binary: %w", err)
	}
	if err := checkStatic(initBinary, initData); err != nil {
		return "", err
	}
	files, err := ResolveModules(modulesDir, modules)
	if err != nil {
		return "", fmt.Errorf("initramfs: %w", err)
	}

	type module struct {
		name string
		data []byte
	}
	mods := make([]module, 0, len(files))
	h := sha256.New()
	fmt.Fprintf(h, "%s\ninit %d\n", builderVersion, len(initData))
	h.Write(initData)
	for _, f := range files {
		if err := ctx.Err(); err != nil {
			return "", err
		}
		data, err := readModule(f)
		if err != nil {
			return "", fmt.Errorf("initramfs: %w", err)
		}
		m := module{name: moduleName(f), data: data}
		mods = append(mods, m)
		fmt.Fprintf(h, "module %s %d\n", m.name, len(data))
		h.Write(data)
	}
	out := filepath.Join(cacheDir, "base-"+hex.EncodeToString(h.Sum(nil))[:32]+".cpio")
	if _, err := os.Stat(out); err == nil {
		return out, nil
	}

	var buf bytes.Buffer
	c := newCPIOWriter(&buf)
	for _, d := range []string{"dev", "proc", "sys", "run", "mnt", "fireactions", strings.TrimPrefix(guest.ModulesDir, "/")} {
		c.Dir(d, 0o755)
	}
	c.Dir("tmp", 0o1777)
	// The kernel opens /dev/console of the initramfs as the init's stdin,
	// stdout and stderr before devtmpfs exists.
	c.CharDev("dev/console", 0o600, 5, 1)
	c.CharDev("dev/null", 0o666, 1, 3)
	c.File("init", 0o755, initData)
	var order strings.Builder
	for _, m := range mods {
		p := path.Join(guest.ModulesDir, m.name+".ko")
		c.File(strings.TrimPrefix(p, "/"), 0o644, m.data)
		order.WriteString(p + "\n")
	}
	c.File(strings.TrimPrefix(guest.ModulesOrder, "/"), 0o644, []byte(order.String()))
	if err := c.Close(); err != nil {
		return "", fmt.Errorf("initramfs: %w", err)
	}
	if err := writeFileAtomic(out, buf.Bytes(), 0o644); err != nil {
		return "", fmt.Errorf("initramfs: %w", err)
	}
	return out, nil
}

// checkStatic rejects an init that is not a statically linked ELF
// executable: the initramfs has no dynamic loader or libc.
func checkStatic(name string, data []byte) error {
	f, err := elf.NewFile(bytes.NewReader(data))
	if err != nil {
		return fmt.Errorf("initramfs: init binary %s is not an ELF executable: %w", name, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return fmt.Errorf("initramfs: init binary %s is dynamically linked: build it with CGO_ENABLED=0 (make build)", name)
		}
	}
	return nil
}

func writeFileAtomic(name string, data []byte, perm os.FileMode) error {
	if err := os.MkdirAll(filepath.Dir(name), 0o755); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(name), ".tmp-"+filepath.Base(name)+"-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Chmod(perm); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), name)
}

// PerVM writes the per-VM part: guest.ConfigPath holding cfg as JSON. It
// validates cfg first.
func PerVM(w io.Writer, cfg guest.Config) error {
	data, err := cfg.Marshal()
	if err != nil {
		return err
	}
	c := newCPIOWriter(w)
	c.Dir("fireactions", 0o755)
	c.File(strings.TrimPrefix(guest.ConfigPath, "/"), 0o600, data)
	if err := c.Close(); err != nil {
		return fmt.Errorf("initramfs: per-VM part: %w", err)
	}
	return nil
}

// WriteInitrd writes a VM's complete initrd to dst: the base part at base
// followed by the per-VM part for cfg. The file is private to its owner
// because it holds the console key.
func WriteInitrd(dst, base string, cfg guest.Config) (err error) {
	src, err := os.Open(base)
	if err != nil {
		return fmt.Errorf("initrd: open base part: %w", err)
	}
	defer src.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("initrd: %w", err)
	}
	defer func() {
		if cerr := out.Close(); err == nil && cerr != nil {
			err = fmt.Errorf("initrd: %w", cerr)
		}
		if err != nil {
			os.Remove(dst)
		}
	}()
	if _, err := io.Copy(out, src); err != nil {
		return fmt.Errorf("initrd: copy base part: %w", err)
	}
	if err := PerVM(out, cfg); err != nil {
		return fmt.Errorf("initrd: %w", err)
	}
	return nil
}

// FindInit locates the fireactions-init binary: $FIREACTIONS_INIT, then
// next to the running executable, then /usr/lib/fireactions, then $PATH.
func FindInit() (string, error) {
	if p := os.Getenv(InitEnv); p != "" {
		if _, err := os.Stat(p); err != nil {
			return "", fmt.Errorf("%s=%s: %w", InitEnv, p, err)
		}
		return p, nil
	}
	var looked []string
	if exe, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(exe), InitName)
		looked = append(looked, filepath.Dir(exe))
		if isFile(p) {
			return p, nil
		}
	}
	p := filepath.Join("/usr/lib/fireactions", InitName)
	looked = append(looked, filepath.Dir(p))
	if isFile(p) {
		return p, nil
	}
	if p, err := exec.LookPath(InitName); err == nil {
		return p, nil
	} else if !errors.Is(err, exec.ErrNotFound) {
		return "", fmt.Errorf("find %s: %w", InitName, err)
	}
	looked = append(looked, "$PATH")
	return "", fmt.Errorf("%s not found (looked in %s): build it with `make build` (CGO_ENABLED=0 go build -o bin/%s ./cmd/%s), install it next to fireactions or in /usr/lib/fireactions, or set %s",
		InitName, strings.Join(looked, ", "), InitName, InitName, InitEnv)
}

func isFile(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.Mode().IsRegular()
}
