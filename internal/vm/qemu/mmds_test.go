package qemu_test

import (
	"bufio"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/fireactions/fireactions/internal/metadata"
	"github.com/fireactions/fireactions/internal/vm/qemu"
)

// helperConn runs the metadata helper the way slirp does, with one end of
// a socket pair as its stdin, stdout and stderr, and returns the other end.
func helperConn(t *testing.T, args ...string) (net.Conn, *exec.Cmd) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	child := os.NewFile(uintptr(fds[1]), "guest-conn")
	ours := os.NewFile(uintptr(fds[0]), "host-conn")
	cmd := exec.Command(os.Args[0], append([]string{qemu.MetadataHelperArg}, args...)...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = child, child, child
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	child.Close()
	c, err := net.FileConn(ours)
	ours.Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); cmd.Wait() })
	return c, cmd
}

func get(t *testing.T, c net.Conn, path string) *http.Response {
	t.Helper()
	req, _ := http.NewRequest("GET", "http://169.254.169.254"+path, nil)
	if err := req.Write(c); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), req)
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

func TestMetadataHelperServesOneConnection(t *testing.T) {
	dir := t.TempDir()
	doc := filepath.Join(dir, "metadata.json")
	if err := os.WriteFile(doc, metadataDoc(t, metadata.Input{InstanceID: "i-helper", UserData: "#!/bin/sh\necho $HOME\n"}), 0o600); err != nil {
		t.Fatal(err)
	}
	logPath := filepath.Join(dir, "vmm.log")
	os.WriteFile(logPath, nil, 0o600)
	c, cmd := helperConn(t, "--doc", doc, "--version", "V1", "--log", logPath)
	r := bufio.NewReader(c)
	for path, want := range map[string]string{
		"/latest/meta-data/instance-id": "i-helper",
		"/2009-04-04/user-data":         "#!/bin/sh\necho $HOME\n",
	} {
		req, _ := http.NewRequest("GET", "http://169.254.169.254"+path, nil)
		req.Write(c)
		resp, err := http.ReadResponse(r, req)
		if err != nil {
			t.Fatal(err)
		}
		var body strings.Builder
		bufio.NewReader(resp.Body).WriteTo(&body)
		if resp.StatusCode != 200 || body.String() != want {
			t.Fatalf("GET %s = %d %q, want %q", path, resp.StatusCode, body.String(), want)
		}
	}
	// The guest hangs up: the helper exits, cleanly.
	c.Close()
	if err := cmd.Wait(); err != nil {
		t.Fatalf("helper exit: %v; log: %s", err, readFile(logPath))
	}
}

func TestMetadataHelperWithoutDocument(t *testing.T) {
	dir := t.TempDir()
	logPath := filepath.Join(dir, "vmm.log")
	os.WriteFile(logPath, nil, 0o600)
	c, _ := helperConn(t, "--doc", filepath.Join(dir, "missing.json"), "--log", logPath)
	if resp := get(t, c, "/latest/meta-data/"); resp.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("status %d, want 503", resp.StatusCode)
	}
	// Diagnostics went to the log, not into the guest's connection.
	if !strings.Contains(readFile(logPath), "metadata unavailable") {
		t.Fatalf("log lacks the reason: %q", readFile(logPath))
	}
}

func readFile(p string) string {
	b, _ := os.ReadFile(p)
	return string(b)
}
