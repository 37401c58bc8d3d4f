package image

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// Lease marks a base as in use, so that Remove and Prune leave it alone.
// Leases are files under leases/<hex>/, so they outlive the process that
// took them: a lease ends when released, or when the process it is tied to
// has exited.
type Lease struct {
	ID     string `json:"id"`
	Digest string `json:"digest"`
	// PID ties the lease to a process; 0 means it lasts until released.
	PID int `json:"pid,omitempty"`
	// PIDStart is the process's start time (clock ticks after boot, from
	// /proc/<pid>/stat), so that a recycled pid does not keep the lease.
	PIDStart uint64    `json:"pid_start,omitempty"`
	Created  time.Time `json:"created"`
}

// LeaseOption shapes a lease.
type LeaseOption func(*Lease)

// Holder names the lease (a VM or task id) and makes it last until
// released, across restarts of this process; ReleaseLease(digest, id) ends
// it after a restart. Without Holder a lease is tied to this process.
func Holder(id string) LeaseOption {
	return func(l *Lease) { l.ID, l.PID = id, 0 }
}

// HeldByProcess ties the lease to a process, such as the VMM using the
// base: it ends when that process exits.
func HeldByProcess(pid int) LeaseOption {
	return func(l *Lease) { l.PID = pid }
}

var leaseID = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)

// Acquire marks the image with digest (sha256:<hex>) as in use until the
// returned release is called (or, see Holder and HeldByProcess, the lease
// otherwise ends).
func (s *Store) Acquire(digest string, opts ...LeaseOption) (release func(), err error) {
	hexd, err := fullDigest(digest)
	if err != nil {
		return nil, err
	}
	l := Lease{ID: randomID(), Digest: "sha256:" + hexd, PID: os.Getpid(), Created: time.Now().UTC()}
	for _, o := range opts {
		o(&l)
	}
	if !leaseID.MatchString(l.ID) {
		return nil, fmt.Errorf("lease id %q: use letters, digits, '.', '_' and '-' (at most 128)", l.ID)
	}
	if l.PID > 0 {
		start, err := processStart(l.PID)
		if err != nil {
			return nil, fmt.Errorf("lease for process %d: %w", l.PID, err)
		}
		l.PIDStart = start
	}
	b, err := json.Marshal(l)
	if err != nil {
		return nil, err
	}
	path := filepath.Join(s.dir, "leases", hexd, l.ID+".json")
	err = s.withLock(func() error {
		if _, err := s.load(hexd); err != nil {
			return fmt.Errorf("acquire %s: %w", l.Digest, err)
		}
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			return err
		}
		return writeFileAtomic(path, b)
	})
	if err != nil {
		return nil, err
	}
	return func() {
		if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			s.log.Warn("release image lease", "digest", l.Digest, "lease", l.ID, "err", err)
		}
	}, nil
}

// ReleaseLease ends the lease id on digest; a lease already gone is not an
// error.
func (s *Store) ReleaseLease(digest, id string) error {
	hexd, err := fullDigest(digest)
	if err != nil {
		return err
	}
	if !leaseID.MatchString(id) {
		return fmt.Errorf("lease id %q is not valid", id)
	}
	err = os.Remove(filepath.Join(s.dir, "leases", hexd, id+".json"))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}

// Leases returns the live leases on digest.
func (s *Store) Leases(digest string) ([]Lease, error) {
	hexd, err := fullDigest(digest)
	if err != nil {
		return nil, err
	}
	var out []Lease
	err = s.withLock(func() error {
		out = s.liveLeases(hexd)
		return nil
	})
	return out, err
}

// liveLeases lists the leases on an image, deleting those whose process
// has exited; call it holding the lock.
func (s *Store) liveLeases(hexd string) []Lease {
	dir := filepath.Join(s.dir, "leases", hexd)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil
	}
	var out []Lease
	for _, e := range ents {
		if !strings.HasSuffix(e.Name(), ".json") {
			continue
		}
		p := filepath.Join(dir, e.Name())
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		var l Lease
		if err := json.Unmarshal(b, &l); err != nil {
			// Unreadable: keep the image rather than guess.
			out = append(out, Lease{ID: strings.TrimSuffix(e.Name(), ".json"), Digest: "sha256:" + hexd})
			continue
		}
		if l.PID > 0 {
			if start, err := processStart(l.PID); err != nil || start != l.PIDStart {
				s.log.Debug("dropping the lease of an exited process", "digest", l.Digest, "lease", l.ID, "pid", l.PID)
				os.Remove(p)
				continue
			}
		}
		out = append(out, l)
	}
	return out
}

func describeLeases(ls []Lease) string {
	ids := make([]string, 0, len(ls))
	for _, l := range ls {
		if l.PID > 0 {
			ids = append(ids, fmt.Sprintf("%s (pid %d)", l.ID, l.PID))
		} else {
			ids = append(ids, l.ID)
		}
	}
	if len(ids) > 3 {
		ids = append(ids[:3], fmt.Sprintf("and %d more", len(ids)-3))
	}
	return strings.Join(ids, ", ")
}

// processStart reads a process's start time from /proc/<pid>/stat.
func processStart(pid int) (uint64, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, err
	}
	// The command name (field 2) may hold spaces and parentheses: fields
	// are counted after its closing parenthesis.
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 20 {
		return 0, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	return strconv.ParseUint(f[19], 10, 64)
}

func fullDigest(d string) (string, error) {
	h := strings.TrimPrefix(d, "sha256:")
	if len(h) != 64 || strings.Trim(h, "0123456789abcdef") != "" {
		return "", fmt.Errorf("%q is not a sha256 digest (sha256:<64 hex digits>)", d)
	}
	return h, nil
}

func randomID() string {
	var b [8]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}
