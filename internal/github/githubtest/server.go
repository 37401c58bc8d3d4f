// Package githubtest is a fake GitHub for tests: an httptest.Server that
// speaks the parts of the GitHub REST API and of the Actions runner scale set
// service that fireactions uses, and that is as strict as the real one about
// credentials.
//
// It verifies the App JWT (RS256, against the App's public key, iss/iat/exp
// checked the way GitHub checks them), issues expiring installation tokens
// and only honours them for the installation's own account, repositories and
// permissions, accepts classic personal access tokens registered with
// AddToken (enterprise runners need one: GitHub Apps cannot manage them),
// generates just-in-time runner configurations, lists, gets and deletes
// runners, and serves the scale set API that github.com/actions/scaleset
// v0.4.0 talks to: registration tokens, the runner-registration handshake,
// scale set CRUD, message sessions, long-poll messages with statistics,
// message deletion, job acquisition, scale set JIT configs and runner
// removal.
//
// Tests drive jobs with QueueJob, AssignJob, StartJob and CompleteJob, inject
// faults with FailNext, RateLimit and SecondaryRateLimit, and inspect what
// happened with Calls, Runners, Jobs and Secrets.
//
// The REST API is served both at the root and under /api/v3 (the GitHub
// Enterprise Server layout); use APIURL as the client's API base URL and
// WebURL as the GitHub web URL.
package githubtest

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
)

// Options configures a fake GitHub. The zero value of every field but
// PublicKey has a sensible default.
type Options struct {
	// AppID is the GitHub App's id; JWTs must carry it as "iss" (as a number
	// or a decimal string). Default 1.
	AppID int64
	// ClientID, when set, is also accepted as "iss" (GitHub accepts the
	// App's client id there too).
	ClientID string
	// PublicKey verifies App JWTs. Required.
	PublicKey *rsa.PublicKey
	// TokenTTL is the lifetime of installation access tokens. Default 1h,
	// like GitHub.
	TokenTTL time.Duration
	// AdminTokenTTL is the lifetime of the Actions service admin token handed
	// out by the runner-registration handshake. Default 1h.
	AdminTokenTTL time.Duration
	// LongPoll is how long a message GET waits for a message before
	// answering 202 Accepted. Default 10s (GitHub holds it about 50s).
	LongPoll time.Duration
	// SessionIdleTimeout is how long a message session survives without its
	// owner polling; a new session for the same scale set is refused with a
	// conflict until then. Default 2m.
	SessionIdleTimeout time.Duration
	// ManualAssign stops the fake from assigning acquired jobs on its own;
	// tests then call AssignJob. GitHub assigns them itself.
	ManualAssign bool
	// RateLimit is the X-RateLimit-Limit the REST API reports. Default 5000.
	RateLimit int
}

func (o *Options) defaults() {
	if o.AppID == 0 {
		o.AppID = 1
	}
	if o.TokenTTL == 0 {
		o.TokenTTL = time.Hour
	}
	if o.AdminTokenTTL == 0 {
		o.AdminTokenTTL = time.Hour
	}
	if o.LongPoll == 0 {
		o.LongPoll = 10 * time.Second
	}
	if o.SessionIdleTimeout == 0 {
		o.SessionIdleTimeout = 2 * time.Minute
	}
	if o.RateLimit == 0 {
		o.RateLimit = 5000
	}
}

// Server is a running fake GitHub.
type Server struct {
	srv      *httptest.Server
	opts     Options
	adminKey []byte
	done     chan struct{}
	closeMu  sync.Once

	mu      sync.Mutex
	changed chan struct{} // closed and replaced whenever jobs or messages change
	offset  time.Duration // added to the wall clock for everything the fake issues
	nextID  int64

	installations map[int64]*installation
	tokens        map[string]*instToken
	pats          map[string][]string
	regTokens     map[string]*regToken
	tenants       map[string]*tenant // by tenant id
	groups        map[string][]*runnerGroup
	runners       map[int64]*runner
	scaleSets     map[int]*scaleSet
	sessions      map[string]*session
	jobs          map[int64]*job

	calls      []Call
	faults     []*fault
	primary    *rateFault
	secondary  *rateFault
	rateUsed   int
	rateWindow time.Time
	secrets    []string
	webhook    *webhookTarget
	deliveries []Delivery
}

