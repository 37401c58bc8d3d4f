package githubtest

import (
	"encoding/json"
	"fmt"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/golang-jwt/jwt/v4"
)

// actionsPrefix roots the Actions service (what the runner-registration
// handshake points the scale set client at) on the fake's host.
const actionsPrefix = "/_actions/"

type tenant struct {
	id    string
	scope Scope
}

// tenantFor returns the Actions service tenant of a scope. Call with s.mu
// held.
func (s *Server) tenantFor(scope Scope) *tenant {
	for _, t := range s.tenants {
		if t.scope.key() == scope.key() {
			return t
		}
	}
	t := &tenant{id: "t" + strconv.Itoa(len(s.tenants)+1), scope: scope}
	s.tenants[t.id] = t
	return t
}

// adminToken issues the Actions service admin token: a JWT, because the
// scale set client reads its expiry from the "exp" claim. Call with s.mu
// held.
func (s *Server) adminToken(t *tenant) string {
	now := s.now()
	tok := jwt.NewWithClaims(jwt.SigningMethodHS256, jwt.MapClaims{
		"iss": "githubtest", "tenant": t.id,
		"iat": now.Unix(), "exp": now.Add(s.opts.AdminTokenTTL).Unix(),
	})
	signed, err := tok.SignedString(s.adminKey)
	if err != nil {
		panic(err)
	}
	s.remember(signed)
	return signed
}

// verifyAdmin checks the admin token of an Actions service request against
// the tenant in its path. Call with s.mu held.
func (s *Server) verifyAdmin(r *http.Request) (*tenant, bool) {
	t := s.tenants[r.PathValue("tenant")]
	tok := bearer(r)
	if t == nil || tok == "" {
		return nil, false
	}
	claims := jwt.MapClaims{}
	parser := jwt.NewParser(jwt.WithValidMethods([]string{"HS256"}), jwt.WithoutClaimsValidation())
	if _, err := parser.ParseWithClaims(tok, claims, func(*jwt.Token) (any, error) { return s.adminKey, nil }); err != nil {
		return nil, false
	}
	exp, _ := claims["exp"].(float64)
	if claims["tenant"] != t.id || !s.now().Before(time.Unix(int64(exp), 0)) {
		return nil, false
	}
	return t, true
}

// writeException answers in the Actions service's error shape, whose
// typeName the scale set client maps to its sentinel errors.
func writeException(w http.ResponseWriter, status int, typeName, msg string) {
	writeJSON(w, status, map[string]string{
		"typeName": "GitHub.DistributedTask.WebApi." + typeName,
		"message":  msg,
	})
}

func writeUnauthorized(w http.ResponseWriter) {
	writeException(w, http.StatusUnauthorized, "UnauthorizedException", "The token is invalid or expired.")
}

// apiVersioned reports whether the request names an API version, as the
// Actions service requires, in the query or in the Accept header.
func apiVersioned(r *http.Request) bool {
	return r.URL.Query().Get("api-version") != "" || strings.Contains(r.Header.Get("Accept"), "api-version=")
}

type label struct {
	Type string `json:"type"`
	Name string `json:"name"`
}

type scaleSet struct {
	id            int
	tenant        string
	scope         Scope
	name          string
	groupID       int64
	labels        []label
	disableUpdate bool
	created       time.Time
	msgs          []*message
	pending       []map[string]any
	nextMsg       int
}

type message struct {
	id      int
	body    string
	stats   Statistics
	deleted bool
}

type session struct {
	id         string
	scaleSetID int
	owner      string
	token      string
	expires    time.Time
	lastSeen   time.Time
	polling    int
}

// Statistics is what the fake reports about a scale set, in the Actions
// service's terms.
type Statistics struct {
	TotalAvailableJobs     int `json:"totalAvailableJobs"`
	TotalAcquiredJobs      int `json:"totalAcquiredJobs"`
	TotalAssignedJobs      int `json:"totalAssignedJobs"`
	TotalRunningJobs       int `json:"totalRunningJobs"`
	TotalRegisteredRunners int `json:"totalRegisteredRunners"`
	TotalBusyRunners       int `json:"totalBusyRunners"`
	TotalIdleRunners       int `json:"totalIdleRunners"`
}

// ScaleSet is a scale set as the fake sees it.
type ScaleSet struct {
	ID         int
	Name       string
	Scope      Scope
	GroupID    int64
	Labels     []string
	Statistics Statistics
	// Sessions counts live message sessions.
	Sessions int
}

