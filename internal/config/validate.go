package config

import (
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"io"
	"maps"
	"net"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode"

	"github.com/google/go-containerregistry/pkg/name"
	"go.yaml.in/yaml/v3"
)

// ValidateOptions tunes Validate.
type ValidateOptions struct {
	// CheckFiles requires every file the configuration names to exist and
	// be readable, and checks what it holds where that is known (the GitHub
	// App key, the Squid CA). Leave it off for a configuration written for
	// another machine or before its files are installed (the bootstrap's
	// output: the kernel may be installed later).
	CheckFiles bool
}

// Limits enforced by Validate.
const (
	MinVCPUs     = 1
	MaxVCPUs     = 32
	MinMemoryMiB = 128
	MaxMemoryMiB = 262144
	MinDiskSize  = ByteSize(1 << 30)
	MinZotSize   = ByteSize(1 << 30)
)

// Allowed values of the enumerated fields.
var (
	LogLevels    = []string{"debug", "info", "warn", "error"}
	LogFormats   = []string{"text", "json"}
	PullPolicies = []PullPolicy{PullAlways, PullIfNotPresent, PullNever}
	Scalings     = []Scaling{ScalingScaleSet, ScalingLabels}
	VMModes      = []VMMode{VMModeSystem, VMModeApp}
	Backends     = []Backend{BackendAuto, BackendFirecracker, BackendQEMU}
	// CPUTemplates are Firecracker's static CPU templates; "" means none.
	CPUTemplates = []string{"", "None", "T2", "T2S", "T2CL", "T2A", "C3"}
)

// ReservedMetadataKeys are meta-data keys fireactions sets for every VM;
// every key under "fireactions/" is reserved as well.
var ReservedMetadataKeys = []string{"instance-id", "local-hostname"}

// Validate checks every field and returns Problems listing everything
// wrong, each with its YAML path, or nil. It expects the defaults to have
// been applied (an empty field that has a default is reported as missing).
func (c *Config) Validate(opts ValidateOptions) error {
	v := &validator{opts: opts}
	v.config(c)
	return v.err()
}

type validator struct {
	problems
	opts ValidateOptions
}

func (v *validator) config(c *Config) {
	if c.DataDir != "" {
		v.absPath("data_dir", c.DataDir)
	}
	v.server(c)
	v.metrics(c)
	v.enum("log.level", c.Log.Level, LogLevels)
	v.enum("log.format", c.Log.Format, LogFormats)
	v.github(&c.GitHub)
	v.network(&c.Network)
	v.registryCache(&c.RegistryCache)
	v.cacheInSubnet(c)
	v.pools(c.Pools)
}

// cacheInSubnet requires the registry cache to listen where VMs can reach
// it without a route: on the VM network.
func (v *validator) cacheInSubnet(c *Config) {
	if !c.RegistryCache.Enabled {
		return
	}
	gw, err1 := netip.ParseAddr(c.RegistryCache.Gateway)
	subnet, err2 := netip.ParsePrefix(c.Network.Subnet)
	if err1 != nil || err2 != nil || subnet.Masked() != subnet {
		return // reported by their own checks
	}
	if !subnet.Contains(gw) {
		v.add("registry_cache.gateway", fmt.Sprintf("%s is outside network.subnet %s, so VMs cannot reach the caches; use the bridge address (network.gateway, %s)", gw, subnet, c.Network.Gateway))
	}
}

func (v *validator) server(c *Config) {
	s := c.Server
	host, ok := v.hostPort("server.address", s.Address)
	if ok && !isLoopback(host) && s.AuthTokenFile == "" {
		_, port, _ := net.SplitHostPort(s.Address)
		v.add("server.address", fmt.Sprintf("%q accepts connections from other hosts but server.auth_token_file is not set; "+
			"set auth_token_file to a file holding a bearer token, or bind to 127.0.0.1:%s", s.Address, port))
	}
	if s.AuthTokenFile != "" {
		v.tokenFile("server.auth_token_file", s.AuthTokenFile, "the bearer token")
	}
	if s.DrainTimeout < 0 {
		v.add("server.drain_timeout", fmt.Sprintf("%s is negative; write e.g. 30m", s.DrainTimeout.Std()))
	}
}

// tokenFile checks a path to a file holding one secret value; the content
// is never quoted.
func (v *validator) tokenFile(path, p, what string) {
	if v.absPath(path, p) && v.opts.CheckFiles {
		if data, ok := v.readFile(path, p); ok && strings.TrimSpace(string(data)) == "" {
			v.add(path, fmt.Sprintf("%s is empty; write %s into it", p, what))
		}
	}
}

