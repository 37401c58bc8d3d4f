package github

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"

	gh "github.com/google/go-github/v79/github"

	"github.com/fireactions/fireactions/internal/config"
)

// DefaultRunnerGroupID is the id of every account's default runner group.
const DefaultRunnerGroupID = 1

// JITConfig is a just-in-time runner registration: the runner GitHub
// created and the single-use configuration the runner starts with
// (run.sh --jitconfig). The configuration is a secret: printing, logging
// or JSON-encoding a JITConfig shows only the runner id and name.
type JITConfig struct {
	RunnerID         int64
	Name             string
	EncodedJITConfig config.Secret
}

func (j JITConfig) String() string {
	return fmt.Sprintf("JITConfig{RunnerID:%d Name:%s EncodedJITConfig:%s}", j.RunnerID, j.Name, j.EncodedJITConfig)
}

// GoString keeps %#v from printing the configuration.
func (j JITConfig) GoString() string { return j.String() }

// LogValue keeps slog from printing the configuration.
func (j JITConfig) LogValue() slog.Value {
	return slog.GroupValue(slog.Int64("runner_id", j.RunnerID), slog.String("name", j.Name),
		slog.String("jit_config", j.EncodedJITConfig.String()))
}

// MarshalJSON keeps the configuration out of API responses and state
// files written with encoding/json.
func (j JITConfig) MarshalJSON() ([]byte, error) {
	return json.Marshal(struct {
		RunnerID int64  `json:"runner_id"`
		Name     string `json:"name"`
	}{j.RunnerID, j.Name})
}

// Runner is a self-hosted runner as GitHub lists it.
type Runner struct {
	ID     int64
	Name   string
	OS     string
	Status string // online, offline
	Busy   bool
	Labels []string
}

func runnerFrom(r *gh.Runner) Runner {
	out := Runner{ID: r.GetID(), Name: r.GetName(), OS: r.GetOS(), Status: r.GetStatus(), Busy: r.GetBusy()}
	for _, l := range r.Labels {
		out.Labels = append(out.Labels, l.GetName())
	}
	return out
}

// GenerateJITConfig registers an ephemeral runner named name with labels in
// runner group groupID (0 means the default group) and returns its
// single-use configuration.
func (c *Client) GenerateJITConfig(ctx context.Context, scope Scope, name string, labels []string, groupID int64) (JITConfig, error) {
	if strings.TrimSpace(name) == "" {
		return JITConfig{}, errors.New("generate JIT config: runner name is empty")
	}
	if len(labels) == 0 || len(labels) > 100 {
		return JITConfig{}, fmt.Errorf("generate JIT config for runner %q: want 1 to 100 labels, got %d", name, len(labels))
	}
	for i, l := range labels {
		if strings.TrimSpace(l) == "" {
			return JITConfig{}, fmt.Errorf("generate JIT config for runner %q: label %d is empty", name, i)
		}
	}
	if groupID == 0 {
		groupID = DefaultRunnerGroupID
	}
	req := &gh.GenerateJITConfigRequest{Name: name, RunnerGroupID: groupID, Labels: labels}
	var jit *gh.JITRunnerConfig
	err := c.do(ctx, scope, func(g *gh.Client) error {
		var err error
		switch scope.Kind {
		case config.ScopeOrganization:
			jit, _, err = g.Actions.GenerateOrgJITConfig(ctx, scope.Name, req)
		case config.ScopeRepository:
			owner, repo, _ := strings.Cut(scope.Name, "/")
			jit, _, err = g.Actions.GenerateRepoJITConfig(ctx, owner, repo, req)
		default:
			jit, _, err = g.Enterprise.GenerateEnterpriseJITConfig(ctx, scope.Name, req)
		}
		return err
	})
	if errors.Is(err, ErrNotFound) {
		return JITConfig{}, fmt.Errorf("generate JIT config for runner %q in %s: %w (does runner group %d exist there?)", name, scope, err, groupID)
	}
	if err != nil {
		return JITConfig{}, fmt.Errorf("generate JIT config for runner %q in %s: %w", name, scope, err)
	}
	if jit.GetEncodedJITConfig() == "" || jit.Runner.GetID() == 0 {
		return JITConfig{}, fmt.Errorf("generate JIT config for runner %q in %s: GitHub's answer lacks the runner or its configuration", name, scope)
	}
	out := JITConfig{RunnerID: jit.Runner.GetID(), Name: jit.Runner.GetName(), EncodedJITConfig: config.Secret(jit.GetEncodedJITConfig())}
	c.log.Info("registered JIT runner", slog.String("scope", scope.String()), slog.Int64("runner_id", out.RunnerID), slog.String("runner", out.Name))
	return out, nil
}

