package githubtest

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"
)

type runnerGroup struct {
	id        int64
	name      string
	isDefault bool
}

// defaultGroupID is the id GitHub gives every account's default runner
// group.
const defaultGroupID = 1

type runner struct {
	id         int64
	name       string
	scope      Scope
	labels     []string
	groupID    int64
	scaleSetID int
	status     string // offline, online
	busy       bool
	jobID      int64
	created    time.Time
}

// Runner is a registered runner as the fake sees it.
type Runner struct {
	ID         int64
	Name       string
	Scope      Scope
	Labels     []string
	GroupID    int64
	ScaleSetID int // 0 for runners registered through the REST JIT endpoint
	Status     string
	Busy       bool
}

// Runners returns every registered runner, ordered by id.
func (s *Server) Runners() []Runner {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]Runner, 0, len(s.runners))
	for _, r := range s.runners {
		out = append(out, Runner{
			ID: r.id, Name: r.name, Scope: r.scope, Labels: append([]string(nil), r.labels...),
			GroupID: r.groupID, ScaleSetID: r.scaleSetID, Status: r.status, Busy: r.busy,
		})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// AddRunners registers n offline runners named prefix-1 … prefix-n in scope,
// as if created earlier, and returns their ids.
func (s *Server) AddRunners(scope Scope, prefix string, n int, labels ...string) []int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	ids := make([]int64, n)
	for i := range n {
		r := s.addRunner(scope, fmt.Sprintf("%s-%d", prefix, i+1), labels, defaultGroupID, 0)
		ids[i] = r.id
	}
	return ids
}

// ConnectRunner marks a runner online, as the runner application does when
// it starts with its JIT config.
func (s *Server) ConnectRunner(name string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	r := s.runnerByName(name)
	if r == nil {
		return fmt.Errorf("githubtest: no runner named %q", name)
	}
	r.status = "online"
	s.notify()
	return nil
}

// AddRunnerGroup creates a runner group in scope and returns its id.
func (s *Server) AddRunnerGroup(scope Scope, name string) int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.groupsOf(scope)
	g := &runnerGroup{id: s.newID(), name: name}
	s.groups[scope.key()] = append(s.groups[scope.key()], g)
	return g.id
}

// groupsOf returns scope's runner groups, creating the default one. Call
// with s.mu held.
func (s *Server) groupsOf(scope Scope) []*runnerGroup {
	k := scope.key()
	if len(s.groups[k]) == 0 {
		s.groups[k] = []*runnerGroup{{id: defaultGroupID, name: "Default", isDefault: true}}
	}
	return s.groups[k]
}

func (s *Server) group(scope Scope, id int64) *runnerGroup {
	for _, g := range s.groupsOf(scope) {
		if g.id == id {
			return g
		}
	}
	return nil
}

func (s *Server) runnerByName(name string) *runner {
	for _, r := range s.runners {
		if strings.EqualFold(r.name, name) {
			return r
		}
	}
	return nil
}

func (s *Server) runnerNamed(scope Scope, name string) *runner {
	for _, r := range s.runners {
		if r.scope.key() == scope.key() && strings.EqualFold(r.name, name) {
			return r
		}
	}
	return nil
}

func (s *Server) addRunner(scope Scope, name string, labels []string, group int64, scaleSet int) *runner {
	r := &runner{
		id: s.newID(), name: name, scope: scope, labels: append([]string(nil), labels...),
		groupID: group, scaleSetID: scaleSet, status: "offline", created: s.now(),
	}
	s.runners[r.id] = r
	s.notify()
	return r
}

