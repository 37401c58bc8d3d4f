package vm

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"golang.org/x/sys/unix"
)

// stateVersion is bumped when State changes incompatibly.
const stateVersion = 1

// Status is where a VM is in its life.
type Status string

const (
	StatusStarting Status = "starting"
	StatusRunning  Status = "running"
	StatusStopping Status = "stopping"
	StatusExited   Status = "exited"
)

// Reason says why a VM ended.
type Reason string

const (
	// ReasonWorkloadExit: the guest init reported its workload's exit
	// status (Code, Signal).
	ReasonWorkloadExit Reason = "workload-exit"
	// ReasonGuestShutdown: the guest powered off or rebooted by itself.
	ReasonGuestShutdown Reason = "guest-shutdown"
	// ReasonGuestError: the guest init failed before or instead of running
	// the workload; Message has its error.
	ReasonGuestError Reason = "guest-error"
	// ReasonVMMCrash: the VMM died without a guest shutdown (killed, crashed
	// or failed).
	ReasonVMMCrash Reason = "vmm-crash"
	// ReasonTimeout: the VM outlived Spec.Timeout and was stopped.
	ReasonTimeout Reason = "timeout"
	// ReasonStopped: Stop was called.
	ReasonStopped Reason = "stopped"
)

// ExitStatus is how a VM ended.
type ExitStatus struct {
	Reason Reason `json:"reason"`
	// WorkloadExited is true when the guest reported the workload's end;
	// Code and Signal are only meaningful then.
	WorkloadExited bool `json:"workload_exited,omitempty"`
	Code           int  `json:"code"`
	Signal         int  `json:"signal,omitempty"`
	// Message explains the reason: the VMM's error text, the guest init's
	// error, a kernel panic line.
	Message string      `json:"message,omitempty"`
	VMM     ProcessExit `json:"vmm"`
	At      time.Time   `json:"at"`
}

func (e ExitStatus) String() string {
	s := string(e.Reason)
	if e.WorkloadExited {
		if e.Signal != 0 {
			s += fmt.Sprintf(" (workload killed by signal %d)", e.Signal)
		} else {
			s += fmt.Sprintf(" (workload exit code %d)", e.Code)
		}
	}
	if e.Message != "" {
		s += ": " + e.Message
	}
	return s
}

// StopStep is one action of the stop escalation.
type StopStep struct {
	Action string    `json:"action"` // guest-stop, shutdown, sigterm, sigkill
	At     time.Time `json:"at"`
	Error  string    `json:"error,omitempty"`
}

// StopRecord is the history of a stop.
type StopRecord struct {
	Reason      Reason     `json:"reason"` // stopped or timeout
	RequestedAt time.Time  `json:"requested_at"`
	Deadline    time.Time  `json:"deadline"`
	Steps       []StopStep `json:"steps,omitempty"`
}

// NIC is an interface as the guest sees it, for Inspect.
type NIC struct {
	TapName string `json:"tap_name,omitempty"` // empty for backend-made NICs
	MAC     string `json:"mac"`
	Address string `json:"address,omitempty"`
	Gateway string `json:"gateway,omitempty"`
	MMDS    bool   `json:"mmds,omitempty"`
}

// State is the persisted record of one VM: state.json in its directory.
// It holds what a restarted manager needs to find, verify, re-attach to or
// clean up the VM.
type State struct {
	Version int               `json:"version"`
	ID      string            `json:"id"`
	Backend string            `json:"backend"`
	Labels  map[string]string `json:"labels,omitempty"`
	Status  Status            `json:"status"`

	Pid          int    `json:"pid,omitempty"`
	PidStartTime uint64 `json:"pid_start_time,omitempty"`
	// ProcessMarker is a string the VMM's command line contains; empty
	// means Dir (see ProcessMarker).
	ProcessMarker string `json:"process_marker,omitempty"`
	// OwnerPid is the fireactions process that owns the VM. Inspect and
	// List report it only while that process holds the VM's lock, so a
	// non-zero value means a live owner.
	OwnerPid int `json:"owner_pid,omitempty"`

	Dir        string `json:"dir"`
	ConsoleLog string `json:"console_log"`
	VMMLog     string `json:"vmm_log"`
	// Owned are files outside Dir that belong to the VM (scratch disks,
	// logs placed elsewhere): deleted with it.
	Owned []string `json:"owned,omitempty"`
	// ConsoleKey authenticates the guest's console frames (hex in JSON).
	ConsoleKey []byte `json:"console_key,omitempty"`
	// HostFrames counts the frames sent to the guest so far: the next
	// frame's sequence number must be higher.
	HostFrames uint64 `json:"host_frames,omitempty"`

	VCPUs     int     `json:"vcpus"`
	MemoryMiB int     `json:"memory_mib"`
	NICs      []NIC   `json:"nics,omitempty"`
	Drives    []Drive `json:"drives,omitempty"`

	StopTimeout time.Duration `json:"stop_timeout"`
	ExitGrace   time.Duration `json:"exit_grace"`
	// Deadline is when Spec.Timeout expires; zero means none.
	Deadline time.Time `json:"deadline,omitzero"`

	CreatedAt      time.Time `json:"created_at"`
	StartedAt      time.Time `json:"started_at,omitzero"`       // VMM ready
	StartOverhead  Duration  `json:"start_overhead,omitempty"`  // spec to VMM ready
	GuestStartedAt time.Time `json:"guest_started_at,omitzero"` // workload started
	ExitedAt       time.Time `json:"exited_at,omitzero"`

	Stop *StopRecord `json:"stop,omitempty"`
	Exit *ExitStatus `json:"exit,omitempty"`

	BackendData json.RawMessage   `json:"backend_data,omitempty"`
	Details     map[string]string `json:"details,omitempty"`
}