// Start starts a fake GitHub on 127.0.0.1. Close it when done.
func Start(opts Options) (*Server, error) {
	if opts.PublicKey == nil {
		return nil, fmt.Errorf("githubtest: Options.PublicKey is required (the App's public key)")
	}
	opts.defaults()
	s := &Server{
		opts:          opts,
		adminKey:      randomBytes(32),
		done:          make(chan struct{}),
		changed:       make(chan struct{}),
		nextID:        1000,
		installations: map[int64]*installation{},
		tokens:        map[string]*instToken{},
		pats:          map[string][]string{},
		regTokens:     map[string]*regToken{},
		tenants:       map[string]*tenant{},
		groups:        map[string][]*runnerGroup{},
		runners:       map[int64]*runner{},
		scaleSets:     map[int]*scaleSet{},
		sessions:      map[string]*session{},
		jobs:          map[int64]*job{},
	}
	s.srv = httptest.NewServer(s.handler())
	return s, nil
}

// New starts a fake GitHub whose App is checked against publicKey and closes
// it when the test ends.
func New(t testing.TB, publicKey *rsa.PublicKey, opts ...func(*Options)) *Server {
	t.Helper()
	o := Options{PublicKey: publicKey}
	for _, f := range opts {
		f(&o)
	}
	s, err := Start(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s
}

// Close stops the server; pending long polls return at once.
func (s *Server) Close() {
	s.closeMu.Do(func() {
		close(s.done)
		s.srv.CloseClientConnections()
		s.srv.Close()
	})
}

// URL is the server's root, e.g. http://127.0.0.1:PORT.
func (s *Server) URL() string { return s.srv.URL }

// APIURL is the REST API base URL in the GitHub Enterprise Server layout,
// http://127.0.0.1:PORT/api/v3/ — what github.api_url should be set to.
func (s *Server) APIURL() string { return s.srv.URL + "/api/v3/" }

// WebURL is the GitHub web URL matching APIURL.
func (s *Server) WebURL() string { return s.srv.URL }

// AppID is the App id JWTs must carry.
func (s *Server) AppID() int64 { return s.opts.AppID }

// Advance moves the fake's clock forward: installation, registration, admin
// and session tokens it issued expire and idle sessions lapse as if d had
// passed. App JWTs are still checked against the wall clock, since the
// client signs them with it.
func (s *Server) Advance(d time.Duration) {
	s.mu.Lock()
	s.offset += d
	s.mu.Unlock()
}

// now is the fake's clock; callers hold s.mu or accept a racy read.
func (s *Server) now() time.Time { return time.Now().Add(s.offset) }

func (s *Server) newID() int64 {
	s.nextID++
	return s.nextID
}

// notify wakes long polls; call with s.mu held.
func (s *Server) notify() {
	close(s.changed)
	s.changed = make(chan struct{})
}

// remember records a secret the fake handed out; call with s.mu held.
func (s *Server) remember(secret string) { s.secrets = append(s.secrets, secret) }

// Secrets returns every credential and JIT configuration the fake has issued
// (installation tokens, registration tokens, admin and session tokens,
// encoded JIT configs), so tests can assert none of them reached a log or
// an API response.
func (s *Server) Secrets() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.secrets...)
}

// Call is one request the fake received.
type Call struct {
	Time   time.Time
	Method string
	// Path is the request path with any /api/v3 prefix removed.
	Path  string
	Query string
	// Status is the status code the fake answered.
	Status int
	// AuthScheme is the first word of the Authorization header ("Bearer",
	// "token", "RemoteAuth") or "".
	AuthScheme string
}

