package agent

import (
	"bufio"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/fireactions/fireactions/internal/guest"
)

// Files the guest init leaves for the agent in system mode, on the tmpfs
// /run, readable by root only. The agent reads and deletes them.
const (
	// HandoffPath holds the console key and the last frame number the init
	// sent (JSON Handoff): the agent continues the init's authenticated
	// frames on the console.
	HandoffPath = "/run/fireactions/console.json"
	// EnvPath holds the FIREACTIONS_* variables of the VM's process
	// environment, one KEY=VALUE per line, among them the JIT
	// configuration.
	EnvPath = "/run/fireactions/agent.env"
	// UnitPath is where the init installs the agent's systemd unit when the
	// image has none in /etc/systemd/system.
	UnitPath = "/run/systemd/system/fireactions-agent.service"
)

// EnvJITConfig is the variable that carries the encoded JIT configuration
// to the agent: in app mode the agent's own environment (root only), in
// system mode EnvPath. It never travels through the metadata service, which
// every process in the VM can read.
const EnvJITConfig = "FIREACTIONS_JITCONFIG"

// Handoff is the console key the init hands to the agent in system mode.
type Handoff struct {
	Key  []byte `json:"key"`
	Last uint64 `json:"last"`
}

// Unit is the systemd unit of the agent in system mode: it writes the
// registry mirror configuration before Docker and containerd start (it
// signals readiness once done), then runs the runner.
const Unit = `[Unit]
Description=fireactions guest agent (GitHub Actions runner)
Before=docker.service containerd.service buildkit.service
Wants=network-online.target
After=network-online.target

[Service]
Type=notify
NotifyAccess=main
ExecStart=` + GuestPath + `
Restart=no
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
`

// Options configure the agent; the zero value of each field has a default.
type Options struct {
	// RunnerDir holds the actions runner (run.sh). Default /home/runner.
	RunnerDir string
	// User runs the runner. Default runner.
	User string
	// MetadataURL is the metadata service. Default http://169.254.169.254.
	MetadataURL string
	// MetadataWait bounds the wait for the metadata service to answer
	// after boot. Default 30s.
	MetadataWait time.Duration
	// Root is the guest's root directory (tests use a temporary one).
	// Default /.
	Root string
	// Reports receives report lines; default: the console in system mode
	// (after a handoff), else stdout.
	Reports io.Writer
	// Output receives the runner's output; default stderr.
	Output io.Writer
	// PowerOff ends the VM after the runner; default: nothing in app mode
	// (the init powers off when the agent exits), a reboot in system mode.
	PowerOff func() error
	Logger   *slog.Logger
}

// Main is the agent's command line: fireactions-agent [flags].
func Main(args []string) int {
	fs := flag.NewFlagSet("fireactions-agent", flag.ContinueOnError)
	var o Options
	fs.StringVar(&o.RunnerDir, "runner-dir", "/home/runner", "directory of the actions runner (run.sh)")
	fs.StringVar(&o.User, "user", "runner", "user that runs the runner")
	fs.StringVar(&o.MetadataURL, "metadata-url", "http://169.254.169.254", "metadata service")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if err := Run(context.Background(), o); err != nil {
		fmt.Fprintln(os.Stderr, "fireactions-agent:", err)
		return 1
	}
	return 0
}

// Run is the agent: it applies the registry cache configuration, runs the
// runner and reports its state until it exits, then powers the VM off.
func Run(ctx context.Context, o Options) error {
	if o.RunnerDir == "" {
		o.RunnerDir = "/home/runner"
	}
	if o.User == "" {
		o.User = "runner"
	}
	if o.MetadataURL == "" {
		o.MetadataURL = "http://169.254.169.254"
	}
	if o.Root == "" {
		o.Root = "/"
	}
	if o.MetadataWait == 0 {
		o.MetadataWait = 30 * time.Second
	}
	if o.Output == nil {
		o.Output = os.Stderr
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.NewTextHandler(o.Output, nil)).With("component", "fireactions-agent")
	}
	system := false
	if o.Reports == nil {
		w, ok, err := consoleReports(o.Root)
		if err != nil {
			o.Logger.Error("console handoff", "error", err)
		}
		if ok {
			o.Reports, system = w, true
		} else {
			o.Reports = os.Stdout
		}
	}
	if o.PowerOff == nil {
		if system {
			o.PowerOff = reboot
		} else {
			o.PowerOff = func() error { return nil }
		}
	}
	a := &agentRun{o: o, log: o.Logger}
	err := a.run(ctx)
	if err != nil {
		a.report(StateFailed, err.Error())
	}
	if perr := o.PowerOff(); perr != nil {
		o.Logger.Error("power off", "error", perr)
	}
	return err
}

