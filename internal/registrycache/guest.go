package registrycache

import (
	"bytes"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strconv"

	"github.com/BurntSushi/toml"

	"github.com/fireactions/fireactions/internal/cloudinit"
	"github.com/fireactions/fireactions/internal/config"
)

// Paths of the files every VM receives.
const (
	// ContainerdCertsDir holds one <registry>/hosts.toml per mirror;
	// containerd reads it on every pull (config_path), so no restart is
	// needed when it appears.
	ContainerdCertsDir = "/etc/containerd/certs.d"
	// BuildkitConfigPath is where a root buildkitd reads its configuration
	// at start.
	BuildkitConfigPath = "/etc/buildkit/buildkitd.toml"
	// DockerConfigPath is dockerd's configuration, read at start.
	DockerConfigPath = "/etc/docker/daemon.json"
	// CACertPath is the interception CA where update-ca-certificates picks
	// it up for the system bundle.
	CACertPath = "/usr/local/share/ca-certificates/fireactions-cache.crt"
	// CACertGoPath is the same CA in /etc/ssl/certs, which Go programs
	// (containerd, dockerd, buildkitd) read file by file without waiting
	// for update-ca-certificates.
	CACertGoPath = "/etc/ssl/certs/fireactions-cache.pem"
)

// FileMode is a permission mode written in JSON as an octal string ("0644").
type FileMode fs.FileMode

// MarshalText writes the mode as four octal digits.
func (m FileMode) MarshalText() ([]byte, error) {
	return []byte(fmt.Sprintf("%#04o", uint32(fs.FileMode(m).Perm()))), nil
}

// UnmarshalText reads an octal mode such as "0644".
func (m *FileMode) UnmarshalText(b []byte) error {
	v, err := strconv.ParseUint(string(b), 8, 32)
	if err != nil || v > 0o777 {
		return fmt.Errorf("mode %q: want octal permission bits such as 0644", b)
	}
	*m = FileMode(v)
	return nil
}

// GuestFile is one file the guest writes.
type GuestFile struct {
	// Path is absolute inside the guest.
	Path string `json:"path"`
	// Mode holds the permission bits.
	Mode FileMode `json:"mode"`
	// Content is written byte for byte, never expanded.
	Content string `json:"content"`
}

// GuestConfig is the registry-cache configuration of one VM, in the form
// fireactions' guest agent applies before containerd, Docker and BuildKit
// start. It is carried in the VM's metadata as JSON.
type GuestConfig struct {
	// Files are written in order, each replacing whatever the image had.
	Files []GuestFile `json:"files"`
	// UpdateCATrust asks the agent to run update-ca-certificates after
	// writing Files, because one of them is the interception CA.
	UpdateCATrust bool `json:"update_ca_trust,omitempty"`
}

// Guest returns what every VM is told about the registry cache. It reads
// the interception CA certificate when Squid bumps TLS for some domains.
func Guest(cfg *config.Config) (GuestConfig, error) {
	l, err := newLayout(cfg)
	if err != nil {
		return GuestConfig{}, err
	}
	var g GuestConfig
	add := func(p, content string) {
		g.Files = append(g.Files, GuestFile{Path: p, Mode: 0o644, Content: content})
	}
	for _, m := range l.mirrors {
		hosts, err := l.containerdHosts(m)
		if err != nil {
			return GuestConfig{}, err
		}
		add(path.Join(ContainerdCertsDir, m.registry, "hosts.toml"), hosts)
	}
	bk, err := l.buildkitConfig()
	if err != nil {
		return GuestConfig{}, err
	}
	add(BuildkitConfigPath, bk)
	if l.hasDockerHub() {
		dj, err := l.dockerConfig()
		if err != nil {
			return GuestConfig{}, err
		}
		add(DockerConfigPath, dj)
	}
	if l.bumping() {
		ca, err := readCACert(l.rc.Squid.CACertFile)
		if err != nil {
			return GuestConfig{}, err
		}
		add(CACertPath, ca)
		add(CACertGoPath, ca)
		g.UpdateCATrust = true
	}
	return g, nil
}

