package github_test

import (
	"context"
	"errors"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/fireactions/fireactions/internal/github"
	"github.com/fireactions/fireactions/internal/github/githubtest"
)

func shortPoll(o *githubtest.Options) { o.LongPoll = 300 * time.Millisecond }

func TestEnsureScaleSetCreatesThenAdopts(t *testing.T) {
	e := newEnv(t, nil)
	e.fake.InstallOrg("acme")
	ctx := ctxT(t)
	scope := github.OrgScope("acme")

	set, err := e.client.EnsureScaleSet(ctx, scope, github.ScaleSetSpec{Name: "pool-a", Labels: []string{"pool-a", "linux"}})
	if err != nil {
		t.Fatal(err)
	}
	again, err := e.client.EnsureScaleSet(ctx, scope, github.ScaleSetSpec{Name: "pool-a", Labels: []string{"linux", "pool-a"}})
	if err != nil {
		t.Fatal(err)
	}
	if again.ID != set.ID || set.RunnerGroupID != 1 {
		t.Fatalf("adopted %+v, created %+v", again, set)
	}
	if n := e.fake.CountCalls("POST", "/_actions/*/_apis/runtime/runnerscalesets"); n != 1 {
		t.Fatalf("%d creations, want 1", n)
	}
	if n := e.fake.CountCalls("PATCH", "/_actions/**"); n != 0 {
		t.Fatalf("%d updates for unchanged labels", n)
	}

	// Adopting with other labels updates the scale set in place.
	updated, err := e.client.EnsureScaleSet(ctx, scope, github.ScaleSetSpec{Name: "pool-a", Labels: []string{"pool-a", "arm64"}})
	if err != nil {
		t.Fatal(err)
	}
	sets := e.fake.ScaleSets()
	if updated.ID != set.ID || len(sets) != 1 || strings.Join(sets[0].Labels, ",") != "pool-a,arm64" {
		t.Fatalf("after update: %+v, fake %+v", updated, sets)
	}

	// A runner group named in the spec is looked up.
	fast := e.fake.AddRunnerGroup(githubtest.Org("acme"), "fast")
	inGroup, err := e.client.EnsureScaleSet(ctx, scope, github.ScaleSetSpec{Name: "pool-a", RunnerGroup: "FAST"})
	if err != nil {
		t.Fatal(err)
	}
	if inGroup.ID == set.ID || int64(inGroup.RunnerGroupID) != fast || strings.Join(inGroup.Labels, ",") != "pool-a" {
		t.Fatalf("scale set in group: %+v", inGroup)
	}
	if _, err := e.client.EnsureScaleSet(ctx, scope, github.ScaleSetSpec{Name: "x", RunnerGroup: "nope"}); err == nil || !strings.Contains(err.Error(), `runner group "nope"`) {
		t.Fatalf("unknown group: %v", err)
	}
}