func (s *Server) routeREST(mux *http.ServeMux) {
	mux.HandleFunc("GET /app", s.handleApp)
	mux.HandleFunc("GET /app/installations", s.handleListInstallations)
	mux.HandleFunc("GET /app/installations/{id}", s.handleGetInstallation)
	mux.HandleFunc("POST /app/installations/{id}/access_tokens", s.handleAccessToken)
	mux.HandleFunc("GET /orgs/{org}/installation", s.findInstallation(func(r *http.Request, in *installation) bool {
		return in.targetType == "Organization" && strings.EqualFold(in.account, r.PathValue("org"))
	}))
	mux.HandleFunc("GET /users/{user}/installation", s.findInstallation(func(r *http.Request, in *installation) bool {
		return in.targetType != "Enterprise" && strings.EqualFold(in.account, r.PathValue("user"))
	}))
	mux.HandleFunc("GET /repos/{owner}/{repo}/installation", s.findInstallation(func(r *http.Request, in *installation) bool {
		repo := r.PathValue("repo")
		return in.targetType != "Enterprise" && strings.EqualFold(in.account, r.PathValue("owner")) &&
			(in.repos == nil || slices.ContainsFunc(in.repos, func(n string) bool { return strings.EqualFold(n, repo) }))
	}))
	mux.HandleFunc("GET /enterprises/{enterprise}/installation", s.findInstallation(func(r *http.Request, in *installation) bool {
		return in.targetType == "Enterprise" && strings.EqualFold(in.account, r.PathValue("enterprise"))
	}))

	scopes := []struct {
		prefix string
		scope  func(*http.Request) Scope
	}{
		{"/orgs/{org}", func(r *http.Request) Scope { return Org(r.PathValue("org")) }},
		{"/repos/{owner}/{repo}", func(r *http.Request) Scope { return Repo(r.PathValue("owner") + "/" + r.PathValue("repo")) }},
		{"/enterprises/{enterprise}", func(r *http.Request) Scope { return Enterprise(r.PathValue("enterprise")) }},
	}
	for _, sc := range scopes {
		mux.HandleFunc("POST "+sc.prefix+"/actions/runners/generate-jitconfig", s.withScope(sc.scope, Write, s.handleGenerateJIT))
		mux.HandleFunc("POST "+sc.prefix+"/actions/runners/registration-token", s.withScope(sc.scope, Write, s.handleRegistrationToken))
		mux.HandleFunc("GET "+sc.prefix+"/actions/runners", s.withScope(sc.scope, Read, s.handleListRunners))
		mux.HandleFunc("GET "+sc.prefix+"/actions/runners/{id}", s.withScope(sc.scope, Read, s.handleGetRunner))
		mux.HandleFunc("DELETE "+sc.prefix+"/actions/runners/{id}", s.withScope(sc.scope, Write, s.handleDeleteRunner))
		mux.HandleFunc("GET "+sc.prefix+"/actions/runner-groups", s.withScope(sc.scope, Read, s.handleListGroups))
	}
	mux.HandleFunc("POST /actions/runner-registration", s.handleRunnerRegistration)
}

func (s *Server) handleApp(w http.ResponseWriter, r *http.Request) {
	if !s.requireApp(w, r) {
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{
		"id": s.opts.AppID, "slug": "fireactions-test", "name": "fireactions test", "client_id": s.opts.ClientID,
	})
}

func (s *Server) installationJSON(r *http.Request, in *installation) map[string]any {
	sel := "all"
	if in.repos != nil {
		sel = "selected"
	}
	account := map[string]any{"login": in.account, "id": in.id + 1_000_000, "type": in.targetType}
	if in.targetType == "Enterprise" {
		account = map[string]any{"slug": in.account, "name": in.account, "id": in.id + 1_000_000}
	}
	return map[string]any{
		"id": in.id, "app_id": s.opts.AppID, "app_slug": "fireactions-test",
		"target_id": in.id + 1_000_000, "target_type": in.targetType, "account": account,
		"repository_selection": sel, "permissions": in.perms,
		"access_tokens_url": fmt.Sprintf("http://%s/app/installations/%d/access_tokens", r.Host, in.id),
	}
}

func (s *Server) handleListInstallations(w http.ResponseWriter, r *http.Request) {
	if !s.requireApp(w, r) {
		return
	}
	s.mu.Lock()
	ids := make([]int64, 0, len(s.installations))
	for id := range s.installations {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	out := make([]map[string]any, 0, len(ids))
	for _, id := range ids {
		out = append(out, s.installationJSON(r, s.installations[id]))
	}
	s.mu.Unlock()
	page, perPage := pageParams(r)
	start, end := pageBounds(len(out), page, perPage)
	setLink(w, r, len(out), page, perPage)
	writeJSON(w, http.StatusOK, out[start:end])
}

func (s *Server) handleGetInstallation(w http.ResponseWriter, r *http.Request) {
	if !s.requireApp(w, r) {
		return
	}
	id, _ := strconv.ParseInt(r.PathValue("id"), 10, 64)
	s.mu.Lock()
	defer s.mu.Unlock()
	in := s.installations[id]
	if in == nil {
		writeNotFound(w)
		return
	}
	writeJSON(w, http.StatusOK, s.installationJSON(r, in))
}

func (s *Server) findInstallation(match func(*http.Request, *installation) bool) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if !s.requireApp(w, r) {
			return
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		var found *installation
		for _, in := range s.installations {
			if match(r, in) && (found == nil || in.id < found.id) {
				found = in
			}
		}
		if found == nil {
			writeNotFound(w)
			return
		}
		writeJSON(w, http.StatusOK, s.installationJSON(r, found))
	}
}

