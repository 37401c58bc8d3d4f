package cli

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/authn"
	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/fireactions/fireactions/internal/image"
	"github.com/fireactions/fireactions/internal/image/imagetest"
)

// imageCLI runs the command line with stdin, against a missing
// configuration file unless args give one.
func imageCLI(t *testing.T, stdin string, args ...string) (int, string, string) {
	t.Helper()
	root := NewRoot()
	var out, errb bytes.Buffer
	root.SetArgs(args)
	root.SetOut(&out)
	root.SetErr(&errb)
	root.SetIn(strings.NewReader(stdin))
	code := 0
	if err := root.Execute(); err != nil {
		code = 1
		if ee, ok := err.(*ExitError); ok {
			code = ee.Code
		} else {
			fmt.Fprintln(&errb, "fireactions:", err)
		}
	}
	return code, out.String(), errb.String()
}

func pushTestImage(t *testing.T, ref string, body string, auth authn.Authenticator) v1.Image {
	t.Helper()
	img := imagetest.Image(t, "linux/"+runtime.GOARCH, v1.Config{Cmd: []string{"/bin/sh"}},
		imagetest.BusyboxLayer(t), imagetest.Layer(t, imagetest.Tar(t, imagetest.Entry{Name: "etc/motd", Body: body})))
	imagetest.Push(t, ref, img, auth)
	return img
}

func TestImageCommands(t *testing.T) {
	t.Setenv("DOCKER_CONFIG", t.TempDir()) // never the host's credentials
	reg := imagetest.NewRegistry(t)
	ref := reg.Host + "/team/app:1"
	src := pushTestImage(t, ref, "hello", nil)
	digest, _ := src.Digest()
	dataDir := t.TempDir()
	g := []string{"-c", filepath.Join(t.TempDir(), "absent.yaml"), "--data-dir", dataDir}

	code, out, errs := imageCLI(t, "", append(g, "image", "pull", ref)...)
	if code != 0 {
		t.Fatalf("pull: exit %d\n%s%s", code, out, errs)
	}
	base := filepath.Join(dataDir, "images", "sha256", digest.Hex, image.ConverterVersion, "rootfs.ext4")
	for _, want := range []string{"Digest:    " + digest.String(), "Base:      " + base, "Size:"} {
		if !strings.Contains(out, want) {
			t.Errorf("pull output lacks %q:\n%s", want, out)
		}
	}
	if errs != "" && strings.Contains(errs, "\r") {
		t.Errorf("a progress bar was drawn without a terminal: %q", errs)
	}
	if imagetest.Cat(t, base, "/etc/motd") != "hello" {
		t.Error("base lacks the image's content")
	}

	// --pull never with the image cached needs no registry.
	reg.Close()
	if code, out, errs := imageCLI(t, "", append(g, "image", "pull", "--pull", "never", ref)...); code != 0 || !strings.Contains(out, digest.String()) {
		t.Errorf("pull --pull never (cached): exit %d\n%s%s", code, out, errs)
	}
	code, _, errs = imageCLI(t, "", append(g, "image", "pull", "--pull", "never", "busybox")...)
	if code != 1 || !strings.Contains(errs, "Never") {
		t.Errorf("pull --pull never (absent): exit %d: %s", code, errs)
	}
	if code, _, errs := imageCLI(t, "", append(g, "image", "pull", "--pull", "sometimes", ref)...); code != 1 || !strings.Contains(errs, "always, missing or never") {
		t.Errorf("bad --pull: exit %d: %s", code, errs)
	}

	code, out, _ = imageCLI(t, "", append(g, "image", "ls")...)
	if code != 0 || !strings.Contains(out, "REFERENCE") || !strings.Contains(out, ref) || !strings.Contains(out, digest.String()[:19]) || !strings.Contains(out, "just now") {
		t.Errorf("ls: exit %d\n%s", code, out)
	}
	code, out, _ = imageCLI(t, "", append(g, "image", "ls", "--json")...)
	var imgs []image.Image
	if err := json.Unmarshal([]byte(out), &imgs); code != 0 || err != nil || len(imgs) != 1 || imgs[0].BasePath != base || imgs[0].Config.Cmd[0] != "/bin/sh" {
		t.Errorf("ls --json: exit %d, %v\n%s", code, err, out)
	}

	// rm refuses an image in use.
	s, err := image.Open(filepath.Join(dataDir, "images"), image.Options{})
	if err != nil {
		t.Fatal(err)
	}
	release, err := s.Acquire(digest.String(), image.Holder("vm-7"))
	if err != nil {
		t.Fatal(err)
	}
	code, _, errs = imageCLI(t, "", append(g, "image", "rm", ref)...)
	if code != 1 || !strings.Contains(errs, "in use") || !strings.Contains(errs, "vm-7") {
		t.Errorf("rm of an image in use: exit %d: %s", code, errs)
	}
	if code, out, _ := imageCLI(t, "", append(g, "image", "prune")...); code != 0 || strings.Contains(out, "Deleted") {
		t.Errorf("prune removed an image in use: exit %d\n%s", code, out)
	}
	release()
	code, out, errs = imageCLI(t, "", append(g, "image", "rm", ref)...)
	if code != 0 || !strings.Contains(out, "Deleted: "+digest.String()) {
		t.Errorf("rm: exit %d\n%s%s", code, out, errs)
	}
	if _, err := os.Stat(base); !os.IsNotExist(err) {
		t.Errorf("base still there after rm: %v", err)
	}
	if code, _, errs := imageCLI(t, "", append(g, "image", "rm", ref)...); code != 1 || !strings.Contains(errs, "not in the cache") {
		t.Errorf("rm of an absent image: exit %d: %s", code, errs)
	}
	if code, out, _ := imageCLI(t, "", append(g, "image", "ls")...); code != 0 || strings.Contains(out, ref) {
		t.Errorf("ls after rm: %s", out)
	}
}

