package runtime

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"time"

	"github.com/fireactions/fireactions/internal/guest"
	"github.com/fireactions/fireactions/internal/metadata"
	"github.com/fireactions/fireactions/internal/network"
	"github.com/fireactions/fireactions/internal/vm"
)

// Instance is a handle on one microVM started (or re-attached) by this
// runtime. Wait, Stop and Signal need the VM to be owned by this process
// (Run, Recover and Attach make it so); Logs and Inspect work on any.
type Instance struct {
	rt  *Runtime
	id  string
	rec record
}

// ID returns the instance's id (also its VM's).
func (i *Instance) ID() string { return i.id }

// Labels returns the labels the instance was started with.
func (i *Instance) Labels() map[string]string { return maps.Clone(i.rec.Labels) }

// Image returns the image reference (or boot disk path) and the image's
// digest (empty for a boot disk).
func (i *Instance) Image() (ref, digest string) {
	if i.rec.BootDisk != "" {
		return i.rec.BootDisk, ""
	}
	return i.rec.Image, i.rec.Digest
}

// Mode returns the guest's mode.
func (i *Instance) Mode() guest.Mode { return i.rec.Mode }

// Network returns the VM's network attachment, nil without a network.
func (i *Instance) Network() *network.Attachment {
	if i.rec.Attachment == nil {
		return nil
	}
	a := *i.rec.Attachment
	return &a
}

// Wait blocks until the VM has exited and returns how it ended. For an app
// mode guest, ExitStatus.Code is the workload's exit code (128+N when
// signal N killed it) when WorkloadExited is set.
func (i *Instance) Wait(ctx context.Context) (vm.ExitStatus, error) {
	return i.rt.vms.Wait(ctx, i.id)
}

// Stop stops the VM within timeout (0: its StopTimeout): the workload's
// stop signal through the guest init, then the power button, SIGTERM and
// SIGKILL to the VMM. It returns how the VM ended. The VM's files remain
// until Remove.
func (i *Instance) Stop(ctx context.Context, timeout time.Duration) (vm.ExitStatus, error) {
	return i.rt.vms.Stop(ctx, i.id, timeout)
}

// Signal sends sig to the workload (app mode) through the guest init.
func (i *Instance) Signal(ctx context.Context, sig syscall.Signal) error {
	return i.rt.vms.Signal(ctx, i.id, int(sig))
}

// Logs copies the VM's output, decoded, to the writers in opts; with
// opts.Follow it keeps going until the VM exits. Output always starts at
// the beginning of the VM's life.
func (i *Instance) Logs(ctx context.Context, opts vm.LogOptions) error {
	return i.rt.vms.Logs(ctx, i.id, opts)
}

// Output streams the workload's stdout and stderr to the two writers until
// the VM exits. For a system-mode guest, everything on its console goes
// to stdout.
func (i *Instance) Output(ctx context.Context, stdout, stderr io.Writer) error {
	opts := vm.LogOptions{Follow: true, Stdout: stdout, Stderr: stderr}
	if i.rec.Mode == guest.ModeSystem {
		opts.Console = stdout
	}
	return i.Logs(ctx, opts)
}

// startPoll is how often WaitStarted looks at the VM's state. The VM
// manager records the guest's "started" report in memory as it reads the
// console; reading that is cheap.
const startPoll = 20 * time.Millisecond

// WaitStarted blocks until the guest init has started the workload (or
// handed over to the image's init) and returns the VM's state, whose
// GuestStartedAt minus StartedAt is the guest's boot time. It fails if the
// VM exits first. With events, it reports PhaseStarted.
func (i *Instance) WaitStarted(ctx context.Context, events func(Event)) (*vm.State, error) {
	t := time.NewTicker(startPoll)
	defer t.Stop()
	for {
		st, err := i.rt.vms.Inspect(i.id)
		if err != nil {
			return nil, err
		}
		if !st.GuestStartedAt.IsZero() {
			d := st.GuestStartedAt.Sub(st.StartedAt)
			emitter{id: i.id, f: events}.send(Event{Phase: PhaseStarted, Done: true, Duration: d, At: st.GuestStartedAt,
				Message: fmt.Sprintf("guest booted in %s", d.Round(time.Millisecond))})
			return st, nil
		}
		if st.Status == vm.StatusExited {
			if st.Exit != nil {
				return st, fmt.Errorf("vm %s ended before its workload started: %s", i.id, st.Exit)
			}
			return st, fmt.Errorf("vm %s ended before its workload started", i.id)
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-t.C:
		}
	}
}

