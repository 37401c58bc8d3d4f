// Package imagetest builds real test images and runs real registries for
// the tests of the image engine and its users: go-containerregistry's
// registry in process, Debian's docker-registry with htpasswd auth, tar
// layers written entry by entry, and debugfs to read the ext4 bases back.
package imagetest

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/compression"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Entry is one tar entry of a test layer. Zero fields get defaults: mode
// 0644 (0755 for directories), owner 0:0, a fixed modification time.
type Entry struct {
	Name     string
	Type     byte // tar.TypeReg when zero
	Body     string
	Size     int64 // declared size when it differs from len(Body)
	Mode     int64
	UID, GID int
	Link     string
	Major    int64
	Minor    int64
	Xattrs   map[string]string
}

// Time is the modification time of test entries.
var Time = time.Date(2024, 5, 1, 12, 0, 0, 0, time.UTC)

// Tar writes entries as a tar stream.
func Tar(t testing.TB, entries ...Entry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := header(e)
		if err := tw.WriteHeader(h); err != nil {
			t.Fatalf("tar header %s: %v", e.Name, err)
		}
		if _, err := tw.Write([]byte(e.Body)); err != nil {
			t.Fatalf("tar body %s: %v", e.Name, err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func header(e Entry) *tar.Header {
	typ := e.Type
	if typ == 0 {
		typ = tar.TypeReg
	}
	mode := e.Mode
	if mode == 0 {
		mode = 0o644
		if typ == tar.TypeDir {
			mode = 0o755
		}
	}
	h := &tar.Header{
		Typeflag: typ, Name: e.Name, Linkname: e.Link, Mode: mode,
		Uid: e.UID, Gid: e.GID, ModTime: Time, Devmajor: e.Major, Devminor: e.Minor,
		Format: tar.FormatPAX,
	}
	if typ == tar.TypeReg {
		h.Size = int64(len(e.Body))
	}
	for k, v := range e.Xattrs {
		if h.PAXRecords == nil {
			h.PAXRecords = map[string]string{}
		}
		h.PAXRecords["SCHILY.xattr."+k] = v
	}
	return h
}

// RawHeader writes a tar header that declares size bytes, followed by
// only data and the end-of-archive marker: a layer that lies about its
// content, which archive/tar's writer refuses to produce.
func RawHeader(t testing.TB, name string, size int64, data []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	_ = tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Size: size, Mode: 0o644, ModTime: Time, Format: tar.FormatPAX})
	_ = tw.Flush() // fails: the body is missing, but the header is written
	b := buf.Bytes()
	b = append(b, data...)
	if pad := len(data) % 512; pad != 0 {
		b = append(b, make([]byte, 512-pad)...)
	}
	return append(b, make([]byte, 1024)...)
}

// GNUSparse writes an old-GNU sparse entry whose logical size is
// realSize while it stores only one 512-byte block of data at its end: a
// huge sparse file in a tiny layer.
func GNUSparse(t testing.TB, name string, realSize int64) []byte {
	t.Helper()
	var blk [512]byte
	copy(blk[0:], name)
	octal := func(b []byte, v int64) {
		s := fmt.Sprintf("%0*o", len(b)-1, v)
		if len(s) < len(b) {
			copy(b, s)
			return
		}
		// Too large for octal: GNU's base-256 form.
		for i := len(b) - 1; i > 0; i-- {
			b[i] = byte(v)
			v >>= 8
		}
		b[0] = 0x80
	}
	octal(blk[100:108], 0o644)
	octal(blk[108:116], 0)
	octal(blk[116:124], 0)
	octal(blk[124:136], 512) // stored bytes
	octal(blk[136:148], Time.Unix())
	blk[156] = 'S'
	copy(blk[257:265], "ustar  \x00")
	octal(blk[386:398], realSize-512) // sparse[0].offset
	octal(blk[398:410], 512)          // sparse[0].numbytes
	octal(blk[483:495], realSize)     // realsize
	for i := range 8 {
		blk[148+i] = ' '
	}
	var sum int64
	for _, c := range blk {
		sum += int64(c)
	}
	copy(blk[148:156], fmt.Sprintf("%06o\x00 ", sum))
	out := append(blk[:], bytes.Repeat([]byte{'x'}, 512)...)
	return append(out, make([]byte, 1024)...)
}

// Layer makes a gzip layer of a tar stream.
func Layer(t testing.TB, tarball []byte) v1.Layer {
	return layerWith(t, tarball, compression.GZip)
}

// ZstdLayer makes a zstd layer of a tar stream.
func ZstdLayer(t testing.TB, tarball []byte) v1.Layer {
	return layerWith(t, tarball, compression.ZStd)
}

// PlainLayer makes an uncompressed layer of a tar stream.
func PlainLayer(tarball []byte) v1.Layer {
	return static.NewLayer(tarball, types.OCIUncompressedLayer)
}

func layerWith(t testing.TB, b []byte, c compression.Compression) v1.Layer {
	t.Helper()
	opts := []tarball.LayerOption{tarball.WithCompressedCaching, tarball.WithCompression(c)}
	if c == compression.ZStd {
		opts = append(opts, tarball.WithMediaType(types.OCILayerZStd))
	}
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil }, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// BusyboxLayer is a layer with Debian's static busybox as /bin/busybox and
// /bin/sh, plus the usual top-level directories.
func BusyboxLayer(t testing.TB) v1.Layer {
	t.Helper()
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Fatalf("needs Debian's busybox-static (/bin/busybox): %v", err)
	}
	return Layer(t, Tar(t,
		Entry{Name: "bin/", Type: tar.TypeDir},
		Entry{Name: "bin/busybox", Body: string(bb), Mode: 0o755},
		Entry{Name: "bin/sh", Type: tar.TypeSymlink, Link: "busybox"},
		Entry{Name: "etc/", Type: tar.TypeDir},
		Entry{Name: "etc/passwd", Body: "root:x:0:0:root:/root:/bin/sh\n"},
		Entry{Name: "tmp/", Type: tar.TypeDir, Mode: 0o1777},
	))
}

