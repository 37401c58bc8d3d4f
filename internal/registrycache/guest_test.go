package registrycache

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/BurntSushi/toml"
	"go.yaml.in/yaml/v3"

	"github.com/fireactions/fireactions/internal/config"
)

// containerdHosts mirrors the keys containerd reads from hosts.toml.
type containerdHosts struct {
	Server string `toml:"server"`
	Host   map[string]struct {
		Capabilities []string `toml:"capabilities"`
		OverridePath bool     `toml:"override_path"`
	} `toml:"host"`
}

func decodeTOML(t *testing.T, name, content string, v any) {
	t.Helper()
	md, err := toml.Decode(content, v)
	if err != nil {
		t.Fatalf("%s is not TOML: %v\n%s", name, err, content)
	}
	if u := md.Undecoded(); len(u) > 0 {
		t.Fatalf("%s has keys the reader does not know: %v", name, u)
	}
}

func TestGuestContainerdHosts(t *testing.T) {
	g := mustGuest(t, testConfig(t))
	files := fileMap(g)
	cache := "http://" + gw + ":5000"
	cases := []struct {
		registry, server, host string
		overridePath           bool
	}{
		{"docker.io", "https://registry-1.docker.io", cache, false},
		{"ghcr.io", "https://ghcr.io", cache + "/v2/ghcr.io", true},
		{"quay.io", "https://quay.io", cache + "/v2/quay.io", true},
		{"gcr.io", "https://gcr.io", cache + "/v2/gcr.io", true},
		// containerd looks up certs.d/<host:port>; repository names cannot
		// hold ':', so the namespace writes it as '_'.
		{"registry.local:5000", "https://registry.local:5000", cache + "/v2/registry.local_5000", true},
	}
	for _, tc := range cases {
		p := "/etc/containerd/certs.d/" + tc.registry + "/hosts.toml"
		f, ok := files[p]
		if !ok {
			t.Errorf("no %s", p)
			continue
		}
		if f.Mode != 0o644 {
			t.Errorf("%s: mode %o", p, f.Mode)
		}
		var h containerdHosts
		decodeTOML(t, p, f.Content, &h)
		if h.Server != tc.server {
			t.Errorf("%s: server = %q, want %q", p, h.Server, tc.server)
		}
		if len(h.Host) != 1 {
			t.Errorf("%s: %d hosts, want exactly one (the cache)", p, len(h.Host))
		}
		e, ok := h.Host[tc.host]
		if !ok {
			t.Errorf("%s: no [host.%q]; hosts: %v", p, tc.host, h.Host)
			continue
		}
		if !slices.Equal(e.Capabilities, []string{"pull", "resolve"}) {
			t.Errorf("%s: capabilities = %v, want [pull resolve]", p, e.Capabilities)
		}
		if e.OverridePath != tc.overridePath {
			t.Errorf("%s: override_path = %v, want %v", p, e.OverridePath, tc.overridePath)
		}
		if tc.registry != "docker.io" {
			// The bare cache would answer ghcr.io/foo/bar with Docker
			// Hub's foo/bar.
			if _, bare := h.Host[cache]; bare {
				t.Errorf("%s lists the un-namespaced cache host", p)
			}
			if strings.Contains(f.Content, `"`+cache+`"`) {
				t.Errorf("%s mentions the bare cache host:\n%s", p, f.Content)
			}
		}
	}
	var n int
	for p := range files {
		if strings.HasPrefix(p, ContainerdCertsDir+"/") {
			n++
		}
	}
	if n != len(cases) {
		t.Errorf("%d hosts.toml files, want %d", n, len(cases))
	}
}

type buildkitd struct {
	Registry map[string]struct {
		Mirrors []string `toml:"mirrors"`
		HTTP    bool     `toml:"http"`
	} `toml:"registry"`
}

