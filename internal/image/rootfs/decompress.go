package rootfs

import (
	"bufio"
	"bytes"
	"fmt"
	"io"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
)

var (
	gzipMagic = []byte{0x1f, 0x8b}
	zstdMagic = []byte{0x28, 0xb5, 0x2f, 0xfd}
)

// layerReader is a layer's decompressed tar stream. Every byte read counts
// against the shared budget.
type layerReader struct {
	blob   io.ReadCloser
	br     *bufio.Reader
	dec    io.Reader
	close  func()
	read   *int64
	budget int64
}

// openLayer opens l's blob and picks the decompressor from its first bytes
// rather than from the media type, which registries and tools get wrong.
func openLayer(l Layer, read *int64, budget int64) (*layerReader, error) {
	blob, err := l.Compressed()
	if err != nil {
		return nil, err
	}
	lr := &layerReader{blob: blob, br: bufio.NewReaderSize(blob, 1<<20), read: read, budget: budget, close: func() {}}
	magic, err := lr.br.Peek(4)
	if err != nil && len(magic) < 2 {
		// Shorter than any compressed stream: an (empty) plain tar.
		lr.dec = lr.br
		return lr, nil
	}
	switch {
	case bytes.HasPrefix(magic, gzipMagic):
		zr, err := gzip.NewReader(lr.br)
		if err != nil {
			blob.Close()
			return nil, fmt.Errorf("gzip: %w", err)
		}
		lr.dec = zr
	case bytes.HasPrefix(magic, zstdMagic):
		zr, err := zstd.NewReader(lr.br, zstd.WithDecoderConcurrency(1), zstd.WithDecoderLowmem(false))
		if err != nil {
			blob.Close()
			return nil, fmt.Errorf("zstd: %w", err)
		}
		lr.dec = zr
		lr.close = zr.Close
	default:
		lr.dec = lr.br
	}
	return lr, nil
}

func (r *layerReader) Read(p []byte) (int, error) {
	n, err := r.dec.Read(p)
	*r.read += int64(n)
	if *r.read > r.budget {
		return n, &LimitError{Limit: "uncompressed size", Max: r.budget}
	}
	return n, err
}

// Finish reads what follows the tar stream: padding or trailing data
// (counted like the rest), then the blob to its end, which makes
// go-containerregistry verify its digest.
func (r *layerReader) Finish() error {
	if _, err := io.Copy(io.Discard, r); err != nil {
		return err
	}
	if _, err := io.Copy(io.Discard, r.br); err != nil {
		return err
	}
	return nil
}

func (r *layerReader) Close() error {
	r.close()
	return r.blob.Close()
}
