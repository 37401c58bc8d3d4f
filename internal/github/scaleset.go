package github

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/actions/scaleset"

	"github.com/fireactions/fireactions/internal/config"
)

// sessionTimeout bounds one message long poll; GitHub holds it about 50s.
const sessionTimeout = 2 * time.Minute

type scalesetConn struct {
	client *scaleset.Client
}

// scaleset returns the scale set client for scope: GitHub App or personal
// access token → registration token → Actions service admin connection,
// all handled inside github.com/actions/scaleset.
func (c *Client) scaleset(ctx context.Context, scope Scope) (*scaleset.Client, error) {
	c.mu.Lock()
	conn := c.scalesets[scope.key()]
	c.mu.Unlock()
	if conn != nil {
		return conn.client, nil
	}
	configURL := strings.TrimSuffix(c.web.String(), "/") + "/" + scope.webPath()
	info := scaleset.SystemInfo{System: "fireactions", Subsystem: "pool"}
	// The scale set client keeps retrying through this retryablehttp
	// client, but replaces its CheckRetry with its own (which also retries
	// 401 and 403) when it first connects; the backoff, the metrics hook and
	// the timeout stay ours. Message sessions get a client of their own.
	opts := []scaleset.HTTPOption{
		scaleset.WithRetryableHTTPClint(c.newRetryable(c.timeout)),
		scaleset.WithLogger(slog.New(quieter{c.rootLog.Handler()}).With("component", "github.scaleset")),
	}
	var sc *scaleset.Client
	var err error
	if c.usesApp(scope) {
		id, ierr := c.InstallationID(ctx, scope)
		if ierr != nil {
			return nil, ierr
		}
		sc, err = scaleset.NewClientWithGitHubApp(scaleset.ClientWithGitHubAppConfig{
			GitHubConfigURL: configURL,
			GitHubAppAuth: scaleset.GitHubAppAuth{
				ClientID: strconv.FormatInt(c.appID, 10), InstallationID: id, PrivateKey: c.keyPEM.Reveal(),
			},
			SystemInfo: info,
		}, opts...)
	} else {
		sc, err = scaleset.NewClientWithPersonalAccessToken(scaleset.NewClientWithPersonalAccessTokenConfig{
			GitHubConfigURL: configURL, PersonalAccessToken: c.token.Reveal(), SystemInfo: info,
		}, opts...)
	}
	if err != nil {
		return nil, fmt.Errorf("scale set client for %s: %w", scope, err)
	}
	c.mu.Lock()
	c.scalesets[scope.key()] = &scalesetConn{client: sc}
	c.mu.Unlock()
	return sc, nil
}

// quieter demotes the scale set client's routine Info messages (token
// refreshes) to Debug.
type quieter struct{ slog.Handler }

func (q quieter) Enabled(ctx context.Context, l slog.Level) bool {
	if l == slog.LevelInfo {
		l = slog.LevelDebug
	}
	return q.Handler.Enabled(ctx, l)
}

func (q quieter) Handle(ctx context.Context, r slog.Record) error {
	if r.Level == slog.LevelInfo {
		r.Level = slog.LevelDebug
	}
	return q.Handler.Handle(ctx, r)
}

func (q quieter) WithAttrs(as []slog.Attr) slog.Handler { return quieter{q.Handler.WithAttrs(as)} }
func (q quieter) WithGroup(g string) slog.Handler       { return quieter{q.Handler.WithGroup(g)} }

var statusRE = regexp.MustCompile(`status="(\d{3})`)

// scalesetStatus digs the HTTP status out of a scale set client error,
// which carries it only in its text.
func scalesetStatus(err error) int {
	if err == nil {
		return 0
	}
	m := statusRE.FindAllStringSubmatch(err.Error(), -1)
	if len(m) == 0 {
		return 0
	}
	n, _ := strconv.Atoi(m[len(m)-1][1])
	return n
}

// scalesetError attaches this package's sentinel errors to a scale set
// client error.
func scalesetError(scope Scope, app bool, err error) error {
	if err == nil || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	status := scalesetStatus(err)
	e := &APIError{StatusCode: status, Message: err.Error(), kind: kindOf(status)}
	switch {
	case errors.Is(err, scaleset.RunnerNotFoundError):
		e.kind = ErrNotFound
	case errors.Is(err, scaleset.RunnerExistsError):
		e.kind = ErrConflict
	case errors.Is(err, scaleset.JobStillRunningError):
		e.kind = ErrRunnerBusy
	case status == 0:
		return err
	case status == 403:
		e.Hint = scope.permissionHint(app)
	}
	return e
}

