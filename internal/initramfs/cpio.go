package initramfs

import (
	"fmt"
	"io"
	"strings"
)

// cpioWriter writes the "newc" (SVR4, no CRC) cpio format, the only one the
// kernel unpacks. Entries carry mtime 0 and synthetic inode numbers so equal
// inputs give byte-identical archives.
type cpioWriter struct {
	w   io.Writer
	ino uint32
	err error
}

func newCPIOWriter(w io.Writer) *cpioWriter { return &cpioWriter{w: w} }

const (
	cpioTypeDir  = 0o040000
	cpioTypeReg  = 0o100000
	cpioTypeLink = 0o120000
	cpioTypeChr  = 0o020000
)

var zeros [4]byte

func pad4(n int) int { return (4 - n%4) % 4 }

func (c *cpioWriter) header(name string, mode uint32, nlink uint32, size int, rdevMajor, rdevMinor uint32) {
	if c.err != nil {
		return
	}
	if name == "" || strings.HasPrefix(name, "/") || strings.Contains(name, "\x00") {
		c.err = fmt.Errorf("cpio: invalid entry name %q", name)
		return
	}
	c.ino++
	hdr := fmt.Sprintf("070701%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x",
		c.ino, mode, 0, 0, nlink, 0, size, 0, 0, rdevMajor, rdevMinor, len(name)+1, 0)
	c.write([]byte(hdr))
	c.write([]byte(name))
	c.write([]byte{0})
	c.write(zeros[:pad4(len(hdr)+len(name)+1)])
}

func (c *cpioWriter) write(p []byte) {
	if c.err != nil || len(p) == 0 {
		return
	}
	_, c.err = c.w.Write(p)
}

// Dir adds a directory.
func (c *cpioWriter) Dir(name string, perm uint32) {
	c.header(name, cpioTypeDir|perm&0o7777, 2, 0, 0, 0)
}

// File adds a regular file.
func (c *cpioWriter) File(name string, perm uint32, data []byte) {
	c.header(name, cpioTypeReg|perm&0o7777, 1, len(data), 0, 0)
	c.write(data)
	c.write(zeros[:pad4(len(data))])
}

// Symlink adds a symbolic link.
func (c *cpioWriter) Symlink(name, target string) {
	c.header(name, cpioTypeLink|0o777, 1, len(target), 0, 0)
	c.write([]byte(target))
	c.write(zeros[:pad4(len(target))])
}

// CharDev adds a character device node; the kernel creates it when
// unpacking, so building the archive needs no privileges.
func (c *cpioWriter) CharDev(name string, perm uint32, major, minor uint32) {
	c.header(name, cpioTypeChr|perm&0o7777, 1, 0, major, minor)
}

// Close writes the trailer. The archive length stays a multiple of four,
// which is what lets the kernel read the next archive appended to it.
func (c *cpioWriter) Close() error {
	c.header("TRAILER!!!", 0, 1, 0, 0, 0)
	return c.err
}
