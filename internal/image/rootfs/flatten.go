package rootfs

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"path"
	"strings"
)

// Layers are read top first, as go-containerregistry's mutate.Extract does:
// the first version of a path met is the one that survives, so nothing is
// ever written twice and no layer is buffered. Three situations need to
// know what comes later in a layer; the first pass records them, keeps
// reading to learn them all, and a second pass applies them:
//   - a layer lists a path twice: the last occurrence wins, as when the
//     layer is extracted with tar;
//   - a hard link whose target an upper layer replaced or whited out: the
//     link keeps the old content, as under overlayfs;
//   - a hard link to an occurrence that a later duplicate replaces.
// Hard links to paths of lower layers (not yet met) wait until the end.

const (
	whiteoutPrefix = ".wh."
	opaqueMarker   = ".wh..wh..opq"
)

// node is what the flattened tree holds at a path so far.
type node struct {
	layer    int  // index of the layer that provided it (0 = bottom)
	dir      bool //
	implicit bool // a parent made for a child; no entry of its own yet
	deferred bool // a hard link waiting for the end of the stream
}

type nameKey struct {
	layer int
	name  string
}

type occKey struct {
	layer int
	name  string
	occ   int
}

type linkRef struct {
	name string
	occ  int
}

// hints carry what the first pass learnt to the second.
type hints struct {
	// dups counts the occurrences of a path listed several times in one
	// layer when one of them is not a directory.
	dups map[nameKey]int
	// mat lists, for a skipped occurrence of a hard-link target, the links
	// that need its content.
	mat map[occKey][]linkRef
}

// sameLayerLink is a hard link to an occurrence of a path of its own layer.
type sameLayerLink struct {
	link      linkRef
	target    string
	targetOcc int
}

type deferredLink struct {
	layer  int
	digest string
	hdr    *tar.Header
}

type flattener struct {
	ctx  context.Context
	opts Options
	log  *slog.Logger
	tw   *tar.Writer
	prev *hints // from the previous pass, or nil
	need *hints // look-ahead found in this pass
	// next is set when this pass must be repeated with need; from then on
	// the pass only reads, to learn the rest.
	next    *hints
	restart bool

	final  map[string]node
	tomb   map[string]bool // whited out by an upper layer
	opaque map[string]bool // directories an upper layer made opaque

	// State of the layer being read.
	layer        int
	digest       string
	occ          map[string]int  // occurrences so far
	nondir       map[string]bool // a non-directory occurrence was seen
	emittedOcc   map[string]int  // occurrence last written
	skippedOcc   map[string]int  // occurrence last skipped
	matAt        map[occKey]string
	materialised map[string]bool
	links        []sameLayerLink // first pass: links to targets of this layer
	layerTomb    map[string]bool
	layerOpaque  map[string]bool

	deferred []deferredLink
	seen     int   // entries read, all layers
	entries  int   // entries written
	read     int64 // decompressed bytes, all layers
	dropped  int   // xattrs dropped
	buf      []byte
}

func newFlattener(ctx context.Context, opts Options, prev *hints, tw *tar.Writer) *flattener {
	return &flattener{
		ctx:    ctx,
		opts:   opts,
		log:    opts.Logger,
		tw:     tw,
		prev:   prev,
		need:   &hints{dups: map[nameKey]int{}, mat: map[occKey][]linkRef{}},
		final:  map[string]node{},
		tomb:   map[string]bool{},
		opaque: map[string]bool{},
	}
}

func (f *flattener) run(layers []Layer) error {
	for i := len(layers) - 1; i >= 0; i-- {
		if err := f.readLayer(i, layers[i]); err != nil {
			return err
		}
	}
	if f.restart {
		f.next = f.need
		return nil
	}
	for _, d := range f.deferred {
		if err := f.resolveDeferred(d); err != nil {
			return err
		}
	}
	if f.dropped > 0 {
		f.log.Debug("dropped extended attributes outside the user, trusted, security and ACL namespaces", "count", f.dropped)
	}
	return nil
}

