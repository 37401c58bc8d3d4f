package api_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/fireactions/fireactions/internal/api"
	"github.com/fireactions/fireactions/internal/config"
	"github.com/fireactions/fireactions/internal/github"
	"github.com/fireactions/fireactions/internal/github/githubtest"
	"github.com/fireactions/fireactions/internal/image"
	"github.com/fireactions/fireactions/internal/image/imagetest"
	"github.com/fireactions/fireactions/internal/pool"
	"github.com/fireactions/fireactions/internal/pool/pooltest"
)

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}
func (s *syncBuffer) String() string { s.mu.Lock(); defer s.mu.Unlock(); return s.b.String() }

// recordingTransport keeps every response body the client received, to
// check that none carries a secret.
type recordingTransport struct {
	mu     sync.Mutex
	bodies []string
}

func (rt *recordingTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	resp, err := http.DefaultTransport.RoundTrip(r)
	if err != nil {
		return nil, err
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	rt.mu.Lock()
	rt.bodies = append(rt.bodies, string(b))
	rt.mu.Unlock()
	resp.Body = io.NopCloser(bytes.NewReader(b))
	return resp, nil
}

type world struct {
	gh     *githubtest.Server
	rt     *pooltest.Runtime
	m      *pool.Manager
	store  *image.Store
	srv    *httptest.Server
	logs   *syncBuffer
	token  config.Secret
	secret config.Secret
}

func newWorld(t *testing.T) *world {
	t.Helper()
	key, pem, err := githubtest.AppKey()
	if err != nil {
		t.Fatal(err)
	}
	gh := githubtest.New(t, &key.PublicKey, func(o *githubtest.Options) { o.LongPoll = 300 * time.Millisecond })
	gh.InstallOrg("octo-org")
	cfg := &config.Config{
		GitHub: config.GitHub{AppID: gh.AppID(), PrivateKey: config.Secret(pem), APIURL: gh.APIURL()},
		Pools: []config.Pool{
			{Name: "ci", Scaling: config.ScalingLabels, MinRunners: 2, MaxRunners: 4, Runner: config.Runner{Organization: "octo-org"}},
			{Name: "big", Scaling: config.ScalingScaleSet, MinRunners: 0, MaxRunners: 2, Runner: config.Runner{Organization: "octo-org"}},
		},
	}
	cfg.ApplyDefaults()
	w := &world{gh: gh, rt: pooltest.NewRuntime(gh), logs: &syncBuffer{}, token: "t0ken-" + config.Secret(strings.Repeat("x", 20)), secret: "hook-secret"}
	log := slog.New(slog.NewTextHandler(w.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	client, err := github.New(cfg.GitHub, github.WithLogger(log))
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	w.m, err = pool.New(pool.Options{Config: cfg, GitHub: client, Runtime: w.rt, StateDir: filepath.Join(dir, "pools"), Logger: log,
		Resync: 200 * time.Millisecond, Backoff: pool.Backoff{Initial: 50 * time.Millisecond, Max: 200 * time.Millisecond}})
	if err != nil {
		t.Fatal(err)
	}
	if err := w.m.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(w.m.Close)
	w.store, err = image.Open(filepath.Join(dir, "images"), image.Options{})
	if err != nil {
		t.Fatal(err)
	}
	w.srv = httptest.NewServer(api.NewHandler(api.Options{Pools: w.m, Images: w.store, Token: w.token, Version: "1.2.3", WebhookSecret: w.secret, Logger: log}))
	t.Cleanup(w.srv.Close)
	return w
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestAPI(t *testing.T) {
	w := newWorld(t)
	ctx := context.Background()
	rec := &recordingTransport{}
	c := api.NewClientWithHTTP(w.srv.URL, w.token, &http.Client{Transport: rec})

	// Without the token, everything but health is refused.
	anon := api.NewClient(w.srv.URL, "")
	if _, err := anon.Health(ctx); err != nil {
		t.Fatalf("health without token: %v", err)
	}
	for _, f := range []func() error{
		func() error { _, err := anon.Pools(ctx); return err },
		func() error { _, err := anon.Version(ctx); return err },
		func() error { _, err := api.NewClient(w.srv.URL, "wrong").VMs(ctx); return err },
	} {
		var ae *api.APIError
		if err := f(); !errors.As(err, &ae) || ae.Status != http.StatusUnauthorized {
			t.Errorf("without the right token: %v", err)
		}
	}
	if v, err := c.Version(ctx); err != nil || v.Version != "1.2.3" {
		t.Fatalf("version %+v %v", v, err)
	}

	waitFor(t, "two idle runners", func() bool { st, _ := c.Pool(ctx, "ci"); return st.Idle == 2 })
	pools, err := c.Pools(ctx)
	if err != nil || len(pools) != 2 || pools[0].Name != "ci" || pools[1].Scaling != config.ScalingScaleSet {
		t.Fatalf("pools %+v %v", pools, err)
	}
	vms, err := c.VMs(ctx)
	if err != nil || len(vms) != 2 || vms[0].State != pool.StateIdle || vms[0].RunnerID == 0 {
		t.Fatalf("vms %+v %v", vms, err)
	}
	vm, err := c.VM(ctx, vms[0].ID)
	if err != nil || vm.ID != vms[0].ID {
		t.Fatalf("vm %+v %v", vm, err)
	}
	var logs bytes.Buffer
	if err := c.Logs(ctx, vm.ID, false, &logs); err != nil || !strings.Contains(logs.String(), "Listening for Jobs") {
		t.Fatalf("logs %q %v", logs.String(), err)
	}
	if _, err := c.VM(ctx, "nope"); !errors.Is(err, api.ErrNotFound) {
		t.Errorf("unknown vm: %v", err)
	}
	if _, err := c.Pool(ctx, "nope"); !errors.Is(err, api.ErrNotFound) {
		t.Errorf("unknown pool: %v", err)
	}

	// Scale, pause, resume.
	three := 3
	st, err := c.Scale(ctx, "ci", api.ScaleRequest{MinRunners: &three})
	if err != nil || st.MinRunners != 3 || st.MaxRunners != 4 {
		t.Fatalf("scale %+v %v", st, err)
	}
	waitFor(t, "three idle runners", func() bool { st, _ := c.Pool(ctx, "ci"); return st.Idle == 3 })
	five := 5
	var ae *api.APIError
	if _, err := c.Scale(ctx, "ci", api.ScaleRequest{MinRunners: &five}); !errors.As(err, &ae) || ae.Status != 400 || !strings.Contains(ae.Message, "more than max_runners") {
		t.Errorf("scale beyond max: %v", err)
	}
	if _, err := c.Scale(ctx, "ci", api.ScaleRequest{}); !errors.As(err, &ae) || ae.Status != 400 {
		t.Errorf("empty scale: %v", err)
	}
	if st, err := c.Pause(ctx, "ci"); err != nil || !st.Paused {
		t.Fatalf("pause %+v %v", st, err)
	}
	if st, err := c.Resume(ctx, "ci"); err != nil || st.Paused {
		t.Fatalf("resume %+v %v", st, err)
	}

	// Stop a VM: it is replaced.
	if st, err := c.StopVM(ctx, vm.ID); err != nil || st.ID != vm.ID {
		t.Fatalf("stop %+v %v", st, err)
	}
	waitFor(t, "the stopped VM replaced", func() bool {
		_, err := c.VM(ctx, vm.ID)
		st, _ := c.Pool(ctx, "ci")
		return errors.Is(err, api.ErrNotFound) && st.Idle == 3
	})

	// Webhooks: signed deliveries grow the labels pool.
	w.gh.SetWebhook(w.srv.URL+"/webhook", w.secret.Reveal())
	if _, err := w.gh.QueueJob("", []string{"self-hosted", "fireactions"}); err != nil {
		t.Fatal(err)
	}
	if d := w.gh.Deliveries(); len(d) != 1 || d[0].Status != http.StatusAccepted {
		t.Fatalf("delivery %+v", d)
	}
	waitFor(t, "the pool grown by the webhook", func() bool { st, _ := c.Pool(ctx, "ci"); return st.JobsInFlight == 1 && st.Idle == 4 })
	w.gh.SetWebhook(w.srv.URL+"/webhook", "not-the-secret")
	w.gh.QueueJob("", []string{"fireactions"})
	if d := w.gh.Deliveries(); d[len(d)-1].Status != http.StatusUnauthorized {
		t.Fatalf("badly signed delivery answered %d", d[len(d)-1].Status)
	}

	// Images: list and remove through the API.
	reg := imagetest.NewRegistry(t)
	ref := reg.Host + "/runner:1"
	imagetest.Push(t, ref, imagetest.Image(t, "linux/"+runtime.GOARCH, v1.Config{Cmd: []string{"/bin/sh"}}, imagetest.BusyboxLayer(t)), nil)
	if _, err := w.store.Pull(ctx, ref, image.PullOptions{Insecure: true}); err != nil {
		t.Fatal(err)
	}
	imgs, err := c.Images(ctx)
	if err != nil || len(imgs) != 1 || !strings.Contains(imgs[0].Ref, "runner:1") {
		t.Fatalf("images %+v %v", imgs, err)
	}
	if _, err := c.RemoveImage(ctx, "nope:1"); !errors.Is(err, api.ErrNotFound) {
		t.Errorf("remove unknown image: %v", err)
	}
	removed, err := c.RemoveImage(ctx, ref)
	if err != nil || len(removed.Removed) == 0 {
		t.Fatalf("remove %+v %v", removed, err)
	}
	if imgs, _ := c.Images(ctx); len(imgs) != 0 {
		t.Fatalf("image still listed: %+v", imgs)
	}

	// No response and no log line carries a secret GitHub issued or the
	// API token.
	rec.mu.Lock()
	all := strings.Join(rec.bodies, "\n")
	rec.mu.Unlock()
	secrets := append(w.gh.Secrets(), w.token.Reveal(), w.secret.Reveal())
	for _, s := range secrets {
		if strings.Contains(all, s) {
			t.Errorf("an API response carries a secret (%d bytes)", len(s))
		}
		if strings.Contains(w.logs.String(), s) {
			t.Errorf("a log line carries a secret (%d bytes)", len(s))
		}
	}
}

func TestFollowLogs(t *testing.T) {
	w := newWorld(t)
	ctx := context.Background()
	c := api.NewClient(w.srv.URL, w.token)
	waitFor(t, "idle runners", func() bool { st, _ := c.Pool(ctx, "ci"); return st.Idle == 2 })
	vms, _ := c.VMs(ctx)
	vm := w.rt.VM(vms[0].ID)
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() { done <- c.Logs(ctx, vm.ID(), true, pw); pw.Close() }()
	buf := make([]byte, 4096)
	var got strings.Builder
	vm.Print("job output line\n")
	for !strings.Contains(got.String(), "job output line") {
		n, err := pr.Read(buf)
		if err != nil {
			t.Fatalf("read followed logs: %v (got %q)", err, got.String())
		}
		got.Write(buf[:n])
	}
	vm.Finish(pool.Exit{Reason: "workload-exit"})
	go io.Copy(io.Discard, pr)
	if err := <-done; err != nil {
		t.Fatalf("follow ended with %v", err)
	}
}

func TestListenRefusesPublicAddressWithoutToken(t *testing.T) {
	if _, err := api.Listen("0.0.0.0:0", ""); err == nil || !strings.Contains(err.Error(), "no API token is set") {
		t.Fatalf("public listen without token: %v", err)
	}
	if _, err := api.Listen(":0", ""); err == nil {
		t.Fatal("empty host without token accepted")
	}
	ln, err := api.Listen("127.0.0.1:0", "")
	if err != nil {
		t.Fatal(err)
	}
	ln.Close()
	ln, err = api.Listen("0.0.0.0:0", "tok")
	if err != nil {
		t.Fatal(err)
	}
	ln.Close()
}
