package github_test

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/fireactions/fireactions/internal/config"
	"github.com/fireactions/fireactions/internal/github"
	"github.com/fireactions/fireactions/internal/github/githubtest"
)

func TestVerifySignature(t *testing.T) {
	body := []byte(`{"action":"queued"}`)
	good := githubtest.Sign("s3cret", body)
	if err := github.VerifySignature("s3cret", body, good); err != nil {
		t.Fatalf("valid signature refused: %v", err)
	}
	for name, tc := range map[string]struct {
		secret config.Secret
		body   string
		sig    string
	}{
		"tampered body": {"s3cret", `{"action":"completed"}`, good},
		"wrong secret":  {"other", string(body), good},
		"sha1 header":   {"s3cret", string(body), "sha1=" + strings.TrimPrefix(good, "sha256=")},
		"not hex":       {"s3cret", string(body), "sha256=zz"},
		"truncated":     {"s3cret", string(body), good[:len(good)-2]},
		"missing":       {"s3cret", string(body), ""},
	} {
		if err := github.VerifySignature(tc.secret, []byte(tc.body), tc.sig); !errors.Is(err, github.ErrBadSignature) {
			t.Errorf("%s: err = %v, want ErrBadSignature", name, err)
		}
	}
	if err := github.VerifySignature("", body, good); err == nil || !strings.Contains(err.Error(), "no webhook secret") {
		t.Errorf("empty secret: %v", err)
	}
}

func TestParseWorkflowJob(t *testing.T) {
	body := []byte(`{"action":"in_progress","workflow_job":{"id":42,"run_id":7,"labels":["self-hosted","Linux"],
		"status":"in_progress","conclusion":null,"runner_id":9,"runner_name":"fa-1","runner_group_id":1},
		"repository":{"full_name":"acme/app"},"organization":{"login":"acme"},"enterprise":{"slug":"big"},"installation":{"id":5}}`)
	e, err := github.ParseWorkflowJob("workflow_job", body)
	if err != nil {
		t.Fatal(err)
	}
	want := github.WorkflowJobEvent{Action: "in_progress", JobID: 42, RunID: 7, Labels: []string{"self-hosted", "Linux"},
		Status: "in_progress", RunnerID: 9, RunnerName: "fa-1", RunnerGroupID: 1, Repository: "acme/app",
		Organization: "acme", Enterprise: "big", Installation: 5}
	if e.Action != want.Action || e.JobID != want.JobID || e.RunnerID != 9 || e.RunnerName != "fa-1" || e.Repository != "acme/app" ||
		e.Enterprise != "big" || e.Installation != 5 || e.Conclusion != "" || len(e.Labels) != 2 {
		t.Fatalf("got %+v", e)
	}
	if !e.Wants([]string{"linux", "x64"}) || e.Wants([]string{"x64"}) {
		t.Fatal("label matching is wrong")
	}
	if _, err := github.ParseWorkflowJob("push", body); !errors.Is(err, github.ErrNotWorkflowJob) {
		t.Fatalf("push: %v", err)
	}
	if _, err := github.ParseWorkflowJob("workflow_job", []byte(`{"action":"queued"}`)); err == nil {
		t.Fatal("payload without workflow_job accepted")
	}
	if _, err := github.ParseWorkflowJob("workflow_job", []byte(`{`)); err == nil {
		t.Fatal("bad JSON accepted")
	}
}

type received struct {
	mu     sync.Mutex
	events []github.WorkflowJobEvent
}

func (r *received) handle(_ context.Context, e github.WorkflowJobEvent) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.events = append(r.events, e)
	return nil
}

func (r *received) all() []github.WorkflowJobEvent {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]github.WorkflowJobEvent(nil), r.events...)
}

func TestWebhooksFromTheFakeDriveLabelsMode(t *testing.T) {
	e := newEnv(t, nil)
	e.fake.InstallOrg("acme")
	var got received
	hook := httptest.NewServer(github.WebhookHandler("hook-secret", got.handle, nil))
	defer hook.Close()
	e.fake.SetWebhook(hook.URL, "hook-secret")
	ctx := ctxT(t)

	jit, err := e.client.GenerateJITConfig(ctx, github.OrgScope("acme"), "fa-1", []string{"linux", "gpu"}, 0)
	if err != nil {
		t.Fatal(err)
	}
	job, err := e.fake.QueueJob("", []string{"self-hosted", "linux", "gpu"})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.fake.StartJob(job, "fa-1"); err != nil {
		t.Fatal(err)
	}
	if err := e.fake.CompleteJob(job); err != nil {
		t.Fatal(err)
	}
	evs := got.all()
	if len(evs) != 3 {
		t.Fatalf("received %+v", evs)
	}
	if evs[0].Action != "queued" || evs[0].JobID != job || !evs[0].Wants([]string{"linux", "gpu"}) || evs[0].Wants([]string{"linux"}) {
		t.Errorf("queued event %+v", evs[0])
	}
	if evs[1].Action != "in_progress" || evs[1].RunnerName != "fa-1" || evs[1].RunnerID != jit.RunnerID {
		t.Errorf("in_progress event %+v", evs[1])
	}
	if evs[2].Action != "completed" || evs[2].Conclusion != "success" {
		t.Errorf("completed event %+v", evs[2])
	}
	for _, d := range e.fake.Deliveries() {
		if d.Err != nil || d.Status != http.StatusAccepted {
			t.Errorf("delivery %+v", d)
		}
	}
	// The ephemeral runner is gone after its job.
	if ok, err := e.client.RunnerExists(ctx, github.OrgScope("acme"), jit.RunnerID); ok || err != nil {
		t.Fatalf("RunnerExists = %v, %v", ok, err)
	}
}

func TestWebhookHandlerRejects(t *testing.T) {
	fake, _ := newFake(t)
	var got received
	hook := httptest.NewServer(github.WebhookHandler("right", got.handle, nil))
	defer hook.Close()
	fake.SetWebhook(hook.URL, "wrong")
	if _, err := fake.QueueJob("", []string{"linux"}); err != nil {
		t.Fatal(err)
	}
	if d := fake.Deliveries(); len(d) != 1 || d[0].Status != http.StatusUnauthorized {
		t.Fatalf("deliveries %+v", d)
	}
	if len(got.all()) != 0 {
		t.Fatal("a wrongly signed delivery reached the handler")
	}

	body := `{"zen":"hi"}`
	for _, tc := range []struct {
		method, ctype, event, sig string
		want                      int
	}{
		{http.MethodGet, "application/json", "ping", githubtest.Sign("right", []byte(body)), http.StatusMethodNotAllowed},
		{http.MethodPost, "application/x-www-form-urlencoded", "ping", githubtest.Sign("right", []byte(body)), http.StatusUnsupportedMediaType},
		{http.MethodPost, "application/json", "ping", githubtest.Sign("right", []byte(body)), http.StatusOK},
		{http.MethodPost, "application/json", "push", githubtest.Sign("right", []byte(body)), http.StatusAccepted},
		{http.MethodPost, "application/json", "workflow_job", githubtest.Sign("right", []byte(body)), http.StatusBadRequest},
		{http.MethodPost, "application/json", "ping", "", http.StatusUnauthorized},
	} {
		req, _ := http.NewRequest(tc.method, hook.URL, strings.NewReader(body))
		req.Header.Set("Content-Type", tc.ctype)
		req.Header.Set("X-GitHub-Event", tc.event)
		req.Header.Set(github.SignatureHeader, tc.sig)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != tc.want {
			t.Errorf("%s %s %s: %d, want %d", tc.method, tc.ctype, tc.event, resp.StatusCode, tc.want)
		}
	}
}
