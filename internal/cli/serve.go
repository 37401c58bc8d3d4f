package cli

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/fireactions/fireactions/internal/api"
	"github.com/fireactions/fireactions/internal/config"
	"github.com/fireactions/fireactions/internal/github"
	"github.com/fireactions/fireactions/internal/hostnet"
	"github.com/fireactions/fireactions/internal/image"
	"github.com/fireactions/fireactions/internal/metrics"
	"github.com/fireactions/fireactions/internal/network"
	"github.com/fireactions/fireactions/internal/pool"
	"github.com/fireactions/fireactions/internal/registrycache"
	"github.com/fireactions/fireactions/internal/runnervm"
	"github.com/fireactions/fireactions/internal/runtime"
)

func init() { register(newServeCmd) }

func newServeCmd(g *Globals) *cobra.Command {
	var insecure bool
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Run the runner pools, the API and the metrics listener",
		Long: `Serve runs the daemon: it loads the configuration (every file it names must
exist), recovers what an earlier daemon left (adopts runner VMs that still
run, cleans up dead ones, deregisters runners no VM backs), then keeps each
pool's runners, serves the HTTP API on server.address and, when enabled,
Prometheus metrics on metrics.address.

SIGTERM or SIGINT drains: no new runners, idle ones are deregistered and
stopped, busy ones finish their job until server.drain_timeout (one deadline
for all pools), then whatever is left is stopped and deregistered. A second
signal stops at once, leaving the VMs for the next start to adopt.`,
		Example: `  fireactions serve -c /run/fireactions/config.yaml`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return serve(cmd, g, insecure)
		},
	}
	cmd.Flags().BoolVar(&insecure, "insecure-registries", false, "pull the pools' images over plain HTTP (for a local test registry)")
	return cmd
}

// readSecretFile reads a file holding one secret value.
func readSecretFile(field, path string) (config.Secret, error) {
	if path == "" {
		return "", nil
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("%s: %w", field, err)
	}
	s := strings.TrimSpace(string(b))
	if s == "" {
		return "", fmt.Errorf("%s: %s is empty", field, path)
	}
	return config.Secret(s), nil
}

