package bootstrap

import (
	"bytes"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/fireactions/fireactions/internal/config"
	"github.com/fireactions/fireactions/internal/registrycache"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/golden")

// seedDir holds the seed document's example pools.json (verbatim), a fixed
// App ID and a throwaway test RSA key, so golden files are stable.
const seedDir = "testdata/seed"

// fixtureKey is the PEM block of the test key without the file's
// "TEST FIXTURE" preamble, which the bootstrap must drop.
func fixtureKey(t testing.TB) string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(seedDir, FilePrivateKey))
	if err != nil {
		t.Fatal(err)
	}
	i := bytes.Index(data, []byte("-----BEGIN"))
	if i <= 0 {
		t.Fatal("test key fixture lost its preamble or its PEM block")
	}
	return string(data[i:])
}

// seedInputs copies the seed fixture into a fresh directory the test may
// edit.
func seedInputs(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	for _, name := range []string{FileAppID, FilePrivateKey, FilePools} {
		data, err := os.ReadFile(filepath.Join(seedDir, name))
		if err != nil {
			t.Fatal(err)
		}
		writeFile(t, dir, name, string(data))
	}
	return dir
}

func writeFile(t *testing.T, dir, name, content string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}

// wantSeedConfig is the configuration the seed's example must produce with
// no environment: every field spelled out, so a changed default shows up
// here and in docs/operations.md together.
func wantSeedConfig(t *testing.T) *config.Config {
	return &config.Config{
		Server:  config.Server{Address: "127.0.0.1:8080", DrainTimeout: config.DefaultDrainTimeout},
		Metrics: config.Metrics{Enabled: true, Address: "127.0.0.1:8081"},
		Log:     config.Log{Level: "info", Format: "text"},
		GitHub: config.GitHub{
			AppID:      123456,
			PrivateKey: config.Secret(fixtureKey(t)),
			APIURL:     "https://api.github.com/",
		},
		Network: config.Network{
			Name:    "fireactions",
			ConfDir: "/etc/cni/conf.d",
			BinDirs: []string{"/usr/lib/cni", "/opt/cni/bin"},
			Bridge:  "fireactions0",
			Subnet:  "10.200.0.0/24",
			Gateway: "10.200.0.1",
		},
		RegistryCache: config.RegistryCache{
			Enabled: false,
			Gateway: "10.200.0.1",
			Zot: config.Zot{
				Port:       5000,
				StorageDir: "/var/lib/zot",
				MaxSize:    50 << 30,
				GCInterval: config.Duration(24 * time.Hour),
			},
			Mirrors: []config.Mirror{
				{Registry: "docker.io", URL: "https://registry-1.docker.io"},
				{Registry: "ghcr.io", URL: "https://ghcr.io"},
				{Registry: "quay.io", URL: "https://quay.io"},
				{Registry: "gcr.io", URL: "https://gcr.io"},
			},
			Squid: config.Squid{
				Enabled:       false,
				HTTPPort:      3128,
				HTTPSPort:     3129,
				MemoryCache:   256 << 20,
				DiskCache:     10 << 30,
				MaxObjectSize: 1 << 30,
				CacheDir:      "/var/cache/squid",
			},
		},
		Pools: []config.Pool{{
			Name:       "default",
			Scaling:    config.ScalingScaleSet,
			MinRunners: 1,
			MaxRunners: 10,
			Timeouts:   config.Timeouts{Boot: config.DefaultBootTimeout, MaxJob: config.DefaultMaxJob},
			Runner: config.Runner{
				NamePrefix:      "runner",
				Image:           "ghcr.io/thpham/fireactions-images/ubuntu-24.04:latest",
				ImagePullPolicy: config.PullIfNotPresent,
				Organization:    "your-org",
				Labels:          []string{"self-hosted", "fireactions", "linux"},
			},
			VM: config.VM{
				Mode:       config.VMModeSystem,
				Backend:    config.BackendAuto,
				VCPUs:      2,
				MemoryMiB:  4096,
				Kernel:     "/var/lib/fireactions/kernels/vmlinux",
				KernelArgs: "console=ttyS0 reboot=k panic=1 pci=off",
				DiskSize:   20 << 30,
			},
		}},
	}
}

