//go:build linux

package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/fireactions/fireactions/internal/agent"
	"github.com/fireactions/fireactions/internal/guest"
)

// This binary is also the guest agent: started as fireactions-agent (the
// name it is installed under), it runs agent.Main instead of being PID 1.
// The agent thus ships inside every initramfs and always matches the
// host's version; images need not carry it.

// runAsAgent reports whether argv[0] names the agent.
func runAsAgent() bool { return filepath.Base(os.Args[0]) == filepath.Base(agent.GuestPath) }

// agentRequested reports whether the kernel command line asks for the
// agent (the runner pools add agent.KernelArg).
func agentRequested() bool {
	b, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		return false
	}
	for _, f := range strings.Fields(string(b)) {
		if f == agent.KernelArg {
			return true
		}
	}
	return false
}

// installAgent copies this binary to agent.GuestPath in the new root's
// /run. In system mode it also leaves the agent its environment (the JIT
// configuration among it) in a root-only file and, unless the image brings
// its own, installs and enables the agent's systemd unit.
func (in *initProcess) installAgent() error {
	self, err := os.Open("/proc/self/exe")
	if err != nil {
		return fmt.Errorf("install the agent: %w", err)
	}
	defer self.Close()
	if err := os.MkdirAll(filepath.Dir(agent.GuestPath), 0o755); err != nil {
		return fmt.Errorf("install the agent: %w", err)
	}
	dst, err := os.OpenFile(agent.GuestPath, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o755)
	if err != nil {
		return fmt.Errorf("install the agent: %w", err)
	}
	_, err = io.Copy(dst, self)
	if cerr := dst.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("install the agent: %w", err)
	}
	if in.cfg.Mode != guest.ModeSystem {
		return nil
	}
	var env bytes.Buffer
	for _, kv := range in.cfg.Process.Env {
		if strings.HasPrefix(kv, "FIREACTIONS_") {
			env.WriteString(kv + "\n")
		}
	}
	if err := os.WriteFile(agent.EnvPath, env.Bytes(), 0o600); err != nil {
		return fmt.Errorf("install the agent: %w", err)
	}
	if _, err := os.Stat("/etc/systemd/system/fireactions-agent.service"); err == nil {
		return nil // the image's own unit
	}
	wants := filepath.Join(filepath.Dir(agent.UnitPath), "multi-user.target.wants")
	if err := os.MkdirAll(wants, 0o755); err != nil {
		return fmt.Errorf("install the agent unit: %w", err)
	}
	if err := os.WriteFile(agent.UnitPath, []byte(agent.Unit), 0o644); err != nil {
		return fmt.Errorf("install the agent unit: %w", err)
	}
	link := filepath.Join(wants, filepath.Base(agent.UnitPath))
	os.Remove(link)
	if err := os.Symlink(agent.UnitPath, link); err != nil {
		return fmt.Errorf("enable the agent unit: %w", err)
	}
	return nil
}

// handOffConsole leaves the agent the console key and the last frame
// number, just before the image's init replaces this process: the agent
// goes on sending authenticated frames. The file is on the tmpfs /run,
// readable by root only, and the agent deletes it once read; a root
// process of the guest could read PID 1's memory for the key anyway.
func (in *initProcess) handOffConsole() error {
	b, err := json.Marshal(agent.Handoff{Key: in.cfg.ConsoleKey, Last: in.fw.Last()})
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(agent.HandoffPath), 0o700); err != nil {
		return err
	}
	return os.WriteFile(agent.HandoffPath, b, 0o600)
}
