package image_test

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/fireactions/fireactions/internal/config"
	"github.com/fireactions/fireactions/internal/image"
	"github.com/fireactions/fireactions/internal/image/imagetest"
)

type E = imagetest.Entry

var hostPlatform = "linux/" + runtime.GOARCH

// TestMain lets a test run this binary as a helper process (a pull that
// gets killed, a pull as an unprivileged user).
func TestMain(m *testing.M) {
	if os.Getenv("IMAGE_TEST_HELPER") == "pull" {
		os.Exit(helperPull(os.Getenv("IMAGE_TEST_DIR"), os.Getenv("IMAGE_TEST_REF")))
	}
	os.Exit(m.Run())
}

func helperPull(dir, ref string) int {
	s, err := image.Open(dir, image.Options{Keychain: authn.NewMultiKeychain()})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	img, err := s.Pull(context.Background(), ref, image.PullOptions{})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println(img.Digest)
	return 0
}

func openStore(t *testing.T, opts image.Options) *image.Store {
	t.Helper()
	if opts.Keychain == nil {
		// Tests never read the host's docker credentials.
		opts.Keychain = authn.NewMultiKeychain()
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	s, err := image.Open(filepath.Join(t.TempDir(), "images"), opts)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(b)))
	return len(b), nil
}

var runConfig = v1.Config{
	Entrypoint:   []string{"/bin/sh"},
	Cmd:          []string{"-c", "echo hello"},
	Env:          []string{"PATH=/bin", "GREETING=hi"},
	WorkingDir:   "/srv",
	User:         "1000:1000",
	StopSignal:   "SIGINT",
	ExposedPorts: map[string]struct{}{"8080/tcp": {}, "53/udp": {}},
	Labels:       map[string]string{"org.opencontainers.image.title": "test"},
}

func busyboxImage(t *testing.T, extra ...E) v1.Image {
	layers := []v1.Layer{imagetest.BusyboxLayer(t)}
	if len(extra) > 0 {
		layers = append(layers, imagetest.Layer(t, imagetest.Tar(t, extra...)))
	}
	return imagetest.Image(t, hostPlatform, runConfig, layers...)
}

func digestOf(t *testing.T, img v1.Image) string {
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d.String()
}

func canonical(t *testing.T, ref string) string {
	r, err := name.ParseReference(ref)
	if err != nil {
		t.Fatal(err)
	}
	return r.Name()
}

func TestPullConvertsAndKeepsTheConfig(t *testing.T) {
	reg := imagetest.NewRegistry(t)
	src := busyboxImage(t, E{Name: "srv/", Type: tar.TypeDir, UID: 1000, GID: 1000}, E{Name: "srv/app", Body: "app", UID: 1000, GID: 1000})
	ref := reg.Host + "/test/busybox:1"
	imagetest.Push(t, ref, src, nil)

	s := openStore(t, image.Options{})
	var progress []image.Progress
	img, err := s.Pull(context.Background(), ref, image.PullOptions{Progress: func(p image.Progress) { progress = append(progress, p) }})
	if err != nil {
		t.Fatal(err)
	}
	if img.Digest != digestOf(t, src) || img.Ref != canonical(t, ref) || img.Platform != hostPlatform {
		t.Errorf("image %+v: want digest %s, ref %s", img, digestOf(t, src), canonical(t, ref))
	}
	wantDir := filepath.Join(s.Dir(), "sha256", strings.TrimPrefix(img.Digest, "sha256:"), image.ConverterVersion)
	if img.BasePath != filepath.Join(wantDir, "rootfs.ext4") {
		t.Errorf("base path %s, want under %s", img.BasePath, wantDir)
	}
	fi, err := os.Stat(img.BasePath)
	if err != nil || fi.Size() != img.Size || img.Size == 0 {
		t.Fatalf("base: %v, size %d vs %d", err, fi.Size(), img.Size)
	}
	imagetest.Fsck(t, img.BasePath)
	if st := imagetest.StatPath(t, img.BasePath, "/srv/app"); st.UID != 1000 || st.GID != 1000 {
		t.Errorf("/srv/app owner %d:%d, want 1000:1000", st.UID, st.GID)
	}
	raw, _ := src.RawConfigFile()
	if got, _ := os.ReadFile(img.ConfigPath); !bytes.Equal(got, raw) {
		t.Error("config.json is not the image's config as served")
	}
	c := img.Config
	if !slices.Equal(c.Entrypoint, runConfig.Entrypoint) || !slices.Equal(c.Cmd, runConfig.Cmd) || !slices.Equal(c.Env, runConfig.Env) ||
		c.WorkingDir != "/srv" || c.User != "1000:1000" || c.StopSignal != "SIGINT" ||
		!slices.Equal(c.ExposedPorts, []string{"53/udp", "8080/tcp"}) || c.Labels["org.opencontainers.image.title"] != "test" {
		t.Errorf("config %+v", c)
	}
	if len(progress) == 0 || progress[len(progress)-1].Bytes != progress[len(progress)-1].Total || progress[0].Layers != 2 {
		t.Errorf("progress reports: %d, last %+v", len(progress), progress[len(progress)-1])
	}

	// The cache answers by reference, digest and digest prefix.
	for _, q := range []string{ref, img.Digest, strings.TrimPrefix(img.Digest, "sha256:")[:12]} {
		got, err := s.Get(q, "")
		if err != nil || got.Digest != img.Digest || got.BasePath != img.BasePath {
			t.Errorf("Get(%s) = %+v, %v", q, got, err)
		}
	}
	list, err := s.List()
	if err != nil || len(list) != 1 || !slices.Equal(list[0].Refs, []string{canonical(t, ref)}) {
		t.Errorf("List = %+v, %v", list, err)
	}
}