// cacheInputs turn the registry cache on the way the seed's Nix wrapper
// does, with each ZOT_MIRRORS value form: an object with a url, a URL
// string, and an object without url (default upstream).
func cacheInputs(dir string) Inputs {
	return Inputs{
		Dir:                  dir,
		KernelPath:           "/opt/fireactions/vmlinux",
		RegistryCacheEnabled: "true",
		RegistryCacheGateway: "10.200.0.1",
		ZotPort:              "5001",
		ZotMirrors: `{"ghcr.io": {"url": "https://ghcr.io"}, "docker.io": {"url": "https://registry-1.docker.io"},
			"quay.io": "https://quay.io", "registry.example.com:5443": {}}`,
	}
}

func wantCacheConfig(t *testing.T) *config.Config {
	c := wantSeedConfig(t)
	c.RegistryCache.Enabled = true
	c.RegistryCache.Zot.Port = 5001
	c.RegistryCache.Mirrors = []config.Mirror{ // sorted by registry
		{Registry: "docker.io", URL: "https://registry-1.docker.io"},
		{Registry: "ghcr.io", URL: "https://ghcr.io"},
		{Registry: "quay.io", URL: "https://quay.io"},
		{Registry: "registry.example.com:5443", URL: "https://registry.example.com:5443"},
	}
	c.Pools[0].VM.Kernel = "/opt/fireactions/vmlinux"
	// The VMs get the registry cache's user-data, rendered from the
	// expected settings above.
	ud, err := registrycache.UserData(c)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"#cloud-config\n", "/etc/containerd/certs.d/ghcr.io/hosts.toml", "10.200.0.1:5001"} {
		if !strings.Contains(ud, want) {
			t.Fatalf("registry cache user-data lacks %q:\n%s", want, ud)
		}
	}
	c.Pools[0].VM.UserData = ud
	return c
}

func TestGolden(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   Inputs
		want func(*testing.T) *config.Config
	}{
		{"seed", Inputs{Dir: seedDir}, wantSeedConfig},
		{"seed-registry-cache", cacheInputs(seedDir), wantCacheConfig},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := Generate(tc.in)
			if err != nil {
				t.Fatalf("Generate: %v", err)
			}
			compareConfig(t, cfg, tc.want(t))

			data, err := config.Marshal(cfg)
			if err != nil {
				t.Fatal(err)
			}
			golden := filepath.Join("testdata", "golden", tc.name+".yaml")
			if *update {
				if err := os.WriteFile(golden, data, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (run go test -update to create it)", err)
			}
			if !bytes.Equal(data, want) {
				t.Errorf("output differs from %s (go test -update rewrites it):\n%s", golden, data)
			}

			// The key and the user-data stay block literals, verbatim.
			if lit := literalBlock("private_key", 2, fixtureKey(t)); !bytes.Contains(data, []byte(lit)) {
				t.Errorf("private_key is not the fixture key as a block literal; want\n%s\nin\n%s", lit, data)
			}
			for i, p := range cfg.Pools {
				if p.VM.UserData == "" {
					continue
				}
				if lit := literalBlock("user_data", 6, p.VM.UserData); !bytes.Contains(data, []byte(lit)) {
					t.Errorf("pools[%d].vm.user_data is not a block literal; want\n%s\nin\n%s", i, lit, data)
				}
			}

			// Round trip through the daemon's strict decoder.
			parsed, err := config.Parse(data)
			if err != nil {
				t.Fatalf("config.Parse of the output: %v", err)
			}
			compareConfig(t, parsed, cfg)
			again, err := config.Marshal(parsed)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(again, data) {
				t.Errorf("Marshal(Parse(output)) differs from output:\n%s", again)
			}
		})
	}
}

// literalBlock is how YAML writes key: value as a "|" block literal at the
// given indentation (value ends with one newline; empty lines stay empty).
func literalBlock(key string, indent int, value string) string {
	pad := strings.Repeat(" ", indent)
	var b strings.Builder
	b.WriteString(pad + key + ": |\n")
	for _, line := range strings.Split(strings.TrimSuffix(value, "\n"), "\n") {
		if line != "" {
			b.WriteString(pad + "  " + line)
		}
		b.WriteString("\n")
	}
	return b.String()
}

// compareConfig reports every field that differs, by its Go path.
func compareConfig(t *testing.T, got, want *config.Config) {
	t.Helper()
	var diffs []string
	diffValue("Config", reflect.ValueOf(*got), reflect.ValueOf(*want), &diffs)
	for _, d := range diffs {
		t.Error(d)
	}
}

