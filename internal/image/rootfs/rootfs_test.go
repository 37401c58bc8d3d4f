package rootfs_test

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/fireactions/fireactions/internal/image/imagetest"
	"github.com/fireactions/fireactions/internal/image/rootfs"
)

type E = imagetest.Entry

// build converts layers (bottom first) and returns the image path.
func build(t *testing.T, opts rootfs.Options, layers ...v1.Layer) (string, rootfs.Stats, error) {
	t.Helper()
	out := filepath.Join(t.TempDir(), "rootfs.ext4")
	f, err := os.Create(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ls := make([]rootfs.Layer, len(layers))
	for i, l := range layers {
		ls[i] = l
	}
	st, err := rootfs.Build(context.Background(), ls, f, opts)
	return out, st, err
}

func mustBuild(t *testing.T, layers ...v1.Layer) (string, rootfs.Stats) {
	t.Helper()
	img, st, err := build(t, rootfs.Options{}, layers...)
	if err != nil {
		t.Fatalf("build: %v", err)
	}
	imagetest.Fsck(t, img)
	return img, st
}

func layer(t *testing.T, entries ...E) v1.Layer {
	return imagetest.Layer(t, imagetest.Tar(t, entries...))
}

func TestPropertiesSurvive(t *testing.T) {
	capability := string([]byte{0, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}) // cap_net_bind_service, v2
	img, st := mustBuild(t,
		imagetest.BusyboxLayer(t),
		layer(t,
			E{Name: "usr/", Type: tar.TypeDir},
			E{Name: "usr/bin/", Type: tar.TypeDir},
			E{Name: "usr/bin/su", Body: "#!/bin/sh\n", Mode: 0o4755},
			E{Name: "usr/bin/wall", Body: "#!/bin/sh\n", Mode: 0o2755, GID: 5},
			E{Name: "srv/", Type: tar.TypeDir, Mode: 0o2775, UID: 1000, GID: 1000},
			E{Name: "srv/owned", Body: "x", UID: 1000, GID: 1001, Mode: 0o600},
			E{Name: "dev/", Type: tar.TypeDir},
			E{Name: "dev/null", Type: tar.TypeChar, Major: 1, Minor: 3, Mode: 0o666},
			E{Name: "dev/sda", Type: tar.TypeBlock, Major: 8, Minor: 0, Mode: 0o660, GID: 6},
			E{Name: "dev/big", Type: tar.TypeChar, Major: 259, Minor: 70000},
			E{Name: "run/", Type: tar.TypeDir},
			E{Name: "run/fifo", Type: tar.TypeFifo, Mode: 0o620},
			E{Name: "usr/bin/ping", Body: "ping", Mode: 0o755, Xattrs: map[string]string{"security.capability": capability}},
			E{Name: "usr/bin/ping6", Type: tar.TypeLink, Link: "usr/bin/ping"},
			E{Name: "srv/tagged", Body: "t", Xattrs: map[string]string{"user.origin": "fireactions", "trusted.note": "kept"}},
			E{Name: "srv/link", Type: tar.TypeSymlink, Link: "/etc/passwd"},
			E{Name: "srv/up", Type: tar.TypeSymlink, Link: "../../../../../etc/shadow"},
			E{Name: "srv/long", Type: tar.TypeSymlink, Link: "/" + strings.Repeat("d/", 60) + "target"},
		),
	)
	if st.Passes != 1 {
		t.Errorf("passes = %d, want 1", st.Passes)
	}

	// busybox: content and mode.
	bb, _ := os.ReadFile("/bin/busybox")
	if got := imagetest.Cat(t, img, "/bin/busybox"); got != string(bb) {
		t.Errorf("/bin/busybox differs from the host's (%d bytes vs %d)", len(got), len(bb))
	}
	for _, c := range []struct {
		path string
		want imagetest.Stat
	}{
		{"/bin/busybox", imagetest.Stat{Type: "regular", Mode: 0o755}},
		{"/tmp", imagetest.Stat{Type: "directory", Mode: 0o1777}},
		{"/usr/bin/su", imagetest.Stat{Type: "regular", Mode: 0o4755}},
		{"/usr/bin/wall", imagetest.Stat{Type: "regular", Mode: 0o2755, GID: 5}},
		{"/srv", imagetest.Stat{Type: "directory", Mode: 0o2775, UID: 1000, GID: 1000}},
		{"/srv/owned", imagetest.Stat{Type: "regular", Mode: 0o600, UID: 1000, GID: 1001}},
		{"/dev/null", imagetest.Stat{Type: "character special", Mode: 0o666, Major: 1, Minor: 3}},
		{"/dev/sda", imagetest.Stat{Type: "block special", Mode: 0o660, GID: 6, Major: 8, Minor: 0}},
		{"/dev/big", imagetest.Stat{Type: "character special", Mode: 0o644, Major: 259, Minor: 70000}},
		{"/run/fifo", imagetest.Stat{Type: "FIFO", Mode: 0o620}},
		{"/srv/link", imagetest.Stat{Type: "symlink", Mode: 0o777}},
	} {
		got := imagetest.StatPath(t, img, c.path)
		if got.Type != c.want.Type || got.Mode != c.want.Mode || got.UID != c.want.UID || got.GID != c.want.GID ||
			got.Major != c.want.Major || got.Minor != c.want.Minor {
			t.Errorf("%s: got %+v, want %+v", c.path, got, c.want)
		}
	}
	// Hard link: one inode, two links.
	a, b := imagetest.StatPath(t, img, "/usr/bin/ping"), imagetest.StatPath(t, img, "/usr/bin/ping6")
	if a.Inode != b.Inode || a.Links != 2 {
		t.Errorf("ping/ping6: inodes %d/%d links %d; want one inode with 2 links", a.Inode, b.Inode, a.Links)
	}
	// Symlink targets are kept verbatim, never resolved.
	for p, want := range map[string]string{
		"/srv/link": "/etc/passwd",
		"/srv/up":   "../../../../../etc/shadow",
		"/srv/long": "/" + strings.Repeat("d/", 60) + "target",
		"/bin/sh":   "busybox",
	} {
		out := imagetest.Debugfs(t, img, "stat "+p)
		if !strings.Contains(out, `Fast link dest: "`+want+`"`) && !strings.Contains(imagetest.Cat(t, img, p), want) {
			t.Errorf("%s: symlink target not %q:\n%s", p, want, out)
		}
	}
	// Extended attributes, file capabilities included.
	caps := imagetest.Xattrs(t, img, "/usr/bin/ping")
	if !strings.Contains(caps, "security.capability") || !strings.Contains(caps, "(20)") {
		t.Errorf("ping: security.capability missing or wrong size:\n%s", caps)
	}
	if out := imagetest.Debugfs(t, img, "ea_get -x /usr/bin/ping security.capability"); !strings.Contains(out, "0000 0002 0020") && !strings.Contains(out, "00 00 00 02 00 20") {
		t.Errorf("ping: security.capability value differs:\n%s", out)
	}
	tags := imagetest.Xattrs(t, img, "/srv/tagged")
	if !strings.Contains(tags, `user.origin (11) = "fireactions"`) || !strings.Contains(tags, `trusted.note (4) = "kept"`) {
		t.Errorf("srv/tagged: xattrs:\n%s", tags)
	}
}

func TestWhiteoutsAndOpaqueDirectories(t *testing.T) {
	img, _ := mustBuild(t,
		layer(t,
			E{Name: "etc/", Type: tar.TypeDir},
			E{Name: "etc/keep", Body: "keep"},
			E{Name: "etc/gone", Body: "gone"},
			E{Name: "var/", Type: tar.TypeDir},
			E{Name: "var/cache/", Type: tar.TypeDir, UID: 7},
			E{Name: "var/cache/a", Body: "a"},
			E{Name: "var/cache/sub/", Type: tar.TypeDir},
			E{Name: "var/cache/sub/b", Body: "b"},
			E{Name: "opt/", Type: tar.TypeDir},
			E{Name: "opt/app/", Type: tar.TypeDir},
			E{Name: "opt/app/old", Body: "old"},
			E{Name: "lib", Type: tar.TypeSymlink, Link: "usr/lib"},
		),
		layer(t,
			E{Name: "etc/.wh.gone", Body: ""},
			E{Name: "var/.wh.cache", Body: ""},
			E{Name: "opt/app/", Type: tar.TypeDir, Mode: 0o700},
			E{Name: "opt/app/.wh..wh..opq", Body: ""},
			E{Name: "opt/app/new", Body: "new"},
		),
		layer(t,
			// Re-created after a whiteout: the new one is seen, alone.
			E{Name: "var/cache/", Type: tar.TypeDir, UID: 9},
			E{Name: "var/cache/fresh", Body: "fresh"},
			// A directory replaces the lower symlink.
			E{Name: "lib/", Type: tar.TypeDir},
			E{Name: "lib/x", Body: "x"},
		),
	)
	for path, want := range map[string]bool{
		"/etc/keep": true, "/etc/gone": false,
		"/var/cache/a": false, "/var/cache/sub": false, "/var/cache/fresh": true,
		"/opt/app/old": false, "/opt/app/new": true, "/lib/x": true,
	} {
		if got := imagetest.Exists(t, img, path); got != want {
			t.Errorf("%s exists = %v, want %v", path, got, want)
		}
	}
	if st := imagetest.StatPath(t, img, "/var/cache"); st.UID != 9 {
		t.Errorf("/var/cache owner %d, want the re-created directory's 9", st.UID)
	}
	if st := imagetest.StatPath(t, img, "/opt/app"); st.Mode != 0o700 {
		t.Errorf("/opt/app mode %o, want the upper layer's 0700", st.Mode)
	}
	if st := imagetest.StatPath(t, img, "/lib"); st.Type != "directory" {
		t.Errorf("/lib is a %s, want the upper layer's directory", st.Type)
	}
	// Whiteout markers never reach the file system, nor overlay metadata.
	for _, p := range []string{"/etc/.wh.gone", "/opt/app/.wh..wh..opq"} {
		if imagetest.Exists(t, img, p) {
			t.Errorf("%s should not exist", p)
		}
	}
	if x := imagetest.Xattrs(t, img, "/opt/app"); strings.Contains(x, "overlay") {
		t.Errorf("/opt/app carries overlay metadata: %s", x)
	}
}

func TestUpperLayerWinsAndMetadataFromLowerDirs(t *testing.T) {
	img, _ := mustBuild(t,
		layer(t,
			E{Name: "data/", Type: tar.TypeDir, UID: 33, GID: 33, Mode: 0o750},
			E{Name: "data/file", Body: "lower"},
		),
		layer(t,
			// No entry for data/: its owner and mode come from below.
			E{Name: "data/file", Body: "upper", Mode: 0o600},
			E{Name: "data/more", Body: "more"},
		),
	)
	if got := imagetest.Cat(t, img, "/data/file"); got != "upper" {
		t.Errorf("data/file = %q, want upper", got)
	}
	if st := imagetest.StatPath(t, img, "/data"); st.UID != 33 || st.Mode != 0o750 {
		t.Errorf("/data: %+v, want owner 33 mode 0750 from the lower layer", st)
	}
}

func TestDuplicateEntriesLastWins(t *testing.T) {
	img, st := mustBuild(t,
		layer(t,
			E{Name: "etc/", Type: tar.TypeDir},
			E{Name: "etc/conf", Body: "first version, long enough to need data blocks: " + strings.Repeat("1", 200)},
			E{Name: "etc/first-link", Type: tar.TypeLink, Link: "etc/conf"},
			E{Name: "etc/conf", Body: "second", Mode: 0o600},
			E{Name: "etc/second-link", Type: tar.TypeLink, Link: "etc/conf"},
			E{Name: "etc/dir/", Type: tar.TypeDir, Mode: 0o700},
			E{Name: "etc/dir/", Type: tar.TypeDir, Mode: 0o755, UID: 4},
		),
	)
	if st.Passes != 2 {
		t.Errorf("passes = %d, want 2 (duplicates need look-ahead)", st.Passes)
	}
	if got := imagetest.Cat(t, img, "/etc/conf"); got != "second" {
		t.Errorf("etc/conf = %q, want the last occurrence", got)
	}
	if s := imagetest.StatPath(t, img, "/etc/conf"); s.Mode != 0o600 || s.Links != 2 {
		t.Errorf("etc/conf: %+v, want mode 0600 and 2 links (itself and second-link)", s)
	}
	if got := imagetest.Cat(t, img, "/etc/first-link"); !strings.HasPrefix(got, "first version") {
		t.Errorf("etc/first-link = %q, want the first occurrence it was linked to", got)
	}
	if got := imagetest.Cat(t, img, "/etc/second-link"); got != "second" {
		t.Errorf("etc/second-link = %q, want second", got)
	}
	if s := imagetest.StatPath(t, img, "/etc/dir"); s.UID != 4 || s.Mode != 0o755 {
		t.Errorf("etc/dir: %+v, want the last entry's owner 4, mode 0755", s)
	}
}

func TestHardLinks(t *testing.T) {
	img, st := mustBuild(t,
		layer(t,
			E{Name: "bin/", Type: tar.TypeDir},
			E{Name: "bin/perl", Body: "old perl " + strings.Repeat("p", 100), Mode: 0o755},
			E{Name: "bin/perl5", Type: tar.TypeLink, Link: "bin/perl"},
			E{Name: "bin/tool", Body: "tool", Mode: 0o755},
			E{Name: "bin/removed", Body: "removed but linked", Mode: 0o755},
			E{Name: "bin/survivor", Type: tar.TypeLink, Link: "bin/removed"},
		),
		layer(t,
			// Replaces one name of a linked pair: the other keeps the old content.
			E{Name: "bin/perl", Body: "new perl", Mode: 0o755},
			E{Name: "bin/.wh.removed"},
			// A link to a file of a lower layer.
			E{Name: "bin/tool-alias", Type: tar.TypeLink, Link: "/bin/tool"},
		),
	)
	if st.Passes != 2 {
		t.Errorf("passes = %d, want 2", st.Passes)
	}
	if got := imagetest.Cat(t, img, "/bin/perl"); got != "new perl" {
		t.Errorf("bin/perl = %q", got)
	}
	if got := imagetest.Cat(t, img, "/bin/perl5"); !strings.HasPrefix(got, "old perl") {
		t.Errorf("bin/perl5 = %q, want the old content it was linked to", got)
	}
	if got := imagetest.Cat(t, img, "/bin/survivor"); got != "removed but linked" {
		t.Errorf("bin/survivor = %q", got)
	}
	if imagetest.Exists(t, img, "/bin/removed") {
		t.Error("bin/removed was whited out")
	}
	a, b := imagetest.StatPath(t, img, "/bin/tool"), imagetest.StatPath(t, img, "/bin/tool-alias")
	if a.Inode != b.Inode || a.Links != 2 {
		t.Errorf("tool/tool-alias: inodes %d/%d, links %d; want one inode, 2 links", a.Inode, b.Inode, a.Links)
	}
}

func TestCompressions(t *testing.T) {
	tb := imagetest.Tar(t, E{Name: "a", Body: "zstd"})
	tb2 := imagetest.Tar(t, E{Name: "b", Body: "plain"})
	img, _ := mustBuild(t, imagetest.ZstdLayer(t, tb), imagetest.PlainLayer(tb2))
	if imagetest.Cat(t, img, "/a") != "zstd" || imagetest.Cat(t, img, "/b") != "plain" {
		t.Error("zstd or plain layer content lost")
	}
}

func TestAbsoluteNamesAreTakenFromTheImageRoot(t *testing.T) {
	img, _ := mustBuild(t, layer(t,
		E{Name: "/etc/abs", Body: "abs"},
		E{Name: "./etc/dot", Body: "dot"},
		E{Name: "etc/sub/../clean", Body: "clean"},
	))
	for _, p := range []string{"/etc/abs", "/etc/dot", "/etc/clean"} {
		if !imagetest.Exists(t, img, p) {
			t.Errorf("%s missing", p)
		}
	}
}

func TestRejected(t *testing.T) {
	bomb := func() v1.Layer {
		// 16 entries of 1MiB of zeros compress to a few KiB; each alone
		// fits the budget, together they do not.
		var tb bytes.Buffer
		tw := tar.NewWriter(&tb)
		for i := range 16 {
			tw.WriteHeader(&tar.Header{Name: fmt.Sprintf("zeros%d", i), Size: 1 << 20, Mode: 0o644, Typeflag: tar.TypeReg})
			tw.Write(make([]byte, 1<<20))
		}
		tw.Close()
		var gz bytes.Buffer
		zw, _ := gzip.NewWriterLevel(&gz, gzip.BestSpeed)
		zw.Write(tb.Bytes())
		zw.Close()
		return static.NewLayer(gz.Bytes(), types.DockerLayer)
	}
	trailing := func() v1.Layer {
		// A valid tar followed by 8MiB of garbage the tar reader never
		// looks at: still counted.
		b := append(imagetest.Tar(t, E{Name: "ok", Body: "ok"}), make([]byte, 8<<20)...)
		return imagetest.Layer(t, b)
	}
	small := rootfs.Options{MaxUncompressedSize: 4 << 20}
	for _, c := range []struct {
		name   string
		opts   rootfs.Options
		layers []v1.Layer
		is     error
		limit  string
		entry  string
	}{
		{name: "dot-dot", layers: []v1.Layer{layer(t, E{Name: "../../etc/passwd", Body: "x"})}, is: rootfs.ErrUnsafePath, entry: "../../etc/passwd"},
		{name: "dot-dot inside", layers: []v1.Layer{layer(t, E{Name: "a/../../../tmp/x", Body: "x"})}, is: rootfs.ErrUnsafePath, entry: "a/../../../tmp/x"},
		{name: "hardlink outside", layers: []v1.Layer{layer(t, E{Name: "l", Type: tar.TypeLink, Link: "../../etc/shadow"})}, is: rootfs.ErrUnsafePath, entry: "l"},
		{name: "hardlink missing", layers: []v1.Layer{layer(t, E{Name: "l", Type: tar.TypeLink, Link: "nowhere"})}, is: rootfs.ErrBadLink, entry: "l"},
		{name: "hardlink to directory", layers: []v1.Layer{layer(t, E{Name: "d/", Type: tar.TypeDir}, E{Name: "l", Type: tar.TypeLink, Link: "d"})}, is: rootfs.ErrBadLink, entry: "l"},
		{name: "hardlink to itself", layers: []v1.Layer{layer(t, E{Name: "l", Type: tar.TypeLink, Link: "./l"})}, is: rootfs.ErrBadLink, entry: "l"},
		{name: "whiteout of parent", layers: []v1.Layer{layer(t, E{Name: "a/.wh..."})}, is: rootfs.ErrUnsafePath, entry: "a/.wh..."},
		{name: "root as a file", layers: []v1.Layer{layer(t, E{Name: ".", Body: "x"})}, is: rootfs.ErrBadEntry, entry: "."},
		{name: "long name", layers: []v1.Layer{layer(t, E{Name: strings.Repeat("n", 256), Body: "x"})}, is: rootfs.ErrBadEntry, entry: strings.Repeat("n", 256)},
		{name: "device out of range", layers: []v1.Layer{layer(t, E{Name: "dev", Type: tar.TypeChar, Major: 5000})}, is: rootfs.ErrBadEntry, entry: "dev"},
		{name: "decompression bomb", opts: small, layers: []v1.Layer{bomb()}, limit: "uncompressed size"},
		{name: "trailing garbage", opts: small, layers: []v1.Layer{trailing()}, limit: "uncompressed size"},
		{name: "huge sparse file", layers: []v1.Layer{imagetest.PlainLayer(imagetest.GNUSparse(t, "sparse", 1<<40))}, limit: "uncompressed size", entry: "sparse"},
		{name: "huge declared size", layers: []v1.Layer{imagetest.Layer(t, imagetest.RawHeader(t, "liar", 100<<30, []byte("short")))}, limit: "uncompressed size", entry: "liar"},
		{name: "too many entries", opts: rootfs.Options{MaxEntries: 3}, layers: []v1.Layer{layer(t, E{Name: "1"}, E{Name: "2"}, E{Name: "3"}, E{Name: "4"})}, limit: "entries"},
		{name: "truncated layer", layers: []v1.Layer{imagetest.PlainLayer(imagetest.Tar(t, E{Name: "f", Body: strings.Repeat("x", 4096)})[:1024])}},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, _, err := build(t, c.opts, c.layers...)
			if err == nil {
				t.Fatal("build succeeded")
			}
			t.Log(err)
			if c.is != nil && !errors.Is(err, c.is) {
				t.Errorf("error %v is not %v", err, c.is)
			}
			var le *rootfs.LimitError
			if c.limit != "" && (!errors.As(err, &le) || le.Limit != c.limit) {
				t.Errorf("error %v is not a %q limit error", err, c.limit)
			}
			if c.entry != "" && !strings.Contains(err.Error(), c.entry) {
				t.Errorf("error %q does not name the entry %q", err, c.entry)
			}
		})
	}
}

func TestSizeLimitMessageNamesTheLimit(t *testing.T) {
	_, _, err := build(t, rootfs.Options{MaxUncompressedSize: 1 << 20},
		layer(t, E{Name: "big", Body: strings.Repeat("b", 2<<20)}))
	var le *rootfs.LimitError
	if !errors.As(err, &le) || le.Max != 1<<20 || !strings.Contains(err.Error(), "1MiB") || !strings.Contains(err.Error(), `"big"`) {
		t.Fatalf("err = %v; want a limit error naming 1MiB and the entry", err)
	}
}

func TestCancel(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	f, _ := os.Create(filepath.Join(t.TempDir(), "x"))
	defer f.Close()
	_, err := rootfs.Build(ctx, []rootfs.Layer{imagetest.BusyboxLayer(t)}, f, rootfs.Options{})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want context.Canceled", err)
	}
}
