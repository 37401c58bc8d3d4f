package rootfs

import (
	"archive/tar"
	"errors"
	"fmt"
	"math"
	"path"
	"strings"
)

const (
	maxNameComponent = 255  // ext4 directory entry limit
	maxSymlinkTarget = 4095 // PATH_MAX less the terminating NUL
	paxXattr         = "SCHILY.xattr."
)

// cleanName normalises an entry name (or hard-link target) to a clean path
// relative to the image root; the root itself is "". Absolute names are
// taken relative to the image root, as Docker does; names that climb above
// the root are refused.
func (f *flattener) cleanName(raw string) (string, error) {
	if strings.IndexByte(raw, 0) >= 0 {
		return "", fmt.Errorf("%w: name contains a NUL byte", ErrBadEntry)
	}
	n := strings.TrimLeft(raw, "/")
	if n != raw {
		f.log.Debug("absolute entry name taken relative to the image root", "entry", raw)
	}
	n = path.Clean(n)
	if n == "." {
		return "", nil
	}
	if n == ".." || strings.HasPrefix(n, "../") {
		return "", ErrUnsafePath
	}
	for c := range strings.SplitSeq(n, "/") {
		if len(c) > maxNameComponent {
			return "", fmt.Errorf("%w: a name component is longer than %d bytes", ErrBadEntry, maxNameComponent)
		}
	}
	return n, nil
}

// entryType maps a tar type to the one written, refusing what ext4 (or the
// OCI layer format) cannot hold.
func entryType(t byte) (byte, error) {
	switch t {
	case tar.TypeReg, '\x00', tar.TypeGNUSparse: // '\x00' is the old regular-file flag
		// archive/tar expands sparse files; their declared size is checked
		// against the budget before any byte is read.
		return tar.TypeReg, nil
	case tar.TypeDir, tar.TypeSymlink, tar.TypeLink, tar.TypeChar, tar.TypeBlock, tar.TypeFifo, tar.TypeXGlobalHeader:
		return t, nil
	}
	return 0, fmt.Errorf("%w: unsupported entry type %q", ErrBadEntry, t)
}

// header builds the entry written to the ext4 writer: only the fields it
// uses, checked, with the extended attributes an image may carry.
func (f *flattener) header(in *tar.Header, name string, typ byte) (*tar.Header, error) {
	if in.Uid < 0 || int64(in.Uid) > math.MaxUint32 || in.Gid < 0 || int64(in.Gid) > math.MaxUint32 {
		return nil, fmt.Errorf("%w: owner %d:%d is out of range", ErrBadEntry, in.Uid, in.Gid)
	}
	out := &tar.Header{
		Typeflag:   typ,
		Name:       name,
		Mode:       in.Mode & 0o7777,
		Uid:        in.Uid,
		Gid:        in.Gid,
		ModTime:    in.ModTime,
		AccessTime: in.AccessTime,
		ChangeTime: in.ChangeTime,
		Format:     tar.FormatPAX,
	}
	if name == "" {
		out.Name = "."
	}
	switch typ {
	case tar.TypeReg:
		out.Size = in.Size
	case tar.TypeSymlink:
		// A symlink target is data inside the image, never resolved here.
		switch {
		case in.Linkname == "":
			return nil, fmt.Errorf("%w: symbolic link with an empty target", ErrBadEntry)
		case len(in.Linkname) > maxSymlinkTarget:
			return nil, fmt.Errorf("%w: symbolic link target longer than %d bytes", ErrBadEntry, maxSymlinkTarget)
		case strings.IndexByte(in.Linkname, 0) >= 0:
			return nil, fmt.Errorf("%w: symbolic link target contains a NUL byte", ErrBadEntry)
		}
		out.Linkname = in.Linkname
	case tar.TypeLink:
		target, err := f.cleanName(in.Linkname)
		switch {
		case errors.Is(err, ErrUnsafePath):
			return nil, fmt.Errorf("%w: hard link target %q", ErrUnsafePath, in.Linkname)
		case err != nil:
			return nil, fmt.Errorf("%w: target %q: %v", ErrBadLink, in.Linkname, err)
		case target == "":
			return nil, fmt.Errorf("%w: target is the image root", ErrBadLink)
		case target == name:
			return nil, fmt.Errorf("%w: the entry links to itself", ErrBadLink)
		}
		out.Linkname = target
	case tar.TypeChar, tar.TypeBlock:
		// Linux encodes device numbers as 12-bit major, 20-bit minor.
		if in.Devmajor < 0 || in.Devmajor > 0xfff || in.Devminor < 0 || in.Devminor > 0xfffff {
			return nil, fmt.Errorf("%w: device number %d:%d is out of range", ErrBadEntry, in.Devmajor, in.Devminor)
		}
		out.Devmajor, out.Devminor = in.Devmajor, in.Devminor
	}
	for k, v := range in.PAXRecords {
		x, ok := strings.CutPrefix(k, paxXattr)
		if !ok {
			continue
		}
		if !keepXattr(x) {
			f.dropped++
			f.log.Debug("dropped extended attribute", "entry", in.Name, "xattr", x)
			continue
		}
		if out.PAXRecords == nil {
			out.PAXRecords = map[string]string{}
		}
		out.PAXRecords[k] = v
	}
	return out, nil
}

// keepXattr says whether an image may set the extended attribute. Overlay
// attributes are dropped: the base is an overlay lower directory in the
// guest, and its flattened content must not carry whiteout or redirect
// metadata of its own.
func keepXattr(name string) bool {
	switch {
	case strings.HasPrefix(name, "trusted.overlay."):
		return false
	case strings.HasPrefix(name, "user."), strings.HasPrefix(name, "security."), strings.HasPrefix(name, "trusted."):
		return len(name) > strings.IndexByte(name, '.')+1
	case name == "system.posix_acl_access", name == "system.posix_acl_default":
		return true
	}
	return false
}
