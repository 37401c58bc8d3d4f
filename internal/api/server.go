// Package api owns the HTTP JSON API of `fireactions serve` and its Go
// client (used by `fireactions pools`, `ps` and `logs`): pools (list, get,
// scale, pause, resume), runner VMs (list, get, logs, stop), images (list,
// remove), health, version, and the workflow_job webhook endpoint. Every
// endpoint but /v1/health and /webhook (which GitHub signs) needs the
// bearer token; the server refuses to listen on a non-loopback address
// without one. No response ever carries a JIT configuration or a token.
package api

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/fireactions/fireactions/internal/config"
	"github.com/fireactions/fireactions/internal/github"
	"github.com/fireactions/fireactions/internal/image"
	"github.com/fireactions/fireactions/internal/pool"
)

// Pools is what the API needs from the pool manager; *pool.Manager
// satisfies it.
type Pools interface {
	Pools() []pool.Status
	Pool(name string) (pool.Status, error)
	Scale(name string, minRunners, maxRunners *int) (pool.Status, error)
	Pause(name string) (pool.Status, error)
	Resume(name string) (pool.Status, error)
	VMs() []pool.VMStatus
	VM(id string) (pool.VMStatus, error)
	StopVM(id string) (pool.VMStatus, error)
	Logs(ctx context.Context, id string, follow bool, w io.Writer) error
	HandleWorkflowJob(ctx context.Context, e github.WorkflowJobEvent) error
}

// Images is what the API needs from the image store; *image.Store
// satisfies it.
type Images interface {
	List() ([]image.Image, error)
	Remove(refOrDigest string) ([]string, error)
}

// Options configure the API handler.
type Options struct {
	Pools  Pools
	Images Images
	// Token is the bearer token clients must send; empty allows every
	// loopback client (Listen refuses other addresses then).
	Token   config.Secret
	Version string
	// WebhookSecret, when set, serves POST /webhook for workflow_job
	// deliveries signed with it.
	WebhookSecret config.Secret
	Logger        *slog.Logger
}

// ScaleRequest is the body of POST /v1/pools/{name}/scale; a missing field
// keeps its value.
type ScaleRequest struct {
	MinRunners *int `json:"min_runners,omitempty"`
	MaxRunners *int `json:"max_runners,omitempty"`
}

// Error is every error response's body.
type Error struct {
	Error string `json:"error"`
}

// Health is the body of GET /v1/health.
type Health struct {
	Status string `json:"status"`
}

// Version is the body of GET /v1/version.
type Version struct {
	Version string `json:"version"`
}

// RemovedImages is the body of DELETE /v1/images.
type RemovedImages struct {
	Removed []string `json:"removed"`
}

// NewHandler builds the API's routes.
func NewHandler(o Options) http.Handler {
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	log := o.Logger.With("component", "api")
	mux := http.NewServeMux()
	auth := func(h http.HandlerFunc) http.Handler { return requireToken(o.Token, h) }

	mux.HandleFunc("GET /v1/health", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, Health{Status: "ok"})
	})
	mux.Handle("GET /v1/version", auth(func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, Version{Version: o.Version})
	}))
	mux.Handle("GET /v1/pools", auth(func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, o.Pools.Pools())
	}))
	mux.Handle("GET /v1/pools/{name}", auth(func(w http.ResponseWriter, r *http.Request) {
		replyTo[pool.Status](w)(o.Pools.Pool(r.PathValue("name")))
	}))
	mux.Handle("POST /v1/pools/{name}/scale", auth(func(w http.ResponseWriter, r *http.Request) {
		var req ScaleRequest
		dec := json.NewDecoder(io.LimitReader(r.Body, 1<<16))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&req); err != nil {
			writeError(w, http.StatusBadRequest, fmt.Errorf("scale request: %v; send {\"min_runners\": N, \"max_runners\": M}", err))
			return
		}
		if req.MinRunners == nil && req.MaxRunners == nil {
			writeError(w, http.StatusBadRequest, errors.New("scale request: set min_runners, max_runners or both"))
			return
		}
		replyTo[pool.Status](w)(o.Pools.Scale(r.PathValue("name"), req.MinRunners, req.MaxRunners))
	}))
	mux.Handle("POST /v1/pools/{name}/pause", auth(func(w http.ResponseWriter, r *http.Request) {
		replyTo[pool.Status](w)(o.Pools.Pause(r.PathValue("name")))
	}))
	mux.Handle("POST /v1/pools/{name}/resume", auth(func(w http.ResponseWriter, r *http.Request) {
		replyTo[pool.Status](w)(o.Pools.Resume(r.PathValue("name")))
	}))
	mux.Handle("GET /v1/vms", auth(func(w http.ResponseWriter, r *http.Request) {
		vms := o.Pools.VMs()
		if vms == nil {
			vms = []pool.VMStatus{}
		}
		writeJSON(w, http.StatusOK, vms)
	}))
	mux.Handle("GET /v1/vms/{id}", auth(func(w http.ResponseWriter, r *http.Request) {
		replyTo[pool.VMStatus](w)(o.Pools.VM(r.PathValue("id")))
	}))
	mux.Handle("POST /v1/vms/{id}/stop", auth(func(w http.ResponseWriter, r *http.Request) {
		st, err := o.Pools.StopVM(r.PathValue("id"))
		if err != nil {
			writeError(w, statusOf(err), err)
			return
		}
		writeJSON(w, http.StatusAccepted, st)
	}))
	mux.Handle("GET /v1/vms/{id}/logs", auth(func(w http.ResponseWriter, r *http.Request) {
		follow, _ := strconv.ParseBool(r.URL.Query().Get("follow"))
		id := r.PathValue("id")
		if _, err := o.Pools.VM(id); err != nil {
			writeError(w, statusOf(err), err)
			return
		}
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Header().Set("X-Content-Type-Options", "nosniff")
		w.WriteHeader(http.StatusOK)
		fw := &flushWriter{w: w}
		if f, ok := w.(http.Flusher); ok {
			fw.f = f
		}
		if err := o.Pools.Logs(r.Context(), id, follow, fw); err != nil && r.Context().Err() == nil {
			log.Warn("stream logs", "vm", id, "error", err)
		}
	}))
	mux.Handle("GET /v1/images", auth(func(w http.ResponseWriter, r *http.Request) {
		if o.Images == nil {
			writeError(w, http.StatusServiceUnavailable, errors.New("no image store"))
			return
		}
		imgs, err := o.Images.List()
		if err != nil {
			writeError(w, http.StatusInternalServerError, err)
			return
		}
		if imgs == nil {
			imgs = []image.Image{}
		}
		writeJSON(w, http.StatusOK, imgs)
	}))
	mux.Handle("DELETE /v1/images", auth(func(w http.ResponseWriter, r *http.Request) {
		ref := r.URL.Query().Get("ref")
		if ref == "" {
			writeError(w, http.StatusBadRequest, errors.New("name the image: DELETE /v1/images?ref=REFERENCE_OR_DIGEST"))
			return
		}
		if o.Images == nil {
			writeError(w, http.StatusServiceUnavailable, errors.New("no image store"))
			return
		}
		removed, err := o.Images.Remove(ref)
		if err != nil {
			writeError(w, statusOf(err), err)
			return
		}
		writeJSON(w, http.StatusOK, RemovedImages{Removed: removed})
	}))
	if o.WebhookSecret != "" {
		mux.Handle("/webhook", github.WebhookHandler(o.WebhookSecret, o.Pools.HandleWorkflowJob, o.Logger))
	}
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, fmt.Errorf("no endpoint %s %s", r.Method, r.URL.Path))
	})
	return mux
}

