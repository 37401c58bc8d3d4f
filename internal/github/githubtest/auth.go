package githubtest

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/golang-jwt/jwt/v4"
)

// Kind is a runner registration level.
type Kind string

const (
	KindOrg        Kind = "org"
	KindRepo       Kind = "repo"
	KindEnterprise Kind = "enterprise"
)

// Scope is where runners are registered: an organization, a repository
// ("owner/name") or an enterprise.
type Scope struct {
	Kind Kind
	Name string
}

// Org, Repo and Enterprise build scopes.
func Org(name string) Scope        { return Scope{KindOrg, name} }
func Repo(fullName string) Scope   { return Scope{KindRepo, fullName} }
func Enterprise(slug string) Scope { return Scope{KindEnterprise, slug} }

func (s Scope) key() string { return string(s.Kind) + ":" + strings.ToLower(s.Name) }

func (s Scope) String() string { return string(s.Kind) + " " + s.Name }

// Permission levels as GitHub names them.
const (
	Read  = "read"
	Write = "write"
)

// GitHub App permission names that guard runner endpoints.
const (
	PermOrgRunners     = "organization_self_hosted_runners"
	PermAdministration = "administration"
)

type installation struct {
	id         int64
	account    string
	targetType string   // Organization, User, Enterprise
	repos      []string // selected repositories (names); nil = all
	perms      map[string]string
}

// InstallOrg installs the App on an organization with the "Self-hosted
// runners" and "Administration" permissions (read and write) on all its
// repositories, and returns the installation id.
func (s *Server) InstallOrg(org string) int64 {
	return s.install(org, "Organization", nil, map[string]string{PermOrgRunners: Write, PermAdministration: Write})
}

// InstallRepos installs the App on a user or organization account, limited
// to the named repositories (all of them when none are named), with
// "Administration: read and write".
func (s *Server) InstallRepos(owner string, repos ...string) int64 {
	targetType := "User"
	var sel []string
	if len(repos) > 0 {
		sel = append(sel, repos...)
	}
	return s.install(owner, targetType, sel, map[string]string{PermAdministration: Write})
}

// InstallEnterprise installs the App on an enterprise. Like on GitHub, the
// installation exists but its tokens cannot manage enterprise runners.
func (s *Server) InstallEnterprise(slug string) int64 {
	return s.install(slug, "Enterprise", nil, map[string]string{"enterprise_organization_installations": Read})
}

func (s *Server) install(account, targetType string, repos []string, perms map[string]string) int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	id := s.newID()
	s.installations[id] = &installation{id: id, account: account, targetType: targetType, repos: repos, perms: perms}
	return id
}

// SetPermissions replaces an installation's permissions, e.g.
// {"organization_self_hosted_runners": "read"}.
func (s *Server) SetPermissions(installationID int64, perms map[string]string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if in := s.installations[installationID]; in != nil {
		in.perms = perms
	}
}

// Uninstall removes an installation; its tokens stop working.
func (s *Server) Uninstall(installationID int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.installations, installationID)
}

// AddToken registers a personal access token (classic) with its scopes,
// e.g. AddToken("ghp_x", "manage_runners:enterprise").
func (s *Server) AddToken(token string, scopes ...string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.pats[token] = scopes
}

type instToken struct {
	installation int64
	expires      time.Time
}

// ExpireTokens makes every installation token issued so far expired.
func (s *Server) ExpireTokens() {
	s.mu.Lock()
	defer s.mu.Unlock()
	past := s.now().Add(-time.Second)
	for _, t := range s.tokens {
		t.expires = past
	}
}

// TokensIssued counts the installation access tokens issued so far.
func (s *Server) TokensIssued() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.tokens)
}

// jwtFailure is why an App JWT was refused, in GitHub's words.
type jwtFailure string

func (f jwtFailure) Error() string { return string(f) }

const (
	jwtUndecodable = jwtFailure("A JSON web token could not be decoded")
	jwtExpFar      = jwtFailure("'Expiration time' claim ('exp') is too far in the future")
	jwtExpired     = jwtFailure("'Expiration time' claim ('exp') must be a numeric value representing the future time at which the assertion expires")
	jwtIatFuture   = jwtFailure("'Issued at' claim ('iat') must be an Integer representing the time that the assertion was issued")
	jwtIssuer      = jwtFailure("'Issuer' claim ('iss') must be an Integer")
	jwtNoApp       = jwtFailure("Integration not found")
)

// maxJWTLifetime is GitHub's limit on exp - iat and on how far exp may lie
// in the future.
const maxJWTLifetime = 10 * time.Minute

// verifyAppJWT checks an App JWT the way GitHub does. It uses the wall
// clock, not the fake's clock: the client signs with the wall clock.
func (s *Server) verifyAppJWT(r *http.Request) error {
	scheme, tok, ok := strings.Cut(r.Header.Get("Authorization"), " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") || strings.Count(tok, ".") != 2 {
		return jwtUndecodable
	}
	claims := jwt.MapClaims{}
	parser := jwt.NewParser(jwt.WithValidMethods([]string{"RS256"}), jwt.WithJSONNumber(), jwt.WithoutClaimsValidation())
	if _, err := parser.ParseWithClaims(tok, claims, func(*jwt.Token) (any, error) { return s.opts.PublicKey, nil }); err != nil {
		return jwtUndecodable
	}
	now := time.Now()
	iat, ok := intClaim(claims["iat"])
	if !ok {
		return jwtIatFuture
	}
	exp, ok := intClaim(claims["exp"])
	if !ok {
		return jwtExpired
	}
	switch {
	case time.Unix(iat, 0).After(now.Add(time.Second)):
		return jwtIatFuture
	case !time.Unix(exp, 0).After(now):
		return jwtExpired
	case time.Unix(exp, 0).After(now.Add(maxJWTLifetime + time.Second)),
		exp-iat > int64(maxJWTLifetime/time.Second):
		return jwtExpFar
	}
	switch iss := claims["iss"].(type) {
	case json.Number:
		if iss.String() != strconv.FormatInt(s.opts.AppID, 10) {
			return jwtNoApp
		}
	case string:
		if iss != strconv.FormatInt(s.opts.AppID, 10) && (s.opts.ClientID == "" || iss != s.opts.ClientID) {
			if _, err := strconv.ParseInt(iss, 10, 64); err != nil && !strings.HasPrefix(iss, "Iv") {
				return jwtIssuer
			}
			return jwtNoApp
		}
	default:
		return jwtIssuer
	}
	return nil
}

