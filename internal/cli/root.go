// Package cli owns the fireactions command line: the cobra command tree,
// global flags, logging set-up and exit codes. Commands parse and report;
// the work itself lives in the service packages they call.
package cli

import (
	"errors"
	"fmt"
	"io"
	"log/slog"

	"github.com/spf13/cobra"

	"github.com/fireactions/fireactions/internal/config"
)

// Globals are the flags every command shares.
type Globals struct {
	ConfigPath string
	DataDir    string
	LogLevel   string
	LogFormat  string
}

// commands holds the constructors of the top-level sub-commands. Each
// command's file appends to it from init, so commands are added without
// touching this file.
var commands []func(*Globals) *cobra.Command

func register(f func(*Globals) *cobra.Command) { commands = append(commands, f) }

// Version is set at link time (-ldflags "-X .../cli.Version=...").
var Version = "dev"

// NewRoot builds the fireactions command tree.
func NewRoot() *cobra.Command {
	g := &Globals{}
	root := &cobra.Command{
		Use:           "fireactions",
		Short:         "Ephemeral GitHub Actions runners and OCI workloads in microVMs",
		Version:       Version,
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
			return setupLogging(cmd.ErrOrStderr(), g)
		},
	}
	f := root.PersistentFlags()
	f.StringVarP(&g.ConfigPath, "config", "c", config.DefaultPath, "configuration file")
	f.StringVar(&g.DataDir, "data-dir", "", "data directory (default: data_dir from the config, else /var/lib/fireactions for root, $XDG_DATA_HOME/fireactions otherwise)")
	f.StringVar(&g.LogLevel, "log-level", "", "log level: debug, info, warn, error (default: from the config, else info)")
	f.StringVar(&g.LogFormat, "log-format", "", "log format: text or json (default: from the config, else text)")
	for _, c := range commands {
		root.AddCommand(c(g))
	}
	return root
}

// ResolveDataDir picks the data directory: the flag, then the config's
// data_dir, then the per-user default.
func (g *Globals) ResolveDataDir(cfg *config.Config) string {
	switch {
	case g.DataDir != "":
		return g.DataDir
	case cfg != nil && cfg.DataDir != "":
		return cfg.DataDir
	}
	return config.DefaultDataDir()
}

func setupLogging(w io.Writer, g *Globals) error {
	var lvl slog.Level
	level := g.LogLevel
	if level == "" {
		level = "info"
	}
	if err := lvl.UnmarshalText([]byte(level)); err != nil {
		return fmt.Errorf("--log-level: %q is not a level; use debug, info, warn or error", g.LogLevel)
	}
	opts := &slog.HandlerOptions{Level: lvl}
	var h slog.Handler
	switch g.LogFormat {
	case "", "text":
		h = slog.NewTextHandler(w, opts)
	case "json":
		h = slog.NewJSONHandler(w, opts)
	default:
		return fmt.Errorf("--log-format: %q is not a format; use text or json", g.LogFormat)
	}
	slog.SetDefault(slog.New(h))
	return nil
}

// ExitError carries a specific exit code (e.g. a workload's) out of a
// command without printing anything more.
type ExitError struct {
	Code int
	Err  error
}

func (e *ExitError) Error() string {
	if e.Err == nil {
		return fmt.Sprintf("exit status %d", e.Code)
	}
	return e.Err.Error()
}

func (e *ExitError) Unwrap() error { return e.Err }

// Main runs the command line and returns the process exit code.
func Main(args []string, stdout, stderr io.Writer) int {
	root := NewRoot()
	root.SetArgs(args)
	root.SetOut(stdout)
	root.SetErr(stderr)
	err := root.Execute()
	if err == nil {
		return 0
	}
	var ee *ExitError
	if errors.As(err, &ee) {
		if ee.Err != nil {
			fmt.Fprintln(stderr, "fireactions:", ee.Err)
		}
		return ee.Code
	}
	fmt.Fprintln(stderr, "fireactions:", err)
	return 1
}
