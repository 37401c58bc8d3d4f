package cli

import (
	"errors"
	"fmt"
	"os"
	"strconv"

	"github.com/spf13/cobra"

	"github.com/fireactions/fireactions/internal/bootstrap"
	"github.com/fireactions/fireactions/internal/config"
)

func init() { register(newBootstrapCmd) }

func newBootstrapCmd(_ *Globals) *cobra.Command {
	var (
		inputDir, output                      string
		kernelPath, gateway, zotPort, mirrors string
		cacheEnabled                          bool
	)
	cmd := &cobra.Command{
		Use:   "bootstrap",
		Short: "Generate the daemon configuration from the cloud-init inputs",
		Long: `Reads the GitHub App ID and key and the pool definitions (pools.json) from the
input directory, plus the seed's environment variables, and writes the
daemon's configuration atomically (mode 0640). Identical inputs give a
byte-identical file, so it is safe to run on every boot before the daemon.
Flags override the environment variables of the same meaning.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			in := bootstrap.InputsFromEnv(inputDir, os.Getenv)
			f := cmd.Flags()
			if f.Changed("kernel-path") {
				in.KernelPath = kernelPath
			}
			if f.Changed("registry-cache-enabled") {
				in.RegistryCacheEnabled = strconv.FormatBool(cacheEnabled)
			}
			if f.Changed("registry-cache-gateway") {
				in.RegistryCacheGateway = gateway
			}
			if f.Changed("zot-port") {
				in.ZotPort = zotPort
			}
			if f.Changed("zot-mirrors") {
				in.ZotMirrors = mirrors
			}
			cfg, err := bootstrap.Generate(in)
			if err != nil {
				var ps bootstrap.Problems
				if !errors.As(err, &ps) {
					return err
				}
				for _, p := range ps {
					fmt.Fprintln(cmd.ErrOrStderr(), p)
				}
				return &ExitError{Code: 1, Err: fmt.Errorf("bootstrap: %d problem(s) in the inputs; %s not written", len(ps), output)}
			}
			if err := bootstrap.Write(cfg, output); err != nil {
				return fmt.Errorf("bootstrap: %w", err)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "wrote %s\n%s\n", output, bootstrap.Summary(cfg))
			return nil
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&inputDir, "input-dir", bootstrap.DefaultInputDir, "directory holding github-app-id, github-private-key.pem, pools.json and the optional bind-address, log-level, auth-token")
	fl.StringVar(&output, "output", config.DefaultPath, "configuration file to write")
	fl.StringVar(&kernelPath, "kernel-path", "", "guest kernel of every pool (env "+bootstrap.EnvKernelPath+"; default "+config.DefaultKernel+")")
	fl.BoolVar(&cacheEnabled, "registry-cache-enabled", false, "turn the registry cache on (env "+bootstrap.EnvRegistryCacheEnabled+")")
	fl.StringVar(&gateway, "registry-cache-gateway", "", "address the caches listen on (env "+bootstrap.EnvRegistryCacheGateway+"; default the network gateway "+config.DefaultGateway+")")
	fl.StringVar(&zotPort, "zot-port", "", "Zot port (env "+bootstrap.EnvZotPort+"; default "+strconv.Itoa(config.DefaultZotPort)+")")
	fl.StringVar(&mirrors, "zot-mirrors", "", `registries to mirror, JSON such as {"docker.io": {"url": "https://registry-1.docker.io"}, "ghcr.io": {}} (env `+bootstrap.EnvZotMirrors+")")
	return cmd
}
