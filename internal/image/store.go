package image

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"golang.org/x/sync/singleflight"
	"golang.org/x/sys/unix"

	"github.com/fireactions/fireactions/internal/image/scratch"
)

// Layout of the store directory (conventionally <data-dir>/images):
//
//	sha256/<hex>/<converter>/rootfs.ext4   read-only base
//	sha256/<hex>/<converter>/config.json   the image's OCI config, verbatim
//	sha256/<hex>/<converter>/meta.json     what the store knows about it
//	sha256/<hex>/<converter>/used          its mtime is the last use
//	refs.json                              reference index: ref → digest
//	leases/<hex>/<id>.json                 who uses a base (see Acquire)
//	tmp/                                   conversions in progress, trash
//	scratch/                               scratch disk templates
//	lock                                   serialises index, lease and removal changes
const (
	baseFile   = "rootfs.ext4"
	configFile = "config.json"
	metaFile   = "meta.json"
	usedFile   = "used"
	refsFile   = "refs.json"
)

// Store is the content-addressed image cache.
type Store struct {
	dir       string
	opts      Options
	log       *slog.Logger
	resolving singleflight.Group
	building  singleflight.Group
	scratch   *scratch.Templates
}

// Open opens (creating it if needed) the store in dir, conventionally
// <data-dir>/images, and removes what interrupted conversions and removals
// left behind.
func Open(dir string, opts Options) (*Store, error) {
	if dir == "" {
		return nil, errors.New("open image store: empty directory; set data_dir or --data-dir")
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("open image store: %w", err)
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.Keychain == nil {
		opts.Keychain = authn.DefaultKeychain
	}
	if opts.MaxCacheSize < 0 || opts.MaxUncompressedSize < 0 || opts.MaxEntries < 0 {
		return nil, errors.New("open image store: size and entry limits cannot be negative")
	}
	for _, d := range []string{"sha256", "leases", "tmp", "scratch"} {
		if err := os.MkdirAll(filepath.Join(abs, d), 0o755); err != nil {
			return nil, fmt.Errorf("open image store: %w", err)
		}
	}
	s := &Store{dir: abs, opts: opts, log: opts.Logger.With("component", "image")}
	if s.scratch, err = scratch.New(filepath.Join(abs, "scratch")); err != nil {
		return nil, fmt.Errorf("open image store: %w", err)
	}
	if err := s.withLock(s.cleanTmp); err != nil {
		return nil, fmt.Errorf("open image store: %w", err)
	}
	return s, nil
}

// Dir returns the store's directory.
func (s *Store) Dir() string { return s.dir }

func (s *Store) imageDir(hex string) string {
	return filepath.Join(s.dir, "sha256", hex, ConverterVersion)
}

// withLock runs f holding the store's file lock, which serialises changes
// to the index, leases and image directories across processes.
func (s *Store) withLock(f func() error) error {
	l, err := os.OpenFile(filepath.Join(s.dir, "lock"), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	defer l.Close()
	if err := flock(l, unix.LOCK_EX); err != nil {
		return fmt.Errorf("lock %s: %w", l.Name(), err)
	}
	return f()
}

func flock(f *os.File, how int) error {
	for {
		err := unix.Flock(int(f.Fd()), how)
		if !errors.Is(err, unix.EINTR) {
			return err
		}
	}
}

// meta is meta.json.
type meta struct {
	Digest            string      `json:"digest"`
	Platform          string      `json:"platform"`
	Converter         string      `json:"converter"`
	Source            string      `json:"source"`
	Size              int64       `json:"size"`
	Created           time.Time   `json:"created"`
	Layers            int         `json:"layers"`
	Entries           int         `json:"entries"`
	UncompressedBytes int64       `json:"uncompressed_bytes"`
	Config            ImageConfig `json:"config"`
}

// load reads a published image. A directory whose base does not match its
// metadata is reported as absent: nothing half-written is ever used.
func (s *Store) load(hex string) (*Image, error) {
	dir := s.imageDir(hex)
	b, err := os.ReadFile(filepath.Join(dir, metaFile))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, ErrNotFound
		}
		return nil, err
	}
	var m meta
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(dir, metaFile), err)
	}
	base := filepath.Join(dir, baseFile)
	fi, err := os.Stat(base)
	if err != nil || fi.Size() != m.Size || m.Converter != ConverterVersion || m.Digest != "sha256:"+hex {
		return nil, ErrNotFound
	}
	img := &Image{
		Digest:     m.Digest,
		Platform:   m.Platform,
		BasePath:   base,
		ConfigPath: filepath.Join(dir, configFile),
		Size:       m.Size,
		Config:     m.Config,
		Created:    m.Created,
		LastUsed:   m.Created,
	}
	if u, err := os.Stat(filepath.Join(dir, usedFile)); err == nil {
		img.LastUsed = u.ModTime()
	}
	return img, nil
}

