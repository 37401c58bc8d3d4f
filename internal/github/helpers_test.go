package github_test

import (
	"bytes"
	"context"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/fireactions/fireactions/internal/config"
	"github.com/fireactions/fireactions/internal/github"
	"github.com/fireactions/fireactions/internal/github/githubtest"
)

// sleeps records the waits the client asked for instead of sleeping.
type sleeps struct {
	mu    sync.Mutex
	waits []time.Duration
	// onSleep, when set, runs on each wait (n counts from 1).
	onSleep func(n int)
}

func (s *sleeps) sleep(ctx context.Context, d time.Duration) error {
	s.mu.Lock()
	s.waits = append(s.waits, d)
	n := len(s.waits)
	hook := s.onSleep
	s.mu.Unlock()
	if hook != nil {
		hook(n)
	}
	return ctx.Err()
}

func (s *sleeps) all() []time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]time.Duration(nil), s.waits...)
}

// syncBuffer is a log sink safe for concurrent writers.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

type env struct {
	fake   *githubtest.Server
	client *github.Client
	sleeps *sleeps
	logs   *syncBuffer
	pem    []byte
}

func newFake(t *testing.T, opts ...func(*githubtest.Options)) (*githubtest.Server, []byte) {
	t.Helper()
	key, pem, err := githubtest.AppKey()
	if err != nil {
		t.Fatal(err)
	}
	return githubtest.New(t, &key.PublicKey, opts...), pem
}

// newEnv starts a fake GitHub and a client for its App, logging at debug
// level into a buffer the test can search for secrets.
func newEnv(t *testing.T, fakeOpts []func(*githubtest.Options), opts ...github.Option) *env {
	t.Helper()
	fake, pem := newFake(t, fakeOpts...)
	e := &env{fake: fake, sleeps: &sleeps{}, logs: &syncBuffer{}, pem: pem}
	log := slog.New(slog.NewJSONHandler(e.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	all := append([]github.Option{github.WithLogger(log), github.WithSleeper(e.sleeps.sleep)}, opts...)
	c, err := github.New(config.GitHub{AppID: fake.AppID(), PrivateKey: config.Secret(pem), APIURL: fake.APIURL()}, all...)
	if err != nil {
		t.Fatal(err)
	}
	e.client = c
	t.Cleanup(func() { assertNoSecrets(t, fake, e.logs.String()) })
	return e
}

// assertNoSecrets fails when any credential or JIT config the fake issued
// appears in text.
func assertNoSecrets(t *testing.T, fake *githubtest.Server, text string) {
	t.Helper()
	for _, s := range fake.Secrets() {
		if bytes.Contains([]byte(text), []byte(s)) {
			t.Errorf("secret %.12s… leaked into the output", s)
		}
	}
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}