type agentRun struct {
	o      Options
	log    *slog.Logger
	mu     sync.Mutex
	runner string
	state  State
}

// report sends a state change once.
func (a *agentRun) report(s State, msg string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if s == a.state && msg == "" {
		return
	}
	a.state = s
	if _, err := a.o.Reports.Write(Report{State: s, Runner: a.runner, Time: time.Now(), Message: msg}.Line()); err != nil {
		a.log.Error("report state", "state", s, "error", err)
	}
}

func (a *agentRun) run(ctx context.Context) error {
	jit, err := jitConfig(a.o.Root)
	if err != nil {
		return err
	}
	a.runner = runnerName(jit)
	a.report(StateStarting, "")
	if err := a.applyRegistryCache(ctx); err != nil {
		return err
	}
	// systemd starts Docker and containerd (ordered after this unit) once
	// the mirrors are in place.
	notifyReady()
	return a.runRunner(ctx, jit)
}

// jitConfig takes the JIT configuration from the environment (app mode) or
// the file the init left (system mode), and removes it from both.
func jitConfig(root string) (string, error) {
	if v := os.Getenv(EnvJITConfig); v != "" {
		os.Unsetenv(EnvJITConfig)
		return v, nil
	}
	p := filepath.Join(root, EnvPath)
	data, err := os.ReadFile(p)
	if err != nil {
		return "", fmt.Errorf("no JIT configuration: %s is not set and %s: %w", EnvJITConfig, EnvPath, err)
	}
	os.Remove(p)
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, EnvJITConfig+"="); ok && v != "" {
			return v, nil
		}
	}
	return "", fmt.Errorf("no JIT configuration: %s lacks %s", EnvPath, EnvJITConfig)
}

// runnerName reads the runner's name out of a JIT configuration (base64
// JSON whose ".runner" member is base64 JSON with "agentName"), for the
// reports; an unreadable one just leaves the name out.
func runnerName(jit string) string {
	outer, err := base64.StdEncoding.DecodeString(jit)
	if err != nil {
		return ""
	}
	var parts map[string]string
	if json.Unmarshal(outer, &parts) != nil {
		return ""
	}
	inner, err := base64.StdEncoding.DecodeString(parts[".runner"])
	if err != nil {
		return ""
	}
	var r struct {
		AgentName string `json:"agentName"`
	}
	if json.Unmarshal(inner, &r) != nil {
		return ""
	}
	return r.AgentName
}

// registryCache is the registry-cache guest configuration as
// internal/registrycache.GuestConfig encodes it into the metadata (that
// package is not linked into the agent, which ships inside the static
// guest init; a test checks that the two agree).
type registryCache struct {
	Files []struct {
		Path    string    `json:"path"`
		Mode    octalMode `json:"mode"`
		Content string    `json:"content"`
	} `json:"files"`
	UpdateCATrust bool `json:"update_ca_trust,omitempty"`
}

// octalMode is a permission mode written as an octal string ("0644").
type octalMode uint32

func (m *octalMode) UnmarshalText(b []byte) error {
	v, err := strconv.ParseUint(string(b), 8, 32)
	if err != nil || v > 0o777 {
		return fmt.Errorf("mode %q: want octal permission bits such as 0644", b)
	}
	*m = octalMode(v)
	return nil
}

// keyRegistryCache is metadata.KeyRegistryCache.
const keyRegistryCache = "fireactions/registry-cache"

