package githubtest

import (
	"bytes"
	"crypto/rsa"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v4"
)

func start(t *testing.T, opts ...func(*Options)) (*Server, *rsa.PrivateKey) {
	t.Helper()
	key, _, err := AppKey()
	if err != nil {
		t.Fatal(err)
	}
	return New(t, &key.PublicKey, opts...), key
}

type answer struct {
	status int
	header http.Header
	body   map[string]any
	raw    string
}

func call(t *testing.T, method, url, auth string, body any) answer {
	t.Helper()
	var r io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		r = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, url, r)
	if err != nil {
		t.Fatal(err)
	}
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	a := answer{status: resp.StatusCode, header: resp.Header, raw: string(raw)}
	_ = json.Unmarshal(raw, &a.body)
	return a
}

func sign(t *testing.T, method jwt.SigningMethod, key any, claims jwt.MapClaims) string {
	t.Helper()
	s, err := jwt.NewWithClaims(method, claims).SignedString(key)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestAppJWTChecks(t *testing.T) {
	s, key := start(t, func(o *Options) { o.AppID = 4242; o.ClientID = "Iv23liTest" })
	id := s.InstallOrg("acme")
	other, _, err := GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now().Unix()
	good := jwt.MapClaims{"iat": now - 60, "exp": now + 540, "iss": "4242"}
	with := func(k string, v any) jwt.MapClaims {
		c := jwt.MapClaims{}
		for a, b := range good {
			c[a] = b
		}
		if v == nil {
			delete(c, k)
		} else {
			c[k] = v
		}
		return c
	}
	url := fmt.Sprintf("%s/app/installations/%d/access_tokens", s.URL(), id)
	for _, tc := range []struct {
		name string
		auth string
		want int
		msg  string
	}{
		{"issuer as string", "Bearer " + sign(t, jwt.SigningMethodRS256, key, good), 201, ""},
		{"issuer as number", "Bearer " + sign(t, jwt.SigningMethodRS256, key, with("iss", 4242)), 201, ""},
		{"client id as issuer", "Bearer " + sign(t, jwt.SigningMethodRS256, key, with("iss", "Iv23liTest")), 201, ""},
		{"wrong key", "Bearer " + sign(t, jwt.SigningMethodRS256, other, good), 401, "could not be decoded"},
		{"HS256 keyed with the public key", "Bearer " + sign(t, jwt.SigningMethodHS256, []byte("k"), good), 401, "could not be decoded"},
		{"alg none", "Bearer " + sign(t, jwt.SigningMethodNone, jwt.UnsafeAllowNoneSignatureType, good), 401, "could not be decoded"},
		{"exp too far", "Bearer " + sign(t, jwt.SigningMethodRS256, key, with("exp", now+11*60)), 401, "too far in the future"},
		{"lifetime over ten minutes", "Bearer " + sign(t, jwt.SigningMethodRS256, key, jwt.MapClaims{"iat": now - 300, "exp": now + 360, "iss": "4242"}), 401, "too far in the future"},
		{"expired", "Bearer " + sign(t, jwt.SigningMethodRS256, key, jwt.MapClaims{"iat": now - 600, "exp": now - 1, "iss": "4242"}), 401, "'exp'"},
		{"issued in the future", "Bearer " + sign(t, jwt.SigningMethodRS256, key, with("iat", now+60)), 401, "'iat'"},
		{"fractional iat", "Bearer " + sign(t, jwt.SigningMethodRS256, key, with("iat", float64(now)-30.5)), 401, "'iat'"},
		{"no iat", "Bearer " + sign(t, jwt.SigningMethodRS256, key, with("iat", nil)), 401, "'iat'"},
		{"other app", "Bearer " + sign(t, jwt.SigningMethodRS256, key, with("iss", "4243")), 401, "Integration not found"},
		{"issuer not a number", "Bearer " + sign(t, jwt.SigningMethodRS256, key, with("iss", "acme")), 401, "'iss'"},
		{"token scheme", "token " + sign(t, jwt.SigningMethodRS256, key, good), 401, "could not be decoded"},
		{"installation token instead of JWT", "Bearer ghs_abc", 401, "could not be decoded"},
		{"nothing", "", 401, "could not be decoded"},
	} {
		a := call(t, http.MethodPost, url, tc.auth, nil)
		if a.status != tc.want || (tc.msg != "" && !strings.Contains(fmt.Sprint(a.body["message"]), tc.msg)) {
			t.Errorf("%s: %d %s, want %d %q", tc.name, a.status, a.raw, tc.want, tc.msg)
		}
		if tc.want == 201 {
			tok, _ := a.body["token"].(string)
			exp, err := time.Parse(time.RFC3339, fmt.Sprint(a.body["expires_at"]))
			if !strings.HasPrefix(tok, "ghs_") || err != nil || time.Until(exp) < 59*time.Minute {
				t.Errorf("%s: token answer %s", tc.name, a.raw)
			}
		}
	}
	if n := s.TokensIssued(); n != 3 {
		t.Fatalf("%d tokens issued, want 3", n)
	}
}

// token mints an installation token the way a client would.
func token(t *testing.T, s *Server, key *rsa.PrivateKey, installation int64) string {
	t.Helper()
	now := time.Now().Unix()
	jwtStr := sign(t, jwt.SigningMethodRS256, key, jwt.MapClaims{"iat": now - 30, "exp": now + 120, "iss": strconv.FormatInt(s.AppID(), 10)})
	a := call(t, http.MethodPost, fmt.Sprintf("%s/api/v3/app/installations/%d/access_tokens", s.URL(), installation), "Bearer "+jwtStr, nil)
	if a.status != 201 {
		t.Fatalf("access token: %d %s", a.status, a.raw)
	}
	return a.body["token"].(string)
}

func TestInstallationTokensAreScoped(t *testing.T) {
	s, key := start(t)
	acme := token(t, s, key, s.InstallOrg("acme"))
	octo := token(t, s, key, s.InstallRepos("octo", "app"))
	s.AddToken("ghp_ent", "manage_runners:enterprise")
	list := func(path string) string { return s.URL() + path + "/actions/runners" }
	for _, tc := range []struct {
		path, auth string
		want       int
	}{
		{"/orgs/acme", "token " + acme, 200},
		{"/orgs/acme", "Bearer " + acme, 200},
		{"/orgs/other", "token " + acme, 403},
		{"/repos/acme/anything", "token " + acme, 200},
		{"/repos/octo/app", "token " + octo, 200},
		{"/repos/octo/secret", "token " + octo, 404},
		{"/orgs/octo", "token " + octo, 403},
		{"/enterprises/big", "token " + acme, 403},
		{"/enterprises/big", "token ghp_ent", 200},
		{"/orgs/acme", "token ghp_ent", 403},
		{"/orgs/acme", "token ghs_forged", 401},
		{"/orgs/acme", "", 401},
	} {
		if a := call(t, http.MethodGet, list(tc.path), tc.auth, nil); a.status != tc.want {
			t.Errorf("GET %s with %q: %d %s, want %d", tc.path, tc.auth[:min(len(tc.auth), 12)], a.status, a.raw, tc.want)
		}
	}

	// Tokens expire with the fake's clock.
	s.Advance(61 * time.Minute)
	if a := call(t, http.MethodGet, list("/orgs/acme"), "token "+acme, nil); a.status != 401 || a.body["message"] != "Bad credentials" {
		t.Errorf("expired token: %d %s", a.status, a.raw)
	}
}

func TestUninstallRevokesTokens(t *testing.T) {
	s, key := start(t)
	id := s.InstallOrg("acme")
	tok := token(t, s, key, id)
	s.Uninstall(id)
	if a := call(t, http.MethodGet, s.URL()+"/orgs/acme/actions/runners", "token "+tok, nil); a.status != 401 {
		t.Fatalf("token of a removed installation: %d", a.status)
	}
}

func TestJITValidation(t *testing.T) {
	s, key := start(t)
	tok := "token " + token(t, s, key, s.InstallOrg("acme"))
	url := s.APIURL() + "orgs/acme/actions/runners/generate-jitconfig"
	for _, tc := range []struct {
		body map[string]any
		want int
		msg  string
	}{
		{map[string]any{"name": "r", "labels": []string{"x"}}, 422, "missing required key: runner_group_id"},
		{map[string]any{"runner_group_id": 1, "labels": []string{"x"}}, 422, "missing required key: name"},
		{map[string]any{"name": "r", "runner_group_id": 1}, 422, "missing required key: labels"},
		{map[string]any{"name": "r", "runner_group_id": 1, "labels": []string{}}, 422, "1 to 100"},
		{map[string]any{"name": "r", "runner_group_id": "one", "labels": []string{"x"}}, 422, "integer"},
		{map[string]any{"name": "r", "runner_group_id": 77, "labels": []string{"x"}}, 404, "Not Found"},
		{map[string]any{"name": "r", "runner_group_id": 1, "labels": []string{"x"}}, 201, ""},
		{map[string]any{"name": "R", "runner_group_id": 1, "labels": []string{"x"}}, 409, "Already exists"},
	} {
		a := call(t, http.MethodPost, url, tok, tc.body)
		if a.status != tc.want || !strings.Contains(a.raw, tc.msg) {
			t.Errorf("%v: %d %s, want %d %q", tc.body, a.status, a.raw, tc.want, tc.msg)
		}
	}
}

func TestFaultsAndRateLimitHeaders(t *testing.T) {
	s, key := start(t)
	tok := "token " + token(t, s, key, s.InstallOrg("acme"))
	url := s.URL() + "/orgs/acme/actions/runners"

	a := call(t, http.MethodGet, url, tok, nil)
	if a.header.Get("X-RateLimit-Limit") != "5000" || a.header.Get("X-RateLimit-Remaining") == "" || a.header.Get("X-RateLimit-Reset") == "" {
		t.Fatalf("rate limit headers %v", a.header)
	}

	s.FailNext("GET /orgs/*/actions/runners", 502, 2)
	for i, want := range []int{502, 502, 200} {
		if a := call(t, http.MethodGet, url, tok, nil); a.status != want {
			t.Errorf("call %d: %d, want %d", i, a.status, want)
		}
	}

	reset := time.Now().Add(time.Hour).Truncate(time.Second)
	s.RateLimit(1, reset)
	a = call(t, http.MethodGet, url, tok, nil)
	if a.status != 403 || a.header.Get("X-RateLimit-Remaining") != "0" || a.header.Get("X-RateLimit-Reset") != strconv.FormatInt(reset.Unix(), 10) {
		t.Fatalf("primary limit: %d %v", a.status, a.header)
	}
	s.SecondaryRateLimit(1, 9*time.Second)
	a = call(t, http.MethodGet, url, tok, nil)
	if a.status != 403 || a.header.Get("Retry-After") != "9" || !strings.Contains(a.raw, "secondary rate limit") {
		t.Fatalf("secondary limit: %d %v %s", a.status, a.header, a.raw)
	}
	if a := call(t, http.MethodGet, url, tok, nil); a.status != 200 {
		t.Fatalf("after the limits: %d", a.status)
	}
	var failed int
	for _, c := range s.Calls() {
		if c.Path == "/orgs/acme/actions/runners" && c.Status >= 400 {
			failed++
		}
	}
	if failed != 4 {
		t.Fatalf("%d failed calls recorded, want 4", failed)
	}
}

func TestUserAgentRequired(t *testing.T) {
	s, _ := start(t)
	req, _ := http.NewRequest(http.MethodGet, s.URL()+"/app", nil)
	req.Header.Set("User-Agent", "")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 403 {
		t.Fatalf("no User-Agent: %d", resp.StatusCode)
	}
}

func TestMatchPath(t *testing.T) {
	for _, tc := range []struct {
		pattern, path string
		want          bool
	}{
		{"/orgs/*/actions/runners", "/orgs/acme/actions/runners", true},
		{"/orgs/*/actions/runners", "/orgs/acme/actions/runners/5", false},
		{"/orgs/*/actions/runners/*", "/orgs/acme/actions/runners/5", true},
		{"/_actions/**", "/_actions/t1/_apis/runtime/runnerscalesets/3/messages", true},
		{"/_actions/**", "/orgs/acme", false},
		{"", "/anything", true},
		{"/orgs/acme", "/orgs", false},
	} {
		if got := matchPath(tc.pattern, tc.path); got != tc.want {
			t.Errorf("matchPath(%q, %q) = %v", tc.pattern, tc.path, got)
		}
	}
}

func TestJobControlsEnforceOrder(t *testing.T) {
	s, _ := start(t, func(o *Options) { o.ManualAssign = true })
	if _, err := s.QueueJob("missing", nil); err == nil {
		t.Fatal("queued a job for a missing scale set")
	}
	if _, err := s.QueueJob("", nil); err == nil {
		t.Fatal("queued a labels job without labels")
	}
	s.AddRunners(Org("acme"), "r", 1, "linux")
	job, err := s.QueueJob("", []string{"self-hosted", "linux", "gpu"})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.StartJob(job, "r-1"); err == nil {
		t.Fatal("a runner without the gpu label took the job")
	}
	if err := s.AssignJob(job); err == nil {
		t.Fatal("assigned a labels-mode job")
	}
	if err := s.CompleteJob(job); err != nil {
		t.Fatal(err)
	}
	if j := s.Jobs(); len(j) != 1 || j[0].Result != "canceled" {
		t.Fatalf("jobs %+v", j)
	}
	if err := s.CompleteJob(job); err == nil {
		t.Fatal("completed twice")
	}
	if len(s.Runners()) != 1 {
		t.Fatal("a cancelled job removed a runner")
	}
}
