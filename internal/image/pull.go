package image

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"golang.org/x/sys/unix"

	"github.com/fireactions/fireactions/internal/config"
	"github.com/fireactions/fireactions/internal/image/rootfs"
)

// Pull makes the image ref available as a read-only base and returns it.
// Concurrent pulls of one image (in this process) share one resolution and
// one conversion; a digest already converted is never converted again.
func (s *Store) Pull(ctx context.Context, ref string, opts PullOptions) (*Image, error) {
	r, err := parseRef(ref, opts.Insecure)
	if err != nil {
		return nil, err
	}
	plat, err := platformOrHost(opts.Platform)
	if err != nil {
		return nil, err
	}
	policy := opts.Policy
	switch policy {
	case "":
		policy = config.PullIfNotPresent
	case config.PullAlways, config.PullIfNotPresent, config.PullNever:
	default:
		return nil, fmt.Errorf("pull policy %q: use Always, IfNotPresent or Never", policy)
	}
	canon, platform := r.Name(), plat.String()

	if policy != config.PullAlways {
		img, err := s.lookupRef(canon, platform)
		if err == nil {
			s.touch(img)
			return img, nil
		}
		if !errors.Is(err, ErrNotFound) {
			return nil, err
		}
		if d, ok := r.(name.Digest); ok {
			// A digest reference already converted under another name.
			if img, err := s.load(strings.TrimPrefix(d.DigestStr(), "sha256:")); err == nil {
				if err := s.setRef(canon, platform, img.Digest); err != nil {
					return nil, err
				}
				s.fillRefs(img, canon)
				s.touch(img)
				return img, nil
			}
		}
		if policy == config.PullNever {
			return nil, fmt.Errorf("%s (%s) is not in the image cache and the pull policy is Never: pull it first (fireactions image pull %s) or use the IfNotPresent policy (--pull missing): %w", canon, platform, ref, ErrNotFound)
		}
	}

	// Pulls with different credentials or transport settings resolve apart.
	flightKey := fmt.Sprintf("%s|%t", refKey(canon, platform), opts.Insecure)
	if opts.Auth != nil {
		flightKey += "|" + opts.Auth.Username
	}
	v, err, _ := s.resolving.Do(flightKey, func() (any, error) {
		return s.resolve(ctx, r, *plat, opts)
	})
	if err != nil {
		return nil, err
	}
	res := v.(*resolved)
	hex := res.digest.Hex

	img, err := s.load(hex)
	if errors.Is(err, ErrNotFound) {
		v, err, _ := s.building.Do(hex, func() (any, error) {
			return s.build(ctx, res, canon, platform, opts)
		})
		if err != nil {
			return nil, err
		}
		img = v.(*Image)
		img = &Image{Digest: img.Digest, Platform: img.Platform, BasePath: img.BasePath, ConfigPath: img.ConfigPath,
			Size: img.Size, Config: img.Config, Created: img.Created, LastUsed: img.LastUsed}
	} else if err != nil {
		return nil, err
	} else {
		s.log.Debug("image already converted", "ref", canon, "digest", img.Digest)
		if err := checkPlatform(canon, img.Platform, plat); err != nil {
			return nil, err
		}
	}
	if err := s.setRef(canon, platform, img.Digest); err != nil {
		return nil, err
	}
	s.touch(img)
	s.fillRefs(img, canon)
	if s.opts.MaxCacheSize > 0 {
		if _, err := s.prune(ctx, s.opts.MaxCacheSize, img.Digest); err != nil {
			s.log.Warn("bounding the image cache", "max", s.opts.MaxCacheSize, "err", err)
		}
	}
	return img, nil
}

// resolved is a reference resolved to one platform's image.
type resolved struct {
	digest v1.Hash
	image  func() (v1.Image, error)
	// source says where it was resolved: the registry or the mirror.
	source string
}

