package github

import (
	"fmt"
	"net/url"
	"strings"

	"github.com/fireactions/fireactions/internal/config"
)

// Scope is where a pool's runners are registered: an organization, a
// repository ("owner/name") or an enterprise (its slug).
type Scope struct {
	Kind config.Scope
	Name string
}

// OrgScope, RepoScope and EnterpriseScope build scopes.
func OrgScope(org string) Scope         { return Scope{config.ScopeOrganization, org} }
func RepoScope(fullName string) Scope   { return Scope{config.ScopeRepository, fullName} }
func EnterpriseScope(slug string) Scope { return Scope{config.ScopeEnterprise, slug} }

// ScopeOf returns the scope a pool's runner configuration names.
func ScopeOf(r config.Runner) (Scope, error) {
	var s Scope
	switch r.Scope() {
	case config.ScopeOrganization:
		s = OrgScope(r.Organization)
	case config.ScopeRepository:
		s = RepoScope(r.Repository)
	case config.ScopeEnterprise:
		s = EnterpriseScope(r.Enterprise)
	default:
		return Scope{}, fmt.Errorf("runner: set one of organization, repository or enterprise")
	}
	return s, s.Validate()
}

// Validate reports a malformed scope.
func (s Scope) Validate() error {
	switch s.Kind {
	case config.ScopeOrganization, config.ScopeEnterprise:
		if s.Name == "" || strings.ContainsAny(s.Name, "/ ") {
			return fmt.Errorf("%s %q: want a single name such as acme", s.Kind, s.Name)
		}
	case config.ScopeRepository:
		owner, name, ok := strings.Cut(s.Name, "/")
		if !ok || owner == "" || name == "" || strings.ContainsAny(name, "/ ") || strings.Contains(owner, " ") {
			return fmt.Errorf("repository %q: want owner/name such as acme/app", s.Name)
		}
	default:
		return fmt.Errorf("scope kind %q: want organization, repository or enterprise", s.Kind)
	}
	return nil
}

// String names the scope for logs and errors, e.g. "organization acme".
func (s Scope) String() string { return string(s.Kind) + " " + s.Name }

func (s Scope) key() string { return string(s.Kind) + ":" + strings.ToLower(s.Name) }

// restPath is the REST API path prefix of the scope's runner endpoints.
func (s Scope) restPath() string {
	switch s.Kind {
	case config.ScopeOrganization:
		return "orgs/" + url.PathEscape(s.Name)
	case config.ScopeRepository:
		owner, name, _ := strings.Cut(s.Name, "/")
		return "repos/" + url.PathEscape(owner) + "/" + url.PathEscape(name)
	default:
		return "enterprises/" + url.PathEscape(s.Name)
	}
}

// webPath is the scope's path on the GitHub web host, as the scale set
// client's config URL wants it.
func (s Scope) webPath() string {
	if s.Kind == config.ScopeEnterprise {
		return "enterprises/" + s.Name
	}
	return s.Name
}

// permissionHint says what the credentials need to manage the scope's
// runners, for errors after GitHub answered 403.
func (s Scope) permissionHint(app bool) string {
	switch {
	case s.Kind == config.ScopeEnterprise:
		return "enterprise runners need a personal access token (classic) with the manage_runners:enterprise scope; GitHub Apps cannot manage them"
	case !app && s.Kind == config.ScopeOrganization:
		return "the token needs the admin:org scope"
	case !app:
		return "the token needs the repo scope"
	case s.Kind == config.ScopeOrganization:
		return `the GitHub App needs the organization permission "Self-hosted runners: Read and write"`
	default:
		return `the GitHub App needs the repository permission "Administration: Read and write" and access to the repository`
	}
}

// webURL derives the GitHub web URL from the REST API base URL:
// https://api.github.com/ → https://github.com, https://HOST/api/v3/ →
// https://HOST (GitHub Enterprise Server), https://api.SUB.ghe.com/ →
// https://SUB.ghe.com.
func webURL(api *url.URL) (*url.URL, error) {
	host := strings.ToLower(api.Host)
	p := strings.TrimSuffix(api.Path, "/")
	switch {
	case host == "api.github.com" && p == "":
		return &url.URL{Scheme: api.Scheme, Host: "github.com"}, nil
	case strings.HasPrefix(host, "api.") && strings.HasSuffix(host, ".ghe.com") && p == "":
		return &url.URL{Scheme: api.Scheme, Host: strings.TrimPrefix(api.Host, "api.")}, nil
	case strings.HasSuffix(p, "/api/v3"):
		return &url.URL{Scheme: api.Scheme, Host: api.Host, Path: strings.TrimSuffix(p, "/api/v3")}, nil
	}
	return nil, fmt.Errorf("github.api_url %q: want https://api.github.com/ or, for GitHub Enterprise Server, https://HOST/api/v3/", api.String())
}
