package github

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"net/http"
	"slices"
	"strings"

	"github.com/fireactions/fireactions/internal/config"
)

// SignatureHeader carries the HMAC-SHA256 of a webhook body.
const SignatureHeader = "X-Hub-Signature-256"

// maxWebhookBody is GitHub's cap on webhook payloads (25 MB).
const maxWebhookBody = 25 << 20

// ErrBadSignature is returned for a webhook whose signature is missing or
// does not match.
var ErrBadSignature = errors.New("webhook signature does not match")

// VerifySignature checks a webhook body against the value of its
// X-Hub-Signature-256 header ("sha256=<hex>") in constant time.
func VerifySignature(secret config.Secret, body []byte, signature string) error {
	if secret == "" {
		return errors.New("verify webhook: no webhook secret configured; refusing unsigned deliveries")
	}
	hexSum, ok := strings.CutPrefix(signature, "sha256=")
	if !ok {
		return fmt.Errorf("verify webhook: %w: %s must start with sha256=", ErrBadSignature, SignatureHeader)
	}
	got, err := hex.DecodeString(hexSum)
	if err != nil || len(got) != sha256.Size {
		return fmt.Errorf("verify webhook: %w: %s is not a hex SHA-256", ErrBadSignature, SignatureHeader)
	}
	m := hmac.New(sha256.New, []byte(secret.Reveal()))
	m.Write(body)
	if !hmac.Equal(got, m.Sum(nil)) {
		return fmt.Errorf("verify webhook: %w", ErrBadSignature)
	}
	return nil
}

// WorkflowJobEvent is the part of a workflow_job webhook a pool acts on.
type WorkflowJobEvent struct {
	// Action is queued, waiting, in_progress or completed.
	Action     string
	JobID      int64
	RunID      int64
	Labels     []string
	Status     string
	Conclusion string
	// RunnerID and RunnerName are set once a runner took the job.
	RunnerID      int64
	RunnerName    string
	RunnerGroupID int64
	Repository    string // owner/name
	Organization  string
	Enterprise    string
	Installation  int64
}

// ErrNotWorkflowJob is returned by ParseWorkflowJob for other events.
var ErrNotWorkflowJob = errors.New("not a workflow_job event")

// ParseWorkflowJob decodes a workflow_job webhook; eventType is the
// X-GitHub-Event header.
func ParseWorkflowJob(eventType string, body []byte) (WorkflowJobEvent, error) {
	if eventType != "workflow_job" {
		return WorkflowJobEvent{}, fmt.Errorf("parse webhook: event %q: %w", eventType, ErrNotWorkflowJob)
	}
	var p struct {
		Action      string `json:"action"`
		WorkflowJob *struct {
			ID            int64    `json:"id"`
			RunID         int64    `json:"run_id"`
			Labels        []string `json:"labels"`
			Status        string   `json:"status"`
			Conclusion    *string  `json:"conclusion"`
			RunnerID      *int64   `json:"runner_id"`
			RunnerName    *string  `json:"runner_name"`
			RunnerGroupID *int64   `json:"runner_group_id"`
		} `json:"workflow_job"`
		Repository *struct {
			FullName string `json:"full_name"`
		} `json:"repository"`
		Organization *struct {
			Login string `json:"login"`
		} `json:"organization"`
		Enterprise *struct {
			Slug string `json:"slug"`
		} `json:"enterprise"`
		Installation *struct {
			ID int64 `json:"id"`
		} `json:"installation"`
	}
	if err := json.Unmarshal(body, &p); err != nil {
		return WorkflowJobEvent{}, fmt.Errorf("parse workflow_job webhook: %w", err)
	}
	if p.Action == "" || p.WorkflowJob == nil || p.WorkflowJob.ID == 0 {
		return WorkflowJobEvent{}, errors.New("parse workflow_job webhook: missing action or workflow_job.id")
	}
	j := p.WorkflowJob
	e := WorkflowJobEvent{Action: p.Action, JobID: j.ID, RunID: j.RunID, Labels: j.Labels, Status: j.Status}
	if j.Conclusion != nil {
		e.Conclusion = *j.Conclusion
	}
	if j.RunnerID != nil {
		e.RunnerID = *j.RunnerID
	}
	if j.RunnerName != nil {
		e.RunnerName = *j.RunnerName
	}
	if j.RunnerGroupID != nil {
		e.RunnerGroupID = *j.RunnerGroupID
	}
	if p.Repository != nil {
		e.Repository = p.Repository.FullName
	}
	if p.Organization != nil {
		e.Organization = p.Organization.Login
	}
	if p.Enterprise != nil {
		e.Enterprise = p.Enterprise.Slug
	}
	if p.Installation != nil {
		e.Installation = p.Installation.ID
	}
	return e, nil
}

// Wants reports whether a runner carrying labels can take the job: it must
// carry every label the job asks for ("self-hosted" is implied), compared
// without regard to case as GitHub does.
func (e WorkflowJobEvent) Wants(labels []string) bool {
	for _, w := range e.Labels {
		if strings.EqualFold(w, "self-hosted") {
			continue
		}
		if !slices.ContainsFunc(labels, func(l string) bool { return strings.EqualFold(l, w) }) {
			return false
		}
	}
	return true
}

// WebhookHandler serves a webhook endpoint: it rejects unsigned or
// wrongly signed deliveries with 401, answers ping, ignores other events
// and passes workflow_job events to handle. A handle error answers 500, so
// GitHub shows the delivery as failed.
func WebhookHandler(secret config.Secret, handle func(context.Context, WorkflowJobEvent) error, log *slog.Logger) http.Handler {
	if log == nil {
		log = slog.Default()
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost {
			w.Header().Set("Allow", http.MethodPost)
			http.Error(w, "webhooks are POSTed", http.StatusMethodNotAllowed)
			return
		}
		if mt, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type")); mt != "application/json" {
			http.Error(w, "set the webhook's content type to application/json", http.StatusUnsupportedMediaType)
			return
		}
		body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxWebhookBody))
		if err != nil {
			http.Error(w, "body too large or unreadable", http.StatusRequestEntityTooLarge)
			return
		}
		if err := VerifySignature(secret, body, r.Header.Get(SignatureHeader)); err != nil {
			log.Warn("rejected webhook delivery", slog.String("delivery", r.Header.Get("X-GitHub-Delivery")), slog.String("error", err.Error()))
			http.Error(w, "bad signature", http.StatusUnauthorized)
			return
		}
		event := r.Header.Get("X-GitHub-Event")
		switch event {
		case "ping":
			_, _ = io.WriteString(w, "pong\n")
			return
		case "workflow_job":
		default:
			w.WriteHeader(http.StatusAccepted)
			return
		}
		e, err := ParseWorkflowJob(event, body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		if err := handle(r.Context(), e); err != nil {
			log.Error("handling workflow_job webhook failed", slog.Int64("job_id", e.JobID), slog.String("error", err.Error()))
			http.Error(w, "handler failed", http.StatusInternalServerError)
			return
		}
		w.WriteHeader(http.StatusAccepted)
	})
}
