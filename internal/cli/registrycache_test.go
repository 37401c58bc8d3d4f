package cli

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"

	"github.com/fireactions/fireactions/internal/registrycache"
)

// rcConfig writes a configuration with the given registry_cache section
// and returns its path.
func rcConfig(t *testing.T, registryCache string) string {
	t.Helper()
	dir := t.TempDir()
	doc := `github:
  app_id: 42
  private_key_file: /etc/fireactions/github-private-key.pem
pools:
  - name: default
    max_runners: 2
    runner:
      organization: acme
` + registryCache
	p := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(p, []byte(doc), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func rcRun(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	code := Main(args, &out, &errb)
	return code, out.String(), errb.String()
}

func TestRegistryCacheRender(t *testing.T) {
	cfg := rcConfig(t, `registry_cache:
  enabled: true
  squid:
    enabled: true
`)
	out := filepath.Join(t.TempDir(), "out")
	// A stale file from an earlier run must not survive.
	stale := filepath.Join(out, "guest", "etc", "containerd", "certs.d", "old.io", "hosts.toml")
	os.MkdirAll(filepath.Dir(stale), 0o755)
	os.WriteFile(stale, []byte("old"), 0o644)
	keep := filepath.Join(out, "notes.txt")
	os.WriteFile(keep, []byte("mine"), 0o644)

	code, stdout, stderr := rcRun(t, "registry-cache", "render", "-c", cfg, "--out", out)
	if code != 0 {
		t.Fatalf("exit %d\n%s", code, stderr)
	}
	want := []string{
		"guest-config.json",
		"guest/etc/buildkit/buildkitd.toml",
		"guest/etc/containerd/certs.d/docker.io/hosts.toml",
		"guest/etc/containerd/certs.d/gcr.io/hosts.toml",
		"guest/etc/containerd/certs.d/ghcr.io/hosts.toml",
		"guest/etc/containerd/certs.d/quay.io/hosts.toml",
		"guest/etc/docker/daemon.json",
		"guest/user-data",
		"host/nftables/registry-cache.nft",
		"host/squid/squid.conf",
		"host/zot/config.json",
		"host/zot/storage.sh",
	}
	var got []string
	filepath.WalkDir(out, func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() && p != keep {
			rel, _ := filepath.Rel(out, p)
			got = append(got, filepath.ToSlash(rel))
		}
		return nil
	})
	slices.Sort(got)
	if !slices.Equal(got, want) {
		t.Errorf("files =\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	var printed []string
	for _, w := range want {
		printed = append(printed, filepath.Join(out, w))
	}
	if strings.TrimSpace(stdout) != strings.Join(printed, "\n") {
		t.Errorf("stdout =\n%s", stdout)
	}
	if b, _ := os.ReadFile(keep); string(b) != "mine" {
		t.Error("a file outside host/ and guest/ was touched")
	}

	// Contents are what the package renders.
	hosts, _ := os.ReadFile(filepath.Join(out, "guest/etc/containerd/certs.d/ghcr.io/hosts.toml"))
	if !bytes.Contains(hosts, []byte(`[host."http://10.200.0.1:5000/v2/ghcr.io"]`)) {
		t.Errorf("ghcr.io hosts.toml:\n%s", hosts)
	}
	if st, _ := os.Stat(filepath.Join(out, "host/zot/storage.sh")); st.Mode().Perm() != 0o755 {
		t.Errorf("storage.sh mode %v, want 0755", st.Mode())
	}
	ud, _ := os.ReadFile(filepath.Join(out, "guest/user-data"))
	var top map[string]any
	if err := yaml.Unmarshal(ud, &top); err != nil || len(top) != 1 || top["write_files"] == nil {
		t.Errorf("user-data is not write_files only: %v\n%s", err, ud)
	}
	gj, _ := os.ReadFile(filepath.Join(out, "guest-config.json"))
	g, err := registrycache.ParseGuestConfig(gj)
	if err != nil || len(g.Files) != 6 {
		t.Errorf("guest-config.json: %v, %d files", err, len(g.Files))
	}
	for _, f := range g.Files {
		onDisk, _ := os.ReadFile(filepath.Join(out, "guest", f.Path))
		if string(onDisk) != f.Content {
			t.Errorf("guest%s differs from guest-config.json", f.Path)
		}
	}
	var raw map[string]any
	json.Unmarshal(gj, &raw)
	if _, ok := raw["files"]; !ok {
		t.Errorf("guest-config.json = %s", gj)
	}

	// Rendering again gives the same bytes.
	first, _ := os.ReadFile(filepath.Join(out, "host/zot/config.json"))
	if code, _, stderr := rcRun(t, "registry-cache", "render", "-c", cfg, "--out", out); code != 0 {
		t.Fatalf("second run: exit %d: %s", code, stderr)
	}
	second, _ := os.ReadFile(filepath.Join(out, "host/zot/config.json"))
	if !bytes.Equal(first, second) {
		t.Error("zot config differs between runs")
	}
}

func TestRegistryCacheRenderFailures(t *testing.T) {
	out := t.TempDir()
	disabled := rcConfig(t, "")
	code, _, stderr := rcRun(t, "registry-cache", "render", "-c", disabled, "--out", out)
	if code != 1 || !strings.Contains(stderr, "registry_cache.enabled is false") {
		t.Errorf("disabled: exit %d, stderr %q", code, stderr)
	}
	if entries, _ := os.ReadDir(out); len(entries) != 0 {
		t.Errorf("disabled run wrote %d entries", len(entries))
	}

	code, _, stderr = rcRun(t, "registry-cache", "render", "-c", disabled)
	if code != 1 || !strings.Contains(stderr, "--out") {
		t.Errorf("no --out: exit %d, stderr %q", code, stderr)
	}

	broken := rcConfig(t, "registry_cache:\n  enabled: true\n  mirrors:\n    - registry: index.docker.io\n      url: https://registry-1.docker.io\n")
	code, _, stderr = rcRun(t, "registry-cache", "render", "-c", broken, "--out", out)
	if code != 1 || !strings.Contains(stderr, "registry_cache.mirrors[0].registry") {
		t.Errorf("bad mirror: exit %d, stderr %q", code, stderr)
	}

	code, _, stderr = rcRun(t, "registry-cache", "render", "-c", filepath.Join(out, "missing.yaml"), "--out", out)
	if code != 1 || !strings.Contains(stderr, "missing.yaml") {
		t.Errorf("missing config: exit %d, stderr %q", code, stderr)
	}
}