func TestReferencesResolveLikeDocker(t *testing.T) {
	s := openStore(t, image.Options{})
	for ref, want := range map[string]string{
		"busybox":                      "index.docker.io/library/busybox:latest",
		"ubuntu:22.04":                 "index.docker.io/library/ubuntu:22.04",
		"docker.io/foo/bar":            "index.docker.io/foo/bar:latest",
		"ghcr.io/org/img:v1":           "ghcr.io/org/img:v1",
		"busybox@sha256:" + hex64('a'): "index.docker.io/library/busybox@sha256:" + hex64('a'),
	} {
		// Never resolves the reference and reports it without network.
		_, err := s.Pull(context.Background(), ref, image.PullOptions{Policy: config.PullNever})
		if !errors.Is(err, image.ErrNotFound) || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), "Never") {
			t.Errorf("%s: err %v; want not found naming %s and the policy", ref, err, want)
		}
	}
	for _, bad := range []string{"", "UPPER/case", "a:b:c"} {
		if _, err := s.Pull(context.Background(), bad, image.PullOptions{}); err == nil || errors.Is(err, image.ErrNotFound) {
			t.Errorf("%q: err %v, want a reference error", bad, err)
		}
	}
	if _, err := s.Pull(context.Background(), "busybox", image.PullOptions{Platform: "amd64"}); err == nil || !strings.Contains(err.Error(), "os/arch") {
		t.Errorf("bad platform: %v", err)
	}
	if _, err := s.Pull(context.Background(), "busybox", image.PullOptions{Policy: "Sometimes"}); err == nil || !strings.Contains(err.Error(), "IfNotPresent") {
		t.Errorf("bad policy: %v", err)
	}
}

func hex64(c byte) string { return strings.Repeat(string(c), 64) }