func (v *validator) metrics(c *Config) {
	if _, ok := v.hostPort("metrics.address", c.Metrics.Address); ok && c.Metrics.Address == c.Server.Address {
		v.add("metrics.address", fmt.Sprintf("%q is also server.address; give the metrics listener its own port", c.Metrics.Address))
	}
}

// hostPort checks a listen address and returns its host.
func (v *validator) hostPort(path, addr string) (string, bool) {
	if addr == "" {
		v.add(path, "required: a listen address such as 127.0.0.1:8080")
		return "", false
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		v.add(path, fmt.Sprintf("%q is not host:port; write e.g. 127.0.0.1:8080 (IPv6: [::1]:8080)", addr))
		return "", false
	}
	if !v.port(path, port) {
		return "", false
	}
	if host != "" {
		if _, err := netip.ParseAddr(host); err != nil && !isHostname(host) {
			v.add(path, fmt.Sprintf("%q: %q is neither an IP address nor a host name", addr, host))
			return "", false
		}
	}
	return host, true
}

func (v *validator) port(path, port string) bool {
	n, err := strconv.Atoi(port)
	if err != nil || n < 1 || n > 65535 || strings.Trim(port, "0123456789") != "" {
		v.add(path, fmt.Sprintf("port %q is not a number from 1 to 65535", port))
		return false
	}
	return true
}

// isLoopback reports whether a listen host is reachable from this machine
// only. An empty host, 0.0.0.0 and :: listen everywhere; a host name other
// than localhost may resolve to anything.
func isLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.IsLoopback()
}

func (v *validator) github(g *GitHub) {
	// A personal access token alone is enough; an App needs its id and key.
	tokenOnly := g.TokenFile != "" && g.AppID == 0 && g.PrivateKey == "" && g.PrivateKeyFile == ""
	switch {
	case tokenOnly:
	case g.AppID == 0:
		v.add("github.app_id", "required: the GitHub App's numeric ID (App settings, About), or only github.token_file for a personal access token")
	case g.AppID < 0:
		v.add("github.app_id", fmt.Sprintf("%d is not an App ID; it must be positive", g.AppID))
	}
	switch {
	case tokenOnly:
	case g.PrivateKey != "" && g.PrivateKeyFile != "":
		v.add("github.private_key", "set either private_key or private_key_file, not both")
	case g.PrivateKey == "" && g.PrivateKeyFile == "":
		v.add("github.private_key", "required: set private_key (the App's PEM key inline) or private_key_file (a path to it)")
	case g.PrivateKey != "":
		if msg := checkRSAKey([]byte(g.PrivateKey.Reveal())); msg != "" {
			v.add("github.private_key", msg)
		}
	}
	if g.PrivateKeyFile != "" && v.absPath("github.private_key_file", g.PrivateKeyFile) && v.opts.CheckFiles {
		if data, ok := v.readFile("github.private_key_file", g.PrivateKeyFile); ok {
			if msg := checkRSAKey(data); msg != "" {
				v.add("github.private_key_file", g.PrivateKeyFile+": "+msg)
			}
		}
	}
	v.httpURL("github.api_url", g.APIURL, "https://github.example.com/api/v3/")
	if g.TokenFile != "" {
		v.tokenFile("github.token_file", g.TokenFile, "the personal access token (classic)")
	}
	if g.WebhookSecretFile != "" {
		v.tokenFile("github.webhook_secret_file", g.WebhookSecretFile, "the webhook secret set in the GitHub App")
	}
}

// checkRSAKey explains what is wrong with a GitHub App private key, or
// returns "". The message never contains any of the key material.
func checkRSAKey(data []byte) string {
	const fix = "; use the .pem file GitHub generated for the App, including its BEGIN and END lines"
	block, rest := pem.Decode(data)
	if block == nil {
		return "not a PEM private key" + fix
	}
	if strings.TrimSpace(string(rest)) != "" {
		return "extra data after the PEM key; keep only the one key"
	}
	switch block.Type {
	case "RSA PRIVATE KEY":
		if _, ok := block.Headers["DEK-Info"]; ok {
			return "the key is encrypted; decrypt it first (openssl rsa -in key.pem -out plain.pem)"
		}
		if _, err := x509.ParsePKCS1PrivateKey(block.Bytes); err != nil {
			return "the RSA PRIVATE KEY block does not parse as a PKCS#1 key" + fix
		}
	case "PRIVATE KEY":
		k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
		if err != nil {
			return "the PRIVATE KEY block does not parse as a PKCS#8 key" + fix
		}
		if _, ok := k.(*rsa.PrivateKey); !ok {
			return "not an RSA key; GitHub App keys are RSA"
		}
	case "ENCRYPTED PRIVATE KEY":
		return "the key is encrypted; decrypt it first (openssl pkey -in key.pem -out plain.pem)"
	default:
		return fmt.Sprintf("a PEM %q block is not a private key%s", clip(block.Type), fix)
	}
	return ""
}

