package github_test

import (
	"errors"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/fireactions/fireactions/internal/config"
	"github.com/fireactions/fireactions/internal/github"
	"github.com/fireactions/fireactions/internal/github/githubtest"
)

func TestJITLifecycleEachScope(t *testing.T) {
	cases := []struct {
		name  string
		scope github.Scope
		fake  githubtest.Scope
		setup func(*githubtest.Server)
		opts  []github.Option
	}{
		{"organization", github.OrgScope("acme"), githubtest.Org("acme"),
			func(f *githubtest.Server) { f.InstallOrg("acme") }, nil},
		{"repository", github.RepoScope("octo/app"), githubtest.Repo("octo/app"),
			func(f *githubtest.Server) { f.InstallRepos("octo", "app") }, nil},
		{"enterprise", github.EnterpriseScope("bigcorp"), githubtest.Enterprise("bigcorp"),
			func(f *githubtest.Server) { f.AddToken("ghp_enterprise", "manage_runners:enterprise") },
			[]github.Option{github.WithToken("ghp_enterprise")}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, nil, tc.opts...)
			tc.setup(e.fake)
			ctx := ctxT(t)

			jit, err := e.client.GenerateJITConfig(ctx, tc.scope, "fa-pool-1", []string{"linux", "x64"}, 0)
			if err != nil {
				t.Fatal(err)
			}
			decoded, err := githubtest.DecodeJITConfig(jit.EncodedJITConfig.Reveal())
			if err != nil {
				t.Fatal(err)
			}
			if jit.RunnerID == 0 || jit.Name != "fa-pool-1" || decoded.ID != jit.RunnerID || decoded.Name != jit.Name {
				t.Fatalf("JIT config %v decodes to %+v", jit, decoded)
			}
			regs := e.fake.Runners()
			if len(regs) != 1 || regs[0].Scope != tc.fake || strings.Join(regs[0].Labels, ",") != "linux,x64" || regs[0].GroupID != 1 {
				t.Fatalf("fake has %+v", regs)
			}

			list, err := e.client.ListRunners(ctx, tc.scope)
			if err != nil || len(list) != 1 || list[0].ID != jit.RunnerID || list[0].Status != "offline" {
				t.Fatalf("ListRunners = %+v, %v", list, err)
			}
			got, err := e.client.GetRunner(ctx, tc.scope, jit.RunnerID)
			if err != nil || got.Name != "fa-pool-1" || strings.Join(got.Labels, ",") != "linux,x64" {
				t.Fatalf("GetRunner = %+v, %v", got, err)
			}
			byName, err := e.client.RunnerByName(ctx, tc.scope, "fa-pool-1")
			if err != nil || byName.ID != jit.RunnerID {
				t.Fatalf("RunnerByName = %+v, %v", byName, err)
			}
			if ok, err := e.client.RunnerExists(ctx, tc.scope, jit.RunnerID); !ok || err != nil {
				t.Fatalf("RunnerExists = %v, %v", ok, err)
			}

			if err := e.client.DeleteRunner(ctx, tc.scope, jit.RunnerID); err != nil {
				t.Fatal(err)
			}
			if regs := e.fake.Runners(); len(regs) != 0 {
				t.Fatalf("runner still registered: %+v", regs)
			}
			if ok, err := e.client.RunnerExists(ctx, tc.scope, jit.RunnerID); ok || err != nil {
				t.Fatalf("RunnerExists after delete = %v, %v", ok, err)
			}
			if _, err := e.client.GetRunner(ctx, tc.scope, jit.RunnerID); !errors.Is(err, github.ErrNotFound) {
				t.Fatalf("GetRunner after delete: %v", err)
			}
			// Deleting again is fine: the runner is gone, which is what we want.
			if err := e.client.DeleteRunner(ctx, tc.scope, jit.RunnerID); err != nil {
				t.Fatalf("second delete: %v", err)
			}
			if n := e.fake.CountCalls("DELETE", "/**"); n != 2 {
				t.Fatalf("%d DELETE calls, want 2", n)
			}
		})
	}
}

