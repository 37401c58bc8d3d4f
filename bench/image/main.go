// Command image measures the image engine on a real image in one run: a
// cold pull and conversion by fireactions, the seed driver's pipeline
// (skopeo copy, umoci unpack, mkfs.ext4 -d) on the same image, the
// decompression floor (go-containerregistry's mutate.Extract to
// io.Discard), a warm pull, and per-VM scratch disk creation. run.sh
// prepares the image and the registry; see docs/image-engine.md.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/pprof"
	"slices"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/klauspost/compress/gzip"

	"github.com/fireactions/fireactions/internal/config"
	"github.com/fireactions/fireactions/internal/image"
)

func main() {
	var (
		rootfsTar = flag.String("rootfs-tar", "", "tarball of the root file system to benchmark with (tar --numeric-owner)")
		registry  = flag.String("registry", "", "host:port of the registry to push to and pull from")
		work      = flag.String("work", "", "scratch directory for the runs")
		runs      = flag.Int("runs", 3, "runs of each cold pipeline; the median is reported")
		skipSeed  = flag.Bool("skip-seed", false, "do not run the skopeo/umoci/mkfs pipeline")
		cpuprof   = flag.String("cpuprofile", "", "write a CPU profile of the cold pulls to this file")
	)
	flag.Parse()
	if *rootfsTar == "" || *registry == "" || *work == "" {
		fmt.Fprintln(os.Stderr, "usage: image -rootfs-tar TAR -registry HOST:PORT -work DIR [-runs N]")
		os.Exit(2)
	}
	if *cpuprof != "" {
		f, err := os.Create(*cpuprof)
		if err != nil {
			fmt.Fprintln(os.Stderr, "bench:", err)
			os.Exit(1)
		}
		profile = f
	}
	if err := run(*rootfsTar, *registry, *work, *runs, *skipSeed); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

const repo = "bench/debian"

func run(rootfsTar, registry, work string, runs int, skipSeed bool) error {
	ctx := context.Background()
	ref, err := name.ParseReference(registry + "/" + repo + ":bookworm-minbase")
	if err != nil {
		return err
	}
	if err := ensureImage(ref, rootfsTar); err != nil {
		return err
	}
	img, err := remote.Image(ref)
	if err != nil {
		return err
	}
	mf, _ := img.Manifest()
	var compressed int64
	for _, l := range mf.Layers {
		compressed += l.Size
	}
	fmt.Printf("image %s: %d layers, %.1f MB compressed\n", ref.Name(), len(mf.Layers), float64(compressed)/1e6)

	// Warm the registry's files in the page cache so that no pipeline pays
	// for the first read.
	if _, err := floor(ref); err != nil {
		return err
	}

	var cold, seed, flr, kflr []time.Duration
	var base string
	var uncompressed int64
	for i := range runs {
		dir := filepath.Join(work, fmt.Sprintf("cold-%d", i))
		t, im, err := coldPull(ctx, dir, ref.Name())
		if err != nil {
			return fmt.Errorf("cold pull: %w", err)
		}
		cold = append(cold, t)
		base = im.BasePath
		if !skipSeed {
			t, err := seedPipeline(ctx, ref.Name(), filepath.Join(work, fmt.Sprintf("seed-%d", i)))
			if err != nil {
				return fmt.Errorf("seed pipeline: %w", err)
			}
			seed = append(seed, t)
		}
		t, err = floor(ref)
		if err != nil {
			return fmt.Errorf("floor: %w", err)
		}
		flr = append(flr, t)
		if t, err = gunzipFloor(ref); err != nil {
			return fmt.Errorf("gunzip floor: %w", err)
		}
		kflr = append(kflr, t)
		if i < runs-1 {
			os.RemoveAll(dir)
		}
	}
	fi, _ := os.Stat(base)

	// Warm: the image is cached; the default policy is a lookup.
	store, err := openStore(filepath.Join(work, fmt.Sprintf("cold-%d", runs-1)))
	if err != nil {
		return err
	}
	var warm []time.Duration
	for range 200 {
		start := time.Now()
		if _, err := store.Pull(ctx, ref.Name(), image.PullOptions{Policy: config.PullIfNotPresent}); err != nil {
			return fmt.Errorf("warm pull: %w", err)
		}
		warm = append(warm, time.Since(start))
	}

	type scratchRow struct {
		label       string
		first, warm time.Duration
	}
	var scratch []scratchRow
	sdir := filepath.Join(work, "scratch")
	os.MkdirAll(sdir, 0o755)
	for _, sz := range []struct {
		label string
		size  int64
	}{{"200 MB", 200 << 20}, {"2 GB", 2 << 30}, {"20 GiB", 20 << 30}} {
		start := time.Now()
		if err := store.CreateScratch(ctx, filepath.Join(sdir, "first"), sz.size); err != nil {
			return err
		}
		first := time.Since(start)
		var ts []time.Duration
		for i := range 50 {
			p := filepath.Join(sdir, fmt.Sprintf("%d-%d", sz.size, i))
			start := time.Now()
			if err := store.CreateScratch(ctx, p, sz.size); err != nil {
				return err
			}
			ts = append(ts, time.Since(start))
		}
		scratch = append(scratch, scratchRow{sz.label, first, median(ts)})
		os.RemoveAll(sdir)
		os.MkdirAll(sdir, 0o755)
	}
	if m, err := readMeta(base); err == nil {
		uncompressed = m
	}

	c, f := median(cold), median(flr)
	fmt.Println()
	fmt.Printf("%-58s %10s\n", "measure (median of runs)", "value")
	fmt.Printf("%-58s %9.2fs\n", "cold pull + conversion, fireactions", c.Seconds())
	var s time.Duration
	if len(seed) > 0 {
		s = median(seed)
		fmt.Printf("%-58s %9.2fs\n", "seed pipeline: skopeo copy + umoci unpack + mkfs.ext4 -d", s.Seconds())
	}
	fmt.Printf("%-58s %9.2fs\n", "decompression floor: mutate.Extract to io.Discard", f.Seconds())
	fmt.Printf("%-58s %9.2fs\n", "fetch + klauspost gunzip of the layers to io.Discard", median(kflr).Seconds())
	fmt.Printf("%-58s %8.3fms\n", "warm pull (IfNotPresent lookup)", ms(median(warm)))
	for _, r := range scratch {
		fmt.Printf("%-58s %8.3fms\n", "scratch disk "+r.label+" (template cached)", ms(r.warm))
		fmt.Printf("%-58s %8.1fms\n", "scratch disk "+r.label+" (first: formats the template)", ms(r.first))
	}
	fmt.Printf("%-58s %9.1fMB\n", "base image size", float64(fi.Size())/1e6)
	if uncompressed > 0 {
		fmt.Printf("%-58s %9.1fMB\n", "uncompressed layers", float64(uncompressed)/1e6)
	}
	fmt.Println()
	fmt.Println("ratios and targets")
	check := func(label string, v float64, ok bool, target string) {
		verdict := "met"
		if !ok {
			verdict = "MISSED"
		}
		fmt.Printf("  %-40s %8.2f   target %-8s %s\n", label, v, target, verdict)
	}
	if s > 0 {
		check("seed pipeline / fireactions cold", s.Seconds()/c.Seconds(), s.Seconds()/c.Seconds() >= 2.5, ">= 2.5")
	}
	check("fireactions cold / decompression floor", c.Seconds()/f.Seconds(), c.Seconds()/f.Seconds() <= 1.6, "<= 1.6")
	fmt.Printf("  %-40s %8.2f   (fireactions decompresses with klauspost/compress, the floor with the standard library)\n",
		"fireactions cold / klauspost gunzip", c.Seconds()/median(kflr).Seconds())
	check("warm pull, ms", ms(median(warm)), ms(median(warm)) < 50, "< 50")
	for _, r := range scratch {
		check("scratch "+r.label+", ms", ms(r.warm), ms(r.warm) < 20, "< 20")
	}
	fmt.Printf("\nruns: cold %v, seed %v, floor %v, gunzip %v\n", round(cold), round(seed), round(flr), round(kflr))
	return nil
}

func openStore(dir string) (*image.Store, error) {
	return image.Open(dir, image.Options{
		Keychain: authn.NewMultiKeychain(),
		Logger:   slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
}

// profile, when set, receives a CPU profile of the cold pulls.
var profile *os.File

func coldPull(ctx context.Context, dir, ref string) (time.Duration, *image.Image, error) {
	os.RemoveAll(dir)
	if profile != nil {
		if err := pprof.StartCPUProfile(profile); err == nil {
			defer func() {
				pprof.StopCPUProfile()
				profile = nil // the first cold pull only
			}()
		}
	}
	start := time.Now()
	s, err := openStore(dir)
	if err != nil {
		return 0, nil, err
	}
	img, err := s.Pull(ctx, ref, image.PullOptions{Policy: config.PullAlways})
	return time.Since(start), img, err
}

func floor(ref name.Reference) (time.Duration, error) {
	start := time.Now()
	img, err := remote.Image(ref)
	if err != nil {
		return 0, err
	}
	rc := mutate.Extract(img)
	defer rc.Close()
	if _, err := io.Copy(io.Discard, rc); err != nil {
		return 0, err
	}
	return time.Since(start), nil
}

// gunzipFloor fetches every layer and decompresses it with the gzip
// implementation the converter uses, discarding the output: the least a
// conversion can cost with that decompressor.
func gunzipFloor(ref name.Reference) (time.Duration, error) {
	start := time.Now()
	img, err := remote.Image(ref)
	if err != nil {
		return 0, err
	}
	layers, err := img.Layers()
	if err != nil {
		return 0, err
	}
	for _, l := range layers {
		rc, err := l.Compressed()
		if err != nil {
			return 0, err
		}
		zr, err := gzip.NewReader(rc)
		if err != nil {
			rc.Close()
			return 0, err
		}
		_, err = io.Copy(io.Discard, zr)
		rc.Close()
		if err != nil {
			return 0, err
		}
	}
	return time.Since(start), nil
}

// seedPipeline is the seed driver's way: skopeo copies the image into an
// OCI layout, umoci unpacks it into a directory, mkfs.ext4 -d formats an
// image sized from the tree.
func seedPipeline(ctx context.Context, ref, dir string) (time.Duration, error) {
	os.RemoveAll(dir)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return 0, err
	}
	defer os.RemoveAll(dir)
	layout, bundle, out := filepath.Join(dir, "oci"), filepath.Join(dir, "bundle"), filepath.Join(dir, "rootfs.ext4")
	start := time.Now()
	if err := sh(ctx, "skopeo", "copy", "--quiet", "--src-tls-verify=false", "docker://"+ref, "oci:"+layout+":bench"); err != nil {
		return 0, err
	}
	unpack := []string{"unpack", "--image", layout + ":bench", bundle}
	if os.Geteuid() != 0 {
		unpack = append([]string{"--rootless"}, unpack...)
	}
	if err := sh(ctx, "umoci", unpack...); err != nil {
		return 0, err
	}
	size, err := treeSize(filepath.Join(bundle, "rootfs"))
	if err != nil {
		return 0, err
	}
	f, err := os.Create(out)
	if err != nil {
		return 0, err
	}
	f.Truncate((size*5/4 + 64<<20) &^ 4095)
	f.Close()
	if err := sh(ctx, "mkfs.ext4", "-q", "-F", "-E", "root_owner=0:0", "-d", filepath.Join(bundle, "rootfs"), out); err != nil {
		return 0, err
	}
	return time.Since(start), nil
}

func sh(ctx context.Context, name string, args ...string) error {
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, out)
	}
	return nil
}

