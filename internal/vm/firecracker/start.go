package firecracker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	fc "github.com/firecracker-microvm/firecracker-go-sdk"
	"github.com/firecracker-microvm/firecracker-go-sdk/client/models"

	"github.com/fireactions/fireactions/internal/vm"
)

// persisted is the backend's part of state.json.
type persisted struct {
	// APISocket is the host path of the API socket.
	APISocket   string `json:"api_socket"`
	ConsoleFIFO string `json:"console_fifo"`
	Stderr      string `json:"stderr"`
	Metrics     string `json:"metrics"`
	InstanceID  string `json:"instance_id"`
	Version     string `json:"firecracker_version,omitempty"`
	NetNS       string `json:"netns,omitempty"`
	// MMDS is set when the VM has the metadata interface, whose tap is
	// MMDSTap (persistent under the jailer: see tap.go).
	MMDS    bool   `json:"mmds,omitempty"`
	MMDSTap string `json:"mmds_tap,omitempty"`
	// Vsock is the host path of the vsock socket.
	Vsock string     `json:"vsock_uds,omitempty"`
	Jail  *jailState `json:"jail,omitempty"`
	Args  []string   `json:"args"`
}

// Start implements vm.Backend.
//
// The SDK runs its configuration flow (validation, PUT /machine-config,
// /boot-source, /drives, /network-interfaces, /vsock, /mmds/config, /mmds,
// then InstanceStart) with one handler replaced: the SDK's own VMM start
// would reap the process in its goroutine, forward this process's signals
// to it and kill it when a context ends. Here the VMM is started by
// vm.StartProcess (own session, no parent-death signal, exit status
// reaped by the manager's Process) and the SDK only talks to its socket.
// The SDK's kernel-argument handler is dropped as well: it re-serialises
// the command line through a map, losing order and repeated keys, to add
// an ip= argument this backend never uses (the guest init configures the
// network).
func (b *Backend) Start(ctx context.Context, spec *vm.Spec, layout vm.Layout) (vm.Handle, error) {
	bin, version, err := b.binary(ctx)
	if err != nil {
		return nil, err
	}
	p, err := b.newPlan(spec, layout, bin)
	if err != nil {
		return nil, err
	}
	p.data.Version = version
	log := b.log.With("vm", spec.ID)

	files, err := p.openFiles()
	if err != nil {
		return nil, err
	}
	defer files.close()
	if p.jail != nil {
		err := p.jail.prepare(p)
		if err == nil && p.data.MMDS {
			err = createPersistentTap(spec.NetNS, p.data.MMDSTap, p.jail.opts.UID, p.jail.opts.GID)
		}
		if err != nil {
			p.undoJail()
			return nil, err
		}
	}

	var cmd *exec.Cmd
	if p.jail != nil {
		cmd = p.jail.command(p, b.opts.LogLevel, files.stdin, files.stdout, files.stderr)
	} else {
		cmd = fc.VMCommandBuilder{}.
			WithBin(bin).
			WithSocketPath(p.vmmSocket).
			AddArgs("--id", p.data.InstanceID).
			AddArgs(p.vmmArgs(b.opts.LogLevel)...).
			WithStdin(files.stdin).
			WithStdout(files.stdout).
			WithStderr(files.stderr).
			// Never cancelled: the VMM's lifetime is not tied to a
			// context.
			Build(context.Background())
	}
	cmd.Dir = layout.Dir
	p.data.Args = cmd.Args

	client := newClient(p.data.APISocket, b.log)
	m, err := fc.NewMachine(context.Background(), p.sdkConfig(),
		fc.WithProcessRunner(cmd), fc.WithClient(client.fc), fc.WithLogger(sdkLogger(log)))
	if err != nil {
		p.undoJail()
		return nil, fmt.Errorf("firecracker config: %w", err)
	}
	s := &starter{ctx: ctx, cmd: cmd, netns: spec.NetNS, jailed: p.jail != nil, client: client, files: files}
	m.Handlers.FcInit = m.Handlers.FcInit.
		Remove(fc.SetupKernelArgsHandlerName).
		Swap(fc.Handler{Name: fc.StartVMMHandlerName, Fn: s.startVMM})
	if p.data.MMDS {
		// The document is in place before the guest boots.
		m.Handlers.FcInit = m.Handlers.FcInit.AppendAfter(fc.ConfigMmdsHandlerName,
			fc.NewSetMetadataHandler(json.RawMessage(spec.Metadata)))
	}

	// Machine.Start gets a context that never ends: SDK v1 stops the VMM
	// when the context given to Start ends. ctx bounds only this wait;
	// when it ends first, the VMM is killed, which fails the SDK's next
	// API call and ends Start.
	done := make(chan error, 1)
	go func() { done <- m.Start(context.Background()) }()
	select {
	case err = <-done:
	case <-ctx.Done():
		s.kill()
		<-done
		err = fmt.Errorf("start-up interrupted: %w", ctx.Err())
	}
	proc := s.process()
	if err != nil {
		client.close()
		return nil, b.startFailed(p, proc, err)
	}
	log.Info("firecracker started", "pid", proc.Pid, "version", version, "jailer", p.jail != nil)
	return &handle{proc: proc, data: p.data, client: client}, nil
}