func TestGuestBuildkit(t *testing.T) {
	files := fileMap(mustGuest(t, testConfig(t)))
	f, ok := files["/etc/buildkit/buildkitd.toml"]
	if !ok {
		t.Fatal("no buildkitd.toml")
	}
	var bk buildkitd
	decodeTOML(t, "buildkitd.toml", f.Content, &bk)
	cache := gw + ":5000"
	want := map[string][]string{
		"docker.io":           {cache},
		"ghcr.io":             {cache + "/ghcr.io"},
		"quay.io":             {cache + "/quay.io"},
		"gcr.io":              {cache + "/gcr.io"},
		"registry.local:5000": {cache + "/registry.local_5000"},
	}
	if len(bk.Registry) != len(want)+1 {
		t.Errorf("registries = %v, want the %d mirrored ones and the cache", bk.Registry, len(want))
	}
	if c := bk.Registry[cache]; !c.HTTP || len(c.Mirrors) != 0 {
		t.Errorf("[registry.%q] = %+v, want http = true and no mirrors", cache, c)
	}
	for reg, mirrors := range want {
		got := bk.Registry[reg]
		if !slices.Equal(got.Mirrors, mirrors) || got.HTTP {
			t.Errorf("[registry.%q] = %+v, want mirrors %v", reg, got, mirrors)
			continue
		}
		// BuildKit splits a mirror into host and path and asks for
		// <path.Join("/v2", path)>: that must be the API root containerd
		// is given for the same registry.
		host, p, _ := strings.Cut(mirrors[0], "/")
		if host != cache {
			t.Errorf("%s: mirror host %q, want %q", reg, host, cache)
		}
		var h containerdHosts
		decodeTOML(t, reg, files[path.Join(ContainerdCertsDir, reg, "hosts.toml")].Content, &h)
		root := "http://" + host + path.Join("/v2", p)
		if reg == "docker.io" {
			root = "http://" + host // containerd appends /v2 itself
		}
		if _, ok := h.Host[root]; !ok {
			t.Errorf("%s: BuildKit reaches %s but containerd's hosts.toml lists %v", reg, root, h.Host)
		}
	}
}

func TestGuestDockerDaemonJSON(t *testing.T) {
	files := fileMap(mustGuest(t, testConfig(t)))
	f, ok := files["/etc/docker/daemon.json"]
	if !ok {
		t.Fatal("no daemon.json")
	}
	var d struct {
		RegistryMirrors    []string `json:"registry-mirrors"`
		InsecureRegistries []string `json:"insecure-registries"`
	}
	dec := json.NewDecoder(strings.NewReader(f.Content))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&d); err != nil {
		t.Fatalf("daemon.json: %v\n%s", err, f.Content)
	}
	if !slices.Equal(d.RegistryMirrors, []string{"http://" + gw + ":5000"}) {
		t.Errorf("registry-mirrors = %v", d.RegistryMirrors)
	}
	if !slices.Equal(d.InsecureRegistries, []string{gw + ":5000"}) {
		t.Errorf("insecure-registries = %v", d.InsecureRegistries)
	}

	// Without Docker Hub among the mirrors Docker has nothing to mirror,
	// and the image's own daemon.json is left alone.
	cfg := testConfig(t)
	cfg.RegistryCache.Mirrors = cfg.RegistryCache.Mirrors[1:]
	if _, ok := fileMap(mustGuest(t, cfg))["/etc/docker/daemon.json"]; ok {
		t.Error("daemon.json rendered without a Docker Hub mirror")
	}
}

