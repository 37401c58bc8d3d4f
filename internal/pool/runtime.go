package pool

import (
	"context"
	"io"
	"time"

	"github.com/fireactions/fireactions/internal/config"
	"github.com/fireactions/fireactions/internal/github"
	"github.com/fireactions/fireactions/internal/metadata"
)

// Labels every runner VM carries, so that a restarted daemon knows whose
// VM it found.
const (
	LabelPool     = "fireactions.pool"
	LabelRunner   = "fireactions.runner"
	LabelRunnerID = "fireactions.runner-id"
)

// Runtime starts runner VMs and finds them again after a restart.
type Runtime interface {
	// Start boots a VM. ctx bounds the start-up only: the VM lives on
	// until stopped. On error nothing of the VM is left behind, and the
	// error carries the VMM's own words.
	Start(ctx context.Context, spec VMSpec) (Machine, error)
	// Recover re-attaches to the live VMs that carry LabelPool and cleans
	// up dead ones (processes, network, disks) completely.
	Recover(ctx context.Context) ([]Machine, error)
}

// Machine is one running runner VM.
type Machine interface {
	ID() string
	Labels() map[string]string
	// FollowStdout copies the VM's stdout stream, from its beginning, to
	// w until the VM has ended and the stream is drained, or ctx ends.
	// The agent's reports travel there.
	FollowStdout(ctx context.Context, w io.Writer) error
	// Logs copies what the VM printed (console, runner output) to w; with
	// follow it keeps going until the VM ends or ctx ends.
	Logs(ctx context.Context, follow bool, w io.Writer) error
	// Wait blocks until the VM has ended.
	Wait(ctx context.Context) (Exit, error)
	// Stop asks the guest to stop and escalates until the VM has ended
	// within grace.
	Stop(ctx context.Context, grace time.Duration) error
	// Remove tears down what is left of an ended VM (disks, network,
	// state); on a running VM it kills it first.
	Remove(ctx context.Context) error
}

// Exit is how a VM ended.
type Exit struct {
	// Reason is the runtime's classification (stopped, timeout,
	// workload-exit, guest-error, vmm-crash, guest-shutdown).
	Reason string `json:"reason"`
	// Code is the workload's exit code when it reported one.
	Code int `json:"code"`
	// Message is the guest's or the VMM's error text, if any.
	Message string `json:"message,omitempty"`
}

// VMSpec is what the pool asks the runtime to start for one runner.
type VMSpec struct {
	// ID names the VM; it is also the runner's name and the host name.
	ID string
	// Pool is the pool's name.
	Pool  string
	Image string
	Pull  config.PullPolicy
	// VM is the pool's VM shape (mode, backend, resources, kernel).
	VM config.VM
	// Network is the CNI network name.
	Network string
	// Labels identify the VM as this pool's runner (LabelPool, …).
	Labels map[string]string
	// Metadata is the VM's metadata input: instance id, host name, runner
	// id, pool, the pool's metadata and user-data, the registry cache.
	Metadata metadata.Input
	// JITConfig is the runner's single-use configuration. It is a secret:
	// the runtime must put it into the VM's metadata at
	// agent.KeyJITConfig and nowhere else (not in logs, labels or the
	// kernel command line).
	JITConfig config.Secret
	// Args is the process the guest runs in app mode: the agent.
	Args []string
	// KernelArgs are added to the pool's kernel command line.
	KernelArgs string
}

// GitHub is what the pool needs from GitHub; *github.Client satisfies it.
type GitHub interface {
	GenerateJITConfig(ctx context.Context, scope github.Scope, name string, labels []string, groupID int64) (github.JITConfig, error)
	DeleteRunner(ctx context.Context, scope github.Scope, id int64) error
	RunnerByName(ctx context.Context, scope github.Scope, name string) (github.Runner, error)
	EnsureScaleSet(ctx context.Context, scope github.Scope, spec github.ScaleSetSpec) (*github.ScaleSet, error)
}

// Observer receives the events metrics are made of. Every method must be
// cheap and must not block.
type Observer interface {
	RunnerCreated(pool string)
	RunnerFailed(pool, reason, message string)
	BootToIdle(pool string, d time.Duration)
	JobDuration(pool string, d time.Duration)
}

type nopObserver struct{}

func (nopObserver) RunnerCreated(string)                {}
func (nopObserver) RunnerFailed(string, string, string) {}
func (nopObserver) BootToIdle(string, time.Duration)    {}
func (nopObserver) JobDuration(string, time.Duration)   {}
