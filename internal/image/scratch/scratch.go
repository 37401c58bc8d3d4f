// Package scratch makes the per-VM writable disk: an empty, sparse ext4
// file system cloned from a template formatted once per size, so that
// creating one takes milliseconds whatever its size. The guest mounts it
// as the upper and work directories of the overlay over the read-only base.
package scratch

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sync/singleflight"
	"golang.org/x/sys/unix"
)

const (
	// MinSize is the smallest scratch disk.
	MinSize = 16 << 20
	// BytesPerInode is the inode density: one inode per 16KiB, four times
	// mke2fs's default, so that trees of small files (node_modules, git
	// objects, build outputs) run out of space before they run out of
	// inodes.
	BytesPerInode = 16384
	// templateVersion changes whenever the mkfs options below change.
	templateVersion = "v2"
)

// mkfsArgs format a scratch template. No journal: the disk lives as long
// as one VM and is thrown away after, so crash consistency buys nothing.
// No resize inode: a scratch disk never grows online, and its reserved
// blocks would be most of what each clone copies. Inode tables are
// initialised now (lazy_itable_init=0), so the guest kernel does not zero
// them in the background, which would allocate them in every clone; the
// zeros are then punched out of the template, which stays sparse.
// root_owner makes the root directory root's even when an unprivileged
// user formats it.
var mkfsArgs = []string{
	"-q", "-F", "-t", "ext4", "-b", "4096", "-i", strconv.Itoa(BytesPerInode), "-m", "0",
	"-O", "^has_journal,^resize_inode", "-E", "lazy_itable_init=0,nodiscard,root_owner=0:0",
	"-L", "scratch",
}

// Templates creates scratch disks from templates kept in one directory.
type Templates struct {
	dir    string
	mkfs   string
	flight singleflight.Group

	mu sync.Mutex
	// loaded holds the data segments of the templates read so far: a few
	// hundred KiB each, written with plain pwrites (copy_file_range costs
	// more per call than these small segments take to copy).
	loaded map[string][]segment
}

// segment is one allocated extent of a template.
type segment struct {
	off  int64
	data []byte
}

// New keeps templates in dir. It needs mkfs.ext4 (e2fsprogs) to format a
// template the first time a size is asked for.
func New(dir string) (*Templates, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	return &Templates{dir: dir}, nil
}

// Create writes an empty ext4 file system of size bytes (rounded down to
// 4KiB) at path, replacing any file there. Only the first disk of a size
// formats a template; later ones copy the template's few allocated blocks
// (or share them, where the file system can clone).
func (t *Templates) Create(ctx context.Context, path string, size int64) error {
	size &^= 4095
	if size < MinSize {
		return fmt.Errorf("scratch disk %s: size %d is below the minimum of %d bytes (16MiB)", path, size, MinSize)
	}
	tpl, err := t.template(ctx, size)
	if err != nil {
		return fmt.Errorf("scratch disk %s: %w", path, err)
	}
	segs, err := t.segments(tpl)
	if err != nil {
		return fmt.Errorf("scratch disk %s: read template: %w", path, err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return fmt.Errorf("scratch disk: %w", err)
	}
	defer os.Remove(tmp.Name())
	err = clone(tpl, segs, tmp, size)
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		return fmt.Errorf("scratch disk %s: %w", path, err)
	}
	return nil
}

// template returns the path of the template of this size, formatting it
// if needed; concurrent callers (and processes) may race, and the last
// rename wins with an identical file.
func (t *Templates) template(ctx context.Context, size int64) (string, error) {
	path := filepath.Join(t.dir, fmt.Sprintf("ext4-%s-%d.img", templateVersion, size))
	if _, err := os.Stat(path); err == nil {
		return path, nil
	}
	_, err, _ := t.flight.Do(path, func() (any, error) {
		if _, err := os.Stat(path); err == nil {
			return nil, nil
		}
		mkfs := t.mkfs
		if mkfs == "" {
			var err error
			if mkfs, err = findMkfs(); err != nil {
				return nil, err
			}
		}
		f, err := os.CreateTemp(t.dir, ".template-*")
		if err != nil {
			return nil, err
		}
		defer os.Remove(f.Name())
		err = f.Truncate(size)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return nil, err
		}
		cmd := exec.CommandContext(ctx, mkfs, append(append([]string(nil), mkfsArgs...), f.Name())...)
		if out, err := cmd.CombinedOutput(); err != nil {
			return nil, fmt.Errorf("format template: %s: %w: %s", mkfs, err, strings.TrimSpace(string(out)))
		}
		if err := digHoles(f.Name()); err != nil {
			return nil, fmt.Errorf("format template: %w", err)
		}
		return nil, os.Rename(f.Name(), path)
	})
	if err != nil {
		return "", err
	}
	return path, nil
}

