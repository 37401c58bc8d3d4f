// Package runtime is the one place that turns a request — an OCI image or a
// boot disk, a process override, resources, a network choice and metadata —
// into a running microVM, and takes it apart again. It ties together the
// image cache (internal/image), the guest init's initramfs
// (internal/initramfs), the metadata document (internal/metadata), the
// host network (internal/network) and the VM manager (internal/vm).
//
// Every resource a VM holds outside its VM directory — the image lease, the
// scratch disk, the network attachment — is recorded in an instance record
// (<data-dir>/instances/<id>.json) before it is taken, so that a process
// that dies at any point leaves something Recover can finish: re-attach a
// VM that still runs, or release everything of one that does not.
//
// The `fireactions vm` commands, the runner pools and the Nomad driver all
// start their VMs here.
package runtime

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"

	"github.com/fireactions/fireactions/internal/image"
	"github.com/fireactions/fireactions/internal/initramfs"
	"github.com/fireactions/fireactions/internal/network"
	"github.com/fireactions/fireactions/internal/vm"
)

// Networker attaches VMs to host networks; *network.Manager implements it.
type Networker interface {
	Attach(ctx context.Context, vmID string, req network.Request) (*network.Attachment, error)
	Detach(ctx context.Context, vmID string) error
	// Cleanup detaches every attachment whose VM is not in live.
	Cleanup(ctx context.Context, live []string) ([]string, error)
}

// Options configure a Runtime.
type Options struct {
	// DataDir is the root of everything the runtime keeps:
	//
	//	<data-dir>/images      image store (unless Images is given)
	//	<data-dir>/vms         VM manager state, one directory per VM
	//	<data-dir>/instances   instance records (resources held per VM)
	//	<data-dir>/scratch     per-VM scratch disks
	//	<data-dir>/initramfs   shared initramfs parts, cached by content
	DataDir string
	// Kernel is the default guest kernel (PVH ELF vmlinux) and
	// KernelModules its optional lib/modules/<version> directory; a Request
	// may override both.
	Kernel        string
	KernelModules string
	// Init is the fireactions-init binary; empty means initramfs.FindInit,
	// looked up at the first Run.
	Init string
	// Modules are the kernel modules put into every initramfs when
	// KernelModules is set; nil means initramfs.DefaultModules.
	Modules []string
	// Backend is the default backend name: auto (or empty), firecracker,
	// qemu. Backends are the candidates, most preferred first (auto picks
	// the first available one).
	Backend  string
	Backends []vm.Backend
	// Images is the image store; nil opens <data-dir>/images.
	Images *image.Store
	// Network attaches VMs to networks; nil means only VMs without a
	// network can run.
	Network Networker
	Logger  *slog.Logger
}

// Runtime runs microVMs from images. It is safe for concurrent use, and
// several processes may share one data directory: each VM is owned by one
// process at a time (see vm.Manager).
type Runtime struct {
	opts   Options
	log    *slog.Logger
	images *image.Store
	vms    *vm.Manager
	recs   records

	initOnce sync.Once
	initPath string
	initErr  error
}

// New opens the runtime over opts.DataDir, creating its directories.
func New(opts Options) (*Runtime, error) {
	if opts.DataDir == "" {
		return nil, errors.New("runtime: DataDir is required (set data_dir or --data-dir)")
	}
	dir, err := filepath.Abs(opts.DataDir)
	if err != nil {
		return nil, fmt.Errorf("runtime: %w", err)
	}
	opts.DataDir = dir
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if len(opts.Backends) == 0 {
		return nil, errors.New("runtime: no VM backend given")
	}
	for _, d := range []string{"instances", "scratch", "initramfs"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o700); err != nil {
			return nil, fmt.Errorf("runtime: %w", err)
		}
	}
	rt := &Runtime{opts: opts, log: opts.Logger.With("component", "runtime"), images: opts.Images,
		recs: records{dir: filepath.Join(dir, "instances")}}
	if rt.images == nil {
		if rt.images, err = image.Open(filepath.Join(dir, "images"), image.Options{Logger: opts.Logger}); err != nil {
			return nil, fmt.Errorf("runtime: %w", err)
		}
	}
	rt.vms, err = vm.NewManager(vm.Options{Root: filepath.Join(dir, "vms"), Backends: opts.Backends, Logger: opts.Logger})
	if err != nil {
		return nil, fmt.Errorf("runtime: %w", err)
	}
	return rt, nil
}

// Images returns the image store VMs boot from.
func (rt *Runtime) Images() *image.Store { return rt.images }

// VMs returns the underlying VM manager (for Inspect-level detail).
func (rt *Runtime) VMs() *vm.Manager { return rt.vms }

// DataDir returns the runtime's root directory.
func (rt *Runtime) DataDir() string { return rt.opts.DataDir }

// Close detaches from every VM this runtime owns without stopping them:
// they keep running, and a later Recover or Attach takes them over.
func (rt *Runtime) Close() error { return rt.vms.Close() }

// SelectBackend resolves a backend name (empty: the runtime's default)
// among the runtime's backends, with the reason for the choice.
func (rt *Runtime) SelectBackend(name string) (vm.Backend, string, error) {
	if name == "" {
		name = rt.opts.Backend
	}
	return vm.SelectBackend(name, rt.opts.Backends...)
}

func (rt *Runtime) scratchPath(id string) string {
	return filepath.Join(rt.opts.DataDir, "scratch", id+".ext4")
}

// initBinary finds fireactions-init once.
func (rt *Runtime) initBinary() (string, error) {
	rt.initOnce.Do(func() {
		if rt.opts.Init != "" {
			if _, err := os.Stat(rt.opts.Init); err != nil {
				rt.initErr = fmt.Errorf("guest init: %w", err)
				return
			}
			rt.initPath = rt.opts.Init
			return
		}
		rt.initPath, rt.initErr = initramfs.FindInit()
	})
	return rt.initPath, rt.initErr
}

// baseInitrd returns the shared initramfs part for the kernel modules
// directory and the extra modules, built once per content.
func (rt *Runtime) baseInitrd(ctx context.Context, modulesDir string, extra []string) (string, error) {
	init, err := rt.initBinary()
	if err != nil {
		return "", err
	}
	var mods []string
	if modulesDir != "" {
		mods = rt.opts.Modules
		if mods == nil {
			mods = initramfs.DefaultModules
		}
		for _, m := range extra {
			if !slices.Contains(mods, m) {
				mods = append(slices.Clip(mods), m)
			}
		}
	} else if len(extra) > 0 {
		return "", fmt.Errorf("modules %v: the kernel has no modules directory; set the kernel modules directory or build them into the kernel", extra)
	}
	return initramfs.Base(ctx, filepath.Join(rt.opts.DataDir, "initramfs"), init, modulesDir, mods)
}
