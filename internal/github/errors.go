package github

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"

	"github.com/bradleyfalzon/ghinstallation/v2"
	gh "github.com/google/go-github/v79/github"
)

// Sentinel errors; every error from this package that comes from a GitHub
// answer wraps one of them (test with errors.Is).
var (
	ErrNotFound     = errors.New("not found")
	ErrConflict     = errors.New("already exists")
	ErrRunnerBusy   = errors.New("runner is running a job")
	ErrUnauthorized = errors.New("credentials rejected")
	ErrForbidden    = errors.New("permission denied")
	ErrNotInstalled = errors.New("GitHub App not installed")
	ErrRateLimited  = errors.New("rate limited")
	ErrInvalid      = errors.New("invalid request")
	ErrServer       = errors.New("GitHub server error")
)

// APIError is a failed GitHub answer: its status, GitHub's message and,
// when we know it, what to do about it.
type APIError struct {
	StatusCode int
	Message    string
	Hint       string
	kind       error
}

func (e *APIError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "GitHub answered %d", e.StatusCode)
	if e.Message != "" {
		b.WriteString(": ")
		b.WriteString(e.Message)
	}
	if e.Hint != "" {
		b.WriteString(" (")
		b.WriteString(e.Hint)
		b.WriteString(")")
	}
	return b.String()
}

func (e *APIError) Unwrap() error { return e.kind }

func kindOf(status int) error {
	switch {
	case status == http.StatusUnauthorized:
		return ErrUnauthorized
	case status == http.StatusForbidden:
		return ErrForbidden
	case status == http.StatusNotFound:
		return ErrNotFound
	case status == http.StatusConflict:
		return ErrConflict
	case status == http.StatusTooManyRequests:
		return ErrRateLimited
	case status >= 500:
		return ErrServer
	default:
		return ErrInvalid
	}
}

// restError turns what go-github or ghinstallation returned into an
// APIError with a hint for the scope's credentials.
func restError(scope Scope, app bool, err error) error {
	if err == nil || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	var hte *ghinstallation.HTTPError
	if errors.As(err, &hte) && hte.Response != nil {
		e := &APIError{StatusCode: hte.Response.StatusCode, Message: bodyMessage(hte.Response), kind: kindOf(hte.Response.StatusCode)}
		switch hte.Response.StatusCode {
		case http.StatusUnauthorized:
			e.Hint = "GitHub rejected the App's JWT while creating an installation token: check github.app_id and the private key"
		case http.StatusNotFound:
			e.Hint = "the App installation is gone: reinstall the GitHub App"
			e.kind = ErrNotInstalled
		}
		return e
	}
	var rle *gh.RateLimitError
	if errors.As(err, &rle) {
		return &APIError{StatusCode: http.StatusForbidden, Message: rle.Message, kind: ErrRateLimited,
			Hint: "primary rate limit exhausted until " + rle.Rate.Reset.Time.Format("15:04:05 MST")}
	}
	var are *gh.AbuseRateLimitError
	if errors.As(err, &are) {
		return &APIError{StatusCode: http.StatusForbidden, Message: are.Message, kind: ErrRateLimited}
	}
	var er *gh.ErrorResponse
	if errors.As(err, &er) && er.Response != nil {
		status := er.Response.StatusCode
		e := &APIError{StatusCode: status, Message: er.Message, kind: kindOf(status)}
		switch {
		case status == http.StatusForbidden:
			e.Hint = scope.permissionHint(app)
		case status == http.StatusUnauthorized:
			e.Hint = "the token was refused"
		case status == http.StatusUnprocessableEntity && strings.Contains(er.Message, "still running a job"):
			e.kind = ErrRunnerBusy
		}
		return e
	}
	return err
}

// bodyMessage extracts GitHub's "message" from an error body.
func bodyMessage(resp *http.Response) string {
	if resp.Body == nil {
		return ""
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	var m struct {
		Message string `json:"message"`
	}
	if json.Unmarshal(b, &m) == nil && m.Message != "" {
		return m.Message
	}
	return strings.TrimSpace(string(b))
}
