package github

import (
	"bytes"
	"context"
	"crypto/tls"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-cleanhttp"
	"github.com/hashicorp/go-retryablehttp"
)

// RetryPolicy bounds how GitHub API requests are retried: server errors
// with exponential backoff and jitter, rate limits after the wait GitHub
// asks for.
type RetryPolicy struct {
	// MaxRetries is how many times one request is retried. Default 5.
	MaxRetries int
	// BaseDelay is the first backoff step; each retry doubles it. Default 1s.
	BaseDelay time.Duration
	// MaxDelay caps one backoff step. Default 30s.
	MaxDelay time.Duration
	// MaxRateLimitWait is the longest rate limit wait sat out in place; a
	// longer one fails the request with ErrRateLimited so the caller can
	// back off as a whole. Default 2m.
	MaxRateLimitWait time.Duration
}

func (p *RetryPolicy) defaults() {
	if p.MaxRetries == 0 {
		p.MaxRetries = 5
	}
	if p.BaseDelay == 0 {
		p.BaseDelay = time.Second
	}
	if p.MaxDelay == 0 {
		p.MaxDelay = 30 * time.Second
	}
	if p.MaxRateLimitWait == 0 {
		p.MaxRateLimitWait = 2 * time.Minute
	}
}

// Sleeper waits d or until ctx ends. Tests substitute one that records the
// waits instead of sleeping.
type Sleeper func(ctx context.Context, d time.Duration) error

// sleepCtx is the real Sleeper.
func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// ErrorKind classifies failed GitHub API requests for metrics.
type ErrorKind string

const (
	KindServer       ErrorKind = "server_error"
	KindRateLimited  ErrorKind = "rate_limited"
	KindUnauthorized ErrorKind = "unauthorized"
	KindForbidden    ErrorKind = "forbidden"
	KindNotFound     ErrorKind = "not_found"
	KindConflict     ErrorKind = "conflict"
	KindClient       ErrorKind = "client_error"
	KindNetwork      ErrorKind = "network"
)

// RateLimit is the REST API rate limit GitHub last reported.
type RateLimit struct {
	Limit     int
	Remaining int
	Reset     time.Time
	Resource  string
	// Observed is when it was reported; zero when no response carried it.
	Observed time.Time
}

// Stats counts the client's GitHub API traffic, for metrics. Every
// attempt counts, retried ones included.
type Stats struct {
	Requests  uint64
	Retries   uint64
	Errors    map[ErrorKind]uint64
	RateLimit RateLimit
}

type meter struct {
	mu       sync.Mutex
	requests uint64
	retries  uint64
	errors   map[ErrorKind]uint64
	rate     RateLimit
}

func (m *meter) snapshot() Stats {
	m.mu.Lock()
	defer m.mu.Unlock()
	errs := make(map[ErrorKind]uint64, len(m.errors))
	for k, v := range m.errors {
		errs[k] = v
	}
	return Stats{Requests: m.requests, Retries: m.retries, Errors: errs, RateLimit: m.rate}
}

func (m *meter) count(k ErrorKind) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.errors == nil {
		m.errors = map[ErrorKind]uint64{}
	}
	m.errors[k]++
}

// authRetryWait is the pause before the scale set client retries a 401 or
// 403 that is not a rate limit.
const authRetryWait = 250 * time.Millisecond

// secondaryMarker is set on a response found to be a secondary rate limit
// by its body, because retryablehttp drains the body before the backoff
// looks at the response again.
const secondaryMarker = "X-Fireactions-Secondary-Rate-Limit"

// rateLimitWait reports whether resp is a rate limit answer and how long
// GitHub wants us to wait: Retry-After first, then X-RateLimit-Reset when
// nothing remains, else a minute (GitHub's advice for secondary limits).
func rateLimitWait(resp *http.Response, now time.Time) (time.Duration, bool) {
	if resp.StatusCode != http.StatusForbidden && resp.StatusCode != http.StatusTooManyRequests {
		return 0, false
	}
	h := resp.Header
	if ra := h.Get("Retry-After"); ra != "" {
		if secs, err := strconv.Atoi(strings.TrimSpace(ra)); err == nil && secs >= 0 {
			return time.Duration(secs) * time.Second, true
		}
		if t, err := http.ParseTime(ra); err == nil {
			return max(0, t.Sub(now)), true
		}
	}
	if h.Get("X-RateLimit-Remaining") == "0" {
		if reset, err := strconv.ParseInt(h.Get("X-RateLimit-Reset"), 10, 64); err == nil {
			return max(0, time.Unix(reset, 0).Sub(now)+time.Second), true
		}
		return time.Minute, true
	}
	if h.Get(secondaryMarker) != "" || resp.StatusCode == http.StatusTooManyRequests {
		return time.Minute, true
	}
	return 0, false
}

// markSecondary reads a 403 body to spot GitHub's secondary rate limit
// message, leaving the body readable.
func markSecondary(resp *http.Response) {
	if resp.StatusCode != http.StatusForbidden || resp.Body == nil {
		return
	}
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	resp.Body = io.NopCloser(io.MultiReader(bytes.NewReader(b), resp.Body))
	if bytes.Contains(bytes.ToLower(b), []byte("secondary rate limit")) {
		resp.Header.Set(secondaryMarker, "1")
	}
}

