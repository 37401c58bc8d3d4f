package githubtest

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"sort"
	"strings"
	"time"
)

// JobState is where a job is in its life.
type JobState string

const (
	JobAvailable JobState = "available" // queued, waiting for a runner (labels mode) or for acquisition
	JobAcquired  JobState = "acquired"  // acquired by a scale set listener
	JobAssigned  JobState = "assigned"  // assigned to the scale set
	JobRunning   JobState = "running"   // a runner took it
	JobCompleted JobState = "completed"
)

type job struct {
	id         int64
	uuid       string
	scaleSetID int // 0 for labels-mode jobs
	labels     []string
	state      JobState
	runnerID   int64
	runnerName string
	result     string
	queued     time.Time
	started    time.Time
	finished   time.Time
}

// Job is a job as the fake sees it.
type Job struct {
	ID         int64
	ScaleSetID int
	Labels     []string
	State      JobState
	RunnerID   int64
	RunnerName string
	Result     string
}

// Jobs returns every job, ordered by id.
func (s *Server) Jobs() []Job {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]Job, 0, len(s.jobs))
	for _, j := range s.jobs {
		out = append(out, Job{ID: j.id, ScaleSetID: j.scaleSetID, Labels: append([]string(nil), j.labels...),
			State: j.state, RunnerID: j.runnerID, RunnerName: j.runnerName, Result: j.result})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// webhookRepo is the repository named in labels-mode job webhooks.
const webhookRepo = "octo-org/octo-repo"

func (s *Server) scaleSetByName(name string) *scaleSet {
	for _, ss := range s.scaleSets {
		if strings.EqualFold(ss.name, name) {
			return ss
		}
	}
	return nil
}

// event builds a job message of the Actions service. Call with s.mu held.
func (s *Server) event(ss *scaleSet, j *job, kind string) map[string]any {
	owner, repo := "octo-org", "octo-repo"
	if ss.scope.Kind == KindRepo {
		owner, repo, _ = strings.Cut(ss.scope.Name, "/")
	} else if ss.scope.Kind == KindOrg {
		owner = ss.scope.Name
	}
	e := map[string]any{
		"messageType": kind, "runnerRequestId": j.id, "repositoryName": repo, "ownerName": owner,
		"jobId": j.uuid, "jobWorkflowRef": owner + "/" + repo + "/.github/workflows/ci.yml@refs/heads/main",
		"jobDisplayName": "build", "workflowRunId": j.id + 500000, "eventName": "push",
		"requestLabels": j.labels, "queueTime": j.queued.UTC().Format(time.RFC3339Nano),
	}
	switch kind {
	case "JobAvailable":
		e["acquireJobUrl"] = fmt.Sprintf("%s%s/_apis/runtime/runnerscalesets/%d/acquirejobs", actionsPrefix, ss.tenant, ss.id)
	case "JobStarted":
		e["runnerId"], e["runnerName"] = j.runnerID, j.runnerName
		e["runnerAssignTime"] = j.started.UTC().Format(time.RFC3339Nano)
	case "JobCompleted":
		e["runnerId"], e["runnerName"], e["result"] = j.runnerID, j.runnerName, j.result
		e["finishTime"] = j.finished.UTC().Format(time.RFC3339Nano)
	}
	return e
}

func (s *Server) push(ss *scaleSet, j *job, kind string) {
	ss.pending = append(ss.pending, s.event(ss, j, kind))
	s.notify()
}

// assign moves an acquired job to assigned. Call with s.mu held.
func (s *Server) assign(ss *scaleSet, j *job) {
	j.state = JobAssigned
	s.push(ss, j, "JobAssigned")
}

// QueueJob queues a job. With a scale set name the job is for that scale
// set (labels defaults to the scale set's name, as for runs-on: NAME) and
// shows up as JobAvailable in its message queue; with an empty name it is a
// labels-mode job any idle non-scale-set runner carrying all the labels can
// take. A configured webhook receives workflow_job "queued".
func (s *Server) QueueJob(scaleSetName string, labels []string) (int64, error) {
	s.mu.Lock()
	j := &job{id: s.newID(), uuid: newUUID(), labels: append([]string(nil), labels...), state: JobAvailable, queued: s.now()}
	var ss *scaleSet
	if scaleSetName != "" {
		ss = s.scaleSetByName(scaleSetName)
		if ss == nil {
			s.mu.Unlock()
			return 0, fmt.Errorf("githubtest: no scale set named %q", scaleSetName)
		}
		if len(j.labels) == 0 {
			j.labels = []string{ss.name}
		}
		for _, l := range j.labels {
			if !slices.ContainsFunc(ss.labels, func(x label) bool { return strings.EqualFold(x.Name, l) }) {
				s.mu.Unlock()
				return 0, fmt.Errorf("githubtest: scale set %q does not carry label %q", ss.name, l)
			}
		}
		j.scaleSetID = ss.id
	} else if len(j.labels) == 0 {
		s.mu.Unlock()
		return 0, fmt.Errorf("githubtest: a labels-mode job needs labels")
	}
	s.jobs[j.id] = j
	if ss != nil {
		s.push(ss, j, "JobAvailable")
	} else {
		s.notify()
	}
	payload := s.webhookPayload(j, "queued")
	s.mu.Unlock()
	s.deliver(payload)
	return j.id, nil
}

// AssignJob assigns an acquired job to its scale set (JobAssigned). Only
// needed with Options.ManualAssign.
func (s *Server) AssignJob(jobID int64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	j := s.jobs[jobID]
	if j == nil || j.scaleSetID == 0 {
		return fmt.Errorf("githubtest: no scale set job %d", jobID)
	}
	if j.state != JobAcquired {
		return fmt.Errorf("githubtest: job %d is %s, not acquired", jobID, j.state)
	}
	s.assign(s.scaleSets[j.scaleSetID], j)
	return nil
}

// StartJob hands a job to a runner, as GitHub does when an idle runner
// picks it up: a scale set job must be assigned and the runner must belong
// to its scale set; a labels-mode job goes to a non-scale-set runner that
// carries all its labels. The runner becomes busy and online.
func (s *Server) StartJob(jobID int64, runnerName string) error {
	s.mu.Lock()
	j := s.jobs[jobID]
	r := s.runnerByName(runnerName)
	switch {
	case j == nil:
		s.mu.Unlock()
		return fmt.Errorf("githubtest: no job %d", jobID)
	case r == nil:
		s.mu.Unlock()
		return fmt.Errorf("githubtest: no runner named %q", runnerName)
	case r.busy:
		s.mu.Unlock()
		return fmt.Errorf("githubtest: runner %q is busy with job %d", runnerName, r.jobID)
	}
	if j.scaleSetID != 0 {
		if j.state != JobAssigned {
			s.mu.Unlock()
			return fmt.Errorf("githubtest: job %d is %s, not assigned", jobID, j.state)
		}
		if r.scaleSetID != j.scaleSetID {
			s.mu.Unlock()
			return fmt.Errorf("githubtest: runner %q is not in the job's scale set", runnerName)
		}
	} else {
		if j.state != JobAvailable {
			s.mu.Unlock()
			return fmt.Errorf("githubtest: job %d is %s, not queued", jobID, j.state)
		}
		if r.scaleSetID != 0 || !carries(r.labels, j.labels) {
			s.mu.Unlock()
			return fmt.Errorf("githubtest: runner %q cannot take a job for labels %v", runnerName, j.labels)
		}
	}
	j.state, j.runnerID, j.runnerName, j.started = JobRunning, r.id, r.name, s.now()
	r.busy, r.status, r.jobID = true, "online", j.id
	if ss := s.scaleSets[j.scaleSetID]; ss != nil {
		s.push(ss, j, "JobStarted")
	} else {
		s.notify()
	}
	payload := s.webhookPayload(j, "in_progress")
	s.mu.Unlock()
	s.deliver(payload)
	return nil
}

// carries reports whether a runner with labels can take a job asking for
// want; every self-hosted runner implicitly carries "self-hosted".
func carries(labels, want []string) bool {
	for _, w := range want {
		if strings.EqualFold(w, "self-hosted") {
			continue
		}
		if !slices.ContainsFunc(labels, func(l string) bool { return strings.EqualFold(l, w) }) {
			return false
		}
	}
	return true
}

// CompleteJob ends a job. A running job succeeds and its runner, being
// ephemeral, is removed from GitHub; a job that never started is cancelled.
func (s *Server) CompleteJob(jobID int64) error {
	s.mu.Lock()
	j := s.jobs[jobID]
	if j == nil {
		s.mu.Unlock()
		return fmt.Errorf("githubtest: no job %d", jobID)
	}
	if j.state == JobCompleted {
		s.mu.Unlock()
		return fmt.Errorf("githubtest: job %d already completed", jobID)
	}
	j.result = "canceled"
	if j.state == JobRunning {
		j.result = "succeeded"
		delete(s.runners, j.runnerID)
	}
	j.state, j.finished = JobCompleted, s.now()
	if ss := s.scaleSets[j.scaleSetID]; ss != nil {
		s.push(ss, j, "JobCompleted")
	} else {
		s.notify()
	}
	payload := s.webhookPayload(j, "completed")
	s.mu.Unlock()
	s.deliver(payload)
	return nil
}

type webhookTarget struct {
	url    string
	secret string
}

// Delivery is one webhook the fake sent.
type Delivery struct {
	Action string
	JobID  int64
	Status int
	Err    error
}

// SetWebhook makes the fake POST signed workflow_job events for every job
// change to url, as a GitHub App or organization webhook would.
func (s *Server) SetWebhook(url, secret string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.webhook = &webhookTarget{url: url, secret: secret}
}

// Deliveries returns the webhooks sent so far.
func (s *Server) Deliveries() []Delivery {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Delivery(nil), s.deliveries...)
}

