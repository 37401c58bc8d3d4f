package github

import (
	"context"
	"crypto/rsa"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/bradleyfalzon/ghinstallation/v2"
	"github.com/golang-jwt/jwt/v4"
	gh "github.com/google/go-github/v79/github"
	"github.com/hashicorp/go-retryablehttp"

	"github.com/fireactions/fireactions/internal/config"
)

// userAgent names fireactions to GitHub on every REST request.
const userAgent = "fireactions"

// Client talks to GitHub for runner pools: as a GitHub App (JWT, then an
// installation token per scope, refreshed before it expires) or, where an
// App cannot act (enterprise runners), with a personal access token
// (classic). It is safe for concurrent use.
type Client struct {
	appID   int64
	key     *rsa.PrivateKey
	keyPEM  config.Secret
	token   config.Secret
	api     *url.URL
	web     *url.URL
	log     *slog.Logger
	rootLog *slog.Logger
	now     func() time.Time
	sleeper Sleeper
	retry   RetryPolicy
	timeout time.Duration
	rootCAs *x509.CertPool
	meter   meter

	// base is the retrying transport every REST request goes through.
	base http.RoundTripper
	// app acts as the App itself (JWT): installation lookups.
	app *gh.Client

	mu        sync.Mutex
	installs  map[string]*installation // by scope key
	pat       *gh.Client
	scalesets map[string]*scalesetConn // by scope key
}

type installation struct {
	id   int64
	rest *gh.Client
}

type options struct {
	token   config.Secret
	log     *slog.Logger
	retry   RetryPolicy
	sleeper Sleeper
	now     func() time.Time
	rootCAs *x509.CertPool
	timeout time.Duration
}

// Option adjusts a Client.
type Option func(*options)

// WithToken adds a personal access token (classic). It is used for
// enterprise scopes (which need the manage_runners:enterprise scope and
// cannot be managed by a GitHub App) and for every scope when no App is
// configured.
func WithToken(token config.Secret) Option { return func(o *options) { o.token = token } }

// WithLogger sets the logger (default slog.Default()).
func WithLogger(l *slog.Logger) Option { return func(o *options) { o.log = l } }

// WithRetryPolicy replaces the retry policy; zero fields keep defaults.
func WithRetryPolicy(p RetryPolicy) Option { return func(o *options) { o.retry = p } }

// WithSleeper replaces the waits between retries and session conflict
// attempts; tests use it to observe waits without sleeping.
func WithSleeper(s Sleeper) Option { return func(o *options) { o.sleeper = s } }

// WithClock replaces the clock used to compute rate limit waits.
func WithClock(now func() time.Time) Option { return func(o *options) { o.now = now } }

// WithRootCAs trusts these CAs for a GitHub Enterprise Server with a
// private certificate authority.
func WithRootCAs(pool *x509.CertPool) Option { return func(o *options) { o.rootCAs = pool } }

// WithTimeout bounds each REST request attempt (default 30s).
func WithTimeout(d time.Duration) Option { return func(o *options) { o.timeout = d } }

// New builds a Client from the github section of the configuration.
func New(cfg config.GitHub, opts ...Option) (*Client, error) {
	var o options
	for _, f := range opts {
		f(&o)
	}
	o.retry.defaults()
	if o.log == nil {
		o.log = slog.Default()
	}
	if o.now == nil {
		o.now = time.Now
	}
	if o.timeout == 0 {
		o.timeout = 30 * time.Second
	}
	c := &Client{
		appID: cfg.AppID, token: o.token, log: o.log.With("component", "github"), rootLog: o.log, now: o.now,
		sleeper: o.sleeper, retry: o.retry, timeout: o.timeout, rootCAs: o.rootCAs,
		installs: map[string]*installation{}, scalesets: map[string]*scalesetConn{},
	}

	raw := cfg.APIURL
	if raw == "" {
		raw = config.DefaultGitHubAPIURL
	}
	api, err := url.Parse(raw)
	if err != nil || (api.Scheme != "https" && api.Scheme != "http") || api.Host == "" {
		return nil, fmt.Errorf("github.api_url %q: want an absolute http(s) URL such as https://api.github.com/", raw)
	}
	if !strings.HasSuffix(api.Path, "/") {
		api.Path += "/"
	}
	c.api = api
	if c.web, err = webURL(api); err != nil {
		return nil, err
	}

	if err := c.loadKey(cfg); err != nil {
		return nil, err
	}
	if c.key == nil && c.token == "" {
		return nil, errors.New("github: no credentials; set github.app_id with github.private_key_file (or github.private_key), or provide a personal access token")
	}

	c.base = &retryablehttp.RoundTripper{Client: c.newRetryable(c.timeout)}
	if c.key != nil {
		atr := ghinstallation.NewAppsTransportFromPrivateKey(c.base, c.appID, c.key)
		c.app = c.restClient(atr)
	}
	return c, nil
}

