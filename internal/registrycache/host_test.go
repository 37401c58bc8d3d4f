package registrycache

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/fireactions/fireactions/internal/config"
)

// squidParse runs the real squid's config check on conf.
func squidParse(t *testing.T, conf []byte) (string, error) {
	t.Helper()
	p := filepath.Join(t.TempDir(), "squid.conf")
	if err := os.WriteFile(p, conf, 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("squid", "-k", "parse", "-f", p).CombinedOutput()
	return string(out), err
}

func needSquid(t *testing.T, bump bool) {
	t.Helper()
	if _, err := exec.LookPath("squid"); err != nil {
		t.Skip("needs squid (Debian squid-openssl) for squid -k parse")
	}
	if bump {
		out, _ := exec.Command("squid", "-v").CombinedOutput()
		if !bytes.Contains(out, []byte("--with-openssl")) {
			t.Skip("needs squid built with OpenSSL for ssl-bump (Debian squid-openssl, not squid)")
		}
	}
}

func squidLines(conf []byte, directive string) []string {
	var out []string
	for _, l := range strings.Split(string(conf), "\n") {
		if strings.HasPrefix(l, directive+" ") {
			out = append(out, l)
		}
	}
	return out
}

func TestSquidConfParsesWithRealSquid(t *testing.T) {
	cases := []struct {
		name string
		bump bool
	}{
		{"splice only, no https interception", false},
		{"bump opt-in domains", true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			needSquid(t, tc.bump)
			dir := t.TempDir()
			cfg := testConfig(t)
			sq := &cfg.RegistryCache.Squid
			sq.Enabled = true
			sq.CacheDir = filepath.Join(dir, "cache")
			sq.MemoryCache = 300 << 20
			sq.DiskCache = 2 << 30
			sq.MaxObjectSize = 512<<20 + 512<<10
			if tc.bump {
				withBump(t, cfg, dir)
			}
			conf := mustHost(t, cfg)[HostSquidConf]
			out, err := squidParse(t, conf)
			if err != nil {
				t.Fatalf("squid -k parse: %v\n%s\n--- config ---\n%s", err, out, conf)
			}
			for _, bad := range []string{"ERROR", "FATAL", "WARNING", "Bungled"} {
				if strings.Contains(out, bad) {
					t.Errorf("squid -k parse reported %s:\n%s", bad, out)
				}
			}

			check := func(directive string, want ...string) {
				t.Helper()
				if got := squidLines(conf, directive); !slices.Equal(got, want) {
					t.Errorf("%s lines = %q, want %q", directive, got, want)
				}
			}
			check("http_port", "http_port "+gw+":3128 intercept", "http_port 127.0.0.1:3128")
			check("cache_mem", "cache_mem 300 MB")
			check("maximum_object_size", "maximum_object_size 524800 KB")
			check("cache_dir", "cache_dir ufs "+sq.CacheDir+" 2048 16 256")
			check("http_access",
				"http_access deny fireactions_metadata",
				"http_access deny fireactions_gateway",
				"http_access allow fireactions_vms",
				"http_access deny all")
			if !bytes.Contains(conf, []byte("acl fireactions_vms src 10.200.0.0/24\n")) ||
				!bytes.Contains(conf, []byte("acl fireactions_metadata dst 169.254.169.254\n")) {
				t.Errorf("ACLs missing:\n%s", conf)
			}
			if tc.bump {
				check("https_port", "https_port "+gw+":3129 intercept ssl-bump tls-cert="+sq.CACertFile+
					" tls-key="+sq.CAKeyFile+" generate-host-certificates=on dynamic_cert_mem_cache_size=4MB")
				check("ssl_bump", "ssl_bump peek step1", "ssl_bump bump fireactions_bump", "ssl_bump splice all")
				check("acl fireactions_bump", "acl fireactions_bump ssl::server_name .npmjs.org example.com")
				check("sslcrtd_program", "sslcrtd_program /usr/lib/squid/security_file_certgen -s "+sq.CacheDir+"-ssl_db -M 4MB")
			} else {
				check("https_port")
				check("ssl_bump")
			}
		})
	}
}

// TestSquidParseCatchesErrors shows the squid check above can fail.
func TestSquidParseCatchesErrors(t *testing.T) {
	needSquid(t, true)
	dir := t.TempDir()
	cfg := testConfig(t)
	withBump(t, cfg, dir)
	conf := mustHost(t, cfg)[HostSquidConf]
	if _, err := squidParse(t, append(append([]byte{}, conf...), "no_such_directive on\n"...)); err == nil {
		t.Error("squid accepted an unknown directive")
	}
	cfg.RegistryCache.Squid.CACertFile = filepath.Join(dir, "missing.pem")
	if _, err := squidParse(t, mustHost(t, cfg)[HostSquidConf]); err == nil {
		t.Error("squid accepted a missing CA certificate")
	}
}