func TestEnterpriseRunnersRefuseTheApp(t *testing.T) {
	e := newEnv(t, nil)
	e.fake.InstallEnterprise("bigcorp")
	_, err := e.client.GenerateJITConfig(ctxT(t), github.EnterpriseScope("bigcorp"), "r1", []string{"linux"}, 0)
	if !errors.Is(err, github.ErrForbidden) || !strings.Contains(err.Error(), "manage_runners:enterprise") {
		t.Fatalf("err = %v, want a permission error naming manage_runners:enterprise", err)
	}
	if n := len(e.fake.Runners()); n != 0 {
		t.Fatalf("%d runners registered", n)
	}
	// The installation was found through the enterprise lookup endpoint.
	if e.fake.CountCalls("GET", "/enterprises/bigcorp/installation") != 1 {
		t.Fatalf("calls: %+v", e.fake.Calls())
	}
}

func TestEnterpriseTokenWithoutScope(t *testing.T) {
	e := newEnv(t, nil, github.WithToken("ghp_weak"))
	e.fake.AddToken("ghp_weak", "repo")
	_, err := e.client.GenerateJITConfig(ctxT(t), github.EnterpriseScope("bigcorp"), "r1", []string{"linux"}, 0)
	if !errors.Is(err, github.ErrForbidden) || !strings.Contains(err.Error(), "manage_runners:enterprise") {
		t.Fatalf("err = %v", err)
	}
}

func TestDuplicateRunnerName(t *testing.T) {
	e := newEnv(t, nil)
	e.fake.InstallOrg("acme")
	ctx := ctxT(t)
	if _, err := e.client.GenerateJITConfig(ctx, github.OrgScope("acme"), "dup", []string{"linux"}, 0); err != nil {
		t.Fatal(err)
	}
	_, err := e.client.GenerateJITConfig(ctx, github.OrgScope("acme"), "dup", []string{"linux"}, 0)
	if !errors.Is(err, github.ErrConflict) {
		t.Fatalf("err = %v, want ErrConflict", err)
	}
	if n := len(e.fake.Runners()); n != 1 {
		t.Fatalf("%d runners registered, want 1", n)
	}
}

func TestJITInputCheckedBeforeCallingGitHub(t *testing.T) {
	e := newEnv(t, nil)
	e.fake.InstallOrg("acme")
	ctx := ctxT(t)
	many := make([]string, 101)
	for i := range many {
		many[i] = fmt.Sprint("l", i)
	}
	for _, tc := range []struct {
		name   string
		labels []string
		want   string
	}{
		{"", []string{"linux"}, "name is empty"},
		{"r", nil, "want 1 to 100 labels"},
		{"r", many, "want 1 to 100 labels"},
		{"r", []string{"linux", " "}, "label 1 is empty"},
	} {
		if _, err := e.client.GenerateJITConfig(ctx, github.OrgScope("acme"), tc.name, tc.labels, 0); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("GenerateJITConfig(%q, %d labels) = %v, want %q", tc.name, len(tc.labels), err, tc.want)
		}
	}
	if _, err := e.client.ListRunners(ctx, github.RepoScope("no-slash")); err == nil || !strings.Contains(err.Error(), "owner/name") {
		t.Errorf("bad repository scope: %v", err)
	}
	if n := len(e.fake.Calls()); n != 0 {
		t.Fatalf("%d calls reached GitHub", n)
	}
}

func TestUnknownRunnerGroup(t *testing.T) {
	e := newEnv(t, nil)
	e.fake.InstallOrg("acme")
	_, err := e.client.GenerateJITConfig(ctxT(t), github.OrgScope("acme"), "r", []string{"linux"}, 999)
	if !errors.Is(err, github.ErrNotFound) || !strings.Contains(err.Error(), "runner group 999") {
		t.Fatalf("err = %v", err)
	}
	group := e.fake.AddRunnerGroup(githubtest.Org("acme"), "fast")
	if _, err := e.client.GenerateJITConfig(ctxT(t), github.OrgScope("acme"), "r", []string{"linux"}, group); err != nil {
		t.Fatal(err)
	}
	if rs := e.fake.Runners(); len(rs) != 1 || rs[0].GroupID != group {
		t.Fatalf("runners: %+v", rs)
	}
}

