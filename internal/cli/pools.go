package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/fireactions/fireactions/internal/api"
	"github.com/fireactions/fireactions/internal/config"
	"github.com/fireactions/fireactions/internal/pool"
)

func init() {
	register(newPoolsCmd)
	register(newPsCmd)
	register(newLogsCmd)
}

// clientFlags locate the daemon's API.
type clientFlags struct {
	address, tokenFile string
	json               bool
}

func (f *clientFlags) add(cmd *cobra.Command, withJSON bool) {
	cmd.Flags().StringVar(&f.address, "address", "", "API address (default: server.address from the configuration, else "+config.DefaultServerAddress+")")
	cmd.Flags().StringVar(&f.tokenFile, "token-file", "", "file holding the API token (default: server.auth_token_file from the configuration)")
	if withJSON {
		cmd.Flags().BoolVar(&f.json, "json", false, "print JSON instead of a table")
	}
}

// client builds the API client from the flags and the optional
// configuration file.
func (f *clientFlags) client(g *Globals) (*api.Client, error) {
	cfg, err := loadOptionalConfig(g)
	if err != nil {
		return nil, err
	}
	addr, tokenFile := cfg.Server.Address, cfg.Server.AuthTokenFile
	if f.address != "" {
		addr = f.address
	}
	if f.tokenFile != "" {
		tokenFile = f.tokenFile
	}
	field := "server.auth_token_file"
	if f.tokenFile != "" {
		field = "--token-file"
	}
	token, err := readSecretFile(field, tokenFile)
	if err != nil {
		return nil, err
	}
	return api.NewClient(addr, token), nil
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func newPoolsCmd(g *Globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "pools",
		Short: "List, scale, pause and resume the daemon's runner pools",
	}
	var ls clientFlags
	lsCmd := &cobra.Command{
		Use:     "ls",
		Aliases: []string{"list"},
		Short:   "List the pools with their sizes",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := ls.client(g)
			if err != nil {
				return err
			}
			pools, err := c.Pools(cmd.Context())
			if err != nil {
				return err
			}
			if ls.json {
				return printJSON(cmd.OutOrStdout(), pools)
			}
			printPools(cmd.OutOrStdout(), pools)
			return nil
		},
	}
	ls.add(lsCmd, true)

	var sc clientFlags
	var minR, maxR int
	scaleCmd := &cobra.Command{
		Use:   "scale POOL [--min N] [--max N]",
		Short: "Change a pool's minimum (warm) and maximum number of runners",
		Long: `Scale changes a pool's min_runners (idle runners kept ready beyond the jobs
in flight) and/or max_runners at run time. The daemon keeps the new values
across restarts; they win over the configuration file until changed again.`,
		Example: `  fireactions pools scale default --min 4
  fireactions pools scale default --min 0 --max 2`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var req api.ScaleRequest
			if cmd.Flags().Changed("min") {
				req.MinRunners = &minR
			}
			if cmd.Flags().Changed("max") {
				req.MaxRunners = &maxR
			}
			if req.MinRunners == nil && req.MaxRunners == nil {
				return fmt.Errorf("give --min, --max or both")
			}
			c, err := sc.client(g)
			if err != nil {
				return err
			}
			st, err := c.Scale(cmd.Context(), args[0], req)
			if err != nil {
				return err
			}
			if sc.json {
				return printJSON(cmd.OutOrStdout(), st)
			}
			printPools(cmd.OutOrStdout(), []pool.Status{st})
			return nil
		},
	}
	sc.add(scaleCmd, true)
	scaleCmd.Flags().IntVar(&minR, "min", 0, "idle runners to keep beyond the jobs in flight")
	scaleCmd.Flags().IntVar(&maxR, "max", 0, "most runners at once")

	pauseResume := func(use, short string, call func(*api.Client, context.Context, string) (pool.Status, error)) *cobra.Command {
		var f clientFlags
		c := &cobra.Command{
			Use: use + " POOL", Short: short, Args: cobra.ExactArgs(1),
			RunE: func(cmd *cobra.Command, args []string) error {
				cl, err := f.client(g)
				if err != nil {
					return err
				}
				st, err := call(cl, cmd.Context(), args[0])
				if err != nil {
					return err
				}
				if f.json {
					return printJSON(cmd.OutOrStdout(), st)
				}
				printPools(cmd.OutOrStdout(), []pool.Status{st})
				return nil
			},
		}
		f.add(c, true)
		return c
	}
	cmd.AddCommand(lsCmd, scaleCmd,
		pauseResume("pause", "Stop a pool from starting runners (running ones finish)", (*api.Client).Pause),
		pauseResume("resume", "Let a paused pool start runners again", (*api.Client).Resume))
	return cmd
}

