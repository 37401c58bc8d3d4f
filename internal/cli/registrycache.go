package cli

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/spf13/cobra"

	"github.com/fireactions/fireactions/internal/config"
	"github.com/fireactions/fireactions/internal/registrycache"
)

func init() { register(newRegistryCacheCmd) }

func newRegistryCacheCmd(g *Globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "registry-cache",
		Short: "Render the registry cache's host and guest configuration",
		Args:  cobra.NoArgs,
	}
	cmd.AddCommand(newRegistryCacheRenderCmd(g))
	return cmd
}

func newRegistryCacheRenderCmd(g *Globals) *cobra.Command {
	var out string
	cmd := &cobra.Command{
		Use:   "render --out DIR",
		Short: "Write the Zot, Squid and nftables configs and every VM's files",
		Long: `Render writes, from the configuration's registry_cache section:

  DIR/host/zot/config.json              Zot: on-demand mirrors, GC, retention
  DIR/host/zot/storage.sh               mounts Zot's storage on a volume of max_size
  DIR/host/squid/squid.conf             Squid (only when squid.enabled)
  DIR/host/nftables/registry-cache.nft  redirects VM HTTP(S) to Squid
  DIR/guest/...                         each file at the path a VM sees it
  DIR/guest/user-data                   the same files as cloud-init user-data
  DIR/guest-config.json                 the same files for fireactions' guest agent

DIR/host, DIR/guest and DIR/guest-config.json are replaced on every run; the
rest of DIR is left alone. It exits 1 when registry_cache.enabled is false.`,
		Example: `  fireactions registry-cache render -c /run/fireactions/config.yaml --out /run/fireactions/registry-cache`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if out == "" {
				return errors.New("--out: required: the directory to render into")
			}
			cfg, err := config.Load(g.ConfigPath)
			var ps config.Problems
			switch {
			case errors.As(err, &ps):
				for _, p := range ps {
					fmt.Fprintln(cmd.ErrOrStderr(), p)
				}
				return &ExitError{Code: 1, Err: fmt.Errorf("%s: %d problems; fix them and run again", g.ConfigPath, len(ps))}
			case err != nil:
				return err
			}
			if !cfg.RegistryCache.Enabled {
				return &ExitError{Code: 1, Err: fmt.Errorf("%s: registry_cache.enabled is false; set it to true to render the registry cache", g.ConfigPath)}
			}
			written, err := renderRegistryCache(cfg, out)
			if err != nil {
				return err
			}
			for _, p := range written {
				fmt.Fprintln(cmd.OutOrStdout(), filepath.Join(out, p))
			}
			return nil
		},
	}
	cmd.Flags().StringVarP(&out, "out", "o", "", "directory to render into (created if missing)")
	return cmd
}

// renderRegistryCache renders into a temporary directory inside out and
// then swaps the result in, so a failed run leaves the previous output
// whole. It returns the written files relative to out, sorted.
func renderRegistryCache(cfg *config.Config, out string) ([]string, error) {
	host, err := registrycache.Host(cfg)
	if err != nil {
		return nil, err
	}
	guest, err := registrycache.Guest(cfg)
	if err != nil {
		return nil, err
	}
	userData, err := guest.CloudConfig().Render()
	if err != nil {
		return nil, fmt.Errorf("render user-data: %w", err)
	}
	guestJSON, err := json.MarshalIndent(guest, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("render guest config: %w", err)
	}

	if err := os.MkdirAll(out, 0o755); err != nil {
		return nil, fmt.Errorf("--out: %w", err)
	}
	tmp, err := os.MkdirTemp(out, ".render-")
	if err != nil {
		return nil, fmt.Errorf("--out: %w", err)
	}
	defer os.RemoveAll(tmp)

	var written []string
	write := func(rel string, data []byte, mode fs.FileMode) error {
		p := filepath.Join(tmp, filepath.FromSlash(rel))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(p, data, mode); err != nil {
			return err
		}
		// WriteFile's mode is masked by the umask; the output's is not.
		if err := os.Chmod(p, mode); err != nil {
			return err
		}
		written = append(written, rel)
		return nil
	}
	for rel, data := range host {
		mode := fs.FileMode(0o644)
		if strings.HasPrefix(string(data), "#!") {
			mode = 0o755
		}
		if err := write("host/"+rel, data, mode); err != nil {
			return nil, fmt.Errorf("write %s: %w", rel, err)
		}
	}
	if err := guest.WriteTree(filepath.Join(tmp, "guest")); err != nil {
		return nil, err
	}
	for _, f := range guest.Files {
		written = append(written, "guest"+f.Path)
	}
	if err := write("guest/user-data", userData, 0o644); err != nil {
		return nil, fmt.Errorf("write user-data: %w", err)
	}
	if err := write("guest-config.json", append(guestJSON, '\n'), 0o644); err != nil {
		return nil, fmt.Errorf("write guest-config.json: %w", err)
	}

	for _, name := range []string{"host", "guest", "guest-config.json"} {
		dst := filepath.Join(out, name)
		if err := os.RemoveAll(dst); err != nil {
			return nil, fmt.Errorf("replace %s: %w", dst, err)
		}
		if err := os.Rename(filepath.Join(tmp, name), dst); err != nil {
			return nil, fmt.Errorf("replace %s: %w", dst, err)
		}
	}
	slices.Sort(written)
	return written, nil
}