// findMkfs looks for mkfs.ext4 on PATH and in /sbin and /usr/sbin, which
// unprivileged users often lack in PATH.
func findMkfs() (string, error) {
	if p, err := exec.LookPath("mkfs.ext4"); err == nil {
		return p, nil
	}
	for _, d := range []string{"/usr/sbin", "/sbin"} {
		p := filepath.Join(d, "mkfs.ext4")
		if fi, err := os.Stat(p); err == nil && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", errors.New("mkfs.ext4 not found: install e2fsprogs")
}

// segments returns the data extents of a template, read once.
func (t *Templates) segments(path string) ([]segment, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if segs, ok := t.loaded[path]; ok {
		return segs, nil
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	var segs []segment
	var total int64
	fd := int(f.Fd())
	for off := int64(0); off < fi.Size(); {
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break // only a hole remains
		}
		if err != nil {
			return nil, fmt.Errorf("seek data: %w", err)
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil {
			return nil, fmt.Errorf("seek hole: %w", err)
		}
		total += hole - data
		if total > maxTemplateData {
			// Not sparse (a file system without holes): clone from disk.
			segs = nil
			break
		}
		b := make([]byte, hole-data)
		if _, err := f.ReadAt(b, data); err != nil {
			return nil, err
		}
		segs = append(segs, segment{data, b})
		off = hole
	}
	if t.loaded == nil {
		t.loaded = map[string][]segment{}
	}
	t.loaded[path] = segs
	return segs, nil
}

// maxTemplateData bounds the template data kept in memory.
const maxTemplateData = 32 << 20

// clone makes dst a copy of the template: a reflink where the file system
// offers one, else its data segments written into a sparse file.
func clone(src string, segs []segment, dst *os.File, size int64) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	if err := unix.IoctlFileClone(int(dst.Fd()), int(in.Fd())); err == nil {
		return nil
	}
	if err := dst.Truncate(size); err != nil {
		return err
	}
	if segs == nil {
		_, err := io.Copy(io.NewOffsetWriter(dst, 0), io.NewSectionReader(in, 0, size))
		return err
	}
	for _, s := range segs {
		if _, err := dst.WriteAt(s.data, s.off); err != nil {
			return err
		}
	}
	return nil
}

// digHoles deallocates the zero blocks of a file: the unwritten extents
// mke2fs leaves when it zeroes with fallocate, or the zeros it wrote where
// the file system cannot do that.
func digHoles(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	fd, size := int(f.Fd()), fi.Size()
	const blk = 4096
	buf := make([]byte, 1<<20)
	punch := func(off, n int64) error {
		if n == 0 {
			return nil
		}
		err := unix.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
		if errors.Is(err, unix.EOPNOTSUPP) {
			return nil // stays allocated: clones copy zeros, still correct
		}
		return err
	}
	for off := int64(0); off < size; {
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break
		}
		if err != nil {
			return err
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil {
			return err
		}
		// Punch the runs of zero blocks inside this data segment.
		zeroFrom := int64(-1)
		for p := data; p < hole; {
			n, err := f.ReadAt(buf[:min(int64(len(buf)), hole-p)], p)
			if n == 0 && err != nil {
				return err
			}
			for i := 0; i+blk <= n; i += blk {
				at := p + int64(i)
				if isZero(buf[i : i+blk]) {
					if zeroFrom < 0 {
						zeroFrom = at
					}
					continue
				}
				if zeroFrom >= 0 {
					if err := punch(zeroFrom, at-zeroFrom); err != nil {
						return err
					}
					zeroFrom = -1
				}
			}
			p += int64(n)
		}
		if zeroFrom >= 0 {
			if err := punch(zeroFrom, hole-zeroFrom); err != nil {
				return err
			}
		}
		off = hole
	}
	return nil
}

func isZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
