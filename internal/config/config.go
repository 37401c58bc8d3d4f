// Package config owns the fireactions daemon configuration: its schema,
// defaults, strict decoding (unknown keys are errors, reported with their
// path and the nearest known key), validation (every problem reported at
// once, each with its path) and the canonical YAML encoding used by
// `fireactions bootstrap`.
package config

import (
	"time"
)

// DefaultPath is where the bootstrap writes the runtime configuration and
// where the daemon reads it unless -c is given.
const DefaultPath = "/run/fireactions/config.yaml"

// Config is the whole daemon configuration (/run/fireactions/config.yaml).
type Config struct {
	// DataDir holds images, VM state and caches. Empty means the default for
	// the running user (see DefaultDataDir).
	DataDir       string        `yaml:"data_dir,omitempty"`
	Server        Server        `yaml:"server"`
	Metrics       Metrics       `yaml:"metrics"`
	Log           Log           `yaml:"log"`
	GitHub        GitHub        `yaml:"github"`
	Network       Network       `yaml:"network"`
	RegistryCache RegistryCache `yaml:"registry_cache"`
	Pools         []Pool        `yaml:"pools"`
}

// Server is the HTTP API listener.
type Server struct {
	// Address is host:port. A non-loopback address requires AuthTokenFile.
	Address string `yaml:"address"`
	// AuthTokenFile holds the bearer token clients must present.
	AuthTokenFile string `yaml:"auth_token_file,omitempty"`
	// DrainTimeout is how long `fireactions serve` waits, after SIGTERM,
	// for busy runners of all pools to finish their jobs before it stops
	// them anyway: one deadline for the whole daemon, not one per pool.
	DrainTimeout Duration `yaml:"drain_timeout"`
}

// Metrics is the Prometheus listener.
type Metrics struct {
	Enabled bool   `yaml:"enabled"`
	Address string `yaml:"address"`
}

// Log selects the slog handler.
type Log struct {
	Level  string `yaml:"level"`  // debug, info, warn, error
	Format string `yaml:"format"` // text, json
}

// GitHub holds the GitHub App credentials and the API endpoint.
type GitHub struct {
	AppID int64 `yaml:"app_id"`
	// PrivateKey is the App's PEM private key inline; exclusive with
	// PrivateKeyFile. It is a secret: never logged, never printed.
	PrivateKey     Secret `yaml:"private_key,omitempty"`
	PrivateKeyFile string `yaml:"private_key_file,omitempty"`
	// APIURL is the REST API base URL; set it for GitHub Enterprise Server
	// (https://HOST/api/v3/).
	APIURL string `yaml:"api_url"`
	// TokenFile holds a personal access token (classic). Enterprise pools
	// need it (GitHub Apps cannot manage enterprise runners); without an
	// App it is used for every pool.
	TokenFile string `yaml:"token_file,omitempty"`
	// WebhookSecretFile holds the secret GitHub signs workflow_job webhooks
	// with. When set, the API listener serves POST /webhook and pools in
	// labels mode grow on queued jobs.
	WebhookSecretFile string `yaml:"webhook_secret_file,omitempty"`
}

// Network is the host-side VM network shared by all pools.
type Network struct {
	// Name is the default CNI network name for pools that do not set one.
	Name    string   `yaml:"name"`
	ConfDir string   `yaml:"conf_dir"`
	BinDirs []string `yaml:"bin_dirs"`
	Bridge  string   `yaml:"bridge"`
	Subnet  string   `yaml:"subnet"`
	Gateway string   `yaml:"gateway"`
	MTU     int      `yaml:"mtu,omitempty"`
	DNS     []string `yaml:"nameservers,omitempty"`
}

// RegistryCache is the host's pull-through registry cache (Zot) and HTTP(S)
// cache (Squid), and what every VM is told about them.
type RegistryCache struct {
	Enabled bool `yaml:"enabled"`
	// Gateway is the VM bridge address the caches listen on.
	Gateway string   `yaml:"gateway"`
	Zot     Zot      `yaml:"zot"`
	Mirrors []Mirror `yaml:"mirrors"`
	Squid   Squid    `yaml:"squid"`
}

// Zot is the OCI pull-through cache.
type Zot struct {
	Port       int      `yaml:"port"`
	StorageDir string   `yaml:"storage_dir"`
	MaxSize    ByteSize `yaml:"max_size"`
	GCInterval Duration `yaml:"gc_interval"`
}

// Mirror is one upstream registry served through Zot. Docker Hub is served at
// the cache's root, every other registry under /<registry>.
type Mirror struct {
	Registry string `yaml:"registry"` // e.g. docker.io, ghcr.io
	URL      string `yaml:"url"`      // upstream, e.g. https://registry-1.docker.io
}

// Squid is the intercepting HTTP/HTTPS cache.
type Squid struct {
	Enabled       bool     `yaml:"enabled"`
	HTTPPort      int      `yaml:"http_port"`
	HTTPSPort     int      `yaml:"https_port"`
	MemoryCache   ByteSize `yaml:"memory_cache"`
	DiskCache     ByteSize `yaml:"disk_cache"`
	MaxObjectSize ByteSize `yaml:"max_object_size"`
	CacheDir      string   `yaml:"cache_dir"`
	// BumpDomains opts domains into TLS interception; everything else is
	// spliced (passed through untouched). Non-empty requires the CA files.
	BumpDomains []string `yaml:"bump_domains,omitempty"`
	CACertFile  string   `yaml:"ca_cert_file,omitempty"`
	CAKeyFile   string   `yaml:"ca_key_file,omitempty"`
}

