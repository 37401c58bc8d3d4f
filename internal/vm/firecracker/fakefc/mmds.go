package main

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// relayArg, as the first argument, makes the fake a guestfwd helper: QEMU
// runs it for each guest connection to the MMDS address, with the
// connection on stdin and stdout, and it relays the bytes to the fake's
// MMDS server (a Unix socket), so MMDS lives in the VMM process as it does
// in Firecracker.
const relayArg = "__mmds-relay"

func relay(args []string) int {
	if len(args) != 1 {
		return exitArgParsing
	}
	c, err := net.Dial("unix", args[0])
	if err != nil {
		return exitGeneric
	}
	uc := c.(*net.UnixConn)
	done := make(chan struct{})
	go func() {
		_, _ = io.Copy(os.Stdout, uc)
		close(done)
	}()
	_, _ = io.Copy(uc, os.Stdin)
	_ = uc.CloseWrite()
	<-done
	return exitOK
}

// mmdsStore is the MMDS data store and the guest's view of it.
type mmdsStore struct {
	limit int

	mu      sync.Mutex
	data    map[string]any
	version string
	tokens  map[string]time.Time
	sock    string
}

func newMMDSStore(limit int) *mmdsStore {
	return &mmdsStore{limit: limit, version: "V1", tokens: map[string]time.Time{}}
}

func (s *mmdsStore) setVersion(v string) {
	s.mu.Lock()
	s.version = v
	s.mu.Unlock()
}

func (s *mmdsStore) put(raw []byte) error {
	if len(raw) > s.limit {
		return fmt.Errorf("The MMDS patch request doesn't fit.")
	}
	var m map[string]any
	if err := json.Unmarshal(raw, &m); err != nil {
		return fmt.Errorf("An error occurred when deserializing the json body of a request: %v", err)
	}
	s.mu.Lock()
	s.data = m
	s.mu.Unlock()
	return nil
}

// patch applies a JSON merge patch (RFC 7396), as Firecracker does.
func (s *mmdsStore) patch(raw []byte) error {
	var p map[string]any
	if err := json.Unmarshal(raw, &p); err != nil {
		return fmt.Errorf("An error occurred when deserializing the json body of a request: %v", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.data == nil {
		return fmt.Errorf("The MMDS data store is not initialized.")
	}
	merged := mergePatch(s.data, p)
	if b, _ := json.Marshal(merged); len(b) > s.limit {
		return fmt.Errorf("The MMDS patch request doesn't fit.")
	}
	s.data = merged
	return nil
}

func mergePatch(target, patch map[string]any) map[string]any {
	out := make(map[string]any, len(target))
	for k, v := range target {
		out[k] = v
	}
	for k, v := range patch {
		switch pv := v.(type) {
		case nil:
			delete(out, k)
		case map[string]any:
			t, _ := out[k].(map[string]any)
			if t == nil {
				t = map[string]any{}
			}
			out[k] = mergePatch(t, pv)
		default:
			out[k] = v
		}
	}
	return out
}

func (s *mmdsStore) get() (map[string]any, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.data, s.data != nil
}

// listen starts the guest-facing server on a Unix socket (once).
func (s *mmdsStore) listen(path string, log *logger) (string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.sock != "" {
		return s.sock, nil
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return "", fmt.Errorf("MMDS: %v", err)
	}
	srv := &http.Server{Handler: s, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 60 * time.Second}
	go func() {
		if err := srv.Serve(l); err != nil {
			log.Errorf("MMDS server: %v", err)
		}
	}()
	s.sock = path
	return path, nil
}

// Token headers of MMDS V2 (Firecracker's and AWS's names).
var (
	ttlHeaders   = []string{"X-metadata-token-ttl-seconds", "X-aws-ec2-metadata-token-ttl-seconds"}
	tokenHeaders = []string{"X-metadata-token", "X-aws-ec2-metadata-token"}
)

func header(r *http.Request, names []string) string {
	for _, n := range names {
		if v := r.Header.Get(n); v != "" {
			return v
		}
	}
	return ""
}

// ServeHTTP answers the guest with Firecracker's MMDS semantics: GET on a
// path returns a string leaf as text or an object as a listing (one key a
// line, objects with a trailing '/'), or JSON with Accept:
// application/json; V2 requires a session token from PUT
// /latest/api/token.
func (s *mmdsStore) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch r.Method {
	case http.MethodPut:
		if strings.TrimSuffix(r.URL.Path, "/") != "/latest/api/token" {
			http.Error(w, "Not allowed HTTP method.", http.StatusMethodNotAllowed)
			return
		}
		if r.Header.Get("X-Forwarded-For") != "" {
			http.Error(w, "Invalid header. Reason: Unsupported header name. Key: X-Forwarded-For", http.StatusBadRequest)
			return
		}
		ttl, err := strconv.Atoi(header(r, ttlHeaders))
		if err != nil || ttl < 1 || ttl > 21600 {
			http.Error(w, "Invalid time to live value provided for token: "+header(r, ttlHeaders)+". Please provide a value between 1 and 21600.", http.StatusBadRequest)
			return
		}
		b := make([]byte, 32)
		_, _ = rand.Read(b)
		tok := base64.RawURLEncoding.EncodeToString(b)
		s.tokens[tok] = time.Now().Add(time.Duration(ttl) * time.Second)
		w.Header().Set("Content-Type", "text/plain")
		io.WriteString(w, tok)
		return
	case http.MethodGet:
	default:
		http.Error(w, "Not allowed HTTP method.", http.StatusMethodNotAllowed)
		return
	}
	tok := header(r, tokenHeaders)
	if s.version == "V2" || tok != "" {
		exp, ok := s.tokens[tok]
		if !ok || time.Now().After(exp) {
			http.Error(w, "No MMDS token provided. Use `X-metadata-token` header to specify the session token.", http.StatusUnauthorized)
			return
		}
	}
	if s.data == nil {
		http.Error(w, "The MMDS data store is not initialized.", http.StatusNotFound)
		return
	}
	var node any = s.data
	for _, seg := range strings.Split(strings.Trim(r.URL.Path, "/"), "/") {
		if seg == "" {
			continue
		}
		m, ok := node.(map[string]any)
		if !ok {
			node = nil
			break
		}
		node = m[seg]
	}
	if node == nil {
		http.Error(w, "Resource not found: "+r.URL.Path+".", http.StatusNotFound)
		return
	}
	if strings.Contains(r.Header.Get("Accept"), "application/json") {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(node)
		return
	}
	w.Header().Set("Content-Type", "text/plain")
	switch n := node.(type) {
	case string:
		io.WriteString(w, n)
	case map[string]any:
		keys := make([]string, 0, len(n))
		for k, v := range n {
			if _, ok := v.(map[string]any); ok {
				k += "/"
			}
			keys = append(keys, k)
		}
		slices.Sort(keys)
		io.WriteString(w, strings.Join(keys, "\n"))
	default:
		http.Error(w, "Cannot retrieve value. The value has an unsupported type.", http.StatusNotImplemented)
	}
}