// intClaim accepts only integral numeric dates: GitHub refuses fractions.
func intClaim(v any) (int64, bool) {
	n, ok := v.(json.Number)
	if !ok {
		return 0, false
	}
	i, err := n.Int64()
	return i, err == nil
}

// requireApp answers 401 unless the request carries a valid App JWT.
func (s *Server) requireApp(w http.ResponseWriter, r *http.Request) bool {
	if err := s.verifyAppJWT(r); err != nil {
		writeError(w, http.StatusUnauthorized, err.Error())
		return false
	}
	return true
}

// credential is who an installation-authenticated request acts as.
type credential struct {
	install *installation // nil for a personal access token
	scopes  []string      // personal access token scopes
}

// bearer extracts the token from "token X" or "Bearer X".
func bearer(r *http.Request) string {
	scheme, tok, ok := strings.Cut(r.Header.Get("Authorization"), " ")
	if !ok || !(strings.EqualFold(scheme, "token") || strings.EqualFold(scheme, "Bearer")) {
		return ""
	}
	return strings.TrimSpace(tok)
}

// authenticate resolves an installation token or personal access token.
// Call with s.mu held.
func (s *Server) authenticate(r *http.Request) (credential, bool) {
	tok := bearer(r)
	if tok == "" {
		return credential{}, false
	}
	if it, ok := s.tokens[tok]; ok {
		in := s.installations[it.installation]
		if in == nil || !s.now().Before(it.expires) {
			return credential{}, false
		}
		return credential{install: in}, true
	}
	if scopes, ok := s.pats[tok]; ok {
		return credential{scopes: scopes}, true
	}
	return credential{}, false
}

// authorize checks that cred may act on scope's runners at the given level
// (Read or Write), answering the way GitHub does when it may not. Call with
// s.mu held.
func (s *Server) authorize(w http.ResponseWriter, r *http.Request, scope Scope, level string) bool {
	cred, ok := s.authenticate(r)
	if !ok {
		writeError(w, http.StatusUnauthorized, "Bad credentials")
		return false
	}
	if cred.install == nil {
		var want []string
		switch scope.Kind {
		case KindOrg:
			want = []string{"admin:org", "manage_runners:org"}
		case KindRepo:
			want = []string{"repo"}
		case KindEnterprise:
			want = []string{"manage_runners:enterprise", "admin:enterprise"}
		}
		for _, sc := range cred.scopes {
			if slices.Contains(want, sc) {
				return true
			}
		}
		w.Header().Set("X-Accepted-OAuth-Scopes", strings.Join(want, ", "))
		writeError(w, http.StatusForbidden, "Resource not accessible by personal access token")
		return false
	}
	in := cred.install
	var perm string
	switch scope.Kind {
	case KindEnterprise:
		// Enterprise runner endpoints do not accept installation tokens.
		writeError(w, http.StatusForbidden, "Resource not accessible by integration")
		return false
	case KindOrg:
		if !strings.EqualFold(in.account, scope.Name) || in.targetType != "Organization" {
			writeError(w, http.StatusForbidden, "Resource not accessible by integration")
			return false
		}
		perm = PermOrgRunners
	case KindRepo:
		owner, name, _ := strings.Cut(scope.Name, "/")
		if !strings.EqualFold(in.account, owner) || in.targetType == "Enterprise" ||
			(in.repos != nil && !slices.ContainsFunc(in.repos, func(n string) bool { return strings.EqualFold(n, name) })) {
			writeNotFound(w)
			return false
		}
		perm = PermAdministration
	}
	have := in.perms[perm]
	if have == Write || (level == Read && have == Read) {
		return true
	}
	w.Header().Set("X-Accepted-GitHub-Permissions", perm+"="+level)
	writeError(w, http.StatusForbidden, "Resource not accessible by integration")
	return false
}

var (
	keyOnce sync.Once
	keyPriv *rsa.PrivateKey
	keyPEM  []byte
	keyErr  error
)

// AppKey returns an RSA key pair for a test App: the private key in PEM
// (PKCS#1, as GitHub hands it out) and the parsed key. The same key is
// returned for the whole test binary, because generating one takes time.
func AppKey() (*rsa.PrivateKey, []byte, error) {
	keyOnce.Do(func() {
		keyPriv, keyPEM, keyErr = GenerateKey()
	})
	return keyPriv, keyPEM, keyErr
}

// GenerateKey makes a fresh 2048-bit RSA key in PKCS#1 PEM form.
func GenerateKey() (*rsa.PrivateKey, []byte, error) {
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, nil, fmt.Errorf("generate RSA key: %w", err)
	}
	p := pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(k)})
	return k, p, nil
}