// touch records a use of the image.
func (s *Store) touch(img *Image) {
	now := time.Now()
	p := filepath.Join(filepath.Dir(img.BasePath), usedFile)
	if err := os.Chtimes(p, now, now); err != nil {
		s.log.Debug("record image use", "digest", img.Digest, "err", err)
		return
	}
	img.LastUsed = now
}

// refIndex is refs.json: which image each reference (per platform) named
// when last resolved.
type refIndex struct {
	Version int                 `json:"version"`
	Refs    map[string]refEntry `json:"refs"`
}

type refEntry struct {
	Ref      string    `json:"ref"`
	Platform string    `json:"platform"`
	Digest   string    `json:"digest"`
	Resolved time.Time `json:"resolved"`
}

func refKey(ref, platform string) string { return ref + " " + platform }

// readIndex needs no lock: the index is replaced atomically.
func (s *Store) readIndex() (*refIndex, error) {
	idx := &refIndex{Version: 1, Refs: map[string]refEntry{}}
	b, err := os.ReadFile(filepath.Join(s.dir, refsFile))
	if errors.Is(err, fs.ErrNotExist) {
		return idx, nil
	}
	if err != nil {
		return nil, err
	}
	if err := json.Unmarshal(b, idx); err != nil {
		return nil, fmt.Errorf("%s: %w; remove the file to rebuild the index by pulling again", filepath.Join(s.dir, refsFile), err)
	}
	if idx.Refs == nil {
		idx.Refs = map[string]refEntry{}
	}
	return idx, nil
}

// updateIndex applies f to the index; call it holding the lock.
func (s *Store) updateIndex(f func(*refIndex)) error {
	idx, err := s.readIndex()
	if err != nil {
		return err
	}
	f(idx)
	b, err := json.MarshalIndent(idx, "", "  ")
	if err != nil {
		return err
	}
	return writeFileAtomic(filepath.Join(s.dir, refsFile), b)
}

func (s *Store) setRef(ref, platform, digest string) error {
	return s.withLock(func() error {
		return s.updateIndex(func(idx *refIndex) {
			idx.Refs[refKey(ref, platform)] = refEntry{Ref: ref, Platform: platform, Digest: digest, Resolved: time.Now().UTC()}
		})
	})
}

func writeFileAtomic(path string, b []byte) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Chmod(0o644); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

// Get returns a cached image without any network access: by reference
// (for the given platform; "" means the host's) or by digest
// (sha256:<hex>, or a unique hex prefix of at least 12 digits).
func (s *Store) Get(refOrDigest, platform string) (*Image, error) {
	img, err := s.get(refOrDigest, platform)
	if err != nil {
		return nil, err
	}
	s.touch(img)
	return img, nil
}

func (s *Store) get(refOrDigest, platform string) (*Image, error) {
	if hex, ok, err := s.matchDigest(refOrDigest); ok || err != nil {
		if err != nil {
			return nil, err
		}
		img, err := s.load(hex)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", refOrDigest, err)
		}
		s.fillRefs(img, "")
		return img, nil
	}
	r, err := parseRef(refOrDigest, false)
	if err != nil {
		return nil, err
	}
	plat, err := platformOrHost(platform)
	if err != nil {
		return nil, err
	}
	return s.lookupRef(r.Name(), plat.String())
}