func TestPullPolicies(t *testing.T) {
	reg := imagetest.NewRegistry(t)
	ref := reg.Host + "/test/policy:latest"
	first := busyboxImage(t, E{Name: "version", Body: "1"})
	imagetest.Push(t, ref, first, nil)
	s := openStore(t, image.Options{})
	ctx := context.Background()

	a, err := s.Pull(ctx, ref, image.PullOptions{Policy: config.PullIfNotPresent})
	if err != nil {
		t.Fatal(err)
	}
	before := statIno(t, a.BasePath)

	// Always, digest unchanged: a manifest request, no blob, no reconversion.
	reg.ResetCounts()
	b, err := s.Pull(ctx, ref, image.PullOptions{Policy: config.PullAlways})
	if err != nil {
		t.Fatal(err)
	}
	if b.Digest != a.Digest || statIno(t, b.BasePath) != before {
		t.Errorf("Always with an unchanged digest reconverted: %v vs %v", statIno(t, b.BasePath), before)
	}
	if n := reg.Requests("GET", "/manifests/"); n == 0 {
		t.Error("Always did not re-resolve the tag")
	}
	if n := len(reg.BlobGets()); n != 0 {
		t.Errorf("Always with an unchanged digest fetched %d blobs", n)
	}

	// The tag moves: Always follows it, IfNotPresent keeps the cached one.
	second := busyboxImage(t, E{Name: "version", Body: "2"})
	imagetest.Push(t, ref, second, nil)
	c, err := s.Pull(ctx, ref, image.PullOptions{Policy: config.PullIfNotPresent})
	if err != nil || c.Digest != a.Digest {
		t.Errorf("IfNotPresent after the tag moved: %v, %v; want the cached %s", c, err, a.Digest)
	}
	d, err := s.Pull(ctx, ref, image.PullOptions{Policy: config.PullAlways})
	if err != nil || d.Digest != digestOf(t, second) || imagetest.Cat(t, d.BasePath, "/version") != "2" {
		t.Fatalf("Always after the tag moved: %+v, %v", d, err)
	}

	// Registry gone: cached images still resolve without network.
	reg.Close()
	for _, p := range []config.PullPolicy{config.PullIfNotPresent, config.PullNever, ""} {
		got, err := s.Pull(ctx, ref, image.PullOptions{Policy: p})
		if err != nil || got.Digest != d.Digest {
			t.Errorf("policy %q offline: %v, %v", p, got, err)
		}
	}
	if _, err := s.Pull(ctx, ref, image.PullOptions{Policy: config.PullAlways}); err == nil {
		t.Error("Always succeeded with the registry stopped")
	}
	// A digest reference to a cached image needs no network either.
	byDigest := reg.Host + "/test/policy@" + a.Digest
	if got, err := s.Pull(ctx, byDigest, image.PullOptions{}); err != nil || got.Digest != a.Digest {
		t.Errorf("digest reference offline: %v, %v", got, err)
	}
}

func statIno(t *testing.T, p string) string {
	t.Helper()
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	return fmt.Sprintf("ino %d mtime %s", st.Ino, fi.ModTime())
}

func TestMultiArchIndex(t *testing.T) {
	reg := imagetest.NewRegistry(t)
	other := "linux/arm64"
	if runtime.GOARCH == "arm64" {
		other = "linux/amd64"
	}
	mk := func(plat string) v1.Image {
		return imagetest.Image(t, plat, runConfig, imagetest.BusyboxLayer(t),
			imagetest.Layer(t, imagetest.Tar(t, E{Name: "etc/arch", Body: plat})))
	}
	host, foreign := mk(hostPlatform), mk(other)
	ref := reg.Host + "/test/multi:1"
	imagetest.Push(t, ref, imagetest.Index(t, map[string]v1.Image{hostPlatform: host, other: foreign}), nil)
	s := openStore(t, image.Options{})
	ctx := context.Background()

	a, err := s.Pull(ctx, ref, image.PullOptions{})
	if err != nil || a.Digest != digestOf(t, host) || imagetest.Cat(t, a.BasePath, "/etc/arch") != hostPlatform {
		t.Fatalf("default platform: %+v, %v", a, err)
	}
	b, err := s.Pull(ctx, ref, image.PullOptions{Platform: other})
	if err != nil || b.Digest != digestOf(t, foreign) || b.Platform != other || imagetest.Cat(t, b.BasePath, "/etc/arch") != other {
		t.Fatalf("--platform %s: %+v, %v", other, b, err)
	}
	// Both platforms of one reference are cached side by side.
	for plat, want := range map[string]string{"": a.Digest, other: b.Digest} {
		if got, err := s.Get(ref, plat); err != nil || got.Digest != want {
			t.Errorf("Get(%s, %q) = %v, %v", ref, plat, got, err)
		}
	}
	_, err = s.Pull(ctx, ref, image.PullOptions{Platform: "linux/s390x"})
	if err == nil || !strings.Contains(err.Error(), "linux/s390x") || !strings.Contains(err.Error(), other) {
		t.Errorf("missing platform: %v; want the available ones listed", err)
	}

	// A single-platform image for another architecture is refused.
	imagetest.Push(t, reg.Host+"/test/foreign:1", foreign, nil)
	_, err = s.Pull(ctx, reg.Host+"/test/foreign:1", image.PullOptions{})
	if err == nil || !strings.Contains(err.Error(), "--platform "+other) {
		t.Errorf("foreign image: %v", err)
	}
}