// withScaleset runs fn with scope's scale set client; when the Actions
// service refuses its credentials it rebuilds the client (new registration
// token and admin connection) and tries once more.
func (c *Client) withScaleset(ctx context.Context, scope Scope, fn func(*scaleset.Client) error) error {
	if err := scope.Validate(); err != nil {
		return err
	}
	for attempt := 0; ; attempt++ {
		sc, err := c.scaleset(ctx, scope)
		if err != nil {
			return err
		}
		err = fn(sc)
		if err != nil && attempt == 0 && scalesetStatus(err) == 401 {
			c.log.Info("GitHub refused the scale set credentials; reconnecting", slog.String("scope", scope.String()))
			c.forget(scope)
			continue
		}
		return scalesetError(scope, c.usesApp(scope), err)
	}
}

// ScaleSetSpec describes the scale set a pool wants.
type ScaleSetSpec struct {
	// Name is the scale set's name, which workflows use in runs-on.
	Name string
	// RunnerGroup names the runner group; it wins over RunnerGroupID.
	RunnerGroup string
	// RunnerGroupID is the runner group's id; 0 means the default group.
	RunnerGroupID int64
	// Labels are the scale set's labels; empty means just Name.
	Labels []string
	// DisableUpdate stops runners from updating themselves.
	DisableUpdate bool
}

// ScaleSet is a runner scale set this client created or adopted.
type ScaleSet struct {
	c             *Client
	scope         Scope
	ID            int
	Name          string
	RunnerGroupID int
	Labels        []string
}

// Scope is where the scale set lives.
func (s *ScaleSet) Scope() Scope { return s.scope }

// EnsureScaleSet adopts the scale set named spec.Name in the runner group,
// updating its labels and settings when they differ, or creates it.
func (c *Client) EnsureScaleSet(ctx context.Context, scope Scope, spec ScaleSetSpec) (*ScaleSet, error) {
	if strings.TrimSpace(spec.Name) == "" {
		return nil, errors.New("ensure scale set: name is empty")
	}
	labels := spec.Labels
	if len(labels) == 0 {
		labels = []string{spec.Name}
	}
	want := make([]scaleset.Label, len(labels))
	for i, l := range labels {
		want[i] = scaleset.Label{Name: l, Type: "System"}
	}
	var set *scaleset.RunnerScaleSet
	created := false
	err := c.withScaleset(ctx, scope, func(sc *scaleset.Client) error {
		groupID := int(spec.RunnerGroupID)
		if spec.RunnerGroup != "" {
			g, err := sc.GetRunnerGroupByName(ctx, spec.RunnerGroup)
			if err != nil {
				return fmt.Errorf("runner group %q: %w", spec.RunnerGroup, err)
			}
			groupID = g.ID
		}
		if groupID == 0 {
			groupID = DefaultRunnerGroupID
		}
		existing, err := sc.GetRunnerScaleSet(ctx, groupID, spec.Name)
		if err != nil {
			return err
		}
		desired := &scaleset.RunnerScaleSet{
			Name: spec.Name, RunnerGroupID: groupID, Labels: want,
			RunnerSetting: scaleset.RunnerSetting{DisableUpdate: spec.DisableUpdate},
		}
		if existing == nil {
			set, err = sc.CreateRunnerScaleSet(ctx, desired)
			if err == nil {
				created = true
				return nil
			}
			// Another instance may have created it meanwhile.
			if existing, _ = sc.GetRunnerScaleSet(ctx, groupID, spec.Name); existing == nil {
				return err
			}
		}
		set = existing
		if !sameLabels(existing.Labels, labels) || existing.RunnerSetting.DisableUpdate != spec.DisableUpdate {
			set, err = sc.UpdateRunnerScaleSet(ctx, existing.ID, desired)
		}
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("ensure scale set %q in %s: %w", spec.Name, scope, err)
	}
	out := &ScaleSet{c: c, scope: scope, ID: set.ID, Name: set.Name, RunnerGroupID: set.RunnerGroupID}
	for _, l := range set.Labels {
		out.Labels = append(out.Labels, l.Name)
	}
	verb := "adopted"
	if created {
		verb = "created"
	}
	c.log.Info(verb+" runner scale set", slog.String("scope", scope.String()), slog.String("name", out.Name), slog.Int("id", out.ID))
	return out, nil
}

func sameLabels(have []scaleset.Label, want []string) bool {
	if len(have) != len(want) {
		return false
	}
	for _, w := range want {
		if !slices.ContainsFunc(have, func(l scaleset.Label) bool { return strings.EqualFold(l.Name, w) }) {
			return false
		}
	}
	return true
}

// GenerateJITConfig registers an ephemeral runner in the scale set and
// returns its single-use configuration.
func (s *ScaleSet) GenerateJITConfig(ctx context.Context, name string) (JITConfig, error) {
	if strings.TrimSpace(name) == "" {
		return JITConfig{}, errors.New("generate JIT config: runner name is empty")
	}
	var jit *scaleset.RunnerScaleSetJitRunnerConfig
	err := s.c.withScaleset(ctx, s.scope, func(sc *scaleset.Client) error {
		var err error
		jit, err = sc.GenerateJitRunnerConfig(ctx, &scaleset.RunnerScaleSetJitRunnerSetting{Name: name, WorkFolder: "_work"}, s.ID)
		return err
	})
	if err != nil {
		return JITConfig{}, fmt.Errorf("generate JIT config for runner %q in scale set %q: %w", name, s.Name, err)
	}
	if jit == nil || jit.Runner == nil || jit.EncodedJITConfig == "" {
		return JITConfig{}, fmt.Errorf("generate JIT config for runner %q in scale set %q: the answer lacks the runner or its configuration", name, s.Name)
	}
	out := JITConfig{RunnerID: int64(jit.Runner.ID), Name: jit.Runner.Name, EncodedJITConfig: config.Secret(jit.EncodedJITConfig)}
	s.c.log.Info("registered scale set runner", slog.String("scale_set", s.Name), slog.Int64("runner_id", out.RunnerID), slog.String("runner", out.Name))
	return out, nil
}

// RemoveRunner deregisters a runner of the scale set. A runner GitHub no
// longer has is not an error; one still running a job fails with
// ErrRunnerBusy.
func (s *ScaleSet) RemoveRunner(ctx context.Context, runnerID int64) error {
	err := s.c.withScaleset(ctx, s.scope, func(sc *scaleset.Client) error {
		return sc.RemoveRunner(ctx, runnerID)
	})
	if errors.Is(err, ErrNotFound) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("remove runner %d from scale set %q: %w", runnerID, s.Name, err)
	}
	s.c.log.Info("deregistered scale set runner", slog.String("scale_set", s.Name), slog.Int64("runner_id", runnerID))
	return nil
}