func diffValue(path string, got, want reflect.Value, diffs *[]string) {
	switch got.Kind() {
	case reflect.Struct:
		for i := 0; i < got.NumField(); i++ {
			diffValue(path+"."+got.Type().Field(i).Name, got.Field(i), want.Field(i), diffs)
		}
	case reflect.Slice:
		if got.IsNil() != want.IsNil() || got.Len() != want.Len() {
			*diffs = append(*diffs, fmt.Sprintf("%s: got %#v, want %#v", path, got.Interface(), want.Interface()))
			return
		}
		for i := 0; i < got.Len(); i++ {
			diffValue(fmt.Sprintf("%s[%d]", path, i), got.Index(i), want.Index(i), diffs)
		}
	default:
		if !reflect.DeepEqual(got.Interface(), want.Interface()) {
			g, w := got.Interface(), want.Interface()
			if s, ok := g.(config.Secret); ok { // show the difference, not the key
				g, w = fmt.Sprintf("secret of %d bytes", len(s)), fmt.Sprintf("secret of %d bytes", len(w.(config.Secret)))
			}
			*diffs = append(*diffs, fmt.Sprintf("%s: got %#v, want %#v", path, g, w))
		}
	}
}

// The pools.json extensions land in the right config fields, and defaults
// of the seed fill what is left out.
func TestExtensions(t *testing.T) {
	dir := seedInputs(t)
	writeFile(t, dir, FilePools, `[
  {"name": "repo-pool", "minRunners": 0, "maxRunners": 3,
   "runner": {"repository": "octo/hello", "labels": ["gpu"]},
   "firecracker": {"backend": "qemu", "diskSize": "8GiB", "kernelModules": "/opt/modules",
                   "metadata": {"team": "infra", "a.b/c": "d"}}},
  {"name": "ent", "runner": {"enterprise": "acme", "groupId": 7, "imagePullPolicy": "Always", "name": "ent-runner"},
   "firecracker": {"diskSize": 10737418240, "kernelArgs": null}},
  {"runner": {"organization": "acme"}}
]`)
	writeFile(t, dir, FileBindAddress, " 0.0.0.0:9090\n")
	writeFile(t, dir, FileAuthToken, "s3cret-token\n")
	writeFile(t, dir, FileLogLevel, "DEBUG\n")
	cfg, err := Generate(Inputs{Dir: dir})
	if err != nil {
		t.Fatalf("Generate: %v", err)
	}
	if got, want := cfg.Server, (config.Server{Address: "0.0.0.0:9090", AuthTokenFile: filepath.Join(dir, FileAuthToken), DrainTimeout: config.DefaultDrainTimeout}); got != want {
		t.Errorf("server = %+v, want %+v", got, want)
	}
	if cfg.Log.Level != "debug" {
		t.Errorf("log.level = %q, want debug", cfg.Log.Level)
	}
	defaultTimeouts := config.Timeouts{Boot: config.DefaultBootTimeout, MaxJob: config.DefaultMaxJob}
	want := []config.Pool{
		{
			Name: "repo-pool", Scaling: config.ScalingScaleSet, MinRunners: 0, MaxRunners: 3, Timeouts: defaultTimeouts,
			Runner: config.Runner{NamePrefix: "runner", Image: config.DefaultRunnerImage, ImagePullPolicy: config.PullIfNotPresent,
				Repository: "octo/hello", Labels: []string{"gpu"}},
			VM: config.VM{Mode: config.VMModeSystem, Backend: config.BackendQEMU, VCPUs: 2, MemoryMiB: 2048, Kernel: config.DefaultKernel,
				KernelModules: "/opt/modules", KernelArgs: config.DefaultKernelArgs, DiskSize: 8 << 30,
				Metadata: map[string]string{"team": "infra", "a.b/c": "d"}},
		},
		{
			Name: "ent", Scaling: config.ScalingScaleSet, MinRunners: 1, MaxRunners: 10, Timeouts: defaultTimeouts,
			Runner: config.Runner{NamePrefix: "ent-runner", Image: config.DefaultRunnerImage, ImagePullPolicy: config.PullAlways,
				Enterprise: "acme", GroupID: 7, Labels: []string{"self-hosted", "fireactions"}},
			VM: config.VM{Mode: config.VMModeSystem, Backend: config.BackendAuto, VCPUs: 2, MemoryMiB: 2048, Kernel: config.DefaultKernel,
				KernelArgs: config.DefaultKernelArgs, DiskSize: 10 << 30},
		},
		{
			Name: "default", Scaling: config.ScalingScaleSet, MinRunners: 1, MaxRunners: 10, Timeouts: defaultTimeouts,
			Runner: config.Runner{NamePrefix: "runner", Image: config.DefaultRunnerImage, ImagePullPolicy: config.PullIfNotPresent,
				Organization: "acme", Labels: []string{"self-hosted", "fireactions"}},
			VM: config.VM{Mode: config.VMModeSystem, Backend: config.BackendAuto, VCPUs: 2, MemoryMiB: 2048, Kernel: config.DefaultKernel,
				KernelArgs: config.DefaultKernelArgs, DiskSize: 20 << 30},
		},
	}
	var diffs []string
	diffValue("Pools", reflect.ValueOf(cfg.Pools), reflect.ValueOf(want), &diffs)
	for _, d := range diffs {
		t.Error(d)
	}
	data, err := config.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(data, []byte("s3cret-token")) {
		t.Error("the auth token was copied into the configuration; only its path belongs there")
	}
}