func TestGuestCACertificate(t *testing.T) {
	cfg := testConfig(t)
	g := mustGuest(t, cfg)
	if g.UpdateCATrust {
		t.Error("UpdateCATrust without TLS interception")
	}
	if _, ok := fileMap(g)[CACertPath]; ok {
		t.Error("CA written without TLS interception")
	}

	dir := t.TempDir()
	withBump(t, cfg, dir)
	// The CA key may sit in the same file as the certificate; it must never
	// reach a VM.
	certPEM, _ := os.ReadFile(cfg.RegistryCache.Squid.CACertFile)
	keyPEM, _ := os.ReadFile(cfg.RegistryCache.Squid.CAKeyFile)
	both := filepath.Join(dir, "both.pem")
	if err := os.WriteFile(both, append(append([]byte{}, keyPEM...), certPEM...), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg.RegistryCache.Squid.CACertFile = both
	g = mustGuest(t, cfg)
	if !g.UpdateCATrust {
		t.Error("UpdateCATrust is false with TLS interception on")
	}
	files := fileMap(g)
	for _, p := range []string{CACertPath, CACertGoPath} {
		f, ok := files[p]
		if !ok {
			t.Errorf("no %s", p)
			continue
		}
		if f.Content != string(certPEM) {
			t.Errorf("%s = %q, want the CA certificate", p, f.Content)
		}
		if strings.Contains(f.Content, "PRIVATE KEY") {
			t.Errorf("%s carries the CA's private key", p)
		}
	}

	// Squid enabled but no bump domains: nothing to trust.
	cfg.RegistryCache.Squid.BumpDomains = nil
	if mustGuest(t, cfg).UpdateCATrust {
		t.Error("UpdateCATrust without bump domains")
	}
}

type cloudConfig struct {
	WriteFiles []struct {
		Path        string `yaml:"path"`
		Owner       string `yaml:"owner"`
		Permissions string `yaml:"permissions"`
		Encoding    string `yaml:"encoding"`
		Content     string `yaml:"content"`
	} `yaml:"write_files"`
}

func TestUserDataCarriesExactlyTheGuestFiles(t *testing.T) {
	cfg := testConfig(t)
	withBump(t, cfg, t.TempDir())
	ud, err := UserData(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(ud, "#cloud-config\n") {
		t.Fatalf("user-data does not start with #cloud-config:\n%s", ud)
	}
	var top map[string]any
	if err := yaml.Unmarshal([]byte(ud), &top); err != nil {
		t.Fatalf("user-data is not YAML: %v", err)
	}
	if len(top) != 1 || top["write_files"] == nil {
		keys := make([]string, 0, len(top))
		for k := range top {
			keys = append(keys, k)
		}
		t.Fatalf("top-level keys %v, want only write_files (never runcmd or bootcmd)", keys)
	}
	var cc cloudConfig
	dec := yaml.NewDecoder(strings.NewReader(ud))
	dec.KnownFields(true)
	if err := dec.Decode(&cc); err != nil {
		t.Fatal(err)
	}
	g := mustGuest(t, cfg)
	if len(cc.WriteFiles) != len(g.Files) {
		t.Fatalf("%d write_files, want %d", len(cc.WriteFiles), len(g.Files))
	}
	for i, f := range g.Files {
		w := cc.WriteFiles[i]
		content := w.Content
		if w.Encoding == "b64" {
			raw, _ := base64.StdEncoding.DecodeString(content)
			content = string(raw)
		}
		if w.Path != f.Path || content != f.Content || w.Permissions != "0644" || w.Owner != "root:root" {
			t.Errorf("write_files[%d] = %+v, want %s with the guest content", i, w, f.Path)
		}
	}
	again, _ := UserData(cfg)
	if again != ud {
		t.Error("user-data differs between two renders")
	}
}

func TestApplyUserData(t *testing.T) {
	cfg := testConfig(t)
	custom := cfg.Pools[1].VM.UserData
	if err := ApplyUserData(cfg); err != nil {
		t.Fatal(err)
	}
	ud, _ := UserData(cfg)
	if cfg.Pools[0].VM.UserData != ud {
		t.Error("pool without user_data did not get the registry cache's user-data")
	}
	if cfg.Pools[1].VM.UserData != custom {
		t.Error("pool's own user_data was replaced")
	}
	// Applying twice changes nothing.
	if err := ApplyUserData(cfg); err != nil || cfg.Pools[0].VM.UserData != ud {
		t.Errorf("second ApplyUserData: err %v, user-data changed", err)
	}

	off := testConfig(t)
	off.RegistryCache.Enabled = false
	if err := ApplyUserData(off); err != nil {
		t.Fatal(err)
	}
	if off.Pools[0].VM.UserData != "" {
		t.Error("user-data set with the registry cache disabled")
	}

	bad := testConfig(t)
	bad.RegistryCache.Gateway = "nope"
	if err := ApplyUserData(bad); err == nil || bad.Pools[0].VM.UserData != "" {
		t.Errorf("bad config: err %v, user-data %q", err, bad.Pools[0].VM.UserData)
	}
}

func TestGuestConfigJSONAndWriteTree(t *testing.T) {
	cfg := testConfig(t)
	withBump(t, cfg, t.TempDir())
	g := mustGuest(t, cfg)
	data, err := json.Marshal(g)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(data, []byte(`"mode":"0644"`)) || !bytes.Contains(data, []byte(`"update_ca_trust":true`)) {
		t.Errorf("JSON = %s", data)
	}
	back, err := ParseGuestConfig(data)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(back, g) {
		t.Fatal("GuestConfig does not survive JSON")
	}

	root := t.TempDir()
	if err := back.WriteTree(root); err != nil {
		t.Fatal(err)
	}
	for _, f := range g.Files {
		p := filepath.Join(root, f.Path)
		got, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		if string(got) != f.Content {
			t.Errorf("%s differs", f.Path)
		}
		st, _ := os.Stat(p)
		if st.Mode().Perm() != fs.FileMode(f.Mode) {
			t.Errorf("%s: mode %v, want %o", f.Path, st.Mode(), f.Mode)
		}
	}
	// Writing again replaces the files and leaves no temporary files.
	if err := back.WriteTree(root); err != nil {
		t.Fatal(err)
	}
	filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err == nil && strings.HasPrefix(d.Name(), ".") {
			t.Errorf("leftover temporary file %s", p)
		}
		return nil
	})

	for _, bad := range []string{
		`{"files":[{"path":"etc/x","mode":"0644","content":""}]}`,
		`{"files":[{"path":"/etc/../x","mode":"0644","content":""}]}`,
		`{"files":[{"path":"/x","mode":"rw","content":""}]}`,
		`{"files":[{"path":"/x","mode":"01777","content":""}]}`,
		`{"files":[],"unknown":1}`,
		`{"files":[]} {}`,
	} {
		if _, err := ParseGuestConfig([]byte(bad)); err == nil {
			t.Errorf("ParseGuestConfig(%s) accepted it", bad)
		}
	}
}