// Marker is the string the VMM's command line must contain, for
// AttachProcess: the backend's process marker, or else the VM directory.
func (st *State) Marker() string {
	if st.ProcessMarker != "" {
		return st.ProcessMarker
	}
	return st.Dir
}

// Duration marshals as a Go duration string.
type Duration time.Duration

func (d Duration) MarshalText() ([]byte, error) { return []byte(time.Duration(d).String()), nil }

func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	*d = Duration(v)
	return err
}

const (
	stateFile = "state.json"
	lockFile  = "owner.lock"
)

func writeState(dir string, st *State) error {
	st.Version = stateVersion
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return fmt.Errorf("encode state of %s: %w", st.ID, err)
	}
	tmp, err := os.CreateTemp(dir, ".state-*.json")
	if err != nil {
		return fmt.Errorf("write state of %s: %w", st.ID, err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(append(b, '\n')); err != nil {
		tmp.Close()
		return fmt.Errorf("write state of %s: %w", st.ID, err)
	}
	// No fsync: the rename alone makes the file old-or-new for every
	// process crash. A host crash kills every VM anyway, and a state file
	// it leaves empty is treated as a VM that never started (Recover
	// removes it); an fsync would cost tens of milliseconds per write.
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write state of %s: %w", st.ID, err)
	}
	if err := os.Rename(tmp.Name(), filepath.Join(dir, stateFile)); err != nil {
		return fmt.Errorf("write state of %s: %w", st.ID, err)
	}
	return nil
}

func readState(dir string) (*State, error) {
	b, err := os.ReadFile(filepath.Join(dir, stateFile))
	if err != nil {
		return nil, err
	}
	var st State
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(dir, stateFile), err)
	}
	if st.Version != stateVersion {
		return nil, fmt.Errorf("%s: state version %d, this fireactions reads %d", filepath.Join(dir, stateFile), st.Version, stateVersion)
	}
	return &st, nil
}

// ownerLock is an exclusive flock on <dir>/owner.lock held by the process
// that owns (supervises) a VM. The kernel drops it when that process dies,
// so a restarted manager can tell abandoned VMs from ones another live
// fireactions process still runs.
type ownerLock struct{ f *os.File }

// errLocked is returned by tryLock when another process owns the VM.
var errLocked = errors.New("owned by another process")

func tryLock(dir string) (*ownerLock, error) {
	// O_CLOEXEC (Go's default) keeps the lock out of the VMM, which would
	// otherwise hold it for its whole life.
	f, err := os.OpenFile(filepath.Join(dir, lockFile), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, errLocked
		}
		return nil, fmt.Errorf("lock %s: %w", f.Name(), err)
	}
	_ = f.Truncate(0)
	_, _ = f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	return &ownerLock{f: f}, nil
}

func (l *ownerLock) release() {
	if l != nil && l.f != nil {
		l.f.Close()
		l.f = nil
	}
}

// lockHolder returns the pid of the process holding the VM's lock, or 0
// when nobody holds it.
func lockHolder(dir string) int {
	f, err := os.Open(filepath.Join(dir, lockFile))
	if err != nil {
		return 0
	}
	defer f.Close()
	// A shared lock is refused exactly while someone holds the exclusive
	// one.
	if err := unix.Flock(int(f.Fd()), unix.LOCK_SH|unix.LOCK_NB); err == nil {
		unix.Flock(int(f.Fd()), unix.LOCK_UN)
		return 0
	}
	b, err := io.ReadAll(f)
	if err != nil {
		return 0
	}
	pid, _ := strconv.Atoi(string(trimSpace(b)))
	return pid
}

func trimSpace(b []byte) []byte {
	for len(b) > 0 && (b[len(b)-1] == '\n' || b[len(b)-1] == ' ') {
		b = b[:len(b)-1]
	}
	return b
}