// RunnerExists reports whether GitHub still has the runner.
func (s *ScaleSet) RunnerExists(ctx context.Context, runnerID int64) (bool, error) {
	err := s.c.withScaleset(ctx, s.scope, func(sc *scaleset.Client) error {
		_, err := sc.GetRunner(ctx, int(runnerID))
		return err
	})
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, ErrNotFound):
		return false, nil
	}
	return false, fmt.Errorf("get runner %d of scale set %q: %w", runnerID, s.Name, err)
}

// Delete removes the scale set from GitHub.
func (s *ScaleSet) Delete(ctx context.Context) error {
	err := s.c.withScaleset(ctx, s.scope, func(sc *scaleset.Client) error {
		return sc.DeleteRunnerScaleSet(ctx, s.ID)
	})
	if err != nil {
		return fmt.Errorf("delete scale set %q: %w", s.Name, err)
	}
	return nil
}

// Statistics is GitHub's view of a scale set's demand and runners. Size a
// pool from TotalAssignedJobs (jobs assigned to the scale set, running
// ones included), not from counting messages.
type Statistics struct {
	TotalAvailableJobs     int
	TotalAcquiredJobs      int
	TotalAssignedJobs      int
	TotalRunningJobs       int
	TotalRegisteredRunners int
	TotalBusyRunners       int
	TotalIdleRunners       int
}

func statisticsFrom(s *scaleset.RunnerScaleSetStatistic) Statistics {
	if s == nil {
		return Statistics{}
	}
	return Statistics{
		TotalAvailableJobs: s.TotalAvailableJobs, TotalAcquiredJobs: s.TotalAcquiredJobs,
		TotalAssignedJobs: s.TotalAssignedJobs, TotalRunningJobs: s.TotalRunningJobs,
		TotalRegisteredRunners: s.TotalRegisteredRunners, TotalBusyRunners: s.TotalBusyRunners,
		TotalIdleRunners: s.TotalIdleRunners,
	}
}

