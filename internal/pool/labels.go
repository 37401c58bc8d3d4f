package pool

import (
	"strings"
	"time"

	"github.com/fireactions/fireactions/internal/config"
	"github.com/fireactions/fireactions/internal/github"
)

// queuedJobTTL forgets a queued job whose later webhooks never came;
// GitHub itself cancels jobs queued for 24 hours.
const queuedJobTTL = 24 * time.Hour

// webhookJob is a job seen through workflow_job webhooks: queued, or
// running on one of the pool's runners.
type webhookJob struct {
	queued time.Time
	runner string
}

// matchesScope reports whether a webhook is about the pool's scope.
func (p *pool) matchesScope(e github.WorkflowJobEvent) bool {
	switch p.scope.Kind {
	case config.ScopeOrganization:
		return strings.EqualFold(e.Organization, p.scope.Name)
	case config.ScopeRepository:
		return strings.EqualFold(e.Repository, p.scope.Name)
	default:
		return strings.EqualFold(e.Enterprise, p.scope.Name)
	}
}

// onWebhook applies a workflow_job event to a labels-mode pool: queued
// jobs the pool's runners could take raise the demand, a job one of its
// runners took marks that runner busy, and a completed job ends both.
func (p *pool) onWebhook(e github.WorkflowJobEvent) {
	if p.cfg.Scaling != config.ScalingLabels || !p.matchesScope(e) || !e.Wants(p.cfg.Runner.Labels) {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	now := time.Now()
	for id, j := range p.jobs {
		if j.runner == "" && now.Sub(j.queued) > queuedJobTTL {
			delete(p.jobs, id)
		}
	}
	switch e.Action {
	case "queued", "waiting":
		if _, ok := p.jobs[e.JobID]; !ok {
			p.jobs[e.JobID] = &webhookJob{queued: now}
		}
	case "in_progress":
		r := p.runnerByNameLocked(e.RunnerName)
		if r == nil {
			delete(p.jobs, e.JobID) // another runner took it
			break
		}
		p.jobs[e.JobID] = &webhookJob{queued: now, runner: r.rec.Name}
		p.markBusyLocked(r)
	case "completed":
		delete(p.jobs, e.JobID)
		if r := p.runnerByNameLocked(e.RunnerName); r != nil {
			p.markDoneLocked(r)
		}
	}
	p.kick()
}
