package nomad

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"golang.org/x/sys/unix"

	"github.com/fireactions/fireactions/internal/config"
	"github.com/fireactions/fireactions/internal/hostnet"
	"github.com/fireactions/fireactions/internal/image/imagetest"
	"github.com/fireactions/fireactions/internal/network"
	"github.com/fireactions/fireactions/internal/network/netnstest"
	"github.com/fireactions/fireactions/internal/runtime/runtimetest"
	"github.com/fireactions/fireactions/internal/vm/vmtest"
)

// nomadAgentEnv names the Nomad agent binary the end-to-end test runs;
// by default the one scripts/nomad-agent.sh caches.
const nomadAgentEnv = "FIREACTIONS_NOMAD"

func nomadAgent(t *testing.T) string {
	t.Helper()
	if p := os.Getenv(nomadAgentEnv); p != "" {
		return p
	}
	cache := os.Getenv("FIREACTIONS_CACHE")
	if cache == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			t.Fatal(err)
		}
		cache = filepath.Join(home, ".cache", "fireactions")
	}
	p := filepath.Join(cache, "nomad", "nomad-v1.10.5")
	if _, err := os.Stat(p); err != nil {
		t.Skipf("needs a Nomad agent binary: run scripts/nomad-agent.sh (builds and caches %s) or set %s", p, nomadAgentEnv)
	}
	return p
}

// agent is a Nomad agent in dev mode (server and client) on 127.0.0.1,
// with the plugin in its plugin directory.
type agent struct {
	bin    string
	addr   string // http://127.0.0.1:PORT
	log    *syncBuffer
	exited chan struct{}
}

// startAgent starts the agent; extra is added to the plugin's config block.
func startAgent(t *testing.T, e *env, extra string) *agent {
	t.Helper()
	bin := nomadAgent(t)
	root := vmtest.RepoRoot(t)
	plugins := filepath.Join(e.dir, "plugins")
	if err := os.MkdirAll(plugins, 0o755); err != nil {
		t.Fatal(err)
	}
	build := exec.Command("go", "build", "-o", filepath.Join(plugins, PluginName), "./cmd/firecracker-task-driver")
	build.Dir = root
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building the plugin: %v\n%s", err, out)
	}

	http, rpc, serf := imagetest.FreePort(t), imagetest.FreePort(t), imagetest.FreePort(t)
	dataDir := filepath.Join(e.dir, "nomad")
	quoted := func(ss []string) string {
		b, _ := json.Marshal(ss)
		return string(b)
	}
	cfg := fmt.Sprintf(`
data_dir             = %q
bind_addr            = "127.0.0.1"
disable_update_check = true
log_level            = "DEBUG"
plugin_dir           = %q
ports {
  http = %d
  rpc  = %d
  serf = %d
}
advertise {
  http = "127.0.0.1"
  rpc  = "127.0.0.1"
  serf = "127.0.0.1"
}
client {
  options = {
    "fingerprint.denylist" = "env_aws,env_gce,env_azure,env_digitalocean"
  }
}
plugin %q {
  config {
    kernel              = %q
    kernel_modules      = %q
    init                = %q
    data_dir            = %q
    image_cache_dir     = %q
    backend             = "qemu"
    allowed_image_paths = %s
    %s
  }
}
`, dataDir, plugins, http, rpc, serf, PluginName, e.pc.Kernel, e.pc.KernelModules, e.pc.Init,
		e.pc.DataDir, e.pc.ImageCacheDir, quoted(e.pc.AllowedImagePaths), extra)
	cfgPath := filepath.Join(e.dir, "agent.hcl")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	a := &agent{bin: bin, addr: fmt.Sprintf("http://127.0.0.1:%d", http), log: &syncBuffer{}, exited: make(chan struct{})}
	cmd := exec.Command(bin, "agent", "-dev", "-bind=127.0.0.1", "-config="+cfgPath)
	// The client's cloud metadata client refuses to start with this set
	// (see docs/nomad.md).
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "AWS_CA_BUNDLE=") && !strings.HasPrefix(kv, "NOMAD_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	cmd.Stdout, cmd.Stderr = a.log, a.log
	cmd.SysProcAttr = &unix.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { cmd.Wait(); close(a.exited) }()
	t.Cleanup(func() {
		_ = unix.Kill(-cmd.Process.Pid, unix.SIGINT)
		select {
		case <-a.exited:
		case <-time.After(30 * time.Second):
			_ = unix.Kill(-cmd.Process.Pid, unix.SIGKILL)
			<-a.exited
		}
		unmountUnder(dataDir)
		if t.Failed() {
			t.Logf("agent log:\n%s", a.log.String())
		}
	})
	return a
}

