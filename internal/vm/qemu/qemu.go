// Package qemu is the VM backend for hosts without Firecracker: QEMU's
// microvm machine with virtio-mmio block and network devices, KVM when
// /dev/kvm is usable and TCG otherwise, QMP for control, the serial console
// in a log file, and a restricted user-mode NIC that gives the guest the
// same metadata endpoint (169.254.169.254) Firecracker's MMDS does.
package qemu

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/fireactions/fireactions/internal/guest"
	"github.com/fireactions/fireactions/internal/vm"
	"github.com/fireactions/fireactions/internal/vm/qmp"
)

// Name is the backend's name.
const Name = "qemu"

// DefaultBinary is looked up in PATH.
const DefaultBinary = "qemu-system-x86_64"

// Accel forces an accelerator.
type Accel string

const (
	AccelAuto Accel = ""
	AccelKVM  Accel = "kvm"
	AccelTCG  Accel = "tcg"
)

// Options configure the backend.
type Options struct {
	// Binary is the QEMU executable; default DefaultBinary from PATH.
	Binary string
	// Accel forces KVM or TCG; by default KVM is used when usable.
	Accel Accel
	// MetadataHelper is the command QEMU runs for each guest connection to
	// the metadata address, before its arguments. Default: this
	// executable with MetadataHelperArg (see MetadataHelperMain).
	MetadataHelper []string
	Logger         *slog.Logger
}

// Backend runs VMs with qemu-system-x86_64 -M microvm.
type Backend struct {
	opts Options
	log  *slog.Logger
}

// New returns the QEMU backend.
func New(opts Options) *Backend {
	if opts.Binary == "" {
		opts.Binary = DefaultBinary
	}
	l := opts.Logger
	if l == nil {
		l = slog.Default()
	}
	return &Backend{opts: opts, log: l.With("backend", Name)}
}

// Name implements vm.Backend.
func (b *Backend) Name() string { return Name }

// Available implements vm.Backend.
func (b *Backend) Available() error {
	if _, err := exec.LookPath(b.opts.Binary); err != nil {
		return fmt.Errorf("%s not found: install the Debian package qemu-system-x86", b.opts.Binary)
	}
	if b.opts.Accel == AccelKVM {
		if err := KVMUsable(); err != nil {
			return fmt.Errorf("KVM was asked for: %w", err)
		}
	}
	return nil
}

// accel decides between KVM and TCG and says why.
func (b *Backend) accel() (kvm bool, why string) {
	switch b.opts.Accel {
	case AccelKVM:
		return true, "asked for"
	case AccelTCG:
		return false, "asked for"
	}
	if err := KVMUsable(); err != nil {
		return false, err.Error()
	}
	return true, "/dev/kvm usable"
}

// Describe implements vm.Describer.
func (b *Backend) Describe() string {
	kvm, why := b.accel()
	if kvm {
		return "qemu (KVM)"
	}
	return "qemu (TCG: " + why + ")"
}

// GuestDevices implements vm.Backend: drives are found by their virtio
// serial; with metadata, an extra NIC carries the metadata service.
func (b *Backend) GuestDevices(spec *vm.Spec) (vm.GuestDevices, error) {
	var d vm.GuestDevices
	for i, dr := range spec.Drives {
		d.Drives = append(d.Drives, guest.Drive{
			Role:       guest.DriveRole(dr.Role),
			Serial:     driveSerial(i, dr),
			MountPoint: dr.MountPoint,
			ReadOnly:   dr.ReadOnly,
		})
	}
	for _, n := range spec.Interfaces {
		d.Interfaces = append(d.Interfaces, guest.Interface{
			MAC: n.MAC, Address: n.GuestIP, Gateway: n.Gateway, MTU: n.MTU, Nameservers: n.DNS,
		})
	}
	if len(spec.Metadata) > 0 {
		d.Interfaces = append(d.Interfaces, guest.Interface{MAC: mmdsMAC(spec.ID), Address: mmdsGuestAddr, MMDS: true})
	}
	return d, nil
}

// persisted is the backend's part of state.json.
type persisted struct {
	QMPSocket     string   `json:"qmp_socket"`
	ConsoleSocket string   `json:"console_socket"`
	Accelerator   string   `json:"accelerator"`
	AccelReason   string   `json:"accelerator_reason"`
	Metadata      string   `json:"metadata,omitempty"`
	TokenKey      string   `json:"token_key,omitempty"`
	Args          []string `json:"args"`
}

