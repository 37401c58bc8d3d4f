package cli

import (
	"archive/tar"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/fireactions/fireactions/internal/github/githubtest"
	"github.com/fireactions/fireactions/internal/image/imagetest"
	"github.com/fireactions/fireactions/internal/pool"
	"github.com/fireactions/fireactions/internal/runtime/runtimetest"
	"github.com/fireactions/fireactions/internal/vm"
	"github.com/fireactions/fireactions/internal/vm/vmtest"
)

// serveKillNetnsEnv marks the test binary re-run inside its own network
// namespace: `serve` attaches its VMs with CNI behind the bridge and
// nftables rules `host setup` installs, which must not touch the host.
const serveKillNetnsEnv = "FIREACTIONS_CLI_SERVE_KILL_NETNS"

// killRunSh is the image's actions runner: it reads its name from the JIT
// configuration (GitHub's format), says it listens for jobs and waits. No
// job ever reaches it; the test is about the daemon, not the runner.
const killRunSh = `#!/bin/sh
[ "$1" = --jitconfig ] && [ -n "$2" ] || { echo "usage: run.sh --jitconfig CONFIG" >&2; exit 2; }
runner=$(echo "$2" | base64 -d | sed -n 's/.*"\.runner":"\([^"]*\)".*/\1/p' | base64 -d | sed -n 's/.*"agentName":"\([^"]*\)".*/\1/p')
[ -n "$runner" ] || { echo "unreadable JIT configuration" >&2; exit 3; }
echo "Connected to GitHub as $runner (uid $(id -u))"
echo "$(date -u '+%F %TZ'): Listening for Jobs"
exec sleep 36000
`

// killEnv is one run of the real daemon against the fake GitHub.
type killEnv struct {
	t             *testing.T
	gh            *githubtest.Server
	dir, dataDir  string
	cfgPath, addr string
	token         string
	logs          []*syncBuffer
	cmd           *exec.Cmd
	done          chan error
	init          string
}

// start runs `fireactions serve` (this test binary as the executable, see
// TestMain) as a child process.
func (e *killEnv) start() {
	t := e.t
	cmd := exec.Command(os.Args[0], "-c", e.cfgPath, "serve", "--insecure-registries")
	cmd.Env = append(os.Environ(), asMainEnv+"=1", "FIREACTIONS_INIT="+e.init)
	logs := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	e.logs = append(e.logs, logs)
	e.cmd, e.done = cmd, make(chan error, 1)
	go func(done chan error) { done <- cmd.Wait() }(e.done)
}

func (e *killEnv) allLogs() string {
	var b strings.Builder
	for i, l := range e.logs {
		fmt.Fprintf(&b, "--- serve #%d\n%s", i+1, l.String())
	}
	return b.String()
}

func (e *killEnv) vms() ([]pool.VMStatus, error) {
	req, _ := http.NewRequest("GET", "http://"+e.addr+"/v1/vms", nil)
	req.Header.Set("Authorization", "Bearer "+e.token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET /v1/vms: HTTP %d", resp.StatusCode)
	}
	var out []pool.VMStatus
	return out, json.NewDecoder(resp.Body).Decode(&out)
}

