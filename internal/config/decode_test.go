package config

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestParseBase(t *testing.T) {
	c := mustParse(t, baseYAML)
	if got := c.Server.Address; got != "127.0.0.1:8080" {
		t.Errorf("server.address = %q", got)
	}
	if !c.Metrics.Enabled || c.Metrics.Address != "127.0.0.1:8081" {
		t.Errorf("metrics = %+v", c.Metrics)
	}
	if c.GitHub.AppID != 123456 || c.GitHub.PrivateKeyFile != "/etc/fireactions/github-private-key.pem" || c.GitHub.APIURL != DefaultGitHubAPIURL {
		t.Errorf("github = %+v", c.GitHub)
	}
	if len(c.Pools) != 2 {
		t.Fatalf("pools = %d, want 2", len(c.Pools))
	}
	p0, p1 := c.Pools[0], c.Pools[1]
	if p0.Name != "default" || p0.MinRunners != 1 || p0.MaxRunners != 10 {
		t.Errorf("pools[0] = %+v", p0)
	}
	if want := []string{"self-hosted", "fireactions", "linux"}; !reflect.DeepEqual(p0.Runner.Labels, want) {
		t.Errorf("pools[0].runner.labels = %q", p0.Runner.Labels)
	}
	if p0.Runner.Scope() != ScopeOrganization || p0.Runner.ImagePullPolicy != PullIfNotPresent {
		t.Errorf("pools[0].runner = %+v", p0.Runner)
	}
	if p0.VM.VCPUs != 2 || p0.VM.MemoryMiB != 4096 || p0.VM.DiskSize != 20<<30 || p0.VM.Backend != BackendAuto {
		t.Errorf("pools[0].vm = %+v", p0.VM)
	}
	// pools[1] leaves most fields out: the defaults fill them.
	if p1.Runner.Scope() != ScopeRepository || p1.Runner.Repository != "octo/hello" || p1.Runner.NamePrefix != "runner" ||
		p1.Runner.Image != DefaultRunnerImage || !reflect.DeepEqual(p1.Runner.Labels, DefaultLabels) || p1.MinRunners != 0 {
		t.Errorf("pools[1].runner = %+v", p1.Runner)
	}
	if p1.VM.DiskSize != 50<<30 || p1.VM.Kernel != DefaultKernel || p1.VM.KernelArgs != DefaultKernelArgs ||
		!reflect.DeepEqual(p1.VM.Metadata, map[string]string{"team": "infra"}) {
		t.Errorf("pools[1].vm = %+v", p1.VM)
	}
	if c.RegistryCache.Gateway != DefaultGateway || c.RegistryCache.Zot.GCInterval.Std() != 24*time.Hour ||
		!reflect.DeepEqual(c.RegistryCache.Mirrors, DefaultMirrors) {
		t.Errorf("registry_cache = %+v", c.RegistryCache)
	}
}

