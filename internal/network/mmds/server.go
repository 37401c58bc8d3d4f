// Package mmds serves the metadata service to VMs on a host bridge, for
// backends without Firecracker's built-in MMDS (qemu). Guests connect to
// 169.254.169.254:80; the host's isolation table redirects that to a port
// on the bridge's gateway address (hostnet.DefaultMetadataPort), where a
// Server answers. The Server identifies the VM by the connection's source
// address (which the isolation table's anti-spoofing makes trustworthy) and
// hands the request to that VM's handler, so a VM can read only its own
// document. 169.254.169.254 is never assigned on the host nor routed
// anywhere: the host's own cloud metadata service stays reachable for the
// host and unreachable for VMs.
package mmds

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"time"
)

// Server dispatches metadata requests to the handler of the VM that sent
// them. The zero value is not usable; use NewServer.
type Server struct {
	log *slog.Logger

	mu  sync.RWMutex
	vms map[netip.Addr]vm
}

type vm struct {
	id string
	h  http.Handler
}

// NewServer returns a Server with no VMs.
func NewServer(log *slog.Logger) *Server {
	if log == nil {
		log = slog.Default()
	}
	return &Server{log: log.With("component", "mmds"), vms: map[netip.Addr]vm{}}
}

// Register serves h (typically a *metadata.Handler) to the VM at addr.
// Registering an address held by another VM is an error: detach that VM
// first.
func (s *Server) Register(vmID string, addr netip.Addr, h http.Handler) error {
	if !addr.IsValid() || h == nil {
		return fmt.Errorf("mmds: register %s: need an address and a handler", vmID)
	}
	addr = addr.Unmap()
	s.mu.Lock()
	defer s.mu.Unlock()
	if cur, ok := s.vms[addr]; ok && cur.id != vmID {
		return fmt.Errorf("mmds: register %s: %s is VM %s's address", vmID, addr, cur.id)
	}
	s.vms[addr] = vm{id: vmID, h: h}
	return nil
}

// Unregister stops serving the VM at addr, if vmID holds it.
func (s *Server) Unregister(vmID string, addr netip.Addr) {
	addr = addr.Unmap()
	s.mu.Lock()
	defer s.mu.Unlock()
	if cur, ok := s.vms[addr]; ok && cur.id == vmID {
		delete(s.vms, addr)
	}
}

// ServeHTTP answers a request with the handler of the VM whose address
// the connection comes from. Headers such as X-Forwarded-For are never
// consulted for identity.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	ap, err := netip.ParseAddrPort(r.RemoteAddr)
	if err != nil {
		http.Error(w, "unknown client", http.StatusForbidden)
		return
	}
	addr := ap.Addr().Unmap()
	s.mu.RLock()
	v, ok := s.vms[addr]
	s.mu.RUnlock()
	if !ok {
		s.log.Warn("metadata request from an unknown address", "addr", addr, "path", r.URL.Path)
		http.Error(w, "no metadata for this address", http.StatusNotFound)
		return
	}
	s.log.Debug("metadata request", "vm", v.id, "method", r.Method, "path", r.URL.Path)
	v.h.ServeHTTP(w, r)
}

// Listen opens the metadata port, e.g. "10.200.0.1:8169" (the bridge's
// gateway address and hostnet.DefaultMetadataPort).
func Listen(addr string) (net.Listener, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("mmds: listen %s: %w (run `fireactions host setup` first: the address is the bridge's)", addr, err)
	}
	return ln, nil
}

// Serve answers on ln until ctx ends, then shuts down gracefully.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	hs := &http.Server{
		Handler:           s,
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       60 * time.Second,
		MaxHeaderBytes:    16 << 10,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelWarn),
	}
	done := make(chan struct{})
	go func() {
		select {
		case <-ctx.Done():
			sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			_ = hs.Shutdown(sctx)
		case <-done:
		}
	}()
	s.log.Info("metadata service listening", "addr", ln.Addr().String())
	err := hs.Serve(ln)
	close(done)
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return fmt.Errorf("mmds: serve: %w", err)
}