// requireToken checks the bearer token in constant time. Both sides are
// hashed first so that the comparison does not leak the token's length.
func requireToken(token config.Secret, h http.Handler) http.Handler {
	if token == "" {
		return h
	}
	want := sha256.Sum256([]byte(token.Reveal()))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		sum := sha256.Sum256([]byte(got))
		if !ok || subtle.ConstantTimeCompare(sum[:], want[:]) != 1 {
			w.Header().Set("WWW-Authenticate", `Bearer realm="fireactions"`)
			writeError(w, http.StatusUnauthorized, errors.New("missing or wrong bearer token (server.auth_token_file)"))
			return
		}
		h.ServeHTTP(w, r)
	})
}

// replyTo returns a function that answers with a value or an error, so
// that a call returning both can be passed straight to it.
func replyTo[T any](w http.ResponseWriter) func(T, error) {
	return func(v T, err error) {
		if err != nil {
			writeError(w, statusOf(err), err)
			return
		}
		writeJSON(w, http.StatusOK, v)
	}
}

func statusOf(err error) int {
	switch {
	case errors.Is(err, pool.ErrNotFound), errors.Is(err, image.ErrNotFound):
		return http.StatusNotFound
	case errors.Is(err, pool.ErrInvalid):
		return http.StatusBadRequest
	case errors.Is(err, image.ErrInUse):
		return http.StatusConflict
	}
	return http.StatusInternalServerError
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

func writeError(w http.ResponseWriter, status int, err error) {
	writeJSON(w, status, Error{Error: err.Error()})
}

// flushWriter flushes after every write so that followed logs arrive as
// they are written.
type flushWriter struct {
	w io.Writer
	f http.Flusher
}

func (fw *flushWriter) Write(p []byte) (int, error) {
	n, err := fw.w.Write(p)
	if fw.f != nil {
		fw.f.Flush()
	}
	return n, err
}

// Listen opens the API's listener. It refuses an address other hosts can
// reach unless a token is set, whatever the configuration validation said.
func Listen(address string, token config.Secret) (net.Listener, error) {
	host, _, err := net.SplitHostPort(address)
	if err != nil {
		return nil, fmt.Errorf("server.address %q: %w", address, err)
	}
	if token == "" && !loopback(host) {
		return nil, fmt.Errorf("server.address %q accepts connections from other hosts but no API token is set; set server.auth_token_file or bind to 127.0.0.1", address)
	}
	ln, err := net.Listen("tcp", address)
	if err != nil {
		return nil, fmt.Errorf("listen on server.address: %w", err)
	}
	return ln, nil
}

func loopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.IsLoopback()
}

// Serve serves h on ln until ctx ends, then shuts down gracefully
// (followed log streams are cut after five seconds).
func Serve(ctx context.Context, ln net.Listener, h http.Handler) error {
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	errC := make(chan error, 1)
	go func() { errC <- srv.Serve(ln) }()
	select {
	case err := <-errC:
		return err
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		srv.Close()
	}
	return nil
}