type pendingDelivery struct {
	target webhookTarget
	action string
	jobID  int64
	body   []byte
}

// webhookPayload builds the workflow_job event for a job change, or nil
// when no webhook is configured. Call with s.mu held.
func (s *Server) webhookPayload(j *job, action string) *pendingDelivery {
	if s.webhook == nil {
		return nil
	}
	owner, repo, _ := strings.Cut(webhookRepo, "/")
	var orgLogin string
	if ss := s.scaleSets[j.scaleSetID]; ss != nil {
		switch ss.scope.Kind {
		case KindRepo:
			owner, repo, _ = strings.Cut(ss.scope.Name, "/")
		case KindOrg:
			owner = ss.scope.Name
		}
	}
	orgLogin = owner
	status := map[string]string{"queued": "queued", "in_progress": "in_progress", "completed": "completed"}[action]
	wj := map[string]any{
		"id": j.id, "run_id": j.id + 500000, "name": "build", "workflow_name": "ci", "head_branch": "main",
		"status": status, "labels": j.labels, "created_at": j.queued.UTC().Format(time.RFC3339),
		"runner_id": nil, "runner_name": nil, "conclusion": nil,
	}
	if j.runnerName != "" {
		wj["runner_id"], wj["runner_name"] = j.runnerID, j.runnerName
		wj["started_at"] = j.started.UTC().Format(time.RFC3339)
	}
	if action == "completed" {
		wj["conclusion"] = map[string]string{"succeeded": "success", "canceled": "cancelled"}[j.result]
		wj["completed_at"] = j.finished.UTC().Format(time.RFC3339)
	}
	body, _ := json.Marshal(map[string]any{
		"action": action, "workflow_job": wj,
		"repository":   map[string]any{"name": repo, "full_name": owner + "/" + repo, "owner": map[string]any{"login": owner}},
		"organization": map[string]any{"login": orgLogin},
		"sender":       map[string]any{"login": "octocat"},
	})
	return &pendingDelivery{target: *s.webhook, action: action, jobID: j.id, body: body}
}

// Sign returns the X-Hub-Signature-256 value GitHub sends for body.
func Sign(secret string, body []byte) string {
	m := hmac.New(sha256.New, []byte(secret))
	m.Write(body)
	return "sha256=" + hex.EncodeToString(m.Sum(nil))
}

// deliver POSTs a webhook synchronously, so tests see its effect as soon as
// the control call returns.
func (s *Server) deliver(p *pendingDelivery) {
	if p == nil {
		return
	}
	d := Delivery{Action: p.action, JobID: p.jobID}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, p.target.url, bytes.NewReader(p.body))
	if err == nil {
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("User-Agent", "GitHub-Hookshot/githubtest")
		req.Header.Set("X-GitHub-Event", "workflow_job")
		req.Header.Set("X-GitHub-Delivery", newUUID())
		req.Header.Set("X-Hub-Signature-256", Sign(p.target.secret, p.body))
		var resp *http.Response
		resp, err = http.DefaultClient.Do(req)
		if err == nil {
			d.Status = resp.StatusCode
			resp.Body.Close()
		}
	}
	d.Err = err
	s.mu.Lock()
	s.deliveries = append(s.deliveries, d)
	s.mu.Unlock()
}