func (s *Store) lookupRef(ref, platform string) (*Image, error) {
	idx, err := s.readIndex()
	if err != nil {
		return nil, err
	}
	e, ok := idx.Refs[refKey(ref, platform)]
	if !ok {
		return nil, fmt.Errorf("%s (%s): %w", ref, platform, ErrNotFound)
	}
	img, err := s.load(strings.TrimPrefix(e.Digest, "sha256:"))
	if err != nil {
		return nil, fmt.Errorf("%s (%s): %w", ref, platform, err)
	}
	img.Ref = ref
	s.fillRefsFrom(img, idx)
	return img, nil
}

func (s *Store) fillRefs(img *Image, ref string) {
	idx, err := s.readIndex()
	if err != nil {
		return
	}
	img.Ref = ref
	s.fillRefsFrom(img, idx)
}

func (s *Store) fillRefsFrom(img *Image, idx *refIndex) {
	img.Refs = nil
	for _, e := range idx.Refs {
		if e.Digest == img.Digest && !slices.Contains(img.Refs, e.Ref) {
			img.Refs = append(img.Refs, e.Ref)
		}
	}
	slices.Sort(img.Refs)
	if img.Ref == "" && len(img.Refs) > 0 {
		img.Ref = img.Refs[0]
	}
}

// matchDigest recognises sha256:<hex>, <hex>, or a unique prefix of at
// least 12 hex digits of a cached image.
func (s *Store) matchDigest(arg string) (string, bool, error) {
	h := strings.TrimPrefix(arg, "sha256:")
	if len(h) < 12 || len(h) > 64 || strings.Trim(h, "0123456789abcdef") != "" {
		if h != arg {
			return "", true, fmt.Errorf("%q is not a sha256 digest", arg)
		}
		return "", false, nil
	}
	if len(h) == 64 {
		return h, true, nil
	}
	ents, err := os.ReadDir(filepath.Join(s.dir, "sha256"))
	if err != nil {
		return "", true, err
	}
	var found []string
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), h) {
			found = append(found, e.Name())
		}
	}
	switch len(found) {
	case 0:
		if h != arg {
			return "", true, fmt.Errorf("%s: %w", arg, ErrNotFound)
		}
		return "", false, nil // maybe a reference such as a short name
	case 1:
		return found[0], true, nil
	}
	return "", true, fmt.Errorf("digest prefix %s matches %d images; give more digits", h, len(found))
}

// List returns every cached image, most recently used first.
func (s *Store) List() ([]Image, error) {
	idx, err := s.readIndex()
	if err != nil {
		return nil, err
	}
	ents, err := os.ReadDir(filepath.Join(s.dir, "sha256"))
	if err != nil {
		return nil, err
	}
	var out []Image
	for _, e := range ents {
		img, err := s.load(e.Name())
		if err != nil {
			continue // another converter version, or being removed
		}
		s.fillRefsFrom(img, idx)
		out = append(out, *img)
	}
	slices.SortFunc(out, func(a, b Image) int { return b.LastUsed.Compare(a.LastUsed) })
	return out, nil
}