func (c *Client) loadKey(cfg config.GitHub) error {
	pemKey := cfg.PrivateKey
	switch {
	case cfg.PrivateKey != "" && cfg.PrivateKeyFile != "":
		return errors.New("github: set private_key or private_key_file, not both")
	case cfg.PrivateKeyFile != "":
		b, err := os.ReadFile(cfg.PrivateKeyFile)
		if err != nil {
			return fmt.Errorf("github.private_key_file: %w", err)
		}
		pemKey = config.Secret(b)
	}
	if pemKey == "" {
		if cfg.AppID != 0 {
			return errors.New("github.private_key_file: required with github.app_id (the App's private key, PEM)")
		}
		return nil
	}
	if cfg.AppID <= 0 {
		return errors.New("github.app_id: required with a private key (the numeric App ID from the App's settings page)")
	}
	key, err := jwt.ParseRSAPrivateKeyFromPEM([]byte(pemKey.Reveal()))
	if err != nil {
		field := "github.private_key"
		if cfg.PrivateKeyFile != "" {
			field = "github.private_key_file"
		}
		// The parser's message never contains key material.
		return fmt.Errorf("%s: not a PEM-encoded RSA private key (download one from the App's settings page): %v", field, err)
	}
	c.key, c.keyPEM = key, pemKey
	return nil
}

// restClient builds a go-github client over a transport, pointed at the
// configured API URL.
func (c *Client) restClient(rt http.RoundTripper) *gh.Client {
	g := gh.NewClient(&http.Client{Transport: rt})
	g.BaseURL = c.api
	g.UserAgent = userAgent
	return g
}

// WebURL is the GitHub web URL the API URL belongs to (https://github.com
// or the GitHub Enterprise Server's root).
func (c *Client) WebURL() string { return c.web.String() }

// Stats reports request, retry and error counts and the last rate limit.
func (c *Client) Stats() Stats { return c.meter.snapshot() }

// usesApp reports whether scope is acted on as the App rather than with
// the personal access token.
func (c *Client) usesApp(scope Scope) bool {
	if scope.Kind == config.ScopeEnterprise && c.token != "" {
		return false
	}
	return c.key != nil
}

// rest returns the REST client for scope. Call without c.mu held.
func (c *Client) rest(ctx context.Context, scope Scope) (*gh.Client, error) {
	if !c.usesApp(scope) {
		c.mu.Lock()
		defer c.mu.Unlock()
		if c.pat == nil {
			c.pat = c.restClient(c.base).WithAuthToken(c.token.Reveal())
		}
		return c.pat, nil
	}
	in, err := c.installation(ctx, scope)
	if err != nil {
		return nil, err
	}
	return in.rest, nil
}

// installation returns the App installation covering scope, looking it up
// once.
func (c *Client) installation(ctx context.Context, scope Scope) (*installation, error) {
	c.mu.Lock()
	in := c.installs[scope.key()]
	c.mu.Unlock()
	if in != nil {
		return in, nil
	}
	id, err := c.findInstallation(ctx, scope)
	if err != nil {
		return nil, err
	}
	// One AppsTransport per installation: ghinstallation writes to it while
	// refreshing a token, under the installation's own lock.
	atr := ghinstallation.NewAppsTransportFromPrivateKey(c.base, c.appID, c.key)
	itr := ghinstallation.NewFromAppsTransport(atr, id)
	itr.BaseURL = strings.TrimSuffix(c.api.String(), "/")
	in = &installation{id: id, rest: c.restClient(itr)}
	c.mu.Lock()
	c.installs[scope.key()] = in
	c.mu.Unlock()
	c.log.Debug("found GitHub App installation", slog.String("scope", scope.String()), slog.Int64("installation_id", id))
	return in, nil
}

// forget drops what is cached for scope so the next call looks the
// installation up again and mints a fresh token.
func (c *Client) forget(scope Scope) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.installs, scope.key())
	delete(c.scalesets, scope.key())
}