func (s *Store) resolve(ctx context.Context, r name.Reference, plat v1.Platform, opts PullOptions) (*resolved, error) {
	upstream := s.remoteOptions(ctx, opts, false)
	if mr, ok := s.mirrorRef(r, opts); ok {
		res, err := s.resolveAt(ctx, mr, plat, s.remoteOptions(ctx, opts, true))
		if err == nil {
			s.log.Debug("resolved through the mirror", "ref", r.Name(), "mirror", mr.Name(), "digest", res.digest)
			return res, nil
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		// The mirror is a cache: when it fails, the registry still serves.
		s.log.Warn("registry mirror failed; pulling from the registry", "ref", r.Name(), "mirror", mr.Context().RegistryStr(), "err", err)
	}
	res, err := s.resolveAt(ctx, r, plat, upstream)
	if err != nil {
		return nil, describePullError(r, err, opts.Auth != nil)
	}
	return res, nil
}

func (s *Store) resolveAt(ctx context.Context, r name.Reference, plat v1.Platform, ropts []remote.Option) (*resolved, error) {
	desc, err := remote.Get(r, ropts...)
	if err != nil {
		return nil, err
	}
	src := r.Context().RegistryStr()
	if !desc.MediaType.IsIndex() {
		return &resolved{digest: desc.Digest, image: desc.Image, source: src}, nil
	}
	idx, err := desc.ImageIndex()
	if err != nil {
		return nil, err
	}
	im, err := idx.IndexManifest()
	if err != nil {
		return nil, err
	}
	var avail []string
	for _, m := range im.Manifests {
		if m.Platform == nil {
			continue
		}
		if m.Platform.Satisfies(plat) && m.MediaType.IsImage() {
			d := m.Digest
			return &resolved{digest: d, image: func() (v1.Image, error) { return idx.Image(d) }, source: src}, nil
		}
		if m.Platform.OS != "unknown" {
			avail = append(avail, m.Platform.String())
		}
	}
	slices.Sort(avail)
	return nil, fmt.Errorf("%s has no image for platform %s (it has %s); choose one with --platform", r.Name(), plat.String(), strings.Join(avail, ", "))
}

// remoteOptions builds the go-containerregistry options of a pull. The
// mirror is reached with the keychain's credentials only: the pull's own
// credentials belong to the image's registry.
func (s *Store) remoteOptions(ctx context.Context, opts PullOptions, mirror bool) []remote.Option {
	tr := s.opts.Transport
	if tr == nil {
		tr = remote.DefaultTransport
	}
	if opts.Insecure && !mirror {
		if t, ok := tr.(*http.Transport); ok {
			t = t.Clone()
			if t.TLSClientConfig == nil {
				t.TLSClientConfig = &tls.Config{}
			}
			t.TLSClientConfig.InsecureSkipVerify = true //nolint:gosec // only when the user asked for --insecure
			tr = t
		}
	}
	ro := []remote.Option{remote.WithContext(ctx), remote.WithTransport(tr), remote.WithUserAgent("fireactions")}
	if mirror {
		// Fail over to the registry quickly instead of retrying a cache.
		ro = append(ro, remote.WithRetryBackoff(remote.Backoff{Duration: 100 * time.Millisecond, Factor: 2, Steps: 1}))
	}
	if opts.Auth != nil && !mirror {
		ro = append(ro, remote.WithAuth(authn.FromConfig(authn.AuthConfig{Username: opts.Auth.Username, Password: opts.Auth.Password})))
	} else {
		ro = append(ro, remote.WithAuthFromKeychain(s.opts.Keychain))
	}
	return ro
}

// mirrorRef maps r into the mirror: Docker Hub at its root, every other
// registry under /<registry> (':' written '_'), the layout of fireactions'
// registry cache (package registrycache).
func (s *Store) mirrorRef(r name.Reference, opts PullOptions) (name.Reference, bool) {
	if s.opts.Mirror == "" || opts.Auth != nil {
		// Private images are fetched directly: the cache has no credentials
		// for them and must not serve them to others.
		return nil, false
	}
	reg := r.Context().RegistryStr()
	hub := reg == name.DefaultRegistry || reg == "docker.io" || reg == "registry-1.docker.io"
	if len(s.opts.MirrorRegistries) > 0 {
		served := false
		for _, m := range s.opts.MirrorRegistries {
			if m == reg || (hub && (m == "docker.io" || m == name.DefaultRegistry)) {
				served = true
			}
		}
		if !served {
			return nil, false
		}
	}
	host, insecure, err := mirrorHost(s.opts.Mirror)
	if err != nil {
		s.log.Warn("ignoring the registry mirror", "mirror", s.opts.Mirror, "err", err)
		return nil, false
	}
	repo := r.Context().RepositoryStr()
	if !hub {
		repo = strings.ToLower(strings.ReplaceAll(reg, ":", "_")) + "/" + repo
	}
	var nopts []name.Option
	if insecure {
		nopts = append(nopts, name.Insecure)
	}
	full := host + "/" + repo
	var mr name.Reference
	switch t := r.(type) {
	case name.Digest:
		mr, err = name.NewDigest(full+"@"+t.DigestStr(), nopts...)
	default:
		mr, err = name.NewTag(full+":"+r.Identifier(), nopts...)
	}
	if err != nil {
		s.log.Warn("ignoring the registry mirror", "mirror", s.opts.Mirror, "ref", r.Name(), "err", err)
		return nil, false
	}
	return mr, true
}

// mirrorHost splits a mirror setting into host[:port] and whether plain
// HTTP is wanted.
func mirrorHost(m string) (string, bool, error) {
	if !strings.Contains(m, "://") {
		return strings.TrimSuffix(m, "/"), false, nil
	}
	u, err := url.Parse(m)
	if err != nil {
		return "", false, err
	}
	if (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || (u.Path != "" && u.Path != "/") {
		return "", false, fmt.Errorf("%q is not a registry URL; write http://host:port or https://host", m)
	}
	return u.Host, u.Scheme == "http", nil
}

// describePullError makes registry failures say what to do.
func describePullError(r name.Reference, err error, withAuth bool) error {
	var te *transport.Error
	if errors.As(err, &te) {
		switch te.StatusCode {
		case http.StatusUnauthorized:
			if withAuth {
				return fmt.Errorf("pull %s: %s refused the username and password (401 Unauthorized); check them: %w", r.Name(), r.Context().RegistryStr(), err)
			}
			return fmt.Errorf("pull %s: %s requires authentication (401 Unauthorized); give a username and password (--username, --password-stdin) or log in with docker login: %w", r.Name(), r.Context().RegistryStr(), err)
		case http.StatusForbidden:
			return fmt.Errorf("pull %s: access denied by %s (403 Forbidden): %w", r.Name(), r.Context().RegistryStr(), err)
		case http.StatusNotFound:
			return fmt.Errorf("pull %s: not found on %s (404); check the repository and tag: %w", r.Name(), r.Context().RegistryStr(), err)
		}
	}
	return fmt.Errorf("pull %s: %w", r.Name(), err)
}

// build converts a resolved image and publishes it atomically.
func (s *Store) build(ctx context.Context, res *resolved, ref, wantPlatform string, opts PullOptions) (*Image, error) {
	platform := wantPlatform
	start := time.Now()
	img, err := res.image()
	if err != nil {
		return nil, fmt.Errorf("pull %s: %w", ref, err)
	}
	rawCfg, err := img.RawConfigFile()
	if err != nil {
		return nil, fmt.Errorf("pull %s: config: %w", ref, err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, fmt.Errorf("pull %s: config: %w", ref, err)
	}
	// Record the platform the image says it is built for.
	if cf.OS != "" && cf.Architecture != "" {
		platform = (&v1.Platform{OS: cf.OS, Architecture: cf.Architecture, Variant: cf.Variant}).String()
	}
	if want, err := v1.ParsePlatform(wantPlatform); err == nil {
		if err := checkPlatform(ref, platform, want); err != nil {
			return nil, err
		}
	}
	ls, err := img.Layers()
	if err != nil {
		return nil, fmt.Errorf("pull %s: layers: %w", ref, err)
	}
	layers := make([]rootfs.Layer, len(ls))
	p := &progress{fn: opts.Progress, layers: len(ls)}
	for i, l := range ls {
		if sz, err := l.Size(); err == nil {
			p.total += sz
		}
		layers[i] = &countedLayer{Layer: l, index: len(ls) - i, p: p}
	}

	var (
		tmpDir string
		lock   *os.File
	)
	// Create the lock before the directory, both under the store lock, so
	// that a cleaner never sees a live conversion as abandoned.
	err = s.withLock(func() error {
		d, err := os.MkdirTemp(filepath.Join(s.dir, "tmp"), res.digest.Hex[:12]+"-")
		if err != nil {
			return err
		}
		l, err := os.OpenFile(d+".lock", os.O_RDWR|os.O_CREATE, 0o644)
		if err == nil {
			err = flock(l, unix.LOCK_EX)
		}
		if err != nil {
			os.RemoveAll(d)
			return err
		}
		tmpDir, lock = d, l
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("pull %s: %w", ref, err)
	}
	defer func() {
		os.RemoveAll(tmpDir)
		os.Remove(lock.Name())
		lock.Close()
	}()

	out, err := os.OpenFile(filepath.Join(tmpDir, baseFile), os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return nil, err
	}
	// Start writing the base back to disk while it is being built, so that
	// the fsync that makes it durable before publication has little left
	// to wait for.
	flushDone, flushExited := make(chan struct{}), make(chan struct{})
	// Fd is taken once, here: calling it from the flusher while Build
	// writes would race on the file's internal state.
	fd := int(out.Fd())
	go func() {
		defer close(flushExited)
		t := time.NewTicker(250 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-flushDone:
				return
			case <-t.C:
				unix.SyncFileRange(fd, 0, 0, unix.SYNC_FILE_RANGE_WRITE)
			}
		}
	}()
	convStart := time.Now()
	st, err := rootfs.Build(ctx, layers, out, rootfs.Options{
		MaxUncompressedSize: s.opts.MaxUncompressedSize,
		MaxEntries:          s.opts.MaxEntries,
		Logger:              s.log,
	})
	close(flushDone)
	<-flushExited
	convTime := time.Since(convStart)
	if err == nil {
		err = out.Sync()
	}
	syncTime := time.Since(convStart) - convTime
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		var le *rootfs.LimitError
		if errors.As(err, &le) {
			hint := "raise the store's MaxUncompressedSize (fireactions image pull --max-uncompressed-size)"
			if le.Limit == "entries" {
				hint = "raise the store's MaxEntries"
			}
			return nil, fmt.Errorf("pull %s: %w; if the image is trusted, %s", ref, err, hint)
		}
		if ctx.Err() != nil {
			return nil, fmt.Errorf("pull %s: %w", ref, ctx.Err())
		}
		return nil, fmt.Errorf("pull %s: convert: %w", ref, err)
	}

	m := meta{
		Digest:            res.digest.String(),
		Platform:          platform,
		Converter:         ConverterVersion,
		Source:            ref,
		Size:              st.Size,
		Created:           time.Now().UTC(),
		Layers:            len(ls),
		Entries:           st.Entries,
		UncompressedBytes: st.UncompressedBytes,
		Config:            configOf(cf),
	}
	mb, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return nil, err
	}
	for name, b := range map[string][]byte{configFile: rawCfg, metaFile: mb, usedFile: nil} {
		if err := writeFileSync(filepath.Join(tmpDir, name), b); err != nil {
			return nil, fmt.Errorf("pull %s: %w", ref, err)
		}
	}
	if err := syncDir(tmpDir); err != nil {
		return nil, err
	}
	err = s.withLock(func() error {
		parent := filepath.Join(s.dir, "sha256", res.digest.Hex)
		if err := os.MkdirAll(parent, 0o755); err != nil {
			return err
		}
		err := os.Rename(tmpDir, filepath.Join(parent, ConverterVersion))
		if errors.Is(err, os.ErrExist) || errors.Is(err, unix.ENOTEMPTY) {
			return nil // another process published it first
		}
		if err != nil {
			return err
		}
		return syncDir(parent)
	})
	if err != nil {
		return nil, fmt.Errorf("pull %s: publish: %w", ref, err)
	}
	s.log.Info("image converted", "ref", ref, "digest", m.Digest, "platform", platform, "size", st.Size,
		"layers", len(ls), "entries", st.Entries, "uncompressed", st.UncompressedBytes, "passes", st.Passes,
		"source", res.source, "duration", time.Since(start).Round(time.Millisecond),
		"convert", convTime.Round(time.Millisecond), "sync", syncTime.Round(time.Millisecond))
	return s.load(res.digest.Hex)
}

func writeFileSync(path string, b []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// checkPlatform refuses an image built for another OS or architecture
// than the one asked for.
func checkPlatform(ref, have string, want *v1.Platform) error {
	hp, err := v1.ParsePlatform(have)
	if err != nil || (hp.OS == want.OS && hp.Architecture == want.Architecture) {
		return nil
	}
	return fmt.Errorf("pull %s: the image is built for %s, not %s; choose its platform with --platform %s", ref, have, want.String(), have)
}

// parseRef resolves a reference the way Docker does: docker.io/library
// for bare names, :latest when no tag or digest is given.
func parseRef(ref string, insecure bool) (name.Reference, error) {
	if strings.TrimSpace(ref) == "" {
		return nil, errors.New("empty image reference; write e.g. busybox, ubuntu:22.04 or ghcr.io/org/image@sha256:<digest>")
	}
	var opts []name.Option
	if insecure {
		opts = append(opts, name.Insecure)
	}
	r, err := name.ParseReference(ref, opts...)
	if err != nil {
		return nil, fmt.Errorf("image reference %q: %w", ref, err)
	}
	return r, nil
}

// platformOrHost parses os/arch[/variant]; "" is linux on the host's
// architecture.
func platformOrHost(p string) (*v1.Platform, error) {
	if p == "" {
		return &v1.Platform{OS: "linux", Architecture: runtime.GOARCH}, nil
	}
	pl, err := v1.ParsePlatform(p)
	if err != nil || pl.OS == "" || pl.Architecture == "" || strings.Count(p, "/") > 2 {
		return nil, fmt.Errorf("platform %q: write os/arch[/variant], e.g. linux/amd64 or linux/arm64", p)
	}
	return pl, nil
}

// progress counts compressed bytes across layers.
type progress struct {
	fn     func(Progress)
	layers int
	total  int64
	read   atomic.Int64
}

type countedLayer struct {
	v1.Layer
	index int
	p     *progress
}

func (l *countedLayer) Compressed() (io.ReadCloser, error) {
	rc, err := l.Layer.Compressed()
	if err != nil || l.p.fn == nil {
		return rc, err
	}
	return &countingReader{ReadCloser: rc, l: l}, nil
}

type countingReader struct {
	io.ReadCloser
	l *countedLayer
}

func (c *countingReader) Read(b []byte) (int, error) {
	n, err := c.ReadCloser.Read(b)
	if n > 0 {
		p := c.l.p
		p.fn(Progress{Layer: c.l.index, Layers: p.layers, Bytes: p.read.Add(int64(n)), Total: p.total})
	}
	return n, err
}