func printPools(w io.Writer, pools []pool.Status) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "POOL\tSCALING\tMIN\tMAX\tDESIRED\tCURRENT\tIDLE\tBUSY\tSTARTING\tSTATUS")
	for _, p := range pools {
		fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%s\n", p.Name, p.Scaling, p.MinRunners, p.MaxRunners,
			p.Desired, p.Current, p.Idle, p.Busy, p.Starting, poolStatus(p))
	}
	tw.Flush()
}

// poolStatus sums up a pool in a few words, with the last failure's text
// while the pool backs off.
func poolStatus(p pool.Status) string {
	var parts []string
	switch {
	case p.Draining:
		parts = append(parts, "draining")
	case p.Paused:
		parts = append(parts, "paused")
	default:
		parts = append(parts, "active")
	}
	if p.SessionError != "" {
		parts = append(parts, "session down: "+p.SessionError)
	}
	if !p.BackoffUntil.IsZero() && p.LastFailure != nil {
		parts = append(parts, fmt.Sprintf("backing off %s after %d failures: %s: %s",
			time.Until(p.BackoffUntil).Round(time.Second), p.Failures, p.LastFailure.Reason, p.LastFailure.Message))
	}
	if p.Orphans > 0 {
		parts = append(parts, strconv.Itoa(p.Orphans)+" runners awaiting deregistration")
	}
	return strings.Join(parts, "; ")
}

func newPsCmd(g *Globals) *cobra.Command {
	var f clientFlags
	var poolName string
	cmd := &cobra.Command{
		Use:   "ps",
		Short: "List the daemon's runner VMs",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := f.client(g)
			if err != nil {
				return err
			}
			vms, err := c.VMs(cmd.Context())
			if err != nil {
				return err
			}
			if poolName != "" {
				var keep []pool.VMStatus
				for _, v := range vms {
					if v.Pool == poolName {
						keep = append(keep, v)
					}
				}
				vms = keep
			}
			if f.json {
				if vms == nil {
					vms = []pool.VMStatus{}
				}
				return printJSON(cmd.OutOrStdout(), vms)
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "VM\tPOOL\tRUNNER ID\tSTATE\tAGE\tIN STATE")
			now := time.Now()
			for _, v := range vms {
				since := v.Created
				switch v.State {
				case pool.StateIdle:
					since = v.IdleAt
				case pool.StateBusy:
					since = v.BusyAt
				}
				state := string(v.State)
				if v.StopReason != "" {
					state += " (" + v.StopReason + ")"
				}
				fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%s\n", v.ID, v.Pool, v.RunnerID, state,
					now.Sub(v.Created).Round(time.Second), now.Sub(since).Round(time.Second))
			}
			return tw.Flush()
		},
	}
	f.add(cmd, true)
	cmd.Flags().StringVar(&poolName, "pool", "", "only this pool's VMs")
	return cmd
}

func newLogsCmd(g *Globals) *cobra.Command {
	var f clientFlags
	var follow bool
	cmd := &cobra.Command{
		Use:   "logs [-f] VM",
		Short: "Print a runner VM's output (console and runner)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := f.client(g)
			if err != nil {
				return err
			}
			return c.Logs(cmd.Context(), args[0], follow, cmd.OutOrStdout())
		},
	}
	f.add(cmd, false)
	cmd.Flags().BoolVarP(&follow, "follow", "f", false, "keep printing until the VM ends")
	return cmd
}
