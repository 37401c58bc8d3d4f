package registrycache

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/fireactions/fireactions/internal/config"
)

// The types below transcribe Zot's documented configuration schema
// (zotregistry.dev admin-configuration, mirroring and retention articles,
// and examples/README.md of project-zot/zot), independent of the types the
// renderer uses: decoding with DisallowUnknownFields proves every key we
// write is a documented one, and with the documented type. Zot itself
// cannot be installed here (Debian does not package it and its releases
// are not reachable from this machine), so this is how its config is
// checked.
type zotDoc struct {
	DistSpecVersion string         `json:"distSpecVersion"`
	Storage         zotDocStorage  `json:"storage"`
	HTTP            zotDocHTTP     `json:"http"`
	Log             *zotDocLog     `json:"log"`
	Extensions      *zotDocExtns   `json:"extensions"`
	Scheduler       map[string]any `json:"scheduler"`
	Cluster         map[string]any `json:"cluster"`
}

type zotDocStorage struct {
	RootDirectory string                   `json:"rootDirectory"`
	Dedupe        *bool                    `json:"dedupe"`
	RemoteCache   *bool                    `json:"remoteCache"`
	GC            *bool                    `json:"gc"`
	Commit        *bool                    `json:"commit"`
	GCDelay       *string                  `json:"gcDelay"`
	GCInterval    *string                  `json:"gcInterval"`
	Retention     *zotDocRetention         `json:"retention"`
	StorageDriver map[string]any           `json:"storageDriver"`
	CacheDriver   map[string]any           `json:"cacheDriver"`
	SubPaths      map[string]zotDocStorage `json:"subPaths"`
}

type zotDocRetention struct {
	DryRun   *bool             `json:"dryRun"`
	Delay    *string           `json:"delay"`
	Policies []zotDocRetPolicy `json:"policies"`
}

type zotDocRetPolicy struct {
	Repositories    []string        `json:"repositories"`
	DeleteReferrers *bool           `json:"deleteReferrers"`
	DeleteUntagged  *bool           `json:"deleteUntagged"`
	KeepTags        []zotDocKeepTag `json:"keepTags"`
}

type zotDocKeepTag struct {
	Patterns                []string `json:"patterns"`
	PulledWithin            *string  `json:"pulledWithin"`
	PushedWithin            *string  `json:"pushedWithin"`
	MostRecentlyPushedCount *int     `json:"mostRecentlyPushedCount"`
	MostRecentlyPulledCount *int     `json:"mostRecentlyPulledCount"`
}

type zotDocHTTP struct {
	Address       string               `json:"address"`
	Port          string               `json:"port"`
	ExternalURL   *string              `json:"externalUrl"`
	Realm         *string              `json:"realm"`
	Compat        []string             `json:"compat"`
	TLS           map[string]any       `json:"tls"`
	Auth          map[string]any       `json:"auth"`
	AccessControl *zotDocAccessControl `json:"accessControl"`
	Ratelimit     map[string]any       `json:"ratelimit"`
}

// zotDocAccessControl is "Identity-based Authorization" in Zot's
// documentation; without authentication only anonymousPolicy may be used.
type zotDocAccessControl struct {
	Repositories map[string]struct {
		Policies        []map[string]any `json:"policies"`
		DefaultPolicy   []string         `json:"defaultPolicy"`
		AnonymousPolicy []string         `json:"anonymousPolicy"`
	} `json:"repositories"`
	AdminPolicy map[string]any `json:"adminPolicy"`
	Groups      map[string]any `json:"groups"`
	Metrics     map[string]any `json:"metrics"`
}

type zotDocLog struct {
	Level  string  `json:"level"`
	Output *string `json:"output"`
	Audit  *string `json:"audit"`
}

type zotDocExtns struct {
	Sync    *zotDocSync    `json:"sync"`
	Search  *zotDocSearch  `json:"search"`
	Metrics map[string]any `json:"metrics"`
	Scrub   map[string]any `json:"scrub"`
	Lint    map[string]any `json:"lint"`
	UI      map[string]any `json:"ui"`
}