func TestConcurrentPullsFetchEachBlobOnce(t *testing.T) {
	reg := imagetest.NewRegistry(t)
	ref := reg.Host + "/test/concurrent:1"
	src := busyboxImage(t, E{Name: "x", Body: "x"})
	imagetest.Push(t, ref, src, nil)
	reg.ResetCounts()
	s := openStore(t, image.Options{})

	const n = 8
	var wg sync.WaitGroup
	digests := make([]string, n)
	errs := make([]error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			img, err := s.Pull(context.Background(), ref, image.PullOptions{})
			errs[i] = err
			if err == nil {
				digests[i] = img.Digest
			}
		}()
	}
	wg.Wait()
	for i := range n {
		if errs[i] != nil || digests[i] != digestOf(t, src) {
			t.Fatalf("pull %d: %v, %s", i, errs[i], digests[i])
		}
	}
	gets := reg.BlobGets()
	layers, _ := src.Layers()
	if len(gets) != len(layers)+1 { // layers and the config
		t.Errorf("fetched %d distinct blobs, want %d: %v", len(gets), len(layers)+1, gets)
	}
	for b, c := range gets {
		if c != 1 {
			t.Errorf("blob %s fetched %d times", b, c)
		}
	}
}

// truncateBlob makes the registry send half of the largest layer and then
// break the connection; release, when not nil, is awaited before breaking.
func truncateBlob(t *testing.T, reg *imagetest.Registry, img v1.Image, sent chan<- struct{}, release <-chan struct{}) {
	layers, _ := img.Layers()
	var big v1.Layer
	var bigSize int64
	for _, l := range layers {
		if sz, _ := l.Size(); sz > bigSize {
			big, bigSize = l, sz
		}
	}
	d, _ := big.Digest()
	body, _ := big.Compressed()
	data := new(bytes.Buffer)
	data.ReadFrom(body)
	reg.SetIntercept(func(w http.ResponseWriter, r *http.Request) bool {
		if r.Method != http.MethodGet || !strings.HasSuffix(r.URL.Path, "/blobs/"+d.String()) {
			return false
		}
		w.Header().Set("Content-Length", fmt.Sprint(data.Len()))
		w.WriteHeader(http.StatusOK)
		w.Write(data.Bytes()[:data.Len()/2])
		w.(http.Flusher).Flush()
		if sent != nil {
			close(sent)
		}
		if release != nil {
			select {
			case <-release:
			case <-r.Context().Done():
			}
		}
		conn, _, err := w.(http.Hijacker).Hijack()
		if err == nil {
			conn.Close()
		}
		return true
	})
}

func assertNothingPublished(t *testing.T, s *image.Store) {
	t.Helper()
	ents, _ := os.ReadDir(filepath.Join(s.Dir(), "sha256"))
	if len(ents) != 0 {
		t.Errorf("sha256/ holds %d entries after a failed conversion", len(ents))
	}
	if list, err := s.List(); err != nil || len(list) != 0 {
		t.Errorf("List after a failed conversion = %v, %v", list, err)
	}
}

func assertTmpEmpty(t *testing.T, s *image.Store) {
	t.Helper()
	ents, _ := os.ReadDir(filepath.Join(s.Dir(), "tmp"))
	if len(ents) != 0 {
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		t.Errorf("tmp/ holds %v", names)
	}
}

func TestBrokenDownloadLeavesNothing(t *testing.T) {
	reg := imagetest.NewRegistry(t)
	ref := reg.Host + "/test/broken:1"
	src := busyboxImage(t)
	imagetest.Push(t, ref, src, nil)
	truncateBlob(t, reg, src, nil, nil)
	s := openStore(t, image.Options{})
	if _, err := s.Pull(context.Background(), ref, image.PullOptions{}); err == nil {
		t.Fatal("pull of a truncated layer succeeded")
	} else {
		t.Log(err)
	}
	assertNothingPublished(t, s)
	assertTmpEmpty(t, s)

	reg.SetIntercept(nil)
	img, err := s.Pull(context.Background(), ref, image.PullOptions{})
	if err != nil {
		t.Fatal(err)
	}
	imagetest.Fsck(t, img.BasePath)
}

