package image_test

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/base64"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/google/go-containerregistry/pkg/authn"

	"github.com/fireactions/fireactions/internal/image"
	"github.com/fireactions/fireactions/internal/image/imagetest"
)

// Debian's docker-registry with htpasswd authentication: the private
// registry case.
func TestPrivateRegistryAuth(t *testing.T) {
	const user, password = "alice", "s3cret-Pa55"
	reg := imagetest.NewDockerRegistry(t, user, password)
	ref := reg.Host + "/private/app:1"
	src := busyboxImage(t)
	imagetest.Push(t, ref, src, authn.FromConfig(authn.AuthConfig{Username: user, Password: password}))

	var logs bytes.Buffer
	s, err := image.Open(filepath.Join(t.TempDir(), "images"), image.Options{
		Keychain: authn.NewMultiKeychain(),
		Logger:   slog.New(slog.NewTextHandler(io.MultiWriter(&logs, testWriter{t}), &slog.HandlerOptions{Level: slog.LevelDebug})),
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for name, auth := range map[string]*image.Auth{
		"anonymous":      nil,
		"wrong password": {Username: user, Password: "wrong-" + password},
	} {
		_, err := s.Pull(ctx, ref, image.PullOptions{Auth: auth})
		if err == nil || !strings.Contains(err.Error(), "401") || !strings.Contains(err.Error(), map[bool]string{true: "--username", false: "refused the username and password"}[auth == nil]) {
			t.Errorf("%s: err %v; want a 401 that says how to authenticate", name, err)
		} else {
			t.Logf("%s: %v", name, err)
		}
		if err != nil && strings.Contains(err.Error(), password) {
			t.Errorf("%s: the error shows the password", name)
		}
	}
	img, err := s.Pull(ctx, ref, image.PullOptions{Auth: &image.Auth{Username: user, Password: password}})
	if err != nil {
		t.Fatal(err)
	}
	if img.Digest != digestOf(t, src) {
		t.Errorf("digest %s, want %s", img.Digest, digestOf(t, src))
	}
	imagetest.Fsck(t, img.BasePath)
	if strings.Contains(logs.String(), password) {
		t.Error("the password appears in the logs")
	}

	// Credentials from a Docker config file (docker login), through the
	// default keychain.
	dockerCfg := t.TempDir()
	auth := base64.StdEncoding.EncodeToString([]byte(user + ":" + password))
	os.WriteFile(filepath.Join(dockerCfg, "config.json"), fmt.Appendf(nil, `{"auths":{%q:{"auth":%q}}}`, reg.Host, auth), 0o600)
	t.Setenv("DOCKER_CONFIG", dockerCfg)
	s2, err := image.Open(filepath.Join(t.TempDir(), "images"), image.Options{Logger: slog.New(slog.NewTextHandler(testWriter{t}, nil))})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s2.Pull(ctx, ref, image.PullOptions{}); err != nil {
		t.Errorf("pull with docker config credentials: %v", err)
	}
}

// A user without privileges pulls and converts: owners, modes and device
// nodes of the image survive although the converting process could not
// create any of them on a file system.
func TestUnprivilegedPull(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run the pull as uid 65534 with setpriv")
	}
	setpriv, err := exec.LookPath("setpriv")
	if err != nil {
		t.Skip("needs setpriv (util-linux) to drop privileges")
	}
	reg := imagetest.NewRegistry(t)
	ref := reg.Host + "/test/rootless:1"
	imagetest.Push(t, ref, busyboxImage(t,
		E{Name: "dev/", Type: tar.TypeDir},
		E{Name: "dev/console", Type: tar.TypeChar, Major: 5, Minor: 1, Mode: 0o600},
		E{Name: "etc/shadow", Body: "root:*:1::::::\n", Mode: 0o640, GID: 42},
		E{Name: "usr/bin/passwd", Body: "#!/bin/sh\n", Mode: 0o4755},
	), nil)

	// A world-readable copy of this test binary and a directory owned by
	// nobody: the default test temporary directories are root's alone.
	base, err := os.MkdirTemp("", "fireactions-rootless-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	os.Chmod(base, 0o755)
	bin := filepath.Join(base, "image.test")
	self, _ := os.ReadFile(os.Args[0])
	if err := os.WriteFile(bin, self, 0o755); err != nil {
		t.Fatal(err)
	}
	data := filepath.Join(base, "data")
	os.Mkdir(data, 0o755)
	os.Chown(data, 65534, 65534)

	dir := filepath.Join(data, "images")
	cmd := exec.Command(setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", bin, "-test.run=^$")
	cmd.Env = []string{"IMAGE_TEST_HELPER=pull", "IMAGE_TEST_DIR=" + dir, "IMAGE_TEST_REF=" + ref, "HOME=" + data, "PATH=/usr/bin:/bin"}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("pull as uid 65534: %v\n%s", err, stderr.String())
	}
	digest := strings.TrimSpace(string(out))
	basePath := filepath.Join(dir, "sha256", strings.TrimPrefix(digest, "sha256:"), image.ConverterVersion, "rootfs.ext4")
	fi, err := os.Stat(basePath)
	if err != nil {
		t.Fatal(err)
	}
	if st := fi.Sys().(*syscall.Stat_t); st.Uid != 65534 {
		t.Errorf("the base is owned by uid %d; want the unprivileged 65534 that made it", st.Uid)
	}
	imagetest.Fsck(t, basePath)
	for path, want := range map[string]imagetest.Stat{
		"/bin/busybox":    {Type: "regular", Mode: 0o755},
		"/etc/shadow":     {Type: "regular", Mode: 0o640, GID: 42},
		"/usr/bin/passwd": {Type: "regular", Mode: 0o4755},
		"/dev/console":    {Type: "character special", Mode: 0o600, Major: 5, Minor: 1},
	} {
		got := imagetest.StatPath(t, basePath, path)
		if got.Type != want.Type || got.Mode != want.Mode || got.UID != want.UID || got.GID != want.GID || got.Major != want.Major || got.Minor != want.Minor {
			t.Errorf("%s: %+v, want %+v", path, got, want)
		}
	}
}
