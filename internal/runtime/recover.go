package runtime

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/fireactions/fireactions/internal/vm"
)

// RecoverOptions limit Recover.
type RecoverOptions struct {
	// Match selects, by their labels, the VMs this runtime takes over; nil
	// means all. VMs that do not match are left alone (a daemon recovers
	// its pools' VMs, not those a user started with `fireactions vm run
	// --detach`). Leftovers of creations that never finished are removed
	// whatever their labels: nothing can use them.
	Match func(labels map[string]string) bool
}

// Cleaned is an instance Recover found ended and removed.
type Cleaned struct {
	ID     string
	Labels map[string]string
	// Exit says how the VM ended, as far as it could be known; nil when no
	// VM had been started.
	Exit *vm.ExitStatus
}

// RecoverResult says what Recover did.
type RecoverResult struct {
	// Adopted instances were running; this runtime owns them now.
	Adopted []*Instance
	// Cleaned instances had ended (or never started); everything of
	// theirs was released.
	Cleaned []Cleaned
	// Skipped VMs are owned by another live process or could not be
	// handled.
	Skipped []vm.Skipped
}

// Recover runs once at start-up. It re-attaches every matching VM that
// still runs and no live process owns, and tears down every matching one
// that ended: VM files, network attachment, image lease, scratch disk,
// record. It also removes what crashed creations left (records without a
// VM, scratch disks without a record) and network attachments of VMs that
// no longer exist.
func (rt *Runtime) Recover(ctx context.Context, opts RecoverOptions) (RecoverResult, error) {
	var res RecoverResult
	var errs []error
	match := opts.Match
	if match == nil {
		match = func(map[string]string) bool { return true }
	}
	rt.sweepTemp()

	vres, err := rt.vms.Recover(ctx, vm.RecoverOptions{Match: func(st *vm.State) bool { return match(st.Labels) }})
	if err != nil {
		return res, err
	}
	res.Skipped = vres.Skipped
	for _, st := range vres.Adopted {
		res.Adopted = append(res.Adopted, rt.instance(st.ID, st))
	}
	for _, st := range vres.Cleaned {
		c := Cleaned{ID: st.ID, Labels: maps.Clone(st.Labels), Exit: st.Exit}
		if err := rt.teardownRecord(ctx, st.ID); err != nil {
			errs = append(errs, err)
		}
		res.Cleaned = append(res.Cleaned, c)
	}

	// Records without a VM: creations that died before the VM started
	// (or teardowns that died before the record went).
	ids, err := rt.recs.ids()
	if err != nil {
		return res, err
	}
	for _, id := range ids {
		if _, err := os.Stat(filepath.Join(rt.vms.Root(), id)); err == nil {
			continue
		}
		lock, rec, err := rt.recs.lock(id, false)
		if errors.Is(err, errBusy) || errors.Is(err, os.ErrNotExist) {
			continue
		}
		if lock == nil {
			errs = append(errs, err)
			continue
		}
		// Checked again under the lock: the VM may have appeared since.
		if _, err := os.Stat(filepath.Join(rt.vms.Root(), id)); err == nil {
			lock.release()
			continue
		}
		if rec == nil {
			rec = &record{ID: id, Scratch: rt.scratchPath(id), Network: "unknown"}
		}
		rt.log.Warn("removing the leftovers of an instance whose creation never finished", "vm", id)
		if err := rt.teardown(ctx, lock, rec); err != nil {
			errs = append(errs, err)
		}
		lock.release()
		res.Cleaned = append(res.Cleaned, Cleaned{ID: id, Labels: rec.Labels})
	}

	// Scratch disks of no instance. A creation writes its record before
	// its disk, so a disk without a record is garbage.
	if ents, err := os.ReadDir(filepath.Join(rt.opts.DataDir, "scratch")); err == nil {
		for _, e := range ents {
			id, ok := scratchID(e.Name())
			if !ok {
				continue
			}
			if _, err := os.Stat(rt.recs.path(id)); err == nil {
				continue
			}
			if _, err := os.Stat(filepath.Join(rt.vms.Root(), id)); err == nil {
				continue
			}
			rt.log.Warn("removing a scratch disk of no instance", "path", e.Name())
			os.Remove(filepath.Join(rt.opts.DataDir, "scratch", e.Name()))
		}
	}

	// Network attachments of VMs that no longer exist.
	if rt.opts.Network != nil {
		live, err := rt.recs.ids()
		if err != nil {
			errs = append(errs, err)
		} else {
			if ents, err := os.ReadDir(rt.vms.Root()); err == nil {
				for _, e := range ents {
					if e.IsDir() && !slices.Contains(live, e.Name()) {
						live = append(live, e.Name())
					}
				}
			}
			if _, err := rt.opts.Network.Cleanup(ctx, live); err != nil {
				errs = append(errs, fmt.Errorf("network clean-up: %w", err))
			}
		}
	}
	if len(res.Adopted)+len(res.Cleaned) > 0 {
		rt.log.Info("recovered instances", "adopted", len(res.Adopted), "cleaned", len(res.Cleaned), "skipped", len(res.Skipped))
	}
	return res, errors.Join(errs...)
}

// teardownRecord releases what the record of a VM the VM manager has just
// removed still holds.
func (rt *Runtime) teardownRecord(ctx context.Context, id string) error {
	lock, rec, err := rt.lockRecord(ctx, id)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if lock == nil {
		return fmt.Errorf("instance %s: %w", id, err)
	}
	defer lock.release()
	if rec == nil {
		rec = &record{ID: id, Scratch: rt.scratchPath(id), Network: "unknown"}
	}
	return rt.teardown(ctx, lock, rec)
}

// sweepTemp removes the temporary files of record writes that died
// half-way (their writer's lock is gone).
func (rt *Runtime) sweepTemp() {
	ents, err := os.ReadDir(rt.recs.dir)
	if err != nil {
		return
	}
	for _, e := range ents {
		if !strings.HasPrefix(e.Name(), ".new-") {
			continue
		}
		p := filepath.Join(rt.recs.dir, e.Name())
		f, err := os.Open(p)
		if err != nil {
			continue
		}
		if unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB) == nil {
			os.Remove(p)
		}
		f.Close()
	}
}