func TestMissingPermissionIsExplained(t *testing.T) {
	e := newEnv(t, nil)
	id := e.fake.InstallOrg("acme")
	e.fake.SetPermissions(id, map[string]string{githubtest.PermOrgRunners: githubtest.Read})
	ctx := ctxT(t)
	if _, err := e.client.ListRunners(ctx, github.OrgScope("acme")); err != nil {
		t.Fatalf("read access should list: %v", err)
	}
	_, err := e.client.GenerateJITConfig(ctx, github.OrgScope("acme"), "r", []string{"linux"}, 0)
	if !errors.Is(err, github.ErrForbidden) || !strings.Contains(err.Error(), `"Self-hosted runners: Read and write"`) {
		t.Fatalf("err = %v", err)
	}

	repoID := e.fake.InstallRepos("octo")
	e.fake.SetPermissions(repoID, map[string]string{})
	_, err = e.client.GenerateJITConfig(ctx, github.RepoScope("octo/app"), "r", []string{"linux"}, 0)
	if !errors.Is(err, github.ErrForbidden) || !strings.Contains(err.Error(), `"Administration: Read and write"`) {
		t.Fatalf("repo err = %v", err)
	}
}

func TestNotInstalled(t *testing.T) {
	e := newEnv(t, nil)
	e.fake.InstallRepos("octo", "other")
	ctx := ctxT(t)
	for _, scope := range []github.Scope{github.OrgScope("acme"), github.RepoScope("octo/app")} {
		_, err := e.client.GenerateJITConfig(ctx, scope, "r", []string{"linux"}, 0)
		if !errors.Is(err, github.ErrNotInstalled) || !strings.Contains(err.Error(), "install the App") {
			t.Errorf("%s: err = %v", scope, err)
		}
	}
	if e.fake.TokensIssued() != 0 {
		t.Fatal("tokens issued without an installation")
	}
}

func TestWrongKeyIsRefused(t *testing.T) {
	fake, _ := newFake(t)
	fake.InstallOrg("acme")
	_, otherPEM, err := githubtest.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	c, err := github.New(config.GitHub{AppID: fake.AppID(), PrivateKey: config.Secret(otherPEM), APIURL: fake.APIURL()})
	if err != nil {
		t.Fatal(err)
	}
	_, err = c.GenerateJITConfig(ctxT(t), github.OrgScope("acme"), "r", []string{"linux"}, 0)
	if !errors.Is(err, github.ErrUnauthorized) || !strings.Contains(err.Error(), "A JSON web token could not be decoded") ||
		!strings.Contains(err.Error(), "check github.app_id and the private key") {
		t.Fatalf("err = %v", err)
	}
	calls := fake.Calls()
	if len(calls) == 0 || calls[0].Path != "/orgs/acme/installation" || calls[0].Status != http.StatusUnauthorized {
		t.Fatalf("calls: %+v", calls)
	}
	if fake.TokensIssued() != 0 || len(fake.Runners()) != 0 {
		t.Fatal("the fake accepted a JWT signed with the wrong key")
	}
}

func TestWrongAppIDIsRefused(t *testing.T) {
	fake, pem := newFake(t)
	fake.InstallOrg("acme")
	c, err := github.New(config.GitHub{AppID: fake.AppID() + 1, PrivateKey: config.Secret(pem), APIURL: fake.APIURL()})
	if err != nil {
		t.Fatal(err)
	}
	_, err = c.InstallationID(ctxT(t), github.OrgScope("acme"))
	if !errors.Is(err, github.ErrUnauthorized) || !strings.Contains(err.Error(), "Integration not found") {
		t.Fatalf("err = %v", err)
	}
}

func TestInstallationTokenCachedThenRefreshed(t *testing.T) {
	e := newEnv(t, nil)
	e.fake.InstallOrg("acme")
	ctx := ctxT(t)
	scope := github.OrgScope("acme")
	for range 3 {
		if _, err := e.client.ListRunners(ctx, scope); err != nil {
			t.Fatal(err)
		}
	}
	if n := e.fake.TokensIssued(); n != 1 {
		t.Fatalf("%d tokens issued for 3 calls, want 1", n)
	}

	// GitHub stops honouring the token (expired, revoked): the client gets
	// one 401, mints a new token and succeeds.
	e.fake.ExpireTokens()
	if _, err := e.client.ListRunners(ctx, scope); err != nil {
		t.Fatal(err)
	}
	if n := e.fake.TokensIssued(); n != 2 {
		t.Fatalf("%d tokens issued, want 2", n)
	}
	var unauthorized int
	for _, c := range e.fake.Calls() {
		if c.Path == "/orgs/acme/actions/runners" && c.Status == http.StatusUnauthorized {
			unauthorized++
		}
	}
	if unauthorized != 1 {
		t.Fatalf("%d refused calls, want 1", unauthorized)
	}
}