// checkAnyKey accepts any unencrypted PEM private key (the Squid CA key may
// be RSA or ECDSA). The message never contains key material.
func checkAnyKey(data []byte) string {
	block, _ := pem.Decode(data)
	if block == nil {
		return "not a PEM private key"
	}
	var err error
	switch block.Type {
	case "RSA PRIVATE KEY":
		_, err = x509.ParsePKCS1PrivateKey(block.Bytes)
	case "EC PRIVATE KEY":
		_, err = x509.ParseECPrivateKey(block.Bytes)
	case "PRIVATE KEY":
		_, err = x509.ParsePKCS8PrivateKey(block.Bytes)
	default:
		return fmt.Sprintf("a PEM %q block is not an unencrypted private key", clip(block.Type))
	}
	if err != nil {
		return "the " + block.Type + " block does not parse"
	}
	return ""
}

func (v *validator) httpURL(path, raw, example string) {
	if raw == "" {
		v.add(path, "required: an absolute http(s) URL")
		return
	}
	u, err := url.Parse(raw)
	if err != nil || u.User != nil {
		// The value is not echoed: a URL with user info carries a password.
		v.add(path, "not a valid URL without credentials; write an absolute http(s) URL such as "+example)
		return
	}
	if (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
		v.add(path, fmt.Sprintf("%q is not an absolute http(s) URL; write e.g. %s", raw, example))
		return
	}
	if u.RawQuery != "" || u.Fragment != "" {
		v.add(path, fmt.Sprintf("%q: a base URL takes no query or fragment", raw))
	}
}

func (v *validator) network(n *Network) {
	v.cniName("network.name", n.Name)
	v.absPath("network.conf_dir", n.ConfDir)
	if len(n.BinDirs) == 0 {
		v.add("network.bin_dirs", "required: the directories holding the CNI plugins, e.g. /usr/lib/cni")
	}
	for i, d := range n.BinDirs {
		v.absPath(index("network.bin_dirs", i), d)
	}
	if n.Bridge == "" {
		v.add("network.bridge", "required: the host bridge name, e.g. fireactions0")
	} else if !isIfName(n.Bridge) {
		v.add("network.bridge", fmt.Sprintf("%q is not an interface name: 1 to 15 characters, no '/', ':' or whitespace", n.Bridge))
	}
	subnet, subnetOK := v.subnet("network.subnet", n.Subnet)
	if n.Gateway == "" {
		v.add("network.gateway", "required: the bridge's address inside network.subnet")
	} else if gw, err := netip.ParseAddr(n.Gateway); err != nil || gw.Zone() != "" {
		v.add("network.gateway", fmt.Sprintf("%q is not an IP address", n.Gateway))
	} else if subnetOK {
		switch {
		case !subnet.Contains(gw):
			v.add("network.gateway", fmt.Sprintf("%s is outside network.subnet %s", gw, subnet))
		case gw == subnet.Addr():
			v.add("network.gateway", fmt.Sprintf("%s is the network address of %s; use a host address such as %s", gw, subnet, subnet.Addr().Next()))
		case gw.Is4() && gw == lastAddr(subnet):
			v.add("network.gateway", fmt.Sprintf("%s is the broadcast address of %s", gw, subnet))
		}
	}
	if n.MTU != 0 && (n.MTU < 68 || n.MTU > 65535) {
		v.add("network.mtu", fmt.Sprintf("%d is not an MTU; use 68 to 65535, or leave it out for the default", n.MTU))
	}
	for i, ns := range n.DNS {
		if _, err := netip.ParseAddr(ns); err != nil {
			v.add(index("network.nameservers", i), fmt.Sprintf("%q is not an IP address", ns))
		}
	}
}

func (v *validator) subnet(path, s string) (netip.Prefix, bool) {
	if s == "" {
		v.add(path, "required: a CIDR such as 10.200.0.0/24")
		return netip.Prefix{}, false
	}
	p, err := netip.ParsePrefix(s)
	if err != nil {
		v.add(path, fmt.Sprintf("%q is not a CIDR; write e.g. 10.200.0.0/24", s))
		return netip.Prefix{}, false
	}
	if p.Masked() != p {
		v.add(path, fmt.Sprintf("%q has host bits set; write %s", s, p.Masked()))
		return netip.Prefix{}, false
	}
	if p.Addr().BitLen()-p.Bits() < 2 {
		v.add(path, fmt.Sprintf("%s leaves no room for VMs; use a shorter prefix such as /24", p))
		return netip.Prefix{}, false
	}
	return p, true
}

func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 1 << (7 - i%8)
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