func serve(cmd *cobra.Command, g *Globals, insecure bool) error {
	cfg, err := config.LoadWith(g.ConfigPath, config.ValidateOptions{CheckFiles: true})
	var ps config.Problems
	if errors.As(err, &ps) {
		for _, p := range ps {
			fmt.Fprintln(cmd.ErrOrStderr(), p)
		}
		return &ExitError{Code: 1, Err: fmt.Errorf("%s: %d configuration problems", g.ConfigPath, len(ps))}
	}
	if err != nil {
		return err
	}
	if g.LogLevel == "" && g.LogFormat == "" {
		if err := setupLogging(cmd.ErrOrStderr(), &Globals{LogLevel: cfg.Log.Level, LogFormat: cfg.Log.Format}); err != nil {
			return err
		}
	}
	log := slog.Default()
	if err := registrycache.ApplyUserData(cfg); err != nil {
		return err
	}
	token, err := readSecretFile("server.auth_token_file", cfg.Server.AuthTokenFile)
	if err != nil {
		return err
	}
	hookSecret, err := readSecretFile("github.webhook_secret_file", cfg.GitHub.WebhookSecretFile)
	if err != nil {
		return err
	}
	pat, err := readSecretFile("github.token_file", cfg.GitHub.TokenFile)
	if err != nil {
		return err
	}
	// Refuse a public address without a token before anything starts.
	ln, err := api.Listen(cfg.Server.Address, token)
	if err != nil {
		return err
	}
	defer ln.Close()
	var metricsLn net.Listener
	if cfg.Metrics.Enabled {
		if metricsLn, err = net.Listen("tcp", cfg.Metrics.Address); err != nil {
			return fmt.Errorf("listen on metrics.address: %w", err)
		}
		defer metricsLn.Close()
	}

	gh, err := github.New(cfg.GitHub, github.WithToken(pat), github.WithLogger(log))
	if err != nil {
		return err
	}
	dataDir := g.ResolveDataDir(cfg)
	store, err := openImageStore(g, image.Options{Logger: log})
	if err != nil {
		return err
	}
	nm, err := network.New(network.Options{
		Network: cfg.Network, StateDir: filepath.Join(dataDir, "network"),
		PortFilter: hostnet.NewIsolation(cfg.Network.Bridge), Logger: log,
	})
	if err != nil {
		return err
	}
	rt, err := runtime.New(runtime.Options{
		DataDir: dataDir, Kernel: config.DefaultKernel, Backends: vmBackends(log), Images: store, Network: nm, Logger: log,
	})
	if err != nil {
		return err
	}
	defer rt.Close()

	var m *pool.Manager
	met := metrics.New(metrics.Sources{
		Pools: func() []metrics.PoolSizes {
			var out []metrics.PoolSizes
			for _, st := range m.Pools() {
				out = append(out, metrics.PoolSizes{Pool: st.Name, Desired: st.Desired, Current: st.Current,
					Starting: st.Starting, Idle: st.Idle, Busy: st.Busy, Paused: st.Paused})
			}
			return out
		},
		GitHub: gh.Stats,
		CacheSize: func() (int64, error) {
			imgs, err := store.List()
			var n int64
			for _, i := range imgs {
				n += i.Size
			}
			return n, err
		},
	})
	adapter, err := runnervm.New(runnervm.Options{Runtime: rt, Insecure: insecure, Pulled: met.ImagePulled, Logger: log})
	if err != nil {
		return err
	}
	var guestCache *registrycache.GuestConfig
	if cfg.RegistryCache.Enabled {
		gc, err := registrycache.Guest(cfg)
		if err != nil {
			return err
		}
		guestCache = &gc
	}
	m, err = pool.New(pool.Options{
		Config: cfg, GitHub: gh, Runtime: adapter, StateDir: filepath.Join(dataDir, "pools"),
		Logger: log, Observer: met, RegistryCache: guestCache,
	})
	if err != nil {
		return err
	}

	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigs)
	startCtx, cancelStart := context.WithCancel(context.Background())
	go func() {
		select {
		case <-sigs:
			cancelStart()
		case <-startCtx.Done():
		}
	}()
	if err := m.Start(startCtx); err != nil {
		cancelStart()
		return err
	}
	cancelStart()

	srvCtx, stopServers := context.WithCancel(context.Background())
	defer stopServers()
	handler := api.NewHandler(api.Options{Pools: m, Images: store, Token: token, Version: Version, WebhookSecret: hookSecret, Logger: log})
	srvErr := make(chan error, 2)
	go func() { srvErr <- api.Serve(srvCtx, ln, handler) }()
	if metricsLn != nil {
		mux := http.NewServeMux()
		mux.Handle("/metrics", met.Handler())
		go func() { srvErr <- api.Serve(srvCtx, metricsLn, mux) }()
	}
	log.Info("fireactions serving", "version", Version, "api", ln.Addr().String(), "pools", len(cfg.Pools),
		"metrics", cfg.Metrics.Enabled, "webhook", hookSecret != "")

	select {
	case err := <-srvErr:
		m.Close()
		return fmt.Errorf("API server: %w", err)
	case sig := <-sigs:
		log.Info("draining", "signal", sig.String(), "deadline", cfg.Server.DrainTimeout.Std())
	}
	drainCtx, cancel := context.WithTimeout(context.Background(), cfg.Server.DrainTimeout.Std())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- m.Drain(drainCtx) }()
	select {
	case err := <-done:
		if err != nil {
			log.Warn("drain", "error", err)
		}
	case sig := <-sigs:
		log.Warn("second signal: stopping without finishing the drain; VMs are left for the next start", "signal", sig.String())
		m.Close()
	}
	stopServers()
	// Give the servers a moment to finish their graceful shutdown.
	time.Sleep(100 * time.Millisecond)
	return nil
}
