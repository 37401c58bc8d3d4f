// Package registrycache renders the registry cache from the configuration:
// what the host runs (Zot's config, the volume that bounds Zot's size,
// Squid's config and the nftables rules that send VM web traffic to it)
// and what every VM is told about it (containerd hosts.toml files, BuildKit
// and Docker daemon configs, the interception CA). The guest side is
// delivered two ways: as cloud-init user-data (write_files only) and as a
// structured GuestConfig that fireactions' own guest agent applies before
// containerd and Docker start.
//
// Layout of the cache: Docker Hub is served at Zot's root (Docker's
// registry-mirrors can only point there), every other registry under
// /<namespace>, where the namespace is the registry host with ':' written
// as '_' (repository names cannot hold ':'): ghcr.io → /ghcr.io,
// registry.local:5000 → /registry.local_5000.
package registrycache

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"regexp"
	"strconv"
	"strings"

	"github.com/fireactions/fireactions/internal/config"
)

// ErrDisabled is returned when the configuration has no registry cache.
var ErrDisabled = errors.New("registry_cache.enabled is false: there is no registry cache to render")

// DockerHub is the name containerd, BuildKit and Docker give Docker Hub.
const DockerHub = "docker.io"

// mirror is one upstream registry as the renderers need it.
type mirror struct {
	// registry is the name images use (docker.io, ghcr.io,
	// registry.local:5000); containerd looks up certs.d/<registry>.
	registry string
	// upstream is the registry's API endpoint, e.g. https://ghcr.io.
	upstream string
	// namespace is where Zot keeps the registry's repositories; empty for
	// Docker Hub, which lives at the root.
	namespace string
}

func (m mirror) dockerHub() bool { return m.namespace == "" }

// layout is the validated, derived view of registry_cache every renderer
// works from.
type layout struct {
	rc      config.RegistryCache
	gateway netip.Addr
	// zot is host:port of the cache, as VMs reach it.
	zot     string
	mirrors []mirror
}

// repoComponent is the grammar of one repository path component in the
// OCI distribution spec.
var repoComponent = regexp.MustCompile(`^[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*$`)

// Namespace returns where Zot keeps the repositories of registry: "" for
// Docker Hub (the cache's root), otherwise the registry host with ':'
// replaced by '_' and lowercased, e.g. registry.local_5000.
func Namespace(registry string) string {
	if registry == DockerHub {
		return ""
	}
	return strings.ToLower(strings.ReplaceAll(registry, ":", "_"))
}

func newLayout(cfg *config.Config) (*layout, error) {
	if cfg == nil {
		return nil, errors.New("no configuration")
	}
	rc := cfg.RegistryCache
	if !rc.Enabled {
		return nil, ErrDisabled
	}
	gw, err := netip.ParseAddr(rc.Gateway)
	if err != nil {
		return nil, fmt.Errorf("registry_cache.gateway: %q is not an IP address; set it to the VM bridge's address (default: network.gateway)", rc.Gateway)
	}
	if err := checkPort("registry_cache.zot.port", rc.Zot.Port); err != nil {
		return nil, err
	}
	l := &layout{
		rc:      rc,
		gateway: gw,
		zot:     net.JoinHostPort(gw.String(), strconv.Itoa(rc.Zot.Port)),
	}
	if len(rc.Mirrors) == 0 {
		return nil, errors.New("registry_cache.mirrors: empty; list the registries to cache (the defaults apply when the key is left out)")
	}
	seen := map[string]int{}
	for i, m := range rc.Mirrors {
		path := fmt.Sprintf("registry_cache.mirrors[%d]", i)
		switch m.Registry {
		case "":
			return nil, fmt.Errorf("%s.registry: empty; write the registry host, e.g. ghcr.io", path)
		case "index.docker.io", "registry-1.docker.io":
			return nil, fmt.Errorf("%s.registry: write Docker Hub as docker.io, the name containerd looks up (its url stays https://registry-1.docker.io)", path)
		}
		ns := Namespace(m.Registry)
		if ns != "" && !validNamespace(ns) {
			return nil, fmt.Errorf("%s.registry: %q is not a registry host; write hostname[:port], e.g. ghcr.io or registry.local:5000", path, m.Registry)
		}
		if j, dup := seen[ns]; dup {
			return nil, fmt.Errorf("%s.registry: %q maps to the same cache namespace as registry_cache.mirrors[%d] (%q); list each registry once", path, m.Registry, j, rc.Mirrors[j].Registry)
		}
		seen[ns] = i
		u, err := url.Parse(m.URL)
		if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" || u.User != nil || u.RawQuery != "" || u.Fragment != "" {
			return nil, fmt.Errorf("%s.url: %q is not a registry URL; write e.g. https://ghcr.io", path, m.URL)
		}
		l.mirrors = append(l.mirrors, mirror{
			registry:  m.Registry,
			upstream:  strings.TrimSuffix(m.URL, "/"),
			namespace: ns,
		})
	}
	return l, nil
}

// validNamespace accepts what Namespace makes of a hostname[:port].
func validNamespace(ns string) bool {
	host, port, hasPort := strings.Cut(ns, "_")
	if hasPort {
		if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 || strconv.Itoa(n) != port {
			return false
		}
	}
	if len(host) > 253 || !repoComponent.MatchString(host) {
		return false
	}
	for _, label := range strings.Split(host, ".") {
		if label == "" || len(label) > 63 || strings.HasPrefix(label, "-") || strings.HasSuffix(label, "-") {
			return false
		}
	}
	return repoComponent.MatchString(ns)
}

func checkPort(path string, p int) error {
	if p < 1 || p > 65535 {
		return fmt.Errorf("%s: %d is not a port; use 1 to 65535", path, p)
	}
	return nil
}

// hasDockerHub reports whether Docker Hub is among the mirrors.
func (l *layout) hasDockerHub() bool {
	for _, m := range l.mirrors {
		if m.dockerHub() {
			return true
		}
	}
	return false
}

// bumping reports whether Squid intercepts TLS for some domains, which is
// when the VMs need to trust the interception CA.
func (l *layout) bumping() bool {
	return l.rc.Squid.Enabled && len(l.rc.Squid.BumpDomains) > 0
}