func (c *Client) checkRetry(ctx context.Context, resp *http.Response, err error) (bool, error) {
	if ctx.Err() != nil {
		return false, ctx.Err()
	}
	if err != nil {
		c.meter.count(KindNetwork)
		return retryablehttp.DefaultRetryPolicy(ctx, resp, err)
	}
	markSecondary(resp)
	if wait, limited := rateLimitWait(resp, c.now()); limited {
		return wait <= c.retry.MaxRateLimitWait, nil
	}
	return resp.StatusCode >= 500 && resp.StatusCode != http.StatusNotImplemented, nil
}

// backoff picks the wait before a retry. With a test Sleeper it waits
// through it and tells retryablehttp not to wait again.
func (c *Client) backoff(_, _ time.Duration, attempt int, resp *http.Response) time.Duration {
	d, limited := time.Duration(0), false
	if resp != nil {
		d, limited = rateLimitWait(resp, c.now())
	}
	switch {
	case limited:
	case resp != nil && (resp.StatusCode == http.StatusUnauthorized || resp.StatusCode == http.StatusForbidden):
		// Only the scale set client retries these (a fresh registration
		// token can take a moment to be honoured); a refusal that lasts is
		// better reported soon.
		d = authRetryWait
	default:
		d = c.retry.BaseDelay << min(attempt, 20)
		if d <= 0 || d > c.retry.MaxDelay {
			d = c.retry.MaxDelay
		}
		d = d/2 + rand.N(d/2+1)
	}
	c.meter.mu.Lock()
	c.meter.retries++
	c.meter.mu.Unlock()
	attrs := []any{slog.Int("attempt", attempt+1), slog.Duration("wait", d)}
	ctx := context.Background()
	if resp != nil && resp.Request != nil {
		ctx = resp.Request.Context()
		attrs = append(attrs, slog.String("method", resp.Request.Method),
			slog.String("path", resp.Request.URL.Path), slog.Int("status", resp.StatusCode))
	}
	c.log.Warn("retrying GitHub API request", attrs...)
	if c.sleeper != nil {
		_ = c.sleeper(ctx, d)
		return 0
	}
	return d
}

// observe records every response: its rate limit headers and, for
// failures, their kind.
func (c *Client) observe(_ retryablehttp.Logger, resp *http.Response) {
	m := &c.meter
	m.mu.Lock()
	m.requests++
	if rem := resp.Header.Get("X-RateLimit-Remaining"); rem != "" {
		r := RateLimit{Resource: resp.Header.Get("X-RateLimit-Resource"), Observed: c.now()}
		r.Remaining, _ = strconv.Atoi(rem)
		r.Limit, _ = strconv.Atoi(resp.Header.Get("X-RateLimit-Limit"))
		if reset, err := strconv.ParseInt(resp.Header.Get("X-RateLimit-Reset"), 10, 64); err == nil {
			r.Reset = time.Unix(reset, 0)
		}
		m.rate = r
	}
	m.mu.Unlock()
	if resp.StatusCode < 400 {
		return
	}
	var kind ErrorKind
	switch _, limited := rateLimitWait(resp, c.now()); {
	case limited:
		kind = KindRateLimited
	case resp.StatusCode == http.StatusUnauthorized:
		kind = KindUnauthorized
	case resp.StatusCode == http.StatusForbidden:
		kind = KindForbidden
	case resp.StatusCode == http.StatusNotFound:
		kind = KindNotFound
	case resp.StatusCode == http.StatusConflict:
		kind = KindConflict
	case resp.StatusCode >= 500:
		kind = KindServer
	default:
		kind = KindClient
	}
	m.count(kind)
	if resp.Request != nil {
		c.log.Debug("GitHub API error answer", slog.String("method", resp.Request.Method),
			slog.String("path", resp.Request.URL.Path), slog.Int("status", resp.StatusCode), slog.String("kind", string(kind)))
	}
}

// newRetryable builds a retrying HTTP client with this client's policy,
// hooks and timeout. Its transport is a plain *http.Transport, which the
// scale set client requires.
func (c *Client) newRetryable(timeout time.Duration) *retryablehttp.Client {
	hc := cleanhttp.DefaultPooledClient()
	hc.Timeout = timeout
	if c.rootCAs != nil {
		hc.Transport.(*http.Transport).TLSClientConfig = &tls.Config{RootCAs: c.rootCAs, MinVersion: tls.VersionTLS12}
	}
	return &retryablehttp.Client{
		HTTPClient:      hc,
		RetryWaitMin:    c.retry.BaseDelay,
		RetryWaitMax:    c.retry.MaxDelay,
		RetryMax:        c.retry.MaxRetries,
		CheckRetry:      c.checkRetry,
		Backoff:         c.backoff,
		ResponseLogHook: c.observe,
		// Hand the last answer to the caller instead of a generic "giving
		// up" error, so GitHub's own message reaches the user.
		ErrorHandler: retryablehttp.PassthroughErrorHandler,
	}
}