func (s *Server) handleAccessToken(w http.ResponseWriter, r *http.Request) {
	if !s.requireApp(w, r) {
		return
	}
	id, _ := strconv.ParseInt(r.PathValue("id"), 10, 64)
	s.mu.Lock()
	defer s.mu.Unlock()
	in := s.installations[id]
	if in == nil {
		writeNotFound(w)
		return
	}
	tok := randomToken("ghs_", 36)
	exp := s.now().Add(s.opts.TokenTTL).Truncate(time.Second)
	s.tokens[tok] = &instToken{installation: id, expires: exp}
	s.remember(tok)
	sel := "all"
	if in.repos != nil {
		sel = "selected"
	}
	writeJSON(w, http.StatusCreated, map[string]any{
		"token": tok, "expires_at": exp.UTC().Format(time.RFC3339),
		"permissions": in.perms, "repository_selection": sel,
	})
}

// withScope authenticates and authorizes a runner endpoint, holding s.mu
// for the handler.
func (s *Server) withScope(scopeOf func(*http.Request) Scope, level string, h func(http.ResponseWriter, *http.Request, Scope)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		scope := scopeOf(r)
		s.mu.Lock()
		defer s.mu.Unlock()
		if !s.authorize(w, r, scope, level) {
			return
		}
		h(w, r, scope)
	}
}

func runnerJSON(r *runner) map[string]any {
	labels := make([]map[string]any, len(r.labels))
	for i, l := range r.labels {
		labels[i] = map[string]any{"id": i + 1, "name": l, "type": "custom"}
	}
	return map[string]any{
		"id": r.id, "name": r.name, "os": "Linux", "status": r.status, "busy": r.busy,
		"ephemeral": true, "runner_group_id": r.groupID, "labels": labels,
	}
}

func (s *Server) handleGenerateJIT(w http.ResponseWriter, r *http.Request, scope Scope) {
	var body map[string]json.RawMessage
	if err := json.NewDecoder(r.Body).Decode(&body); err != nil {
		writeError(w, http.StatusBadRequest, "Problems parsing JSON")
		return
	}
	var name string
	if raw, ok := body["name"]; !ok {
		writeValidation(w, "Invalid input: object is missing required key: name")
		return
	} else if json.Unmarshal(raw, &name) != nil || strings.TrimSpace(name) == "" {
		writeValidation(w, "Invalid input: name must be a non-empty string")
		return
	}
	var groupID int64
	if raw, ok := body["runner_group_id"]; !ok {
		writeValidation(w, "Invalid input: object is missing required key: runner_group_id")
		return
	} else if json.Unmarshal(raw, &groupID) != nil {
		writeValidation(w, "Invalid input: runner_group_id must be an integer")
		return
	}
	var labels []string
	if raw, ok := body["labels"]; !ok {
		writeValidation(w, "Invalid input: object is missing required key: labels")
		return
	} else if json.Unmarshal(raw, &labels) != nil || len(labels) < 1 || len(labels) > 100 {
		writeValidation(w, "Invalid input: labels must be an array of 1 to 100 strings")
		return
	}
	for _, l := range labels {
		if strings.TrimSpace(l) == "" {
			writeValidation(w, "Invalid input: labels must not be empty strings")
			return
		}
	}
	if s.group(scope, groupID) == nil {
		writeNotFound(w)
		return
	}
	if s.runnerNamed(scope, name) != nil {
		writeError(w, http.StatusConflict, fmt.Sprintf("Already exists - A runner with the name %s already exists.", name))
		return
	}
	rn := s.addRunner(scope, name, labels, groupID, 0)
	jit := s.encodeJIT(r, rn)
	writeJSON(w, http.StatusCreated, map[string]any{"runner": runnerJSON(rn), "encoded_jit_config": jit})
}

// jitRunner is the part of a JIT config a runner reads about itself.
type jitRunner struct {
	AgentID    int64  `json:"agentId"`
	AgentName  string `json:"agentName"`
	PoolID     int    `json:"poolId"`
	ServerURL  string `json:"serverUrl"`
	GitHubURL  string `json:"gitHubUrl"`
	WorkFolder string `json:"workFolder"`
	Ephemeral  bool   `json:"ephemeral"`
	ScaleSetID int    `json:"runnerScaleSetId,omitempty"`
}