// ScaleSets returns every scale set, ordered by id.
func (s *Server) ScaleSets() []ScaleSet {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []ScaleSet
	for _, ss := range s.scaleSets {
		v := ScaleSet{ID: ss.id, Name: ss.name, Scope: ss.scope, GroupID: ss.groupID, Statistics: s.stats(ss)}
		for _, l := range ss.labels {
			v.Labels = append(v.Labels, l.Name)
		}
		for _, se := range s.sessions {
			if se.scaleSetID == ss.id && s.alive(se) {
				v.Sessions++
			}
		}
		out = append(out, v)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// DropSessions forgets every message session, as GitHub does when their
// owners stop polling; their tokens stop working.
func (s *Server) DropSessions() {
	s.mu.Lock()
	defer s.mu.Unlock()
	clear(s.sessions)
	s.notify()
}

// stats computes a scale set's statistics. Call with s.mu held.
func (s *Server) stats(ss *scaleSet) Statistics {
	var st Statistics
	for _, j := range s.jobs {
		if j.scaleSetID != ss.id {
			continue
		}
		switch j.state {
		case JobAvailable:
			st.TotalAvailableJobs++
		case JobAcquired:
			st.TotalAcquiredJobs++
		case JobAssigned:
			st.TotalAssignedJobs++
		case JobRunning:
			st.TotalAssignedJobs++
			st.TotalRunningJobs++
		}
	}
	for _, r := range s.runners {
		if r.scaleSetID != ss.id {
			continue
		}
		st.TotalRegisteredRunners++
		if r.busy {
			st.TotalBusyRunners++
		} else {
			st.TotalIdleRunners++
		}
	}
	return st
}

// alive reports whether a session still holds its scale set. Call with
// s.mu held.
func (s *Server) alive(se *session) bool {
	return se.polling > 0 || s.now().Sub(se.lastSeen) <= s.opts.SessionIdleTimeout
}

func (s *Server) scaleSetJSON(r *http.Request, ss *scaleSet) map[string]any {
	groupName := ""
	if g := s.group(ss.scope, ss.groupID); g != nil {
		groupName = g.name
	}
	st := s.stats(ss)
	return map[string]any{
		"id": ss.id, "name": ss.name, "runnerGroupId": ss.groupID, "runnerGroupName": groupName,
		"labels": ss.labels, "RunnerSetting": map[string]any{"disableUpdate": ss.disableUpdate},
		"createdOn":          ss.created.UTC().Format(time.RFC3339),
		"runnerJitConfigUrl": fmt.Sprintf("http://%s%s%s/_apis/runtime/runnerscalesets/%d/generatejitconfig", r.Host, actionsPrefix, ss.tenant, ss.id),
		"statistics":         st,
	}
}

const apis = actionsPrefix + "{tenant}/_apis/"

func (s *Server) routeActions(mux *http.ServeMux) {
	admin := func(h func(http.ResponseWriter, *http.Request, *tenant)) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			s.mu.Lock()
			defer s.mu.Unlock()
			t, ok := s.verifyAdmin(r)
			if !ok {
				writeUnauthorized(w)
				return
			}
			if !apiVersioned(r) {
				writeException(w, http.StatusBadRequest, "VssVersionNotSpecifiedException", "The API version is required.")
				return
			}
			h(w, r, t)
		}
	}
	sets := apis + "runtime/runnerscalesets"
	mux.HandleFunc("GET "+sets, admin(s.handleListScaleSets))
	mux.HandleFunc("POST "+sets, admin(s.handleCreateScaleSet))
	mux.HandleFunc("GET "+sets+"/{id}", admin(s.withScaleSet(s.handleGetScaleSet)))
	mux.HandleFunc("PATCH "+sets+"/{id}", admin(s.withScaleSet(s.handleUpdateScaleSet)))
	mux.HandleFunc("DELETE "+sets+"/{id}", admin(s.withScaleSet(s.handleDeleteScaleSet)))
	mux.HandleFunc("POST "+sets+"/{id}/sessions", admin(s.withScaleSet(s.handleCreateSession)))
	mux.HandleFunc("PATCH "+sets+"/{id}/sessions/{sid}", admin(s.withScaleSet(s.handleRefreshSession)))
	mux.HandleFunc("DELETE "+sets+"/{id}/sessions/{sid}", admin(s.withScaleSet(s.handleDeleteSession)))
	mux.HandleFunc("POST "+sets+"/{id}/generatejitconfig", admin(s.withScaleSet(s.handleScaleSetJIT)))
	mux.HandleFunc("GET "+sets+"/{id}/messages", s.handleGetMessage)
	mux.HandleFunc("DELETE "+sets+"/{id}/messages/{mid}", s.withSession(s.handleDeleteMessage))
	mux.HandleFunc("POST "+sets+"/{id}/acquirejobs", s.withSession(s.handleAcquireJobs))
	mux.HandleFunc("GET "+apis+"runtime/runnergroups/{$}", admin(s.handleRunnerGroups))
	mux.HandleFunc("GET "+apis+"runtime/runnergroups", admin(s.handleRunnerGroups))
	agents := apis + "distributedtask/pools/0/agents"
	mux.HandleFunc("GET "+agents, admin(s.handleFindAgent))
	mux.HandleFunc("GET "+agents+"/{id}", admin(s.handleGetAgent))
	mux.HandleFunc("DELETE "+agents+"/{id}", admin(s.handleDeleteAgent))
}

