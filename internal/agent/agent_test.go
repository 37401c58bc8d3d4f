package agent

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/fireactions/fireactions/internal/config"
	"github.com/fireactions/fireactions/internal/guest"
	"github.com/fireactions/fireactions/internal/metadata"
	"github.com/fireactions/fireactions/internal/registrycache"
)

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}
func (s *syncBuffer) String() string { s.mu.Lock(); defer s.mu.Unlock(); return s.b.String() }

// fakeJIT builds a JIT configuration in GitHub's shape.
func fakeJIT(name string) string {
	b64 := func(v any) string { b, _ := json.Marshal(v); return base64.StdEncoding.EncodeToString(b) }
	return b64(map[string]string{".runner": b64(map[string]any{"agentId": 7, "agentName": name}), ".credentials": b64(map[string]string{"x": "secret"})})
}

// guestRoot makes a root with a runner user and a run.sh.
func guestRoot(t *testing.T, runSh string) string {
	t.Helper()
	root := t.TempDir()
	os.Chmod(root, 0o755)
	os.Chmod(filepath.Dir(root), 0o755)
	for _, d := range []string{"etc", "home/runner", "run/fireactions"} {
		os.MkdirAll(filepath.Join(root, d), 0o755)
	}
	os.WriteFile(filepath.Join(root, "etc/passwd"), []byte("root:x:0:0:root:/root:/bin/sh\nrunner:x:1001:1001::/home/runner:/bin/sh\n"), 0o644)
	os.WriteFile(filepath.Join(root, "etc/group"), []byte("root:x:0:\nrunner:x:1001:\ndocker:x:998:runner\n"), 0o644)
	os.WriteFile(filepath.Join(root, "home/runner/run.sh"), []byte(runSh), 0o755)
	return root
}

func reports(t *testing.T, out string) []Report {
	t.Helper()
	var rs []Report
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		r, ok, err := ParseReport([]byte(line))
		if !ok || err != nil {
			t.Fatalf("not a report line %q: %v", line, err)
		}
		rs = append(rs, r)
	}
	return rs
}

