package registrycache

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// Zot settings that have no configuration field.
const (
	// zotDistSpecVersion is the OCI distribution-spec version Zot reports.
	zotDistSpecVersion = "1.1.1"
	// zotGCDelay keeps an unreferenced blob this long before GC removes
	// it, so a pull in progress never loses a layer.
	zotGCDelay = time.Hour
	// ZotRetention is how long a cached tag stays after it was last pulled
	// (or synced, which counts as a push): older tags are dropped and GC
	// then frees their blobs.
	ZotRetention = 7 * 24 * time.Hour
	// zotRetentionDelay protects untagged manifests and referrers this long.
	zotRetentionDelay = 24 * time.Hour
)

// The Zot configuration, in the keys of Zot's documented schema
// (zotregistry.dev: admin-configuration, mirroring, retention).
type zotConfig struct {
	DistSpecVersion string        `json:"distSpecVersion"`
	Storage         zotStorage    `json:"storage"`
	HTTP            zotHTTP       `json:"http"`
	Log             zotLog        `json:"log"`
	Extensions      zotExtensions `json:"extensions"`
}

type zotStorage struct {
	RootDirectory string       `json:"rootDirectory"`
	Dedupe        bool         `json:"dedupe"`
	GC            bool         `json:"gc"`
	GCDelay       string       `json:"gcDelay"`
	GCInterval    string       `json:"gcInterval"`
	Retention     zotRetention `json:"retention"`
}

type zotRetention struct {
	DryRun   bool        `json:"dryRun"`
	Delay    string      `json:"delay"`
	Policies []zotPolicy `json:"policies"`
}

type zotPolicy struct {
	Repositories    []string      `json:"repositories"`
	DeleteReferrers bool          `json:"deleteReferrers"`
	DeleteUntagged  bool          `json:"deleteUntagged"`
	KeepTags        []zotKeepTags `json:"keepTags"`
}

type zotKeepTags struct {
	Patterns     []string `json:"patterns"`
	PulledWithin string   `json:"pulledWithin"`
	PushedWithin string   `json:"pushedWithin"`
}

type zotHTTP struct {
	Address       string           `json:"address"`
	Port          string           `json:"port"`
	Compat        []string         `json:"compat"`
	AccessControl zotAccessControl `json:"accessControl"`
}

type zotAccessControl struct {
	Repositories map[string]zotPolicyGroup `json:"repositories"`
}

type zotPolicyGroup struct {
	AnonymousPolicy []string `json:"anonymousPolicy"`
}

type zotLog struct {
	Level string `json:"level"`
}

type zotExtensions struct {
	Sync   zotSync   `json:"sync"`
	Search zotSearch `json:"search"`
}

type zotSync struct {
	Enable     bool          `json:"enable"`
	Registries []zotRegistry `json:"registries"`
}

type zotRegistry struct {
	URLs           []string     `json:"urls"`
	OnDemand       bool         `json:"onDemand"`
	TLSVerify      bool         `json:"tlsVerify"`
	PreserveDigest bool         `json:"preserveDigest"`
	Content        []zotContent `json:"content"`
}

type zotSearch struct {
	Enable bool `json:"enable"`
}

type zotContent struct {
	Prefix      string `json:"prefix"`
	Destination string `json:"destination"`
}