// UpdateMetadata replaces the VM's metadata document (InstanceID and
// Hostname default to the instance's); the guest's next request sees it.
func (i *Instance) UpdateMetadata(ctx context.Context, in metadata.Input) error {
	if in.InstanceID == "" {
		in.InstanceID = i.id
	}
	if in.Hostname == "" {
		in.Hostname = i.rec.Hostname
	}
	if in.Hostname == "" {
		in.Hostname = hostnameFor(i.id)
	}
	doc, err := metadata.New(in)
	if err != nil {
		return err
	}
	b, err := doc.JSON()
	if err != nil {
		return err
	}
	return i.rt.vms.UpdateMetadata(ctx, i.id, b)
}

// Inspect returns what is known about the instance now.
func (i *Instance) Inspect() (Info, error) { return i.rt.Inspect(i.id) }

// Remove stops the VM at once if it still runs and releases everything it
// holds: VM files, network, image lease, scratch disk, record.
func (i *Instance) Remove(ctx context.Context) error { return i.rt.Remove(ctx, i.id) }

// State is an instance's state in Info.
type State string

const (
	// StateCreating: Run is still preparing the VM (pull, disk, network).
	StateCreating State = "creating"
	StateStarting State = "starting"
	StateRunning  State = "running"
	StateStopping State = "stopping"
	// StateExited: the VM has ended; Exit says how when it was recorded.
	StateExited State = "exited"
	// StateDead: a record of an instance whose creation never finished
	// and whose creator is gone; Recover removes it.
	StateDead State = "dead"
)

// Info describes an instance for listings.
type Info struct {
	ID       string              `json:"id"`
	Image    string              `json:"image,omitempty"`
	Digest   string              `json:"digest,omitempty"`
	BootDisk string              `json:"boot_disk,omitempty"`
	Mode     guest.Mode          `json:"mode,omitempty"`
	Backend  string              `json:"backend,omitempty"`
	State    State               `json:"state"`
	Pid      int                 `json:"pid,omitempty"`
	Labels   map[string]string   `json:"labels,omitempty"`
	Network  *network.Attachment `json:"network,omitempty"`
	Created  time.Time           `json:"created"`
	Exit     *vm.ExitStatus      `json:"exit,omitempty"`
	// VM is the VM manager's record, nil while creating.
	VM *vm.State `json:"vm,omitempty"`
}

// Inspect describes instance id, whether this process owns it or not.
func (rt *Runtime) Inspect(id string) (Info, error) {
	if err := CheckID(id); err != nil {
		return Info{}, fmt.Errorf("%w: %v", ErrNotFound, err)
	}
	rec, recErr := rt.recs.load(id)
	st, vmErr := rt.vms.Inspect(id)
	if recErr != nil && vmErr != nil {
		if errors.Is(recErr, os.ErrNotExist) && errors.Is(vmErr, vm.ErrNotFound) {
			return Info{}, fmt.Errorf("instance %s: %w", id, ErrNotFound)
		}
		return Info{}, fmt.Errorf("instance %s: %w", id, errors.Join(recErr, vmErr))
	}
	return rt.info(id, rec, st), nil
}

func (rt *Runtime) info(id string, rec *record, st *vm.State) Info {
	in := Info{ID: id}
	if rec != nil {
		in.Image, in.Digest, in.BootDisk, in.Mode = rec.Image, rec.Digest, rec.BootDisk, rec.Mode
		in.Backend, in.Labels, in.Network, in.Created = rec.Backend, rec.Labels, rec.Attachment, rec.CreatedAt
	}
	if st == nil {
		in.State = StateDead
		if rec != nil && rt.recs.busy(id) {
			in.State = StateCreating
		}
		return in
	}
	in.VM = st
	in.Backend, in.Pid, in.Exit = st.Backend, st.Pid, st.Exit
	if rec == nil {
		in.Labels, in.Created = st.Labels, st.CreatedAt
	}
	switch st.Status {
	case vm.StatusExited:
		in.State = StateExited
	case vm.StatusStarting:
		in.State = StateStarting
	case vm.StatusStopping:
		in.State = StateStopping
	default:
		in.State = StateRunning
	}
	if st.Status != vm.StatusExited && st.Pid > 0 {
		// Nobody may be watching this VM (a detached one, or its owner
		// died): ask the kernel whether the VMM still runs.
		if p, err := vm.AttachProcess(st.Pid, st.PidStartTime, st.Dir); err != nil {
			in.State = StateExited
		} else {
			p.Release()
		}
	}
	return in
}

