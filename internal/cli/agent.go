package cli

import (
	"github.com/spf13/cobra"

	"github.com/fireactions/fireactions/internal/agent"
)

func init() { register(newAgentCmd) }

func newAgentCmd(_ *Globals) *cobra.Command {
	var o agent.Options
	cmd := &cobra.Command{
		Use:   "agent",
		Short: "Run the guest agent inside a runner VM",
		Long: `Agent runs inside a runner VM, as root. It writes the registry mirror
configuration from the VM's metadata (before Docker and containerd start),
runs the actions runner (RUNNER_DIR/run.sh --jitconfig ...) as the runner
user, reports the runner's state (starting, idle, busy, done) to the host,
and powers the VM off when the runner exits.

fireactions-init installs the same agent into every runner VM as
/run/fireactions/bin/fireactions-agent, so images need not carry it; this
command is for images that ship the fireactions binary instead.`,
		Args:   cobra.NoArgs,
		Hidden: false,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return agent.Run(cmd.Context(), o)
		},
	}
	cmd.Flags().StringVar(&o.RunnerDir, "runner-dir", "/home/runner", "directory of the actions runner (run.sh)")
	cmd.Flags().StringVar(&o.User, "user", "runner", "user that runs the runner")
	cmd.Flags().StringVar(&o.MetadataURL, "metadata-url", "http://169.254.169.254", "metadata service")
	return cmd
}