// Calls returns every request received so far, in order.
func (s *Server) Calls() []Call {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Call(nil), s.calls...)
}

// CountCalls counts the calls whose method matches (empty matches any) and
// whose path matches pattern (see FailNext for the pattern syntax).
func (s *Server) CountCalls(method, pattern string) int {
	n := 0
	for _, c := range s.Calls() {
		if (method == "" || c.Method == method) && matchPath(pattern, c.Path) {
			n++
		}
	}
	return n
}

func (s *Server) handler() http.Handler {
	mux := http.NewServeMux()
	s.routeREST(mux)
	s.routeActions(mux)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeNotFound(w)
	})
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if p, ok := strings.CutPrefix(r.URL.Path, "/api/v3"); ok && (p == "" || p[0] == '/') {
			r.URL.Path = p
			r.URL.RawPath = ""
		}
		rec := &statusRecorder{ResponseWriter: w, status: http.StatusOK}
		scheme, _, _ := strings.Cut(r.Header.Get("Authorization"), " ")
		defer func() {
			s.mu.Lock()
			s.calls = append(s.calls, Call{
				Time: time.Now(), Method: r.Method, Path: r.URL.Path, Query: r.URL.RawQuery,
				Status: rec.status, AuthScheme: scheme,
			})
			s.mu.Unlock()
		}()
		if r.Header.Get("User-Agent") == "" {
			// GitHub refuses requests without a User-Agent.
			writeError(rec, http.StatusForbidden, "Request forbidden by administrative rules. Please make sure your request has a User-Agent header")
			return
		}
		if s.injectFault(rec, r) {
			return
		}
		mux.ServeHTTP(rec, r)
	})
}

// isREST reports whether a normalized path belongs to the REST API (rather
// than to the Actions service), which is what carries rate limit headers.
func isREST(path string) bool { return !strings.HasPrefix(path, actionsPrefix) }

type statusRecorder struct {
	http.ResponseWriter
	status int
	wrote  bool
}

func (r *statusRecorder) WriteHeader(code int) {
	if !r.wrote {
		r.status = code
		r.wrote = true
	}
	r.ResponseWriter.WriteHeader(code)
}

func (r *statusRecorder) Write(b []byte) (int, error) {
	r.wrote = true
	return r.ResponseWriter.Write(b)
}

func (r *statusRecorder) Flush() {
	if f, ok := r.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

// writeJSON answers with v as JSON.
func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// writeError answers in GitHub's REST error shape.
func writeError(w http.ResponseWriter, status int, msg string) {
	writeJSON(w, status, map[string]string{
		"message":           msg,
		"documentation_url": "https://docs.github.com/rest",
		"status":            fmt.Sprint(status),
	})
}

func writeNotFound(w http.ResponseWriter) { writeError(w, http.StatusNotFound, "Not Found") }

// writeValidation answers 422 the way GitHub reports invalid input.
func writeValidation(w http.ResponseWriter, msg string) {
	writeError(w, http.StatusUnprocessableEntity, msg)
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return b
}

func randomToken(prefix string, n int) string {
	const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
	b := randomBytes(n)
	for i := range b {
		b[i] = alphabet[int(b[i])%len(alphabet)]
	}
	return prefix + string(b)
}

func newUUID() string {
	b := randomBytes(16)
	b[6] = (b[6] & 0x0f) | 0x40
	b[8] = (b[8] & 0x3f) | 0x80
	h := hex.EncodeToString(b)
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

// waitChange blocks until the fake's state changes, ctx ends, the server
// closes or d passes; it reports whether something changed.
func (s *Server) waitChange(ctx context.Context, ch <-chan struct{}, timer <-chan time.Time) bool {
	select {
	case <-ch:
		return true
	case <-ctx.Done():
	case <-s.done:
	case <-timer:
	}
	return false
}