// Start implements vm.Backend.
func (b *Backend) Start(ctx context.Context, spec *vm.Spec, layout vm.Layout) (vm.Handle, error) {
	if spec.Vsock != nil {
		return nil, errors.New("vm spec: vsock: the qemu backend has no vsock device (it needs /dev/vhost-vsock and differs from Firecracker's Unix-socket vsock); remove vsock or use the firecracker backend")
	}
	bin, err := exec.LookPath(b.opts.Binary)
	if err != nil {
		return nil, fmt.Errorf("%s not found: install the Debian package qemu-system-x86", b.opts.Binary)
	}
	kvm, why := b.accel()
	p := persisted{
		QMPSocket:     layout.Path("qmp.sock"),
		ConsoleSocket: layout.Path("console.sock"),
		Accelerator:   "tcg",
		AccelReason:   why,
	}
	if kvm {
		p.Accelerator = "kvm"
	}
	log := b.log.With("vm", spec.ID)
	log.Info("starting qemu", "accelerator", p.Accelerator, "why", why)

	c := cmdline{spec: spec, dir: layout.Dir, kvm: kvm, initrd: spec.Initrd, consoleLog: layout.ConsoleLog}
	if layout.Initrd != "" {
		c.initrd = layout.Initrd
	}
	if len(spec.Metadata) > 0 {
		p.Metadata = layout.Metadata
		helper := b.opts.MetadataHelper
		if helper == nil {
			exe, err := os.Executable()
			if err != nil {
				return nil, fmt.Errorf("find own executable for the metadata helper: %w", err)
			}
			helper = []string{exe, MetadataHelperArg}
		}
		if spec.MMDSVersion == vm.MMDSv2 {
			p.TokenKey = layout.Path("mmds-token.key")
			if err := writeTokenKey(p.TokenKey); err != nil {
				return nil, err
			}
		}
		c.metadataCmd = append(append([]string(nil), helper...), helperArgs(layout.Metadata, spec.MMDSVersion, p.TokenKey, layout.VMMLog)...)
	}
	p.Args = buildArgs(c)

	con, err := vm.ListenUnix(p.ConsoleSocket)
	if err != nil {
		return nil, err
	}
	defer con.Close()
	qmpL, err := vm.ListenUnix(p.QMPSocket)
	if err != nil {
		return nil, err
	}
	defer qmpL.Close()
	vmmLog, err := os.OpenFile(layout.VMMLog, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open VMM log: %w", err)
	}
	defer vmmLog.Close()

	cmd := exec.Command(bin, p.Args...)
	cmd.Stdout = vmmLog
	cmd.Stderr = vmmLog
	cmd.ExtraFiles = []*os.File{con, qmpL} // fds 3 and 4
	cmd.Dir = layout.Dir
	proc, err := vm.StartProcessInNetNS(cmd, spec.NetNS)
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", bin, err)
	}
	// QEMU holds the listeners now; ours would keep connections to a dead
	// VMM pending forever.
	con.Close()
	qmpL.Close()

	h := &handle{proc: proc, data: p, log: log}
	if err := h.connectQMP(ctx); err != nil {
		return nil, b.startFailed(proc, layout, err)
	}
	return h, nil
}

// startFailed kills a VMM that did not come up and returns an error that
// carries QEMU's own words.
func (b *Backend) startFailed(proc *vm.Process, layout vm.Layout, cause error) error {
	if !proc.Exited() {
		_ = proc.Signal(syscall.SIGKILL)
	}
	<-proc.Done()
	if msg := vm.TailFile(layout.VMMLog, 2048); msg != "" {
		return fmt.Errorf("qemu did not start (%s): %s", proc.Exit(), msg)
	}
	return fmt.Errorf("qemu did not start (%s): %w", proc.Exit(), cause)
}

// Attach implements vm.Backend.
func (b *Backend) Attach(ctx context.Context, st *vm.State, proc *vm.Process) (vm.Handle, error) {
	var p persisted
	if err := json.Unmarshal(st.BackendData, &p); err != nil {
		return nil, fmt.Errorf("vm %s: backend state: %w", st.ID, err)
	}
	h := &handle{proc: proc, data: p, log: b.log.With("vm", st.ID)}
	if err := h.connectQMP(ctx); err != nil {
		// The VM stays controllable by signals; Shutdown retries QMP.
		h.log.Warn("qmp unavailable after re-attach", "err", err)
	}
	return h, nil
}

