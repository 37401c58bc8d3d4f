package pool

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/fireactions/fireactions/internal/github"
)

// runSession holds the pool's scale set message session: it creates or
// adopts the scale set named after the pool, long-polls for messages,
// acquires available jobs, sizes the pool from the statistics, and
// acknowledges each message only after the reconcile pass that acted on
// it. A failed session is opened again after SessionRetry.
func (p *pool) runSession(ctx context.Context) {
	sctx, cancel := context.WithCancel(ctx)
	p.mu.Lock()
	p.sessCancel = cancel
	p.mu.Unlock()
	defer cancel()
	for sctx.Err() == nil {
		err := p.session(sctx)
		if sctx.Err() != nil {
			return
		}
		p.mu.Lock()
		p.sessionErr = err.Error()
		p.sess = nil
		p.mu.Unlock()
		p.log.Warn("scale set session failed; retrying", "error", err, "retry_in", p.m.opts.SessionRetry)
		p.m.obs.RunnerFailed(p.cfg.Name, "session", err.Error())
		select {
		case <-sctx.Done():
		case <-time.After(p.m.opts.SessionRetry):
		}
	}
}

// stopSession ends the session loop (draining: the pool takes no more
// jobs); the session is closed so that GitHub offers its jobs elsewhere.
func (p *pool) stopSession() {
	p.mu.Lock()
	cancel := p.sessCancel
	p.mu.Unlock()
	if cancel != nil {
		cancel()
	}
}

// scaleSetLabels are the pool's name (runs-on: POOL) and its labels.
func (p *pool) scaleSetLabels() []string {
	labels := []string{p.cfg.Name}
	for _, l := range p.cfg.Runner.Labels {
		if !slices.ContainsFunc(labels, func(x string) bool { return strings.EqualFold(x, l) }) {
			labels = append(labels, l)
		}
	}
	return labels
}

func (p *pool) session(ctx context.Context) error {
	set, err := p.m.gh.EnsureScaleSet(ctx, p.scope, github.ScaleSetSpec{
		Name: p.cfg.Name, RunnerGroup: p.cfg.Runner.Group, RunnerGroupID: p.cfg.Runner.GroupID,
		Labels: p.scaleSetLabels(),
	})
	if err != nil {
		return err
	}
	opts := p.m.opts.Session
	p.mu.Lock()
	_, hi := p.limitsLocked()
	if p.over.Paused {
		hi = 0
	}
	p.mu.Unlock()
	opts.MaxCapacity = hi
	sess, err := set.OpenSession(ctx, opts)
	if err != nil {
		return err
	}
	defer func() {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		if err := sess.Close(cctx); err != nil {
			p.log.Warn("close scale set session", "error", err)
		}
		p.mu.Lock()
		p.sess = nil
		p.mu.Unlock()
	}()
	stats := sess.Statistics()
	p.mu.Lock()
	p.set, p.sess, p.stats, p.sessionErr = set, sess, &stats, ""
	p.mu.Unlock()
	p.reconcile(ctx)
	for {
		msg, err := sess.Next(ctx)
		if err != nil {
			return err
		}
		if err := p.handleMessage(ctx, sess, msg); err != nil {
			return err
		}
	}
}

// handleMessage acts on one message: it acquires the available jobs
// (unless paused or draining), applies job starts and completions to the
// runners they name, takes the statistics, runs a reconcile pass (which
// requests the VMs), and only then acknowledges the message.
func (p *pool) handleMessage(ctx context.Context, sess *github.Session, msg *github.Message) error {
	if msg == nil {
		stats := sess.Statistics()
		p.mu.Lock()
		p.stats = &stats
		p.mu.Unlock()
		p.reconcile(ctx)
		return nil
	}
	p.mu.Lock()
	acquire := !p.over.Paused && !p.draining
	p.mu.Unlock()
	if ids := msg.AvailableRequestIDs(); acquire && len(ids) > 0 {
		got, err := sess.AcquireJobs(ctx, ids)
		if err != nil {
			return fmt.Errorf("acquire jobs: %w", err)
		}
		p.log.Debug("acquired jobs", "requested", len(ids), "acquired", len(got))
	}
	p.mu.Lock()
	for _, j := range msg.Jobs {
		switch j.Type {
		case github.JobStarted:
			if r := p.runnerByNameLocked(j.RunnerName); r != nil {
				p.markBusyLocked(r)
			}
		case github.JobCompleted:
			if r := p.runnerByNameLocked(j.RunnerName); r != nil {
				p.markDoneLocked(r)
			}
		}
	}
	stats := msg.Statistics
	p.stats = &stats
	p.mu.Unlock()
	p.reconcile(ctx)
	if err := sess.Ack(ctx, msg); err != nil {
		return err
	}
	return nil
}
