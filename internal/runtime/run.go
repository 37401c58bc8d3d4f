package runtime

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/fireactions/fireactions/internal/guest"
	"github.com/fireactions/fireactions/internal/image"
	"github.com/fireactions/fireactions/internal/metadata"
	"github.com/fireactions/fireactions/internal/network"
	"github.com/fireactions/fireactions/internal/vm"
)

// teardownTimeout bounds the clean-up after a failed Run, which must run
// even when the caller's context is what failed it.
const teardownTimeout = 2 * time.Minute

// Run starts one microVM as req describes and returns once its VMM runs
// (the guest may still be booting). Everything taken on the way — image
// lease, scratch disk, network attachment, VM files — is released again
// when Run fails, whatever the step. ctx bounds the start-up only: the VM
// outlives it, and this process.
func (rt *Runtime) Run(ctx context.Context, req Request) (_ *Instance, err error) {
	if err := req.validate(); err != nil {
		return nil, fmt.Errorf("run: %w", err)
	}
	id := req.ID
	if id == "" {
		id = NewID()
	}
	ev := emitter{id: id, f: req.Events}
	log := rt.log.With("vm", id)

	b, reason, err := rt.SelectBackend(req.Backend)
	if err != nil {
		return nil, fmt.Errorf("run %s: %w", id, err)
	}
	log.Info("backend selected", "backend", b.Name(), "why", reason)
	ev.send(Event{Phase: PhaseBackend, Done: true, Message: reason})

	kernel, modulesDir := rt.opts.Kernel, rt.opts.KernelModules
	if req.Kernel != "" {
		// The default modules belong to the default kernel.
		kernel, modulesDir = req.Kernel, req.KernelModules
	} else if req.KernelModules != "" {
		modulesDir = req.KernelModules
	}
	if kernel == "" {
		return nil, fmt.Errorf("run %s: kernel: no guest kernel given", id)
	}
	if fi, err := os.Stat(kernel); err != nil {
		return nil, fmt.Errorf("run %s: kernel: %w", id, err)
	} else if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("run %s: kernel: %s is not a file", id, kernel)
	}

	if !req.Network.None() && rt.opts.Network == nil {
		return nil, fmt.Errorf("run %s: network %s: this runtime has no network manager; use no network", id, req.Network)
	}
	if _, err := rt.vms.Inspect(id); err == nil {
		return nil, fmt.Errorf("run %s: %w (remove it first or choose another name)", id, ErrExists)
	}
	hostname := req.Hostname
	if hostname == "" {
		hostname = hostnameFor(id)
	}
	rec := &record{
		ID: id, Hostname: hostname, Image: req.Image, BootDisk: req.BootDisk, Network: req.Network.String(),
		Backend: b.Name(), Labels: req.Labels, CreatedAt: time.Now().UTC(),
	}
	lock, err := rt.recs.create(rec)
	if err != nil {
		return nil, fmt.Errorf("run %s: %w", id, err)
	}
	defer lock.release()
	defer func() {
		if err == nil {
			return
		}
		tctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), teardownTimeout)
		defer cancel()
		if terr := rt.teardown(tctx, lock, rec); terr != nil {
			log.Error("clean-up after a failed start", "err", terr)
			err = errors.Join(err, fmt.Errorf("clean-up: %w", terr))
		}
	}()
	save := func() error { return rt.recs.save(lock, rec) }

	// Image or boot disk.
	var img *image.Image
	if req.Image != "" {
		img, err = rt.pull(ctx, ev, req)
		if err != nil {
			return nil, fmt.Errorf("run %s: %w", id, err)
		}
		// Recorded before it is taken, so a crash in between cannot leak it.
		rec.Digest, rec.Lease = img.Digest, id
		if err := save(); err != nil {
			return nil, err
		}
		if _, err := rt.images.Acquire(img.Digest, image.Holder(id)); err != nil {
			return nil, fmt.Errorf("run %s: lease image %s: %w", id, img.Digest, err)
		}
	} else {
		if img, err = image.OpenBootDisk(req.BootDisk); err != nil {
			return nil, fmt.Errorf("run %s: %w", id, err)
		}
		rec.BootDisk = img.BasePath
	}

	mode := req.Mode
	if mode == "" {
		mode = guest.ModeApp
		if req.BootDisk != "" && req.Entrypoint == nil && req.Args == nil {
			mode = guest.ModeSystem
		}
	}
	proc := req.process(img.Config)
	if mode == guest.ModeApp && len(proc.Args) == 0 {
		return nil, fmt.Errorf("run %s: %s has no Entrypoint or Cmd: give a command to run", id, describeRoot(req))
	}
	rec.Mode = mode

	// Scratch disk.
	size := req.DiskSize
	if size == 0 {
		size = DefaultDiskSize
	}
	rec.Scratch = rt.scratchPath(id)
	if err := save(); err != nil {
		return nil, err
	}
	done := ev.phase(PhaseScratch, fmt.Sprintf("creating a %d MiB scratch disk", size>>20))
	err = rt.images.CreateScratch(ctx, rec.Scratch, size)
	done(err, "")
	if err != nil {
		return nil, fmt.Errorf("run %s: scratch disk: %w", id, err)
	}

	// Network.
	var att *network.Attachment
	if !req.Network.None() {
		done := ev.phase(PhaseNetwork, "attaching to "+req.Network.String())
		nreq := network.Request{Network: req.Network.CNI, Static: req.Network.Static}
		if nreq.Network == "default" {
			nreq.Network = ""
		}
		att, err = rt.opts.Network.Attach(ctx, id, nreq)
		if err != nil {
			done(err, "")
			return nil, fmt.Errorf("run %s: %w", id, err)
		}
		done(nil, "address "+att.GuestIP)
		rec.Attachment = att
		if err := save(); err != nil {
			return nil, err
		}
	}

	// The shared initramfs part (the VM manager appends the VM's config).
	done = ev.phase(PhaseInitramfs, "")
	base, err := rt.baseInitrd(ctx, modulesDir, req.Modules)
	done(err, "")
	if err != nil {
		return nil, fmt.Errorf("run %s: %w", id, err)
	}

	spec := vm.Spec{
		ID:            id,
		Labels:        req.Labels,
		Kernel:        kernel,
		KernelModules: modulesDir,
		Initrd:        base,
		BootArgs:      strings.TrimSpace("quiet " + req.KernelArgs),
		VCPUs:         req.VCPUs,
		MemoryMiB:     req.MemoryMiB,
		SMT:           req.SMT,
		CPUTemplate:   req.CPUTemplate,
		Drives: []vm.Drive{
			{Path: img.BasePath, ReadOnly: true, Role: vm.RoleBase},
			{Path: rec.Scratch, Role: vm.RoleScratch},
		},
		MMDSVersion: req.MMDSVersion,
		Guest: &guest.Config{
			Mode:       mode,
			Hostname:   hostname,
			Process:    proc,
			BindMounts: req.BindMounts,
			Sysctls:    req.Sysctls,
		},
		StopTimeout: req.StopTimeout,
		Timeout:     req.Timeout,
	}
	for _, d := range req.Disks {
		spec.Drives = append(spec.Drives, vm.Drive{Path: d.Path, ReadOnly: d.ReadOnly, Role: vm.RoleExtra, MountPoint: d.MountPoint})
	}
	if att != nil {
		spec.NetNS = att.NetNSPath
		spec.Interfaces = []vm.Interface{{
			TapName: att.TapName, MAC: att.MAC, GuestIP: att.GuestIP,
			Gateway: att.Gateway, DNS: att.Nameservers, MTU: att.MTU,
		}}
	}
	if !req.NoMetadata {
		in := req.Metadata
		if in.InstanceID == "" {
			in.InstanceID = id
		}
		if in.Hostname == "" {
			in.Hostname = hostname
		}
		doc, err := metadata.New(in)
		if err != nil {
			return nil, fmt.Errorf("run %s: %w", id, err)
		}
		if spec.Metadata, err = doc.JSON(); err != nil {
			return nil, fmt.Errorf("run %s: %w", id, err)
		}
	}

	done = ev.phase(PhaseBoot, "starting "+b.Name())
	st, err := rt.vms.Start(ctx, b, spec)
	if err != nil {
		done(err, "")
		return nil, fmt.Errorf("run %s: %w", id, err)
	}
	done(nil, fmt.Sprintf("VMM pid %d ready (host overhead %s)", st.Pid, time.Duration(st.StartOverhead).Round(time.Millisecond)))
	log.Info("vm running", "image", describeRoot(req), "mode", mode, "pid", st.Pid)
	return &Instance{rt: rt, id: id, rec: *rec}, nil
}

