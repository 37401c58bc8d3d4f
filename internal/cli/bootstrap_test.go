package cli_test

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/fireactions/fireactions/internal/cli"
	"github.com/fireactions/fireactions/internal/config"
)

// bootstrapSeed is the bootstrap package's fixture: the seed's example
// pools.json, a fixed App ID and a throwaway test key.
const bootstrapSeed = "../bootstrap/testdata/seed"

// bootstrapEnv clears the seed's variables so the host's environment cannot
// leak into a test.
func bootstrapEnv(t *testing.T) {
	for _, k := range []string{"KERNEL_PATH", "REGISTRY_CACHE_ENABLED", "REGISTRY_CACHE_GATEWAY", "ZOT_PORT", "ZOT_MIRRORS"} {
		t.Setenv(k, "")
	}
}

func runBootstrap(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errb bytes.Buffer
	code = cli.Main(append([]string{"bootstrap"}, args...), &out, &errb)
	return code, out.String(), errb.String()
}

func TestBootstrapCommand(t *testing.T) {
	bootstrapEnv(t)
	out := filepath.Join(t.TempDir(), "fireactions", "config.yaml")
	code, stdout, stderr := runBootstrap(t, "--input-dir", bootstrapSeed, "--output", out)
	if code != 0 {
		t.Fatalf("exit %d, stderr:\n%s", code, stderr)
	}
	want := "wrote " + out + "\npools: default\nregistry cache: off\n"
	if stdout != want {
		t.Errorf("stdout = %q, want %q", stdout, want)
	}
	cfg, err := config.LoadWith(out, config.ValidateOptions{})
	if err != nil {
		t.Fatalf("the written file does not load: %v", err)
	}
	if cfg.GitHub.AppID != 123456 || cfg.Pools[0].Runner.Organization != "your-org" {
		t.Errorf("unexpected configuration: app_id %d, organization %q", cfg.GitHub.AppID, cfg.Pools[0].Runner.Organization)
	}
	st, err := os.Stat(out)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o640 {
		t.Errorf("mode %v, want 0640", st.Mode().Perm())
	}
	key := cfg.GitHub.PrivateKey.Reveal()
	body := strings.Split(key, "\n")[1]
	if strings.Contains(stdout+stderr, body) {
		t.Error("the command printed the private key")
	}
}

// Flags override the environment variables.
func TestBootstrapFlagsOverrideEnv(t *testing.T) {
	bootstrapEnv(t)
	t.Setenv("ZOT_PORT", "not-a-port")
	t.Setenv("REGISTRY_CACHE_ENABLED", "false")
	t.Setenv("KERNEL_PATH", "/from/env/vmlinux")
	out := filepath.Join(t.TempDir(), "config.yaml")

	code, _, stderr := runBootstrap(t, "--input-dir", bootstrapSeed, "--output", out)
	if code != 1 || !strings.Contains(stderr, `ZOT_PORT (--zot-port): "not-a-port" is not a port; use 1-65535`) {
		t.Fatalf("with a bad ZOT_PORT: exit %d, stderr:\n%s", code, stderr)
	}

	code, stdout, stderr := runBootstrap(t, "--input-dir", bootstrapSeed, "--output", out,
		"--zot-port", "5002", "--registry-cache-enabled", "--registry-cache-gateway", "10.200.0.1",
		"--zot-mirrors", `{"ghcr.io": {}}`, "--kernel-path", "/from/flag/vmlinux")
	if code != 0 {
		t.Fatalf("exit %d, stderr:\n%s", code, stderr)
	}
	if !strings.Contains(stdout, "registry cache: on (10.200.0.1:5002, 1 mirrors)") {
		t.Errorf("summary does not show the cache from the flags:\n%s", stdout)
	}
	cfg, err := config.LoadWith(out, config.ValidateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	rc := cfg.RegistryCache
	if !rc.Enabled || rc.Zot.Port != 5002 || len(rc.Mirrors) != 1 || rc.Mirrors[0] != (config.Mirror{Registry: "ghcr.io", URL: "https://ghcr.io"}) {
		t.Errorf("registry_cache = %+v", rc)
	}
	if k := cfg.Pools[0].VM.Kernel; k != "/from/flag/vmlinux" {
		t.Errorf("vm.kernel = %q, want the flag's value", k)
	}

	// --registry-cache-enabled=false overrides REGISTRY_CACHE_ENABLED=true.
	t.Setenv("REGISTRY_CACHE_ENABLED", "true")
	code, stdout, stderr = runBootstrap(t, "--input-dir", bootstrapSeed, "--output", out, "--zot-port", "5002", "--registry-cache-enabled=false")
	if code != 0 || !strings.Contains(stdout, "registry cache: off") {
		t.Errorf("exit %d, stdout:\n%s\nstderr:\n%s", code, stdout, stderr)
	}
}

func TestBootstrapCommandErrors(t *testing.T) {
	bootstrapEnv(t)
	dir := t.TempDir()
	for _, name := range []string{"github-app-id", "github-private-key.pem"} {
		data, err := os.ReadFile(filepath.Join(bootstrapSeed, name))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	out := filepath.Join(t.TempDir(), "config.yaml")

	code, stdout, stderr := runBootstrap(t, "--input-dir", dir, "--output", out)
	want := filepath.Join(dir, "pools.json") + ": missing required file; write the pool definitions into it as a JSON array (see docs/operations.md)\n" +
		"fireactions: bootstrap: 1 problem(s) in the inputs; " + out + " not written\n"
	if code != 1 || stdout != "" || stderr != want {
		t.Errorf("missing pools.json: exit %d\nstdout:\n%s\nstderr:\n%s\nwant stderr:\n%s", code, stdout, stderr, want)
	}
	if _, err := os.Stat(out); !os.IsNotExist(err) {
		t.Errorf("output written despite the error: %v", err)
	}

	if err := os.WriteFile(filepath.Join(dir, "pools.json"), []byte(`[{"name": "a", "runner": {"organization": "o", "lables": []}}]`), 0o644); err != nil {
		t.Fatal(err)
	}
	code, _, stderr = runBootstrap(t, "--input-dir", dir, "--output", out)
	if code != 1 || !strings.Contains(stderr, "pools.json:1:48: [0].runner.lables: unknown field; did you mean labels?\n") {
		t.Errorf("unknown field: exit %d, stderr:\n%s", code, stderr)
	}

	code, _, stderr = runBootstrap(t, "--input-dir", dir, "extra-arg")
	if code != 1 || !strings.Contains(stderr, `unknown command "extra-arg" for "fireactions bootstrap"`) {
		t.Errorf("positional argument: exit %d, stderr:\n%s", code, stderr)
	}
}