// encodeJIT builds a JIT config in the shape GitHub uses: base64 of a JSON
// object whose ".runner" and ".credentials" members are base64 JSON. Call
// with s.mu held.
func (s *Server) encodeJIT(r *http.Request, rn *runner) string {
	b64 := func(v any) string {
		b, _ := json.Marshal(v)
		return base64.StdEncoding.EncodeToString(b)
	}
	runnerPart := jitRunner{
		AgentID: rn.id, AgentName: rn.name, PoolID: 1,
		ServerURL: "http://" + r.Host + actionsPrefix + s.tenantFor(rn.scope).id + "/",
		GitHubURL: "http://" + r.Host + "/" + scopePath(rn.scope), WorkFolder: "_work",
		Ephemeral: true, ScaleSetID: rn.scaleSetID,
	}
	creds := map[string]any{"scheme": "OAuth", "data": map[string]string{
		"clientId": newUUID(), "authorizationUrl": "http://" + r.Host + "/_oauth/token",
		"secret": randomToken("", 40),
	}}
	enc := b64(map[string]string{".runner": b64(runnerPart), ".credentials": b64(creds), ".credentials_rsaparams": b64(map[string]string{"d": randomToken("", 64)})})
	s.remember(enc)
	return enc
}

// JITRunner is what a JIT config says about its runner.
type JITRunner struct {
	ID         int64
	Name       string
	ScaleSetID int
}

// DecodeJITConfig reads the runner id and name out of an encoded JIT config
// the fake issued (a fake runner can use it to know who it is).
func DecodeJITConfig(encoded string) (JITRunner, error) {
	outer, err := base64.StdEncoding.DecodeString(encoded)
	if err != nil {
		return JITRunner{}, fmt.Errorf("decode JIT config: %w", err)
	}
	var parts map[string]string
	if err := json.Unmarshal(outer, &parts); err != nil {
		return JITRunner{}, fmt.Errorf("decode JIT config: %w", err)
	}
	inner, err := base64.StdEncoding.DecodeString(parts[".runner"])
	if err != nil {
		return JITRunner{}, fmt.Errorf("decode JIT config .runner: %w", err)
	}
	var jr jitRunner
	if err := json.Unmarshal(inner, &jr); err != nil {
		return JITRunner{}, fmt.Errorf("decode JIT config .runner: %w", err)
	}
	return JITRunner{ID: jr.AgentID, Name: jr.AgentName, ScaleSetID: jr.ScaleSetID}, nil
}

func scopePath(scope Scope) string {
	if scope.Kind == KindEnterprise {
		return "enterprises/" + scope.Name
	}
	return scope.Name
}

type regToken struct {
	scope   Scope
	expires time.Time
}

func (s *Server) handleRegistrationToken(w http.ResponseWriter, r *http.Request, scope Scope) {
	tok := randomToken("A", 28)
	exp := s.now().Add(time.Hour).Truncate(time.Second)
	s.regTokens[tok] = &regToken{scope: scope, expires: exp}
	s.remember(tok)
	writeJSON(w, http.StatusCreated, map[string]any{"token": tok, "expires_at": exp.UTC().Format(time.RFC3339)})
}

func pageParams(r *http.Request) (page, perPage int) {
	page, perPage = 1, 30
	if v, err := strconv.Atoi(r.URL.Query().Get("page")); err == nil && v > 0 {
		page = v
	}
	if v, err := strconv.Atoi(r.URL.Query().Get("per_page")); err == nil && v > 0 {
		perPage = min(v, 100)
	}
	return page, perPage
}

func pageBounds(total, page, perPage int) (int, int) {
	start := min((page-1)*perPage, total)
	return start, min(start+perPage, total)
}

// setLink writes GitHub's pagination Link header.
func setLink(w http.ResponseWriter, r *http.Request, total, page, perPage int) {
	last := max(1, (total+perPage-1)/perPage)
	link := func(p int, rel string) string {
		u := url.URL{Scheme: "http", Host: r.Host, Path: r.URL.Path}
		q := r.URL.Query()
		q.Set("page", strconv.Itoa(p))
		q.Set("per_page", strconv.Itoa(perPage))
		u.RawQuery = q.Encode()
		return fmt.Sprintf("<%s>; rel=%q", u.String(), rel)
	}
	var links []string
	if page < last {
		links = append(links, link(page+1, "next"), link(last, "last"))
	}
	if page > 1 {
		links = append(links, link(1, "first"), link(page-1, "prev"))
	}
	if len(links) > 0 {
		w.Header().Set("Link", strings.Join(links, ", "))
	}
}

