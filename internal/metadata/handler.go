package metadata

import (
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"log/slog"
	"maps"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Version selects how the guest authenticates, as Firecracker's MMDS
// version does.
type Version string

const (
	// V1 answers GET requests with or without a session token (a token,
	// when sent, is not checked), like Firecracker's deprecated V1.
	V1 Version = "V1"
	// V2 requires a session token from PUT /latest/api/token on every GET.
	V2 Version = "V2"
)

// Token limits, as Firecracker's MMDS applies them.
const (
	TokenPath      = "/latest/api/token"
	MaxTokenTTL    = 21600 * time.Second
	maxLiveTokens  = 1024
	tokenTTLHeader = "X-metadata-token-ttl-seconds"
	tokenHeader    = "X-metadata-token"
	// AWS's names for the same headers; clients written for EC2 send these.
	awsTokenTTLHeader = "X-aws-ec2-metadata-token-ttl-seconds"
	awsTokenHeader    = "X-aws-ec2-metadata-token"
)

// Handler serves a Document with MMDS semantics: GET on a path returns a
// string leaf as plain text, or an object as an IMDS listing (one key per
// line, subtrees with a trailing '/'), or either as JSON when the client
// sends Accept: application/json. PUT /latest/api/token issues session
// tokens. The document can be replaced while serving.
type Handler struct {
	version Version
	now     func() time.Time

	mu     sync.RWMutex
	doc    Document
	tokens map[string]time.Time // token → expiry
}

// NewHandler serves doc under the given MMDS version.
func NewHandler(doc Document, v Version) (*Handler, error) {
	if v != V1 && v != V2 {
		return nil, fmt.Errorf("metadata: MMDS version %q: use V1 or V2", v)
	}
	if doc.root == nil {
		return nil, fmt.Errorf("metadata: empty document; build it with New")
	}
	return &Handler{version: v, now: time.Now, doc: doc, tokens: map[string]time.Time{}}, nil
}

// Update replaces the served document (Firecracker's PUT /mmds).
func (h *Handler) Update(doc Document) {
	h.mu.Lock()
	h.doc = doc
	h.mu.Unlock()
}

func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch r.Method {
	case http.MethodPut:
		h.issueToken(w, r)
	case http.MethodGet, http.MethodHead:
		h.get(w, r)
	default:
		w.Header().Set("Allow", "GET, PUT")
		http.Error(w, "method not allowed: use GET, or PUT "+TokenPath, http.StatusMethodNotAllowed)
	}
}

func (h *Handler) issueToken(w http.ResponseWriter, r *http.Request) {
	if strings.TrimSuffix(r.URL.Path, "/") != TokenPath {
		w.Header().Set("Allow", "GET")
		http.Error(w, "PUT is only accepted on "+TokenPath, http.StatusMethodNotAllowed)
		return
	}
	// A request relayed by a proxy inside the guest must not get a token:
	// that is what keeps SSRF from reaching the metadata.
	if r.Header.Get("X-Forwarded-For") != "" {
		http.Error(w, "token requests must not carry X-Forwarded-For", http.StatusBadRequest)
		return
	}
	raw := r.Header.Get(tokenTTLHeader)
	if raw == "" {
		raw = r.Header.Get(awsTokenTTLHeader)
	}
	secs, err := strconv.Atoi(raw)
	if err != nil || secs < 1 || time.Duration(secs)*time.Second > MaxTokenTTL {
		http.Error(w, fmt.Sprintf("%s must be a number of seconds from 1 to %d", tokenTTLHeader, int(MaxTokenTTL.Seconds())), http.StatusBadRequest)
		return
	}
	var b [32]byte
	if _, err := rand.Read(b[:]); err != nil {
		slog.Error("metadata: no randomness for a session token", "err", err)
		http.Error(w, "cannot issue a token", http.StatusInternalServerError)
		return
	}
	token := base64.RawURLEncoding.EncodeToString(b[:])
	now := h.now()
	h.mu.Lock()
	for t, exp := range h.tokens {
		if !now.Before(exp) {
			delete(h.tokens, t)
		}
	}
	if len(h.tokens) >= maxLiveTokens {
		// A guest asking for tokens in a loop must not grow our memory:
		// forget the one closest to expiry.
		oldest := slices.MinFunc(slices.Collect(maps.Keys(h.tokens)), func(a, b string) int {
			return h.tokens[a].Compare(h.tokens[b])
		})
		delete(h.tokens, oldest)
	}
	h.tokens[token] = now.Add(time.Duration(secs) * time.Second)
	h.mu.Unlock()
	w.Header().Set("Content-Type", "text/plain")
	fmt.Fprint(w, token)
}

func (h *Handler) validToken(token string) bool {
	if token == "" {
		return false
	}
	h.mu.RLock()
	exp, ok := h.tokens[token]
	h.mu.RUnlock()
	return ok && h.now().Before(exp)
}

func (h *Handler) get(w http.ResponseWriter, r *http.Request) {
	if h.version == V2 {
		token := r.Header.Get(tokenHeader)
		if token == "" {
			token = r.Header.Get(awsTokenHeader)
		}
		if !h.validToken(token) {
			http.Error(w, "a valid session token is required: PUT "+TokenPath+" with "+tokenTTLHeader+", then send it in "+tokenHeader, http.StatusUnauthorized)
			return
		}
	}
	h.mu.RLock()
	doc := h.doc
	h.mu.RUnlock()

	p := strings.Trim(r.URL.Path, "/")
	node, ok := doc.lookup(p)
	if !ok {
		http.NotFound(w, r)
		return
	}
	if wantsJSON(r) {
		out, err := encode(node)
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.Write(out)
		return
	}
	w.Header().Set("Content-Type", "text/plain")
	switch v := node.(type) {
	case string:
		fmt.Fprint(w, v)
	case map[string]any:
		keys := slices.Sorted(maps.Keys(v))
		for i, k := range keys {
			if _, sub := v[k].(map[string]any); sub {
				keys[i] = k + "/"
			}
		}
		fmt.Fprint(w, strings.Join(keys, "\n"))
	}
}

func wantsJSON(r *http.Request) bool {
	for _, v := range r.Header.Values("Accept") {
		for _, part := range strings.Split(v, ",") {
			mt, _, _ := strings.Cut(strings.TrimSpace(part), ";")
			if strings.EqualFold(strings.TrimSpace(mt), "application/json") {
				return true
			}
		}
	}
	return false
}