func (f *flattener) readLayer(i int, l Layer) error {
	f.layer = i
	f.digest = "unknown digest"
	if h, err := l.Digest(); err == nil {
		f.digest = h.String()
	}
	f.occ = map[string]int{}
	f.nondir = map[string]bool{}
	f.emittedOcc = map[string]int{}
	f.skippedOcc = map[string]int{}
	f.matAt = map[occKey]string{}
	f.materialised = map[string]bool{}
	f.links = nil
	f.layerTomb = map[string]bool{}
	f.layerOpaque = map[string]bool{}

	lr, err := openLayer(l, &f.read, f.opts.MaxUncompressedSize)
	if err != nil {
		return fmt.Errorf("%s: %w", f.where(), err)
	}
	defer lr.Close()
	tr := tar.NewReader(lr)
	for {
		if err := f.ctx.Err(); err != nil {
			return err
		}
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return f.readErr(err)
		}
		f.seen++
		if f.seen > f.opts.MaxEntries {
			return &LimitError{Limit: "entries", Max: int64(f.opts.MaxEntries), Detail: f.where()}
		}
		if err := f.entry(hdr, tr); err != nil {
			return err
		}
	}
	// Trailing bytes count towards the budget too, and reading the blob to
	// its end verifies its digest.
	if err := lr.Finish(); err != nil {
		return f.readErr(err)
	}
	for n, c := range f.occ {
		if c > 1 && f.nondir[n] {
			f.need.dups[nameKey{i, n}] = c
		}
	}
	// A link to an occurrence that a later duplicate replaces needs that
	// occurrence's content.
	for _, l := range f.links {
		if c := f.need.dups[nameKey{i, l.target}]; l.targetOcc < c {
			r := occKey{i, l.target, l.targetOcc}
			f.need.mat[r] = append(f.need.mat[r], l.link)
		}
	}
	for n := range f.layerTomb {
		f.tomb[n] = true
	}
	for n := range f.layerOpaque {
		f.opaque[n] = true
	}
	return nil
}

func (f *flattener) readErr(err error) error {
	var le *LimitError
	if errors.As(err, &le) {
		le.Detail = f.where()
		return le
	}
	return fmt.Errorf("%s: %w", f.where(), err)
}

// where names the current layer: position (1 = bottom) and short digest.
func (f *flattener) where() string {
	return fmt.Sprintf("layer %d (%s)", f.layer+1, shortDigest(f.digest))
}

func (f *flattener) entryErr(name string, err error) error {
	return &EntryError{Layer: f.layer + 1, Digest: f.digest, Name: name, Err: err}
}

