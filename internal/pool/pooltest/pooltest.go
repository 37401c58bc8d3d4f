// Package pooltest is a fake VM runtime for tests and benchmarks of the
// runner pools and what sits on them (API, CLI): each VM is a goroutine
// that plays the guest agent and the actions runner against a fake GitHub
// (internal/github/githubtest). It reads the JIT configuration the pool
// sent, connects the runner and reports idle; tests then drive jobs
// through the fake GitHub and the VM's Report and Finish methods.
package pooltest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/fireactions/fireactions/internal/agent"
	"github.com/fireactions/fireactions/internal/github/githubtest"
	"github.com/fireactions/fireactions/internal/pool"
)

// Runtime is a fake pool.Runtime.
type Runtime struct {
	gh *githubtest.Server

	mu       sync.Mutex
	vms      map[string]*VM
	startErr error
	hang     bool
	started  int
	// OnStart, when set, is called with each VM's id right after Start
	// decided to start it (benchmarks time start requests with it).
	OnStart func(id string)
}

// NewRuntime returns a fake runtime whose VMs talk to gh. gh may be nil:
// VMs then report idle without connecting a runner.
func NewRuntime(gh *githubtest.Server) *Runtime {
	return &Runtime{gh: gh, vms: map[string]*VM{}}
}

// SetStartError makes Start fail with err (nil: succeed again).
func (rt *Runtime) SetStartError(err error) {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	rt.startErr = err
}

// SetHang makes new VMs never report idle.
func (rt *Runtime) SetHang(hang bool) {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	rt.hang = hang
}

// Started counts Start calls.
func (rt *Runtime) Started() int {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	return rt.started
}

// Start implements pool.Runtime.
func (rt *Runtime) Start(ctx context.Context, spec pool.VMSpec) (pool.Machine, error) {
	rt.mu.Lock()
	rt.started++
	if rt.startErr != nil {
		err := rt.startErr
		rt.mu.Unlock()
		return nil, err
	}
	if spec.JITConfig == "" || spec.Labels[pool.LabelPool] == "" {
		rt.mu.Unlock()
		return nil, errors.New("pooltest: spec without JIT config or pool label")
	}
	vm := &VM{rt: rt, id: spec.ID, spec: spec, changed: make(chan struct{}), done: make(chan struct{})}
	rt.vms[spec.ID] = vm
	hang, hook := rt.hang, rt.OnStart
	rt.mu.Unlock()
	if hook != nil {
		hook(spec.ID)
	}
	go vm.boot(hang)
	return vm, nil
}

// Recover implements pool.Runtime: it returns the live VMs and forgets
// the ended ones, as the real runtime cleans them up.
func (rt *Runtime) Recover(ctx context.Context) ([]pool.Machine, error) {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	var out []pool.Machine
	for id, vm := range rt.vms {
		if vm.Exited() {
			delete(rt.vms, id)
			continue
		}
		out = append(out, vm)
	}
	return out, nil
}

// Live returns the VMs that have not ended.
func (rt *Runtime) Live() []*VM {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	var out []*VM
	for _, vm := range rt.vms {
		if !vm.Exited() {
			out = append(out, vm)
		}
	}
	return out
}

// VM returns a VM that was not removed, or nil.
func (rt *Runtime) VM(id string) *VM {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	return rt.vms[id]
}

// VM is one fake runner VM.
type VM struct {
	rt   *Runtime
	id   string
	spec pool.VMSpec

	mu      sync.Mutex
	changed chan struct{}
	stdout  []byte
	console []byte
	exited  bool
	exit    pool.Exit
	done    chan struct{}
}

func (vm *VM) boot(hang bool) {
	vm.Report(agent.StateStarting)
	vm.Print("fake runner: starting\n")
	if hang {
		return
	}
	if vm.rt.gh != nil {
		jr, err := githubtest.DecodeJITConfig(vm.spec.JITConfig.Reveal())
		if err != nil || jr.Name != vm.id {
			vm.Finish(pool.Exit{Reason: "workload-exit", Code: 1, Message: fmt.Sprintf("bad JIT config: %v", err)})
			return
		}
		if err := vm.rt.gh.ConnectRunner(jr.Name); err != nil {
			vm.Finish(pool.Exit{Reason: "workload-exit", Code: 1, Message: err.Error()})
			return
		}
	}
	vm.Print("fake runner: Listening for Jobs\n")
	vm.Report(agent.StateIdle)
}

// Spec is what the pool asked for.
func (vm *VM) Spec() pool.VMSpec { return vm.spec }

// Report writes an agent report to the VM's stdout.
func (vm *VM) Report(s agent.State) {
	vm.write(&vm.stdout, agent.Report{State: s, Runner: vm.id, Time: time.Now()}.Line())
}

// Print writes runner output to the VM's console.
func (vm *VM) Print(s string) { vm.write(&vm.console, []byte(s)) }

func (vm *VM) write(dst *[]byte, b []byte) {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if vm.exited {
		return
	}
	*dst = append(*dst, b...)
	close(vm.changed)
	vm.changed = make(chan struct{})
}

// Finish ends the VM as if the guest powered off, crashed or was stopped.
func (vm *VM) Finish(ex pool.Exit) {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if vm.exited {
		return
	}
	vm.exited, vm.exit = true, ex
	close(vm.changed)
	vm.changed = make(chan struct{})
	close(vm.done)
}

// Exited reports whether the VM has ended.
func (vm *VM) Exited() bool {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	return vm.exited
}

// ExitStatus is how the VM ended.
func (vm *VM) ExitStatus() pool.Exit {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	return vm.exit
}

// ID implements pool.Machine.
func (vm *VM) ID() string { return vm.id }

// Labels implements pool.Machine.
func (vm *VM) Labels() map[string]string { return vm.spec.Labels }

// FollowStdout implements pool.Machine.
func (vm *VM) FollowStdout(ctx context.Context, w io.Writer) error {
	return vm.follow(ctx, true, func() []byte { return vm.stdout }, w)
}

// Logs implements pool.Machine: the console.
func (vm *VM) Logs(ctx context.Context, follow bool, w io.Writer) error {
	return vm.follow(ctx, follow, func() []byte { return vm.console }, w)
}

func (vm *VM) follow(ctx context.Context, follow bool, buf func() []byte, w io.Writer) error {
	off := 0
	for {
		vm.mu.Lock()
		chunk := bytes.Clone(buf()[off:])
		off += len(chunk)
		exited, ch := vm.exited, vm.changed
		vm.mu.Unlock()
		if len(chunk) > 0 {
			if _, err := w.Write(chunk); err != nil {
				return err
			}
		}
		if exited || !follow {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// Wait implements pool.Machine.
func (vm *VM) Wait(ctx context.Context) (pool.Exit, error) {
	select {
	case <-vm.done:
		return vm.ExitStatus(), nil
	case <-ctx.Done():
		return pool.Exit{}, ctx.Err()
	}
}

// Stop implements pool.Machine.
func (vm *VM) Stop(ctx context.Context, grace time.Duration) error {
	vm.Finish(pool.Exit{Reason: "stopped", Code: 143})
	return nil
}

// Remove implements pool.Machine.
func (vm *VM) Remove(ctx context.Context) error {
	vm.Finish(pool.Exit{Reason: "stopped", Code: 137})
	vm.rt.mu.Lock()
	defer vm.rt.mu.Unlock()
	delete(vm.rt.vms, vm.id)
	return nil
}
