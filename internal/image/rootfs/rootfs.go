// Package rootfs turns the layers of an OCI image into a compact, read-only
// ext4 root file system, without root privileges, mounts or a staging
// directory: layers are decompressed and flattened as a stream (whiteouts
// and opaque directories applied, upper layers winning), every entry is
// checked and normalised, and the result is written by hcsshim's tar2ext4.
//
// Nothing is ever extracted onto the host: entry names and link targets are
// only data inside the produced file system, never paths resolved on the
// host.
package rootfs

import (
	"archive/tar"
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync/atomic"

	"github.com/Microsoft/hcsshim/ext4/tar2ext4"
	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// Defaults for the bounds in Options.
const (
	// DefaultMaxUncompressedSize bounds the decompressed bytes of all layers
	// together; decompression bombs fail at this point.
	DefaultMaxUncompressedSize int64 = 16 << 30
	// DefaultMaxEntries bounds the number of tar entries of all layers
	// together; every entry costs memory while the file system is built.
	DefaultMaxEntries = 4_000_000
)

// compactext4 refuses regular files above this size.
const maxFileSize = 128 << 30

// Layer is one image layer, bottom first in the slice given to Build.
// go-containerregistry's v1.Layer satisfies it.
type Layer interface {
	// Compressed returns the layer blob as stored: gzip, zstd or plain tar
	// (detected from its first bytes). Reading it to the end verifies it.
	Compressed() (io.ReadCloser, error)
	Digest() (v1.Hash, error)
}

// Options bound and observe a conversion.
type Options struct {
	// MaxUncompressedSize bounds the decompressed size of all layers, and
	// the size any single entry may declare. 0 means
	// DefaultMaxUncompressedSize.
	MaxUncompressedSize int64
	// MaxEntries bounds the number of entries in all layers. 0 means
	// DefaultMaxEntries.
	MaxEntries int
	// Logger receives debug notes about normalised entries. nil discards.
	Logger *slog.Logger
}

// Stats describe a finished conversion.
type Stats struct {
	// Entries is the number of entries written to the file system.
	Entries int
	// UncompressedBytes is the decompressed size of all layers read in the
	// final pass.
	UncompressedBytes int64
	// Size is the size of the ext4 image in bytes.
	Size int64
	// Passes is 1, or 2 when a layer needed look-ahead (duplicate entries in
	// one layer, or a hard link whose target an upper layer replaced).
	Passes int
}

// LimitError reports a bound of Options that an image exceeded.
type LimitError struct {
	// Limit names the bound: "uncompressed size" or "entries".
	Limit string
	// Max is the bound's value.
	Max int64
	// Detail says what crossed it.
	Detail string
}

func (e *LimitError) Error() string {
	if e.Limit == "entries" {
		return fmt.Sprintf("%s: the image exceeds the limit of %d entries", e.Detail, e.Max)
	}
	return fmt.Sprintf("%s: the image exceeds the uncompressed size limit of %s", e.Detail, humanBytes(e.Max))
}

// Errors wrapped by EntryError, for errors.Is.
var (
	// ErrUnsafePath: a name or hard-link target leaves the image root.
	ErrUnsafePath = errors.New("path escapes the image root")
	// ErrBadLink: a hard link's target is missing, a directory or itself.
	ErrBadLink = errors.New("invalid hard link")
	// ErrBadEntry: an entry's type, name or attributes cannot be represented.
	ErrBadEntry = errors.New("invalid entry")
)

// EntryError names the layer entry a conversion failed on.
type EntryError struct {
	// Layer is the 1-based position of the layer, bottom first.
	Layer  int
	Digest string
	Name   string
	Err    error
}

func (e *EntryError) Error() string {
	return fmt.Sprintf("layer %d (%s): entry %q: %v", e.Layer, shortDigest(e.Digest), e.Name, e.Err)
}

// shortDigest keeps sha256: and 12 hex digits, as docker prints them.
func shortDigest(d string) string {
	if len(d) > 19 {
		return d[:19]
	}
	return d
}

func (e *EntryError) Unwrap() error { return e.Err }

// Build writes the flattened layers to out as a read-only ext4 image. out
// is truncated first; on error its content is undefined and the caller
// discards it.
func Build(ctx context.Context, layers []Layer, out *os.File, opts Options) (Stats, error) {
	if opts.MaxUncompressedSize <= 0 {
		opts.MaxUncompressedSize = DefaultMaxUncompressedSize
	}
	if opts.MaxEntries <= 0 {
		opts.MaxEntries = DefaultMaxEntries
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	var h *hints
	for pass := 1; ; pass++ {
		if err := out.Truncate(0); err != nil {
			return Stats{}, err
		}
		if _, err := out.Seek(0, io.SeekStart); err != nil {
			return Stats{}, err
		}
		st, next, err := convert(ctx, layers, out, opts, h)
		if err != nil {
			return Stats{}, err
		}
		if next == nil {
			if err := padInodeBitmaps(out); err != nil {
				return Stats{}, err
			}
			st.Passes = pass
			fi, err := out.Stat()
			if err != nil {
				return Stats{}, err
			}
			st.Size = fi.Size()
			return st, nil
		}
		if pass == 2 {
			// The second pass knows every duplicate and every hard link
			// needing look-ahead; needing more means a bug here.
			return Stats{}, errors.New("flatten layers: look-ahead did not converge")
		}
		opts.Logger.Debug("layers need a second pass", "duplicates", len(next.dups), "materialised links", len(next.mat))
		h = next
	}
}

// errRestart stops the ext4 writer when the flattener found it needs a
// second pass.
var errRestart = errors.New("restart conversion")

func convert(ctx context.Context, layers []Layer, out *os.File, opts Options, h *hints) (Stats, *hints, error) {
	pr, pw := io.Pipe()
	// Reserve metadata for the largest image the budget allows: the size
	// limit then comes from our own accounting, with a clear message.
	maxDisk := opts.MaxUncompressedSize + opts.MaxUncompressedSize/8 + int64(opts.MaxEntries)*512 + 64<<20
	if maxDisk > 16<<40 {
		maxDisk = 16 << 40
	}
	var stopped atomic.Bool // we closed the stream: a writer error after it is ours
	writerFirst := make(chan bool, 1)
	done := make(chan error, 1)
	go func() {
		// tar2ext4 keeps a *bufio.Reader it is given: a large one means few
		// hand-offs through the pipe instead of one per 4KiB.
		err := tar2ext4.ConvertTarToExt4(bufio.NewReaderSize(pr, 1<<20), out, tar2ext4.MaximumDiskSize(maxDisk))
		writerFirst <- err != nil && !stopped.Load()
		if err != nil {
			pr.CloseWithError(err)
		} else {
			pr.Close()
		}
		done <- err
	}()
	bw := bufio.NewWriterSize(pw, 1<<20)
	f := newFlattener(ctx, opts, h, tar.NewWriter(bw))
	err := f.run(layers)
	if err == nil && f.next == nil {
		if err = f.tw.Close(); err == nil {
			err = bw.Flush()
		}
	}
	stopped.Store(true)
	switch {
	case err != nil:
		pw.CloseWithError(err)
	case f.next != nil:
		pw.CloseWithError(errRestart)
	default:
		pw.Close()
	}
	werr := <-done
	if <-writerFirst {
		// Our error, if any, is only the broken pipe: the writer's names
		// the entry it could not store.
		return Stats{}, nil, f.writerError(werr)
	}
	if err != nil {
		return Stats{}, nil, err
	}
	if f.next != nil {
		return Stats{}, f.next, nil
	}
	if werr != nil {
		return Stats{}, nil, f.writerError(werr)
	}
	return Stats{Entries: f.entries, UncompressedBytes: f.read}, nil, nil
}

func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%dB", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	v := float64(n) / float64(div)
	if v == float64(int64(v)) {
		return fmt.Sprintf("%d%ciB", int64(v), "KMGTPE"[exp])
	}
	return fmt.Sprintf("%.1f%ciB", v, "KMGTPE"[exp])
}