// JobEventType is the kind of a job message.
type JobEventType string

const (
	JobAvailable JobEventType = "JobAvailable"
	JobAssigned  JobEventType = "JobAssigned"
	JobStarted   JobEventType = "JobStarted"
	JobCompleted JobEventType = "JobCompleted"
)

// JobEvent is one job message of a batch.
type JobEvent struct {
	Type            JobEventType
	RunnerRequestID int64
	JobID           string
	Repository      string // owner/name
	WorkflowRef     string
	DisplayName     string
	WorkflowRunID   int64
	Labels          []string
	QueueTime       time.Time
	// RunnerID and RunnerName are set for JobStarted and JobCompleted.
	RunnerID   int64
	RunnerName string
	// Result is set for JobCompleted (succeeded, failed, canceled, …).
	Result     string
	FinishTime time.Time
}

func jobEvent(t JobEventType, b scaleset.JobMessageBase) JobEvent {
	return JobEvent{
		Type: t, RunnerRequestID: b.RunnerRequestID, JobID: b.JobID,
		Repository: b.OwnerName + "/" + b.RepositoryName, WorkflowRef: b.JobWorkflowRef,
		DisplayName: b.JobDisplayName, WorkflowRunID: b.WorkflowRunID, Labels: b.RequestLabels,
		QueueTime: b.QueueTime, FinishTime: b.FinishTime,
	}
}

// Message is one batch of job events with the statistics current when
// GitHub sent it.
type Message struct {
	ID         int
	Statistics Statistics
	// Jobs lists the batch's events: available, then assigned, started and
	// completed ones.
	Jobs []JobEvent
}

// AvailableRequestIDs returns the runner request ids of the batch's
// JobAvailable events, to pass to Session.AcquireJobs.
func (m *Message) AvailableRequestIDs() []int64 {
	var ids []int64
	for _, j := range m.Jobs {
		if j.Type == JobAvailable {
			ids = append(ids, j.RunnerRequestID)
		}
	}
	return ids
}

func messageFrom(m *scaleset.RunnerScaleSetMessage) *Message {
	out := &Message{ID: m.MessageID, Statistics: statisticsFrom(m.Statistics)}
	for _, j := range m.JobAvailableMessages {
		out.Jobs = append(out.Jobs, jobEvent(JobAvailable, j.JobMessageBase))
	}
	for _, j := range m.JobAssignedMessages {
		out.Jobs = append(out.Jobs, jobEvent(JobAssigned, j.JobMessageBase))
	}
	for _, j := range m.JobStartedMessages {
		e := jobEvent(JobStarted, j.JobMessageBase)
		e.RunnerID, e.RunnerName = int64(j.RunnerID), j.RunnerName
		out.Jobs = append(out.Jobs, e)
	}
	for _, j := range m.JobCompletedMessages {
		e := jobEvent(JobCompleted, j.JobMessageBase)
		e.RunnerID, e.RunnerName, e.Result = int64(j.RunnerID), j.RunnerName, j.Result
		out.Jobs = append(out.Jobs, e)
	}
	return out
}

// SessionOptions tunes a message session.
type SessionOptions struct {
	// Owner names the session's holder; default the host name.
	Owner string
	// MaxCapacity is how many runners the pool can run at once
	// (X-ScaleSetMaxCapacity); change it later with SetMaxCapacity.
	MaxCapacity int
	// ConflictWait is the wait between attempts while another session
	// holds the scale set (a previous run that died without closing its
	// session); default 30s, like actions-runner-controller.
	ConflictWait time.Duration
	// ConflictAttempts bounds those attempts; default 10.
	ConflictAttempts int
}

// Session is the message session a pool holds on its scale set. Next,
// AcquireJobs and Ack are meant to be called from one loop: the scale set
// client serializes them, so an Ack waits for a pending long poll.
type Session struct {
	set    *ScaleSet
	ms     *scaleset.MessageSessionClient
	maxCap atomic.Int64

	mu     sync.Mutex
	lastID int
	stats  Statistics
}

func isSessionConflict(err error) bool {
	return err != nil && (strings.Contains(err.Error(), "TaskAgentSessionConflictException") || scalesetStatus(err) == 409)
}