// Cleanup implements vm.Backend. QEMU creates nothing outside the VM
// directory, and the metadata helpers it spawns name that directory in
// their command line, so the manager's sweep already ends them.
func (b *Backend) Cleanup(*vm.State) error { return nil }

func writeTokenKey(path string) error {
	key := make([]byte, 32)
	if _, err := rand.Read(key); err != nil {
		return err
	}
	if err := os.WriteFile(path, key, 0o600); err != nil {
		return fmt.Errorf("write metadata token key: %w", err)
	}
	return nil
}

type handle struct {
	proc *vm.Process
	data persisted
	log  *slog.Logger

	mu            sync.Mutex
	qmp           *qmp.Client
	console       net.Conn
	guestShutdown atomic.Bool
}

func (h *handle) connectQMP(ctx context.Context) error {
	conn, err := vm.DialUnix(ctx, h.data.QMPSocket)
	if err != nil {
		return err
	}
	// A VMM that dies during the handshake must end it even when ctx has
	// no deadline.
	handshake := make(chan struct{})
	defer close(handshake)
	go func() {
		select {
		case <-h.proc.Done():
			conn.Close()
		case <-handshake:
		}
	}()
	c, err := qmp.Connect(ctx, conn, h.onEvent)
	if err != nil {
		conn.Close()
		return err
	}
	h.mu.Lock()
	h.qmp = c
	h.mu.Unlock()
	return nil
}

func (h *handle) onEvent(ev qmp.Event) {
	h.log.Debug("qmp event", "event", ev.Name, "data", string(ev.Data))
	if ev.Name != "SHUTDOWN" {
		return
	}
	var d struct {
		Guest  bool   `json:"guest"`
		Reason string `json:"reason"`
	}
	if json.Unmarshal(ev.Data, &d) == nil && d.Guest {
		h.guestShutdown.Store(true)
	}
}

func (h *handle) Process() *vm.Process { return h.proc }

func (h *handle) Persist() json.RawMessage {
	b, _ := json.Marshal(h.data)
	return b
}

func (h *handle) Details() map[string]string {
	return map[string]string{
		"accelerator":        h.data.Accelerator,
		"accelerator_reason": h.data.AccelReason,
		"qmp_socket":         h.data.QMPSocket,
		"console_socket":     h.data.ConsoleSocket,
	}
}

func (h *handle) GuestShutdown() bool { return h.guestShutdown.Load() }

// Shutdown presses the ACPI power button (microvm's generic event device).
// A guest acts on it only if something handles the button: systemd-logind
// in a system-mode image; the guest init in app mode.
func (h *handle) Shutdown(ctx context.Context) error {
	h.mu.Lock()
	c := h.qmp
	h.mu.Unlock()
	if c == nil || isClosed(c.Done()) {
		if err := h.connectQMP(ctx); err != nil {
			return fmt.Errorf("system_powerdown: %w", err)
		}
		h.mu.Lock()
		c = h.qmp
		h.mu.Unlock()
	}
	_, err := c.Execute(ctx, "system_powerdown", nil)
	return err
}

// ConsoleInput connects to the console socket. What QEMU sends back over
// it duplicates the console log and is discarded, promptly, so the guest's
// serial port never waits on us.
func (h *handle) ConsoleInput(ctx context.Context) (io.Writer, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.console != nil {
		return h.console, nil
	}
	conn, err := vm.DialUnix(ctx, h.data.ConsoleSocket)
	if err != nil {
		return nil, err
	}
	go func() { _, _ = io.Copy(io.Discard, conn) }()
	h.console = conn
	return conn, nil
}

// UpdateMetadata rewrites the document file; every guest connection is
// served by a new helper process that reads it afresh.
func (h *handle) UpdateMetadata(_ context.Context, doc []byte) error {
	if h.data.Metadata == "" {
		return errors.New("the VM was started without metadata, so it has no metadata network")
	}
	tmp := h.data.Metadata + ".tmp"
	if err := os.WriteFile(tmp, doc, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, h.data.Metadata)
}

func (h *handle) Close() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.qmp != nil {
		h.qmp.Close()
		h.qmp = nil
	}
	if h.console != nil {
		h.console.Close()
		h.console = nil
	}
	return nil
}

func isClosed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}