// unmountUnder detaches every mount below dir (Nomad mounts the task's
// secrets directory), so the test's temporary directory can go.
func unmountUnder(dir string) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return
	}
	defer f.Close()
	var mounts []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) > 4 && strings.HasPrefix(fields[4], dir+"/") {
			mounts = append(mounts, fields[4])
		}
	}
	for i := len(mounts) - 1; i >= 0; i-- {
		_ = unix.Unmount(mounts[i], unix.MNT_DETACH)
	}
}

// get decodes a JSON answer of the agent's HTTP API.
func (a *agent) get(ctx context.Context, path string, v any) error {
	req, err := http.NewRequestWithContext(ctx, "GET", a.addr+path, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		return fmt.Errorf("GET %s: %s: %s", path, resp.Status, body)
	}
	return json.Unmarshal(body, v)
}

func (a *agent) post(ctx context.Context, path string, in, out any) error {
	b, err := json.Marshal(in)
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, "POST", a.addr+path, bytes.NewReader(b))
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		return fmt.Errorf("POST %s: %s: %s", path, resp.Status, body)
	}
	if out == nil {
		return nil
	}
	return json.Unmarshal(body, out)
}

// waitHealthy waits until the client node reports the driver healthy.
func (a *agent) waitHealthy(ctx context.Context, t *testing.T) {
	t.Helper()
	var last string
	for {
		var nodes []struct {
			ID, Status string
			Drivers    map[string]struct {
				Detected, Healthy bool
				HealthDescription string
			}
		}
		if err := a.get(ctx, "/v1/nodes", &nodes); err != nil {
			last = err.Error()
		} else if len(nodes) > 0 {
			d := nodes[0].Drivers[PluginName]
			last = fmt.Sprintf("node %s, driver %+v", nodes[0].Status, d)
			if nodes[0].Status == "ready" && d.Healthy {
				return
			}
		}
		select {
		case <-ctx.Done():
			t.Fatalf("the Nomad client never reported %s healthy (%s)", PluginName, last)
		case <-a.exited:
			t.Fatalf("the Nomad agent exited:\n%s", a.log.String())
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// allocation is the part of the API's allocation this test reads.
type allocation struct {
	ID, ClientStatus string
	TaskStates       map[string]struct {
		State  string
		Failed bool
		Events []struct {
			Type, DisplayMessage string
			ExitCode             int
			Details              map[string]string
		}
	}
}

// submit parses a job (HCL, with HCL2 variables) and registers it.
func (a *agent) submit(ctx context.Context, t *testing.T, hcl, variables string) {
	t.Helper()
	var job json.RawMessage
	if err := a.post(ctx, "/v1/jobs/parse", map[string]any{"JobHCL": hcl, "Canonicalize": true, "Variables": variables}, &job); err != nil {
		t.Fatal(err)
	}
	if err := a.post(ctx, "/v1/jobs", map[string]any{"Job": job}, nil); err != nil {
		t.Fatal(err)
	}
}

// waitAlloc waits until the job's allocation has one of the statuses.
func (a *agent) waitAlloc(ctx context.Context, t *testing.T, jobID string, statuses ...string) allocation {
	t.Helper()
	var last []allocation
	for {
		var allocs []allocation
		if err := a.get(ctx, "/v1/job/"+jobID+"/allocations", &allocs); err == nil && len(allocs) > 0 {
			last = allocs
			for _, s := range statuses {
				if allocs[0].ClientStatus == s {
					return allocs[0]
				}
			}
		}
		select {
		case <-ctx.Done():
			t.Fatalf("job %s: no allocation became %v: %+v", jobID, statuses, last)
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// runJob submits a batch job and waits for its allocation to end.
func (a *agent) runJob(ctx context.Context, t *testing.T, jobID, hcl string) allocation {
	t.Helper()
	a.submit(ctx, t, hcl, "")
	return a.waitAlloc(ctx, t, jobID, "complete", "failed", "lost")
}

// allocLogs runs `nomad alloc logs`.
func (a *agent) allocLogs(t *testing.T, allocID, task string, stderr bool) string {
	t.Helper()
	args := []string{"alloc", "logs", "-address=" + a.addr}
	if stderr {
		args = append(args, "-stderr")
	}
	out, err := exec.Command(a.bin, append(args, allocID, task)...).CombinedOutput()
	if err != nil {
		t.Fatalf("nomad alloc logs: %v\n%s", err, out)
	}
	return string(out)
}

const e2eJob = `
job %[1]q {
  datacenters = ["*"]
  type        = "batch"
  group "vm" {
    restart {
      attempts = 0
      mode     = "fail"
    }
    reschedule {
      attempts  = 0
      unlimited = false
    }
    task "hello" {
      driver = "firecracker-task-driver"
      env {
        EXIT_CODE = "%[3]d"
      }
      config {
        OCIImage = %[2]q
        Vcpus    = 1
        Mem      = 128
      }
      resources {
        cpu    = 200
        memory = 256
      }
    }
  }
}
`

// A real Nomad agent (v1.10.5, dev mode, 127.0.0.1) loads the plugin from
// its plugin directory, runs jobs whose tasks are OCI images from a local
// registry, reports the workloads' exit codes, and `nomad alloc logs`
// shows their output.
func TestNomadAgentEndToEnd(t *testing.T) {
	nomadAgent(t) // skips early without the agent
	e := newEnv(t)
	ref := e.busybox(t, "e2e", v1.Config{
		Cmd: []string{"/bin/sh", "-c", `echo "hello from $NOMAD_JOB_NAME in a microVM"; echo "a warning" >&2; exit $EXIT_CODE`},
		Env: []string{"PATH=/bin"},
	})
	a := startAgent(t, e, "")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	a.waitHealthy(ctx, t)

	ok := a.runJob(ctx, t, "fc-ok", fmt.Sprintf(e2eJob, "fc-ok", ref, 0))
	if ok.ClientStatus != "complete" {
		t.Errorf("fc-ok: allocation %s: %+v", ok.ClientStatus, ok.TaskStates)
	}
	if out := a.allocLogs(t, ok.ID, "hello", false); !strings.Contains(out, "hello from fc-ok in a microVM") {
		t.Errorf("nomad alloc logs: %q", out)
	}
	if out := a.allocLogs(t, ok.ID, "hello", true); !strings.Contains(out, "a warning") {
		t.Errorf("nomad alloc logs -stderr: %q", out)
	}
	var pulled bool
	for _, ev := range ok.TaskStates["hello"].Events {
		pulled = pulled || strings.Contains(ev.DisplayMessage, "Image pulled and converted")
	}
	if !pulled {
		t.Errorf("no pull event among the task's events: %+v", ok.TaskStates["hello"].Events)
	}

	failed := a.runJob(ctx, t, "fc-fail", fmt.Sprintf(e2eJob, "fc-fail", ref, 3))
	if failed.ClientStatus != "failed" {
		t.Errorf("fc-fail: allocation %s", failed.ClientStatus)
	}
	code := -1
	for _, ev := range failed.TaskStates["hello"].Events {
		if ev.Type == "Terminated" {
			code = ev.ExitCode
		}
	}
	if code != 3 {
		t.Errorf("fc-fail: terminated with exit code %d, want 3: %+v", code, failed.TaskStates["hello"].Events)
	}
	if out := a.allocLogs(t, failed.ID, "hello", false); !strings.Contains(out, "hello from fc-fail in a microVM") {
		t.Errorf("nomad alloc logs: %q", out)
	}
}

// The job files in examples/nomad run on a real agent, with only their
// image references (and the kernel path) pointed at this test's
// registries and kernel: the CNI network of `fireactions host setup`, a
// static NIC, a private registry through OCIAuth with an HCL2 variable,
// and a service stopped by `nomad job stop`.
func TestExampleJobs(t *testing.T) {
	netnstest.Require(t)
	if _, err := network.FindPlugin(network.PluginDirs(config.Network{BinDirs: config.DefaultCNIBinDirs}), "tc-redirect-tap"); err != nil {
		t.Skipf("needs the tc-redirect-tap CNI plugin (run scripts/build-cni.sh): %v", err)
	}
	nomadAgent(t)
	e := newEnv(t)
	t.Cleanup(func() { _ = unix.Unmount(e.pc.NetNSDir, unix.MNT_DETACH) })
	examples := filepath.Join(vmtest.RepoRoot(t), "examples", "nomad")
	read := func(name string, replace ...string) string {
		b, err := os.ReadFile(filepath.Join(examples, name))
		if err != nil {
			t.Fatal(err)
		}
		s := string(b)
		for i := 0; i < len(replace); i += 2 {
			if !strings.Contains(s, replace[i]) {
				t.Fatalf("%s no longer contains %q", name, replace[i])
			}
			s = strings.ReplaceAll(s, replace[i], replace[i+1])
		}
		return s
	}

	// The host network `fireactions host setup` installs (defaults:
	// network "fireactions" on bridge fireactions0), inside the test's
	// namespace.
	var cfg config.Config
	cfg.ApplyDefaults()
	cfg.Network.ConfDir = e.pc.CNIConfDir
	hostOpts := hostnet.OptionsFromConfig(&cfg, e.dir)
	hostOpts.Conflist.IPAMDataDir = filepath.Join(e.dir, "ipam")
	if _, err := hostnet.Setup(context.Background(), hostOpts); err != nil {
		t.Fatalf("host setup: %v", err)
	}
	t.Cleanup(func() { _, _ = hostnet.Teardown(context.Background(), hostOpts, true) })
	// The static NIC's tap, as the example's comment says.
	netnstest.Run(t, "ip", "tuntap", "add", "dev", "fctap0", "mode", "tap")
	netnstest.Run(t, "ip", "addr", "add", "192.168.50.1/24", "dev", "fctap0")
	netnstest.Run(t, "ip", "link", "set", "fctap0", "up")
	t.Cleanup(func() { _, _ = netnstest.Try("ip", "link", "del", "fctap0") })

	// The images the examples name, from local registries.
	busybox := runtimetest.PushBusybox(t, e.registry(t), "busybox", v1.Config{Cmd: []string{"sh"}, Env: []string{"PATH=/bin"}}, nil)
	ubuntu := runtimetest.PushBusybox(t, e.registry(t), "ubuntu", v1.Config{Cmd: []string{"/bin/bash"}, Env: []string{"PATH=/bin"}}, nil)
	const user, password = "myuser", "example-pw-41"
	private := imagetest.NewDockerRegistry(t, user, password)
	privateRef := private.Host + "/myorg/myapp:latest"
	imagetest.Push(t, privateRef, imagetest.Image(t, "linux/amd64",
		v1.Config{Cmd: []string{"/bin/sh", "-c", "echo private app running"}, Env: []string{"PATH=/bin"}},
		runtimetest.BusyboxLayer(t, nil)), &authn.Basic{Username: user, Password: password})

	e.pc.AllowedImagePaths = append(e.pc.AllowedImagePaths, filepath.Dir(e.pc.Kernel))
	a := startAgent(t, e, fmt.Sprintf("cni_conf_dir = %q\n    netns_dir = %q", e.pc.CNIConfDir, e.pc.NetNSDir))
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	a.waitHealthy(ctx, t)
	kernel := "/var/lib/fireactions/kernels/vmlinux"

	// oci-simple: Args replaces the image's Cmd.
	simple := a.runJob(ctx, t, "oci-simple", read("oci-simple.hcl", "busybox:1.36", busybox))
	if simple.ClientStatus != "complete" {
		t.Errorf("oci-simple: %s %+v", simple.ClientStatus, simple.TaskStates)
	}
	if out := a.allocLogs(t, simple.ID, "hello", false); out != "hello from a microVM\n" {
		t.Errorf("oci-simple logs: %q", out)
	}

	// static-nic: the guest has the address and reaches the gateway.
	static := a.runJob(ctx, t, "static-nic", read("static-nic.hcl", "busybox:1.36", busybox))
	out := a.allocLogs(t, static.ID, "pinger", false)
	if static.ClientStatus != "complete" || !strings.Contains(out, "inet 192.168.50.10/24") || !strings.Contains(out, " 0% packet loss") {
		t.Errorf("static-nic: %s, logs:\n%s", static.ClientStatus, out)
	}

	// oci-private-registry: OCIAuth with the password from a variable.
	a.submit(ctx, t, read("oci-private-registry.hcl", "registry.example.com/myorg/myapp:latest", privateRef, kernel, e.pc.Kernel),
		fmt.Sprintf("registry_password = %q\n", password))
	priv := a.waitAlloc(ctx, t, "oci-private-registry", "complete", "failed", "lost")
	if priv.ClientStatus != "complete" {
		t.Errorf("oci-private-registry: %s %+v", priv.ClientStatus, priv.TaskStates)
	}
	if out := a.allocLogs(t, priv.ID, "app", false); !strings.Contains(out, "private app running") {
		t.Errorf("oci-private-registry logs: %q", out)
	}

	// oci-example: a service on the default CNI network, until stopped.
	a.submit(ctx, t, read("oci-example.hcl", `"ubuntu:22.04"`, fmt.Sprintf("%q", ubuntu), kernel, e.pc.Kernel), "")
	svc := a.waitAlloc(ctx, t, "oci-example", "running", "failed", "lost")
	if svc.ClientStatus != "running" {
		t.Fatalf("oci-example: %s %+v", svc.ClientStatus, svc.TaskStates)
	}
	for !strings.Contains(a.allocLogs(t, svc.ID, "ubuntu-vm", false), "up on ubuntu-vm") {
		select {
		case <-ctx.Done():
			t.Fatalf("oci-example never printed its line: %q", a.allocLogs(t, svc.ID, "ubuntu-vm", false))
		case <-time.After(250 * time.Millisecond):
		}
	}
	if out, err := exec.Command(a.bin, "job", "stop", "-detach", "-address="+a.addr, "oci-example").CombinedOutput(); err != nil {
		t.Fatalf("nomad job stop: %v\n%s", err, out)
	}
	svc = a.waitAlloc(ctx, t, "oci-example", "complete", "failed", "lost")
	if svc.ClientStatus != "complete" {
		t.Errorf("oci-example after stop: %s %+v", svc.ClientStatus, svc.TaskStates)
	}
	if strings.Contains(a.log.String(), password) {
		t.Error("the agent's log (which carries the plugin's) holds the registry password")
	}
}
