package image

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// PruneResult says what Prune removed.
type PruneResult struct {
	// Removed are the digests of the images removed.
	Removed []string
	// Freed is the bytes of bases removed; Kept what the cache still holds.
	Freed, Kept int64
}

// Prune removes the least recently used images until the bases left take
// at most keep bytes (0 removes every image not in use). Images with live
// leases are never removed. It also clears interrupted conversions, bases
// of other converter versions and leases of exited processes.
func (s *Store) Prune(ctx context.Context, keep int64) (PruneResult, error) {
	return s.prune(ctx, keep, "")
}

func (s *Store) prune(ctx context.Context, keep int64, protect string) (PruneResult, error) {
	var res PruneResult
	err := s.withLock(func() error {
		if err := s.cleanTmp(); err != nil {
			return err
		}
		ents, err := os.ReadDir(filepath.Join(s.dir, "sha256"))
		if err != nil {
			return err
		}
		var imgs []*Image
		for _, e := range ents {
			hexd := e.Name()
			leased := len(s.liveLeases(hexd)) > 0
			s.dropOtherVersions(hexd, leased)
			img, err := s.load(hexd)
			if err != nil {
				if !leased {
					// Nothing usable in it (only other versions, or damaged).
					if err := s.deleteImage(hexd); err != nil {
						return err
					}
				}
				continue
			}
			res.Kept += img.Size
			if !leased && img.Digest != protect {
				imgs = append(imgs, img)
			}
		}
		slices.SortFunc(imgs, func(a, b *Image) int { return a.LastUsed.Compare(b.LastUsed) })
		for _, img := range imgs {
			if res.Kept <= keep || ctx.Err() != nil {
				break
			}
			if err := s.deleteImage(strings.TrimPrefix(img.Digest, "sha256:")); err != nil {
				return err
			}
			s.log.Info("pruned image", "digest", img.Digest, "size", img.Size, "last_used", img.LastUsed)
			res.Removed = append(res.Removed, img.Digest)
			res.Freed += img.Size
			res.Kept -= img.Size
		}
		if len(res.Removed) == 0 {
			return nil
		}
		return s.updateIndex(func(idx *refIndex) {
			for k, e := range idx.Refs {
				if slices.Contains(res.Removed, e.Digest) {
					delete(idx.Refs, k)
				}
			}
		})
	})
	if err == nil {
		err = ctx.Err()
	}
	return res, err
}

// dropOtherVersions removes bases made by other converter versions; call it
// holding the lock.
func (s *Store) dropOtherVersions(hexd string, leased bool) {
	if leased {
		return
	}
	vers, err := os.ReadDir(filepath.Join(s.dir, "sha256", hexd))
	if err != nil {
		return
	}
	for _, v := range vers {
		if v.Name() != ConverterVersion {
			os.RemoveAll(filepath.Join(s.dir, "sha256", hexd, v.Name()))
		}
	}
}