func TestShortLivedTokensAreRenewedAhead(t *testing.T) {
	// ghinstallation renews a token a minute before it expires; with a
	// 30-second lifetime every call needs a new one, and none is refused.
	e := newEnv(t, []func(*githubtest.Options){func(o *githubtest.Options) { o.TokenTTL = 30 * time.Second }})
	e.fake.InstallOrg("acme")
	for range 3 {
		if _, err := e.client.ListRunners(ctxT(t), github.OrgScope("acme")); err != nil {
			t.Fatal(err)
		}
	}
	if n := e.fake.TokensIssued(); n != 3 {
		t.Fatalf("%d tokens issued, want 3", n)
	}
	for _, c := range e.fake.Calls() {
		if c.Status == http.StatusUnauthorized {
			t.Fatalf("refused call %+v", c)
		}
	}
}

func TestListRunnersPaginates(t *testing.T) {
	e := newEnv(t, nil)
	e.fake.InstallOrg("acme")
	e.fake.AddRunners(githubtest.Org("acme"), "old", 250, "linux")
	list, err := e.client.ListRunners(ctxT(t), github.OrgScope("acme"))
	if err != nil {
		t.Fatal(err)
	}
	seen := map[int64]bool{}
	for _, r := range list {
		seen[r.ID] = true
	}
	if len(list) != 250 || len(seen) != 250 {
		t.Fatalf("got %d runners (%d distinct), want 250", len(list), len(seen))
	}
	if n := e.fake.CountCalls("GET", "/orgs/acme/actions/runners"); n != 3 {
		t.Fatalf("%d list calls, want 3 pages of 100", n)
	}
}

func TestServerErrorsAreRetriedWithBackoff(t *testing.T) {
	e := newEnv(t, nil)
	e.fake.InstallOrg("acme")
	e.fake.FailNext("POST /orgs/*/actions/runners/generate-jitconfig", http.StatusBadGateway, 2)
	if _, err := e.client.GenerateJITConfig(ctxT(t), github.OrgScope("acme"), "r", []string{"linux"}, 0); err != nil {
		t.Fatal(err)
	}
	if n := e.fake.CountCalls("POST", "/orgs/acme/actions/runners/generate-jitconfig"); n != 3 {
		t.Fatalf("%d attempts, want 3", n)
	}
	waits := e.sleeps.all()
	if len(waits) != 2 {
		t.Fatalf("waits %v, want 2", waits)
	}
	// Exponential with jitter: attempt n waits within [base·2ⁿ/2, base·2ⁿ].
	for i, w := range waits {
		hi := time.Second << i
		if w < hi/2 || w > hi {
			t.Errorf("wait %d = %v, want within [%v, %v]", i, w, hi/2, hi)
		}
	}
	st := e.client.Stats()
	if st.Errors[github.KindServer] != 2 || st.Retries != 2 {
		t.Fatalf("stats %+v", st)
	}
	if len(e.fake.Runners()) != 1 {
		t.Fatal("want exactly one registration")
	}
}

func TestRetriesAreBounded(t *testing.T) {
	e := newEnv(t, nil, github.WithRetryPolicy(github.RetryPolicy{MaxRetries: 3, MaxDelay: 4 * time.Second}))
	e.fake.InstallOrg("acme")
	e.fake.FailNext("POST /orgs/acme/actions/runners/generate-jitconfig", http.StatusServiceUnavailable, 100)
	_, err := e.client.GenerateJITConfig(ctxT(t), github.OrgScope("acme"), "r", []string{"linux"}, 0)
	if !errors.Is(err, github.ErrServer) || !strings.Contains(err.Error(), "503") {
		t.Fatalf("err = %v", err)
	}
	if n := e.fake.CountCalls("POST", "/orgs/acme/actions/runners/generate-jitconfig"); n != 4 {
		t.Fatalf("%d attempts, want 1 + 3 retries", n)
	}
	for _, w := range e.sleeps.all() {
		if w > 4*time.Second {
			t.Errorf("wait %v exceeds MaxDelay", w)
		}
	}
}

func TestSecondaryRateLimitHonoursRetryAfter(t *testing.T) {
	e := newEnv(t, nil)
	e.fake.InstallOrg("acme")
	ctx := ctxT(t)
	if _, err := e.client.ListRunners(ctx, github.OrgScope("acme")); err != nil {
		t.Fatal(err)
	}
	e.fake.SecondaryRateLimit(1, 7*time.Second)
	if _, err := e.client.GenerateJITConfig(ctx, github.OrgScope("acme"), "r", []string{"linux"}, 0); err != nil {
		t.Fatal(err)
	}
	if w := e.sleeps.all(); len(w) != 1 || w[0] != 7*time.Second {
		t.Fatalf("waits %v, want [7s]", w)
	}
	if n := e.client.Stats().Errors[github.KindRateLimited]; n != 1 {
		t.Fatalf("rate limited count %d", n)
	}
}