// pull resolves the request's image through the cache, reporting the
// phase and the download's progress.
func (rt *Runtime) pull(ctx context.Context, ev emitter, req Request) (*image.Image, error) {
	po := req.Pull
	if user := po.Progress; user != nil || ev.f != nil {
		po.Progress = func(p image.Progress) {
			if user != nil {
				user(p)
			}
			ev.send(Event{Phase: PhasePull, Progress: &p})
		}
	}
	t0 := time.Now()
	done := ev.phase(PhasePull, "pulling "+req.Image)
	img, err := rt.images.Pull(ctx, req.Image, po)
	if err != nil {
		done(err, "")
		return nil, err
	}
	cached := img.Created.Before(t0)
	d := time.Since(t0)
	msg := fmt.Sprintf("pulled and converted %s (%s) in %s", req.Image, img.Digest, d.Round(time.Millisecond))
	if cached {
		msg = fmt.Sprintf("found %s (%s) in the image cache", req.Image, img.Digest)
	}
	ev.send(Event{Phase: PhasePull, Done: true, Duration: d, Cached: cached, Message: msg})
	rt.log.Info("image ready", "vm", ev.id, "ref", req.Image, "digest", img.Digest, "cached", cached, "took", d.Round(time.Millisecond))
	return img, nil
}

