package runtime

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/fireactions/fireactions/internal/guest"
	"github.com/fireactions/fireactions/internal/network"
)

// recordVersion is bumped when record changes incompatibly.
const recordVersion = 1

// record is what an instance holds outside its VM directory, written
// before each resource is taken: <data-dir>/instances/<id>.json.
//
// While an instance is being created or torn down, the process doing it
// holds an exclusive flock on the record, so that Recover in another
// process leaves it alone. Between the two, ownership is the VM manager's
// (its owner lock on the VM directory).
type record struct {
	Version int    `json:"version"`
	ID      string `json:"id"`
	// Image is the reference as requested; BootDisk the boot disk path.
	Image    string `json:"image,omitempty"`
	BootDisk string `json:"boot_disk,omitempty"`
	// Digest and Lease identify the image lease that keeps the base from
	// being pruned while the VM lives.
	Digest string `json:"digest,omitempty"`
	Lease  string `json:"lease,omitempty"`
	// Scratch is the VM's writable disk.
	Scratch string `json:"scratch,omitempty"`
	// Network is "none", "cni:NAME" or "static:TAP"; Attachment is set
	// once attached.
	Network    string              `json:"network"`
	Attachment *network.Attachment `json:"attachment,omitempty"`
	Mode       guest.Mode          `json:"mode"`
	Hostname   string              `json:"hostname,omitempty"`
	Backend    string              `json:"backend,omitempty"`
	Labels     map[string]string   `json:"labels,omitempty"`
	CreatedAt  time.Time           `json:"created_at"`
}

// records is the directory of instance records.
type records struct{ dir string }

func (r records) path(id string) string { return filepath.Join(r.dir, id+".json") }

// recordLock is an exclusive flock on a record file.
type recordLock struct {
	f    *os.File
	path string
}

func (l *recordLock) release() {
	if l != nil && l.f != nil {
		l.f.Close()
		l.f = nil
	}
}

// errBusy: another live process holds the record's lock.
var errBusy = errors.New("instance is being created or removed by another process")

// newLocked returns an unnamed file in dir, already locked: it gets a name
// (linkAt) only once it holds its content, so no other process ever sees a
// record file unlocked or half written.
func newLocked(dir string, b []byte) (*lockedFile, error) {
	var f *os.File
	fd, err := unix.Open(dir, unix.O_TMPFILE|unix.O_RDWR|unix.O_CLOEXEC, 0o600)
	switch {
	case err == nil:
		f = os.NewFile(uintptr(fd), dir)
	case errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EISDIR) || errors.Is(err, unix.EINVAL):
		// A file system without O_TMPFILE: a named temporary file, locked
		// an instant after it appears (sweepTemp spares locked ones).
		if f, err = os.CreateTemp(dir, ".new-*"); err != nil {
			return nil, fmt.Errorf("instance record: %w", err)
		}
	default:
		return nil, fmt.Errorf("instance record: %w", err)
	}
	lf := &lockedFile{f: f}
	if f.Name() != dir {
		lf.name = f.Name()
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		lf.discard()
		return nil, fmt.Errorf("lock instance record: %w", err)
	}
	if _, err := f.Write(b); err != nil {
		lf.discard()
		return nil, fmt.Errorf("instance record: %w", err)
	}
	return lf, nil
}

// lockedFile is a locked record file not yet in place; name is set when
// it has a temporary name (file systems without O_TMPFILE).
type lockedFile struct {
	f    *os.File
	name string
}

func (lf *lockedFile) discard() {
	if lf.name != "" {
		os.Remove(lf.name)
	}
	lf.f.Close()
}

// linkAt gives the file the name path; it fails if path exists.
func (lf *lockedFile) linkAt(path string) error {
	if lf.name != "" {
		if err := os.Link(lf.name, path); err != nil {
			return err
		}
		os.Remove(lf.name)
		lf.name = ""
		return nil
	}
	return unix.Linkat(unix.AT_FDCWD, fmt.Sprintf("/proc/self/fd/%d", lf.f.Fd()), unix.AT_FDCWD, path, unix.AT_SYMLINK_FOLLOW)
}

func encodeRecord(rec *record) ([]byte, error) {
	rec.Version = recordVersion
	b, err := json.MarshalIndent(rec, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("instance record %s: %w", rec.ID, err)
	}
	return append(b, '\n'), nil
}