// waitFor polls cond: the deadline is generous because the guests run
// under TCG on a loaded machine; nothing here measures speed.
func (e *killEnv) waitFor(what string, cond func() bool) {
	e.t.Helper()
	deadline := time.Now().Add(5 * time.Minute)
	for !cond() {
		if time.Now().After(deadline) {
			vms, err := e.vms()
			e.t.Fatalf("timed out waiting for %s\nvms %+v (%v)\nrunners %+v\nlogs:\n%s", what, vms, err, e.gh.Runners(), lastLines(e.allLogs(), 120))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// idleVM returns the only VM when it is idle and its runner is registered.
func (e *killEnv) idleVM() (pool.VMStatus, bool) {
	vms, err := e.vms()
	if err != nil || len(vms) != 1 || vms[0].State != pool.StateIdle {
		return pool.VMStatus{}, false
	}
	for _, r := range e.gh.Runners() {
		if r.Name == vms[0].ID {
			return vms[0], true
		}
	}
	return pool.VMStatus{}, false
}

// vmmPID is the pid of the QEMU process running VM id of this data
// directory (not its metadata helpers); 0 when there is none.
func (e *killEnv) vmmPID(id string) int {
	for _, pid := range vm.ProcessesMatching(e.dataDir) {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err != nil {
			continue
		}
		args := strings.Split(string(b), "\x00")
		if strings.Contains(filepath.Base(args[0]), "qemu-system") && strings.Contains(string(b), id) {
			return pid
		}
	}
	return 0
}

func lastLines(s string, n int) string {
	l := strings.Split(s, "\n")
	if len(l) > n {
		l = l[len(l)-n:]
	}
	return strings.Join(l, "\n")
}

// TestServeKill9AdoptsAndRecovers runs the real `fireactions serve` with a
// pool of real QEMU runner VMs, kill -9s it, and checks that a second
// daemon adopts the live VM, replaces one that dies behind its back, and
// drains on SIGTERM leaving nothing behind: no VMM, no VM files, no
// registration, no secret in the logs.
func TestServeKill9AdoptsAndRecovers(t *testing.T) {
	if os.Getenv(serveKillNetnsEnv) == "" {
		if os.Geteuid() != 0 {
			t.Skip("needs root: a network namespace, CNI taps and the guest agent's user switch")
		}
		vmtest.RequireQEMU(t)
		name := fmt.Sprintf("fa-kill-%d", os.Getpid())
		if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
			t.Fatalf("ip netns add: %v %s", err, out)
		}
		defer exec.Command("ip", "netns", "del", name).Run()
		cmd := exec.Command("ip", "netns", "exec", name, os.Args[0], "-test.run=^TestServeKill9AdoptsAndRecovers$", "-test.v")
		cmd.Env = append(os.Environ(), serveKillNetnsEnv+"=1")
		out, err := cmd.CombinedOutput()
		if err != nil || !strings.Contains(string(out), "--- PASS: TestServeKill9AdoptsAndRecovers") {
			t.Fatalf("in the namespace: %v\n%s", err, out)
		}
		t.Logf("in the namespace:\n%s", lastLines(string(out), 15))
		return
	}
	if out, err := exec.Command("ip", "link", "set", "lo", "up").CombinedOutput(); err != nil {
		t.Fatalf("lo up: %v %s", err, out)
	}

	kernel, mods := runtimetest.Kernel(t)
	reg := imagetest.NewRegistry(t)
	users := imagetest.Layer(t, imagetest.Tar(t,
		imagetest.Entry{Name: "etc/", Type: tar.TypeDir},
		imagetest.Entry{Name: "etc/passwd", Body: "root:x:0:0:root:/root:/bin/sh\nrunner:x:1001:1001::/home/runner:/bin/sh\n"},
		imagetest.Entry{Name: "etc/group", Body: "root:x:0:\nrunner:x:1001:\n"},
	))
	img := imagetest.Image(t, "linux/amd64", v1.Config{Cmd: []string{"/bin/sh"}},
		runtimetest.BusyboxLayer(t, map[string]string{"home/runner/run.sh": killRunSh}), users)
	ref := reg.Host + "/runner:latest"
	imagetest.Push(t, ref, img, nil)

	key, pem, err := githubtest.AppKey()
	if err != nil {
		t.Fatal(err)
	}
	gh := githubtest.New(t, &key.PublicKey, func(o *githubtest.Options) { o.LongPoll = time.Second })
	gh.InstallOrg("acme")

	dir := t.TempDir()
	e := &killEnv{t: t, gh: gh, dir: dir, dataDir: filepath.Join(dir, "data"), token: "kill-token", init: vmtest.Init(t)}
	t.Cleanup(func() {
		// Whatever a failed run left: the daemon, then its VMs' processes
		// by the exact pids that name this data directory.
		if e.cmd != nil && e.cmd.ProcessState == nil {
			e.cmd.Process.Kill()
			<-e.done
		}
		for _, pid := range vm.ProcessesMatching(e.dataDir) {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	})
	os.WriteFile(filepath.Join(dir, "app.pem"), pem, 0o600)
	os.WriteFile(filepath.Join(dir, "token"), []byte(e.token+"\n"), 0o600)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e.addr = ln.Addr().String()
	ln.Close()
	e.cfgPath = filepath.Join(dir, "config.yaml")
	doc := fmt.Sprintf(`data_dir: %[1]s/data
log:
  level: debug
server:
  address: %[2]s
  auth_token_file: %[1]s/token
  drain_timeout: 2m
github:
  app_id: %[3]d
  private_key_file: %[1]s/app.pem
  api_url: %[4]s
network:
  bridge: fakill0
  subnet: 10.231.0.0/24
  gateway: 10.231.0.1
  conf_dir: %[1]s/cni
pools:
  - name: e2e
    min_runners: 1
    max_runners: 1
    runner:
      organization: acme
      image: %[5]s
    vm:
      mode: app
      backend: qemu
      vcpus: 1
      memory_mib: 256
      kernel: %[6]s
      kernel_modules: %[7]s
      kernel_args: quiet
      disk_size: 1GiB
    timeouts:
      boot: 3m
      max_job: 1h
`, dir, e.addr, gh.AppID(), gh.APIURL(), ref, kernel, mods)
	if err := os.WriteFile(e.cfgPath, []byte(doc), 0o600); err != nil {
		t.Fatal(err)
	}
	if code, out, errs := runCLI(t, "-c", e.cfgPath, "host", "setup"); code != 0 {
		t.Fatalf("host setup: exit %d\n%s%s", code, out, errs)
	}
	t.Cleanup(func() { runCLI(t, "-c", e.cfgPath, "host", "teardown") })

	// The warm minimum: one runner VM boots and its runner registers.
	e.start()
	var first pool.VMStatus
	e.waitFor("an idle runner VM", func() (ok bool) { first, ok = e.idleVM(); return ok })
	pid := e.vmmPID(first.ID)
	if pid == 0 {
		t.Fatalf("no QEMU process for VM %s", first.ID)
	}
	regs := gh.CountCalls("POST", "/_actions/*/_apis/runtime/runnerscalesets/*/generatejitconfig")

	// kill -9: the VMM runs in a session of its own and survives.
	e.cmd.Process.Signal(syscall.SIGKILL)
	if err := <-e.done; err == nil {
		t.Fatal("serve exited cleanly after SIGKILL")
	}
	if syscall.Kill(pid, 0) != nil {
		t.Fatalf("QEMU %d of VM %s died with the daemon", pid, first.ID)
	}
	// GitHub drops the dead daemon's message session after its timeout.
	gh.DropSessions()

	// A new daemon adopts the live VM: same id, same VMM, no new
	// registration, no second VM.
	e.start()
	e.waitFor("the live VM adopted", func() bool {
		v, ok := e.idleVM()
		return ok && v.ID == first.ID
	})
	if got := e.vmmPID(first.ID); got != pid {
		t.Errorf("VM %s runs as QEMU pid %d after the restart, want the adopted %d", first.ID, got, pid)
	}
	if n := gh.CountCalls("POST", "/_actions/*/_apis/runtime/runnerscalesets/*/generatejitconfig"); n != regs {
		t.Errorf("%d new registrations after the restart; the live VM should have been adopted", n-regs)
	}
	if rs := gh.Runners(); len(rs) != 1 || rs[0].Name != first.ID {
		t.Errorf("registrations after the restart: %+v, want only %s", rs, first.ID)
	}

	// The VM dies behind the daemon's back: its runner is deregistered
	// and a new VM takes its place.
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	var second pool.VMStatus
	e.waitFor("the dead VM replaced and its runner deregistered", func() (ok bool) {
		second, ok = e.idleVM()
		if !ok || second.ID == first.ID {
			return false
		}
		for _, r := range gh.Runners() {
			if r.Name == first.ID {
				return false
			}
		}
		return true
	})
	if second.RunnerID == first.RunnerID {
		t.Errorf("the replacement reuses runner id %d", first.RunnerID)
	}
	if got := e.vmmPID(second.ID); got == 0 || got == pid {
		t.Errorf("replacement VM %s: QEMU pid %d (the dead one was %d)", second.ID, got, pid)
	}

	// SIGTERM drains: everything is deregistered and stopped.
	e.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-e.done:
		if err != nil {
			t.Fatalf("serve exited with %v after SIGTERM\n%s", err, lastLines(e.allLogs(), 120))
		}
	case <-time.After(5 * time.Minute):
		t.Fatalf("serve did not drain\n%s", lastLines(e.allLogs(), 120))
	}
	if rs := gh.Runners(); len(rs) != 0 {
		t.Errorf("registrations left after the drain: %+v", rs)
	}
	runtimetest.RequireNoLeftovers(t, e.dataDir)
	for _, glob := range []string{"pools/*/runners/*.json", "network/*.json"} {
		if left, _ := filepath.Glob(filepath.Join(e.dataDir, glob)); len(left) != 0 {
			t.Errorf("records left after the drain: %v", left)
		}
	}
	logs := e.allLogs()
	// The metadata service's user-mode NIC needs loopback in the VM's
	// namespace; without it QEMU logs this for every guest connection.
	if strings.Contains(logs, "slirp_socketpair") {
		t.Errorf("QEMU could not serve the metadata service:\n%s", lastLines(logs, 60))
	}
	if !strings.Contains(logs, "drained") {
		t.Errorf("no drain in the logs:\n%s", lastLines(logs, 60))
	}
	if secrets := gh.Secrets(); len(secrets) == 0 {
		t.Error("the fake GitHub issued no secrets; the log check would prove nothing")
	} else {
		for _, s := range secrets {
			if strings.Contains(logs, s) {
				t.Errorf("a secret GitHub issued (%d bytes) is in the daemon's logs", len(s))
			}
		}
	}
	if strings.Contains(logs, string(pem)) || strings.Contains(logs, e.token) {
		t.Error("the app key or the API token is in the daemon's logs")
	}
}
