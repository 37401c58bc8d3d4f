package qemu

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/fireactions/fireactions/internal/metadata"
	"github.com/fireactions/fireactions/internal/vm"
)

// MetadataHelperArg, as the first argument of a fireactions binary, makes
// it the per-connection metadata server: cmd/fireactions must call
// MetadataHelperMain before anything else when it sees it.
//
// The design: QEMU's restricted user-mode network forwards each guest TCP
// connection to 169.254.169.254:80 to a new process running this mode
// (guestfwd ...-cmd:), with the connection on stdin and stdout. The process
// reads the VM's metadata document from the VM directory, answers HTTP on
// that one connection and exits. No long-lived server exists, so the
// service keeps working while no fireactions process runs and after a
// restart, and a document rewritten on disk is served from the next
// connection on.
const MetadataHelperArg = "__qemu-metadata-conn"

func helperArgs(docPath string, v vm.MMDSVersion, tokenKeyPath, logPath string) []string {
	a := []string{"--doc", docPath, "--version", string(v), "--log", logPath}
	if tokenKeyPath != "" {
		a = append(a, "--token-key", tokenKeyPath)
	}
	return a
}

// Bounds on one guest connection.
const (
	helperReadHeaderTimeout = 10 * time.Second
	helperWriteTimeout      = 30 * time.Second
	helperIdleTimeout       = 60 * time.Second
)

// MetadataHelperMain serves the metadata connection on stdin with
// internal/metadata's MMDS semantics and returns the process exit code.
// args are the arguments after MetadataHelperArg. Nothing but HTTP may reach
// stdout or stderr (both are the guest's connection), so diagnostics go to
// the VM's VMM log.
func MetadataHelperMain(args []string) int {
	fs := flag.NewFlagSet(MetadataHelperArg, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	docPath := fs.String("doc", "", "metadata document")
	version := fs.String("version", string(vm.MMDSv1), "V1 or V2")
	keyPath := fs.String("token-key", "", "V2 token key file")
	logPath := fs.String("log", "", "diagnostics file")
	parseErr := fs.Parse(args)

	// Keep the connection, then point fds 1 and 2 away from it so that no
	// stray write (or a panic trace) corrupts the HTTP stream.
	conn, connErr := net.FileConn(os.Stdin)
	os.Stdin.Close()
	errOut := io.Discard
	if dst, err := openDiagnostics(*logPath); err == nil {
		errOut = dst
		_ = unix.Dup2(int(dst.Fd()), 2)
	}
	if null, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0); err == nil {
		_ = unix.Dup2(int(null.Fd()), 1)
		null.Close()
	}
	logger := log.New(errOut, fmt.Sprintf("fireactions metadata helper[%d]: ", os.Getpid()), log.LstdFlags)
	if parseErr != nil {
		logger.Printf("bad arguments: %v", parseErr)
		return 2
	}
	if connErr != nil {
		logger.Printf("stdin is not a connection: %v", connErr)
		return 1
	}

	h, err := metadataHandler(*docPath, vm.MMDSVersion(*version), *keyPath)
	if err != nil {
		logger.Printf("metadata unavailable: %v", err)
		h = http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			http.Error(w, "metadata service unavailable", http.StatusServiceUnavailable)
		})
	}
	srv := &http.Server{
		Handler:           h,
		ReadHeaderTimeout: helperReadHeaderTimeout,
		WriteTimeout:      helperWriteTimeout,
		IdleTimeout:       helperIdleTimeout,
		ErrorLog:          logger,
	}
	if err := srv.Serve(newOneConnListener(conn)); err != nil && !errors.Is(err, net.ErrClosed) {
		logger.Printf("serve: %v", err)
		return 1
	}
	return 0
}

// metadataHandler reads the document and the V2 token key from the VM
// directory and builds the handler for one connection.
func metadataHandler(docPath string, version vm.MMDSVersion, keyPath string) (http.Handler, error) {
	raw, err := os.ReadFile(docPath)
	if err != nil {
		return nil, err
	}
	doc, err := metadata.Parse(raw)
	if err != nil {
		return nil, err
	}
	// The V1 handler answers the reads; V2's session tokens are checked in
	// front of it, statelessly, since the next connection is served by
	// another process.
	inner, err := metadata.NewHandler(doc, metadata.V1)
	if err != nil {
		return nil, err
	}
	switch version {
	case vm.MMDSv1, "":
		return inner, nil
	case vm.MMDSv2:
		key, err := os.ReadFile(keyPath)
		if err != nil {
			return nil, fmt.Errorf("V2 token key: %w", err)
		}
		return &statelessV2{key: key, next: inner, now: time.Now}, nil
	}
	return nil, fmt.Errorf("MMDS version %q: use V1 or V2", version)
}

func openDiagnostics(path string) (*os.File, error) {
	if path == "" {
		return nil, errors.New("no log path")
	}
	return os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
}

// oneConnListener hands out a single connection, then blocks until that
// connection is closed and reports the listener closed, which ends
// http.Server.Serve exactly when the guest's connection is done.
type oneConnListener struct {
	conn   net.Conn
	once   sync.Once
	served bool
	closed chan struct{}
}

func newOneConnListener(c net.Conn) *oneConnListener {
	return &oneConnListener{conn: c, closed: make(chan struct{})}
}

func (l *oneConnListener) Accept() (net.Conn, error) {
	if !l.served {
		l.served = true
		return &notifyConn{Conn: l.conn, l: l}, nil
	}
	<-l.closed
	return nil, net.ErrClosed
}

func (l *oneConnListener) Close() error {
	l.once.Do(func() { close(l.closed) })
	return nil
}

func (l *oneConnListener) Addr() net.Addr { return l.conn.LocalAddr() }

type notifyConn struct {
	net.Conn
	l *oneConnListener
}

func (c *notifyConn) Close() error {
	err := c.Conn.Close()
	c.l.Close()
	return err
}