// applyRegistryCache writes the registry mirror configuration the metadata
// carries, if any.
func (a *agentRun) applyRegistryCache(ctx context.Context) error {
	raw, found, err := fetchMetadata(ctx, a.o.MetadataURL, "latest/meta-data/"+keyRegistryCache, a.o.MetadataWait)
	if err != nil {
		// A VM without the metadata service (e.g. started by hand) gets no
		// mirrors; everything else still works.
		a.log.Warn("metadata service unreachable; no registry mirror configuration", "error", err)
		return nil
	}
	if !found {
		return nil
	}
	var rc registryCache
	dec := json.NewDecoder(strings.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&rc); err != nil {
		return fmt.Errorf("registry cache configuration in the metadata: %w", err)
	}
	for i, f := range rc.Files {
		if !path.IsAbs(f.Path) || path.Clean(f.Path) != f.Path {
			return fmt.Errorf("registry cache configuration: files[%d].path %q is not absolute and clean", i, f.Path)
		}
		if err := writeAtomic(filepath.Join(a.o.Root, f.Path), []byte(f.Content), os.FileMode(f.Mode)); err != nil {
			return err
		}
	}
	if rc.UpdateCATrust {
		if out, err := exec.CommandContext(ctx, "update-ca-certificates").CombinedOutput(); err != nil {
			return fmt.Errorf("update-ca-certificates: %v: %s", err, out)
		}
	}
	a.log.Info("registry mirror configuration written", "files", len(rc.Files))
	return nil
}

func writeAtomic(dst string, data []byte, mode os.FileMode) error {
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(dst), "."+filepath.Base(dst)+".*")
	if err != nil {
		return err
	}
	_, werr := tmp.Write(data)
	if werr == nil {
		werr = tmp.Chmod(mode)
	}
	if cerr := tmp.Close(); werr == nil {
		werr = cerr
	}
	if werr == nil {
		werr = os.Rename(tmp.Name(), dst)
	}
	if werr != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("write %s: %w", dst, werr)
	}
	return nil
}

// fetchMetadata GETs one metadata leaf (MMDS V1, or V2 with a session
// token when the service demands one). found is false for a 404. The
// metadata NIC may need a moment after boot, so connection errors are
// retried for up to wait.
func fetchMetadata(ctx context.Context, base, leaf string, wait time.Duration) (string, bool, error) {
	c := &http.Client{Timeout: 5 * time.Second}
	url := strings.TrimSuffix(base, "/") + "/" + leaf
	deadline := time.Now().Add(wait)
	token := ""
	for {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return "", false, err
		}
		if token != "" {
			req.Header.Set("X-metadata-token", token)
		}
		resp, err := c.Do(req)
		if err != nil {
			var ne net.Error
			if time.Now().Before(deadline) && (errors.As(err, &ne) || errors.Is(err, syscall.ECONNREFUSED)) {
				select {
				case <-ctx.Done():
					return "", false, ctx.Err()
				case <-time.After(500 * time.Millisecond):
				}
				continue
			}
			return "", false, err
		}
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
		resp.Body.Close()
		switch {
		case resp.StatusCode == http.StatusOK:
			return string(body), true, nil
		case resp.StatusCode == http.StatusNotFound:
			return "", false, nil
		case resp.StatusCode == http.StatusUnauthorized && token == "":
			if token, err = metadataToken(ctx, c, base); err != nil {
				return "", false, err
			}
			continue
		}
		return "", false, fmt.Errorf("metadata %s: HTTP %d", leaf, resp.StatusCode)
	}
}

func metadataToken(ctx context.Context, c *http.Client, base string) (string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPut, strings.TrimSuffix(base, "/")+"/latest/api/token", nil)
	if err != nil {
		return "", err
	}
	req.Header.Set("X-metadata-token-ttl-seconds", "300")
	resp, err := c.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("metadata token: HTTP %d", resp.StatusCode)
	}
	return strings.TrimSpace(string(b)), nil
}

// Lines of the actions runner's output that mark its state.
const (
	runnerIdleLine = "Listening for Jobs"
	runnerBusyLine = "Running job:"
)