type zotDocSync struct {
	Enable          *bool           `json:"enable"`
	CredentialsFile *string         `json:"credentialsFile"`
	DownloadDir     *string         `json:"downloadDir"`
	Registries      []zotDocSyncReg `json:"registries"`
}

type zotDocSyncReg struct {
	URLs           []string        `json:"urls"`
	PollInterval   *string         `json:"pollInterval"`
	Content        []zotDocContent `json:"content"`
	TLSVerify      *bool           `json:"tlsVerify"`
	OnDemand       *bool           `json:"onDemand"`
	CertDir        *string         `json:"certDir"`
	MaxRetries     *int            `json:"maxRetries"`
	RetryDelay     *string         `json:"retryDelay"`
	OnlySigned     *bool           `json:"onlySigned"`
	PreserveDigest *bool           `json:"preserveDigest"`
	SyncTimeout    *string         `json:"syncTimeout"`
}

type zotDocContent struct {
	Prefix      string         `json:"prefix"`
	Tags        map[string]any `json:"tags"`
	Destination *string        `json:"destination"`
	StripPrefix *bool          `json:"stripPrefix"`
}

type zotDocSearch struct {
	Enable *bool          `json:"enable"`
	CVE    map[string]any `json:"cve"`
}

func decodeZot(t *testing.T, data []byte) zotDoc {
	t.Helper()
	var z zotDoc
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&z); err != nil {
		t.Fatalf("zot config does not match Zot's documented schema: %v\n%s", err, data)
	}
	return z
}

func isTrue(p *bool) bool { return p != nil && *p }

func durationIs(t *testing.T, field string, got *string, want time.Duration) {
	t.Helper()
	if got == nil {
		t.Errorf("%s missing, want %v", field, want)
		return
	}
	d, err := time.ParseDuration(*got)
	if err != nil || d != want {
		t.Errorf("%s = %q, want %v", field, *got, want)
	}
}