func TestPrimaryRateLimitWaitsForReset(t *testing.T) {
	now := time.Unix(1_900_000_000, 0)
	e := newEnv(t, nil, github.WithClock(func() time.Time { return now }))
	e.fake.InstallOrg("acme")
	e.fake.RateLimit(1, now.Add(42*time.Second))
	if _, err := e.client.ListRunners(ctxT(t), github.OrgScope("acme")); err != nil {
		t.Fatal(err)
	}
	// Reset plus a second of margin.
	if w := e.sleeps.all(); len(w) != 1 || w[0] != 43*time.Second {
		t.Fatalf("waits %v, want [43s]", w)
	}
	rl := e.client.Stats().RateLimit
	if rl.Limit != 5000 || rl.Remaining <= 0 || rl.Remaining >= 5000 || rl.Resource != "core" || !rl.Observed.Equal(now) {
		t.Fatalf("rate limit %+v", rl)
	}
}

func TestLongRateLimitIsReturned(t *testing.T) {
	now := time.Unix(1_900_000_000, 0)
	e := newEnv(t, nil, github.WithClock(func() time.Time { return now }))
	e.fake.InstallOrg("acme")
	e.fake.RateLimit(5, now.Add(30*time.Minute))
	_, err := e.client.ListRunners(ctxT(t), github.OrgScope("acme"))
	if !errors.Is(err, github.ErrRateLimited) {
		t.Fatalf("err = %v, want ErrRateLimited", err)
	}
	if w := e.sleeps.all(); len(w) != 0 {
		t.Fatalf("waited %v for a 30-minute limit", w)
	}
}

func TestNewRejectsBadConfiguration(t *testing.T) {
	_, pem, err := githubtest.AppKey()
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		cfg  config.GitHub
		want string
	}{
		{config.GitHub{}, "no credentials"},
		{config.GitHub{AppID: 1}, "github.private_key_file: required"},
		{config.GitHub{PrivateKey: config.Secret(pem)}, "github.app_id: required"},
		{config.GitHub{AppID: 1, PrivateKey: "not a key"}, "github.private_key: not a PEM-encoded RSA private key"},
		{config.GitHub{AppID: 1, PrivateKey: config.Secret(pem), PrivateKeyFile: "/x"}, "not both"},
		{config.GitHub{AppID: 1, PrivateKeyFile: "/nonexistent/key.pem"}, "github.private_key_file: open /nonexistent/key.pem"},
		{config.GitHub{AppID: 1, PrivateKey: config.Secret(pem), APIURL: "https://ghe.example.com/"}, "github.api_url"},
		{config.GitHub{AppID: 1, PrivateKey: config.Secret(pem), APIURL: "ftp://x/api/v3/"}, "github.api_url"},
	} {
		if _, err := github.New(tc.cfg); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("New(%+v) = %v, want %q", tc.cfg, err, tc.want)
		} else if strings.Contains(err.Error(), "PRIVATE KEY") {
			t.Errorf("error shows key material: %v", err)
		}
	}
}

func TestWebURL(t *testing.T) {
	_, pem, err := githubtest.AppKey()
	if err != nil {
		t.Fatal(err)
	}
	for api, web := range map[string]string{
		"":                                    "https://github.com",
		"https://api.github.com/":             "https://github.com",
		"https://ghe.example.com/api/v3/":     "https://ghe.example.com",
		"https://ghe.example.com/api/v3":      "https://ghe.example.com",
		"https://api.octocorp.ghe.com/":       "https://octocorp.ghe.com",
		"http://127.0.0.1:8080/gh/api/v3/":    "http://127.0.0.1:8080/gh",
		"https://ghe.example.com:8443/api/v3": "https://ghe.example.com:8443",
	} {
		c, err := github.New(config.GitHub{AppID: 1, PrivateKey: config.Secret(pem), APIURL: api})
		if err != nil {
			t.Errorf("%q: %v", api, err)
			continue
		}
		if got := c.WebURL(); got != web {
			t.Errorf("WebURL for %q = %q, want %q", api, got, web)
		}
	}
}
