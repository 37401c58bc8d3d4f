package image

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/Microsoft/hcsshim/ext4/tar2ext4"
)

// OpenBootDisk accepts a prebuilt ext4 image (the seed's BootDisk) as a
// base, after checking that it is one: the ext4 superblock magic, and a
// file large enough for the file system it describes. The image is used
// as it is, read-only; it has no OCI config, so the guest boots its own
// init.
func OpenBootDisk(path string) (*Image, error) {
	if path == "" {
		return nil, errors.New("boot disk: empty path")
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("boot disk %s: %w", path, err)
	}
	f, err := os.Open(abs)
	if err != nil {
		return nil, fmt.Errorf("boot disk: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("boot disk %s: %w", abs, err)
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("boot disk %s: not a regular file", abs)
	}
	fsSize, _, err := tar2ext4.Ext4FileSystemSize(f)
	if err != nil {
		return nil, fmt.Errorf("boot disk %s: not an ext4 file system image (%v); build one with mkfs.ext4 -d or use an OCI image instead", abs, err)
	}
	if fsSize > fi.Size() {
		return nil, fmt.Errorf("boot disk %s: truncated: the file system needs %d bytes, the file has %d", abs, fsSize, fi.Size())
	}
	return &Image{
		Ref:      abs,
		BasePath: abs,
		Size:     fi.Size(),
		Created:  fi.ModTime(),
		LastUsed: fi.ModTime(),
	}, nil
}