// OpenSession creates the scale set's message session. While another
// session holds the scale set it retries every ConflictWait, up to
// ConflictAttempts times: GitHub lets an abandoned session lapse once its
// owner stops polling.
func (s *ScaleSet) OpenSession(ctx context.Context, o SessionOptions) (*Session, error) {
	if o.Owner == "" {
		o.Owner, _ = os.Hostname()
		if o.Owner == "" {
			o.Owner = "fireactions"
		}
	}
	if o.ConflictWait == 0 {
		o.ConflictWait = 30 * time.Second
	}
	if o.ConflictAttempts == 0 {
		o.ConflictAttempts = 10
	}
	var ms *scaleset.MessageSessionClient
	for attempt := 1; ; attempt++ {
		err := s.c.withScaleset(ctx, s.scope, func(sc *scaleset.Client) error {
			var err error
			ms, err = sc.MessageSessionClient(ctx, s.ID, o.Owner,
				scaleset.WithRetryableHTTPClint(s.c.newRetryable(sessionTimeout)))
			return err
		})
		if err == nil {
			break
		}
		if !isSessionConflict(err) || attempt >= o.ConflictAttempts {
			return nil, fmt.Errorf("open message session on scale set %q: %w", s.Name, err)
		}
		s.c.log.Warn("another message session holds the scale set; waiting for it to lapse",
			slog.String("scale_set", s.Name), slog.Int("attempt", attempt), slog.Duration("wait", o.ConflictWait))
		if err := s.c.sleep(ctx, o.ConflictWait); err != nil {
			return nil, fmt.Errorf("open message session on scale set %q: %w", s.Name, err)
		}
	}
	sess := &Session{set: s, ms: ms, stats: statisticsFrom(ms.Session().Statistics)}
	sess.maxCap.Store(int64(max(0, o.MaxCapacity)))
	s.c.log.Info("opened message session", slog.String("scale_set", s.Name), slog.String("session_id", sess.ID()))
	return sess, nil
}

// ID is the session's id.
func (s *Session) ID() string { return s.ms.Session().SessionID.String() }

// Statistics returns the latest statistics: from the session's creation,
// then from each message received.
func (s *Session) Statistics() Statistics {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stats
}

// SetMaxCapacity changes the capacity announced with each poll.
func (s *Session) SetMaxCapacity(n int) { s.maxCap.Store(int64(max(0, n))) }

// Next long-polls for the next message. It returns nil and no error when
// the poll ended without one; Statistics then still holds the latest
// figures. A message not acknowledged with Ack is delivered again.
func (s *Session) Next(ctx context.Context) (*Message, error) {
	s.mu.Lock()
	last := s.lastID
	s.mu.Unlock()
	m, err := s.ms.GetMessage(ctx, last, int(s.maxCap.Load()))
	if err != nil {
		return nil, fmt.Errorf("get message from scale set %q: %w", s.set.Name, scalesetError(s.set.scope, s.set.c.usesApp(s.set.scope), err))
	}
	if m == nil {
		return nil, nil
	}
	msg := messageFrom(m)
	if m.Statistics != nil {
		s.mu.Lock()
		s.stats = msg.Statistics
		s.mu.Unlock()
	}
	return msg, nil
}

// AcquireJobs tells GitHub this scale set takes the jobs; it returns the
// request ids actually acquired.
func (s *Session) AcquireJobs(ctx context.Context, requestIDs []int64) ([]int64, error) {
	if len(requestIDs) == 0 {
		return nil, nil
	}
	ids, err := s.ms.AcquireJobs(ctx, requestIDs)
	if err != nil {
		return nil, fmt.Errorf("acquire jobs for scale set %q: %w", s.set.Name, scalesetError(s.set.scope, s.set.c.usesApp(s.set.scope), err))
	}
	return ids, nil
}

// Ack deletes a message once the caller has acted on it; the next poll
// then asks for what follows it.
func (s *Session) Ack(ctx context.Context, m *Message) error {
	if err := s.ms.DeleteMessage(ctx, m.ID); err != nil {
		return fmt.Errorf("acknowledge message %d of scale set %q: %w", m.ID, s.set.Name, scalesetError(s.set.scope, s.set.c.usesApp(s.set.scope), err))
	}
	s.mu.Lock()
	s.lastID = max(s.lastID, m.ID)
	s.mu.Unlock()
	return nil
}

// Close deletes the session so that the next one (after a restart, say)
// is not refused while this one lapses.
func (s *Session) Close(ctx context.Context) error {
	if err := s.ms.Close(ctx); err != nil {
		return fmt.Errorf("close message session on scale set %q: %w", s.set.Name, err)
	}
	return nil
}