// InstallationID returns the id of the App installation that covers scope.
func (c *Client) InstallationID(ctx context.Context, scope Scope) (int64, error) {
	if err := scope.Validate(); err != nil {
		return 0, err
	}
	if c.key == nil {
		return 0, fmt.Errorf("find installation for %s: no GitHub App configured", scope)
	}
	in, err := c.installation(ctx, scope)
	if err != nil {
		return 0, err
	}
	return in.id, nil
}

type installationJSON struct {
	ID         int64  `json:"id"`
	TargetType string `json:"target_type"`
	Account    struct {
		Login string `json:"login"`
		Slug  string `json:"slug"`
	} `json:"account"`
}

// findInstallation asks GitHub, as the App, which installation covers
// scope.
func (c *Client) findInstallation(ctx context.Context, scope Scope) (int64, error) {
	var path string
	switch scope.Kind {
	case config.ScopeOrganization:
		path = "orgs/" + url.PathEscape(scope.Name) + "/installation"
	case config.ScopeRepository:
		path = scope.restPath() + "/installation"
	default:
		path = "enterprises/" + url.PathEscape(scope.Name) + "/installation"
	}
	var inst installationJSON
	err := c.appGet(ctx, path, &inst)
	if err != nil && scope.Kind == config.ScopeEnterprise && errors.Is(err, ErrNotFound) {
		// The enterprise lookup endpoint is recent; older servers only
		// list installations.
		return c.findEnterpriseInstallation(ctx, scope)
	}
	if errors.Is(err, ErrNotFound) {
		return 0, fmt.Errorf("find GitHub App installation for %s: %w: install the App (id %d) on it", scope, ErrNotInstalled, c.appID)
	}
	if err != nil {
		return 0, fmt.Errorf("find GitHub App installation for %s: %w", scope, err)
	}
	return inst.ID, nil
}

func (c *Client) findEnterpriseInstallation(ctx context.Context, scope Scope) (int64, error) {
	for page := 1; page > 0; {
		var list []installationJSON
		req, err := c.app.NewRequest(http.MethodGet, fmt.Sprintf("app/installations?per_page=100&page=%d", page), nil)
		if err != nil {
			return 0, err
		}
		resp, err := c.app.Do(ctx, req, &list)
		if err != nil {
			return 0, fmt.Errorf("list GitHub App installations: %w", restError(scope, true, err))
		}
		for _, in := range list {
			if in.TargetType == "Enterprise" && (strings.EqualFold(in.Account.Slug, scope.Name) || strings.EqualFold(in.Account.Login, scope.Name)) {
				return in.ID, nil
			}
		}
		page = resp.NextPage
	}
	return 0, fmt.Errorf("find GitHub App installation for %s: %w: install the App (id %d) on the enterprise, or use a personal access token", scope, ErrNotInstalled, c.appID)
}

// appGet GETs an App-authenticated endpoint into v.
func (c *Client) appGet(ctx context.Context, path string, v any) error {
	req, err := c.app.NewRequest(http.MethodGet, path, nil)
	if err != nil {
		return err
	}
	_, err = c.app.Do(ctx, req, v)
	if err == nil {
		return nil
	}
	e := restError(Scope{}, true, err)
	var ae *APIError
	if errors.As(e, &ae) && ae.StatusCode == http.StatusUnauthorized {
		ae.Hint = "GitHub rejected the App's JWT: check github.app_id and the private key"
	}
	return e
}

// do runs a REST operation for scope. When GitHub refuses the installation
// token (expired early, revoked, App reinstalled) it forgets it and tries
// once more with a fresh one.
func (c *Client) do(ctx context.Context, scope Scope, fn func(*gh.Client) error) error {
	if err := scope.Validate(); err != nil {
		return err
	}
	for attempt := 0; ; attempt++ {
		g, err := c.rest(ctx, scope)
		if err != nil {
			return err
		}
		err = restError(scope, c.usesApp(scope), fn(g))
		if attempt == 0 && c.usesApp(scope) && (errors.Is(err, ErrUnauthorized) || errors.Is(err, ErrNotInstalled)) {
			c.log.Info("GitHub refused the installation token; getting a new one", slog.String("scope", scope.String()))
			c.forget(scope)
			continue
		}
		return err
	}
}

// sleep waits through the test Sleeper or for real.
func (c *Client) sleep(ctx context.Context, d time.Duration) error {
	if c.sleeper != nil {
		return c.sleeper(ctx, d)
	}
	return sleepCtx(ctx, d)
}