// vmmFiles are the VMM's standard streams.
type vmmFiles struct {
	stdin, stdout, stderr *os.File
}

func (f *vmmFiles) close() {
	for _, x := range []**os.File{&f.stdin, &f.stdout, &f.stderr} {
		if *x != nil {
			(*x).Close()
			*x = nil
		}
	}
}

// openFiles prepares the console and log files. The console input is a
// FIFO that the VMM gets opened read-write: it holds a writer itself, so it
// never sees end-of-file on its console input when writers come and go (or
// die with their process), and host-to-guest frames can be written by any
// later owner. The console output is the VM's console log, appended
// to by the VMM directly, so no process of ours sits in the stream.
func (p *plan) openFiles() (*vmmFiles, error) {
	var f vmmFiles
	fail := func(err error) (*vmmFiles, error) {
		f.close()
		return nil, err
	}
	if err := syscall.Mkfifo(p.data.ConsoleFIFO, 0o600); err != nil {
		return fail(fmt.Errorf("console input: %w", err))
	}
	var err error
	if f.stdin, err = os.OpenFile(p.data.ConsoleFIFO, os.O_RDWR, 0); err != nil {
		return fail(fmt.Errorf("console input: %w", err))
	}
	if f.stdout, err = os.OpenFile(p.layout.ConsoleLog, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600); err != nil {
		return fail(fmt.Errorf("console log: %w", err))
	}
	if f.stderr, err = os.OpenFile(p.data.Stderr, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600); err != nil {
		return fail(fmt.Errorf("VMM stderr: %w", err))
	}
	// Firecracker opens its log and metrics files without creating them.
	for _, path := range []string{p.layout.VMMLog, p.data.Metrics} {
		x, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE, 0o600)
		if err != nil {
			return fail(err)
		}
		x.Close()
	}
	return &f, nil
}

// starter is the handler that replaces the SDK's VMM start.
type starter struct {
	ctx    context.Context // the caller's: bounds the wait for the socket
	cmd    *exec.Cmd
	netns  string
	jailed bool
	client *client
	files  *vmmFiles

	mu   sync.Mutex
	proc *vm.Process
}

func (s *starter) process() *vm.Process {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.proc
}

func (s *starter) kill() {
	if p := s.process(); p != nil {
		_ = p.Signal(syscall.SIGKILL)
	}
}

func (s *starter) startVMM(_ context.Context, _ *fc.Machine) error {
	var proc *vm.Process
	var err error
	if s.jailed {
		// The jailer joins the network namespace itself (--netns).
		proc, err = vm.StartProcess(s.cmd)
	} else {
		proc, err = vm.StartProcessInNetNS(s.cmd, s.netns)
	}
	if err != nil {
		return fmt.Errorf("start %s: %w", s.cmd.Path, err)
	}
	s.mu.Lock()
	s.proc = proc
	s.mu.Unlock()
	// The VMM has its own copies now.
	s.files.close()
	return s.waitForAPI(proc)
}

// waitForAPI waits until the VMM answers on its API socket, it exits, or
// the caller gives up. Firecracker creates the socket itself, so there is
// nothing to wait on but the socket answering.
func (s *starter) waitForAPI(proc *vm.Process) error {
	delay := time.Millisecond
	for {
		ctx, cancel := context.WithTimeout(s.ctx, time.Second)
		_, err := s.client.fc.GetInstanceInfo(ctx)
		cancel()
		if err == nil {
			return nil
		}
		t := time.NewTimer(delay)
		select {
		case <-proc.Done():
			t.Stop()
			return fmt.Errorf("the VMM exited before its API socket answered (%s)", proc.Exit())
		case <-s.ctx.Done():
			t.Stop()
			return fmt.Errorf("waiting for the API socket: %w (last error: %v)", s.ctx.Err(), err)
		case <-t.C:
		}
		delay = min(delay*2, 20*time.Millisecond)
	}
}

