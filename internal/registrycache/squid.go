package registrycache

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"

	"github.com/fireactions/fireactions/internal/config"
)

// MetadataAddress is the link-local address of the VM metadata service
// (Firecracker's MMDS). Nothing here ever redirects or forwards it.
const MetadataAddress = "169.254.169.254"

// SquidCertgen is Debian's helper that mints the certificates Squid
// presents for bumped sites (package squid-openssl).
const SquidCertgen = "/usr/lib/squid/security_file_certgen"

// SquidCertDB is the certificate database Squid's helper keeps next to the
// cache directory. The host initialises it once with
// `security_file_certgen -c -s DIR -M 4MB`.
func SquidCertDB(cacheDir string) string {
	return filepath.Clean(cacheDir) + "-ssl_db"
}

// hostNet is the VM network the host-side rules need.
type hostNet struct {
	bridge string
	subnet netip.Prefix
	gw     netip.Addr
}

var ifaceName = regexp.MustCompile(`^[A-Za-z0-9_.-]{1,15}$`)

// hostNetwork checks what Squid and nftables need: IPv4 throughout, since
// the rules live in an "ip" table.
func (l *layout) hostNetwork(n config.Network) (hostNet, error) {
	if !l.gateway.Is4() {
		return hostNet{}, fmt.Errorf("registry_cache.gateway: %s is not an IPv4 address; the interception rules are IPv4 only", l.gateway)
	}
	if !ifaceName.MatchString(n.Bridge) {
		return hostNet{}, fmt.Errorf("network.bridge: %q is not an interface name (1-15 letters, digits, '_', '.', '-')", n.Bridge)
	}
	p, err := netip.ParsePrefix(n.Subnet)
	if err != nil || !p.Addr().Is4() {
		return hostNet{}, fmt.Errorf("network.subnet: %q is not an IPv4 CIDR such as 10.200.0.0/24", n.Subnet)
	}
	return hostNet{bridge: n.Bridge, subnet: p.Masked(), gw: l.gateway}, nil
}

