// Package image owns fireactions' image cache: it resolves OCI references
// the way Docker does, pulls (through the registry mirror when one is
// configured), converts each image once into a read-only ext4 base (see
// package rootfs) and keeps it, with the image's OCI config, in a
// content-addressed store keyed by manifest digest and converter version.
// It also hands out the per-VM writable scratch disks and accepts prebuilt
// ext4 boot disks.
//
// The store is safe for concurrent use by goroutines and by processes
// sharing the directory (the daemon and the CLI): published images are
// immutable directories renamed into place, and the reference index,
// leases and removals are serialised with a file lock.
package image

import (
	"errors"
	"log/slog"
	"net/http"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"

	"github.com/fireactions/fireactions/internal/config"
)

// ConverterVersion names the conversion's output format. Bases made by
// another version live in their own directories and are never mixed up;
// bump it whenever the produced file system changes.
const ConverterVersion = "v1"

// Image is one cached image: a read-only ext4 base and its OCI config.
type Image struct {
	// Ref is the reference the image was looked up by (canonical form,
	// e.g. index.docker.io/library/busybox:latest); empty for an image
	// only reachable by digest.
	Ref string `json:"ref,omitempty"`
	// Refs are all references that point at this image.
	Refs []string `json:"refs,omitempty"`
	// Digest is the manifest digest of the platform's image (for a
	// multi-arch reference, the chosen child manifest).
	Digest   string `json:"digest"`
	Platform string `json:"platform,omitempty"`
	// BasePath is the read-only ext4 file system. Attach it read-only.
	BasePath string `json:"base_path"`
	// ConfigPath is the image's OCI config file as the registry served it.
	ConfigPath string `json:"config_path,omitempty"`
	// Size is the size of the base in bytes.
	Size     int64       `json:"size"`
	Config   ImageConfig `json:"config"`
	Created  time.Time   `json:"created"`
	LastUsed time.Time   `json:"last_used"`
}

// ImageConfig is what the guest init needs from the image's OCI config to
// run it.
type ImageConfig struct {
	Entrypoint   []string          `json:"entrypoint,omitempty"`
	Cmd          []string          `json:"cmd,omitempty"`
	Env          []string          `json:"env,omitempty"`
	WorkingDir   string            `json:"working_dir,omitempty"`
	User         string            `json:"user,omitempty"`
	StopSignal   string            `json:"stop_signal,omitempty"`
	ExposedPorts []string          `json:"exposed_ports,omitempty"`
	Labels       map[string]string `json:"labels,omitempty"`
}

// Options configure a Store.
type Options struct {
	// MaxCacheSize bounds the bases kept, in bytes: after every conversion
	// the least recently used images not in use are removed until the cache
	// fits. 0 means no bound.
	MaxCacheSize int64
	// MaxUncompressedSize bounds an image's decompressed layers; 0 means
	// rootfs.DefaultMaxUncompressedSize (16GiB).
	MaxUncompressedSize int64
	// MaxEntries bounds an image's file count; 0 means
	// rootfs.DefaultMaxEntries.
	MaxEntries int
	// Mirror is a pull-through registry cache laid out like fireactions'
	// Zot cache: Docker Hub at its root, every other registry under
	// /<registry>. A URL (http://10.200.0.1:5000) or a host[:port] (HTTPS,
	// or plain HTTP on loopback). Empty: pull from the registries directly.
	Mirror string
	// MirrorRegistries lists the registries the mirror serves (docker.io,
	// ghcr.io, ...); empty means all of them.
	MirrorRegistries []string
	// Keychain finds credentials for registries a pull has none for;
	// default authn.DefaultKeychain (Docker's config file and credential
	// helpers).
	Keychain authn.Keychain
	// Transport is the base HTTP transport; default remote.DefaultTransport.
	Transport http.RoundTripper
	Logger    *slog.Logger
}

// PullOptions configure one pull.
type PullOptions struct {
	// Policy: Always re-resolves the reference (converting only when the
	// digest is new), IfNotPresent (the default) uses a cached image
	// without any network access, Never fails when the image is not cached.
	Policy config.PullPolicy
	// Platform is os/arch[/variant]; default linux/<host architecture>.
	Platform string
	// Auth are credentials for the image's registry; nil uses the store's
	// keychain. They are never logged and bypass the mirror.
	Auth *Auth
	// Insecure allows plain HTTP and unverified TLS for this registry.
	Insecure bool
	// Progress, when set, is called as layers download.
	Progress func(Progress)
}

// Auth is a username and password (or token) for a registry.
type Auth struct {
	Username string
	Password string
}

// String hides the password.
func (a Auth) String() string { return a.Username + ":<redacted>" }

// LogValue hides the password from slog.
func (a Auth) LogValue() slog.Value { return slog.StringValue(a.String()) }

// Progress reports a pull's download.
type Progress struct {
	// Layer is the 1-based layer being read (layers are read top first),
	// of Layers.
	Layer, Layers int
	// Bytes of compressed layer data read so far, of Total.
	Bytes, Total int64
}

// Errors for errors.Is.
var (
	// ErrNotFound: no such image (or reference) in the cache.
	ErrNotFound = errors.New("image not in the cache")
	// ErrInUse: the image has live leases.
	ErrInUse = errors.New("image in use")
)
