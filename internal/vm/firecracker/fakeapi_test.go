package firecracker_test

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/fireactions/fireactions/internal/vm"
	"github.com/fireactions/fireactions/internal/vm/vmtest"
)

// fakeAPI is a fakefc process driven over raw HTTP.
type fakeAPI struct {
	t      *testing.T
	dir    string
	cmd    *exec.Cmd
	client *http.Client
}

func startFake(t *testing.T, args ...string) *fakeAPI {
	t.Helper()
	dir := t.TempDir()
	sock := filepath.Join(dir, "api.sock")
	log := filepath.Join(dir, "fc.log")
	if err := os.WriteFile(log, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(fake(t), append([]string{"--api-sock", sock, "--id", "raw-1", "--log-path", log, "--level", "Info"}, args...)...)
	cmd.Stdin, _ = os.Open(os.DevNull)
	cmd.Stdout, cmd.Stderr = io.Discard, os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	f := &fakeAPI{t: t, dir: dir, cmd: cmd, client: &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) { return vm.DialUnix(ctx, sock) },
	}}}
	// Answering GET / is the sign of life.
	ctx := waitCtx(t)
	for {
		if code, _ := f.do("GET", "/", ""); code == 200 {
			return f
		}
		select {
		case <-ctx.Done():
			t.Fatal("fakefc never answered")
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// do sends a request and returns the status and the fault message or body.
func (f *fakeAPI) do(method, path, body string) (int, string) {
	req, err := http.NewRequest(method, "http://localhost"+path, strings.NewReader(body))
	if err != nil {
		f.t.Fatal(err)
	}
	resp, err := f.client.Do(req)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var fault struct {
		FaultMessage string `json:"fault_message"`
	}
	if resp.StatusCode == 400 && json.Unmarshal(b, &fault) == nil {
		return resp.StatusCode, fault.FaultMessage
	}
	return resp.StatusCode, string(b)
}

// The fake refuses what Firecracker's swagger file does not allow, and
// applies the pre-boot and post-boot rules.
func TestFakeValidatesRequests(t *testing.T) {
	vmtest.RequireQEMU(t)
	kernel, mods := vmtest.Kernel(t)
	initrd := vmtest.BusyboxInitrd(t, mods, `echo up; exec sleep 1000`)
	f := startFake(t)
	rejected := []struct {
		method, path, body, want string
	}{
		{"GET", "/nope", "", "Invalid request method and/or path: GET /nope"},
		{"DELETE", "/machine-config", "", "Invalid request method and/or path"},
		{"PUT", "/machine-config", `{"vcpu_count": 2}`, "mem_size_mib in body is required"},
		{"PUT", "/machine-config", `{"vcpu_count": "2", "mem_size_mib": 128}`, "vcpu_count in body must be of type integer"},
		{"PUT", "/machine-config", `{"vcpu_count": 33, "mem_size_mib": 128}`, "vcpu_count in body should be less than or equal to 32"},
		{"PUT", "/machine-config", `{"vcpu_count": 2, "mem_size_mib": 128, "cpu_template": "T9"}`, "cpu_template in body should be one of"},
		{"PUT", "/machine-config", `{"vcpu_count": 2, "mem_size_mib": 128, "vcpus": 2}`, "vcpus in body is a forbidden property"},
		{"PUT", "/machine-config", `{"vcpu_count": 3, "mem_size_mib": 128, "smt": true}`, "only be 1 or an even number"},
		{"PUT", "/machine-config", `{"vcpu_count": 2,`, "deserializing the json body"},
		{"PUT", "/drives/rootfs", `{"drive_id": "rootfs", "path_on_host": "/x", "is_read_only": true}`, "is_root_device in body is required"},
		{"PUT", "/drives/rootfs", `{"drive_id": "other", "path_on_host": "/x", "is_read_only": true, "is_root_device": false}`, "does not match the id from the body"},
		{"PUT", "/drives/rootfs", `{"drive_id": "rootfs", "path_on_host": "/nonexistent", "is_read_only": true, "is_root_device": false, "rate_limiter": {"bandwidth": {"size": 1, "refill_time": 1, "x": 1}}}`, "forbidden property"},
		{"PUT", "/boot-source", `{"kernel_image_path": "/nonexistent"}`, "The kernel file cannot be opened"},
		{"PUT", "/mmds/config", `{"network_interfaces": ["9"]}`, "does not correspond to any existing network interface"},
		{"PUT", "/mmds/config", `{"network_interfaces": [], "version": "V3"}`, "version in body should be one of [V1 V2]"},
		{"PUT", "/actions", `{"action_type": "Reboot"}`, "action_type in body should be one of"},
		{"PUT", "/actions", `{"action_type": "SendCtrlAltDel"}`, "not supported before starting the microVM"},
		{"PUT", "/actions", `{"action_type": "InstanceStart"}`, "Cannot start microvm without kernel configuration"},
		{"PATCH", "/mmds", `{"a": "b"}`, "not initialized"},
		{"PUT", "/vsock", `{"guest_cid": 2, "uds_path": "/tmp/v.sock"}`, "guest_cid in body should be greater than or equal to 3"},
	}
	for _, r := range rejected {
		code, msg := f.do(r.method, r.path, r.body)
		if code != 400 || !strings.Contains(msg, r.want) {
			t.Errorf("%s %s %s: %d %q, want 400 with %q", r.method, r.path, r.body, code, msg, r.want)
		}
	}

	ok := []struct{ method, path, body string }{
		{"PUT", "/machine-config", `{"vcpu_count": 1, "mem_size_mib": 256}`},
		// The swagger file gives PATCH the full schema, required fields
		// included.
		{"PATCH", "/machine-config", `{"vcpu_count": 1, "mem_size_mib": 192}`},
		{"PUT", "/boot-source", `{"kernel_image_path": "` + kernel + `", "initrd_path": "` + initrd + `", "boot_args": "console=ttyS0 quiet panic=-1 reboot=k"}`},
		{"PUT", "/mmds", `{"latest": {"meta-data": {"instance-id": "i-1"}}}`},
		{"PATCH", "/mmds", `{"latest": {"meta-data": {"local-hostname": "h"}}}`},
		{"PUT", "/actions", `{"action_type": "InstanceStart"}`},
	}
	for _, r := range ok {
		if code, msg := f.do(r.method, r.path, r.body); code != 204 {
			t.Fatalf("%s %s %s: %d %q, want 204", r.method, r.path, r.body, code, msg)
		}
	}
	if code, body := f.do("GET", "/machine-config", ""); code != 200 || !strings.Contains(body, `"mem_size_mib":192`) {
		t.Errorf("GET /machine-config: %d %s", code, body)
	}
	if code, body := f.do("GET", "/mmds", ""); code != 200 || body != `{"latest":{"meta-data":{"instance-id":"i-1","local-hostname":"h"}}}`+"\n" {
		t.Errorf("GET /mmds after PATCH: %d %s", code, body)
	}
	if code, body := f.do("GET", "/", ""); code != 200 || !strings.Contains(body, `"state":"Running"`) || !strings.Contains(body, `"id":"raw-1"`) {
		t.Errorf("GET /: %d %s", code, body)
	}
	for _, r := range []struct{ method, path, body string }{
		{"PUT", "/machine-config", `{"vcpu_count": 1, "mem_size_mib": 256}`},
		{"PUT", "/boot-source", `{"kernel_image_path": "` + kernel + `"}`},
		{"PUT", "/actions", `{"action_type": "InstanceStart"}`},
	} {
		if code, msg := f.do(r.method, r.path, r.body); code != 400 || !strings.Contains(msg, "not supported after starting the microVM") {
			t.Errorf("%s %s after boot: %d %q, want the post-boot refusal", r.method, r.path, code, msg)
		}
	}
	if code, msg := f.do("PUT", "/actions", `{"action_type": "SendCtrlAltDel"}`); code != 204 {
		t.Errorf("SendCtrlAltDel after boot: %d %q", code, msg)
	}
	// Killed, the fake takes its guest along.
	f.cmd.Process.Signal(syscall.SIGKILL)
	f.cmd.Wait()
	for _, pid := range vm.ProcessesMatching(f.dir) {
		t.Errorf("process %d outlived the fake", pid)
	}
}

func TestFakeCommandLine(t *testing.T) {
	for _, args := range [][]string{
		{"--id", "bad_id"},
		{"--unknown-flag"},
		{"--level", "Loud"},
	} {
		err := exec.Command(fake(t), args...).Run()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 153 {
			t.Errorf("fakefc %v: %v, want exit 153 (argument parsing)", args, err)
		}
	}
	out, err := exec.Command(fake(t), "--version").Output()
	if err != nil || !strings.HasPrefix(string(out), "Firecracker v1.") {
		t.Fatalf("--version: %q %v", out, err)
	}
}