// Image assembles layers (bottom first) into an image for platform
// (os/arch) with the given run config.
func Image(t testing.TB, platform string, cfg v1.Config, layers ...v1.Layer) v1.Image {
	t.Helper()
	img, err := mutate.AppendLayers(empty.Image, layers...)
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf = cf.DeepCopy()
	p, err := v1.ParsePlatform(platform)
	if err != nil {
		t.Fatal(err)
	}
	cf.OS, cf.Architecture, cf.Variant = p.OS, p.Architecture, p.Variant
	cf.Config = cfg
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// Index assembles a multi-platform index of images keyed by platform.
func Index(t testing.TB, imgs map[string]v1.Image) v1.ImageIndex {
	t.Helper()
	var idx v1.ImageIndex = empty.Index
	for plat, img := range imgs {
		p, err := v1.ParsePlatform(plat)
		if err != nil {
			t.Fatal(err)
		}
		idx = mutate.AppendManifests(idx, mutate.IndexAddendum{Add: img, Descriptor: v1.Descriptor{Platform: p}})
	}
	return idx
}

// Push writes an image or index to ref.
func Push(t testing.TB, ref string, v any, auth authn.Authenticator) {
	t.Helper()
	r, err := name.ParseReference(ref)
	if err != nil {
		t.Fatal(err)
	}
	opts := []remote.Option{}
	if auth != nil {
		opts = append(opts, remote.WithAuth(auth))
	}
	switch x := v.(type) {
	case v1.Image:
		err = remote.Write(r, x, opts...)
	case v1.ImageIndex:
		err = remote.WriteIndex(r, x, opts...)
	default:
		t.Fatalf("push %T", v)
	}
	if err != nil {
		t.Fatalf("push %s: %v", ref, err)
	}
}

// Registry is go-containerregistry's registry served on 127.0.0.1, with a
// count of the requests it received.
type Registry struct {
	*httptest.Server
	// Host is 127.0.0.1:<port>.
	Host string

	mu        sync.Mutex
	count     map[string]int
	intercept func(w http.ResponseWriter, r *http.Request) bool
}

// SetIntercept installs f to see every request first: it answers the ones
// it wants (returning true). nil removes it.
func (r *Registry) SetIntercept(f func(w http.ResponseWriter, r *http.Request) bool) {
	r.mu.Lock()
	r.intercept = f
	r.mu.Unlock()
}

// NewRegistry starts an in-process registry; it stops with the test.
func NewRegistry(t testing.TB) *Registry {
	t.Helper()
	reg := &Registry{count: map[string]int{}}
	h := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	reg.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		reg.mu.Lock()
		reg.count[r.Method+" "+r.URL.Path]++
		icp := reg.intercept
		reg.mu.Unlock()
		if icp != nil && icp(w, r) {
			return
		}
		h.ServeHTTP(w, r)
	}))
	reg.Host = strings.TrimPrefix(reg.URL, "http://")
	t.Cleanup(reg.Close)
	return reg
}

