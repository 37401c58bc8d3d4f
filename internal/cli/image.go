package cli

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/fireactions/fireactions/internal/config"
	"github.com/fireactions/fireactions/internal/image"
)

func init() { register(newImageCmd) }

func newImageCmd(g *Globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "image",
		Short: "Pull, list and remove the images microVMs boot from",
		Long: `The image cache keeps every OCI image converted once into a read-only ext4
base, under <data-dir>/images. The configuration file is optional here: when
it exists, its data_dir and registry cache (used as a pull-through mirror)
apply; otherwise the defaults do.`,
	}
	cmd.AddCommand(newImagePullCmd(g), newImageLsCmd(g), newImageRmCmd(g), newImagePruneCmd(g))
	return cmd
}

// openImageStore opens the store of the data directory, reading the
// configuration when the file exists.
func openImageStore(g *Globals, opts image.Options) (*image.Store, error) {
	var cfg *config.Config
	if _, err := os.Stat(g.ConfigPath); err == nil {
		c, err := config.Load(g.ConfigPath)
		if err != nil {
			return nil, err
		}
		cfg = c
	} else if !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("config %s: %w", g.ConfigPath, err)
	}
	if cfg != nil && cfg.RegistryCache.Enabled {
		rc := cfg.RegistryCache
		opts.Mirror = "http://" + net.JoinHostPort(rc.Gateway, strconv.Itoa(rc.Zot.Port))
		for _, m := range rc.Mirrors {
			opts.MirrorRegistries = append(opts.MirrorRegistries, m.Registry)
		}
	}
	return image.Open(filepath.Join(g.ResolveDataDir(cfg), "images"), opts)
}

func newImagePullCmd(g *Globals) *cobra.Command {
	var (
		platform, username, pull, maxSize string
		passwordStdin, insecure           bool
	)
	cmd := &cobra.Command{
		Use:   "pull [flags] REFERENCE",
		Short: "Pull an image and convert it to a read-only ext4 base",
		Long: `Pull resolves REFERENCE as Docker does (busybox is
index.docker.io/library/busybox:latest), picks the platform's image from a
multi-platform index, and converts it once; later pulls of the same digest
are lookups. It prints the digest, the size and the path of the base.

Credentials come from --username with the password on standard input
(never on the command line), else from Docker's config file and credential
helpers (docker login). --insecure allows plain HTTP and self-signed
certificates for this registry.`,
		Example: `  fireactions image pull ubuntu:24.04
  fireactions image pull --platform linux/arm64 ghcr.io/org/app:v1
  echo "$TOKEN" | fireactions image pull --username bot --password-stdin registry.example.com/team/app:2`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			po := image.PullOptions{Platform: platform, Insecure: insecure}
			switch pull {
			case "always":
				po.Policy = config.PullAlways
			case "missing":
				po.Policy = config.PullIfNotPresent
			case "never":
				po.Policy = config.PullNever
			default:
				return fmt.Errorf("--pull: %q is not a policy; use always, missing or never", pull)
			}
			if passwordStdin != (username != "") {
				return errors.New("--username and --password-stdin go together: give the user with --username and pipe the password to standard input")
			}
			if passwordStdin {
				pw, err := readPassword(cmd.InOrStdin())
				if err != nil {
					return err
				}
				po.Auth = &image.Auth{Username: username, Password: pw}
			}
			opts := image.Options{}
			if maxSize != "" {
				n, err := config.ParseByteSize(maxSize)
				if err != nil || n <= 0 {
					return fmt.Errorf("--max-uncompressed-size: %q is not a size; write e.g. 32GiB", maxSize)
				}
				opts.MaxUncompressedSize = int64(n)
			}
			s, err := openImageStore(g, opts)
			if err != nil {
				return err
			}
			bar := newPullBar(cmd.ErrOrStderr())
			if bar != nil {
				po.Progress = bar.update
			}
			img, err := s.Pull(cmd.Context(), args[0], po)
			if bar != nil {
				bar.finish()
			}
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			fmt.Fprintf(w, "Reference: %s\n", img.Ref)
			fmt.Fprintf(w, "Platform:  %s\n", img.Platform)
			fmt.Fprintf(w, "Digest:    %s\n", img.Digest)
			fmt.Fprintf(w, "Size:      %s (%d bytes)\n", humanSize(img.Size), img.Size)
			fmt.Fprintf(w, "Base:      %s\n", img.BasePath)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&platform, "platform", "", "os/arch[/variant] to pull from a multi-platform image (default: linux/<host architecture>)")
	f.StringVarP(&username, "username", "u", "", "registry user name (with --password-stdin)")
	f.BoolVar(&passwordStdin, "password-stdin", false, "read the registry password or token from standard input")
	f.BoolVar(&insecure, "insecure", false, "allow plain HTTP and unverified TLS certificates for this registry")
	f.StringVar(&pull, "pull", "always", "when to contact the registry: always (re-resolve the tag), missing (only if not cached), never")
	f.StringVar(&maxSize, "max-uncompressed-size", "", "refuse images whose layers decompress to more than this (default 16GiB)")
	return cmd
}

// readPassword reads the password from r: its first line, without the line
// ending (as docker login --password-stdin does).
func readPassword(r io.Reader) (string, error) {
	line, err := bufio.NewReader(r).ReadString('\n')
	if err != nil && !errors.Is(err, io.EOF) {
		return "", fmt.Errorf("--password-stdin: %w", err)
	}
	pw := strings.TrimRight(line, "\r\n")
	if pw == "" {
		return "", errors.New("--password-stdin: standard input is empty; pipe the password to it")
	}
	return pw, nil
}

