package config

import (
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// validConfig is the base document, parsed and defaulted: every validation
// case changes one thing in it.
func validConfig(t *testing.T) *Config {
	t.Helper()
	return mustParse(t, baseYAML)
}

type wantProblem struct{ path, msg string }

func checkProblems(t *testing.T, err error, want []wantProblem) {
	t.Helper()
	if len(want) == 0 {
		if err != nil {
			t.Fatalf("unexpected problems:\n%v", err)
		}
		return
	}
	ps := problemsOf(t, err)
	if len(ps) != len(want) {
		t.Fatalf("got %d problems, want %d:\n%v", len(ps), len(want), err)
	}
	for i, w := range want {
		if ps[i].Path != w.path || !strings.Contains(ps[i].Message, w.msg) {
			t.Errorf("problem %d = %q, want path %q and a message containing %q", i, ps[i].String(), w.path, w.msg)
		}
	}
}

func TestValidateRules(t *testing.T) {
	genKeys(t)
	pkcs1 := pkcs1PEM(t)
	pkcs8RSA := pkcs8PEM(t, rsaKey)
	pkcs8EC := pkcs8PEM(t, ecKey)
	certPEM := string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte{1, 2, 3}}))
	inlineKey := func(k string) func(*Config) {
		return func(c *Config) { c.GitHub.PrivateKeyFile = ""; c.GitHub.PrivateKey = Secret(k) }
	}
	tests := []struct {
		name   string
		mutate func(*Config)
		want   []wantProblem
	}{
		{"base is valid", func(*Config) {}, nil},
		{"data_dir relative", func(c *Config) { c.DataDir = "data" }, []wantProblem{{"data_dir", `"data" is not an absolute path`}}},

		// server and metrics
		{"server address required", func(c *Config) { c.Server.Address = "" }, []wantProblem{{"server.address", "required"}}},
		{"server address without port", func(c *Config) { c.Server.Address = "localhost" }, []wantProblem{{"server.address", `"localhost" is not host:port`}}},
		{"server port zero", func(c *Config) { c.Server.Address = "127.0.0.1:0" }, []wantProblem{{"server.address", `port "0" is not a number from 1 to 65535`}}},
		{"server port name", func(c *Config) { c.Server.Address = "127.0.0.1:http" }, []wantProblem{{"server.address", `port "http"`}}},
		{"server port signed", func(c *Config) { c.Server.Address = "127.0.0.1:+80" }, []wantProblem{{"server.address", `port "+80"`}}},
		{"server bad host", func(c *Config) { c.Server.Address = "bad_host!:80" }, []wantProblem{{"server.address", "neither an IP address nor a host name"}}},
		{"all interfaces without auth", func(c *Config) { c.Server.Address = "0.0.0.0:8080" },
			[]wantProblem{{"server.address", `"0.0.0.0:8080" accepts connections from other hosts but server.auth_token_file is not set; set auth_token_file to a file holding a bearer token, or bind to 127.0.0.1:8080`}}},
		{"empty host without auth", func(c *Config) { c.Server.Address = ":9000" }, []wantProblem{{"server.address", "or bind to 127.0.0.1:9000"}}},
		{"IPv6 any without auth", func(c *Config) { c.Server.Address = "[::]:8080" }, []wantProblem{{"server.address", "accepts connections from other hosts"}}},
		{"public IP without auth", func(c *Config) { c.Server.Address = "203.0.113.5:8080" }, []wantProblem{{"server.address", "accepts connections from other hosts"}}},
		{"host name without auth", func(c *Config) { c.Server.Address = "runner-host.example.com:8080" }, []wantProblem{{"server.address", "accepts connections from other hosts"}}},
		{"all interfaces with auth", func(c *Config) { c.Server.Address = "0.0.0.0:8080"; c.Server.AuthTokenFile = "/etc/fireactions/token" }, nil},
		{"localhost", func(c *Config) { c.Server.Address = "localhost:8080" }, nil},
		{"IPv6 loopback", func(c *Config) { c.Server.Address = "[::1]:8080" }, nil},
		{"other loopback address", func(c *Config) { c.Server.Address = "127.0.0.2:8080" }, nil},
		{"token file relative", func(c *Config) { c.Server.AuthTokenFile = "token" }, []wantProblem{{"server.auth_token_file", "not an absolute path"}}},
		{"metrics on the server's address", func(c *Config) { c.Metrics.Address = c.Server.Address }, []wantProblem{{"metrics.address", "also server.address"}}},
		{"metrics address broken", func(c *Config) { c.Metrics.Address = "8081" }, []wantProblem{{"metrics.address", "is not host:port"}}},
		{"drain timeout negative", func(c *Config) { c.Server.DrainTimeout = Duration(-time.Minute) }, []wantProblem{{"server.drain_timeout", "negative"}}},
		{"github token only", func(c *Config) {
			c.GitHub = GitHub{APIURL: DefaultGitHubAPIURL, TokenFile: "/etc/fireactions/github-token"}
		}, nil},
		{"github token relative", func(c *Config) { c.GitHub.TokenFile = "token" }, []wantProblem{{"github.token_file", "not an absolute path"}}},
		{"github webhook secret relative", func(c *Config) { c.GitHub.WebhookSecretFile = "secret" }, []wantProblem{{"github.webhook_secret_file", "not an absolute path"}}},
		{"github app id without key next to a token", func(c *Config) {
			c.GitHub.PrivateKeyFile = ""
			c.GitHub.TokenFile = "/etc/fireactions/github-token"
		}, []wantProblem{{"github.private_key", "required"}}},
		{"registry cache outside the VM subnet", func(c *Config) { c.RegistryCache.Enabled = true; c.RegistryCache.Gateway = "192.168.7.1" },
			[]wantProblem{{"registry_cache.gateway", "192.168.7.1 is outside network.subnet 10.200.0.0/24, so VMs cannot reach the caches"}}},
		{"registry cache off outside the subnet", func(c *Config) { c.RegistryCache.Gateway = "192.168.7.1" }, nil},

		// log
		{"log level", func(c *Config) { c.Log.Level = "loud" }, []wantProblem{{"log.level", `"loud" is not allowed; use one of debug, info, warn, error`}}},
		{"log level required", func(c *Config) { c.Log.Level = "" }, []wantProblem{{"log.level", "required: one of debug, info, warn, error"}}},
		{"log format", func(c *Config) { c.Log.Format = "xml" }, []wantProblem{{"log.format", "use one of text, json"}}},

		// github
		{"app id required", func(c *Config) { c.GitHub.AppID = 0 }, []wantProblem{{"github.app_id", "required"}}},
		{"app id negative", func(c *Config) { c.GitHub.AppID = -5 }, []wantProblem{{"github.app_id", "-5 is not an App ID; it must be positive"}}},
		{"both key and key file", func(c *Config) { c.GitHub.PrivateKey = Secret(pkcs1) }, []wantProblem{{"github.private_key", "set either private_key or private_key_file, not both"}}},
		{"no key", func(c *Config) { c.GitHub.PrivateKeyFile = "" }, []wantProblem{{"github.private_key", "required: set private_key"}}},
		{"inline PKCS#1 key", inlineKey(pkcs1), nil},
		{"inline PKCS#8 RSA key", inlineKey(pkcs8RSA), nil},
		{"inline key with surrounding blank lines", inlineKey("\n" + pkcs1 + "\n\n"), nil},
		{"inline key not PEM", inlineKey("ghp_not-a-key"), []wantProblem{{"github.private_key", "not a PEM private key; use the .pem file GitHub generated"}}},
		{"inline EC key", inlineKey(pkcs8EC), []wantProblem{{"github.private_key", "not an RSA key; GitHub App keys are RSA"}}},
		{"inline certificate", inlineKey(certPEM), []wantProblem{{"github.private_key", `a PEM "CERTIFICATE" block is not a private key`}}},
		{"inline encrypted PKCS#8", inlineKey(strings.ReplaceAll(pkcs8RSA, "PRIVATE KEY", "ENCRYPTED PRIVATE KEY")), []wantProblem{{"github.private_key", "the key is encrypted"}}},
		{"inline encrypted PKCS#1", inlineKey(strings.Replace(pkcs1, "-----\n", "-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00000000000000000000000000000000\n\n", 1)), []wantProblem{{"github.private_key", "the key is encrypted"}}},
		{"inline PKCS#1 label on PKCS#8 bytes", inlineKey(strings.ReplaceAll(pkcs8RSA, "PRIVATE KEY", "RSA PRIVATE KEY")), []wantProblem{{"github.private_key", "does not parse as a PKCS#1 key"}}},
		{"inline PKCS#8 label on PKCS#1 bytes", inlineKey(strings.ReplaceAll(pkcs1, "RSA PRIVATE KEY", "PRIVATE KEY")), []wantProblem{{"github.private_key", "does not parse as a PKCS#8 key"}}},
		{"inline key twice", inlineKey(pkcs1 + pkcs1), []wantProblem{{"github.private_key", "extra data after the PEM key"}}},
		{"key file relative", func(c *Config) { c.GitHub.PrivateKeyFile = "key.pem" }, []wantProblem{{"github.private_key_file", `"key.pem" is not an absolute path`}}},
		{"api url required", func(c *Config) { c.GitHub.APIURL = "" }, []wantProblem{{"github.api_url", "required"}}},
		{"api url without scheme", func(c *Config) { c.GitHub.APIURL = "api.github.com" }, []wantProblem{{"github.api_url", `"api.github.com" is not an absolute http(s) URL`}}},
		{"api url ftp", func(c *Config) { c.GitHub.APIURL = "ftp://github.example.com/" }, []wantProblem{{"github.api_url", "is not an absolute http(s) URL"}}},
		{"api url with query", func(c *Config) { c.GitHub.APIURL = "https://github.example.com/api/v3?x=1" }, []wantProblem{{"github.api_url", "takes no query or fragment"}}},
		{"api url with credentials", func(c *Config) { c.GitHub.APIURL = "https://u:hunter2@github.example.com/" }, []wantProblem{{"github.api_url", "not a valid URL without credentials"}}},
		{"GHES api url", func(c *Config) { c.GitHub.APIURL = "https://github.example.com/api/v3/" }, nil},

		// network
		{"network name", func(c *Config) { c.Network.Name = "my net" }, []wantProblem{{"network.name", `"my net" is not a CNI network name`}}},
		{"conf dir relative", func(c *Config) { c.Network.ConfDir = "cni" }, []wantProblem{{"network.conf_dir", "not an absolute path"}}},
		{"bin dirs empty", func(c *Config) { c.Network.BinDirs = nil }, []wantProblem{{"network.bin_dirs", "required"}}},
		{"bin dir relative", func(c *Config) { c.Network.BinDirs = []string{"/usr/lib/cni", "bin"} }, []wantProblem{{"network.bin_dirs[1]", "not an absolute path"}}},
		{"bridge required", func(c *Config) { c.Network.Bridge = "" }, []wantProblem{{"network.bridge", "required"}}},
		{"bridge too long", func(c *Config) { c.Network.Bridge = "fireactions-bridge0" }, []wantProblem{{"network.bridge", "is not an interface name: 1 to 15 characters"}}},
		{"subnet not CIDR", func(c *Config) { c.Network.Subnet = "10.200.0.0" }, []wantProblem{{"network.subnet", `"10.200.0.0" is not a CIDR`}}},
		{"subnet host bits", func(c *Config) { c.Network.Subnet = "10.200.0.7/24" }, []wantProblem{{"network.subnet", "has host bits set; write 10.200.0.0/24"}}},
		{"subnet too small", func(c *Config) { c.Network.Subnet = "10.200.0.0/31"; c.Network.Gateway = "10.200.0.1" }, []wantProblem{{"network.subnet", "leaves no room for VMs"}}},
		{"gateway outside", func(c *Config) { c.Network.Gateway = "10.201.0.1" }, []wantProblem{{"network.gateway", "10.201.0.1 is outside network.subnet 10.200.0.0/24"}}},
		{"gateway network address", func(c *Config) { c.Network.Gateway = "10.200.0.0" }, []wantProblem{{"network.gateway", "is the network address of 10.200.0.0/24; use a host address such as 10.200.0.1"}}},
		{"gateway broadcast", func(c *Config) { c.Network.Gateway = "10.200.0.255" }, []wantProblem{{"network.gateway", "is the broadcast address"}}},
		{"gateway not IP", func(c *Config) { c.Network.Gateway = "gw" }, []wantProblem{{"network.gateway", `"gw" is not an IP address`}}},
		{"IPv6 subnet", func(c *Config) { c.Network.Subnet = "fd00:fa::/64"; c.Network.Gateway = "fd00:fa::1" }, nil},
		{"mtu", func(c *Config) { c.Network.MTU = 20 }, []wantProblem{{"network.mtu", "20 is not an MTU"}}},
		{"nameserver", func(c *Config) { c.Network.DNS = []string{"1.1.1.1", "dns.google"} }, []wantProblem{{"network.nameservers[1]", `"dns.google" is not an IP address`}}},

		// registry cache
		{"cache gateway", func(c *Config) { c.RegistryCache.Gateway = "bridge" }, []wantProblem{{"registry_cache.gateway", `"bridge" is not an IP address`}}},
		{"zot port", func(c *Config) { c.RegistryCache.Zot.Port = 70000 }, []wantProblem{{"registry_cache.zot.port", "70000 is not a port"}}},
		{"squid port negative", func(c *Config) { c.RegistryCache.Squid.HTTPPort = -1 }, []wantProblem{{"registry_cache.squid.http_port", "-1 is not a port"}}},
		{"ports collide", func(c *Config) { c.RegistryCache.Squid.HTTPSPort = c.RegistryCache.Squid.HTTPPort },
			[]wantProblem{{"registry_cache.squid.https_port", "port 3128 is also registry_cache.squid.http_port"}}},
		{"zot and squid collide", func(c *Config) { c.RegistryCache.Zot.Port = 3128 },
			[]wantProblem{{"registry_cache.squid.http_port", "port 3128 is also registry_cache.zot.port"}}},
		{"zot storage relative", func(c *Config) { c.RegistryCache.Zot.StorageDir = "zot" }, []wantProblem{{"registry_cache.zot.storage_dir", "not an absolute path"}}},
		{"zot size", func(c *Config) { c.RegistryCache.Zot.MaxSize = 512 << 20 }, []wantProblem{{"registry_cache.zot.max_size", "512MiB is too small; use at least 1GiB"}}},
		{"zot gc", func(c *Config) { c.RegistryCache.Zot.GCInterval = Duration(10 * time.Second) }, []wantProblem{{"registry_cache.zot.gc_interval", "10s is too short"}}},
		{"no mirrors", func(c *Config) { c.RegistryCache.Mirrors = nil }, []wantProblem{{"registry_cache.mirrors", "required"}}},
		{"mirror registry required", func(c *Config) { c.RegistryCache.Mirrors[1].Registry = "" }, []wantProblem{{"registry_cache.mirrors[1].registry", "required"}}},
		{"mirror registry is a URL", func(c *Config) { c.RegistryCache.Mirrors[1].Registry = "https://ghcr.io" },
			[]wantProblem{{"registry_cache.mirrors[1].registry", `"https://ghcr.io" is not a registry host`}}},
		{"mirror registry bad port", func(c *Config) { c.RegistryCache.Mirrors[1].Registry = "ghcr.io:0" }, []wantProblem{{"registry_cache.mirrors[1].registry", "is not a registry host"}}},
		{"mirror registry with port", func(c *Config) {
			c.RegistryCache.Mirrors = append(c.RegistryCache.Mirrors, Mirror{Registry: "registry.example.com:5000", URL: "http://registry.example.com:5000"})
		}, nil},
		{"mirror registry duplicate", func(c *Config) { c.RegistryCache.Mirrors[2].Registry = "ghcr.io" },
			[]wantProblem{{"registry_cache.mirrors[2].registry", `"ghcr.io" is already mirrored by registry_cache.mirrors[1]`}}},
		{"docker hub alias", func(c *Config) { c.RegistryCache.Mirrors[0].Registry = "index.docker.io" }, []wantProblem{{"registry_cache.mirrors[0].registry", "write Docker Hub as docker.io"}}},
		{"mirror url", func(c *Config) { c.RegistryCache.Mirrors[3].URL = "gcr.io" }, []wantProblem{{"registry_cache.mirrors[3].url", "not an absolute http(s) URL"}}},
		{"squid memory", func(c *Config) { c.RegistryCache.Squid.MemoryCache = 1024 }, []wantProblem{{"registry_cache.squid.memory_cache", "1KiB is too small"}}},
		{"squid disk", func(c *Config) { c.RegistryCache.Squid.DiskCache = 10 }, []wantProblem{
			{"registry_cache.squid.disk_cache", "10 is too small"},
			{"registry_cache.squid.max_object_size", "1GiB is larger than disk_cache (10)"},
		}},
		{"squid object size", func(c *Config) { c.RegistryCache.Squid.MaxObjectSize = -1 }, []wantProblem{{"registry_cache.squid.max_object_size", "must be positive"}}},
		{"squid cache dir", func(c *Config) { c.RegistryCache.Squid.CacheDir = "squid" }, []wantProblem{{"registry_cache.squid.cache_dir", "not an absolute path"}}},
		{"bump without CA", func(c *Config) { c.RegistryCache.Squid.BumpDomains = []string{".example.com"} }, []wantProblem{
			{"registry_cache.squid.ca_cert_file", "required when bump_domains is set"},
			{"registry_cache.squid.ca_key_file", "required when bump_domains is set"},
		}},
		{"bump with CA", func(c *Config) {
			c.RegistryCache.Squid.BumpDomains = []string{".example.com", "files.example.org"}
			c.RegistryCache.Squid.CACertFile, c.RegistryCache.Squid.CAKeyFile = "/etc/squid/ca.pem", "/etc/squid/ca.key"
		}, nil},
		{"bump domain invalid", func(c *Config) {
			c.RegistryCache.Squid.BumpDomains = []string{"exa mple.com", "a.com", "a.com"}
			c.RegistryCache.Squid.CACertFile, c.RegistryCache.Squid.CAKeyFile = "/etc/squid/ca.pem", "/etc/squid/ca.key"
		}, []wantProblem{
			{"registry_cache.squid.bump_domains[0]", `"exa mple.com" is not a domain`},
			{"registry_cache.squid.bump_domains[2]", `"a.com" is already listed at bump_domains[1]`},
		}},
		{"CA file relative", func(c *Config) { c.RegistryCache.Squid.CACertFile = "ca.pem" }, []wantProblem{{"registry_cache.squid.ca_cert_file", "not an absolute path"}}},

		// pools
		{"no pools", func(c *Config) { c.Pools = nil }, []wantProblem{{"pools", "required: at least one pool"}}},
		{"pool name required", func(c *Config) { c.Pools[0].Name = "" }, []wantProblem{{"pools[0].name", "required"}}},
		{"pool name upper case", func(c *Config) { c.Pools[0].Name = "Default" }, []wantProblem{{"pools[0].name", `"Default" is not a valid pool name`}}},
		{"pool name leading dash", func(c *Config) { c.Pools[0].Name = "-a" }, []wantProblem{{"pools[0].name", "is not a valid pool name"}}},
		{"pool name underscore", func(c *Config) { c.Pools[0].Name = "a_b" }, []wantProblem{{"pools[0].name", "is not a valid pool name"}}},
		{"pool name 64 characters", func(c *Config) { c.Pools[0].Name = strings.Repeat("a", 64) }, []wantProblem{{"pools[0].name", "at most 63 characters"}}},
		{"pool name 63 characters", func(c *Config) { c.Pools[0].Name = strings.Repeat("a", 63) }, nil},
		{"pool names unique", func(c *Config) { c.Pools[1].Name = "default" }, []wantProblem{{"pools[1].name", `"default" is already the name of pools[0]`}}},
		{"min negative", func(c *Config) { c.Pools[0].MinRunners = -1 }, []wantProblem{{"pools[0].min_runners", "-1 is negative"}}},
		{"max zero", func(c *Config) { c.Pools[0].MaxRunners = 0; c.Pools[0].MinRunners = 0 }, []wantProblem{{"pools[0].max_runners", "required: the most runners the pool may run at once, at least 1"}}},
		{"max negative", func(c *Config) { c.Pools[0].MaxRunners = -2; c.Pools[0].MinRunners = 0 }, []wantProblem{{"pools[0].max_runners", "-2 is negative; use at least 1"}}},
		{"min above max", func(c *Config) { c.Pools[0].MinRunners = 11 }, []wantProblem{{"pools[0].min_runners", "11 is more than max_runners (10)"}}},
		{"min equals max", func(c *Config) { c.Pools[0].MinRunners = 10 }, nil},
		{"pool network", func(c *Config) { c.Pools[1].Network = "not/valid" }, []wantProblem{{"pools[1].network", "is not a CNI network name"}}},

		// runner
		{"name prefix required", func(c *Config) { c.Pools[0].Runner.NamePrefix = "" }, []wantProblem{{"pools[0].runner.name_prefix", "required"}}},
		{"name prefix invalid", func(c *Config) { c.Pools[0].Runner.NamePrefix = "Runner_1" }, []wantProblem{{"pools[0].runner.name_prefix", `"Runner_1" is not a valid name prefix`}}},
		{"name prefix too long", func(c *Config) { c.Pools[0].Runner.NamePrefix = strings.Repeat("r", 41) }, []wantProblem{{"pools[0].runner.name_prefix", "at most 40 characters"}}},
		{"image required", func(c *Config) { c.Pools[0].Runner.Image = "" }, []wantProblem{{"pools[0].runner.image", "required"}}},
		{"image invalid", func(c *Config) { c.Pools[0].Runner.Image = "Ubuntu:Latest!" }, []wantProblem{{"pools[0].runner.image", `"Ubuntu:Latest!" is not an image reference`}}},
		{"image by digest", func(c *Config) {
			c.Pools[0].Runner.Image = "ghcr.io/acme/runner@sha256:" + strings.Repeat("ab", 32)
		}, nil},
		{"pull policy", func(c *Config) { c.Pools[0].Runner.ImagePullPolicy = "Sometimes" },
			[]wantProblem{{"pools[0].runner.image_pull_policy", `"Sometimes" is not allowed; use one of Always, IfNotPresent, Never`}}},
		{"no scope", func(c *Config) { c.Pools[0].Runner.Organization = "" }, []wantProblem{{"pools[0].runner.organization", "required: set exactly one of organization, repository (owner/name) or enterprise"}}},
		{"two scopes", func(c *Config) { c.Pools[0].Runner.Enterprise = "acme" }, []wantProblem{{"pools[0].runner", "set exactly one of organization, repository or enterprise, not several"}}},
		{"enterprise scope", func(c *Config) {
			c.Pools[0].Runner.Organization = ""
			c.Pools[0].Runner.Enterprise = "acme-corp"
			c.GitHub.TokenFile = "/etc/fireactions/github-token"
		}, nil},
		{"organization invalid", func(c *Config) { c.Pools[0].Runner.Organization = "-acme" }, []wantProblem{{"pools[0].runner.organization", `"-acme" is not a GitHub organization name`}}},
		{"repository without owner", func(c *Config) { c.Pools[1].Runner.Repository = "hello" }, []wantProblem{{"pools[1].runner.repository", `"hello" is not a repository; write owner/name`}}},
		{"repository too deep", func(c *Config) { c.Pools[1].Runner.Repository = "a/b/c" }, []wantProblem{{"pools[1].runner.repository", "write owner/name"}}},
		{"enterprise invalid", func(c *Config) { c.Pools[0].Runner.Organization = ""; c.Pools[0].Runner.Enterprise = "a b" },
			[]wantProblem{{"pools[0].runner.enterprise", `"a b" is not an enterprise slug`}}},
		{"group negative", func(c *Config) { c.Pools[0].Runner.GroupID = -1 }, []wantProblem{{"pools[0].runner.group_id", "-1 is negative"}}},
		{"group with organization", func(c *Config) { c.Pools[0].Runner.GroupID = 3 }, nil},
		{"group with repository", func(c *Config) { c.Pools[1].Runner.GroupID = 3 }, []wantProblem{{"pools[1].runner.group_id", "organization and enterprise runners only"}}},
		{"group name", func(c *Config) { c.Pools[0].Runner.Group = "linux" }, nil},
		{"group name and id", func(c *Config) { c.Pools[0].Runner.Group = "linux"; c.Pools[0].Runner.GroupID = 2 },
			[]wantProblem{{"pools[0].runner.group", "set either group (the runner group's name) or group_id, not both"}}},
		{"group name with repository", func(c *Config) { c.Pools[1].Runner.Group = "linux" }, []wantProblem{{"pools[1].runner.group", "organization and enterprise runners only"}}},
		{"group name padded", func(c *Config) { c.Pools[0].Runner.Group = " linux" }, []wantProblem{{"pools[0].runner.group", "surrounding whitespace"}}},
		{"group name in labels mode", func(c *Config) { c.Pools[0].Runner.Group = "linux"; c.Pools[0].Scaling = ScalingLabels },
			[]wantProblem{{"pools[0].runner.group", "works with scaling: scaleset only; in labels mode set group_id"}}},
		{"labels mode with group id", func(c *Config) { c.Pools[0].Runner.GroupID = 4; c.Pools[0].Scaling = ScalingLabels }, nil},
		{"scaling unknown", func(c *Config) { c.Pools[0].Scaling = "webhook" }, []wantProblem{{"pools[0].scaling", `"webhook" is not allowed; use one of scaleset, labels`}}},
		{"vm mode unknown", func(c *Config) { c.Pools[0].VM.Mode = "container" }, []wantProblem{{"pools[0].vm.mode", `"container" is not allowed; use one of system, app`}}},
		{"vm mode app", func(c *Config) { c.Pools[0].VM.Mode = VMModeApp }, nil},
		{"boot timeout too short", func(c *Config) { c.Pools[0].Timeouts.Boot = Duration(time.Millisecond) }, []wantProblem{{"pools[0].timeouts.boot", "too short"}}},
		{"idle ttl negative", func(c *Config) { c.Pools[0].Timeouts.IdleTTL = Duration(-time.Minute) }, []wantProblem{{"pools[0].timeouts.idle_ttl", "negative; use 0 for no limit"}}},
		{"idle ttl tiny", func(c *Config) { c.Pools[0].Timeouts.IdleTTL = Duration(time.Millisecond) }, []wantProblem{{"pools[0].timeouts.idle_ttl", "too short"}}},
		{"idle ttl set", func(c *Config) { c.Pools[0].Timeouts.IdleTTL = Duration(time.Hour) }, nil},
		{"max job negative", func(c *Config) { c.Pools[1].Timeouts.MaxJob = Duration(-time.Hour) }, []wantProblem{{"pools[1].timeouts.max_job", "too short"}}},
		{"labels empty", func(c *Config) { c.Pools[0].Runner.Labels = []string{} }, []wantProblem{{"pools[0].runner.labels", "empty; list at least one label, or leave the key out for the defaults (self-hosted, fireactions)"}}},
		{"label empty", func(c *Config) { c.Pools[0].Runner.Labels = []string{"a", ""} }, []wantProblem{{"pools[0].runner.labels[1]", "empty label"}}},
		{"label comma", func(c *Config) { c.Pools[0].Runner.Labels = []string{"a,b"} }, []wantProblem{{"pools[0].runner.labels[0]", `"a,b" contains a comma`}}},
		{"label space", func(c *Config) { c.Pools[0].Runner.Labels = []string{" a"} }, []wantProblem{{"pools[0].runner.labels[0]", "surrounding whitespace"}}},
		{"label repeated", func(c *Config) { c.Pools[0].Runner.Labels = []string{"Linux", "linux"} }, []wantProblem{{"pools[0].runner.labels[1]", `"linux" repeats labels[0]`}}},

		// vm
		{"backend", func(c *Config) { c.Pools[0].VM.Backend = "kvm" }, []wantProblem{{"pools[0].vm.backend", `"kvm" is not allowed; use one of auto, firecracker, qemu`}}},
		{"vcpus zero", func(c *Config) { c.Pools[0].VM.VCPUs = 0 }, []wantProblem{{"pools[0].vm.vcpus", "0 is out of range; use 1 to 32"}}},
		{"vcpus 33", func(c *Config) { c.Pools[0].VM.VCPUs = 33 }, []wantProblem{{"pools[0].vm.vcpus", "33 is out of range"}}},
		{"vcpus 32", func(c *Config) { c.Pools[0].VM.VCPUs = 32 }, nil},
		{"smt odd vcpus", func(c *Config) { c.Pools[0].VM.SMT = true; c.Pools[0].VM.VCPUs = 3 }, []wantProblem{{"pools[0].vm.smt", "1 or an even number of vcpus"}}},
		{"smt odd vcpus on qemu", func(c *Config) {
			c.Pools[0].VM.SMT = true
			c.Pools[0].VM.VCPUs = 3
			c.Pools[0].VM.Backend = BackendQEMU
		}, nil},
		{"memory small", func(c *Config) { c.Pools[0].VM.MemoryMiB = 64 }, []wantProblem{{"pools[0].vm.memory_mib", "64 is out of range; use 128 to 262144"}}},
		{"memory large", func(c *Config) { c.Pools[0].VM.MemoryMiB = 262145 }, []wantProblem{{"pools[0].vm.memory_mib", "out of range"}}},
		{"cpu template", func(c *Config) { c.Pools[0].VM.CPUTemplate = "T3" }, []wantProblem{{"pools[0].vm.cpu_template", `"T3" is not allowed; use one of "" (none), None, T2, T2S, T2CL, T2A, C3`}}},
		{"cpu template on qemu", func(c *Config) { c.Pools[0].VM.CPUTemplate = "T2"; c.Pools[0].VM.Backend = BackendQEMU },
			[]wantProblem{{"pools[0].vm.cpu_template", "CPU templates are a Firecracker feature"}}},
		{"cpu template on firecracker", func(c *Config) { c.Pools[0].VM.CPUTemplate = "C3"; c.Pools[0].VM.Backend = BackendFirecracker }, nil},
		{"kernel required", func(c *Config) { c.Pools[0].VM.Kernel = "" }, []wantProblem{{"pools[0].vm.kernel", "required"}}},
		{"kernel relative", func(c *Config) { c.Pools[0].VM.Kernel = "vmlinux" }, []wantProblem{{"pools[0].vm.kernel", `"vmlinux" is not an absolute path`}}},
		{"kernel modules relative", func(c *Config) { c.Pools[0].VM.KernelModules = "lib/modules" }, []wantProblem{{"pools[0].vm.kernel_modules", "not an absolute path"}}},
		{"kernel args two lines", func(c *Config) { c.Pools[0].VM.KernelArgs = "console=ttyS0\npanic=1" }, []wantProblem{{"pools[0].vm.kernel_args", "must be one line"}}},
		{"disk small", func(c *Config) { c.Pools[0].VM.DiskSize = 512 << 20 }, []wantProblem{{"pools[0].vm.disk_size", "512MiB is too small; use at least 1GiB"}}},
		{"disk 1GiB", func(c *Config) { c.Pools[0].VM.DiskSize = 1 << 30 }, nil},
		{"metadata keys", func(c *Config) {
			c.Pools[0].VM.Metadata = map[string]string{
				"/abs": "", "dir/": "", "a b": "", "a//b": "", "a/../b": "", "fireactions/runner_id": "", "instance-id": "",
				"tree": "", "tree/leaf": "", "ok/key_1.x": "", "": "",
			}
		}, []wantProblem{
			{`pools[0].vm.metadata[""]`, "empty key"},
			{`pools[0].vm.metadata["/abs"]`, "must not start or end with '/'"},
			{`pools[0].vm.metadata["a b"]`, "must not contain whitespace"},
			{`pools[0].vm.metadata["a/../b"]`, "without empty, '.' or '..' parts"},
			{`pools[0].vm.metadata["a//b"]`, "without empty, '.' or '..' parts"},
			{`pools[0].vm.metadata["dir/"]`, "must not start or end with '/'"},
			{"pools[0].vm.metadata.fireactions/runner_id", "reserved"},
			{"pools[0].vm.metadata.instance-id", "reserved"},
			{"pools[0].vm.metadata.tree", `is a value but "tree/leaf" puts a tree under it`},
		}},
		{"user data cloud-config", func(c *Config) { c.Pools[0].VM.UserData = "#cloud-config\nwrite_files: []\n" }, nil},
		{"user data script", func(c *Config) { c.Pools[0].VM.UserData = "#!/bin/sh\necho hi\n" }, nil},
		{"user data unknown", func(c *Config) { c.Pools[0].VM.UserData = "write_files: []\n" }, []wantProblem{{"pools[0].vm.user_data", "not a cloud-init user-data format"}}},
		{"user data broken YAML", func(c *Config) { c.Pools[0].VM.UserData = "#cloud-config\nwrite_files: [\n" }, []wantProblem{{"pools[0].vm.user_data", "not valid YAML"}}},
		{"user data not a mapping", func(c *Config) { c.Pools[0].VM.UserData = "#cloud-config\n- a\n" }, []wantProblem{{"pools[0].vm.user_data", "must be a YAML mapping"}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := validConfig(t)
			tt.mutate(c)
			checkProblems(t, c.Validate(ValidateOptions{}), tt.want)
		})
	}
}