func (v *validator) registryCache(rc *RegistryCache) {
	if rc.Gateway == "" {
		v.add("registry_cache.gateway", "required: the address the caches listen on (the VM bridge's address)")
	} else if _, err := netip.ParseAddr(rc.Gateway); err != nil {
		v.add("registry_cache.gateway", fmt.Sprintf("%q is not an IP address", rc.Gateway))
	}
	ports := []struct {
		path string
		n    int
	}{
		{"registry_cache.zot.port", rc.Zot.Port},
		{"registry_cache.squid.http_port", rc.Squid.HTTPPort},
		{"registry_cache.squid.https_port", rc.Squid.HTTPSPort},
	}
	for i, p := range ports {
		if p.n < 1 || p.n > 65535 {
			v.add(p.path, fmt.Sprintf("%d is not a port; use 1 to 65535", p.n))
			continue
		}
		for _, q := range ports[:i] {
			if q.n == p.n {
				v.add(p.path, fmt.Sprintf("port %d is also %s; each cache listener needs its own port", p.n, q.path))
			}
		}
	}
	z := rc.Zot
	v.absPath("registry_cache.zot.storage_dir", z.StorageDir)
	if z.MaxSize < MinZotSize {
		v.add("registry_cache.zot.max_size", fmt.Sprintf("%s is too small; use at least %s", z.MaxSize, MinZotSize))
	}
	if z.GCInterval.Std() < 60e9 {
		v.add("registry_cache.zot.gc_interval", fmt.Sprintf("%s is too short; use at least 1m", z.GCInterval.Std()))
	}
	if len(rc.Mirrors) == 0 {
		v.add("registry_cache.mirrors", "required: at least one registry to mirror, or leave the key out for the defaults")
	}
	seen := map[string]int{}
	for i, m := range rc.Mirrors {
		p := index("registry_cache.mirrors", i)
		switch {
		case m.Registry == "":
			v.add(field(p, "registry"), "required: the registry host, e.g. ghcr.io")
		case m.Registry == "index.docker.io" || m.Registry == "registry-1.docker.io":
			v.add(field(p, "registry"), fmt.Sprintf("write Docker Hub as docker.io (and %s as its url)", "https://registry-1.docker.io"))
		case !isHostPort(m.Registry):
			v.add(field(p, "registry"), fmt.Sprintf("%q is not a registry host; write hostname[:port], e.g. ghcr.io or registry.example.com:5000", m.Registry))
		default:
			if j, dup := seen[m.Registry]; dup {
				v.add(field(p, "registry"), fmt.Sprintf("%q is already mirrored by registry_cache.mirrors[%d]", m.Registry, j))
			}
			seen[m.Registry] = i
		}
		v.httpURL(field(p, "url"), m.URL, "https://ghcr.io")
	}
	sq := rc.Squid
	if sq.MemoryCache < 1<<20 {
		v.add("registry_cache.squid.memory_cache", fmt.Sprintf("%s is too small; use at least 1MiB", sq.MemoryCache))
	}
	if sq.DiskCache < 1<<20 {
		v.add("registry_cache.squid.disk_cache", fmt.Sprintf("%s is too small; use at least 1MiB", sq.DiskCache))
	}
	switch {
	case sq.MaxObjectSize <= 0:
		v.add("registry_cache.squid.max_object_size", "must be positive, e.g. 1GiB")
	case sq.MaxObjectSize > sq.DiskCache:
		v.add("registry_cache.squid.max_object_size", fmt.Sprintf("%s is larger than disk_cache (%s)", sq.MaxObjectSize, sq.DiskCache))
	}
	v.absPath("registry_cache.squid.cache_dir", sq.CacheDir)
	domains := map[string]int{}
	for i, dom := range sq.BumpDomains {
		p := index("registry_cache.squid.bump_domains", i)
		if !isHostname(strings.TrimPrefix(dom, ".")) {
			v.add(p, fmt.Sprintf("%q is not a domain; write e.g. example.com, or .example.com to include its subdomains", dom))
			continue
		}
		if j, dup := domains[dom]; dup {
			v.add(p, fmt.Sprintf("%q is already listed at bump_domains[%d]", dom, j))
		}
		domains[dom] = i
	}
	if len(sq.BumpDomains) > 0 {
		if sq.CACertFile == "" {
			v.add("registry_cache.squid.ca_cert_file", "required when bump_domains is set: the CA certificate Squid signs intercepted sites with")
		}
		if sq.CAKeyFile == "" {
			v.add("registry_cache.squid.ca_key_file", "required when bump_domains is set: the CA's private key")
		}
	}
	if sq.CACertFile != "" && v.absPath("registry_cache.squid.ca_cert_file", sq.CACertFile) && v.opts.CheckFiles {
		if data, ok := v.readFile("registry_cache.squid.ca_cert_file", sq.CACertFile); ok {
			block, _ := pem.Decode(data)
			if block == nil || block.Type != "CERTIFICATE" {
				v.add("registry_cache.squid.ca_cert_file", sq.CACertFile+": not a PEM certificate")
			} else if cert, err := x509.ParseCertificate(block.Bytes); err != nil {
				v.add("registry_cache.squid.ca_cert_file", sq.CACertFile+": the certificate does not parse")
			} else if !cert.IsCA {
				v.add("registry_cache.squid.ca_cert_file", sq.CACertFile+": not a CA certificate (basicConstraints CA:TRUE is missing)")
			}
		}
	}
	if sq.CAKeyFile != "" && v.absPath("registry_cache.squid.ca_key_file", sq.CAKeyFile) && v.opts.CheckFiles {
		if data, ok := v.readFile("registry_cache.squid.ca_key_file", sq.CAKeyFile); ok {
			if msg := checkAnyKey(data); msg != "" {
				v.add("registry_cache.squid.ca_key_file", sq.CAKeyFile+": "+msg)
			}
		}
	}
}

