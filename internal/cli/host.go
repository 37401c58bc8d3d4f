package cli

import (
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/fireactions/fireactions/internal/config"
	"github.com/fireactions/fireactions/internal/hostnet"
)

func init() { register(newHostCmd) }

func newHostCmd(g *Globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "host",
		Short: "Prepare, check and restore this host's VM networking",
		Args:  cobra.NoArgs,
	}
	cmd.AddCommand(newHostSetupCmd(g), newHostTeardownCmd(g), newHostCheckCmd(g))
	return cmd
}

// loadHostConfig reads the configuration for the host commands. Without an
// explicit -c and without a file at the default path, the documented
// defaults are used, so a fresh host can be set up before it has a
// configuration.
func loadHostConfig(cmd *cobra.Command, g *Globals) (*config.Config, error) {
	explicit := cmd.Flags().Changed("config")
	if !explicit {
		if _, err := os.Stat(g.ConfigPath); errors.Is(err, os.ErrNotExist) {
			var cfg config.Config
			cfg.ApplyDefaults()
			return &cfg, nil
		}
	}
	cfg, err := config.Load(g.ConfigPath)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", g.ConfigPath, err)
	}
	return cfg, nil
}

// privilegeHint says what to do about a permission error.
func privilegeHint(err error) string {
	if errors.Is(err, syscall.EPERM) || errors.Is(err, syscall.EACCES) || errors.Is(err, os.ErrPermission) {
		return " (run as root: changing bridges, sysctls and nftables needs CAP_NET_ADMIN)"
	}
	return ""
}

func printSteps(w io.Writer, steps []hostnet.Step) {
	for _, s := range steps {
		fmt.Fprintln(w, " ", s)
	}
}

func newHostSetupCmd(g *Globals) *cobra.Command {
	return &cobra.Command{
		Use:   "setup",
		Short: "Create the VM bridge, forwarding, NAT, isolation rules and the CNI network",
		Long: `Prepares the host for VMs on the configured network (network.* in the
configuration; the documented defaults without one): the bridge with the
gateway address, net.ipv4.ip_forward, NAT for the VM subnet, the nftables
isolation tables of the bridge, and the CNI configuration list. Idempotent;
undone by "fireactions host teardown". It acts on the network namespace it
runs in.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := loadHostConfig(cmd, g)
			if err != nil {
				return err
			}
			opts := hostnet.OptionsFromConfig(cfg, g.ResolveDataDir(cfg))
			steps, err := hostnet.Setup(cmd.Context(), opts)
			printSteps(cmd.OutOrStdout(), steps)
			if err != nil {
				return fmt.Errorf("host setup: %w%s", err, privilegeHint(err))
			}
			fmt.Fprintf(cmd.OutOrStdout(), "host network %s ready (%s on %s)\n", cfg.Network.Name, cfg.Network.Subnet, cfg.Network.Bridge)
			return nil
		},
	}
}

func newHostTeardownCmd(g *Globals) *cobra.Command {
	var force bool
	cmd := &cobra.Command{
		Use:   "teardown",
		Short: "Undo host setup",
		Long: `Removes what "fireactions host setup" made: the isolation tables, the CNI
configuration list (restoring a file it replaced), the bridge if setup created
it, and ip_forward if setup changed it. Refuses while VMs are attached to the
bridge unless --force is given.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := loadHostConfig(cmd, g)
			if err != nil {
				return err
			}
			opts := hostnet.OptionsFromConfig(cfg, g.ResolveDataDir(cfg))
			steps, err := hostnet.Teardown(cmd.Context(), opts, force)
			printSteps(cmd.OutOrStdout(), steps)
			if err != nil {
				return fmt.Errorf("host teardown: %w%s", err, privilegeHint(err))
			}
			fmt.Fprintf(cmd.OutOrStdout(), "host network %s removed\n", cfg.Network.Name)
			return nil
		},
	}
	cmd.Flags().BoolVar(&force, "force", false, "tear down even while VMs are attached (cuts them off)")
	return cmd
}

func newHostCheckCmd(g *Globals) *cobra.Command {
	var (
		backend string
		kernels []string
	)
	cmd := &cobra.Command{
		Use:   "check",
		Short: "Check that this host can run fireactions VMs",
		Long: `Checks /dev/kvm, the firecracker and qemu binaries, the kernel files, the CNI
plugins, nftables and free space in the data directory, printing OK or FAIL
with the fix for each. Exits 1 when a configured backend cannot run or a
needed check fails. The backends checked are --backend, else those of the
configured pools, else auto.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := loadHostConfig(cmd, g)
			if err != nil {
				return err
			}
			opts := hostnet.CheckOptions{Network: cfg.Network, DataDir: g.ResolveDataDir(cfg), Kernels: kernels}
			if backend != "" {
				b := config.Backend(backend)
				if !slices.Contains(config.Backends, b) {
					return &ExitError{Code: 2, Err: fmt.Errorf("--backend: %q is not auto, firecracker or qemu", backend)}
				}
				opts.Backends = []config.Backend{b}
			}
			for _, p := range cfg.Pools {
				if backend == "" {
					opts.Backends = append(opts.Backends, p.VM.Backend)
				}
				if len(kernels) == 0 && !slices.Contains(opts.Kernels, p.VM.Kernel) {
					opts.Kernels = append(opts.Kernels, p.VM.Kernel)
				}
			}
			r := hostnet.Preflight(cmd.Context(), opts)
			printReport(cmd.OutOrStdout(), r)
			if !r.OK() {
				return &ExitError{Code: 1}
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&backend, "backend", "", "backend to check: auto, firecracker or qemu (default: the pools' backends, else auto)")
	cmd.Flags().StringArrayVar(&kernels, "kernel", nil, "kernel file to check (repeatable; default: the pools' vm.kernel)")
	return cmd
}

func printReport(w io.Writer, r *hostnet.Report) {
	for _, c := range r.Checks {
		status := "OK  "
		if !c.OK {
			status = "FAIL"
		}
		note := ""
		if !c.OK && !c.Needed {
			note = " (not needed here)"
		}
		fmt.Fprintf(w, "%s  %-12s %s%s\n", status, c.Name, c.Detail, note)
		if !c.OK {
			fmt.Fprintf(w, "      fix: %s\n", c.Fix)
		}
	}
	for _, v := range r.Verdicts {
		if v.Uses == "" {
			fmt.Fprintf(w, "backend %s: FAIL: %s\n", v.Configured, v.Reason)
			continue
		}
		fmt.Fprintf(w, "backend %s: uses %s: %s\n", v.Configured, v.Uses, v.Reason)
	}
}