func TestSquidDisabled(t *testing.T) {
	cfg := testConfig(t)
	cfg.RegistryCache.Squid.Enabled = false
	h := mustHost(t, cfg)
	if _, ok := h[HostSquidConf]; ok {
		t.Error("squid.conf rendered with Squid disabled")
	}
	rules := string(h[HostNftables])
	var statements []string
	for _, l := range strings.Split(rules, "\n") {
		if !strings.HasPrefix(strings.TrimSpace(l), "#") {
			statements = append(statements, l)
		}
	}
	for _, word := range []string{"dnat", "redirect", "chain", "tcp dport"} {
		if strings.Contains(strings.Join(statements, "\n"), word) {
			t.Errorf("rules with Squid disabled contain %q:\n%s", word, rules)
		}
	}
	if !strings.Contains(rules, "delete table ip "+NftTable+"\n") {
		t.Errorf("rules with Squid disabled do not clear the table:\n%s", rules)
	}
	keys := make([]string, 0, len(h))
	for k := range h {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	if want := []string{HostNftables, HostZotConfig, HostZotStorage}; !slices.Equal(keys, want) {
		t.Errorf("host files = %v, want %v", keys, want)
	}
}

func TestSquidRenderErrors(t *testing.T) {
	cases := []struct {
		name string
		edit func(*config.Config)
		want string
	}{
		{"ipv6 gateway", func(c *config.Config) { c.RegistryCache.Gateway = "fd00::1" }, "IPv4"},
		{"bad subnet", func(c *config.Config) { c.Network.Subnet = "10.200.0.0" }, "network.subnet"},
		{"bad bridge", func(c *config.Config) { c.Network.Bridge = "a bridge" }, "network.bridge"},
		{"same port as zot", func(c *config.Config) { c.RegistryCache.Squid.HTTPPort = 5000 }, "registry_cache.squid.http_port: 5000 is also registry_cache.zot.port"},
		{"bump without CA", func(c *config.Config) {
			c.RegistryCache.Squid.BumpDomains = []string{"example.com"}
		}, "ca_cert_file and ca_key_file"},
		{"bad domain", func(c *config.Config) {
			c.RegistryCache.Squid.BumpDomains = []string{"Example.com"}
			c.RegistryCache.Squid.CACertFile, c.RegistryCache.Squid.CAKeyFile = "/ca.pem", "/ca.key"
		}, "bump_domains[0]"},
		{"https port clash", func(c *config.Config) {
			c.RegistryCache.Squid.BumpDomains = []string{"example.com"}
			c.RegistryCache.Squid.CACertFile, c.RegistryCache.Squid.CAKeyFile = "/ca.pem", "/ca.key"
			c.RegistryCache.Squid.HTTPSPort = 3128
		}, "https_port: 3128 is also registry_cache.squid.http_port"},
		{"relative cache dir", func(c *config.Config) { c.RegistryCache.Squid.CacheDir = "cache" }, "cache_dir"},
		{"tiny disk cache", func(c *config.Config) { c.RegistryCache.Squid.DiskCache = 1000 }, "disk_cache"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := testConfig(t)
			cfg.RegistryCache.Squid.Enabled = true
			tc.edit(cfg)
			if _, err := Host(cfg); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want it to contain %q", err, tc.want)
			}
		})
	}
}

// nftCheck runs `nft -c` (parse and let the kernel check, apply nothing)
// in a fresh network namespace, so the host's rules are never touched.
func nftCheck(t *testing.T, rules []byte) (string, error) {
	t.Helper()
	if _, err := exec.LookPath("nft"); err != nil {
		t.Skip("needs nft (Debian nftables)")
	}
	if err := exec.Command("unshare", "--net", "--map-root-user", "true").Run(); err != nil {
		t.Skip("needs unshare --net --map-root-user (user and network namespaces) to run nft -c away from the host's rules")
	}
	p := filepath.Join(t.TempDir(), "rules.nft")
	if err := os.WriteFile(p, rules, 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("unshare", "--net", "--map-root-user", "nft", "-c", "-f", p).CombinedOutput()
	return string(out), err
}

func TestNftRulesCheck(t *testing.T) {
	cases := []struct {
		name      string
		squid     bool
		bump      bool
		wantDNATs []string
	}{
		{"squid disabled", false, false, nil},
		{"http only", true, false, []string{"tcp dport 80 dnat to " + gw + ":3128"}},
		{"http and https", true, true, []string{"tcp dport 80 dnat to " + gw + ":3128", "tcp dport 443 dnat to " + gw + ":3129"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := testConfig(t)
			cfg.RegistryCache.Squid.Enabled = tc.squid
			if tc.bump {
				withBump(t, cfg, t.TempDir())
			}
			rules := mustHost(t, cfg)[HostNftables]
			if out, err := nftCheck(t, rules); err != nil {
				t.Fatalf("nft -c: %v\n%s\n--- rules ---\n%s", err, out, rules)
			}
			var dnats []string
			firstDNAT, lastReturn := -1, -1
			for i, l := range strings.Split(string(rules), "\n") {
				l = strings.TrimSpace(l)
				if i, ok := strings.CutPrefix(l, `iifname "fireactions0" ip saddr 10.200.0.0/24 `); ok {
					dnats = append(dnats, i)
				}
				if strings.Contains(l, " dnat ") && firstDNAT < 0 {
					firstDNAT = i
				}
				if strings.Contains(l, " return") {
					lastReturn = i
				}
				if strings.Contains(l, "169.254.169.254") && !strings.Contains(l, "return") {
					t.Errorf("a rule touches the metadata service: %s", l)
				}
			}
			if !slices.Equal(dnats, tc.wantDNATs) {
				t.Errorf("redirects = %q, want %q", dnats, tc.wantDNATs)
			}
			if tc.squid {
				for _, exc := range []string{"ip daddr 169.254.169.254 return", "ip daddr " + gw + " return", "ip daddr 10.200.0.0/24 return"} {
					if !bytes.Contains(rules, []byte(`iifname "fireactions0" `+exc)) {
						t.Errorf("missing exception %q", exc)
					}
				}
				if lastReturn > firstDNAT {
					t.Errorf("an exception comes after a redirect:\n%s", rules)
				}
			}
		})
	}
	// The check can fail.
	if _, err := nftCheck(t, []byte("table ip x {\n chain y {\n  type nat hook prerouting priority dstnat;\n  tcp dport 80 dnat to 10.0.0.1:99999\n }\n}\n")); err == nil {
		t.Error("nft -c accepted a port out of range")
	}
}