var (
	poolNameRE   = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]*[a-z0-9])?$`)
	cniNameRE    = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`)
	ghLoginRE    = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?$`)
	ghRepoNameRE = regexp.MustCompile(`^[A-Za-z0-9._-]+$`)
	enterpriseRE = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?$`)
)

// MaxNamePrefix leaves room in a runner name (prefix, '-', a unique
// suffix) within GitHub's 64-character limit.
const MaxNamePrefix = 40

func (v *validator) pools(pools []Pool) {
	if len(pools) == 0 {
		v.add("pools", "required: at least one pool")
	}
	names := map[string]int{}
	for i := range pools {
		p := &pools[i]
		path := index("pools", i)
		switch {
		case p.Name == "":
			v.add(field(path, "name"), "required: a name of lowercase letters, digits and '-'")
		case len(p.Name) > 63 || !poolNameRE.MatchString(p.Name):
			v.add(field(path, "name"), fmt.Sprintf("%q is not a valid pool name: lowercase letters, digits and '-', starting and ending with a letter or digit, at most 63 characters", p.Name))
		default:
			if j, dup := names[p.Name]; dup {
				v.add(field(path, "name"), fmt.Sprintf("%q is already the name of pools[%d]; pool names must be unique", p.Name, j))
			}
			names[p.Name] = i
		}
		if p.MinRunners < 0 {
			v.add(field(path, "min_runners"), fmt.Sprintf("%d is negative; use 0 or more", p.MinRunners))
		}
		if p.MaxRunners == 0 {
			v.add(field(path, "max_runners"), "required: the most runners the pool may run at once, at least 1")
		} else if p.MaxRunners < 0 {
			v.add(field(path, "max_runners"), fmt.Sprintf("%d is negative; use at least 1", p.MaxRunners))
		} else if p.MinRunners > p.MaxRunners {
			v.add(field(path, "min_runners"), fmt.Sprintf("%d is more than max_runners (%d)", p.MinRunners, p.MaxRunners))
		}
		v.enum(field(path, "scaling"), string(p.Scaling), Scalings)
		v.runner(field(path, "runner"), &p.Runner)
		if p.Runner.Group != "" && p.Scaling == ScalingLabels {
			v.add(field(field(path, "runner"), "group"), "a runner group name works with scaling: scaleset only; in labels mode set group_id")
		}
		v.vm(field(path, "vm"), &p.VM)
		if p.Network != "" {
			v.cniName(field(path, "network"), p.Network)
		}
		v.timeouts(field(path, "timeouts"), p.Timeouts)
	}
}

func (v *validator) timeouts(path string, t Timeouts) {
	if t.Boot < Duration(time.Second) {
		v.add(field(path, "boot"), fmt.Sprintf("%s is too short; use at least 1s, e.g. 5m", t.Boot.Std()))
	}
	if t.IdleTTL < 0 {
		v.add(field(path, "idle_ttl"), fmt.Sprintf("%s is negative; use 0 for no limit, or e.g. 1h", t.IdleTTL.Std()))
	} else if t.IdleTTL > 0 && t.IdleTTL < Duration(time.Second) {
		v.add(field(path, "idle_ttl"), fmt.Sprintf("%s is too short; use at least 1s, or 0 for no limit", t.IdleTTL.Std()))
	}
	if t.MaxJob < Duration(time.Second) {
		v.add(field(path, "max_job"), fmt.Sprintf("%s is too short; use at least 1s, e.g. 6h", t.MaxJob.Std()))
	}
}