// hostsFile is containerd's hosts.toml.
type hostsFile struct {
	Server string               `toml:"server"`
	Host   map[string]hostEntry `toml:"host"`
}

type hostEntry struct {
	Capabilities []string `toml:"capabilities"`
	OverridePath bool     `toml:"override_path,omitempty"`
}

// containerdHosts renders certs.d/<registry>/hosts.toml. Docker Hub's
// repositories sit at the cache's root, so the cache is an ordinary mirror.
// Every other registry is served only through its namespace with
// override_path, and the bare cache host is never listed: listing it would
// let ghcr.io/foo/bar be answered with Docker Hub's foo/bar. When the cache
// fails, containerd falls back to server, the upstream registry.
func (l *layout) containerdHosts(m mirror) (string, error) {
	cache := "http://" + l.zot
	e := hostEntry{Capabilities: []string{"pull", "resolve"}}
	if !m.dockerHub() {
		cache += "/v2/" + m.namespace
		e.OverridePath = true
	}
	var b bytes.Buffer
	fmt.Fprintf(&b, "# Rendered by fireactions: pull %s images through the registry cache at %s.\n", m.registry, l.zot)
	if err := toml.NewEncoder(&b).Encode(hostsFile{Server: m.upstream, Host: map[string]hostEntry{cache: e}}); err != nil {
		return "", fmt.Errorf("render hosts.toml for %s: %w", m.registry, err)
	}
	return b.String(), nil
}

type buildkitFile struct {
	Registry map[string]buildkitRegistry `toml:"registry"`
}

type buildkitRegistry struct {
	Mirrors []string `toml:"mirrors,omitempty"`
	HTTP    bool     `toml:"http,omitempty"`
}

// buildkitConfig renders buildkitd.toml. BuildKit takes a mirror as
// host[:port][/path] and prefixes the path with /v2, so "GW:5000/ghcr.io"
// reaches the cache's ghcr.io namespace. Whether a mirror speaks plain HTTP
// is read from the [registry."<mirror host>"] section.
func (l *layout) buildkitConfig() (string, error) {
	f := buildkitFile{Registry: map[string]buildkitRegistry{
		l.zot: {HTTP: true},
	}}
	for _, m := range l.mirrors {
		target := l.zot
		if !m.dockerHub() {
			target += "/" + m.namespace
		}
		f.Registry[m.registry] = buildkitRegistry{Mirrors: []string{target}}
	}
	var b bytes.Buffer
	b.WriteString("# Rendered by fireactions: pull through the registry cache at " + l.zot + ".\n")
	if err := toml.NewEncoder(&b).Encode(f); err != nil {
		return "", fmt.Errorf("render buildkitd.toml: %w", err)
	}
	return b.String(), nil
}

type dockerFile struct {
	RegistryMirrors    []string `json:"registry-mirrors"`
	InsecureRegistries []string `json:"insecure-registries"`
}

// dockerConfig renders daemon.json. Docker's registry-mirrors only ever
// applies to Docker Hub; images from other registries are pulled directly
// by dockerd (containerd's hosts.toml covers them for containerd clients).
func (l *layout) dockerConfig() (string, error) {
	out, err := json.MarshalIndent(dockerFile{
		RegistryMirrors:    []string{"http://" + l.zot},
		InsecureRegistries: []string{l.zot},
	}, "", "  ")
	if err != nil {
		return "", fmt.Errorf("render daemon.json: %w", err)
	}
	return string(out) + "\n", nil
}

func readCACert(p string) (string, error) {
	if p == "" {
		return "", errors.New("registry_cache.squid.ca_cert_file: required when bump_domains is set: the CA certificate the VMs must trust")
	}
	data, err := os.ReadFile(p)
	if err != nil {
		return "", fmt.Errorf("registry_cache.squid.ca_cert_file: %w", err)
	}
	var certs []byte
	rest := data
	for {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			// The CA's key may share the file; it must never reach a VM.
			continue
		}
		if _, err := x509.ParseCertificate(block.Bytes); err != nil {
			return "", fmt.Errorf("registry_cache.squid.ca_cert_file: %s: %w", p, err)
		}
		certs = append(certs, pem.EncodeToMemory(block)...)
	}
	if len(certs) == 0 {
		return "", fmt.Errorf("registry_cache.squid.ca_cert_file: %s holds no PEM certificate", p)
	}
	return string(certs), nil
}