// next polls until a message arrives.
func next(t *testing.T, ctx context.Context, s *github.Session) *github.Message {
	t.Helper()
	for range 20 {
		m, err := s.Next(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if m != nil {
			return m
		}
	}
	t.Fatal("no message")
	return nil
}

func types(m *github.Message) []github.JobEventType {
	var out []github.JobEventType
	for _, j := range m.Jobs {
		out = append(out, j.Type)
	}
	return out
}

func TestScaleSetJobLifecycle(t *testing.T) {
	e := newEnv(t, []func(*githubtest.Options){shortPoll})
	e.fake.InstallOrg("acme")
	ctx := ctxT(t)
	set, err := e.client.EnsureScaleSet(ctx, github.OrgScope("acme"), github.ScaleSetSpec{Name: "pool-a"})
	if err != nil {
		t.Fatal(err)
	}
	sess, err := set.OpenSession(ctx, github.SessionOptions{Owner: "host-a", MaxCapacity: 4})
	if err != nil {
		t.Fatal(err)
	}
	defer sess.Close(context.Background())
	if st := sess.Statistics(); st != (github.Statistics{}) {
		t.Fatalf("initial statistics %+v", st)
	}

	// Nothing queued: the long poll ends empty.
	if m, err := sess.Next(ctx); m != nil || err != nil {
		t.Fatalf("empty poll = %+v, %v", m, err)
	}

	job, err := e.fake.QueueJob("pool-a", nil)
	if err != nil {
		t.Fatal(err)
	}
	m := next(t, ctx, sess)
	if !slices.Equal(types(m), []github.JobEventType{github.JobAvailable}) || m.Jobs[0].RunnerRequestID != job ||
		m.Statistics.TotalAvailableJobs != 1 || m.Jobs[0].Repository != "acme/octo-repo" || m.Jobs[0].Labels[0] != "pool-a" {
		t.Fatalf("first message %+v", m)
	}
	got, err := sess.AcquireJobs(ctx, m.AvailableRequestIDs())
	if err != nil || !slices.Equal(got, []int64{job}) {
		t.Fatalf("AcquireJobs = %v, %v", got, err)
	}
	if err := sess.Ack(ctx, m); err != nil {
		t.Fatal(err)
	}

	m = next(t, ctx, sess)
	if !slices.Equal(types(m), []github.JobEventType{github.JobAssigned}) || m.Statistics.TotalAssignedJobs != 1 {
		t.Fatalf("second message %+v", m)
	}
	if sess.Statistics().TotalAssignedJobs != 1 {
		t.Fatalf("session statistics %+v", sess.Statistics())
	}
	if err := sess.Ack(ctx, m); err != nil {
		t.Fatal(err)
	}

	jit, err := set.GenerateJITConfig(ctx, "pool-a-1")
	if err != nil {
		t.Fatal(err)
	}
	if rs := e.fake.Runners(); len(rs) != 1 || rs[0].ScaleSetID != set.ID || rs[0].ID != jit.RunnerID {
		t.Fatalf("runners %+v", rs)
	}
	if err := e.fake.StartJob(job, "pool-a-1"); err != nil {
		t.Fatal(err)
	}
	m = next(t, ctx, sess)
	st := m.Statistics
	if !slices.Equal(types(m), []github.JobEventType{github.JobStarted}) || m.Jobs[0].RunnerName != "pool-a-1" || m.Jobs[0].RunnerID != jit.RunnerID ||
		st.TotalAssignedJobs != 1 || st.TotalRunningJobs != 1 || st.TotalBusyRunners != 1 || st.TotalRegisteredRunners != 1 {
		t.Fatalf("third message %+v", m)
	}
	if err := set.RemoveRunner(ctx, jit.RunnerID); !errors.Is(err, github.ErrRunnerBusy) {
		t.Fatalf("removing a busy runner: %v", err)
	}
	if err := sess.Ack(ctx, m); err != nil {
		t.Fatal(err)
	}

	if err := e.fake.CompleteJob(job); err != nil {
		t.Fatal(err)
	}
	m = next(t, ctx, sess)
	if !slices.Equal(types(m), []github.JobEventType{github.JobCompleted}) || m.Jobs[0].Result != "succeeded" ||
		m.Statistics.TotalAssignedJobs != 0 || m.Statistics.TotalRegisteredRunners != 0 {
		t.Fatalf("fourth message %+v", m)
	}
	if err := sess.Ack(ctx, m); err != nil {
		t.Fatal(err)
	}
	// GitHub removed the ephemeral runner itself; removing it again is fine.
	if err := set.RemoveRunner(ctx, jit.RunnerID); err != nil {
		t.Fatal(err)
	}
	if ok, err := set.RunnerExists(ctx, jit.RunnerID); ok || err != nil {
		t.Fatalf("RunnerExists = %v, %v", ok, err)
	}

	// Each poll after an Ack asked for what follows the acknowledged message.
	var lastIDs []string
	for _, c := range e.fake.Calls() {
		if c.Method == http.MethodGet && strings.HasSuffix(c.Path, "/messages") {
			if i := strings.Index(c.Query, "lastMessageId="); i >= 0 {
				lastIDs = append(lastIDs, strings.SplitN(c.Query[i+len("lastMessageId="):], "&", 2)[0])
			}
		}
	}
	if strings.Join(lastIDs, ",") != "1,2,3" {
		t.Fatalf("lastMessageId values %v", lastIDs)
	}
}

func TestUnacknowledgedMessageComesBack(t *testing.T) {
	e := newEnv(t, []func(*githubtest.Options){shortPoll})
	e.fake.InstallOrg("acme")
	ctx := ctxT(t)
	set, err := e.client.EnsureScaleSet(ctx, github.OrgScope("acme"), github.ScaleSetSpec{Name: "pool-a"})
	if err != nil {
		t.Fatal(err)
	}
	sess, err := set.OpenSession(ctx, github.SessionOptions{Owner: "host-a"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.fake.QueueJob("pool-a", []string{"pool-a"}); err != nil {
		t.Fatal(err)
	}
	first := next(t, ctx, sess)
	again := next(t, ctx, sess)
	if again.ID != first.ID {
		t.Fatalf("got message %d, want %d again", again.ID, first.ID)
	}

	// A daemon that dies before acknowledging sees the message again in
	// its next session.
	if err := sess.Close(ctx); err != nil {
		t.Fatal(err)
	}
	sess2, err := set.OpenSession(ctx, github.SessionOptions{Owner: "host-a"})
	if err != nil {
		t.Fatal(err)
	}
	defer sess2.Close(context.Background())
	m := next(t, ctx, sess2)
	if m.ID != first.ID {
		t.Fatalf("new session got message %d, want %d", m.ID, first.ID)
	}
	if err := sess2.Ack(ctx, m); err != nil {
		t.Fatal(err)
	}
	if m, err := sess2.Next(ctx); m != nil || err != nil {
		t.Fatalf("after ack: %+v, %v", m, err)
	}
}

func TestSessionConflictWaitsForTheOldSession(t *testing.T) {
	e := newEnv(t, []func(*githubtest.Options){shortPoll})
	e.fake.InstallOrg("acme")
	ctx := ctxT(t)
	set, err := e.client.EnsureScaleSet(ctx, github.OrgScope("acme"), github.ScaleSetSpec{Name: "pool-a"})
	if err != nil {
		t.Fatal(err)
	}
	old, err := set.OpenSession(ctx, github.SessionOptions{Owner: "host-a"})
	if err != nil {
		t.Fatal(err)
	}
	// While we wait the first time, the old holder goes away.
	e.sleeps.onSleep = func(n int) {
		if n == 1 {
			if err := old.Close(ctx); err != nil {
				t.Error(err)
			}
		}
	}
	sess, err := set.OpenSession(ctx, github.SessionOptions{Owner: "host-b"})
	if err != nil {
		t.Fatal(err)
	}
	defer sess.Close(context.Background())
	if w := e.sleeps.all(); len(w) != 1 || w[0] != 30*time.Second {
		t.Fatalf("waits %v, want [30s]", w)
	}
	var conflicts int
	for _, c := range e.fake.Calls() {
		if c.Status == http.StatusConflict {
			conflicts++
		}
	}
	if conflicts != 1 || sess.ID() == old.ID() {
		t.Fatalf("%d conflicts, session %s vs %s", conflicts, sess.ID(), old.ID())
	}
}

func TestSessionConflictGivesUp(t *testing.T) {
	e := newEnv(t, nil)
	e.fake.InstallOrg("acme")
	ctx := ctxT(t)
	set, err := e.client.EnsureScaleSet(ctx, github.OrgScope("acme"), github.ScaleSetSpec{Name: "pool-a"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := set.OpenSession(ctx, github.SessionOptions{Owner: "host-a"}); err != nil {
		t.Fatal(err)
	}
	_, err = set.OpenSession(ctx, github.SessionOptions{Owner: "host-b", ConflictAttempts: 3, ConflictWait: time.Second})
	if !errors.Is(err, github.ErrConflict) || !strings.Contains(err.Error(), "TaskAgentSessionConflictException") {
		t.Fatalf("err = %v", err)
	}
	if w := e.sleeps.all(); len(w) != 2 {
		t.Fatalf("waits %v, want 2", w)
	}
	// An abandoned session lapses once its owner stops polling.
	e.fake.Advance(3 * time.Minute)
	sess, err := set.OpenSession(ctx, github.SessionOptions{Owner: "host-b"})
	if err != nil {
		t.Fatal(err)
	}
	sess.Close(ctx)
}

func TestScaleSetRunnerRegistration(t *testing.T) {
	e := newEnv(t, nil)
	e.fake.InstallRepos("octo", "app")
	ctx := ctxT(t)
	set, err := e.client.EnsureScaleSet(ctx, github.RepoScope("octo/app"), github.ScaleSetSpec{Name: "pool-r"})
	if err != nil {
		t.Fatal(err)
	}
	jit, err := set.GenerateJITConfig(ctx, "pool-r-1")
	if err != nil {
		t.Fatal(err)
	}
	dec, err := githubtest.DecodeJITConfig(jit.EncodedJITConfig.Reveal())
	if err != nil || dec.ID != jit.RunnerID || dec.ScaleSetID != set.ID {
		t.Fatalf("JIT decodes to %+v, %v", dec, err)
	}
	if _, err := set.GenerateJITConfig(ctx, "pool-r-1"); !errors.Is(err, github.ErrConflict) {
		t.Fatalf("duplicate name: %v", err)
	}
	if ok, err := set.RunnerExists(ctx, jit.RunnerID); !ok || err != nil {
		t.Fatalf("RunnerExists = %v, %v", ok, err)
	}
	if err := set.RemoveRunner(ctx, jit.RunnerID); err != nil {
		t.Fatal(err)
	}
	if rs := e.fake.Runners(); len(rs) != 0 {
		t.Fatalf("orphans: %+v", rs)
	}
	if err := set.Delete(ctx); err != nil {
		t.Fatal(err)
	}
	if ss := e.fake.ScaleSets(); len(ss) != 0 {
		t.Fatalf("scale sets left: %+v", ss)
	}
}

func TestScaleSetRetriesServerErrors(t *testing.T) {
	e := newEnv(t, nil)
	e.fake.InstallOrg("acme")
	ctx := ctxT(t)
	set, err := e.client.EnsureScaleSet(ctx, github.OrgScope("acme"), github.ScaleSetSpec{Name: "pool-a"})
	if err != nil {
		t.Fatal(err)
	}
	e.fake.FailNext("POST /_actions/*/_apis/runtime/runnerscalesets/*/generatejitconfig", http.StatusServiceUnavailable, 2)
	if _, err := set.GenerateJITConfig(ctx, "pool-a-1"); err != nil {
		t.Fatal(err)
	}
	if n := e.fake.CountCalls("POST", "/_actions/*/_apis/runtime/runnerscalesets/*/generatejitconfig"); n != 3 {
		t.Fatalf("%d attempts, want 3", n)
	}
	if len(e.sleeps.all()) != 2 || len(e.fake.Runners()) != 1 {
		t.Fatalf("waits %v, runners %+v", e.sleeps.all(), e.fake.Runners())
	}
}

func TestScaleSetReconnectsWhenAdminTokenIsRefused(t *testing.T) {
	e := newEnv(t, nil)
	e.fake.InstallOrg("acme")
	ctx := ctxT(t)
	set, err := e.client.EnsureScaleSet(ctx, github.OrgScope("acme"), github.ScaleSetSpec{Name: "pool-a"})
	if err != nil {
		t.Fatal(err)
	}
	// The fake's clock jumps past the admin token's life; the client, which
	// still believes the token valid, is refused once and reconnects.
	e.fake.Advance(2 * time.Hour)
	if _, err := set.GenerateJITConfig(ctx, "pool-a-1"); err != nil {
		t.Fatal(err)
	}
	if n := e.fake.CountCalls("POST", "/actions/runner-registration"); n != 2 {
		t.Fatalf("%d registration handshakes, want 2", n)
	}
	// The scale set client retries a 401 itself; those retries are short.
	for _, w := range e.sleeps.all() {
		if w > time.Second {
			t.Fatalf("waited %v before reconnecting", w)
		}
	}
	if len(e.fake.Runners()) != 1 {
		t.Fatalf("runners %+v", e.fake.Runners())
	}
}

func TestLostSessionIsReported(t *testing.T) {
	e := newEnv(t, []func(*githubtest.Options){shortPoll})
	e.fake.InstallOrg("acme")
	ctx := ctxT(t)
	set, err := e.client.EnsureScaleSet(ctx, github.OrgScope("acme"), github.ScaleSetSpec{Name: "pool-a"})
	if err != nil {
		t.Fatal(err)
	}
	sess, err := set.OpenSession(ctx, github.SessionOptions{Owner: "h"})
	if err != nil {
		t.Fatal(err)
	}
	e.fake.DropSessions()
	if _, err := sess.Next(ctx); !errors.Is(err, github.ErrNotFound) {
		t.Fatalf("Next on a lost session: %v", err)
	}
	// The caller opens a new one; nothing holds the scale set any more.
	sess, err = set.OpenSession(ctx, github.SessionOptions{Owner: "h"})
	if err != nil {
		t.Fatal(err)
	}
	defer sess.Close(context.Background())
	if len(e.sleeps.all()) != 0 {
		t.Fatalf("waited %v", e.sleeps.all())
	}
}

func TestScaleSetWithEnterpriseToken(t *testing.T) {
	e := newEnv(t, nil, github.WithToken("ghp_enterprise"))
	e.fake.AddToken("ghp_enterprise", "manage_runners:enterprise")
	ctx := ctxT(t)
	set, err := e.client.EnsureScaleSet(ctx, github.EnterpriseScope("bigcorp"), github.ScaleSetSpec{Name: "ent-pool"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := set.GenerateJITConfig(ctx, "ent-pool-1"); err != nil {
		t.Fatal(err)
	}
	if rs := e.fake.Runners(); len(rs) != 1 || rs[0].Scope != githubtest.Enterprise("bigcorp") {
		t.Fatalf("runners %+v", rs)
	}
	if e.fake.TokensIssued() != 0 {
		t.Fatal("the App was used for an enterprise scope")
	}
}
