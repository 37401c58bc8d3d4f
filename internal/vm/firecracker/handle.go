package firecracker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"

	fc "github.com/firecracker-microvm/firecracker-go-sdk"
	fcclient "github.com/firecracker-microvm/firecracker-go-sdk/client"
	"github.com/firecracker-microvm/firecracker-go-sdk/client/models"
	httptransport "github.com/go-openapi/runtime/client"
	"github.com/go-openapi/strfmt"
	"github.com/sirupsen/logrus"

	"github.com/fireactions/fireactions/internal/vm"
)

// client is the SDK's API client over a transport this package owns, so
// that its connections can be closed when a handle is (the SDK's own
// transport keeps idle connections forever) and long socket paths are
// dialled through vm.DialUnix.
type client struct {
	fc *fc.Client
	tr *http.Transport
}

func newClient(socket string, log *slog.Logger) *client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return vm.DialUnix(ctx, socket)
		},
		MaxIdleConnsPerHost: 2,
		IdleConnTimeout:     30 * time.Second,
	}
	rt := httptransport.New(fcclient.DefaultHost, fcclient.DefaultBasePath, fcclient.DefaultSchemes)
	rt.Transport = tr
	ops := fcclient.New(rt, strfmt.Default).Operations
	return &client{fc: fc.NewClient(socket, sdkLogger(log), false, fc.WithOpsClient(ops)), tr: tr}
}

func (c *client) close() { c.tr.CloseIdleConnections() }

// handle controls one running Firecracker VMM.
type handle struct {
	proc   *vm.Process
	data   persisted
	client *client

	mu      sync.Mutex
	console *os.File
}

func (h *handle) Process() *vm.Process { return h.proc }

func (h *handle) Persist() json.RawMessage {
	b, _ := json.Marshal(h.data)
	return b
}

func (h *handle) Details() map[string]string {
	d := map[string]string{
		"firecracker_version": h.data.Version,
		"api_socket":          h.data.APISocket,
		"console_input":       h.data.ConsoleFIFO,
		"instance_id":         h.data.InstanceID,
	}
	if h.data.MMDS {
		d["mmds_tap"] = h.data.MMDSTap
	}
	if h.data.Vsock != "" {
		d["vsock_uds"] = h.data.Vsock
	}
	if h.data.Jail != nil {
		d["jail"] = h.data.Jail.Dir
	}
	return d
}

// GuestShutdown reports a VMM exit with status 0: Firecracker exits so when
// the guest resets (reboot=k), which is how a guest ends itself; killed or
// failing, it exits otherwise. Unknown for an adopted VMM.
func (h *handle) GuestShutdown() bool {
	e := h.proc.Exit()
	return e.Known && e.Code == 0 && e.Signal == 0
}

// Shutdown sends Ctrl-Alt-Del. The fireactions init turns it into SIGINT
// for PID 1, a graceful stop; a guest with Ctrl-Alt-Del enabled reboots,
// which ends the VM.
func (h *handle) Shutdown(ctx context.Context) error {
	action := models.InstanceActionInfoActionTypeSendCtrlAltDel
	_, err := h.client.fc.CreateSyncAction(ctx, &models.InstanceActionInfo{ActionType: &action})
	if err != nil {
		return fmt.Errorf("SendCtrlAltDel: %s", faultMessage(err))
	}
	return nil
}

// ConsoleInput opens the console FIFO for writing. The VMM holds its read
// end for its whole life, so the open fails only when the VMM is gone.
func (h *handle) ConsoleInput(ctx context.Context) (io.Writer, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.console != nil {
		return h.console, nil
	}
	// Non-blocking: the open cannot hang, and writes wait in Go's poller
	// when the pipe is full rather than blocking a thread.
	f, err := os.OpenFile(h.data.ConsoleFIFO, os.O_WRONLY|syscall.O_NONBLOCK, 0)
	if errors.Is(err, syscall.ENXIO) {
		return nil, fmt.Errorf("console input %s: the VMM no longer reads it", h.data.ConsoleFIFO)
	}
	if err != nil {
		return nil, fmt.Errorf("console input: %w", err)
	}
	h.console = f
	return f, nil
}

// UpdateMetadata replaces the MMDS document (PUT /mmds).
func (h *handle) UpdateMetadata(ctx context.Context, doc []byte) error {
	if !h.data.MMDS {
		return errors.New("the VM was started without metadata, so it has no metadata interface")
	}
	if _, err := h.client.fc.PutMmds(ctx, json.RawMessage(doc)); err != nil {
		return fmt.Errorf("PUT /mmds: %s", faultMessage(err))
	}
	return nil
}

func (h *handle) Close() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.console != nil {
		h.console.Close()
		h.console = nil
	}
	h.client.close()
	return nil
}

// sdkLogger sends the SDK's logrus output to slog. The SDK narrates every
// step at Info; that is Debug here. Its warnings and errors stay so.
func sdkLogger(l *slog.Logger) *logrus.Entry {
	lg := logrus.New()
	lg.SetOutput(io.Discard)
	lg.SetLevel(logrus.DebugLevel)
	lg.AddHook(slogHook{l: l.With("component", "firecracker-go-sdk")})
	return logrus.NewEntry(lg)
}

type slogHook struct{ l *slog.Logger }

func (slogHook) Levels() []logrus.Level { return logrus.AllLevels }

func (h slogHook) Fire(e *logrus.Entry) error {
	level := slog.LevelDebug
	switch {
	case e.Level <= logrus.ErrorLevel:
		level = slog.LevelError
	case e.Level == logrus.WarnLevel:
		level = slog.LevelWarn
	}
	if !h.l.Enabled(context.Background(), level) {
		return nil
	}
	attrs := make([]any, 0, 2*len(e.Data))
	for k, v := range e.Data {
		attrs = append(attrs, k, v)
	}
	h.l.Log(context.Background(), level, strings.TrimSpace(e.Message), attrs...)
	return nil
}
