package cli

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spf13/cobra"
)

func runHostCLI(args ...string) (int, string, string) {
	var out, errb bytes.Buffer
	code := Main(args, &out, &errb)
	return code, out.String(), errb.String()
}

func TestHostCheckExitCodes(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "vmlinux")
	code, out, _ := runHostCLI("host", "check", "--backend", "qemu", "--kernel", missing, "--data-dir", t.TempDir())
	if code != 1 {
		t.Errorf("missing kernel: exit %d, want 1\n%s", code, out)
	}
	for _, want := range []string{"FAIL  kernel", "fix: install an uncompressed ELF vmlinux", "backend qemu: FAIL: cannot run: ", "disk space"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	code, _, errOut := runHostCLI("host", "check", "--backend", "kvm")
	if code != 2 || !strings.Contains(errOut, `--backend: "kvm" is not auto, firecracker or qemu`) {
		t.Errorf("bad backend: exit %d, %q", code, errOut)
	}
}

func TestHostConfigDefaultsWithoutFile(t *testing.T) {
	g := &Globals{ConfigPath: filepath.Join(t.TempDir(), "absent.yaml")}
	cmd := &cobra.Command{}
	cmd.Flags().StringVarP(&g.ConfigPath, "config", "c", g.ConfigPath, "")
	cfg, err := loadHostConfig(cmd, g)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Network.Bridge != "fireactions0" || cfg.Network.Subnet != "10.200.0.0/24" {
		t.Errorf("defaults not applied: %+v", cfg.Network)
	}
	// An explicit -c must exist.
	if err := cmd.Flags().Set("config", g.ConfigPath); err != nil {
		t.Fatal(err)
	}
	if _, err := loadHostConfig(cmd, g); err == nil || !strings.Contains(err.Error(), "absent.yaml") {
		t.Errorf("explicit missing config: err = %v", err)
	}
}

const hostNetnsEnv = "FIREACTIONS_CLI_HOST_NETNS"

// TestHostSetupTeardown runs `host setup` twice and `host teardown` in a
// network namespace of its own: the test binary re-runs itself there with
// `ip netns exec`, so nothing touches the host's interfaces or rules.
func TestHostSetupTeardown(t *testing.T) {
	if os.Getenv(hostNetnsEnv) == "" {
		if os.Geteuid() != 0 {
			t.Skip("needs root (CAP_NET_ADMIN) to create a network namespace")
		}
		name := fmt.Sprintf("fa-cli-%d", os.Getpid())
		if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
			t.Fatalf("ip netns add: %v %s", err, out)
		}
		defer exec.Command("ip", "netns", "del", name).Run()
		cmd := exec.Command("ip", "netns", "exec", name, os.Args[0], "-test.run=^TestHostSetupTeardown$", "-test.v")
		cmd.Env = append(os.Environ(), hostNetnsEnv+"=1")
		out, err := cmd.CombinedOutput()
		if err != nil || !strings.Contains(string(out), "--- PASS: TestHostSetupTeardown") {
			t.Fatalf("in the namespace: %v\n%s", err, out)
		}
		return
	}

	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "config.yaml")
	cfg := fmt.Sprintf(`github:
  app_id: 1
  private_key_file: /etc/fireactions/app.pem
network:
  bridge: facli0
  subnet: 10.230.0.0/24
  gateway: 10.230.0.1
  conf_dir: %s/cni
pools:
  - name: p
    max_runners: 1
    runner:
      organization: acme
`, dir)
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	base := []string{"-c", cfgPath, "--data-dir", filepath.Join(dir, "data")}
	code, out, errOut := runHostCLI(append([]string{"host", "setup"}, base...)...)
	if code != 0 || !strings.Contains(out, "host network fireactions ready (10.230.0.0/24 on facli0)") {
		t.Fatalf("setup: exit %d\n%s%s", code, out, errOut)
	}
	code, out, errOut = runHostCLI(append([]string{"host", "setup"}, base...)...)
	if code != 0 || strings.Count(out, "(already)") != 4 {
		t.Fatalf("second setup: exit %d, want every step already done\n%s%s", code, out, errOut)
	}
	rules, err := exec.Command("nft", "list", "tables").CombinedOutput()
	if err != nil || !strings.Contains(string(rules), "table inet fireactions_facli0") {
		t.Fatalf("nft list tables: %v\n%s", err, rules)
	}
	if _, err := os.Stat(filepath.Join(dir, "cni", "fireactions.conflist")); err != nil {
		t.Errorf("conflist: %v", err)
	}
	code, out, errOut = runHostCLI(append([]string{"host", "teardown"}, base...)...)
	if code != 0 {
		t.Fatalf("teardown: exit %d\n%s%s", code, out, errOut)
	}
	rules, _ = exec.Command("nft", "list", "tables").CombinedOutput()
	if strings.Contains(string(rules), "fireactions_facli0") {
		t.Errorf("tables left after teardown:\n%s", rules)
	}
	if err := exec.Command("ip", "link", "show", "facli0").Run(); err == nil {
		t.Error("bridge left after teardown")
	}
}