func treeSize(root string) (int64, error) {
	var n int64
	err := filepath.WalkDir(root, func(_ string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if fi, err := d.Info(); err == nil {
			n += fi.Size() + 4096
		}
		return nil
	})
	return n, err
}

// ensureImage pushes the benchmark image unless the registry has it: the
// root file system as one layer, and a small second layer on top.
func ensureImage(ref name.Reference, rootfsTar string) error {
	if _, err := remote.Head(ref); err == nil {
		return nil
	}
	fmt.Println("pushing the benchmark image (once per registry storage)")
	base, err := tarball.LayerFromFile(rootfsTar, tarball.WithCompressedCaching)
	if err != nil {
		return err
	}
	top, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return os.Open(filepath.Join(filepath.Dir(rootfsTar), "top-layer.tar"))
	}, tarball.WithCompressedCaching)
	if err != nil {
		return err
	}
	img, err := mutate.AppendLayers(empty.Image, base, top)
	if err != nil {
		return err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return err
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", "amd64"
	cf.Config = v1.Config{Cmd: []string{"/bin/bash"}, Env: []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}}
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		return err
	}
	return remote.Write(ref, img)
}

func readMeta(base string) (int64, error) {
	b, err := os.ReadFile(filepath.Join(filepath.Dir(base), "meta.json"))
	if err != nil {
		return 0, err
	}
	var m struct {
		UncompressedBytes int64 `json:"uncompressed_bytes"`
	}
	err = json.Unmarshal(b, &m)
	return m.UncompressedBytes, err
}

func median(ts []time.Duration) time.Duration {
	if len(ts) == 0 {
		return 0
	}
	s := slices.Clone(ts)
	slices.Sort(s)
	return s[len(s)/2]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func round(ts []time.Duration) []string {
	var out []string
	for _, t := range ts {
		out = append(out, fmt.Sprintf("%.2fs", t.Seconds()))
	}
	return out
}