// TestDecodeErrors breaks the base document in one place each and checks
// every problem reported: its exact path and the key part of its message.
func TestDecodeErrors(t *testing.T) {
	type want struct{ path, msg string }
	tests := []struct {
		name     string
		old, new string
		want     []want
	}{
		{"unknown field with suggestion", "      labels: [", "      lables: [",
			[]want{{"pools[0].runner.lables", "unknown field; did you mean labels?"}}},
		{"transposed letters", "    min_runners: 1", "    min_runenrs: 1",
			[]want{{"pools[0].min_runenrs", "did you mean min_runners?"}}},
		{"prefix of a known key", "      memory_mib: 4096", "      memory: 4096",
			[]want{{"pools[0].vm.memory", "did you mean memory_mib?"}}},
		{"unknown field far from any", "log:\n", "zzzzqq: 1\nlog:\n",
			[]want{{"zzzzqq", "unknown field; known fields are data_dir, server, metrics, log, github, network, registry_cache, pools"}}},
		{"misspelled top-level key", "pools:\n", "pool:\n",
			[]want{{"pool", "did you mean pools?"}, {"pools", "required: at least one pool"}}},
		{"string for an integer", "      vcpus: 8", "      vcpus: two",
			[]want{{"pools[1].vm.vcpus", `want an integer, got "two"`}}},
		{"quoted integer", "      vcpus: 8", `      vcpus: "8"`,
			[]want{{"pools[1].vm.vcpus", `want an integer, got "8"`}}},
		{"float for an integer", "      vcpus: 8", "      vcpus: 2.5",
			[]want{{"pools[1].vm.vcpus", "want an integer, got 2.5"}}},
		{"integer overflow", "    max_runners: 10", "    max_runners: 99999999999999999999",
			[]want{{"pools[0].max_runners", "want an integer, got 99999999999999999999"}}},
		{"list for an integer", "  app_id: 123456", "  app_id: [1]",
			[]want{{"github.app_id", "want an integer, got a list"}}},
		{"yes is not a boolean", "  enabled: true", "  enabled: yes",
			[]want{{"metrics.enabled", `want true or false, got "yes"`}}},
		{"list for a mapping", "server:\n  address: 127.0.0.1:8080", "server: [127.0.0.1:8080]",
			[]want{{"server", "want a mapping, got a list"}}},
		{"scalar for a list", "labels: [self-hosted, fireactions, linux]", "labels: self-hosted",
			[]want{{"pools[0].runner.labels", `want a list, got "self-hosted"`}}},
		{"mapping for a string", "      organization: your-org", "      organization: {name: x}",
			[]want{{"pools[0].runner.organization", "want a string, got a mapping"}}},
		{"list element of the wrong type", "[self-hosted, fireactions, linux]", "[self-hosted, [x]]",
			[]want{{"pools[0].runner.labels[1]", "want a string, got a list"}}},
		{"mapping for a metadata value", "        team: infra", "        team: [infra]",
			[]want{{"pools[1].vm.metadata.team", "want a string, got a list"}}},
		{"bad size", "disk_size: 50GiB", "disk_size: fifty",
			[]want{{"pools[1].vm.disk_size", `"fifty" is not a size`}}},
		{"list for a size", "disk_size: 50GiB", "disk_size: [50]",
			[]want{{"pools[1].vm.disk_size", "want a size such as 20GiB, got a list"}}},
		{"bad duration", "log:\n", "registry_cache:\n  zot:\n    gc_interval: daily\nlog:\n",
			[]want{{"registry_cache.zot.gc_interval", `"daily" is not a duration`}}},
		{"duplicate key", "    min_runners: 1\n", "    min_runners: 1\n    min_runners: 2\n",
			[]want{{"pools[0].min_runners", "duplicate key (first set on line 14)"}}},
		{"duplicate top-level section", "log:\n", "metrics: {}\nlog:\n",
			[]want{{"metrics", "duplicate key (first set on line 3)"}}},
		{"duplicate metadata key", "        team: infra\n", "        team: infra\n        team: ops\n",
			[]want{{"pools[1].vm.metadata.team", "duplicate key"}}},
		{"non-scalar key", "server:\n", "server:\n  ? [a]\n  : b\n",
			[]want{{"server", "a key must be a plain string, got a list"}}},
		{"second document", "        team: infra\n", "        team: infra\n---\nlog: {}\n",
			[]want{{"", "a second YAML document"}}},
		{"syntax error", "log:\n  level: info", "log:\n  level: info\n level: [",
			[]want{{"", "invalid YAML"}}},
		{"merge of a scalar", "    vm:\n      vcpus: 2\n", "    vm:\n      <<: 3\n      vcpus: 2\n",
			[]want{{"pools[0].vm", "a merge key (<<) takes a mapping"}}},
		{"null leaves the default", "log:\n  level: info\n  format: text\n", "log:\n",
			nil},
		{"empty metadata is absent", "        team: infra\n", "        {}\n",
			nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			doc := replace(t, baseYAML, tt.old, tt.new)
			c, err := Parse([]byte(doc))
			if len(tt.want) == 0 {
				if err != nil {
					t.Fatalf("unexpected problems:\n%v", err)
				}
				return
			}
			if c != nil {
				t.Error("Parse returned a config along with problems")
			}
			ps := problemsOf(t, err)
			if len(ps) != len(tt.want) {
				t.Fatalf("got %d problems, want %d:\n%v", len(ps), len(tt.want), err)
			}
			for i, w := range tt.want {
				if ps[i].Path != w.path || !strings.Contains(ps[i].Message, w.msg) {
					t.Errorf("problem %d = %q, want path %q and a message containing %q", i, ps[i].String(), w.path, w.msg)
				}
			}
		})
	}
}