// ListRunners returns every self-hosted runner registered in scope.
func (c *Client) ListRunners(ctx context.Context, scope Scope) ([]Runner, error) {
	return c.listRunners(ctx, scope, "")
}

// RunnerByName returns the runner called name in scope, or ErrNotFound.
func (c *Client) RunnerByName(ctx context.Context, scope Scope, name string) (Runner, error) {
	rs, err := c.listRunners(ctx, scope, name)
	if err != nil {
		return Runner{}, err
	}
	for _, r := range rs {
		if strings.EqualFold(r.Name, name) {
			return r, nil
		}
	}
	return Runner{}, fmt.Errorf("runner %q in %s: %w", name, scope, ErrNotFound)
}

func (c *Client) listRunners(ctx context.Context, scope Scope, name string) ([]Runner, error) {
	opts := &gh.ListRunnersOptions{ListOptions: gh.ListOptions{PerPage: 100}}
	if name != "" {
		opts.Name = &name
	}
	var out []Runner
	for {
		var page *gh.Runners
		var resp *gh.Response
		err := c.do(ctx, scope, func(g *gh.Client) error {
			var err error
			switch scope.Kind {
			case config.ScopeOrganization:
				page, resp, err = g.Actions.ListOrganizationRunners(ctx, scope.Name, opts)
			case config.ScopeRepository:
				owner, repo, _ := strings.Cut(scope.Name, "/")
				page, resp, err = g.Actions.ListRunners(ctx, owner, repo, opts)
			default:
				page, resp, err = g.Enterprise.ListRunners(ctx, scope.Name, opts)
			}
			return err
		})
		if err != nil {
			return nil, fmt.Errorf("list runners of %s: %w", scope, err)
		}
		for _, r := range page.Runners {
			out = append(out, runnerFrom(r))
		}
		if resp.NextPage == 0 {
			return out, nil
		}
		opts.Page = resp.NextPage
	}
}

// GetRunner returns one runner, or an error wrapping ErrNotFound.
func (c *Client) GetRunner(ctx context.Context, scope Scope, id int64) (Runner, error) {
	var r *gh.Runner
	err := c.do(ctx, scope, func(g *gh.Client) error {
		var err error
		switch scope.Kind {
		case config.ScopeOrganization:
			r, _, err = g.Actions.GetOrganizationRunner(ctx, scope.Name, id)
		case config.ScopeRepository:
			owner, repo, _ := strings.Cut(scope.Name, "/")
			r, _, err = g.Actions.GetRunner(ctx, owner, repo, id)
		default:
			r, _, err = g.Enterprise.GetRunner(ctx, scope.Name, id)
		}
		return err
	})
	if err != nil {
		return Runner{}, fmt.Errorf("get runner %d of %s: %w", id, scope, err)
	}
	return runnerFrom(r), nil
}

// RunnerExists reports whether GitHub still has the runner.
func (c *Client) RunnerExists(ctx context.Context, scope Scope, id int64) (bool, error) {
	_, err := c.GetRunner(ctx, scope, id)
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, ErrNotFound):
		return false, nil
	}
	return false, err
}

// DeleteRunner deregisters a runner. A runner GitHub no longer has is not
// an error; one still running a job fails with ErrRunnerBusy.
func (c *Client) DeleteRunner(ctx context.Context, scope Scope, id int64) error {
	err := c.do(ctx, scope, func(g *gh.Client) error {
		var err error
		switch scope.Kind {
		case config.ScopeOrganization:
			_, err = g.Actions.RemoveOrganizationRunner(ctx, scope.Name, id)
		case config.ScopeRepository:
			owner, repo, _ := strings.Cut(scope.Name, "/")
			_, err = g.Actions.RemoveRunner(ctx, owner, repo, id)
		default:
			_, err = g.Enterprise.RemoveRunner(ctx, scope.Name, id)
		}
		return err
	})
	if errors.Is(err, ErrNotFound) {
		c.log.Debug("runner already gone", slog.String("scope", scope.String()), slog.Int64("runner_id", id))
		return nil
	}
	if err != nil {
		return fmt.Errorf("delete runner %d of %s: %w", id, scope, err)
	}
	c.log.Info("deregistered runner", slog.String("scope", scope.String()), slog.Int64("runner_id", id))
	return nil
}