// TestValidateFiles checks CheckFiles against real files of each kind.
func TestValidateFiles(t *testing.T) {
	genKeys(t)
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	mkdir := func(name string) string {
		p := filepath.Join(dir, name)
		if err := os.Mkdir(p, 0o755); err != nil {
			t.Fatal(err)
		}
		return p
	}
	caCert := func(isCA bool) string {
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
			BasicConstraintsValid: true, IsCA: isCA, KeyUsage: x509.KeyUsageCertSign,
		}
		der, err := x509.CreateCertificate(nil, tmpl, tmpl, &ecKey.PublicKey, ecKey)
		if err != nil {
			t.Fatal(err)
		}
		return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
	}
	ecDER, err := x509.MarshalECPrivateKey(ecKey)
	if err != nil {
		t.Fatal(err)
	}
	files := struct{ key, badKey, token, emptyToken, kernel, modules, ca, notCA, badCA, caKey, badCAKey string }{
		key:        write("app.pem", pkcs1PEM(t)),
		badKey:     write("bad.pem", "not a key\n"),
		token:      write("token", "s3cret\n"),
		emptyToken: write("empty-token", "\n"),
		kernel:     write("vmlinux", "\x7fELF"),
		modules:    mkdir("modules"),
		ca:         write("ca.pem", caCert(true)),
		notCA:      write("leaf.pem", caCert(false)),
		badCA:      write("garbage.pem", "garbage"),
		caKey:      write("ca.key", string(pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: ecDER}))),
		badCAKey:   write("bad-ca.key", "garbage"),
	}
	good := func() *Config {
		c := validConfig(t)
		c.GitHub.PrivateKeyFile = files.key
		c.Server.AuthTokenFile = files.token
		c.RegistryCache.Squid.BumpDomains = []string{".example.com"}
		c.RegistryCache.Squid.CACertFile, c.RegistryCache.Squid.CAKeyFile = files.ca, files.caKey
		for i := range c.Pools {
			c.Pools[i].VM.Kernel = files.kernel
			c.Pools[i].VM.KernelModules = files.modules
		}
		return c
	}
	missing := filepath.Join(dir, "missing")
	tests := []struct {
		name   string
		mutate func(*Config)
		want   []wantProblem
	}{
		{"all present", func(*Config) {}, nil},
		{"key file missing", func(c *Config) { c.GitHub.PrivateKeyFile = missing }, []wantProblem{{"github.private_key_file", missing + " does not exist"}}},
		{"key file garbage", func(c *Config) { c.GitHub.PrivateKeyFile = files.badKey }, []wantProblem{{"github.private_key_file", files.badKey + ": not a PEM private key"}}},
		{"key file is a directory", func(c *Config) { c.GitHub.PrivateKeyFile = files.modules }, []wantProblem{{"github.private_key_file", "is not a regular file"}}},
		{"token file missing", func(c *Config) { c.Server.AuthTokenFile = missing }, []wantProblem{{"server.auth_token_file", "does not exist"}}},
		{"token file empty", func(c *Config) { c.Server.AuthTokenFile = files.emptyToken }, []wantProblem{{"server.auth_token_file", "is empty"}}},
		{"kernel missing", func(c *Config) { c.Pools[1].VM.Kernel = missing }, []wantProblem{{"pools[1].vm.kernel", "does not exist"}}},
		{"kernel is a directory", func(c *Config) { c.Pools[0].VM.Kernel = files.modules }, []wantProblem{{"pools[0].vm.kernel", "is not a regular file"}}},
		{"modules is a file", func(c *Config) { c.Pools[0].VM.KernelModules = files.kernel }, []wantProblem{{"pools[0].vm.kernel_modules", "is not a directory"}}},
		{"CA cert missing", func(c *Config) { c.RegistryCache.Squid.CACertFile = missing }, []wantProblem{{"registry_cache.squid.ca_cert_file", "does not exist"}}},
		{"CA cert garbage", func(c *Config) { c.RegistryCache.Squid.CACertFile = files.badCA }, []wantProblem{{"registry_cache.squid.ca_cert_file", "not a PEM certificate"}}},
		{"CA cert not a CA", func(c *Config) { c.RegistryCache.Squid.CACertFile = files.notCA }, []wantProblem{{"registry_cache.squid.ca_cert_file", "not a CA certificate"}}},
		{"CA key garbage", func(c *Config) { c.RegistryCache.Squid.CAKeyFile = files.badCAKey }, []wantProblem{{"registry_cache.squid.ca_key_file", "not a PEM private key"}}},
		{"CA key is the cert", func(c *Config) { c.RegistryCache.Squid.CAKeyFile = files.ca }, []wantProblem{{"registry_cache.squid.ca_key_file", `a PEM "CERTIFICATE" block is not an unencrypted private key`}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := good()
			tt.mutate(c)
			checkProblems(t, c.Validate(ValidateOptions{CheckFiles: true}), tt.want)
			// Without CheckFiles the same configuration is valid: only the
			// paths' form is checked.
			checkProblems(t, c.Validate(ValidateOptions{}), nil)
		})
	}
}