var domainRE = regexp.MustCompile(`^\.?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)

// squidConf renders squid.conf: intercept ports bound on the gateway, the
// cache sizes, and access for the VM subnet only. HTTPS is intercepted
// only when bump_domains lists something: Squid then peeks at the TLS
// client hello, bumps (decrypts and caches) the listed domains with the
// configured CA and splices (passes through untouched) everything else.
// Without bump domains there is nothing to gain from HTTPS interception,
// so no https_port is rendered and HTTPS goes straight out.
func (l *layout) squidConf(n hostNet) ([]byte, error) {
	sq := l.rc.Squid
	if err := checkPort("registry_cache.squid.http_port", sq.HTTPPort); err != nil {
		return nil, err
	}
	ports := map[int]string{l.rc.Zot.Port: "registry_cache.zot.port"}
	if other, dup := ports[sq.HTTPPort]; dup {
		return nil, fmt.Errorf("registry_cache.squid.http_port: %d is also %s", sq.HTTPPort, other)
	}
	ports[sq.HTTPPort] = "registry_cache.squid.http_port"
	if !filepath.IsAbs(sq.CacheDir) {
		return nil, fmt.Errorf("registry_cache.squid.cache_dir: %q must be an absolute path", sq.CacheDir)
	}
	cacheMiB := int64(sq.DiskCache) >> 20
	if cacheMiB < 1 {
		return nil, fmt.Errorf("registry_cache.squid.disk_cache: %s is too small; use at least 1MiB", sq.DiskCache)
	}
	if sq.MemoryCache < 1<<20 {
		return nil, fmt.Errorf("registry_cache.squid.memory_cache: %s is too small; use at least 1MiB", sq.MemoryCache)
	}
	if sq.MaxObjectSize <= 0 {
		return nil, fmt.Errorf("registry_cache.squid.max_object_size: must be positive, e.g. 1GiB")
	}
	for _, p := range []string{sq.CacheDir, sq.CACertFile, sq.CAKeyFile} {
		if strings.ContainsAny(p, " \t\n\"'") {
			return nil, fmt.Errorf("registry_cache.squid: path %q contains whitespace or quotes, which squid.conf cannot hold", p)
		}
	}

	gw := n.gw.String()
	var b strings.Builder
	b.WriteString("# Rendered by fireactions from registry_cache.squid; do not edit.\n")
	b.WriteString("# Intercepting cache for the VMs' web traffic; nftables redirects it here.\n")
	fmt.Fprintf(&b, "http_port %s intercept\n", net.JoinHostPort(gw, strconv.Itoa(sq.HTTPPort)))
	b.WriteString("# Squid refuses to start without a forward-proxy port (it builds its own\n")
	b.WriteString("# URLs from it); this one is on loopback, out of the VMs' reach.\n")
	fmt.Fprintf(&b, "http_port 127.0.0.1:%d\n", sq.HTTPPort)
	if l.bumping() {
		if err := checkPort("registry_cache.squid.https_port", sq.HTTPSPort); err != nil {
			return nil, err
		}
		if other, dup := ports[sq.HTTPSPort]; dup {
			return nil, fmt.Errorf("registry_cache.squid.https_port: %d is also %s", sq.HTTPSPort, other)
		}
		if sq.CACertFile == "" || sq.CAKeyFile == "" {
			return nil, errors.New("registry_cache.squid: bump_domains needs ca_cert_file and ca_key_file: the CA Squid signs intercepted sites with")
		}
		for i, d := range sq.BumpDomains {
			if !domainRE.MatchString(d) {
				return nil, fmt.Errorf("registry_cache.squid.bump_domains[%d]: %q is not a lowercase domain; write e.g. example.com, or .example.com to include its subdomains", i, d)
			}
		}
		fmt.Fprintf(&b, "https_port %s intercept ssl-bump tls-cert=%s tls-key=%s generate-host-certificates=on dynamic_cert_mem_cache_size=4MB\n",
			net.JoinHostPort(gw, strconv.Itoa(sq.HTTPSPort)), sq.CACertFile, sq.CAKeyFile)
		fmt.Fprintf(&b, "sslcrtd_program %s -s %s -M 4MB\n", SquidCertgen, SquidCertDB(sq.CacheDir))
		b.WriteString("sslcrtd_children 5 startup=1 idle=1\n")
	}
	b.WriteString("\n")
	fmt.Fprintf(&b, "acl fireactions_vms src %s\n", n.subnet)
	fmt.Fprintf(&b, "acl fireactions_metadata dst %s\n", MetadataAddress)
	fmt.Fprintf(&b, "acl fireactions_gateway dst %s\n", gw)
	if l.bumping() {
		b.WriteString("acl step1 at_step SslBump1\n")
		fmt.Fprintf(&b, "acl fireactions_bump ssl::server_name %s\n", strings.Join(sq.BumpDomains, " "))
		b.WriteString("# Read the SNI first, decrypt only the opt-in domains, pass the rest through.\n")
		b.WriteString("ssl_bump peek step1\n")
		b.WriteString("ssl_bump bump fireactions_bump\n")
		b.WriteString("ssl_bump splice all\n")
	}
	b.WriteString("# Never proxy to the metadata service or to the host itself.\n")
	b.WriteString("http_access deny fireactions_metadata\n")
	b.WriteString("http_access deny fireactions_gateway\n")
	b.WriteString("http_access allow fireactions_vms\n")
	b.WriteString("http_access deny all\n")
	b.WriteString("\n")
	fmt.Fprintf(&b, "cache_mem %s\n", squidSize(int64(sq.MemoryCache)))
	fmt.Fprintf(&b, "maximum_object_size %s\n", squidSize(int64(sq.MaxObjectSize)))
	fmt.Fprintf(&b, "cache_dir ufs %s %d 16 256\n", filepath.Clean(sq.CacheDir), cacheMiB)
	b.WriteString("refresh_pattern -i (/cgi-bin/|\\?) 0 0% 0\n")
	b.WriteString("refresh_pattern . 0 20% 4320\n")
	return []byte(b.String()), nil
}

// squidSize writes a byte count in the largest unit Squid reads (its KB
// and MB are binary) that divides it.
func squidSize(n int64) string {
	switch {
	case n%(1<<20) == 0:
		return strconv.FormatInt(n>>20, 10) + " MB"
	case n%(1<<10) == 0:
		return strconv.FormatInt(n>>10, 10) + " KB"
	}
	return strconv.FormatInt(n, 10) + " bytes"
}
