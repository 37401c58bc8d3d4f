// Package runnervm starts the runner pools' VMs through internal/runtime:
// it turns a pool.VMSpec into a runtime.Request (the pool's image, mode,
// resources, network and metadata, the guest agent, and the JIT
// configuration in the agent's environment) and adapts runtime instances
// to pool.Machine.
package runnervm

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"strings"
	"time"

	"github.com/fireactions/fireactions/internal/agent"
	"github.com/fireactions/fireactions/internal/config"
	"github.com/fireactions/fireactions/internal/guest"
	"github.com/fireactions/fireactions/internal/image"
	"github.com/fireactions/fireactions/internal/initramfs"
	"github.com/fireactions/fireactions/internal/pool"
	"github.com/fireactions/fireactions/internal/runtime"
	"github.com/fireactions/fireactions/internal/vm"
)

// Options configure the adapter.
type Options struct {
	Runtime *runtime.Runtime
	// NoNetwork starts VMs without a network interface (tests; the
	// metadata service still works).
	NoNetwork bool
	// Insecure allows plain-HTTP registries for the pools' images.
	Insecure bool
	// Pulled, when set, is told how long each image pull took and whether
	// the image was cached (metrics).
	Pulled func(outcome string, d time.Duration)
	Logger *slog.Logger
}

// Runtime is a pool.Runtime over internal/runtime.
type Runtime struct {
	o   Options
	log *slog.Logger
}

// New returns the adapter.
func New(o Options) (*Runtime, error) {
	if o.Runtime == nil {
		return nil, errors.New("runnervm: Runtime is required")
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	return &Runtime{o: o, log: o.Logger.With("component", "runnervm")}, nil
}

// Request builds the runtime request for a runner VM.
func (r *Runtime) Request(spec pool.VMSpec) runtime.Request {
	v := spec.VM
	req := runtime.Request{
		ID:    spec.ID,
		Image: spec.Image,
		Pull:  image.PullOptions{Policy: spec.Pull, Insecure: r.o.Insecure},
		Mode:  guest.Mode(v.Mode),
		// The JIT configuration reaches the agent through its environment
		// (app mode) or a root-only file the init writes from it (system
		// mode); never through the metadata service.
		Env:           []string{agent.EnvJITConfig + "=" + spec.JITConfig.Reveal()},
		Kernel:        v.Kernel,
		KernelModules: v.KernelModules,
		KernelArgs:    strings.TrimSpace(v.KernelArgs + " " + spec.KernelArgs),
		VCPUs:         v.VCPUs,
		MemoryMiB:     v.MemoryMiB,
		SMT:           v.SMT,
		CPUTemplate:   v.CPUTemplate,
		DiskSize:      int64(v.DiskSize),
		Hostname:      spec.ID,
		Metadata:      spec.Metadata,
		Labels:        spec.Labels,
		Backend:       string(v.Backend),
	}
	if v.Mode == config.VMModeApp {
		// The agent is the workload, as root: it runs the runner as its
		// unprivileged user itself.
		req.Entrypoint = spec.Args
		req.Args = []string{}
		req.User = "0"
		req.WorkingDir = "/"
	} else {
		// The image's Docker needs these and cannot load them itself.
		req.Modules = initramfs.DockerModules
	}
	if !r.o.NoNetwork {
		req.Network = runtime.Network{UseCNI: true, CNI: spec.Network}
	}
	if r.o.Pulled != nil {
		req.Events = func(e runtime.Event) {
			if e.Phase != runtime.PhasePull || !e.Done {
				return
			}
			outcome := "pulled"
			switch {
			case e.Err != nil:
				outcome = "error"
			case e.Cached:
				outcome = "cached"
			}
			r.o.Pulled(outcome, e.Duration)
		}
	}
	return req
}

// Start implements pool.Runtime.
func (r *Runtime) Start(ctx context.Context, spec pool.VMSpec) (pool.Machine, error) {
	inst, err := r.o.Runtime.Run(ctx, r.Request(spec))
	if err != nil {
		return nil, err
	}
	return &machine{inst: inst}, nil
}

// Recover implements pool.Runtime: it re-attaches the runner VMs that still
// run and lets the runtime tear down the ended ones.
func (r *Runtime) Recover(ctx context.Context) ([]pool.Machine, error) {
	res, err := r.o.Runtime.Recover(ctx, runtime.RecoverOptions{Match: func(l map[string]string) bool { return l[pool.LabelPool] != "" }})
	for _, c := range res.Cleaned {
		r.log.Info("cleaned up an ended runner VM", "vm", c.ID, "pool", c.Labels[pool.LabelPool])
	}
	for _, s := range res.Skipped {
		r.log.Warn("runner VM skipped by recovery", "vm", s.ID, "why", s.Reason)
	}
	out := make([]pool.Machine, 0, len(res.Adopted))
	for _, inst := range res.Adopted {
		out = append(out, &machine{inst: inst})
	}
	return out, err
}

// Instance returns the runtime instance behind a machine (tests signal
// the guest through it).
func Instance(m pool.Machine) *runtime.Instance {
	if mc, ok := m.(*machine); ok {
		return mc.inst
	}
	return nil
}

type machine struct {
	inst *runtime.Instance
}

func (m *machine) ID() string                { return m.inst.ID() }
func (m *machine) Labels() map[string]string { return m.inst.Labels() }

// FollowStdout reads only authenticated stdout frames: console noise (a
// system-mode guest's boot messages, anything a process writes to the
// console) never reaches the report parser.
func (m *machine) FollowStdout(ctx context.Context, w io.Writer) error {
	return m.inst.Logs(ctx, vm.LogOptions{Follow: true, Stdout: w})
}

func (m *machine) Logs(ctx context.Context, follow bool, w io.Writer) error {
	return m.inst.Logs(ctx, vm.LogOptions{Follow: follow, Stdout: w, Stderr: w, Console: w})
}

func (m *machine) Wait(ctx context.Context) (pool.Exit, error) {
	es, err := m.inst.Wait(ctx)
	if err != nil {
		return pool.Exit{}, err
	}
	return pool.Exit{Reason: string(es.Reason), Code: es.Code, Message: es.Message}, nil
}

func (m *machine) Stop(ctx context.Context, grace time.Duration) error {
	_, err := m.inst.Stop(ctx, grace)
	return err
}

func (m *machine) Remove(ctx context.Context) error { return m.inst.Remove(ctx) }
