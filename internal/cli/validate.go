package cli

import (
	"errors"
	"fmt"

	"github.com/spf13/cobra"

	"github.com/fireactions/fireactions/internal/config"
)

func init() { register(newValidateCmd) }

func newValidateCmd(g *Globals) *cobra.Command {
	checkFiles := true
	cmd := &cobra.Command{
		Use:   "validate",
		Short: "Check a configuration file and report every problem",
		Long: `Validate decodes the configuration strictly (unknown keys, duplicate keys
and values of the wrong type are problems), applies the defaults and checks
every field. It prints "valid" and exits 0, or prints each problem on its own
line as "path: message" and exits 1.

By default the files the configuration names (GitHub App key, API token,
kernels, Squid CA) must exist and be readable; --check-files=false skips
that, e.g. to check a configuration written for another machine.`,
		Example: `  fireactions validate -c /run/fireactions/config.yaml
  fireactions validate -c config.yaml --check-files=false`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			_, err := config.LoadWith(g.ConfigPath, config.ValidateOptions{CheckFiles: checkFiles})
			var ps config.Problems
			switch {
			case errors.As(err, &ps):
				for _, p := range ps {
					fmt.Fprintln(cmd.OutOrStdout(), p)
				}
				return &ExitError{Code: 1}
			case err != nil:
				return err // already names the file
			}
			fmt.Fprintln(cmd.OutOrStdout(), "valid")
			return nil
		},
	}
	cmd.Flags().BoolVar(&checkFiles, "check-files", true, "require the files the configuration names to exist and be readable")
	return cmd
}
