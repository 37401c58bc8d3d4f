package githubtest

import (
	"net/http"
	"path"
	"strconv"
	"strings"
	"time"
)

type fault struct {
	method  string
	pattern string
	status  int
	left    int
}

type rateFault struct {
	left       int
	reset      time.Time
	retryAfter time.Duration
}

// FailNext makes the next n requests whose path matches pattern fail with
// status (typically a 5xx). The pattern is a path with path.Match globs in
// each segment, optionally preceded by a method and a space, and may end in
// "/**" to match any remainder: "POST /orgs/*/actions/runners/generate-jitconfig",
// "/_actions/**". Paths are matched without the /api/v3 prefix.
func (s *Server) FailNext(pattern string, status, n int) {
	method := ""
	if m, p, ok := strings.Cut(pattern, " "); ok {
		method, pattern = m, p
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults = append(s.faults, &fault{method: method, pattern: pattern, status: status, left: n})
}

// RateLimit makes the next n REST API requests fail the way GitHub reports
// an exhausted primary rate limit: 403 with X-RateLimit-Remaining: 0 and
// X-RateLimit-Reset set to reset.
func (s *Server) RateLimit(n int, reset time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.primary = &rateFault{left: n, reset: reset}
}

// SecondaryRateLimit makes the next n REST API requests fail the way GitHub
// reports a secondary rate limit: 403 with a Retry-After header.
func (s *Server) SecondaryRateLimit(n int, retryAfter time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.secondary = &rateFault{left: n, retryAfter: retryAfter}
}

// injectFault answers the request itself when a fault applies, and sets the
// rate limit headers on REST responses. It reports whether it answered.
func (s *Server) injectFault(w http.ResponseWriter, r *http.Request) bool {
	s.mu.Lock()
	var hit *fault
	for _, f := range s.faults {
		if f.left > 0 && (f.method == "" || f.method == r.Method) && matchPath(f.pattern, r.URL.Path) {
			f.left--
			hit = f
			break
		}
	}
	rest := isREST(r.URL.Path)
	var primary, secondary bool
	if hit == nil && rest {
		if s.secondary != nil && s.secondary.left > 0 {
			s.secondary.left--
			secondary = true
		} else if s.primary != nil && s.primary.left > 0 {
			s.primary.left--
			primary = true
		}
	}
	if rest {
		now := s.now()
		if s.rateWindow.IsZero() || !now.Before(s.rateWindow) {
			s.rateWindow = now.Add(time.Hour).Truncate(time.Second)
			s.rateUsed = 0
		}
		s.rateUsed++
		h := w.Header()
		h.Set("X-RateLimit-Limit", strconv.Itoa(s.opts.RateLimit))
		h.Set("X-RateLimit-Remaining", strconv.Itoa(max(0, s.opts.RateLimit-s.rateUsed)))
		h.Set("X-RateLimit-Used", strconv.Itoa(s.rateUsed))
		h.Set("X-RateLimit-Reset", strconv.FormatInt(s.rateWindow.Unix(), 10))
		h.Set("X-RateLimit-Resource", "core")
		if primary {
			h.Set("X-RateLimit-Remaining", "0")
			h.Set("X-RateLimit-Used", strconv.Itoa(s.opts.RateLimit))
			h.Set("X-RateLimit-Reset", strconv.FormatInt(s.primary.reset.Unix(), 10))
		}
		if secondary {
			h.Set("Retry-After", strconv.Itoa(int(s.secondary.retryAfter/time.Second)))
		}
	}
	s.mu.Unlock()

	switch {
	case hit != nil:
		if rest {
			writeError(w, hit.status, http.StatusText(hit.status))
		} else {
			writeJSON(w, hit.status, map[string]string{
				"typeName": "GitHub.Services.WebApi.VssServiceException",
				"message":  http.StatusText(hit.status),
			})
		}
		return true
	case primary:
		writeJSON(w, http.StatusForbidden, map[string]string{
			"message":           "API rate limit exceeded for installation.",
			"documentation_url": "https://docs.github.com/rest/overview/rate-limits-for-the-rest-api#about-the-primary-rate-limit",
		})
		return true
	case secondary:
		writeJSON(w, http.StatusForbidden, map[string]string{
			"message":           "You have exceeded a secondary rate limit. Please wait a few minutes before you try again.",
			"documentation_url": "https://docs.github.com/rest/overview/rate-limits-for-the-rest-api#about-secondary-rate-limits",
		})
		return true
	}
	return false
}

// matchPath matches a slash-separated path against a pattern whose
// segments are path.Match globs and whose last segment may be "**".
func matchPath(pattern, p string) bool {
	if pattern == "" || pattern == "/**" {
		return true
	}
	ps := strings.Split(strings.Trim(pattern, "/"), "/")
	xs := strings.Split(strings.Trim(p, "/"), "/")
	for i, seg := range ps {
		if seg == "**" && i == len(ps)-1 {
			return true
		}
		if i >= len(xs) {
			return false
		}
		if ok, err := path.Match(seg, xs[i]); err != nil || !ok {
			return false
		}
	}
	return len(xs) == len(ps)
}