// Pool is a set of identical ephemeral runners.
type Pool struct {
	Name string `yaml:"name"`
	// Scaling picks how the pool learns about demand: ScalingScaleSet
	// (GitHub's runner scale set API) or ScalingLabels (a warm pool of
	// JIT runners, grown by workflow_job webhooks).
	Scaling    Scaling `yaml:"scaling"`
	MinRunners int     `yaml:"min_runners"`
	MaxRunners int     `yaml:"max_runners"`
	Runner     Runner  `yaml:"runner"`
	VM         VM      `yaml:"vm"`
	// Network is the CNI network name; empty means network.name.
	Network  string   `yaml:"network,omitempty"`
	Timeouts Timeouts `yaml:"timeouts"`
}

// Scaling names how a pool is sized.
type Scaling string

const (
	// ScalingScaleSet sizes the pool from a runner scale set's statistics:
	// min(max_runners, min_runners + jobs assigned to the scale set).
	ScalingScaleSet Scaling = "scaleset"
	// ScalingLabels keeps min_runners idle JIT runners with the pool's
	// labels beyond the jobs in flight, up to max_runners.
	ScalingLabels Scaling = "labels"
)

// Timeouts are the host-side deadlines of each runner VM. When one passes,
// the VM is stopped, its runner deregistered, and a new VM replaces it if
// the pool still wants one.
type Timeouts struct {
	// Boot bounds the time from the VM start request until its runner
	// reports idle (listening for jobs).
	Boot Duration `yaml:"boot"`
	// IdleTTL bounds how long a runner may wait idle for a job; 0 means
	// forever.
	IdleTTL Duration `yaml:"idle_ttl"`
	// MaxJob bounds how long a runner may run its job.
	MaxJob Duration `yaml:"max_job"`
}

// Runner describes the GitHub Actions runners of a pool. Exactly one of
// Organization, Repository ("owner/name") and Enterprise sets the scope.
type Runner struct {
	NamePrefix      string     `yaml:"name_prefix"`
	Image           string     `yaml:"image"`
	ImagePullPolicy PullPolicy `yaml:"image_pull_policy"`
	Organization    string     `yaml:"organization,omitempty"`
	Repository      string     `yaml:"repository,omitempty"`
	Enterprise      string     `yaml:"enterprise,omitempty"`
	// Group names the runner group (scale-set mode); exclusive with GroupID.
	Group   string   `yaml:"group,omitempty"`
	GroupID int64    `yaml:"group_id,omitempty"`
	Labels  []string `yaml:"labels"`
}

// Scope names the runner registration level.
type Scope string

const (
	ScopeOrganization Scope = "organization"
	ScopeRepository   Scope = "repository"
	ScopeEnterprise   Scope = "enterprise"
)

// Scope reports which registration level the runner uses, or "" if none is
// set.
func (r Runner) Scope() Scope {
	switch {
	case r.Organization != "":
		return ScopeOrganization
	case r.Repository != "":
		return ScopeRepository
	case r.Enterprise != "":
		return ScopeEnterprise
	}
	return ""
}

// PullPolicy says when an image is fetched from its registry.
type PullPolicy string

const (
	PullAlways       PullPolicy = "Always"
	PullIfNotPresent PullPolicy = "IfNotPresent"
	PullNever        PullPolicy = "Never"
)

// Backend names a microVM implementation.
type Backend string

const (
	BackendAuto        Backend = "auto"
	BackendFirecracker Backend = "firecracker"
	BackendQEMU        Backend = "qemu"
)

// VMMode is how the guest runs: the image's own init, or the agent alone.
type VMMode string

const (
	// VMModeSystem boots the image's /sbin/init (systemd); the image runs
	// fireactions' agent as a service.
	VMModeSystem VMMode = "system"
	// VMModeApp runs fireactions' agent as the VM's only workload.
	VMModeApp VMMode = "app"
)

// VM is the shape of each runner microVM.
type VM struct {
	// Mode is system (the image's init) or app (the agent alone).
	Mode          VMMode   `yaml:"mode"`
	Backend       Backend  `yaml:"backend"`
	VCPUs         int      `yaml:"vcpus"`
	MemoryMiB     int      `yaml:"memory_mib"`
	SMT           bool     `yaml:"smt,omitempty"`
	CPUTemplate   string   `yaml:"cpu_template,omitempty"`
	Kernel        string   `yaml:"kernel"`
	KernelModules string   `yaml:"kernel_modules,omitempty"`
	KernelArgs    string   `yaml:"kernel_args"`
	DiskSize      ByteSize `yaml:"disk_size"`
	// Metadata adds string leaves to the VM's meta-data tree (MMDS).
	Metadata map[string]string `yaml:"metadata,omitempty"`
	// UserData is the cloud-init user-data every VM of the pool receives,
	// verbatim. When the registry cache is on and this is empty, it is
	// derived from registry_cache (registrycache.ApplyUserData), both by the
	// bootstrap and when the daemon loads its configuration.
	UserData string `yaml:"user_data,omitempty"`
}

// Duration is a time.Duration written as "90s", "24h".
type Duration time.Duration