func TestImagePullPasswordStdin(t *testing.T) {
	t.Setenv("DOCKER_CONFIG", t.TempDir())
	const user, password = "ci", "t0ken-from-stdin"
	reg := imagetest.NewDockerRegistry(t, user, password)
	ref := reg.Host + "/private/app:1"
	pushTestImage(t, ref, "private", authn.FromConfig(authn.AuthConfig{Username: user, Password: password}))
	g := []string{"-c", filepath.Join(t.TempDir(), "absent.yaml"), "--data-dir", t.TempDir()}

	code, _, errs := imageCLI(t, "", append(g, "image", "pull", ref)...)
	if code != 1 || !strings.Contains(errs, "401") {
		t.Errorf("anonymous pull: exit %d: %s", code, errs)
	}
	code, _, errs = imageCLI(t, "wrong\n", append(g, "image", "pull", "--username", user, "--password-stdin", ref)...)
	if code != 1 || !strings.Contains(errs, "401") || strings.Contains(errs, "wrong") {
		t.Errorf("wrong password: exit %d: %s", code, errs)
	}
	code, out, errs := imageCLI(t, password+"\n", append(g, "image", "pull", "-u", user, "--password-stdin", ref)...)
	if code != 0 || !strings.Contains(out, "Digest:") {
		t.Errorf("pull with --password-stdin: exit %d\n%s%s", code, out, errs)
	}
	if strings.Contains(out+errs, password) {
		t.Error("the password was printed")
	}
	if code, _, errs := imageCLI(t, "", append(g, "image", "pull", "--username", user, ref)...); code != 1 || !strings.Contains(errs, "--password-stdin") {
		t.Errorf("--username alone: exit %d: %s", code, errs)
	}
	if code, _, errs := imageCLI(t, "", append(g, "image", "pull", "-u", user, "--password-stdin", ref)...); code != 1 || !strings.Contains(errs, "empty") {
		t.Errorf("empty stdin: exit %d: %s", code, errs)
	}
}

// With a configuration file, its data_dir and registry cache apply: the
// pull goes through the cache.
func TestImagePullUsesTheConfiguredCache(t *testing.T) {
	t.Setenv("DOCKER_CONFIG", t.TempDir())
	upstream, cache := imagetest.NewRegistry(t), imagetest.NewRegistry(t)
	ref := upstream.Host + "/team/app:1"
	src := pushTestImage(t, ref, "cached", nil)
	imagetest.Push(t, cache.Host+"/"+strings.ReplaceAll(upstream.Host, ":", "_")+"/team/app:1", src, nil)
	upstream.ResetCounts()

	dir := t.TempDir()
	_, port, _ := strings.Cut(cache.Host, ":")
	cfg := fmt.Sprintf(`data_dir: %s
github:
  app_id: 1
  private_key_file: %s/app.pem
network:
  subnet: 127.0.0.0/24
  gateway: 127.0.0.1
registry_cache:
  enabled: true
  gateway: 127.0.0.1
  zot:
    port: %s
  mirrors:
    - registry: %q
      url: http://%s
pools:
  - name: p
    max_runners: 1
    runner:
      organization: o
`, filepath.Join(dir, "data"), dir, port, upstream.Host, upstream.Host)
	path := filepath.Join(dir, "config.yaml")
	os.WriteFile(path, []byte(cfg), 0o600)

	code, out, errs := imageCLI(t, "", "-c", path, "image", "pull", ref)
	if code != 0 {
		t.Fatalf("pull: exit %d\n%s%s", code, out, errs)
	}
	if !strings.Contains(out, filepath.Join(dir, "data", "images")) {
		t.Errorf("base not under the configured data_dir:\n%s", out)
	}
	if len(cache.BlobGets()) == 0 || len(upstream.BlobGets()) != 0 {
		t.Errorf("blobs from the cache %v, from the registry %v; want all from the cache", cache.BlobGets(), upstream.BlobGets())
	}

	// A configuration that does not parse is an error, not ignored.
	os.WriteFile(path, []byte("data_dir: [\n"), 0o600)
	if code, _, errs := imageCLI(t, "", "-c", path, "image", "ls"); code != 1 || errs == "" {
		t.Errorf("broken config: exit %d: %s", code, errs)
	}
}

func TestImagePruneKeep(t *testing.T) {
	t.Setenv("DOCKER_CONFIG", t.TempDir())
	reg := imagetest.NewRegistry(t)
	g := []string{"-c", filepath.Join(t.TempDir(), "absent.yaml"), "--data-dir", t.TempDir()}
	for i := range 2 {
		ref := fmt.Sprintf("%s/team/app:%d", reg.Host, i)
		pushTestImage(t, ref, fmt.Sprint(i), nil)
		if code, out, errs := imageCLI(t, "", append(g, "image", "pull", ref)...); code != 0 {
			t.Fatalf("pull: %s%s", out, errs)
		}
	}
	if code, _, errs := imageCLI(t, "", append(g, "image", "prune", "--keep", "lots")...); code != 1 || !strings.Contains(errs, "--keep") {
		t.Errorf("bad --keep: exit %d: %s", code, errs)
	}
	code, out, _ := imageCLI(t, "", append(g, "image", "prune", "--keep", "1TiB")...)
	if code != 0 || strings.Contains(out, "Deleted") {
		t.Errorf("prune --keep 1TiB: exit %d\n%s", code, out)
	}
	code, out, _ = imageCLI(t, "", append(g, "image", "prune")...)
	if code != 0 || strings.Count(out, "Deleted: sha256:") != 2 {
		t.Errorf("prune: exit %d\n%s", code, out)
	}
}