func (s *Server) withScaleSet(h func(http.ResponseWriter, *http.Request, *tenant, *scaleSet)) func(http.ResponseWriter, *http.Request, *tenant) {
	return func(w http.ResponseWriter, r *http.Request, t *tenant) {
		id, _ := strconv.Atoi(r.PathValue("id"))
		ss := s.scaleSets[id]
		if ss == nil || ss.tenant != t.id {
			writeException(w, http.StatusNotFound, "RunnerScaleSetNotFoundException", fmt.Sprintf("No runner scale set found with identifier %d.", id))
			return
		}
		h(w, r, t, ss)
	}
}

func (s *Server) handleListScaleSets(w http.ResponseWriter, r *http.Request, t *tenant) {
	q := r.URL.Query()
	group, _ := strconv.ParseInt(q.Get("runnerGroupId"), 10, 64)
	name := q.Get("name")
	var out []map[string]any
	ids := make([]int, 0)
	for id, ss := range s.scaleSets {
		if ss.tenant == t.id && (group == 0 || ss.groupID == group) && (name == "" || strings.EqualFold(ss.name, name)) {
			ids = append(ids, id)
		}
	}
	sort.Ints(ids)
	for _, id := range ids {
		out = append(out, s.scaleSetJSON(r, s.scaleSets[id]))
	}
	writeJSON(w, http.StatusOK, map[string]any{"count": len(out), "value": out})
}

type scaleSetBody struct {
	Name          string  `json:"name"`
	RunnerGroupID int64   `json:"runnerGroupId"`
	Labels        []label `json:"labels"`
	RunnerSetting struct {
		DisableUpdate bool `json:"disableUpdate"`
	} `json:"RunnerSetting"`
}

func (s *Server) handleCreateScaleSet(w http.ResponseWriter, r *http.Request, t *tenant) {
	var b scaleSetBody
	if err := json.NewDecoder(r.Body).Decode(&b); err != nil {
		writeException(w, http.StatusBadRequest, "ArgumentException", "The request body is not valid JSON.")
		return
	}
	if strings.TrimSpace(b.Name) == "" {
		writeException(w, http.StatusBadRequest, "ArgumentException", "The runner scale set name is required.")
		return
	}
	if b.RunnerGroupID == 0 {
		b.RunnerGroupID = defaultGroupID
	}
	if s.group(t.scope, b.RunnerGroupID) == nil {
		writeException(w, http.StatusBadRequest, "RunnerGroupNotFoundException", fmt.Sprintf("Runner group %d not found.", b.RunnerGroupID))
		return
	}
	if len(b.Labels) == 0 {
		writeException(w, http.StatusBadRequest, "ArgumentException", "At least one label is required.")
		return
	}
	for _, l := range b.Labels {
		if strings.TrimSpace(l.Name) == "" {
			writeException(w, http.StatusBadRequest, "ArgumentException", "Labels must not be empty.")
			return
		}
	}
	for _, ss := range s.scaleSets {
		if ss.tenant == t.id && ss.groupID == b.RunnerGroupID && strings.EqualFold(ss.name, b.Name) {
			writeException(w, http.StatusConflict, "RunnerScaleSetExistsException", fmt.Sprintf("A runner scale set named %q already exists in this runner group.", b.Name))
			return
		}
	}
	ss := &scaleSet{
		id: int(s.newID()), tenant: t.id, scope: t.scope, name: b.Name, groupID: b.RunnerGroupID,
		labels: b.Labels, disableUpdate: b.RunnerSetting.DisableUpdate, created: s.now(),
	}
	s.scaleSets[ss.id] = ss
	writeJSON(w, http.StatusOK, s.scaleSetJSON(r, ss))
}