// UserData returns cloud-init user-data that writes exactly the guest
// files: a #cloud-config document with write_files only.
func UserData(cfg *config.Config) (string, error) {
	g, err := Guest(cfg)
	if err != nil {
		return "", err
	}
	out, err := g.CloudConfig().Render()
	if err != nil {
		return "", fmt.Errorf("render user-data: %w", err)
	}
	return string(out), nil
}

// CloudConfig returns the guest files as cloud-init write_files entries.
func (g GuestConfig) CloudConfig() cloudinit.Config {
	var c cloudinit.Config
	for _, f := range g.Files {
		c.WriteFiles = append(c.WriteFiles, cloudinit.File{
			Path:        f.Path,
			Content:     f.Content,
			Permissions: fs.FileMode(f.Mode),
			Owner:       "root:root",
		})
	}
	return c
}

// ApplyUserData gives every pool without user-data the registry cache's
// user-data, when the cache is enabled. Pools that set user_data keep it
// untouched. The bootstrap and the daemon both call it.
func ApplyUserData(cfg *config.Config) error {
	if cfg == nil || !cfg.RegistryCache.Enabled {
		return nil
	}
	ud, err := UserData(cfg)
	if err != nil {
		return err
	}
	for i := range cfg.Pools {
		if cfg.Pools[i].VM.UserData == "" {
			cfg.Pools[i].VM.UserData = ud
		}
	}
	return nil
}

// ParseGuestConfig decodes a GuestConfig (e.g. from VM metadata), rejecting
// unknown fields and paths that are not absolute and clean.
func ParseGuestConfig(data []byte) (GuestConfig, error) {
	var g GuestConfig
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&g); err != nil {
		return GuestConfig{}, fmt.Errorf("registry-cache guest config: %w", err)
	}
	if dec.More() {
		return GuestConfig{}, errors.New("registry-cache guest config: trailing data after the JSON object")
	}
	for i, f := range g.Files {
		if !path.IsAbs(f.Path) || path.Clean(f.Path) != f.Path {
			return GuestConfig{}, fmt.Errorf("registry-cache guest config: files[%d].path %q is not absolute and clean", i, f.Path)
		}
	}
	return g, nil
}

// WriteTree writes every file under root (root "/" applies the config to
// the running system). Parent directories are created 0755; each file is
// written to a temporary name and renamed, so a reader never sees half a
// file.
func (g GuestConfig) WriteTree(root string) error {
	for _, f := range g.Files {
		if !path.IsAbs(f.Path) || path.Clean(f.Path) != f.Path {
			return fmt.Errorf("write %s: path is not absolute and clean", f.Path)
		}
		dst := filepath.Join(root, filepath.FromSlash(f.Path))
		if err := writeFileAtomic(dst, []byte(f.Content), fs.FileMode(f.Mode).Perm()); err != nil {
			return err
		}
	}
	return nil
}

func writeFileAtomic(dst string, data []byte, mode fs.FileMode) error {
	dir := filepath.Dir(dst)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("write %s: %w", dst, err)
	}
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(dst)+".*")
	if err != nil {
		return fmt.Errorf("write %s: %w", dst, err)
	}
	name := tmp.Name()
	_, werr := tmp.Write(data)
	if werr == nil {
		werr = tmp.Chmod(mode)
	}
	if cerr := tmp.Close(); werr == nil {
		werr = cerr
	}
	if werr == nil {
		werr = os.Rename(name, dst)
	}
	if werr != nil {
		os.Remove(name)
		return fmt.Errorf("write %s: %w", dst, werr)
	}
	return nil
}