// create writes rec as a new record and returns it locked; it fails with
// ErrExists when the id is taken.
func (r records) create(rec *record) (*recordLock, error) {
	b, err := encodeRecord(rec)
	if err != nil {
		return nil, err
	}
	lf, err := newLocked(r.dir, b)
	if err != nil {
		return nil, err
	}
	p := r.path(rec.ID)
	if err := lf.linkAt(p); err != nil {
		lf.discard()
		if errors.Is(err, unix.EEXIST) || errors.Is(err, fs.ErrExist) {
			return nil, fmt.Errorf("instance %s: %w", rec.ID, ErrExists)
		}
		return nil, fmt.Errorf("instance record %s: %w", rec.ID, err)
	}
	return &recordLock{f: lf.f, path: p}, nil
}

// save replaces the record atomically; the caller holds its lock. The new
// file is locked before it gets a (temporary) name and is renamed over the
// old one. A process waiting for the old file's lock notices the
// replacement (see lock) and waits for the new one.
func (r records) save(l *recordLock, rec *record) error {
	b, err := encodeRecord(rec)
	if err != nil {
		return err
	}
	lf, err := newLocked(r.dir, b)
	if err != nil {
		return err
	}
	tmp := lf.name
	if tmp == "" {
		tmp = filepath.Join(r.dir, ".new-"+rec.ID+"-"+NewID())
		if err := lf.linkAt(tmp); err != nil {
			lf.discard()
			return fmt.Errorf("instance record %s: %w", rec.ID, err)
		}
	}
	if err := os.Rename(tmp, l.path); err != nil {
		os.Remove(tmp)
		lf.f.Close()
		return fmt.Errorf("instance record %s: %w", rec.ID, err)
	}
	l.f.Close()
	l.f = lf.f
	return nil
}

// load reads the record of id without locking it.
func (r records) load(id string) (*record, error) {
	b, err := os.ReadFile(r.path(id))
	if err != nil {
		return nil, err
	}
	return decodeRecord(r.path(id), b)
}

func decodeRecord(path string, b []byte) (*record, error) {
	var rec record
	if err := json.Unmarshal(b, &rec); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if rec.Version != recordVersion {
		return nil, fmt.Errorf("%s: record version %d, this fireactions reads %d", path, rec.Version, recordVersion)
	}
	return &rec, nil
}

// lock takes the record's lock; with wait false it fails with errBusy when
// another process holds it. It returns fs.ErrNotExist when the record is
// gone (also when it was removed while we waited for the lock).
func (r records) lock(id string, wait bool) (*recordLock, *record, error) {
	p := r.path(id)
	for {
		f, err := os.OpenFile(p, os.O_RDWR, 0)
		if err != nil {
			return nil, nil, err
		}
		how := unix.LOCK_EX
		if !wait {
			how |= unix.LOCK_NB
		}
		for {
			err = unix.Flock(int(f.Fd()), how)
			if !errors.Is(err, unix.EINTR) {
				break
			}
		}
		if err != nil {
			f.Close()
			if errors.Is(err, unix.EWOULDBLOCK) {
				return nil, nil, errBusy
			}
			return nil, nil, fmt.Errorf("lock instance record %s: %w", id, err)
		}
		// The holder may have removed (or replaced) the file before we got
		// the lock: only the inode still at the path counts.
		var at, held unix.Stat_t
		if err := unix.Stat(p, &at); err != nil {
			f.Close()
			if errors.Is(err, unix.ENOENT) {
				return nil, nil, fs.ErrNotExist
			}
			return nil, nil, err
		}
		if err := unix.Fstat(int(f.Fd()), &held); err != nil {
			f.Close()
			return nil, nil, err
		}
		if at.Ino != held.Ino || at.Dev != held.Dev {
			f.Close()
			continue
		}
		b, err := os.ReadFile(p)
		if err != nil {
			f.Close()
			return nil, nil, err
		}
		rec, err := decodeRecord(p, b)
		if err != nil {
			// Locked but unreadable: the caller may still remove it.
			return &recordLock{f: f, path: p}, nil, err
		}
		return &recordLock{f: f, path: p}, rec, nil
	}
}

// remove deletes the record; the caller holds its lock.
func (r records) remove(l *recordLock) error {
	if err := os.Remove(l.path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove instance record: %w", err)
	}
	return nil
}

// ids lists the instances on record.
func (r records) ids() ([]string, error) {
	ents, err := os.ReadDir(r.dir)
	if err != nil {
		return nil, fmt.Errorf("list instance records: %w", err)
	}
	var out []string
	for _, e := range ents {
		n := e.Name()
		if e.Type().IsRegular() && strings.HasSuffix(n, ".json") && !strings.HasPrefix(n, ".") {
			out = append(out, strings.TrimSuffix(n, ".json"))
		}
	}
	return out, nil
}