func (v *validator) runner(path string, r *Runner) {
	switch {
	case r.NamePrefix == "":
		v.add(field(path, "name_prefix"), "required: the start of every runner's name, e.g. runner")
	case len(r.NamePrefix) > MaxNamePrefix || !poolNameRE.MatchString(r.NamePrefix):
		v.add(field(path, "name_prefix"), fmt.Sprintf("%q is not a valid name prefix: lowercase letters, digits and '-', starting and ending with a letter or digit, at most %d characters", r.NamePrefix, MaxNamePrefix))
	}
	if r.Image == "" {
		v.add(field(path, "image"), "required: the runner image, e.g. "+DefaultRunnerImage)
	} else if _, err := name.ParseReference(r.Image); err != nil {
		v.add(field(path, "image"), fmt.Sprintf("%q is not an image reference (registry/repository:tag or @sha256:digest)", r.Image))
	}
	v.enum(field(path, "image_pull_policy"), string(r.ImagePullPolicy), PullPolicies)
	set := 0
	for _, s := range []string{r.Organization, r.Repository, r.Enterprise} {
		if s != "" {
			set++
		}
	}
	switch {
	case set == 0:
		v.add(field(path, "organization"), "required: set exactly one of organization, repository (owner/name) or enterprise")
	case set > 1:
		v.add(path, "set exactly one of organization, repository or enterprise, not several")
	}
	if r.Organization != "" && (len(r.Organization) > 39 || !ghLoginRE.MatchString(r.Organization)) {
		v.add(field(path, "organization"), fmt.Sprintf("%q is not a GitHub organization name", r.Organization))
	}
	if r.Repository != "" {
		owner, repo, ok := strings.Cut(r.Repository, "/")
		if !ok || len(owner) > 39 || !ghLoginRE.MatchString(owner) || len(repo) > 100 || !ghRepoNameRE.MatchString(repo) || repo == "." || repo == ".." {
			v.add(field(path, "repository"), fmt.Sprintf("%q is not a repository; write owner/name", r.Repository))
		}
	}
	if r.Enterprise != "" && !enterpriseRE.MatchString(r.Enterprise) {
		v.add(field(path, "enterprise"), fmt.Sprintf("%q is not an enterprise slug (letters, digits and '-')", r.Enterprise))
	}
	switch {
	case r.GroupID < 0:
		v.add(field(path, "group_id"), fmt.Sprintf("%d is negative; leave it out for the default runner group", r.GroupID))
	case r.GroupID > 0 && r.Repository != "" && set == 1:
		v.add(field(path, "group_id"), "runner groups exist for organization and enterprise runners only; remove group_id")
	}
	switch {
	case r.Group == "":
	case r.GroupID != 0:
		v.add(field(path, "group"), "set either group (the runner group's name) or group_id, not both")
	case r.Repository != "" && set == 1:
		v.add(field(path, "group"), "runner groups exist for organization and enterprise runners only; remove group")
	case strings.TrimSpace(r.Group) != r.Group || strings.IndexFunc(r.Group, unicode.IsControl) >= 0:
		v.add(field(path, "group"), fmt.Sprintf("%q has surrounding whitespace or control characters", r.Group))
	}
	if r.Labels != nil && len(r.Labels) == 0 {
		v.add(field(path, "labels"), "empty; list at least one label, or leave the key out for the defaults ("+strings.Join(DefaultLabels, ", ")+")")
	}
	labels := map[string]int{}
	for i, l := range r.Labels {
		p := index(field(path, "labels"), i)
		switch {
		case strings.TrimSpace(l) == "":
			v.add(p, "empty label")
		case strings.Contains(l, ","):
			v.add(p, fmt.Sprintf("%q contains a comma; list each label separately", l))
		case strings.TrimSpace(l) != l || strings.IndexFunc(l, unicode.IsControl) >= 0:
			v.add(p, fmt.Sprintf("%q has surrounding whitespace or control characters", l))
		case len(l) > 256:
			v.add(p, "longer than 256 characters")
		default:
			if j, dup := labels[strings.ToLower(l)]; dup {
				v.add(p, fmt.Sprintf("%q repeats labels[%d] (labels are case-insensitive)", l, j))
			}
			labels[strings.ToLower(l)] = i
		}
	}
}