// zotConfigJSON renders Zot's config.json: listening on the gateway only,
// read-only to clients, on-demand sync from every mirror (Docker Hub at the
// root, the others under their namespace), GC, and retention of tags
// pulled recently.
//
// Zot tries the registries in order and takes the first that has the
// image. Docker Hub comes last: its content rule matches every repository,
// including ghcr.io/..., which Docker Hub cannot hold anyway.
func (l *layout) zotConfigJSON() ([]byte, error) {
	z := l.rc.Zot
	cfg := zotConfig{
		DistSpecVersion: zotDistSpecVersion,
		Storage: zotStorage{
			RootDirectory: z.StorageDir,
			Dedupe:        true,
			GC:            true,
			GCDelay:       duration(zotGCDelay),
			GCInterval:    duration(z.GCInterval.Std()),
			Retention: zotRetention{
				Delay: duration(zotRetentionDelay),
				Policies: []zotPolicy{{
					Repositories:    []string{"**"},
					DeleteReferrers: true,
					DeleteUntagged:  true,
					KeepTags: []zotKeepTags{{
						Patterns:     []string{".*"},
						PulledWithin: duration(ZotRetention),
						PushedWithin: duration(ZotRetention),
					}},
				}},
			},
		},
		HTTP: zotHTTP{
			Address: l.gateway.String(),
			Port:    strconv.Itoa(z.Port),
			// Keep Docker-format images as they are upstream, so pulls by
			// digest work (Zot would otherwise convert them to OCI).
			Compat: []string{"docker2s2"},
			// Read-only for everyone: a VM can pull (which triggers the
			// on-demand sync) but never push, so no VM can plant an image
			// that other VMs would then pull as ghcr.io/... or library/...
			AccessControl: zotAccessControl{Repositories: map[string]zotPolicyGroup{
				"**": {AnonymousPolicy: []string{"read"}},
			}},
		},
		Log: zotLog{Level: "info"},
		Extensions: zotExtensions{
			Sync:   zotSync{Enable: true},
			Search: zotSearch{Enable: true},
		},
	}
	var hub *mirror
	for i, m := range l.mirrors {
		if m.dockerHub() {
			hub = &l.mirrors[i]
			continue
		}
		cfg.Extensions.Sync.Registries = append(cfg.Extensions.Sync.Registries, zotRegistryFor(m))
	}
	if hub != nil {
		cfg.Extensions.Sync.Registries = append(cfg.Extensions.Sync.Registries, zotRegistryFor(*hub))
	}
	out, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("render zot config: %w", err)
	}
	return append(out, '\n'), nil
}

func zotRegistryFor(m mirror) zotRegistry {
	return zotRegistry{
		URLs:           []string{m.upstream},
		OnDemand:       true,
		TLSVerify:      true,
		PreserveDigest: true,
		Content:        []zotContent{{Prefix: "**", Destination: "/" + m.namespace}},
	}
}

// duration writes d the short way Go parses back: 24h, 90m → 1h30m.
func duration(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = strings.TrimSuffix(s, "0s")
	}
	if strings.HasSuffix(s, "h0m") {
		s = strings.TrimSuffix(s, "0m")
	}
	return s
}

// ZotStorageImage is the file that backs Zot's storage volume.
func ZotStorageImage(storageDir string) string {
	return filepath.Clean(storageDir) + ".img"
}

// zotStorageScript renders a script that mounts Zot's storage directory on
// a fixed-size ext4 image. Zot has no byte quota of its own; the volume is
// the hard bound on the cache's size (when it is full Zot's syncs fail and
// clients fall back to the upstream registry), and retention plus GC keep
// it from filling up in normal use. The script is idempotent and only ever
// grows the volume.
func (l *layout) zotStorageScript() []byte {
	z := l.rc.Zot
	dir := filepath.Clean(z.StorageDir)
	var b strings.Builder
	b.WriteString("#!/bin/sh\n")
	b.WriteString("# Rendered by fireactions from registry_cache.zot; do not edit.\n")
	b.WriteString("# Mounts Zot's storage on a fixed-size ext4 image: Zot has no byte quota, so\n")
	b.WriteString("# the volume bounds the cache at registry_cache.zot.max_size. Run it before\n")
	b.WriteString("# Zot starts; it is idempotent and only ever grows the volume.\n")
	b.WriteString("set -eu\n")
	fmt.Fprintf(&b, "dir=%s\n", shellQuote(dir))
	fmt.Fprintf(&b, "image=%s\n", shellQuote(ZotStorageImage(dir)))
	fmt.Fprintf(&b, "size=%d\n", int64(z.MaxSize))
	b.WriteString(`if mountpoint -q "$dir"; then
	exit 0
fi
mkdir -p "$dir" "$(dirname "$image")"
if [ ! -e "$image" ]; then
	truncate -s "$size" "$image.new"
	mkfs.ext4 -q -F -m 0 -L zot -E lazy_itable_init=1,lazy_journal_init=1 "$image.new"
	mv "$image.new" "$image"
fi
if [ "$(stat -c %s "$image")" -lt "$size" ]; then
	# Grow offline, before mounting: resize2fs wants a freshly checked
	# filesystem, and e2fsck exits 1 when it only tidied something up.
	truncate -s "$size" "$image"
	e2fsck -f -p "$image" >/dev/null || [ $? -le 1 ]
	resize2fs "$image" >/dev/null 2>&1
fi
mount -o loop,nodev,nosuid,noexec "$image" "$dir"
`)
	return []byte(b.String())
}

// shellQuote quotes s for POSIX sh.
func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}