func TestZotConfigMatchesDocumentedSchema(t *testing.T) {
	cfg := testConfig(t)
	cfg.RegistryCache.Zot.StorageDir = "/srv/zot"
	cfg.RegistryCache.Zot.GCInterval = config.Duration(6 * time.Hour)
	cfg.RegistryCache.Zot.Port = 5001
	// Docker Hub listed in the middle: Zot must still try it last.
	m := cfg.RegistryCache.Mirrors
	m[0], m[1] = m[1], m[0]
	z := decodeZot(t, mustHost(t, cfg)[HostZotConfig])

	if z.DistSpecVersion != "1.1.1" {
		t.Errorf("distSpecVersion = %q", z.DistSpecVersion)
	}
	// Storage: GC, dedupe and retention.
	s := z.Storage
	if s.RootDirectory != "/srv/zot" {
		t.Errorf("storage.rootDirectory = %q", s.RootDirectory)
	}
	if !isTrue(s.Dedupe) || !isTrue(s.GC) {
		t.Errorf("storage.dedupe %v, gc %v; want both true", s.Dedupe, s.GC)
	}
	durationIs(t, "storage.gcDelay", s.GCDelay, time.Hour)
	durationIs(t, "storage.gcInterval", s.GCInterval, 6*time.Hour)
	if s.Commit != nil || s.RemoteCache != nil || s.StorageDriver != nil || s.CacheDriver != nil || s.SubPaths != nil {
		t.Errorf("unexpected storage settings: %+v", s)
	}
	r := s.Retention
	if r == nil {
		t.Fatal("storage.retention missing")
	}
	if r.DryRun == nil || *r.DryRun {
		t.Errorf("retention.dryRun = %v, want false", r.DryRun)
	}
	durationIs(t, "retention.delay", r.Delay, 24*time.Hour)
	if len(r.Policies) != 1 {
		t.Fatalf("retention.policies = %d, want 1", len(r.Policies))
	}
	p := r.Policies[0]
	if !slices.Equal(p.Repositories, []string{"**"}) || !isTrue(p.DeleteReferrers) || !isTrue(p.DeleteUntagged) {
		t.Errorf("retention policy = %+v", p)
	}
	if len(p.KeepTags) != 1 || !slices.Equal(p.KeepTags[0].Patterns, []string{".*"}) ||
		p.KeepTags[0].MostRecentlyPulledCount != nil || p.KeepTags[0].MostRecentlyPushedCount != nil {
		t.Fatalf("keepTags = %+v", p.KeepTags)
	}
	durationIs(t, "keepTags.pulledWithin", p.KeepTags[0].PulledWithin, ZotRetention)
	durationIs(t, "keepTags.pushedWithin", p.KeepTags[0].PushedWithin, ZotRetention)

	// HTTP: the gateway only, Docker images kept as they are.
	h := z.HTTP
	if h.Address != gw || h.Port != "5001" {
		t.Errorf("http address %q port %q, want %s 5001", h.Address, h.Port, gw)
	}
	if !slices.Equal(h.Compat, []string{"docker2s2"}) {
		t.Errorf("http.compat = %v, want [docker2s2]", h.Compat)
	}
	if h.TLS != nil || h.Auth != nil || h.ExternalURL != nil || h.Realm != nil || h.Ratelimit != nil {
		t.Errorf("unexpected http settings: %+v", h)
	}
	// Read-only: VMs pull (and so trigger syncs) but can never push.
	ac := h.AccessControl
	if ac == nil || len(ac.Repositories) != 1 || ac.AdminPolicy != nil || ac.Groups != nil || ac.Metrics != nil {
		t.Fatalf("http.accessControl = %+v, want one anonymous read policy", ac)
	}
	all, ok := ac.Repositories["**"]
	if !ok || !slices.Equal(all.AnonymousPolicy, []string{"read"}) || all.DefaultPolicy != nil || all.Policies != nil {
		t.Errorf(`accessControl.repositories["**"] = %+v, want anonymousPolicy [read] only`, all)
	}
	if z.Log == nil || !slices.Contains([]string{"debug", "info", "warn", "error"}, z.Log.Level) {
		t.Errorf("log = %+v", z.Log)
	}

	// Sync: on demand, every mirror, Docker Hub last at the root.
	if z.Extensions == nil || z.Extensions.Sync == nil || !isTrue(z.Extensions.Sync.Enable) {
		t.Fatalf("extensions.sync not enabled: %+v", z.Extensions)
	}
	if z.Extensions.Search == nil || !isTrue(z.Extensions.Search.Enable) || z.Extensions.Search.CVE != nil {
		t.Errorf("extensions.search = %+v, want enabled without CVE scanning (which downloads a database)", z.Extensions.Search)
	}
	sy := z.Extensions.Sync
	if sy.CredentialsFile != nil || sy.DownloadDir != nil {
		t.Errorf("unexpected sync settings: %+v", sy)
	}
	want := []struct{ url, dest string }{
		{"https://ghcr.io", "/ghcr.io"},
		{"https://quay.io", "/quay.io"},
		{"https://gcr.io", "/gcr.io"},
		{"https://registry.local:5000", "/registry.local_5000"},
		{"https://registry-1.docker.io", "/"},
	}
	if len(sy.Registries) != len(want) {
		t.Fatalf("%d sync registries, want %d", len(sy.Registries), len(want))
	}
	for i, w := range want {
		reg := sy.Registries[i]
		if !slices.Equal(reg.URLs, []string{w.url}) {
			t.Errorf("registries[%d].urls = %v, want [%s]", i, reg.URLs, w.url)
		}
		if !isTrue(reg.OnDemand) || !isTrue(reg.TLSVerify) || !isTrue(reg.PreserveDigest) {
			t.Errorf("registries[%d]: onDemand %v tlsVerify %v preserveDigest %v, want all true", i, reg.OnDemand, reg.TLSVerify, reg.PreserveDigest)
		}
		if reg.PollInterval != nil || reg.OnlySigned != nil || reg.CertDir != nil || reg.MaxRetries != nil {
			t.Errorf("registries[%d] polls or filters: %+v", i, reg)
		}
		if len(reg.Content) != 1 || reg.Content[0].Prefix != "**" || reg.Content[0].Destination == nil ||
			*reg.Content[0].Destination != w.dest || reg.Content[0].StripPrefix != nil || reg.Content[0].Tags != nil {
			t.Errorf("registries[%d].content = %+v, want prefix ** destination %s", i, reg.Content, w.dest)
		}
	}
}