func TestKilledConversionLeavesNoUsablePartial(t *testing.T) {
	reg := imagetest.NewRegistry(t)
	ref := reg.Host + "/test/killed:1"
	src := busyboxImage(t)
	imagetest.Push(t, ref, src, nil)
	sent, release := make(chan struct{}), make(chan struct{})
	defer close(release)
	truncateBlob(t, reg, src, sent, release)

	dir := filepath.Join(t.TempDir(), "images")
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "IMAGE_TEST_HELPER=pull", "IMAGE_TEST_DIR="+dir, "IMAGE_TEST_REF="+ref)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// Half the layer is in the converter: kill the process mid-conversion.
	select {
	case <-sent:
	case <-time.After(time.Minute):
		cmd.Process.Kill()
		t.Fatalf("the helper never fetched the layer:\n%s", out.String())
	}
	locks, _ := filepath.Glob(filepath.Join(dir, "tmp", "*.lock"))
	if len(locks) != 1 {
		t.Errorf("conversion in progress: %d lock files in tmp/", len(locks))
	}
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()

	s, err := image.Open(dir, image.Options{Keychain: authn.NewMultiKeychain(), Logger: slog.New(slog.NewTextHandler(testWriter{t}, nil))})
	if err != nil {
		t.Fatal(err)
	}
	assertNothingPublished(t, s)
	assertTmpEmpty(t, s) // Open cleared the abandoned conversion

	reg.SetIntercept(nil)
	img, err := s.Pull(context.Background(), ref, image.PullOptions{})
	if err != nil {
		t.Fatal(err)
	}
	imagetest.Fsck(t, img.BasePath)
}

func TestMaliciousLayersWriteNothingOutside(t *testing.T) {
	reg := imagetest.NewRegistry(t)
	s := openStore(t, image.Options{})
	marker := fmt.Sprintf("fireactions-escape-%d", time.Now().UnixNano())
	victims := []string{filepath.Join(os.TempDir(), marker), filepath.Join(filepath.Dir(s.Dir()), marker)}
	depth := strings.Repeat("../", 20)
	for i, c := range []struct {
		name    string
		entries []E
		entry   string
	}{
		{"dot-dot", []E{{Name: depth + "tmp/" + marker, Body: "pwned"}}, depth + "tmp/" + marker},
		{"dot-dot to the cache's parent", []E{{Name: depth + strings.TrimPrefix(victims[1], "/"), Body: "pwned"}}, marker},
		{"hard link out", []E{{Name: "l", Type: tar.TypeLink, Link: depth + "etc/passwd"}}, `"l"`},
		{"through a symlink", []E{{Name: "evil", Type: tar.TypeSymlink, Link: "/tmp"}, {Name: "evil/" + marker, Body: "pwned"}}, "evil/" + marker},
	} {
		ref := fmt.Sprintf("%s/test/evil:%d", reg.Host, i)
		imagetest.Push(t, ref, busyboxImage(t, c.entries...), nil)
		_, err := s.Pull(context.Background(), ref, image.PullOptions{})
		if err == nil || !strings.Contains(err.Error(), c.entry) {
			t.Errorf("%s: err %v; want a refusal naming %s", c.name, err, c.entry)
		}
		for _, v := range victims {
			if _, err := os.Lstat(v); err == nil {
				os.Remove(v)
				t.Errorf("%s: %s was written on the host", c.name, v)
			}
		}
		assertNothingPublished(t, s)
		assertTmpEmpty(t, s)
	}
	// Absolute names land inside the image, not on the host.
	ref := reg.Host + "/test/abs:1"
	imagetest.Push(t, ref, busyboxImage(t, E{Name: "/tmp/" + marker, Body: "inside"}), nil)
	img, err := s.Pull(context.Background(), ref, image.PullOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if imagetest.Cat(t, img.BasePath, "/tmp/"+marker) != "inside" {
		t.Error("absolute entry not in the image")
	}
	if _, err := os.Lstat(victims[0]); err == nil {
		t.Errorf("%s written on the host", victims[0])
	}
}

func TestSizeLimitErrorNamesTheOption(t *testing.T) {
	reg := imagetest.NewRegistry(t)
	ref := reg.Host + "/test/big:1"
	imagetest.Push(t, ref, busyboxImage(t, E{Name: "big", Body: strings.Repeat("z", 3<<20)}), nil)
	s := openStore(t, image.Options{MaxUncompressedSize: 2 << 20})
	_, err := s.Pull(context.Background(), ref, image.PullOptions{})
	if err == nil || !strings.Contains(err.Error(), "2MiB") || !strings.Contains(err.Error(), "--max-uncompressed-size") {
		t.Fatalf("err = %v; want the limit and how to raise it", err)
	}
	assertNothingPublished(t, s)
}

func TestInsecureRegistryOnlyWhenAsked(t *testing.T) {
	plain := imagetest.NewRegistry(t)
	ref := plain.Host + "/test/tls:1"
	imagetest.Push(t, ref, busyboxImage(t), nil)
	// The same registry behind a self-signed certificate.
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		plain.Config.Handler.ServeHTTP(w, r)
	}))
	srv.Config.ErrorLog = log.New(io.Discard, "", 0)
	srv.StartTLS()
	defer srv.Close()
	tlsRef := strings.TrimPrefix(srv.URL, "https://") + "/test/tls:1"
	s := openStore(t, image.Options{})
	if _, err := s.Pull(context.Background(), tlsRef, image.PullOptions{}); err == nil {
		t.Fatal("pulled from a self-signed registry without --insecure")
	} else if !strings.Contains(err.Error(), "certificate") {
		t.Logf("refused: %v", err)
	}
	img, err := s.Pull(context.Background(), tlsRef, image.PullOptions{Insecure: true})
	if err != nil {
		t.Fatal(err)
	}
	imagetest.Fsck(t, img.BasePath)
}