func (s *Server) handleGetScaleSet(w http.ResponseWriter, r *http.Request, _ *tenant, ss *scaleSet) {
	writeJSON(w, http.StatusOK, s.scaleSetJSON(r, ss))
}

func (s *Server) handleUpdateScaleSet(w http.ResponseWriter, r *http.Request, t *tenant, ss *scaleSet) {
	var b scaleSetBody
	if err := json.NewDecoder(r.Body).Decode(&b); err != nil {
		writeException(w, http.StatusBadRequest, "ArgumentException", "The request body is not valid JSON.")
		return
	}
	if b.RunnerGroupID != 0 {
		if s.group(t.scope, b.RunnerGroupID) == nil {
			writeException(w, http.StatusBadRequest, "RunnerGroupNotFoundException", fmt.Sprintf("Runner group %d not found.", b.RunnerGroupID))
			return
		}
		ss.groupID = b.RunnerGroupID
	}
	if b.Name != "" {
		ss.name = b.Name
	}
	if len(b.Labels) > 0 {
		ss.labels = b.Labels
	}
	ss.disableUpdate = b.RunnerSetting.DisableUpdate
	writeJSON(w, http.StatusOK, s.scaleSetJSON(r, ss))
}

func (s *Server) handleDeleteScaleSet(w http.ResponseWriter, r *http.Request, _ *tenant, ss *scaleSet) {
	for id, rn := range s.runners {
		if rn.scaleSetID == ss.id {
			delete(s.runners, id)
		}
	}
	for id, se := range s.sessions {
		if se.scaleSetID == ss.id {
			delete(s.sessions, id)
		}
	}
	delete(s.scaleSets, ss.id)
	s.notify()
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) sessionJSON(r *http.Request, ss *scaleSet, se *session) map[string]any {
	return map[string]any{
		"sessionId": se.id, "ownerName": se.owner, "runnerScaleSet": s.scaleSetJSON(r, ss),
		"messageQueueUrl": fmt.Sprintf("http://%s%s%s/_apis/runtime/runnerscalesets/%d/messages?sessionId=%s",
			r.Host, actionsPrefix, ss.tenant, ss.id, se.id),
		"messageQueueAccessToken": se.token,
		"statistics":              s.stats(ss),
	}
}

func (s *Server) newSessionToken(se *session) {
	se.token = randomToken("mq_", 40)
	se.expires = s.now().Add(time.Hour)
	s.remember(se.token)
}

func (s *Server) handleCreateSession(w http.ResponseWriter, r *http.Request, _ *tenant, ss *scaleSet) {
	var b struct {
		OwnerName string `json:"ownerName"`
	}
	if err := json.NewDecoder(r.Body).Decode(&b); err != nil || strings.TrimSpace(b.OwnerName) == "" {
		writeException(w, http.StatusBadRequest, "ArgumentException", "ownerName is required.")
		return
	}
	for id, se := range s.sessions {
		if se.scaleSetID != ss.id {
			continue
		}
		if s.alive(se) {
			writeException(w, http.StatusConflict, "TaskAgentSessionConflictException",
				fmt.Sprintf("The runner scale set %s already has an active session for owner %s.", ss.name, se.owner))
			return
		}
		delete(s.sessions, id)
	}
	se := &session{id: newUUID(), scaleSetID: ss.id, owner: b.OwnerName, lastSeen: s.now()}
	s.newSessionToken(se)
	s.sessions[se.id] = se
	writeJSON(w, http.StatusOK, s.sessionJSON(r, ss, se))
}

func (s *Server) handleRefreshSession(w http.ResponseWriter, r *http.Request, _ *tenant, ss *scaleSet) {
	se := s.sessions[r.PathValue("sid")]
	if se == nil || se.scaleSetID != ss.id {
		writeException(w, http.StatusNotFound, "TaskAgentSessionExpiredException", "The session has expired.")
		return
	}
	s.newSessionToken(se)
	se.lastSeen = s.now()
	writeJSON(w, http.StatusOK, s.sessionJSON(r, ss, se))
}

func (s *Server) handleDeleteSession(w http.ResponseWriter, r *http.Request, _ *tenant, ss *scaleSet) {
	se := s.sessions[r.PathValue("sid")]
	if se == nil || se.scaleSetID != ss.id {
		writeException(w, http.StatusNotFound, "TaskAgentSessionExpiredException", "The session has expired.")
		return
	}
	delete(s.sessions, se.id)
	s.notify()
	w.WriteHeader(http.StatusNoContent)
}