// runRunner runs run.sh --jitconfig as the runner user, watches its output
// for state changes, forwards stop and user signals to it, and reports
// done when it exits.
func (a *agentRun) runRunner(ctx context.Context, jit string) error {
	u, err := guest.LookupUser(os.DirFS(a.o.Root), a.o.User)
	if err != nil {
		return fmt.Errorf("runner user: %w", err)
	}
	dir := filepath.Join(a.o.Root, a.o.RunnerDir)
	script := filepath.Join(dir, "run.sh")
	if _, err := os.Stat(script); err != nil {
		return fmt.Errorf("actions runner: %w", err)
	}
	cmd := exec.CommandContext(ctx, script, "--jitconfig", jit)
	cmd.Dir = dir
	cmd.Env = []string{"HOME=" + u.Home, "USER=" + u.Name, "LOGNAME=" + u.Name,
		"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"}
	cred := &syscall.Credential{Uid: u.UID, Gid: u.GID, Groups: u.Groups}
	if os.Getuid() != 0 {
		cred = nil // tests run unprivileged
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred, Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM) }
	cmd.WaitDelay = 30 * time.Second
	pr, pw := io.Pipe()
	cmd.Stdout, cmd.Stderr = pw, pw
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start the actions runner: %w", err)
	}
	a.log.Info("actions runner started", "runner", a.runner, "pid", cmd.Process.Pid, "user", u.Name)

	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP, syscall.SIGUSR1, syscall.SIGUSR2)
	defer signal.Stop(sigs)
	go func() {
		for s := range sigs {
			syscall.Kill(-cmd.Process.Pid, s.(syscall.Signal))
		}
	}()
	scanDone := make(chan struct{})
	go func() {
		defer close(scanDone)
		sc := bufio.NewScanner(pr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			line := sc.Text()
			fmt.Fprintln(a.o.Output, line)
			switch {
			case strings.Contains(line, runnerBusyLine):
				a.report(StateBusy, "")
			case strings.Contains(line, runnerIdleLine):
				a.mu.Lock()
				busy := a.state == StateBusy
				a.mu.Unlock()
				if !busy {
					a.report(StateIdle, "")
				}
			}
		}
		io.Copy(io.Discard, pr)
	}()
	werr := cmd.Wait()
	pw.Close()
	<-scanDone
	status := "exit status 0"
	if werr != nil {
		status = werr.Error()
	}
	a.report(StateDone, status)
	a.log.Info("actions runner exited", "status", status)
	return nil
}

// notifyReady tells systemd (Type=notify) that the mirrors are written.
func notifyReady() {
	sock := os.Getenv("NOTIFY_SOCKET")
	if sock == "" {
		return
	}
	if strings.HasPrefix(sock, "@") {
		sock = "\x00" + sock[1:]
	}
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		return
	}
	defer c.Close()
	c.Write([]byte("READY=1"))
}

// consoleReports opens the console for authenticated frames when the init
// left a handoff (system mode).
func consoleReports(root string) (io.Writer, bool, error) {
	p := filepath.Join(root, HandoffPath)
	data, err := os.ReadFile(p)
	if errors.Is(err, os.ErrNotExist) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, err
	}
	os.Remove(p)
	var h Handoff
	if err := json.Unmarshal(data, &h); err != nil || len(h.Key) < 16 {
		return nil, false, fmt.Errorf("%s: not a console handoff", HandoffPath)
	}
	console, err := os.OpenFile(filepath.Join(root, "dev/console"), os.O_WRONLY|syscall.O_NOCTTY, 0)
	if err != nil {
		return nil, false, err
	}
	// The host accepts only numbers above the last it saw: continue the
	// init's numbering.
	fw := guest.NewWriterAfter(console, h.Key, h.Last)
	return lineFrames{fw: fw}, true, nil
}

// lineFrames sends each report line as one stdout frame, which the host
// reads from the VM's stdout stream as in app mode.
type lineFrames struct{ fw *guest.FrameWriter }

func (l lineFrames) Write(p []byte) (int, error) {
	if err := l.fw.WriteFrame(guest.FrameStdout, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

func reboot() error {
	syscall.Sync()
	if err := exec.Command("systemctl", "reboot").Run(); err == nil {
		return nil
	}
	return syscall.Reboot(syscall.LINUX_REBOOT_CMD_RESTART)
}
