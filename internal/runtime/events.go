package runtime

import (
	"time"

	"github.com/fireactions/fireactions/internal/image"
)

// Phase is a step of an instance's start-up.
type Phase string

const (
	// PhaseBackend: the backend was chosen; Message says which and why.
	PhaseBackend Phase = "backend"
	// PhasePull: the image is resolved, downloaded and converted to its
	// read-only base (the image store does both in one pass), or found in
	// the cache (Cached).
	PhasePull Phase = "pull"
	// PhaseScratch: the VM's writable disk is created.
	PhaseScratch Phase = "scratch"
	// PhaseNetwork: the VM is attached to its network.
	PhaseNetwork Phase = "network"
	// PhaseInitramfs: the shared initramfs part is found or built.
	PhaseInitramfs Phase = "initramfs"
	// PhaseBoot: the VMM is started; Done once it answers (the guest is
	// then still booting).
	PhaseBoot Phase = "boot"
	// PhaseStarted: the guest init started the workload (or, in system
	// mode, handed over to the image's init). Duration is the time since
	// the VMM was ready. Only sent by Instance.WaitStarted.
	PhaseStarted Phase = "started"
)

// Event reports one phase: once when it begins (Done false) and once when
// it ends (Done true, with Duration and, on failure, Err). Pulls also send
// Progress events while layers download.
type Event struct {
	ID       string
	Phase    Phase
	Done     bool
	Duration time.Duration
	// Cached is set on a pull that found the image already converted.
	Cached   bool
	Message  string
	Progress *image.Progress
	Err      error
	At       time.Time
}

// emitter sends events to a request's callback, if any.
type emitter struct {
	id string
	f  func(Event)
}

func (e emitter) send(ev Event) {
	if e.f == nil {
		return
	}
	ev.ID = e.id
	if ev.At.IsZero() {
		ev.At = time.Now()
	}
	e.f(ev)
}

// phase sends the start event and returns a function that sends the end.
func (e emitter) phase(p Phase, msg string) func(err error, msg string) time.Duration {
	t0 := time.Now()
	e.send(Event{Phase: p, Message: msg, At: t0})
	return func(err error, msg string) time.Duration {
		d := time.Since(t0)
		e.send(Event{Phase: p, Done: true, Duration: d, Err: err, Message: msg})
		return d
	}
}