func (v *validator) vm(path string, m *VM) {
	v.enum(field(path, "mode"), string(m.Mode), VMModes)
	v.enum(field(path, "backend"), string(m.Backend), Backends)
	if m.VCPUs < MinVCPUs || m.VCPUs > MaxVCPUs {
		v.add(field(path, "vcpus"), fmt.Sprintf("%d is out of range; use %d to %d", m.VCPUs, MinVCPUs, MaxVCPUs))
	} else if m.SMT && m.VCPUs > 1 && m.VCPUs%2 != 0 && m.Backend != BackendQEMU {
		v.add(field(path, "smt"), fmt.Sprintf("Firecracker needs 1 or an even number of vcpus with SMT on, got %d", m.VCPUs))
	}
	if m.MemoryMiB < MinMemoryMiB || m.MemoryMiB > MaxMemoryMiB {
		v.add(field(path, "memory_mib"), fmt.Sprintf("%d is out of range; use %d to %d", m.MemoryMiB, MinMemoryMiB, MaxMemoryMiB))
	}
	v.enum(field(path, "cpu_template"), m.CPUTemplate, CPUTemplates)
	if m.CPUTemplate != "" && m.Backend == BackendQEMU {
		v.add(field(path, "cpu_template"), "CPU templates are a Firecracker feature; remove cpu_template or use backend firecracker or auto")
	}
	if m.Kernel == "" {
		v.add(field(path, "kernel"), "required: the guest kernel (an uncompressed vmlinux)")
	} else if v.absPath(field(path, "kernel"), m.Kernel) && v.opts.CheckFiles {
		v.checkFile(field(path, "kernel"), m.Kernel, false)
	}
	if m.KernelModules != "" && v.absPath(field(path, "kernel_modules"), m.KernelModules) && v.opts.CheckFiles {
		v.checkFile(field(path, "kernel_modules"), m.KernelModules, true)
	}
	if strings.ContainsAny(m.KernelArgs, "\n\r\x00") {
		v.add(field(path, "kernel_args"), "must be one line")
	}
	if m.DiskSize < MinDiskSize {
		v.add(field(path, "disk_size"), fmt.Sprintf("%s is too small; use at least %s", m.DiskSize, MinDiskSize))
	}
	v.metadata(field(path, "metadata"), m.Metadata)
	if m.UserData != "" {
		if msg := checkUserData(m.UserData); msg != "" {
			v.add(field(path, "user_data"), msg)
		}
	}
}

func (v *validator) metadata(path string, md map[string]string) {
	for _, k := range sortedKeys(md) {
		p := field(path, k)
		switch {
		case k == "":
			v.add(p, "empty key")
		case strings.HasPrefix(k, "/") || strings.HasSuffix(k, "/"):
			v.add(p, "a key must not start or end with '/'")
		case strings.IndexFunc(k, func(r rune) bool { return unicode.IsSpace(r) || unicode.IsControl(r) }) >= 0:
			v.add(p, "a key must not contain whitespace or control characters")
		case strings.Contains(k, "//") || hasDotSegment(k):
			v.add(p, "a key must be '/'-separated names without empty, '.' or '..' parts")
		case strings.HasPrefix(k, "fireactions/") || contains(ReservedMetadataKeys, k):
			v.add(p, "reserved: fireactions sets this key (and everything under fireactions/) itself")
		default:
			// A key cannot be both a leaf and a directory of the tree.
			for _, other := range sortedKeys(md) {
				if strings.HasPrefix(other, k+"/") {
					v.add(p, fmt.Sprintf("is a value but %q puts a tree under it; rename one of them", other))
					break
				}
			}
		}
	}
}

func sortedKeys(m map[string]string) []string {
	return slices.Sorted(maps.Keys(m))
}

func hasDotSegment(k string) bool {
	for _, s := range strings.Split(k, "/") {
		if s == "." || s == ".." {
			return true
		}
	}
	return false
}

// checkUserData accepts the cloud-init formats fireactions can pass on
// untouched; a #cloud-config document must also be a YAML mapping. The
// message never quotes the user-data (it may hold credentials).
func checkUserData(ud string) string {
	first, _, _ := strings.Cut(ud, "\n")
	first = strings.TrimRight(first, " \t\r")
	switch {
	case first == "#cloud-config":
		var doc yaml.Node
		if err := yaml.Unmarshal([]byte(ud), &doc); err != nil {
			return "the #cloud-config document is not valid YAML: " + strings.TrimPrefix(err.Error(), "yaml: ")
		}
		if len(doc.Content) > 0 && doc.Content[0].Kind != yaml.MappingNode && doc.Content[0].ShortTag() != "!!null" {
			return "the #cloud-config document must be a YAML mapping (write_files:, ...)"
		}
	case strings.HasPrefix(first, "#!"), strings.HasPrefix(first, "#include"),
		first == "#cloud-boothook", first == "#part-handler", first == "#cloud-config-archive",
		strings.HasPrefix(first, "## template:"), strings.HasPrefix(strings.ToLower(first), "content-type:"):
	default:
		return "not a cloud-init user-data format; start it with #cloud-config (or #!, #include, #cloud-boothook, a MIME multipart header)"
	}
	return ""
}

func (v *validator) cniName(path, s string) {
	if s == "" {
		v.add(path, "required: a CNI network name, e.g. fireactions")
	} else if !cniNameRE.MatchString(s) {
		v.add(path, fmt.Sprintf("%q is not a CNI network name: letters, digits, '_', '.' and '-', starting with a letter or digit", s))
	}
}

