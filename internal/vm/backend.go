package vm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"strings"

	"github.com/fireactions/fireactions/internal/guest"
)

// Backend boots microVMs with one VMM (Firecracker, QEMU). The manager owns
// everything generic (state, identity checks, stop escalation, exit
// classification); a backend only translates a Spec into a running VMM and
// reconnects to one.
type Backend interface {
	// Name is the backend's name in configs and state files.
	Name() string
	// Available reports why the backend cannot run VMs on this host, or nil.
	Available() error
	// GuestDevices says how the guest finds the devices Start will attach:
	// one guest.Drive per spec drive, in order, and the interfaces,
	// including any the backend adds to serve the metadata service.
	GuestDevices(spec *Spec) (GuestDevices, error)
	// Start launches the VMM for spec. ctx bounds start-up only: the VMM
	// must outlive ctx and this process (own session, no parent-death
	// signal) until it is stopped or exits. Start returns once the VMM is
	// ready to be controlled; on error nothing of the VMM remains running.
	// The VMM's command line must name the VM directory (layout.Dir), or
	// the handle must implement ProcessMarker.
	Start(ctx context.Context, spec *Spec, layout Layout) (Handle, error)
	// Attach reconnects to a running VMM from its persisted state. proc
	// is the VMM process, already identified by the manager.
	Attach(ctx context.Context, st *State, proc *Process) (Handle, error)
	// Cleanup removes what the backend created outside the VM directory
	// (jailer chroots, cgroups...). The VMM is no longer running.
	Cleanup(st *State) error
}

// Handle controls one running VMM.
type Handle interface {
	// Process is the VMM process.
	Process() *Process
	// Persist returns the backend's data for the state file, handed back
	// to Attach.
	Persist() json.RawMessage
	// Shutdown presses the virtual power button or Ctrl-Alt-Del: a request
	// the guest OS may honour.
	Shutdown(ctx context.Context) error
	// ConsoleInput returns a writer to the guest's serial console input,
	// valid until Close.
	ConsoleInput(ctx context.Context) (io.Writer, error)
	// UpdateMetadata replaces the metadata document the guest is served
	// (Firecracker: PUT /mmds).
	UpdateMetadata(ctx context.Context, doc []byte) error
	// GuestShutdown reports whether the VMM told us that the guest itself
	// powered off or reset (as opposed to the VMM being killed).
	GuestShutdown() bool
	// Details are backend facts for Inspect, e.g. "accelerator": "tcg".
	Details() map[string]string
	// Close releases connections; the VMM keeps running.
	Close() error
}

// ProcessMarker is implemented by handles whose VMM command line does not
// name the VM directory (a jailed Firecracker sees only its chroot). The
// marker must be a string unique to the VM in that command line; with the
// pid and the process start time it identifies the VMM after a restart.
type ProcessMarker interface {
	ProcessMarker() string
}

// GuestDevices is the guest-side view of a VM's devices.
type GuestDevices struct {
	Drives     []guest.Drive
	Interfaces []guest.Interface
}

// Layout holds the paths of a VM's files. Everything lives in Dir unless
// the spec placed a log elsewhere.
type Layout struct {
	Dir        string
	ConsoleLog string
	VMMLog     string
	// Metadata is the MMDS document, written before Start when the spec
	// has one.
	Metadata string
	// Initrd is the per-VM initramfs when the spec has a guest config.
	Initrd string
}

func newLayout(dir string, spec *Spec) Layout {
	l := Layout{
		Dir:        dir,
		ConsoleLog: filepath.Join(dir, "console.log"),
		VMMLog:     filepath.Join(dir, "vmm.log"),
	}
	if spec.ConsoleLog != "" {
		l.ConsoleLog = spec.ConsoleLog
	}
	if spec.VMMLog != "" {
		l.VMMLog = spec.VMMLog
	}
	if len(spec.Metadata) > 0 {
		l.Metadata = filepath.Join(dir, "metadata.json")
	}
	if spec.Guest != nil {
		l.Initrd = filepath.Join(dir, "initrd")
	}
	return l
}

// Path returns name inside the VM directory.
func (l Layout) Path(name string) string { return filepath.Join(l.Dir, name) }

// Describer is implemented by backends that can say more about how they
// will run, e.g. "qemu (TCG: no /dev/kvm)".
type Describer interface {
	Describe() string
}

// SelectBackend picks a backend by name. "auto" (or "") takes the first of
// candidates, in order of preference, that is available. The returned
// reason says which was picked and why, e.g.
// "firecracker: no /dev/kvm; using qemu (TCG: no /dev/kvm)".
func SelectBackend(name string, candidates ...Backend) (Backend, string, error) {
	describe := func(b Backend) string {
		if d, ok := b.(Describer); ok {
			return d.Describe()
		}
		return b.Name()
	}
	if name == "" || name == "auto" {
		var skipped []string
		for _, b := range candidates {
			if err := b.Available(); err != nil {
				skipped = append(skipped, fmt.Sprintf("%s: %v", b.Name(), err))
				continue
			}
			reason := "using " + describe(b)
			if len(skipped) > 0 {
				reason = strings.Join(skipped, "; ") + "; " + reason
			}
			return b, reason, nil
		}
		if len(skipped) == 0 {
			return nil, "", errors.New("no VM backend is built in")
		}
		return nil, "", fmt.Errorf("no usable VM backend: %s", strings.Join(skipped, "; "))
	}
	var names []string
	for _, b := range candidates {
		names = append(names, b.Name())
		if b.Name() != name {
			continue
		}
		if err := b.Available(); err != nil {
			return nil, "", fmt.Errorf("backend %s is not usable here: %w", name, err)
		}
		return b, "using " + describe(b) + " (asked for by name)", nil
	}
	return nil, "", fmt.Errorf("backend %q: unknown; use auto or one of %s", name, strings.Join(names, ", "))
}