// sessionFor authenticates a message queue request by its session token.
// Call with s.mu held.
func (s *Server) sessionFor(r *http.Request) (*session, *scaleSet, bool) {
	id, _ := strconv.Atoi(r.PathValue("id"))
	ss := s.scaleSets[id]
	tok := bearer(r)
	if ss == nil || ss.tenant != r.PathValue("tenant") || tok == "" {
		return nil, nil, false
	}
	for _, se := range s.sessions {
		if se.token == tok && se.scaleSetID == ss.id && s.now().Before(se.expires) {
			return se, ss, true
		}
	}
	return nil, nil, false
}

func (s *Server) withSession(h func(http.ResponseWriter, *http.Request, *session, *scaleSet)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		defer s.mu.Unlock()
		se, ss, ok := s.sessionFor(r)
		if !ok {
			writeUnauthorized(w)
			return
		}
		// The message queue (a broker host on GitHub) does not insist on an
		// API version: the scale set client sends none when deleting.
		se.lastSeen = s.now()
		h(w, r, se, ss)
	}
}

// nextMessage returns the oldest undeleted message after lastID, sealing
// pending job events into a new message when there is none. Call with s.mu
// held.
func (s *Server) nextMessage(ss *scaleSet, lastID int) *message {
	for _, m := range ss.msgs {
		if !m.deleted && m.id > lastID {
			return m
		}
	}
	if len(ss.pending) == 0 {
		return nil
	}
	body, _ := json.Marshal(ss.pending)
	ss.pending = nil
	ss.nextMsg++
	m := &message{id: ss.nextMsg, body: string(body), stats: s.stats(ss)}
	ss.msgs = append(ss.msgs, m)
	return m
}

func (s *Server) handleGetMessage(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	se, ss, ok := s.sessionFor(r)
	if !ok || r.URL.Query().Get("sessionId") != se.id {
		s.mu.Unlock()
		writeUnauthorized(w)
		return
	}
	if !apiVersioned(r) {
		s.mu.Unlock()
		writeException(w, http.StatusBadRequest, "VssVersionNotSpecifiedException", "The API version is required.")
		return
	}
	if c, err := strconv.Atoi(r.Header.Get("X-ScaleSetMaxCapacity")); err != nil || c < 0 {
		s.mu.Unlock()
		writeException(w, http.StatusBadRequest, "ArgumentException", "X-ScaleSetMaxCapacity must be a non-negative integer.")
		return
	}
	lastID := 0
	if v := r.URL.Query().Get("lastMessageId"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			s.mu.Unlock()
			writeException(w, http.StatusBadRequest, "ArgumentException", "lastMessageId must be a non-negative integer.")
			return
		}
		lastID = n
	}
	se.polling++
	se.lastSeen = s.now()
	timer := time.NewTimer(s.opts.LongPoll)
	defer timer.Stop()
	for {
		if s.sessions[se.id] == nil {
			s.mu.Unlock()
			writeException(w, http.StatusNotFound, "TaskAgentSessionExpiredException", "The session has expired.")
			return
		}
		if m := s.nextMessage(ss, lastID); m != nil {
			se.polling--
			se.lastSeen = s.now()
			resp := map[string]any{
				"messageId": m.id, "messageType": "RunnerScaleSetJobMessages",
				"body": m.body, "statistics": m.stats,
			}
			s.mu.Unlock()
			writeJSON(w, http.StatusOK, resp)
			return
		}
		ch := s.changed
		s.mu.Unlock()
		changed := s.waitChange(r.Context(), ch, timer.C)
		s.mu.Lock()
		if !changed {
			se.polling--
			se.lastSeen = s.now()
			s.mu.Unlock()
			w.WriteHeader(http.StatusAccepted)
			return
		}
	}
}

func (s *Server) handleDeleteMessage(w http.ResponseWriter, r *http.Request, _ *session, ss *scaleSet) {
	id, err := strconv.Atoi(r.PathValue("mid"))
	if err != nil {
		writeException(w, http.StatusBadRequest, "ArgumentException", "The message id must be an integer.")
		return
	}
	for _, m := range ss.msgs {
		if m.id == id {
			m.deleted = true
			w.WriteHeader(http.StatusNoContent)
			return
		}
	}
	writeException(w, http.StatusNotFound, "MessageNotFoundException", fmt.Sprintf("Message %d not found.", id))
}