func TestAgentRunsTheRunnerAndReports(t *testing.T) {
	// The fake runner prints what the real one prints, checks who it runs
	// as, and waits for SIGUSR1 ("a job was assigned") before "running"
	// one.
	root := guestRoot(t, `#!/bin/sh
[ "$1" = --jitconfig ] && [ -n "$2" ] || { echo "usage: run.sh --jitconfig CONFIG"; exit 2; }
echo "uid=$(id -u) gid=$(id -g) groups=$(id -G) home=$HOME env_jit=${FIREACTIONS_JITCONFIG:-unset}"
echo "√ Connected to GitHub"
echo "2025-01-01 00:00:00Z: Listening for Jobs"
got=0
trap 'got=1' USR1
while [ $got = 0 ]; do sleep 0.05; done
echo "2025-01-01 00:00:01Z: Running job: build"
echo "2025-01-01 00:00:02Z: Job build completed with result: Succeeded"
exit 3
`)
	gc := registrycache.GuestConfig{Files: []registrycache.GuestFile{
		{Path: "/etc/containerd/certs.d/docker.io/hosts.toml", Mode: 0o644, Content: "server = \"https://registry-1.docker.io\"\n"},
	}}
	doc, err := metadata.New(metadata.Input{InstanceID: "r-1", RunnerID: "7", Pool: "p", RegistryCache: &gc})
	if err != nil {
		t.Fatal(err)
	}
	h, err := metadata.NewHandler(doc, metadata.V1)
	if err != nil {
		t.Fatal(err)
	}
	mmds := httptest.NewServer(h)
	defer mmds.Close()

	jit := fakeJIT("p-abc")
	t.Setenv(EnvJITConfig, jit)
	rep, out := &syncBuffer{}, &syncBuffer{}
	powered := false
	done := make(chan error, 1)
	go func() {
		done <- Run(context.Background(), Options{Root: root, MetadataURL: mmds.URL, Reports: rep, Output: out,
			PowerOff: func() error { powered = true; return nil }})
	}()
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(rep.String(), `"state":"idle"`) {
		if time.Now().After(deadline) {
			t.Fatalf("no idle report; reports %q output %q", rep.String(), out.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
	// The mirror configuration was written before the runner started.
	if b, err := os.ReadFile(filepath.Join(root, "etc/containerd/certs.d/docker.io/hosts.toml")); err != nil || string(b) != gc.Files[0].Content {
		t.Fatalf("hosts.toml: %q %v", b, err)
	}
	// "A job was assigned": the host's signal reaches the runner.
	syscall.Kill(os.Getpid(), syscall.SIGUSR1)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	var states []State
	for _, r := range reports(t, rep.String()) {
		states = append(states, r.State)
		if r.Runner != "p-abc" {
			t.Errorf("report without the runner's name: %+v", r)
		}
	}
	if got := strings.Trim(strings.ReplaceAll(strings.Join(stateStrings(states), ","), " ", ""), ","); got != "starting,idle,busy,done" {
		t.Fatalf("states %s", got)
	}
	last := reports(t, rep.String())[3]
	if !strings.Contains(last.Message, "exit status 3") {
		t.Errorf("done report %+v lacks the exit status", last)
	}
	o := out.String()
	if !strings.Contains(o, "uid=1001 gid=1001 groups=1001 998 home=/home/runner env_jit=unset") {
		t.Errorf("runner identity or environment wrong:\n%s", o)
	}
	if os.Getenv(EnvJITConfig) != "" {
		t.Error("the JIT configuration stayed in the agent's environment")
	}
	if strings.Contains(rep.String(), jit) || strings.Contains(o, jit) {
		t.Error("the JIT configuration was printed")
	}
	if !powered {
		t.Error("the VM was not powered off")
	}
}

func stateStrings(s []State) []string {
	out := make([]string, len(s))
	for i, x := range s {
		out[i] = string(x)
	}
	return out
}

func TestAgentReportsFailure(t *testing.T) {
	root := guestRoot(t, "#!/bin/sh\nexit 0\n")
	os.Remove(filepath.Join(root, "home/runner/run.sh"))
	t.Setenv(EnvJITConfig, fakeJIT("p-x"))
	rep := &syncBuffer{}
	err := Run(context.Background(), Options{Root: root, MetadataURL: "http://127.0.0.1:1", MetadataWait: time.Millisecond, Reports: rep, Output: &syncBuffer{},
		PowerOff: func() error { return nil }})
	if err == nil || !strings.Contains(err.Error(), "actions runner") {
		t.Fatalf("missing run.sh: %v", err)
	}
	rs := reports(t, rep.String())
	if rs[len(rs)-1].State != StateFailed || !strings.Contains(rs[len(rs)-1].Message, "run.sh") {
		t.Fatalf("reports %+v", rs)
	}
}

func TestSystemModeHandoff(t *testing.T) {
	// In system mode the JIT configuration comes from the file the init
	// left, and reports go out as frames signed with the handed-over key.
	root := guestRoot(t, "#!/bin/sh\necho 'Listening for Jobs'\n")
	key, _ := guest.NewConsoleKey()
	hb, _ := json.Marshal(Handoff{Key: key, Last: 5})
	os.WriteFile(filepath.Join(root, HandoffPath), hb, 0o600)
	os.WriteFile(filepath.Join(root, EnvPath), []byte("FIREACTIONS_OTHER=1\n"+EnvJITConfig+"="+fakeJIT("s-1")+"\n"), 0o600)
	os.MkdirAll(filepath.Join(root, "dev"), 0o755)
	console := filepath.Join(root, "dev/console")
	os.WriteFile(console, nil, 0o600)
	os.Unsetenv(EnvJITConfig)
	if err := Run(context.Background(), Options{Root: root, MetadataURL: "http://127.0.0.1:1", MetadataWait: time.Millisecond, Output: &syncBuffer{},
		PowerOff: func() error { return nil }}); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{HandoffPath, EnvPath} {
		if _, err := os.Stat(filepath.Join(root, p)); err == nil {
			t.Errorf("%s left behind", p)
		}
	}
	f, _ := os.Open(console)
	defer f.Close()
	fr := guest.NewReader(f, key)
	var states []string
	for {
		fr2, err := fr.Next()
		if err != nil {
			break
		}
		if fr2.Seq <= 5 || fr2.Type != guest.FrameStdout {
			t.Fatalf("frame %+v", fr2)
		}
		r, ok, err := ParseReport(fr2.Payload)
		if !ok || err != nil {
			t.Fatalf("frame payload %q", fr2.Payload)
		}
		states = append(states, string(r.State))
	}
	if strings.Join(states, ",") != "starting,idle,done" {
		t.Fatalf("states %v", states)
	}
}

// The agent's copy of the registry-cache format matches the one
// internal/registrycache writes.
func TestRegistryCacheFormatMatches(t *testing.T) {
	cfg := &config.Config{RegistryCache: config.RegistryCache{Enabled: true}}
	cfg.ApplyDefaults()
	gc, err := registrycache.Guest(cfg)
	if err != nil {
		t.Fatal(err)
	}
	doc, err := metadata.New(metadata.Input{InstanceID: "i", RegistryCache: &gc})
	if err != nil {
		t.Fatal(err)
	}
	h, _ := metadata.NewHandler(doc, metadata.V2)
	srv := httptest.NewServer(h)
	defer srv.Close()
	root := t.TempDir()
	a := &agentRun{o: Options{Root: root, MetadataURL: srv.URL}, log: testLogger(t)}
	if err := a.applyRegistryCache(context.Background()); err != nil {
		t.Fatal(err)
	}
	want := t.TempDir()
	if err := gc.WriteTree(want); err != nil {
		t.Fatal(err)
	}
	for _, f := range gc.Files {
		got, err1 := os.ReadFile(filepath.Join(root, f.Path))
		exp, err2 := os.ReadFile(filepath.Join(want, f.Path))
		st1, _ := os.Stat(filepath.Join(root, f.Path))
		st2, _ := os.Stat(filepath.Join(want, f.Path))
		if err1 != nil || err2 != nil || !bytes.Equal(got, exp) || st1.Mode() != st2.Mode() {
			t.Errorf("%s differs: %v %v", f.Path, err1, err2)
		}
	}
	if len(gc.Files) == 0 {
		t.Fatal("no files to compare")
	}
}

func TestParseReport(t *testing.T) {
	line := Report{State: StateBusy, Runner: "r", Time: time.Unix(1, 0).UTC()}.Line()
	r, ok, err := ParseReport(line)
	if !ok || err != nil || r.State != StateBusy || r.Runner != "r" {
		t.Fatalf("%+v %v %v", r, ok, err)
	}
	for _, bad := range []string{`fireactions-agent/v1 {"state":"sleeping"}`, `fireactions-agent/v1 {"state":"idle","x":1}`, `fireactions-agent/v1 nope`} {
		if _, ok, err := ParseReport([]byte(bad)); !ok || err == nil {
			t.Errorf("%q: ok=%v err=%v", bad, ok, err)
		}
	}
	if _, ok, _ := ParseReport([]byte("Listening for Jobs")); ok {
		t.Error("runner output taken for a report")
	}
}

func testLogger(t *testing.T) *slogLogger { return newTestLogger(t) }

var _ = http.StatusOK

// The example image's unit file is the unit the init installs.
func TestImageUnitMatches(t *testing.T) {
	b, err := os.ReadFile("../../images/runner/fireactions-agent.service")
	if err != nil {
		t.Fatal(err)
	}
	if string(b) != Unit {
		t.Errorf("images/runner/fireactions-agent.service differs from agent.Unit:\n%s", b)
	}
}