func enumList[T ~string](allowed []T) string {
	var b strings.Builder
	for i, a := range allowed {
		if i > 0 {
			b.WriteString(", ")
		}
		if a == "" {
			b.WriteString(`"" (none)`)
		} else {
			b.WriteString(string(a))
		}
	}
	return b.String()
}

func (v *validator) enum(path, val string, allowed any) {
	var list string
	ok := false
	switch a := allowed.(type) {
	case []string:
		ok, list = contains(a, val), enumList(a)
	case []PullPolicy:
		ok, list = contains(a, PullPolicy(val)), enumList(a)
	case []Backend:
		ok, list = contains(a, Backend(val)), enumList(a)
	case []Scaling:
		ok, list = contains(a, Scaling(val)), enumList(a)
	case []VMMode:
		ok, list = contains(a, VMMode(val)), enumList(a)
	}
	if ok {
		return
	}
	if val == "" {
		v.add(path, "required: one of "+list)
		return
	}
	v.add(path, fmt.Sprintf("%q is not allowed; use one of %s", val, list))
}

func contains[T comparable](list []T, x T) bool {
	for _, e := range list {
		if e == x {
			return true
		}
	}
	return false
}

// absPath requires an absolute path: the daemon runs from / under systemd,
// so a relative path would mean something else there than in a shell.
func (v *validator) absPath(path, p string) bool {
	switch {
	case p == "":
		v.add(path, "required: an absolute path")
		return false
	case !filepath.IsAbs(p):
		v.add(path, fmt.Sprintf("%q is not an absolute path; relative paths depend on the daemon's working directory", p))
		return false
	case strings.ContainsRune(p, 0):
		v.add(path, "contains a NUL byte")
		return false
	}
	return true
}

func (v *validator) readFile(path, p string) ([]byte, bool) {
	f, err := os.Open(p)
	if err != nil {
		v.add(path, fileError(p, err))
		return nil, false
	}
	defer f.Close()
	if st, err := f.Stat(); err == nil && !st.Mode().IsRegular() {
		v.add(path, fmt.Sprintf("%s is not a regular file", p))
		return nil, false
	}
	// Keys and tokens are small; a bound keeps a wrong path from reading a
	// disk image into memory.
	data, err := io.ReadAll(io.LimitReader(f, 1<<20))
	if err != nil {
		v.add(path, fileError(p, err))
		return nil, false
	}
	return data, true
}

// checkFile requires p to exist, be readable and be a directory (dir) or a
// regular file.
func (v *validator) checkFile(path, p string, dir bool) {
	f, err := os.Open(p)
	if err != nil {
		v.add(path, fileError(p, err))
		return
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		v.add(path, fileError(p, err))
		return
	}
	switch {
	case dir && !st.IsDir():
		v.add(path, fmt.Sprintf("%s is not a directory", p))
	case !dir && !st.Mode().IsRegular():
		v.add(path, fmt.Sprintf("%s is not a regular file", p))
	case dir:
		if _, err := f.ReadDir(1); err != nil && err != io.EOF {
			v.add(path, fileError(p, err))
		}
	default:
		if _, err := f.Read(make([]byte, 1)); err != nil && err != io.EOF {
			v.add(path, fileError(p, err))
		}
	}
}

func fileError(p string, err error) string {
	switch {
	case os.IsNotExist(err):
		return p + " does not exist"
	case os.IsPermission(err):
		return p + " is not readable by this user"
	}
	return fmt.Sprintf("%s: %v", p, err)
}

// isHostname accepts DNS names: dot-separated labels of letters, digits
// and '-', each 1 to 63 characters, not starting or ending with '-'.
func isHostname(h string) bool {
	if h == "" || len(h) > 253 {
		return false
	}
	for _, l := range strings.Split(strings.TrimSuffix(h, "."), ".") {
		if l == "" || len(l) > 63 || l[0] == '-' || l[len(l)-1] == '-' {
			return false
		}
		for _, r := range l {
			if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-') {
				return false
			}
		}
	}
	return true
}

// isHostPort accepts hostname[:port] with a port from 1 to 65535.
func isHostPort(s string) bool {
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return isHostname(s) && !strings.HasSuffix(s, ".")
	}
	n, err := strconv.Atoi(port)
	if err != nil || n < 1 || n > 65535 || strings.Trim(port, "0123456789") != "" {
		return false
	}
	if _, err := netip.ParseAddr(host); err == nil {
		return true
	}
	return isHostname(host) && !strings.HasSuffix(host, ".")
}

func isIfName(s string) bool {
	if s == "" || len(s) > 15 || s == "." || s == ".." {
		return false
	}
	return strings.IndexFunc(s, func(r rune) bool {
		return r == '/' || r == ':' || unicode.IsSpace(r) || r > unicode.MaxASCII || unicode.IsControl(r)
	}) < 0
}
