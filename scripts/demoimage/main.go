// Command demoimage builds the demo's OCI image from Debian's static busybox
// and pushes it to a registry, with no Docker and no internet: one layer
// holding /bin/busybox, a link for every applet, a minimal /etc and a
// script that prints what the microVM looks like from inside.
//
//	go run ./scripts/demoimage --push 127.0.0.1:5000/demo:latest
package main

import (
	"archive/tar"
	"bytes"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// demoScript runs as the image's Entrypoint. With arguments it runs them
// instead (so `vm run IMAGE -- CMD...` works as with any image).
const demoScript = `#!/bin/sh
[ $# -gt 0 ] && exec "$@"
echo "Hello from a fireactions microVM!"
echo "kernel:    $(uname -srm)"
echo "hostname:  $(hostname)"
echo "user:      $(id)"
echo "addresses:"
ip -4 -o addr show | awk '{ print "  " $2 "\t" $4 }'
echo "metadata:  instance-id $(wget -q -O - http://169.254.169.254/latest/meta-data/instance-id 2>/dev/null || echo unavailable)"
echo "root:      $(df -h / | awk 'NR == 2 { print $2 " scratch disk, " $3 " used" }')"
echo "mounts:"
awk '$2 == "/" || $2 ~ "^/var/lib/" || $2 == "/tmp" { print "  " $2 "\t" $3 "\t" $1 }' /proc/mounts
echo "up:        $(cut -d' ' -f1 /proc/uptime)s since the kernel started"
`

func main() {
	var (
		busybox = flag.String("busybox", "/bin/busybox", "static busybox binary (Debian package busybox-static)")
		push    = flag.String("push", "", "reference to push to, e.g. 127.0.0.1:5000/demo:latest (plain HTTP)")
	)
	flag.Parse()
	if *push == "" {
		fmt.Fprintln(os.Stderr, "demoimage: --push REFERENCE is required")
		os.Exit(2)
	}
	if err := run(*busybox, *push); err != nil {
		fmt.Fprintln(os.Stderr, "demoimage:", err)
		os.Exit(1)
	}
}

func run(busybox, ref string) error {
	layer, err := buildLayer(busybox)
	if err != nil {
		return err
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		return err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return err
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", "amd64"
	cf.Created = v1.Time{Time: time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC)}
	cf.Config = v1.Config{
		Entrypoint: []string{"/usr/local/bin/demo"},
		Env:        []string{"PATH=/usr/local/bin:/bin", "GREETING=hello"},
		WorkingDir: "/",
		Labels:     map[string]string{"org.opencontainers.image.description": "fireactions demo (Debian busybox-static)"},
	}
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		return err
	}
	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		return fmt.Errorf("reference %q: %w", ref, err)
	}
	if err := remote.Write(r, img); err != nil {
		return fmt.Errorf("push %s: %w", ref, err)
	}
	d, err := img.Digest()
	if err != nil {
		return err
	}
	fmt.Printf("pushed %s@%s\n", r.Name(), d)
	return nil
}

// buildLayer makes the image's only layer.
func buildLayer(busybox string) (v1.Layer, error) {
	bb, err := os.ReadFile(busybox)
	if err != nil {
		return nil, fmt.Errorf("%w (install Debian's busybox-static)", err)
	}
	list, err := exec.Command(busybox, "--list").Output()
	if err != nil {
		return nil, fmt.Errorf("%s --list: %w", busybox, err)
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	mtime := time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC)
	add := func(h *tar.Header, body []byte) error {
		h.ModTime, h.Format = mtime, tar.FormatPAX
		if h.Typeflag == tar.TypeReg {
			h.Size = int64(len(body))
		}
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		_, err := tw.Write(body)
		return err
	}
	dirs := map[string]int64{"bin/": 0o755, "etc/": 0o755, "usr/": 0o755, "usr/local/": 0o755, "usr/local/bin/": 0o755,
		"root/": 0o700, "tmp/": 0o1777, "var/": 0o755, "var/lib/": 0o755, "proc/": 0o555, "sys/": 0o555, "dev/": 0o755, "run/": 0o755}
	for _, d := range []string{"bin/", "etc/", "usr/", "usr/local/", "usr/local/bin/", "root/", "tmp/", "var/", "var/lib/", "proc/", "sys/", "dev/", "run/"} {
		if err := add(&tar.Header{Name: d, Typeflag: tar.TypeDir, Mode: dirs[d]}, nil); err != nil {
			return nil, err
		}
	}
	files := []struct {
		name string
		mode int64
		body string
	}{
		{"bin/busybox", 0o755, string(bb)},
		{"etc/passwd", 0o644, "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"},
		{"etc/group", 0o644, "root:x:0:\nnogroup:x:65534:\n"},
		{"usr/local/bin/demo", 0o755, demoScript},
	}
	for _, f := range files {
		if err := add(&tar.Header{Name: f.name, Typeflag: tar.TypeReg, Mode: f.mode}, []byte(f.body)); err != nil {
			return nil, err
		}
	}
	for _, applet := range strings.Fields(string(list)) {
		if applet == "busybox" {
			continue
		}
		if err := add(&tar.Header{Name: "bin/" + applet, Typeflag: tar.TypeSymlink, Linkname: "busybox", Mode: 0o777}, nil); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	data := buf.Bytes()
	return tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(data)), nil })
}