// entry decides the fate of one tar entry of the current layer.
func (f *flattener) entry(hdr *tar.Header, data io.Reader) error {
	raw := hdr.Name
	name, err := f.cleanName(raw)
	if err != nil {
		return f.entryErr(raw, err)
	}
	typ, err := entryType(hdr.Typeflag)
	if err != nil {
		return f.entryErr(raw, err)
	}
	if typ == tar.TypeXGlobalHeader {
		return nil
	}
	if typ != tar.TypeReg {
		hdr.Size = 0 // header-only types carry no data
	}
	if hdr.Size < 0 {
		return f.entryErr(raw, fmt.Errorf("%w: negative size", ErrBadEntry))
	}
	if rest := f.opts.MaxUncompressedSize - f.read; hdr.Size > rest || hdr.Size > maxFileSize {
		return &LimitError{Limit: "uncompressed size", Max: f.opts.MaxUncompressedSize,
			Detail: fmt.Sprintf("%s: entry %q declares %s", f.where(), raw, humanBytes(hdr.Size))}
	}

	base := path.Base(name)
	if strings.HasPrefix(base, whiteoutPrefix) {
		// Whiteouts hide lower layers only, so they apply once this layer
		// is read.
		dir := parentOf(name)
		switch {
		case base == opaqueMarker:
			f.layerOpaque[dir] = true
		case strings.HasPrefix(base, whiteoutPrefix+whiteoutPrefix):
			// Other AUFS metadata (.wh..wh.plnk and the like): not content.
		default:
			hidden := base[len(whiteoutPrefix):]
			if hidden == "" || hidden == "." || hidden == ".." {
				return f.entryErr(raw, fmt.Errorf("%w: whiteout of %q", ErrUnsafePath, hidden))
			}
			f.layerTomb[path.Join(dir, hidden)] = true
		}
		return nil
	}
	if name == "" && typ != tar.TypeDir {
		return f.entryErr(raw, fmt.Errorf("%w: the image root must be a directory", ErrBadEntry))
	}

	f.occ[name]++
	k := f.occ[name]
	isDir := typ == tar.TypeDir
	if !isDir {
		f.nondir[name] = true
	}

	if f.prev != nil {
		if c := f.prev.dups[nameKey{f.layer, name}]; k < c {
			return f.skip(name, k, hdr, typ, data)
		}
	}
	if f.hiddenByUpper(name) {
		return f.skip(name, k, hdr, typ, data)
	}
	if n, ok := f.final[name]; ok {
		switch {
		case n.layer > f.layer && n.implicit && isDir:
			// An upper layer's child made this parent; this entry gives it
			// its owner and mode.
		case n.layer > f.layer:
			return f.skip(name, k, hdr, typ, data)
		case f.materialised[name]:
			// The link whose target's content was already written here.
			f.emittedOcc[name] = k
			return discard(data)
		case n.dir && isDir:
			// Listed twice in one layer: the last metadata wins, which the
			// ext4 writer does by updating the directory in place.
		case n.implicit && !isDir:
			return f.entryErr(raw, fmt.Errorf("%w: a non-directory replaces a directory that earlier entries of this layer fill", ErrBadEntry))
		default:
			if f.prev != nil {
				return f.entryErr(raw, fmt.Errorf("%w: listed twice in one layer", ErrBadEntry))
			}
			// A duplicate: the last occurrence must win, which only a
			// second pass can do.
			f.restart = true
			return discard(data)
		}
	}

	out, err := f.header(hdr, name, typ)
	if err != nil {
		return f.entryErr(raw, err)
	}
	if typ == tar.TypeLink {
		return f.link(out, raw, k)
	}
	f.final[name] = node{layer: f.layer, dir: isDir}
	f.markParents(name)
	f.emittedOcc[name] = k
	return f.write(out, data)
}

// hiddenByUpper reports whether an upper layer hides name: a whiteout of it
// or of a parent, a non-directory at a parent's path, or an opaque parent.
func (f *flattener) hiddenByUpper(name string) bool {
	if name == "" {
		return false
	}
	if f.tomb[name] {
		return true
	}
	for p := parentOf(name); ; p = parentOf(p) {
		if f.tomb[p] || f.opaque[p] {
			return true
		}
		if n, ok := f.final[p]; ok && n.layer > f.layer && (!n.dir || n.deferred) {
			return true
		}
		if p == "" {
			return false
		}
	}
}

// skip passes over an occurrence that does not survive. When a later hard
// link of this layer needs its content (known from the first pass), the
// content is written under that link's name instead.
func (f *flattener) skip(name string, k int, hdr *tar.Header, typ byte, data io.Reader) error {
	f.skippedOcc[name] = k
	if f.prev == nil {
		return discard(data)
	}
	refs := f.prev.mat[occKey{f.layer, name, k}]
	for _, r := range refs {
		if c := f.prev.dups[nameKey{f.layer, r.name}]; c > 1 && r.occ < c {
			continue // that link is itself replaced later in the layer
		}
		if typ == tar.TypeDir {
			return f.entryErr(r.name, fmt.Errorf("%w: target %q is a directory", ErrBadLink, name))
		}
		out, err := f.header(hdr, r.name, typ)
		if err != nil {
			return f.entryErr(hdr.Name, err)
		}
		if typ == tar.TypeLink {
			// The skipped target is itself a link: keep following it.
			err = f.link(out, hdr.Name, k)
		} else {
			f.final[r.name] = node{layer: f.layer}
			f.markParents(r.name)
			err = f.write(out, data)
		}
		f.materialised[r.name] = true
		f.matAt[occKey{f.layer, name, k}] = r.name
		return err
	}
	return discard(data)
}