func TestZotConfigIsDeterministic(t *testing.T) {
	a := mustHost(t, testConfig(t))
	b := mustHost(t, testConfig(t))
	for k := range a {
		if !bytes.Equal(a[k], b[k]) {
			t.Errorf("%s differs between two renders", k)
		}
	}
}

// TestZotStorageVolume runs the rendered script in a private mount
// namespace: it must mount an ext4 volume of max_size on the storage
// directory, be idempotent, and grow the volume when max_size grows.
func TestZotStorageVolume(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the script loop-mounts an ext4 image")
	}
	if _, err := os.Stat("/dev/loop-control"); err != nil {
		t.Skip("needs loop devices (/dev/loop-control)")
	}
	for _, tool := range []string{"unshare", "mkfs.ext4", "resize2fs", "findmnt", "mountpoint"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("needs %s", tool)
		}
	}
	dir := t.TempDir()
	cfg := testConfig(t)
	cfg.RegistryCache.Zot.StorageDir = filepath.Join(dir, "zot")

	run := func(size config.ByteSize) (blocks, bsize int64) {
		t.Helper()
		cfg.RegistryCache.Zot.MaxSize = size
		script := filepath.Join(dir, "storage.sh")
		if err := os.WriteFile(script, mustHost(t, cfg)[HostZotStorage], 0o755); err != nil {
			t.Fatal(err)
		}
		// Run twice to prove it is idempotent, then report the size of
		// the filesystem mounted on the storage directory.
		sh := `set -e; sh "$1"; sh "$1"; mountpoint -q "$2"; findmnt -n -o FSTYPE --target "$2"; stat -f -c '%b %S' "$2"`
		out, err := exec.Command("unshare", "--mount", "--propagation", "private",
			"sh", "-c", sh, "sh", script, cfg.RegistryCache.Zot.StorageDir).CombinedOutput()
		if err != nil {
			t.Fatalf("storage script: %v\n%s", err, out)
		}
		lines := strings.Fields(string(out))
		if len(lines) != 3 || lines[0] != "ext4" {
			t.Fatalf("unexpected output %q", out)
		}
		if _, err := fmt.Sscan(lines[1], &blocks); err != nil {
			t.Fatal(err)
		}
		if _, err := fmt.Sscan(lines[2], &bsize); err != nil {
			t.Fatal(err)
		}
		return blocks, bsize
	}
	b1, s1 := run(64 << 20)
	total1 := b1 * s1
	// ext4 keeps some of the volume for its metadata, never more.
	if total1 > 64<<20 || total1 < 48<<20 {
		t.Errorf("volume holds %d bytes, want a little under 64MiB", total1)
	}
	image := ZotStorageImage(cfg.RegistryCache.Zot.StorageDir)
	var st syscall.Stat_t
	if err := syscall.Stat(image, &st); err != nil {
		t.Fatal(err)
	}
	if st.Size != 64<<20 {
		t.Errorf("image is %d bytes, want 64MiB", st.Size)
	}
	if st.Blocks*512 >= 64<<20 {
		t.Errorf("image is not sparse: %d bytes allocated", st.Blocks*512)
	}

	b2, s2 := run(96 << 20)
	if total2 := b2 * s2; total2 <= total1 || total2 > 96<<20 {
		t.Errorf("after growing max_size the volume holds %d bytes (was %d), want more, under 96MiB", total2, total1)
	}
}