// List describes every instance in the data directory, oldest first:
// those on record and VMs started outside the runtime.
func (rt *Runtime) List() ([]Info, error) {
	ids, err := rt.recs.ids()
	if err != nil {
		return nil, err
	}
	states, err := rt.vms.List()
	if err != nil {
		return nil, err
	}
	byID := map[string]*vm.State{}
	for _, st := range states {
		byID[st.ID] = st
		if !slices.Contains(ids, st.ID) {
			ids = append(ids, st.ID)
		}
	}
	var out []Info
	for _, id := range ids {
		rec, err := rt.recs.load(id)
		if err != nil {
			rec = nil
		}
		st := byID[id]
		if rec == nil && st == nil {
			continue
		}
		out = append(out, rt.info(id, rec, st))
	}
	slices.SortFunc(out, func(a, b Info) int { return a.Created.Compare(b.Created) })
	return out, nil
}

// busy reports whether another process holds the record's lock.
func (r records) busy(id string) bool {
	l, _, err := r.lock(id, false)
	l.release()
	return errors.Is(err, errBusy)
}

// Attach takes ownership of instance id (a VM no live process owns, e.g.
// after the process that started it died) so that it can be waited for,
// stopped or signalled from here. A VM that is no longer running gets its
// exit recorded and stays until Remove.
func (rt *Runtime) Attach(ctx context.Context, id string) (*Instance, error) {
	if err := CheckID(id); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNotFound, err)
	}
	st, err := rt.vms.Adopt(ctx, id)
	if errors.Is(err, vm.ErrNotFound) {
		return nil, fmt.Errorf("instance %s: %w", id, ErrNotFound)
	}
	if err != nil {
		return nil, err
	}
	return rt.instance(id, st), nil
}

// instance makes a handle from the record, or from the VM's state when the
// VM was started outside the runtime.
func (rt *Runtime) instance(id string, st *vm.State) *Instance {
	i := &Instance{rt: rt, id: id}
	if rec, err := rt.recs.load(id); err == nil {
		i.rec = *rec
	} else if st != nil {
		i.rec = record{ID: id, Backend: st.Backend, Labels: st.Labels, CreatedAt: st.CreatedAt, Network: "none"}
	}
	return i
}

// Remove stops instance id at once if it still runs and releases
// everything it holds. It fails, changing nothing, when another live
// process owns the VM.
func (rt *Runtime) Remove(ctx context.Context, id string) error {
	if err := CheckID(id); err != nil {
		return fmt.Errorf("%w: %v", ErrNotFound, err)
	}
	lock, rec, err := rt.lockRecord(ctx, id)
	switch {
	case errors.Is(err, os.ErrNotExist):
		// Not on record: a VM started outside the runtime, or nothing.
		if err := rt.vms.Remove(ctx, id); err != nil {
			if errors.Is(err, vm.ErrNotFound) {
				return fmt.Errorf("instance %s: %w", id, ErrNotFound)
			}
			return err
		}
		return nil
	case err != nil && lock == nil:
		return fmt.Errorf("remove %s: %w", id, err)
	}
	defer lock.release()
	if rec == nil {
		// Unreadable record: remove what can be found by id.
		rt.log.Warn("unreadable instance record; removing by id", "vm", id, "err", err)
		rec = &record{ID: id, Scratch: rt.scratchPath(id), Network: "unknown"}
	}
	return rt.teardown(ctx, lock, rec)
}

// lockWait bounds how long Remove waits for another process that holds an
// instance's record (it is creating or removing the instance).
const lockWait = 5 * time.Second

func (rt *Runtime) lockRecord(ctx context.Context, id string) (*recordLock, *record, error) {
	deadline := time.Now().Add(lockWait)
	for {
		l, rec, err := rt.recs.lock(id, false)
		if !errors.Is(err, errBusy) || time.Now().After(deadline) {
			return l, rec, err
		}
		select {
		case <-ctx.Done():
			return nil, nil, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// scratchID returns the instance id of a scratch disk file name.
func scratchID(name string) (string, bool) {
	if filepath.Ext(name) != ".ext4" {
		return "", false
	}
	id := name[:len(name)-len(".ext4")]
	return id, idPattern.MatchString(id)
}
