package agent

import (
	"bytes"
	"encoding/json"
	"fmt"
	"time"
)

// State is where the runner in a VM is in its single-job life, as the
// agent reports it to the host.
type State string

const (
	// StateStarting: the agent runs and is starting the actions runner.
	StateStarting State = "starting"
	// StateIdle: the runner is connected to GitHub and listens for a job.
	StateIdle State = "idle"
	// StateBusy: the runner is running its job.
	StateBusy State = "busy"
	// StateDone: the runner exited; the VM powers off next.
	StateDone State = "done"
	// StateFailed: the agent could not start the runner (Message says
	// why); the VM powers off next.
	StateFailed State = "failed"
)

// reportPrefix starts every report line. The host reads reports from the
// VM's stdout stream: in app mode the agent's stdout, which the guest init
// authenticates frame by frame; in system mode frames the agent signs with
// the console key the init handed over. The runner's own output never goes
// there, so the runner cannot forge a report.
const reportPrefix = "fireactions-agent/v1 "

// Report is one state change of the runner in a VM.
type Report struct {
	State  State     `json:"state"`
	Runner string    `json:"runner,omitempty"`
	Time   time.Time `json:"time"`
	// Message explains StateFailed, or holds the runner's exit status for
	// StateDone.
	Message string `json:"message,omitempty"`
}

// Line encodes r as one report line, newline included.
func (r Report) Line() []byte {
	b, _ := json.Marshal(r)
	return append(append([]byte(reportPrefix), b...), '\n')
}

// ParseReport decodes a report line (without or with its line ending). ok
// is false for a line that is not a report, e.g. other output.
func ParseReport(line []byte) (Report, bool, error) {
	line = bytes.TrimRight(line, "\r\n")
	rest, found := bytes.CutPrefix(line, []byte(reportPrefix))
	if !found {
		return Report{}, false, nil
	}
	var r Report
	dec := json.NewDecoder(bytes.NewReader(rest))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&r); err != nil {
		return Report{}, true, fmt.Errorf("agent report: %w", err)
	}
	switch r.State {
	case StateStarting, StateIdle, StateBusy, StateDone, StateFailed:
	default:
		return Report{}, true, fmt.Errorf("agent report: unknown state %q", r.State)
	}
	return r, true, nil
}
