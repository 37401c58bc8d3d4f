package image

import "context"

// CreateScratch writes an empty, sparse, writable ext4 file system of size
// bytes at path for one VM (see package scratch): milliseconds whatever
// the size, once the template of that size exists under the store.
func (s *Store) CreateScratch(ctx context.Context, path string, size int64) error {
	return s.scratch.Create(ctx, path, size)
}