func describeRoot(req Request) string {
	if req.Image != "" {
		return req.Image
	}
	return "boot disk " + req.BootDisk
}

// teardown releases everything rec holds outside the VM manager, after
// removing the VM itself if it exists: network, image lease, scratch disk,
// then the record. The caller holds the record's lock. A step that fails
// keeps the record (so a later Recover retries) and is reported.
func (rt *Runtime) teardown(ctx context.Context, lock *recordLock, rec *record) error {
	var errs []error
	if err := rt.vms.Remove(ctx, rec.ID); err != nil && !errors.Is(err, vm.ErrNotFound) {
		// Owned by another live process, most likely: leave it all.
		return err
	}
	switch {
	case rec.Network == "" || rec.Network == "none":
	case rt.opts.Network != nil:
		// Also when no attachment was recorded: Attach may have got
		// half-way. Detaching what is not attached does nothing.
		if err := rt.opts.Network.Detach(ctx, rec.ID); err != nil {
			errs = append(errs, err)
		} else {
			rec.Network, rec.Attachment = "none", nil
		}
	case rec.Attachment != nil:
		errs = append(errs, fmt.Errorf("detach network %s: this runtime has no network manager", rec.Network))
	default:
		// Nothing on record was attached, and nothing here could detach
		// it; a Recover with a network manager cleans up what Attach may
		// have left.
	}
	if rec.Lease != "" {
		if err := rt.images.ReleaseLease(rec.Digest, rec.Lease); err != nil {
			errs = append(errs, fmt.Errorf("release image lease: %w", err))
		} else {
			rec.Lease = ""
		}
	}
	if rec.Scratch != "" {
		if err := os.Remove(rec.Scratch); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("remove scratch disk: %w", err))
		} else {
			rec.Scratch = ""
		}
	}
	if len(errs) > 0 {
		if err := rt.recs.save(lock, rec); err != nil {
			errs = append(errs, err)
		}
		return fmt.Errorf("instance %s: %w", rec.ID, errors.Join(errs...))
	}
	return rt.recs.remove(lock)
}