// startFailed stops a VMM that did not come up and returns an error with
// Firecracker's own words: the API's fault message, then its log and
// stderr.
func (b *Backend) startFailed(p *plan, proc *vm.Process, cause error) error {
	status := "never started"
	if proc != nil {
		if !proc.Exited() {
			_ = proc.Signal(syscall.SIGKILL)
		}
		<-proc.Done()
		status = proc.Exit().String()
	}
	p.undoJail()
	msg := faultMessage(cause)
	var extra []string
	if t := vm.TailFile(p.layout.VMMLog, 2048); t != "" {
		extra = append(extra, "firecracker log: "+lastLines(t, 5))
	}
	if t := vm.TailFile(p.data.Stderr, 2048); t != "" {
		extra = append(extra, "stderr: "+lastLines(t, 5))
	}
	if len(extra) > 0 {
		msg += "; " + strings.Join(extra, "; ")
	}
	return fmt.Errorf("firecracker did not start (%s): %s", status, msg)
}

// undoJail removes what a jailed start made outside the VM directory.
func (p *plan) undoJail() {
	if p.jail == nil {
		return
	}
	if p.data.MMDS {
		_ = deletePersistentTap(p.spec.NetNS, p.data.MMDSTap)
	}
	_ = p.data.Jail.cleanup()
}

// faultMessage is the error text with Firecracker's fault_message in place
// of the SDK's rendering of the response.
func faultMessage(err error) string {
	var fault interface{ GetPayload() *models.Error }
	if errors.As(err, &fault) {
		if pl := fault.GetPayload(); pl != nil && pl.FaultMessage != "" {
			what := err.Error()
			if i := strings.Index(what, "]["); i > 0 {
				// "[PUT /machine-config][400] putMachine..." → the request.
				what = what[:i+1]
			}
			return what + " " + pl.FaultMessage
		}
	}
	return err.Error()
}

func lastLines(s string, n int) string {
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, " | ")
}

// Attach implements vm.Backend: it reconnects to the API socket and checks
// that the VMM booted its guest. A VMM that does not answer is adopted
// anyway (signals still reach it, and the API is tried again for every
// request); one that answers "Not started" never finished its start-up and
// is refused, so the manager kills it.
func (b *Backend) Attach(ctx context.Context, st *vm.State, proc *vm.Process) (vm.Handle, error) {
	var p persisted
	if err := json.Unmarshal(st.BackendData, &p); err != nil {
		return nil, fmt.Errorf("vm %s: backend state: %w", st.ID, err)
	}
	log := b.log.With("vm", st.ID)
	c := newClient(p.APISocket, b.log)
	h := &handle{proc: proc, data: p, client: c}
	info, err := c.fc.GetInstanceInfo(ctx)
	if err != nil {
		log.Warn("firecracker API unavailable after re-attach", "err", err)
		return h, nil
	}
	if s := info.Payload.State; s == nil || *s == models.InstanceInfoStateNotStarted {
		c.close()
		return nil, fmt.Errorf("vm %s: firecracker reports its instance %q as not started: the start-up never finished", st.ID, p.InstanceID)
	}
	return h, nil
}

// Cleanup implements vm.Backend. Without the jailer everything lives in the
// VM directory and the metadata tap vanished with the VMM. Under the jailer
// the jail, its cgroups and the persistent metadata tap are removed.
func (b *Backend) Cleanup(st *vm.State) error {
	var p persisted
	if len(st.BackendData) == 0 {
		// The owner died during Start, before the backend's data was
		// recorded: the jail and cgroups a jailed start may have made are
		// derived from the VM's id. (A metadata tap made in that instant
		// is left to the deletion of its network namespace; the state
		// does not say which namespace it is in.)
		j := b.opts.Jailer
		if j == nil {
			return nil
		}
		bin, err := exec.LookPath(b.opts.Binary)
		if err != nil {
			return nil
		}
		id := instanceID(st.ID)
		js := &jailState{Dir: filepath.Join(j.ChrootBaseDir, filepath.Base(bin), id), Cgroups: cgroupDirs(j, id)}
		return js.cleanup()
	}
	if err := json.Unmarshal(st.BackendData, &p); err != nil {
		return fmt.Errorf("vm %s: backend state: %w", st.ID, err)
	}
	if p.Jail == nil {
		return nil
	}
	var errs []error
	if p.MMDS {
		errs = append(errs, deletePersistentTap(p.NetNS, p.MMDSTap))
	}
	errs = append(errs, p.Jail.cleanup())
	return errors.Join(errs...)
}