// link places a hard link of the current layer.
func (f *flattener) link(out *tar.Header, raw string, k int) error {
	name, target := out.Name, out.Linkname
	kt := f.occ[target]
	tn := f.final[target]
	switch {
	case kt == 0 || (f.emittedOcc[target] == kt && tn.deferred):
		// The target is in a lower layer (or later in this one), or is such
		// a link itself: link at the end, when every survivor is known.
		f.final[name] = node{layer: f.layer, deferred: true}
		f.markParents(name)
		f.emittedOcc[name] = k
		f.deferred = append(f.deferred, deferredLink{layer: f.layer, digest: f.digest, hdr: out})
		return nil
	case f.emittedOcc[target] == kt:
		if tn.dir {
			return f.entryErr(raw, fmt.Errorf("%w: target %q is a directory", ErrBadLink, target))
		}
		if f.prev == nil {
			f.links = append(f.links, sameLayerLink{linkRef{name, k}, target, kt})
		}
	default:
		// The target's latest occurrence did not survive.
		if f.prev == nil {
			r := occKey{f.layer, target, kt}
			f.need.mat[r] = append(f.need.mat[r], linkRef{name, k})
			f.restart = true
			return nil
		}
		m, ok := f.matAt[occKey{f.layer, target, kt}]
		if !ok {
			return f.entryErr(raw, fmt.Errorf("%w: target %q was replaced and its content is lost", ErrBadLink, target))
		}
		out.Linkname = m
	}
	f.final[name] = node{layer: f.layer}
	f.markParents(name)
	f.emittedOcc[name] = k
	return f.write(out, nil)
}

func (f *flattener) resolveDeferred(d deferredLink) error {
	f.layer, f.digest = d.layer, d.digest
	name, target := d.hdr.Name, d.hdr.Linkname
	n, ok := f.final[target]
	switch {
	case !ok || n.implicit:
		return f.entryErr(name, fmt.Errorf("%w: target %q is not in the image", ErrBadLink, target))
	case n.dir:
		return f.entryErr(name, fmt.Errorf("%w: target %q is a directory", ErrBadLink, target))
	case n.deferred:
		return f.entryErr(name, fmt.Errorf("%w: target %q is itself a link to a path of another layer", ErrBadLink, target))
	}
	n = f.final[name]
	n.deferred = false
	f.final[name] = n
	return f.write(d.hdr, nil)
}

// markParents records the parents of name as directories of the current
// layer, unless a layer already provided them.
func (f *flattener) markParents(name string) {
	for p := parentOf(name); ; p = parentOf(p) {
		if _, ok := f.final[p]; ok {
			return
		}
		f.final[p] = node{layer: f.layer, dir: true, implicit: true}
		if p == "" {
			return
		}
	}
}

func (f *flattener) write(hdr *tar.Header, data io.Reader) error {
	if f.restart {
		return discard(data)
	}
	if n, ok := f.final[hdr.Name]; ok && n.implicit {
		n.implicit = false
		f.final[hdr.Name] = n
	}
	if err := f.tw.WriteHeader(hdr); err != nil {
		return err
	}
	if hdr.Typeflag == tar.TypeReg && hdr.Size > 0 {
		if f.buf == nil {
			f.buf = make([]byte, 256<<10)
		}
		n, err := io.CopyBuffer(f.tw, io.LimitReader(data, hdr.Size), f.buf)
		if err == nil && n < hdr.Size {
			err = io.ErrUnexpectedEOF
		}
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return f.readErr(err)
		}
	}
	f.entries++
	return nil
}

func discard(r io.Reader) error {
	if r == nil {
		return nil
	}
	_, err := io.Copy(io.Discard, r)
	return err
}

// parentOf returns the parent of a cleaned relative path; the root is "".
func parentOf(name string) string {
	i := strings.LastIndexByte(name, '/')
	if i < 0 {
		return ""
	}
	return name[:i]
}

// writerError reports a failure of the ext4 writer.
func (f *flattener) writerError(err error) error {
	if strings.Contains(err.Error(), "disk exceeded maximum size") {
		return &LimitError{Limit: "uncompressed size", Max: f.opts.MaxUncompressedSize, Detail: "ext4 image"}
	}
	return fmt.Errorf("write ext4: %w", err)
}
