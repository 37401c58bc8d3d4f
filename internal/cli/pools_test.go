package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/fireactions/fireactions/internal/api"
	"github.com/fireactions/fireactions/internal/config"
	"github.com/fireactions/fireactions/internal/github"
	"github.com/fireactions/fireactions/internal/github/githubtest"
	"github.com/fireactions/fireactions/internal/pool"
	"github.com/fireactions/fireactions/internal/pool/pooltest"
)

// daemonAPI runs a pool manager over the fake runtime and the fake GitHub
// behind the real API handler, and writes a client configuration pointing
// at it.
func daemonAPI(t *testing.T) (cfgPath string, rt *pooltest.Runtime, m *pool.Manager) {
	t.Helper()
	key, pem, err := githubtest.AppKey()
	if err != nil {
		t.Fatal(err)
	}
	gh := githubtest.New(t, &key.PublicKey)
	gh.InstallOrg("acme")
	cfg := &config.Config{
		GitHub: config.GitHub{AppID: gh.AppID(), PrivateKey: config.Secret(pem), APIURL: gh.APIURL()},
		Pools: []config.Pool{{Name: "linux", Scaling: config.ScalingLabels, MinRunners: 2, MaxRunners: 3,
			Runner: config.Runner{Organization: "acme"}}},
	}
	cfg.ApplyDefaults()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	client, err := github.New(cfg.GitHub, github.WithLogger(log))
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	rt = pooltest.NewRuntime(gh)
	m, err = pool.New(pool.Options{Config: cfg, GitHub: client, Runtime: rt, StateDir: filepath.Join(dir, "pools"), Logger: log,
		Resync: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(m.Close)
	srv := httptest.NewServer(api.NewHandler(api.Options{Pools: m, Token: "cli-token", Version: "test", Logger: log}))
	t.Cleanup(srv.Close)
	os.WriteFile(filepath.Join(dir, "token"), []byte("cli-token\n"), 0o600)
	cfgPath = filepath.Join(dir, "client.yaml")
	// The client reads the daemon's own configuration for the address and
	// the token file.
	os.WriteFile(cfgPath, []byte(fmt.Sprintf(`server:
  address: %s
  auth_token_file: %s
github:
  app_id: 1
  private_key_file: /etc/fireactions/app.pem
pools:
  - name: linux
    max_runners: 3
    runner:
      organization: acme
`, srv.Listener.Addr(), filepath.Join(dir, "token"))), 0o600)
	deadline := time.Now().Add(30 * time.Second)
	for st, _ := m.Pool("linux"); st.Idle < 2; st, _ = m.Pool("linux") {
		if time.Now().After(deadline) {
			t.Fatal("no idle runners")
		}
		time.Sleep(10 * time.Millisecond)
	}
	return cfgPath, rt, m
}

func TestPoolsPsLogsCommands(t *testing.T) {
	cfg, rt, m := daemonAPI(t)

	code, out, errs := runCLI(t, "-c", cfg, "pools", "ls")
	if code != 0 || !strings.Contains(out, "POOL") || !poolsLine(out, `linux\s+labels\s+2\s+3\s+2\s+2\s+2\s+0\s+0\s+active`) {
		t.Fatalf("pools ls: %d\n%s%s", code, out, errs)
	}
	code, out, _ = runCLI(t, "-c", cfg, "pools", "ls", "--json")
	var pools []pool.Status
	if code != 0 || json.Unmarshal([]byte(out), &pools) != nil || len(pools) != 1 || pools[0].Idle != 2 {
		t.Fatalf("pools ls --json: %d %s", code, out)
	}

	code, out, errs = runCLI(t, "-c", cfg, "pools", "scale", "linux", "--min", "3")
	if code != 0 || !poolsLine(out, `linux\s+labels\s+3\s+3`) {
		t.Fatalf("scale: %d\n%s%s", code, out, errs)
	}
	if code, _, errs = runCLI(t, "-c", cfg, "pools", "scale", "linux", "--max", "1"); code != 1 || !strings.Contains(errs, "more than max_runners") {
		t.Fatalf("scale below min: %d %s", code, errs)
	}
	if code, _, errs = runCLI(t, "-c", cfg, "pools", "scale", "linux"); code != 1 || !strings.Contains(errs, "give --min, --max or both") {
		t.Fatalf("scale without sizes: %d %s", code, errs)
	}
	if code, _, errs = runCLI(t, "-c", cfg, "pools", "scale", "nope", "--min", "1"); code != 1 || !strings.Contains(errs, `pool "nope": not found`) {
		t.Fatalf("scale unknown pool: %d %s", code, errs)
	}
	code, out, _ = runCLI(t, "-c", cfg, "pools", "pause", "linux")
	if code != 0 || !strings.Contains(out, "paused") {
		t.Fatalf("pause: %d %s", code, out)
	}
	code, out, _ = runCLI(t, "-c", cfg, "pools", "resume", "linux", "--json")
	var st pool.Status
	if code != 0 || json.Unmarshal([]byte(out), &st) != nil || st.Paused {
		t.Fatalf("resume: %d %s", code, out)
	}

	deadline := time.Now().Add(30 * time.Second)
	for st, _ := m.Pool("linux"); st.Idle < 3; st, _ = m.Pool("linux") {
		if time.Now().After(deadline) {
			t.Fatal("not scaled up")
		}
		time.Sleep(10 * time.Millisecond)
	}
	code, out, _ = runCLI(t, "-c", cfg, "ps")
	if code != 0 || strings.Count(out, "\nrunner-") != 3 || !strings.Contains(out, "idle") {
		t.Fatalf("ps: %d\n%s", code, out)
	}
	code, out, _ = runCLI(t, "-c", cfg, "ps", "--json", "--pool", "other")
	if code != 0 || strings.TrimSpace(out) != "[]" {
		t.Fatalf("ps --pool other: %d %s", code, out)
	}
	vms := m.VMs()
	rt.VM(vms[0].ID).Print("hello from the runner\n")
	code, out, _ = runCLI(t, "-c", cfg, "logs", vms[0].ID)
	if code != 0 || !strings.Contains(out, "Listening for Jobs") || !strings.Contains(out, "hello from the runner") {
		t.Fatalf("logs: %d %s", code, out)
	}
	if code, _, errs = runCLI(t, "-c", cfg, "logs", "nope"); code != 1 || !strings.Contains(errs, "HTTP 404") {
		t.Fatalf("logs of an unknown VM: %d %s", code, errs)
	}

	// A wrong token and an unreachable daemon are reported.
	bad := filepath.Join(t.TempDir(), "bad")
	os.WriteFile(bad, []byte("wrong\n"), 0o600)
	if code, _, errs = runCLI(t, "-c", cfg, "pools", "ls", "--token-file", bad); code != 1 || !strings.Contains(errs, "HTTP 401") {
		t.Fatalf("wrong token: %d %s", code, errs)
	}
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := ln.Addr().String()
	ln.Close()
	if code, _, errs = runCLI(t, "-c", cfg, "ps", "--address", addr); code != 1 || !strings.Contains(errs, "is `fireactions serve` running?") {
		t.Fatalf("unreachable daemon: %d %s", code, errs)
	}
}

func poolsLine(out, pattern string) bool {
	for _, l := range strings.Split(out, "\n") {
		if ok, _ := regexpMatch(pattern, l); ok {
			return true
		}
	}
	return false
}

// TestServeStartsAndDrains runs the real `fireactions serve` binary with a
// pool that wants no runners: it recovers, serves the API, answers the
// CLI, refuses a public address without a token, and drains on SIGTERM.
func TestServeStartsAndDrains(t *testing.T) {
	key, pem, err := githubtest.AppKey()
	if err != nil {
		t.Fatal(err)
	}
	gh := githubtest.New(t, &key.PublicKey, func(o *githubtest.Options) { o.LongPoll = 300 * time.Millisecond })
	gh.InstallOrg("acme")
	dir := t.TempDir()
	bin := filepath.Join(dir, "fireactions")
	if out, err := exec.Command("go", "build", "-o", bin, "../../cmd/fireactions").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	os.WriteFile(filepath.Join(dir, "app.pem"), pem, 0o600)
	os.WriteFile(filepath.Join(dir, "token"), []byte("serve-token\n"), 0o600)
	os.WriteFile(filepath.Join(dir, "vmlinux"), []byte("\x7fELF"), 0o600)
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := ln.Addr().String()
	ln.Close()
	write := func(address string, token bool) string {
		doc := fmt.Sprintf(`data_dir: %[1]s/data
server:
  address: %[2]s
  drain_timeout: 30s
github:
  app_id: %[3]d
  private_key_file: %[1]s/app.pem
  api_url: %[4]s
pools:
  - name: idle
    min_runners: 0
    max_runners: 1
    runner:
      organization: acme
    vm:
      kernel: %[1]s/vmlinux
`, dir, address, gh.AppID(), gh.APIURL())
		if token {
			doc = strings.Replace(doc, "  drain_timeout", "  auth_token_file: "+dir+"/token\n  drain_timeout", 1)
		}
		p := filepath.Join(dir, "config.yaml")
		os.WriteFile(p, []byte(doc), 0o600)
		return p
	}
	cfg := write(addr, true)
	cmd := exec.Command(bin, "-c", cfg, "serve")
	var logs syncBuffer
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	defer cmd.Process.Kill()
	deadline := time.Now().Add(60 * time.Second)
	for {
		resp, err := http.Get("http://" + addr + "/v1/health")
		if err == nil {
			resp.Body.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("serve did not come up:\n%s", logs.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	for time.Now().Before(deadline) && func() bool { s := gh.ScaleSets(); return len(s) == 0 || s[0].Sessions == 0 }() {
		time.Sleep(50 * time.Millisecond)
	}
	code, out, errs := runCLI(t, "-c", cfg, "pools", "ls")
	if code != 0 || !poolsLine(out, `idle\s+scaleset\s+0\s+1\s+0\s+0`) {
		t.Fatalf("pools ls against serve: %d\n%s%s\n%s", code, out, errs, logs.String())
	}
	cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("serve exited with %v\n%s", err, logs.String())
		}
	case <-time.After(60 * time.Second):
		t.Fatalf("serve did not drain:\n%s", logs.String())
	}
	if !strings.Contains(logs.String(), "drained") {
		t.Errorf("no drain in the logs:\n%s", logs.String())
	}
	if s := gh.ScaleSets(); s[0].Sessions != 0 {
		t.Error("the scale set session was left open")
	}

	// A public address without a token is refused even when the
	// configuration check is bypassed by a flag-less file edit.
	cfg = write("0.0.0.0:0", false)
	code, _, errs = runCLI(t, "-c", cfg, "serve")
	if code != 1 || !strings.Contains(errs, "server.address") {
		t.Fatalf("public address without token: %d %s", code, errs)
	}
}
