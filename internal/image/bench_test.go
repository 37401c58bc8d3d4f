package image_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"testing"

	"github.com/google/go-containerregistry/pkg/authn"

	"github.com/fireactions/fireactions/internal/config"
	"github.com/fireactions/fireactions/internal/image"
	"github.com/fireactions/fireactions/internal/image/imagetest"
)

func benchStore(b *testing.B) *image.Store {
	s, err := image.Open(filepath.Join(b.TempDir(), "images"), image.Options{
		Keychain: authn.NewMultiKeychain(),
		Logger:   slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		b.Fatal(err)
	}
	return s
}

// BenchmarkWarmPull is a pull of a cached image with the default policy
// (IfNotPresent): a lookup, no network.
func BenchmarkWarmPull(b *testing.B) {
	reg := imagetest.NewRegistry(b)
	ref := reg.Host + "/bench/warm:1"
	imagetest.Push(b, ref, imagetest.Image(b, hostPlatform, runConfig, imagetest.BusyboxLayer(b)), nil)
	s := benchStore(b)
	ctx := context.Background()
	if _, err := s.Pull(ctx, ref, image.PullOptions{}); err != nil {
		b.Fatal(err)
	}
	reg.Close()
	b.ResetTimer()
	for b.Loop() {
		if _, err := s.Pull(ctx, ref, image.PullOptions{Policy: config.PullIfNotPresent}); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkCreateScratch creates per-VM scratch disks once the template
// of the size exists: the cost must not grow with the size.
func BenchmarkCreateScratch(b *testing.B) {
	s := benchStore(b)
	ctx := context.Background()
	for _, size := range []int64{200 << 20, 2 << 30, 20 << 30} {
		b.Run(fmt.Sprintf("%dMiB", size>>20), func(b *testing.B) {
			dir := b.TempDir()
			if err := s.CreateScratch(ctx, filepath.Join(dir, "warm"), size); err != nil {
				b.Fatal(err)
			}
			// New paths each time: replacing a file would time the removal
			// of the old one.
			i := 0
			for b.Loop() {
				i++
				if err := s.CreateScratch(ctx, filepath.Join(dir, fmt.Sprint(i)), size); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