// Requests returns how many requests matched method and a path containing
// part (e.g. "GET", "/blobs/").
func (r *Registry) Requests(method, part string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for k, c := range r.count {
		m, p, _ := strings.Cut(k, " ")
		if m == method && strings.Contains(p, part) {
			n += c
		}
	}
	return n
}

// BlobGets returns the GET requests per blob digest.
func (r *Registry) BlobGets() map[string]int {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := map[string]int{}
	for k, c := range r.count {
		if m, p, _ := strings.Cut(k, " "); m == "GET" && strings.Contains(p, "/blobs/sha256:") {
			out[p[strings.LastIndex(p, "/")+1:]] += c
		}
	}
	return out
}

// ResetCounts forgets the requests seen so far.
func (r *Registry) ResetCounts() {
	r.mu.Lock()
	r.count = map[string]int{}
	r.mu.Unlock()
}

// DockerRegistry is Debian's docker-registry (distribution 2.8) on
// 127.0.0.1, optionally with htpasswd authentication.
type DockerRegistry struct {
	Host string
	cmd  *exec.Cmd
}

// NewDockerRegistry starts docker-registry with storage in a temporary
// directory. With a non-empty user, only that user with password may
// pull or push. It stops with the test.
func NewDockerRegistry(t testing.TB, user, password string) *DockerRegistry {
	t.Helper()
	bin, err := exec.LookPath("docker-registry")
	if err != nil {
		t.Fatalf("needs Debian's docker-registry package: %v", err)
	}
	dir := t.TempDir()
	port := FreePort(t)
	cfg := fmt.Sprintf(`version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
http:
  addr: 127.0.0.1:%d
  secret: imagetest
`, filepath.Join(dir, "data"), port)
	if user != "" {
		out, err := exec.Command("htpasswd", "-Bbn", user, password).Output()
		if err != nil {
			t.Fatalf("needs apache2-utils (htpasswd): %v", err)
		}
		pw := filepath.Join(dir, "htpasswd")
		if err := os.WriteFile(pw, out, 0o600); err != nil {
			t.Fatal(err)
		}
		cfg += fmt.Sprintf("auth:\n  htpasswd:\n    realm: imagetest\n    path: %s\n", pw)
	}
	cfgPath := filepath.Join(dir, "config.yml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "serve", cfgPath)
	var logs bytes.Buffer
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	d := &DockerRegistry{Host: fmt.Sprintf("127.0.0.1:%d", port), cmd: cmd}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for {
		resp, err := http.Get("http://" + d.Host + "/v2/")
		if err == nil {
			resp.Body.Close()
			return d
		}
		select {
		case <-ctx.Done():
			t.Fatalf("docker-registry did not start: %v\n%s", err, logs.String())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// FreePort returns a TCP port free on 127.0.0.1.
func FreePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// Debugfs runs one debugfs request against an ext4 image, read-only.
func Debugfs(t testing.TB, img, request string) string {
	t.Helper()
	out, err := exec.Command(debugfsPath(t), "-R", request, img).CombinedOutput()
	if err != nil {
		t.Fatalf("debugfs -R %q %s: %v\n%s", request, img, err, out)
	}
	// debugfs prints its version banner first.
	s := string(out)
	if i := strings.Index(s, "\n"); strings.HasPrefix(s, "debugfs ") && i >= 0 {
		s = s[i+1:]
	}
	return s
}

// Fsck runs e2fsck -fn and fails the test on any problem.
func Fsck(t testing.TB, img string) {
	t.Helper()
	bin := "e2fsck"
	if _, err := exec.LookPath(bin); err != nil {
		bin = "/usr/sbin/e2fsck"
	}
	out, err := exec.Command(bin, "-fn", img).CombinedOutput()
	if err != nil {
		t.Fatalf("e2fsck -fn %s: %v\n%s", img, err, out)
	}
}

func debugfsPath(t testing.TB) string {
	if p, err := exec.LookPath("debugfs"); err == nil {
		return p
	}
	if _, err := os.Stat("/usr/sbin/debugfs"); err == nil {
		return "/usr/sbin/debugfs"
	}
	t.Fatal("needs e2fsprogs (debugfs)")
	return ""
}

// Stat is what debugfs reports about one inode.
type Stat struct {
	Type         string // regular, directory, symlink, character special, block special, FIFO
	Mode         uint32 // permission bits including setuid/setgid/sticky
	UID, GID     int
	Links        int
	Size         int64
	Inode        int
	Major, Minor int
}

// StatPath reads an inode's type, mode, owner, links and size.
func StatPath(t testing.TB, img, path string) Stat {
	t.Helper()
	out := Debugfs(t, img, "stat "+path)
	var st Stat
	if _, err := fmt.Sscanf(afterField(out, "Inode:"), "%d", &st.Inode); err != nil {
		t.Fatalf("debugfs stat %s: %v\n%s", path, err, out)
	}
	st.Type = strings.Fields(afterField(out, "Type:"))[0]
	if st.Type == "character" || st.Type == "block" {
		st.Type += " special"
	}
	fmt.Sscanf(afterField(out, "Mode:"), "%o", &st.Mode)
	fmt.Sscanf(afterField(out, "User:"), "%d", &st.UID)
	fmt.Sscanf(afterField(out, "Group:"), "%d", &st.GID)
	fmt.Sscanf(afterField(out, "Links:"), "%d", &st.Links)
	fmt.Sscanf(afterField(out, "Size:"), "%d", &st.Size)
	if dev := afterField(out, "Device major/minor number:"); dev != "" {
		fmt.Sscanf(dev, "%d:%d", &st.Major, &st.Minor)
		// debugfs prints "01:03 (hex 01:03)" in decimal first.
	}
	return st
}

func afterField(out, field string) string {
	i := strings.Index(out, field)
	if i < 0 {
		return ""
	}
	return strings.TrimSpace(out[i+len(field):])
}

// Cat returns a file's content from an ext4 image.
func Cat(t testing.TB, img, path string) string {
	t.Helper()
	return Debugfs(t, img, "cat "+path)
}

// Exists reports whether path exists in an ext4 image.
func Exists(t testing.TB, img, path string) bool {
	t.Helper()
	out, _ := exec.Command(debugfsPath(t), "-R", "stat "+path, img).CombinedOutput()
	return !strings.Contains(string(out), "File not found by ext2_lookup")
}

// Xattrs lists an inode's extended attributes as debugfs ea_list prints
// them.
func Xattrs(t testing.TB, img, path string) string {
	t.Helper()
	return Debugfs(t, img, "ea_list "+path)
}