// pullBar shows download progress on a terminal.
type pullBar struct {
	bar    *progressbar.ProgressBar
	layer  int
	layers int
}

func newPullBar(w io.Writer) *pullBar {
	f, ok := w.(*os.File)
	if !ok || !term.IsTerminal(int(f.Fd())) {
		return nil
	}
	return &pullBar{bar: progressbar.NewOptions64(-1,
		progressbar.OptionSetWriter(w),
		progressbar.OptionShowBytes(true),
		progressbar.OptionUseIECUnits(true),
		progressbar.OptionSetWidth(30),
		progressbar.OptionThrottle(100*time.Millisecond),
		progressbar.OptionSetDescription("resolving"),
		progressbar.OptionClearOnFinish(),
	)}
}

func (p *pullBar) update(pr image.Progress) {
	if p.bar.GetMax64() != pr.Total && pr.Total > 0 {
		p.bar.ChangeMax64(pr.Total)
	}
	if pr.Layer != p.layer || pr.Layers != p.layers {
		p.layer, p.layers = pr.Layer, pr.Layers
		p.bar.Describe(fmt.Sprintf("layer %d/%d", pr.Layer, pr.Layers))
	}
	p.bar.Set64(min(pr.Bytes, pr.Total))
}

func (p *pullBar) finish() {
	p.bar.Finish()
	p.bar.Clear()
}

func newImageLsCmd(g *Globals) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:     "ls",
		Aliases: []string{"list"},
		Short:   "List the cached images",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			s, err := openImageStore(g, image.Options{})
			if err != nil {
				return err
			}
			imgs, err := s.List()
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			if asJSON {
				if imgs == nil {
					imgs = []image.Image{}
				}
				enc := json.NewEncoder(w)
				enc.SetIndent("", "  ")
				return enc.Encode(imgs)
			}
			tw := tabwriter.NewWriter(w, 0, 4, 3, ' ', 0)
			fmt.Fprintln(tw, "REFERENCE\tDIGEST\tSIZE\tLAST USED")
			now := time.Now()
			for _, img := range imgs {
				refs := img.Refs
				if len(refs) == 0 {
					refs = []string{"<none>"}
				}
				for _, r := range refs {
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", r, shortDigest(img.Digest), humanSize(img.Size), ago(now, img.LastUsed))
				}
			}
			return tw.Flush()
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the images as JSON, with their paths and configs")
	return cmd
}

func newImageRmCmd(g *Globals) *cobra.Command {
	return &cobra.Command{
		Use:     "rm REFERENCE|DIGEST...",
		Aliases: []string{"remove"},
		Short:   "Remove references, and images no reference points at",
		Long: `Rm removes each reference; an image left without a reference is deleted.
A digest (sha256:..., or a unique prefix of 12 or more hex digits) deletes
the image and every reference to it. An image in use by a VM is refused.`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			s, err := openImageStore(g, image.Options{})
			if err != nil {
				return err
			}
			var failed error
			for _, a := range args {
				removed, err := s.Remove(a)
				if err != nil {
					fmt.Fprintln(cmd.ErrOrStderr(), "fireactions:", err)
					failed = &ExitError{Code: 1}
					continue
				}
				fmt.Fprintf(cmd.OutOrStdout(), "Removed: %s\n", a)
				for _, d := range removed {
					fmt.Fprintf(cmd.OutOrStdout(), "Deleted: %s\n", d)
				}
			}
			return failed
		},
	}
}

func newImagePruneCmd(g *Globals) *cobra.Command {
	var keep string
	cmd := &cobra.Command{
		Use:   "prune",
		Short: "Remove the least recently used images not in use",
		Long: `Prune removes images, least recently used first, until the cache holds at
most --keep bytes (by default everything not in use goes). Images a VM uses
are never removed. Interrupted conversions are cleared too.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var k int64
			if keep != "" {
				n, err := config.ParseByteSize(keep)
				if err != nil {
					return fmt.Errorf("--keep: %w", err)
				}
				k = int64(n)
			}
			s, err := openImageStore(g, image.Options{})
			if err != nil {
				return err
			}
			res, err := s.Prune(cmd.Context(), k)
			for _, d := range res.Removed {
				fmt.Fprintf(cmd.OutOrStdout(), "Deleted: %s\n", d)
			}
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "Reclaimed %s; the cache holds %s\n", humanSize(res.Freed), humanSize(res.Kept))
			return nil
		},
	}
	cmd.Flags().StringVar(&keep, "keep", "", "keep up to this much of the most recently used images, e.g. 20GiB (default: nothing)")
	return cmd
}

func shortDigest(d string) string {
	if len(d) > 19 {
		return d[:19]
	}
	return d
}

func humanSize(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1fGiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1fMiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1fKiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%dB", n)
}

func ago(now, t time.Time) string {
	d := now.Sub(t)
	switch {
	case t.IsZero():
		return "never"
	case d < time.Minute:
		return "just now"
	case d < time.Hour:
		return plural(int(d/time.Minute), "minute") + " ago"
	case d < 48*time.Hour:
		return plural(int(d/time.Hour), "hour") + " ago"
	}
	return plural(int(d/(24*time.Hour)), "day") + " ago"
}

func plural(n int, unit string) string {
	if n == 1 {
		return "1 " + unit
	}
	return fmt.Sprintf("%d %ss", n, unit)
}