func TestParseDocumentShape(t *testing.T) {
	tests := []struct {
		name, doc string
		want      []string // problem strings, in order
	}{
		{"list at the top", "- a\n- b\n", []string{"the top level must be a mapping of settings (server:, github:, pools:, ...), got a list (line 1)"}},
		{"scalar at the top", "hello\n", []string{`the top level must be a mapping of settings (server:, github:, pools:, ...), got "hello" (line 1)`}},
		{"empty file", "", []string{
			"github.app_id: required: the GitHub App's numeric ID (App settings, About), or only github.token_file for a personal access token",
			"github.private_key: required: set private_key (the App's PEM key inline) or private_key_file (a path to it)",
			"pools: required: at least one pool",
		}},
		{"comments only", "# nothing\n", []string{
			"github.app_id: required: the GitHub App's numeric ID (App settings, About), or only github.token_file for a personal access token",
			"github.private_key: required: set private_key (the App's PEM key inline) or private_key_file (a path to it)",
			"pools: required: at least one pool",
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse([]byte(tt.doc))
			ps := problemsOf(t, err)
			var got []string
			for _, p := range ps {
				got = append(got, p.String())
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("got\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(tt.want, "\n"))
			}
		})
	}
}

// TestProblemsInDocumentOrder checks that decoding and validation problems
// come out together, sorted by where they sit in the file, with lines.
func TestProblemsInDocumentOrder(t *testing.T) {
	doc := baseYAML
	doc = replace(t, doc, "  level: info", "  level: loud")                               // line 7
	doc = replace(t, doc, "    min_runners: 1", "    min_runners: 11")                    // line 14
	doc = replace(t, doc, "      labels: [", "      lables: [")                           // line 21
	doc = replace(t, doc, "      vcpus: 8", "      vcpus: 64")                            // line 33
	doc = replace(t, doc, "  - name: big", "  - name: default")                           // line 26
	doc = replace(t, doc, "      repository: octo/hello", "      repository: octo hello") // line 29
	_, err := Parse([]byte(doc))
	want := strings.Join([]string{
		`log.level: "loud" is not allowed; use one of debug, info, warn, error (line 7)`,
		`pools[0].min_runners: 11 is more than max_runners (10) (line 14)`,
		`pools[0].runner.lables: unknown field; did you mean labels? (line 21)`,
		`pools[1].name: "default" is already the name of pools[0]; pool names must be unique (line 26)`,
		`pools[1].runner.repository: "octo hello" is not a repository; write owner/name (line 29)`,
		`pools[1].vm.vcpus: 64 is out of range; use 1 to 32 (line 31)`,
	}, "\n")
	if err == nil || err.Error() != want {
		t.Errorf("got\n%v\nwant\n%s", err, want)
	}
}

// TestMissingFieldSortsWithItsParent: a problem about an absent field has
// no line of its own; it comes after everything written inside the nearest
// ancestor that is present.
func TestMissingFieldSortsWithItsParent(t *testing.T) {
	doc := replace(t, baseYAML, "      repository: octo/hello\n", "      labels: [x]\n") // pools[1].runner loses its scope
	doc = replace(t, doc, "      vcpus: 8", "      vcpus: 64")
	doc = replace(t, doc, "  app_id: 123456\n", "")
	doc = replace(t, doc, "    min_runners: 1\n", "    min_runners: -1\n")
	_, err := Parse([]byte(doc))
	want := strings.Join([]string{
		"github.app_id: required: the GitHub App's numeric ID (App settings, About), or only github.token_file for a personal access token",
		"pools[0].min_runners: -1 is negative; use 0 or more (line 13)",
		"pools[1].runner.organization: required: set exactly one of organization, repository (owner/name) or enterprise",
		"pools[1].vm.vcpus: 64 is out of range; use 1 to 32 (line 30)",
	}, "\n")
	if err == nil || err.Error() != want {
		t.Errorf("got\n%v\nwant\n%s", err, want)
	}
}

func TestAnchorsAndMergeKeys(t *testing.T) {
	doc := `github:
  app_id: 1
  private_key_file: /k.pem
x-vm: &vm
  vcpus: 4
  memory_mib: 8192
pools:
  - name: a
    max_runners: 1
    runner: &runner
      organization: acme
      labels: &labels [one, two]
    vm:
      <<: *vm
      vcpus: 2
  - name: b
    max_runners: 1
    runner: *runner
    vm:
      <<: [*vm, {disk_size: 30GiB, vcpus: 16}]
`
	_, err := Parse([]byte(doc))
	ps := problemsOf(t, err)
	if len(ps) != 1 || ps[0].Path != "x-vm" || !strings.Contains(ps[0].Message, "unknown field") {
		t.Fatalf("the anchor's home must be a known key; got %v", err)
	}
	// The same document with the anchor defined in a place the schema knows.
	doc = strings.Replace(doc, "x-vm: &vm\n  vcpus: 4\n  memory_mib: 8192\n", "", 1)
	doc = strings.Replace(doc, "    vm:\n      <<: *vm\n", "    vm:\n      <<: &vm {vcpus: 4, memory_mib: 8192}\n", 1)
	c := mustParse(t, doc)
	a, b := c.Pools[0], c.Pools[1]
	if a.VM.VCPUs != 2 || a.VM.MemoryMiB != 8192 {
		t.Errorf("pools[0].vm: explicit keys must win over merged ones: %+v", a.VM)
	}
	if b.VM.VCPUs != 4 || b.VM.MemoryMiB != 8192 || b.VM.DiskSize != 30<<30 {
		t.Errorf("pools[1].vm: the first merge source must win: %+v", b.VM)
	}
	if b.Runner.Organization != "acme" || !reflect.DeepEqual(b.Runner.Labels, []string{"one", "two"}) {
		t.Errorf("pools[1].runner via alias: %+v", b.Runner)
	}
}

func TestHostileDocuments(t *testing.T) {
	// A merge that includes itself must end, and a billion-laughs style
	// fan-out of aliases must be cut off rather than expanded.
	selfMerge := "server: &s\n  <<: *s\n"
	if _, err := Parse([]byte(selfMerge)); err == nil {
		t.Error("self-referencing merge parsed as valid")
	}
	var b strings.Builder
	b.WriteString("pools:\n")
	b.WriteString("  - &p {name: p, max_runners: 1, runner: {organization: o, labels: [" + strings.Repeat("a,", 1000) + "a]}}\n")
	for range 200 {
		b.WriteString("  - *p\n")
	}
	_, err := Parse([]byte(b.String()))
	ps := problemsOf(t, err)
	found := false
	for _, p := range ps {
		found = found || strings.Contains(p.Message, "document too large")
	}
	if !found {
		t.Errorf("a 5 kB document expanding to 200,000 nodes was not cut off: %d problems, first %v", len(ps), ps[0])
	}
}

func TestLoad(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(path, []byte(baseYAML), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if c.Pools[0].Name != "default" {
		t.Errorf("pools[0].name = %q", c.Pools[0].Name)
	}
	// LoadWith checks the named files: the key file does not exist here.
	_, err = LoadWith(path, ValidateOptions{CheckFiles: true})
	ps := problemsOf(t, err)
	if ps[0].Path != "github.private_key_file" || !strings.Contains(ps[0].Message, "does not exist") || ps[0].Line != 11 {
		t.Errorf("got %v", err)
	}
	_, err = Load(filepath.Join(dir, "missing.yaml"))
	if !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Load of a missing file: %v", err)
	}
}

func TestEditDistance(t *testing.T) {
	for _, tt := range []struct {
		a, b string
		d    int
	}{
		{"", "", 0}, {"labels", "labels", 0}, {"lables", "labels", 1}, {"", "abc", 3},
		{"vcpu", "vcpus", 1}, {"kitten", "sitting", 3}, {"ca", "abc", 3},
	} {
		if got := editDistance(tt.a, tt.b); got != tt.d {
			t.Errorf("editDistance(%q, %q) = %d, want %d", tt.a, tt.b, got, tt.d)
		}
	}
}