func TestLeasesProtectBases(t *testing.T) {
	reg := imagetest.NewRegistry(t)
	ref := reg.Host + "/test/leased:1"
	imagetest.Push(t, ref, busyboxImage(t), nil)
	s := openStore(t, image.Options{})
	ctx := context.Background()
	img, err := s.Pull(ctx, ref, image.PullOptions{})
	if err != nil {
		t.Fatal(err)
	}

	// A lease of this process.
	release, err := s.Acquire(img.Digest)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Remove(ref); !errors.Is(err, image.ErrInUse) {
		t.Errorf("Remove of a leased image: %v", err)
	}
	if res, err := s.Prune(ctx, 0); err != nil || len(res.Removed) != 0 {
		t.Errorf("Prune removed a leased image: %+v, %v", res, err)
	}
	release()

	// A named lease outlives the store (and this process): it holds until
	// released by name.
	if _, err := s.Acquire(img.Digest, image.Holder("vm-42")); err != nil {
		t.Fatal(err)
	}
	s2, err := image.Open(s.Dir(), image.Options{Keychain: authn.NewMultiKeychain(), Logger: slog.New(slog.NewTextHandler(testWriter{t}, nil))})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s2.Remove(img.Digest); !errors.Is(err, image.ErrInUse) || !strings.Contains(err.Error(), "vm-42") {
		t.Errorf("Remove with a named lease: %v", err)
	}
	if err := s2.ReleaseLease(img.Digest, "vm-42"); err != nil {
		t.Fatal(err)
	}

	// A lease tied to a process ends with it.
	sleep := exec.Command("sleep", "60")
	if err := sleep.Start(); err != nil {
		t.Fatal(err)
	}
	if _, err := s2.Acquire(img.Digest, image.Holder("vmm"), image.HeldByProcess(sleep.Process.Pid)); err != nil {
		t.Fatal(err)
	}
	if res, _ := s2.Prune(ctx, 0); len(res.Removed) != 0 {
		t.Error("Prune removed an image whose VMM is alive")
	}
	sleep.Process.Kill()
	sleep.Wait()
	if res, err := s2.Prune(ctx, 0); err != nil || !slices.Equal(res.Removed, []string{img.Digest}) {
		t.Errorf("Prune after the VMM exited: %+v, %v", res, err)
	}
	if _, err := s2.Acquire(img.Digest); !errors.Is(err, image.ErrNotFound) {
		t.Errorf("Acquire of a removed image: %v", err)
	}
	if _, err := os.Stat(img.BasePath); !os.IsNotExist(err) {
		t.Errorf("base still present: %v", err)
	}
}

