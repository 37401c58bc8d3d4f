package nomad

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"

	"github.com/fireactions/fireactions/internal/vm"
)

// ShipperArg, as the first argument of the plugin executable, runs the log
// shipper (ShipperMain) instead of the plugin.
const ShipperArg = "__fireactions-log-shipper"

// The log shipper copies one VM's output into Nomad's log fifos: the
// workload's stdout and stderr, and the console's other messages (kernel,
// guest init) into the task's Log file. It runs as a process of its own,
// like the executor of Nomad's exec driver: the fifos stay open while the
// plugin restarts, so Nomad's log collector keeps reading and `nomad alloc
// logs` shows the output of a task that outlived a plugin restart. It
// reads the VM's console log (the VM layer's stream of record), never the
// VMM, and ends once the VM has ended and its output is delivered.
//
// Its command line names the VM directory, so the VM layer's clean-up of
// a removed VM also ends a shipper stuck on a fifo nobody reads.

// shipperSpec is what a shipper needs, in the order of its arguments.
type shipperSpec struct {
	VMDir   string // <data-dir>/vms/<id>
	Stdout  string // Nomad's stdout fifo; empty discards
	Stderr  string // Nomad's stderr fifo; empty discards
	Console string // the task's Log file; empty discards
	Offsets string // the delivered-bytes counts (see streamOffsets)
	LogFile string // the shipper's own diagnostics
}

func (s shipperSpec) args() []string {
	return []string{ShipperArg, s.VMDir, s.Stdout, s.Stderr, s.Console, s.Offsets}
}

// startShipper starts the shipper for a VM, detached from the plugin (own
// session), and returns its process.
func startShipper(spec shipperSpec) (*vm.Process, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("log shipper: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(spec.LogFile), 0o700); err != nil {
		return nil, fmt.Errorf("log shipper: %w", err)
	}
	logf, err := os.OpenFile(spec.LogFile, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("log shipper: %w", err)
	}
	defer logf.Close()
	cmd := exec.Command(exe, spec.args()...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Dir = "/"
	p, err := vm.StartProcess(cmd)
	if err != nil {
		return nil, fmt.Errorf("log shipper: %w", err)
	}
	return p, nil
}

// ShipperMain is the log shipper's main function: args are what follows
// ShipperArg. It returns the process exit code.
func ShipperMain(args []string) int {
	if len(args) != 5 {
		fmt.Fprintf(os.Stderr, "%s: want 5 arguments (vm dir, stdout fifo, stderr fifo, console file, offsets file), have %d\n", ShipperArg, len(args))
		return 2
	}
	spec := shipperSpec{VMDir: args[0], Stdout: args[1], Stderr: args[2], Console: args[3], Offsets: args[4]}
	if err := ship(context.Background(), spec); err != nil {
		fmt.Fprintf(os.Stderr, "%s %s: %v\n", ShipperArg, filepath.Base(spec.VMDir), err)
		return 1
	}
	return 0
}

func ship(ctx context.Context, spec shipperSpec) error {
	offs, err := openOffsets(spec.Offsets)
	if errors.Is(err, errOffsetsBusy) {
		// Another shipper delivers this VM's output: one is enough.
		return nil
	}
	if err != nil {
		return err
	}
	defer offs.close()
	// Logs reads the state and console log of any VM under the root; the
	// shipper owns nothing, so it needs no backend.
	vms, err := vm.NewManager(vm.Options{Root: filepath.Dir(spec.VMDir)})
	if err != nil {
		return err
	}
	stdout, closeOut, err := openOutput(spec.Stdout, false)
	if err != nil {
		return fmt.Errorf("stdout: %w", err)
	}
	defer closeOut()
	stderr, closeErr, err := openOutput(spec.Stderr, false)
	if err != nil {
		return fmt.Errorf("stderr: %w", err)
	}
	defer closeErr()
	console, closeConsole, err := openOutput(spec.Console, true)
	if err != nil {
		return fmt.Errorf("log file: %w", err)
	}
	defer closeConsole()
	return vms.Logs(ctx, filepath.Base(spec.VMDir), vm.LogOptions{
		Follow:  true,
		Stdout:  newResumeWriter(stdout, offs, streamStdout),
		Stderr:  newResumeWriter(stderr, offs, streamStderr),
		Console: newResumeWriter(console, offs, streamConsole),
	})
}

// openOutput opens a fifo (blocking until Nomad's log collector reads it)
// or, with file, appends to a regular file. An empty path discards.
func openOutput(path string, file bool) (io.Writer, func(), error) {
	if path == "" {
		return io.Discard, func() {}, nil
	}
	flags := os.O_WRONLY
	mode := os.ModeNamedPipe
	if file {
		flags |= os.O_CREATE | os.O_APPEND
		mode = 0o644
	}
	f, err := os.OpenFile(path, flags, mode)
	if err != nil {
		return nil, nil, err
	}
	if !file {
		if fi, err := f.Stat(); err == nil && fi.Mode()&os.ModeNamedPipe == 0 {
			f.Close()
			return nil, nil, errors.New(path + " is not a fifo")
		}
	}
	return f, func() { f.Close() }, nil
}

// findShipper returns the running log shipper of the VM at vmDir, nil if
// there is none.
func findShipper(vmDir string) *vm.Process {
	for _, pid := range vm.ProcessesMatching(ShipperArg + "\x00" + vmDir + "\x00") {
		st, err := vm.ProcStartTime(pid)
		if err != nil {
			continue
		}
		if p, err := vm.AttachProcess(pid, st, vmDir); err == nil {
			return p
		}
	}
	return nil
}

// shipperFor returns the VM's shipper: the one the task state names if it
// still runs, else any running one, else a new one (which resumes where
// the last stopped). nil when the task has no output to deliver.
func shipperFor(spec shipperSpec, st TaskState) (*vm.Process, error) {
	if spec.Stdout == "" && spec.Stderr == "" && spec.Console == "" {
		return nil, nil
	}
	if st.ShipperPid != 0 {
		if p, err := vm.AttachProcess(st.ShipperPid, st.ShipperStartTime, spec.VMDir); err == nil {
			return p, nil
		}
	}
	if p := findShipper(spec.VMDir); p != nil {
		return p, nil
	}
	return startShipper(spec)
}