func (s *Server) handleAcquireJobs(w http.ResponseWriter, r *http.Request, _ *session, ss *scaleSet) {
	var ids []int64
	if err := json.NewDecoder(r.Body).Decode(&ids); err != nil {
		writeException(w, http.StatusBadRequest, "ArgumentException", "The body must be an array of job request ids.")
		return
	}
	acquired := []int64{}
	for _, id := range ids {
		j := s.jobs[id]
		if j == nil || j.scaleSetID != ss.id || j.state != JobAvailable {
			continue
		}
		j.state = JobAcquired
		acquired = append(acquired, id)
		if !s.opts.ManualAssign {
			s.assign(ss, j)
		}
	}
	s.notify()
	writeJSON(w, http.StatusOK, map[string]any{"count": len(acquired), "value": acquired})
}

func (s *Server) handleScaleSetJIT(w http.ResponseWriter, r *http.Request, _ *tenant, ss *scaleSet) {
	var b struct {
		Name       string `json:"name"`
		WorkFolder string `json:"workFolder"`
	}
	if err := json.NewDecoder(r.Body).Decode(&b); err != nil || strings.TrimSpace(b.Name) == "" {
		writeException(w, http.StatusBadRequest, "ArgumentException", "The runner name is required.")
		return
	}
	if s.runnerNamed(ss.scope, b.Name) != nil {
		writeException(w, http.StatusConflict, "AgentExistsException", fmt.Sprintf("A runner with the name %s already exists.", b.Name))
		return
	}
	names := make([]string, len(ss.labels))
	for i, l := range ss.labels {
		names[i] = l.Name
	}
	rn := s.addRunner(ss.scope, b.Name, names, ss.groupID, ss.id)
	writeJSON(w, http.StatusOK, map[string]any{
		"runner":           map[string]any{"id": rn.id, "name": rn.name, "runnerScaleSetId": ss.id},
		"encodedJITConfig": s.encodeJIT(r, rn),
	})
}

func (s *Server) handleRunnerGroups(w http.ResponseWriter, r *http.Request, t *tenant) {
	name := r.URL.Query().Get("groupName")
	var out []map[string]any
	for _, g := range s.groupsOf(t.scope) {
		if name == "" || strings.EqualFold(g.name, name) {
			out = append(out, map[string]any{"id": g.id, "name": g.name, "isDefaultGroup": g.isDefault, "size": 0})
		}
	}
	writeJSON(w, http.StatusOK, map[string]any{"count": len(out), "value": out})
}

func agentJSON(rn *runner) map[string]any {
	return map[string]any{"id": rn.id, "name": rn.name, "runnerScaleSetId": rn.scaleSetID}
}

func (s *Server) tenantRunner(r *http.Request, t *tenant) *runner {
	id, err := strconv.ParseInt(r.PathValue("id"), 10, 64)
	if err != nil {
		return nil
	}
	rn := s.runners[id]
	if rn == nil || rn.scope.key() != t.scope.key() {
		return nil
	}
	return rn
}

func (s *Server) handleFindAgent(w http.ResponseWriter, r *http.Request, t *tenant) {
	name := r.URL.Query().Get("agentName")
	var out []map[string]any
	for _, rn := range s.runners {
		if rn.scope.key() == t.scope.key() && (name == "" || strings.EqualFold(rn.name, name)) {
			out = append(out, agentJSON(rn))
		}
	}
	writeJSON(w, http.StatusOK, map[string]any{"count": len(out), "value": out})
}

func (s *Server) handleGetAgent(w http.ResponseWriter, r *http.Request, t *tenant) {
	rn := s.tenantRunner(r, t)
	if rn == nil {
		writeException(w, http.StatusNotFound, "AgentNotFoundException", fmt.Sprintf("No agent found with identifier %s.", r.PathValue("id")))
		return
	}
	writeJSON(w, http.StatusOK, agentJSON(rn))
}

func (s *Server) handleDeleteAgent(w http.ResponseWriter, r *http.Request, t *tenant) {
	rn := s.tenantRunner(r, t)
	if rn == nil {
		writeException(w, http.StatusNotFound, "AgentNotFoundException", fmt.Sprintf("No agent found with identifier %s.", r.PathValue("id")))
		return
	}
	if rn.busy {
		writeException(w, http.StatusBadRequest, "JobStillRunningException", fmt.Sprintf("Runner %s is still running a job.", rn.name))
		return
	}
	delete(s.runners, rn.id)
	s.notify()
	w.WriteHeader(http.StatusNoContent)
}