func TestRemoveReferencesAndDigests(t *testing.T) {
	reg := imagetest.NewRegistry(t)
	src := busyboxImage(t)
	a, b := reg.Host+"/test/rm:a", reg.Host+"/test/rm:b"
	imagetest.Push(t, a, src, nil)
	imagetest.Push(t, b, src, nil)
	s := openStore(t, image.Options{})
	ctx := context.Background()
	for _, r := range []string{a, b} {
		if _, err := s.Pull(ctx, r, image.PullOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	if l, _ := s.List(); len(l) != 1 || len(l[0].Refs) != 2 {
		t.Fatalf("two tags of one image: %+v", l)
	}
	removed, err := s.Remove(a)
	if err != nil || len(removed) != 0 {
		t.Errorf("removing one of two tags: %v, %v", removed, err)
	}
	if _, err := s.Get(a, ""); !errors.Is(err, image.ErrNotFound) {
		t.Errorf("removed tag still resolves: %v", err)
	}
	if _, err := s.Remove(a); !errors.Is(err, image.ErrNotFound) {
		t.Errorf("removing a missing tag: %v", err)
	}
	removed, err = s.Remove(strings.TrimPrefix(digestOf(t, src), "sha256:")[:12])
	if err != nil || !slices.Equal(removed, []string{digestOf(t, src)}) {
		t.Errorf("remove by digest prefix: %v, %v", removed, err)
	}
	if l, _ := s.List(); len(l) != 0 {
		t.Errorf("List after removal: %+v", l)
	}
}

func TestCacheBoundEvictsLeastRecentlyUsed(t *testing.T) {
	reg := imagetest.NewRegistry(t)
	ctx := context.Background()
	var refs []string
	for i := range 3 {
		ref := fmt.Sprintf("%s/test/lru:%d", reg.Host, i)
		imagetest.Push(t, ref, busyboxImage(t, E{Name: "n", Body: fmt.Sprint(i)}), nil)
		refs = append(refs, ref)
	}
	probe := openStore(t, image.Options{})
	one, err := probe.Pull(ctx, refs[0], image.PullOptions{})
	if err != nil {
		t.Fatal(err)
	}
	// Room for two images.
	s := openStore(t, image.Options{MaxCacheSize: 2*one.Size + one.Size/2})
	digests := make([]string, 3)
	pull := func(i int) {
		t.Helper()
		img, err := s.Pull(ctx, refs[i], image.PullOptions{})
		if err != nil {
			t.Fatal(err)
		}
		digests[i] = img.Digest
		time.Sleep(10 * time.Millisecond) // distinct last-use times
	}
	use := func(i int) {
		t.Helper()
		if _, err := s.Get(refs[i], ""); err != nil {
			t.Fatal(err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	kept := func(want ...int) {
		t.Helper()
		var got, exp []string
		list, _ := s.List()
		for _, img := range list {
			got = append(got, img.Digest)
		}
		for _, i := range want {
			exp = append(exp, digests[i])
		}
		slices.Sort(got)
		slices.Sort(exp)
		if !slices.Equal(got, exp) {
			t.Errorf("kept %v, want images %v (%v)", got, want, exp)
		}
	}
	// Least recently used goes first: 1, since 0 was used after it.
	pull(0)
	pull(1)
	use(0)
	pull(2)
	kept(0, 2)
	// An image in use is never evicted, even when least recently used.
	release, err := s.Acquire(digests[0])
	if err != nil {
		t.Fatal(err)
	}
	use(2)
	pull(1)
	kept(0, 1)
	release()
	if res, err := s.Prune(ctx, 0); err != nil || len(res.Removed) != 2 || res.Kept != 0 {
		t.Errorf("Prune(0): %+v, %v", res, err)
	}
}

func TestMirror(t *testing.T) {
	upstream, mirror := imagetest.NewRegistry(t), imagetest.NewRegistry(t)
	src := busyboxImage(t)
	ref := upstream.Host + "/team/app:1"
	imagetest.Push(t, ref, src, nil)
	// The cache keeps other registries under /<registry>, ':' as '_'.
	ns := strings.ReplaceAll(upstream.Host, ":", "_")
	imagetest.Push(t, mirror.Host+"/"+ns+"/team/app:1", src, nil)
	upstream.ResetCounts()
	ctx := context.Background()

	s := openStore(t, image.Options{Mirror: "http://" + mirror.Host})
	img, err := s.Pull(ctx, ref, image.PullOptions{})
	if err != nil || img.Digest != digestOf(t, src) {
		t.Fatalf("through the mirror: %v, %v", img, err)
	}
	if n := len(upstream.BlobGets()) + upstream.Requests("GET", "/manifests/"); n != 0 {
		t.Errorf("the registry served %d requests although the mirror had the image", n)
	}
	if n := len(mirror.BlobGets()); n == 0 {
		t.Error("the mirror served no blob")
	}

	// A registry the mirror does not serve is pulled directly.
	s = openStore(t, image.Options{Mirror: "http://" + mirror.Host, MirrorRegistries: []string{"docker.io", "ghcr.io"}})
	mirror.ResetCounts()
	if _, err := s.Pull(ctx, ref, image.PullOptions{}); err != nil {
		t.Fatal(err)
	}
	if n := mirror.Requests("GET", "/"); n != 0 {
		t.Errorf("the mirror got %d requests for a registry it does not serve", n)
	}

	// A mirror that is down or lacks the image: the registry serves.
	for _, m := range []string{"http://127.0.0.1:" + fmt.Sprint(imagetest.FreePort(t)), "http://" + imagetest.NewRegistry(t).Host} {
		s = openStore(t, image.Options{Mirror: m})
		upstream.ResetCounts()
		img, err := s.Pull(ctx, ref, image.PullOptions{})
		if err != nil || img.Digest != digestOf(t, src) {
			t.Fatalf("mirror %s failing: %v, %v", m, img, err)
		}
		if len(upstream.BlobGets()) == 0 {
			t.Errorf("mirror %s failing: the registry served nothing", m)
		}
	}

	// Credentials go to the registry only, never through the shared cache.
	s = openStore(t, image.Options{Mirror: "http://" + mirror.Host})
	mirror.ResetCounts()
	if _, err := s.Pull(ctx, ref, image.PullOptions{Auth: &image.Auth{Username: "u", Password: "p"}}); err != nil {
		t.Fatal(err)
	}
	if n := mirror.Requests("GET", "/"); n != 0 {
		t.Errorf("a pull with credentials went through the mirror (%d requests)", n)
	}
}

func TestOpenBootDisk(t *testing.T) {
	reg := imagetest.NewRegistry(t)
	ref := reg.Host + "/test/boot:1"
	imagetest.Push(t, ref, busyboxImage(t), nil)
	s := openStore(t, image.Options{})
	img, err := s.Pull(context.Background(), ref, image.PullOptions{})
	if err != nil {
		t.Fatal(err)
	}
	disk, err := image.OpenBootDisk(img.BasePath)
	if err != nil || disk.BasePath != img.BasePath || disk.Size != img.Size {
		t.Errorf("OpenBootDisk(ext4) = %+v, %v", disk, err)
	}
	dir := t.TempDir()
	notExt4 := filepath.Join(dir, "random.img")
	os.WriteFile(notExt4, bytes.Repeat([]byte{0xab}, 8192), 0o644)
	if _, err := image.OpenBootDisk(notExt4); err == nil || !strings.Contains(err.Error(), "not an ext4") {
		t.Errorf("random file: %v", err)
	}
	b, _ := os.ReadFile(img.BasePath)
	truncated := filepath.Join(dir, "truncated.img")
	os.WriteFile(truncated, b[:len(b)/2], 0o644)
	if _, err := image.OpenBootDisk(truncated); err == nil || !strings.Contains(err.Error(), "truncated") {
		t.Errorf("truncated image: %v", err)
	}
	if _, err := image.OpenBootDisk(filepath.Join(dir, "missing.img")); err == nil {
		t.Error("missing file accepted")
	}
}

func TestCreateScratch(t *testing.T) {
	s := openStore(t, image.Options{})
	dir := t.TempDir()
	for _, size := range []int64{200 << 20, 2 << 30} {
		p := filepath.Join(dir, fmt.Sprintf("scratch-%d.ext4", size))
		if err := s.CreateScratch(context.Background(), p, size); err != nil {
			t.Fatal(err)
		}
		// Again over an existing file: replaced, from the cached template.
		if err := s.CreateScratch(context.Background(), p, size); err != nil {
			t.Fatal(err)
		}
		imagetest.Fsck(t, p)
		fi, _ := os.Stat(p)
		alloc := fi.Sys().(*syscall.Stat_t).Blocks * 512
		if fi.Size() != size || alloc > 16<<20 {
			t.Errorf("scratch %d: size %d, %d bytes allocated; want sparse", size, fi.Size(), alloc)
		}
		super := imagetest.Debugfs(t, p, "stats")
		var inodes int64
		fmt.Sscanf(afterLine(super, "Inode count:"), "%d", &inodes)
		if inodes != size/16384 {
			t.Errorf("scratch %d: %d inodes, want one per 16KiB (%d)", size, inodes, size/16384)
		}
		if strings.Contains(super, "has_journal") || strings.Contains(super, "read-only") {
			t.Errorf("scratch %d: unexpected features:\n%s", size, super)
		}
		if st := imagetest.StatPath(t, p, "/"); st.UID != 0 || st.GID != 0 {
			t.Errorf("scratch root owned by %d:%d", st.UID, st.GID)
		}
	}
	if err := s.CreateScratch(context.Background(), filepath.Join(dir, "tiny"), 1<<20); err == nil || !strings.Contains(err.Error(), "minimum") {
		t.Errorf("tiny scratch: %v", err)
	}
}

func afterLine(out, field string) string {
	i := strings.Index(out, field)
	if i < 0 {
		return ""
	}
	return strings.TrimSpace(out[i+len(field):])
}