// Remove deletes a reference, or an image given by digest. Removing an
// image's last reference removes the image. An image with live leases is
// refused with ErrInUse and nothing changes. It returns the digests of the
// images removed.
func (s *Store) Remove(refOrDigest string) ([]string, error) {
	var removed []string
	err := s.withLock(func() error {
		idx, err := s.readIndex()
		if err != nil {
			return err
		}
		hex, isDigest, err := s.matchDigest(refOrDigest)
		if err != nil {
			return err
		}
		var keys []string
		var digest string
		if isDigest {
			digest = "sha256:" + hex
			for k, e := range idx.Refs {
				if e.Digest == digest {
					keys = append(keys, k)
				}
			}
			if _, err := os.Stat(filepath.Join(s.dir, "sha256", hex)); err != nil && len(keys) == 0 {
				return fmt.Errorf("%s: %w", refOrDigest, ErrNotFound)
			}
		} else {
			r, err := parseRef(refOrDigest, false)
			if err != nil {
				return err
			}
			for k, e := range idx.Refs {
				if e.Ref == r.Name() {
					keys = append(keys, k)
				}
			}
			if len(keys) == 0 {
				return fmt.Errorf("%s: %w", r.Name(), ErrNotFound)
			}
		}
		// The images left without a reference go too, unless in use.
		gone := map[string]bool{}
		if digest != "" {
			gone[digest] = true
		}
		for _, k := range keys {
			gone[idx.Refs[k].Digest] = true
		}
		for k, e := range idx.Refs {
			if !slices.Contains(keys, k) {
				delete(gone, e.Digest)
			}
		}
		for d := range gone {
			if leases := s.liveLeases(strings.TrimPrefix(d, "sha256:")); len(leases) > 0 {
				return fmt.Errorf("%s: %w by %s; stop it first", d, ErrInUse, describeLeases(leases))
			}
		}
		if err := s.updateIndex(func(idx *refIndex) {
			for _, k := range keys {
				delete(idx.Refs, k)
			}
		}); err != nil {
			return err
		}
		for d := range gone {
			if err := s.deleteImage(strings.TrimPrefix(d, "sha256:")); err != nil {
				return err
			}
			removed = append(removed, d)
		}
		return nil
	})
	slices.Sort(removed)
	return removed, err
}

// deleteImage moves an image's directory (every converter version) to the
// trash and empties it; call it holding the lock.
func (s *Store) deleteImage(hex string) error {
	src := filepath.Join(s.dir, "sha256", hex)
	if _, err := os.Lstat(src); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	trash, err := os.MkdirTemp(filepath.Join(s.dir, "tmp"), "trash-")
	if err != nil {
		return err
	}
	if err := os.Rename(src, filepath.Join(trash, hex)); err != nil {
		return fmt.Errorf("remove image %s: %w", hex, err)
	}
	os.RemoveAll(filepath.Join(s.dir, "leases", hex))
	return os.RemoveAll(trash)
}

// cleanTmp removes conversions whose process is gone and leftover trash;
// call it holding the lock. A live conversion holds an flock on
// tmp/<name>.lock, created before tmp/<name>/ and removed after it.
func (s *Store) cleanTmp() error {
	tmp := filepath.Join(s.dir, "tmp")
	ents, err := os.ReadDir(tmp)
	if err != nil {
		return err
	}
	for _, e := range ents {
		name := e.Name()
		if before, ok := strings.CutSuffix(name, ".lock"); ok {
			if lockedByOther(filepath.Join(tmp, name)) {
				continue
			}
			s.log.Info("removing an interrupted conversion", "dir", filepath.Join(tmp, before))
			os.RemoveAll(filepath.Join(tmp, before))
			os.Remove(filepath.Join(tmp, name))
			continue
		}
		if _, err := os.Stat(filepath.Join(tmp, name+".lock")); err == nil {
			continue // judged with its lock file
		}
		os.RemoveAll(filepath.Join(tmp, name))
	}
	return nil
}

// lockedByOther reports whether another open file description holds an
// flock on path.
func lockedByOther(path string) bool {
	f, err := os.Open(path)
	if err != nil {
		return false
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		return true
	}
	unix.Flock(int(f.Fd()), unix.LOCK_UN)
	return false
}

func configOf(cf *v1.ConfigFile) ImageConfig {
	if cf == nil {
		return ImageConfig{}
	}
	c := cf.Config
	ic := ImageConfig{
		Entrypoint: c.Entrypoint,
		Cmd:        c.Cmd,
		Env:        c.Env,
		WorkingDir: c.WorkingDir,
		User:       c.User,
		StopSignal: c.StopSignal,
		Labels:     c.Labels,
	}
	for p := range c.ExposedPorts {
		ic.ExposedPorts = append(ic.ExposedPorts, p)
	}
	slices.Sort(ic.ExposedPorts)
	return ic
}