func (s *Server) handleListRunners(w http.ResponseWriter, r *http.Request, scope Scope) {
	name := r.URL.Query().Get("name")
	var rs []*runner
	for _, rn := range s.runners {
		if rn.scope.key() == scope.key() && (name == "" || strings.EqualFold(rn.name, name)) {
			rs = append(rs, rn)
		}
	}
	sort.Slice(rs, func(i, j int) bool { return rs[i].id < rs[j].id })
	page, perPage := pageParams(r)
	start, end := pageBounds(len(rs), page, perPage)
	out := make([]map[string]any, 0, end-start)
	for _, rn := range rs[start:end] {
		out = append(out, runnerJSON(rn))
	}
	setLink(w, r, len(rs), page, perPage)
	writeJSON(w, http.StatusOK, map[string]any{"total_count": len(rs), "runners": out})
}

func (s *Server) scopedRunner(r *http.Request, scope Scope) *runner {
	id, err := strconv.ParseInt(r.PathValue("id"), 10, 64)
	if err != nil {
		return nil
	}
	rn := s.runners[id]
	if rn == nil || rn.scope.key() != scope.key() {
		return nil
	}
	return rn
}

func (s *Server) handleGetRunner(w http.ResponseWriter, r *http.Request, scope Scope) {
	rn := s.scopedRunner(r, scope)
	if rn == nil {
		writeNotFound(w)
		return
	}
	writeJSON(w, http.StatusOK, runnerJSON(rn))
}

func (s *Server) handleDeleteRunner(w http.ResponseWriter, r *http.Request, scope Scope) {
	rn := s.scopedRunner(r, scope)
	if rn == nil {
		writeNotFound(w)
		return
	}
	if rn.busy {
		writeValidation(w, fmt.Sprintf("Bad request - Runner %q is still running a job", rn.name))
		return
	}
	delete(s.runners, rn.id)
	s.notify()
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) handleListGroups(w http.ResponseWriter, r *http.Request, scope Scope) {
	var out []map[string]any
	for _, g := range s.groupsOf(scope) {
		out = append(out, map[string]any{"id": g.id, "name": g.name, "default": g.isDefault, "visibility": "all"})
	}
	writeJSON(w, http.StatusOK, map[string]any{"total_count": len(out), "runner_groups": out})
}

// handleRunnerRegistration is the handshake that turns a registration token
// into an Actions service URL and admin token.
func (s *Server) handleRunnerRegistration(w http.ResponseWriter, r *http.Request) {
	scheme, tok, _ := strings.Cut(r.Header.Get("Authorization"), " ")
	if scheme != "RemoteAuth" {
		writeError(w, http.StatusUnauthorized, "Bad credentials")
		return
	}
	var body struct {
		URL         string `json:"url"`
		RunnerEvent string `json:"runner_event"`
	}
	if err := json.NewDecoder(r.Body).Decode(&body); err != nil {
		writeError(w, http.StatusBadRequest, "Problems parsing JSON")
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	rt := s.regTokens[tok]
	if rt == nil || !s.now().Before(rt.expires) {
		writeError(w, http.StatusUnauthorized, "Bad credentials")
		return
	}
	if body.RunnerEvent != "register" {
		writeValidation(w, "Invalid input: runner_event must be \"register\"")
		return
	}
	scope, err := scopeFromURL(body.URL, r.Host)
	if err != nil {
		writeValidation(w, err.Error())
		return
	}
	if scope.key() != rt.scope.key() {
		writeError(w, http.StatusForbidden, "The registration token does not belong to "+body.URL)
		return
	}
	t := s.tenantFor(scope)
	writeJSON(w, http.StatusCreated, map[string]any{
		"url":          "http://" + r.Host + actionsPrefix + t.id + "/",
		"token":        s.adminToken(t),
		"token_schema": "OAuthAccessToken",
	})
}

// scopeFromURL parses a GitHub config URL (https://HOST/org, /owner/repo or
// /enterprises/slug) served by host.
func scopeFromURL(raw, host string) (Scope, error) {
	u, err := url.Parse(raw)
	if err != nil || !strings.EqualFold(u.Host, host) {
		return Scope{}, fmt.Errorf("url %q is not on this GitHub (%s)", raw, host)
	}
	parts := strings.Split(strings.Trim(u.Path, "/"), "/")
	switch {
	case len(parts) == 1 && parts[0] != "":
		return Org(parts[0]), nil
	case len(parts) == 2 && strings.EqualFold(parts[0], "enterprises"):
		return Enterprise(parts[1]), nil
	case len(parts) == 2:
		return Repo(parts[0] + "/" + parts[1]), nil
	}
	return Scope{}, fmt.Errorf("url %q names no organization, repository or enterprise", raw)
}