func TestRenderErrors(t *testing.T) {
	cases := []struct {
		name string
		edit func(*config.Config)
		want string
	}{
		{"disabled", func(c *config.Config) { c.RegistryCache.Enabled = false }, "registry_cache.enabled is false"},
		{"gateway", func(c *config.Config) { c.RegistryCache.Gateway = "gw.local" }, "registry_cache.gateway"},
		{"zot port", func(c *config.Config) { c.RegistryCache.Zot.Port = 70000 }, "registry_cache.zot.port"},
		{"no mirrors", func(c *config.Config) { c.RegistryCache.Mirrors = nil }, "registry_cache.mirrors: empty"},
		{"empty registry", func(c *config.Config) { c.RegistryCache.Mirrors[1].Registry = "" }, "registry_cache.mirrors[1].registry"},
		{"docker hub alias", func(c *config.Config) { c.RegistryCache.Mirrors[0].Registry = "index.docker.io" }, "write Docker Hub as docker.io"},
		{"not a host", func(c *config.Config) { c.RegistryCache.Mirrors[1].Registry = "ghcr.io/org" }, "is not a registry host"},
		{"bad port", func(c *config.Config) { c.RegistryCache.Mirrors[1].Registry = "ghcr.io:99999" }, "is not a registry host"},
		{"same namespace", func(c *config.Config) { c.RegistryCache.Mirrors[2].Registry = "GHCR.io" }, "same cache namespace as registry_cache.mirrors[1]"},
		{"bad url", func(c *config.Config) { c.RegistryCache.Mirrors[1].URL = "ghcr.io" }, "registry_cache.mirrors[1].url"},
		{"url with credentials", func(c *config.Config) { c.RegistryCache.Mirrors[1].URL = "https://u:p@ghcr.io" }, "registry_cache.mirrors[1].url"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := testConfig(t)
			tc.edit(cfg)
			_, gerr := Guest(cfg)
			_, herr := Host(cfg)
			for _, err := range []error{gerr, herr} {
				if err == nil || !strings.Contains(err.Error(), tc.want) {
					t.Errorf("err = %v, want it to contain %q", err, tc.want)
				}
			}
		})
	}
	cfg := testConfig(t)
	cfg.RegistryCache.Enabled = false
	if _, err := Guest(cfg); !errors.Is(err, ErrDisabled) {
		t.Errorf("disabled: err = %v, want ErrDisabled", err)
	}

	bump := testConfig(t)
	withBump(t, bump, t.TempDir())
	bump.RegistryCache.Squid.CACertFile = filepath.Join(t.TempDir(), "missing.pem")
	if _, err := Guest(bump); err == nil || !strings.Contains(err.Error(), "registry_cache.squid.ca_cert_file") {
		t.Errorf("missing CA: err = %v", err)
	}
	notPEM := filepath.Join(t.TempDir(), "ca.pem")
	os.WriteFile(notPEM, []byte("hello"), 0o644)
	bump.RegistryCache.Squid.CACertFile = notPEM
	if _, err := Guest(bump); err == nil || !strings.Contains(err.Error(), "holds no PEM certificate") {
		t.Errorf("CA not PEM: err = %v", err)
	}
}

func TestNamespace(t *testing.T) {
	for in, want := range map[string]string{
		"docker.io":           "",
		"ghcr.io":             "ghcr.io",
		"registry.local:5000": "registry.local_5000",
		"Quay.IO":             "quay.io",
	} {
		if got := Namespace(in); got != want {
			t.Errorf("Namespace(%q) = %q, want %q", in, got, want)
		}
	}
}