// Same inputs, byte-identical output; the file is 0640 in a 0750 directory
// created on demand, and no temporary file is left behind.
func TestRunDeterministic(t *testing.T) {
	out := filepath.Join(t.TempDir(), "run", "fireactions", "config.yaml")
	var outputs [][]byte
	for range 2 {
		if err := Run(cacheInputs(seedDir), out); err != nil {
			t.Fatalf("Run: %v", err)
		}
		data, err := os.ReadFile(out)
		if err != nil {
			t.Fatal(err)
		}
		outputs = append(outputs, data)
	}
	if !bytes.Equal(outputs[0], outputs[1]) {
		t.Errorf("two runs on the same inputs differ:\n%s\n---\n%s", outputs[0], outputs[1])
	}
	st, err := os.Stat(out)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o640 {
		t.Errorf("output mode = %v, want 0640", st.Mode().Perm())
	}
	dst, err := os.Stat(filepath.Dir(out))
	if err != nil {
		t.Fatal(err)
	}
	if dst.Mode().Perm() != 0o750 {
		t.Errorf("created directory mode = %v, want 0750", dst.Mode().Perm())
	}
	entries, err := os.ReadDir(filepath.Dir(out))
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 {
		t.Errorf("output directory holds %d entries, want only config.yaml (temporary file left behind?)", len(entries))
	}
}

// A failed run leaves the previous configuration in place.
func TestRunKeepsOldFileOnError(t *testing.T) {
	dir := seedInputs(t)
	out := filepath.Join(t.TempDir(), "config.yaml")
	if err := Run(Inputs{Dir: dir}, out); err != nil {
		t.Fatal(err)
	}
	before, _ := os.ReadFile(out)
	writeFile(t, dir, FilePools, "[]")
	if err := Run(Inputs{Dir: dir}, out); err == nil {
		t.Fatal("Run accepted an empty pools.json")
	}
	after, _ := os.ReadFile(out)
	if !bytes.Equal(before, after) {
		t.Error("a failed run changed the existing output")
	}
}

func TestInputsFromEnv(t *testing.T) {
	env := map[string]string{
		EnvKernelPath: "/k", EnvRegistryCacheEnabled: "true", EnvRegistryCacheGateway: "10.0.0.1",
		EnvZotPort: "5000", EnvZotMirrors: "{}", "UNRELATED": "x",
	}
	got := InputsFromEnv("/in", func(k string) string { return env[k] })
	want := Inputs{Dir: "/in", KernelPath: "/k", RegistryCacheEnabled: "true", RegistryCacheGateway: "10.0.0.1", ZotPort: "5000", ZotMirrors: "{}"}
	if got != want {
		t.Errorf("InputsFromEnv = %+v, want %+v", got, want)
	}
}

func TestSummaryHasNoSecrets(t *testing.T) {
	cfg, err := Generate(cacheInputs(seedDir))
	if err != nil {
		t.Fatal(err)
	}
	s := Summary(cfg)
	want := "pools: default\nregistry cache: on (10.200.0.1:5001, 4 mirrors)"
	if s != want {
		t.Errorf("Summary = %q, want %q", s, want)
	}
}
