// Package metadata builds a VM's metadata document and serves it the way
// Firecracker's MMDS does. The document follows what cloud-init's Ec2
// datasource reads: a "latest" tree and an identical "2009-04-04" tree,
// each with "meta-data" (a tree whose leaves are all strings; instance-id
// is always present) and "user-data" beside it.
//
// Meta-data keys written with '/' ("fireactions/runner_id", a pool's
// "team/owner") are paths: they become nested objects, which IMDS lists as
// subtrees ("fireactions/") and serves at /latest/meta-data/fireactions/runner_id.
package metadata

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/fireactions/fireactions/internal/registrycache"
)

// Meta-data keys fireactions sets. Everything under "fireactions/" is
// reserved for fireactions.
const (
	KeyInstanceID    = "instance-id"
	KeyLocalHostname = "local-hostname"
	KeyRunnerID      = "fireactions/runner_id"
	KeyPool          = "fireactions/pool"
	// KeyRegistryCache holds the registry-cache GuestConfig as a JSON
	// string, for fireactions' guest agent.
	KeyRegistryCache = "fireactions/registry-cache"
)

// Versions are the top-level trees of the document. cloud-init's Ec2
// datasource falls back to 2009-04-04 when the newer versions it probes
// first are missing; other clients read latest.
var Versions = []string{"latest", "2009-04-04"}

// Input is what one VM's document is made of.
type Input struct {
	// InstanceID identifies this boot of the VM; required. cloud-init
	// re-runs its per-instance modules when it changes.
	InstanceID string
	// Hostname is local-hostname; empty means InstanceID.
	Hostname string
	// RunnerID and Pool identify the GitHub runner; empty leaves them out
	// (VMs that are not runners, e.g. Nomad tasks).
	RunnerID string
	Pool     string
	// Metadata is the pool's vm.metadata: extra string leaves, keys may be
	// '/'-separated paths.
	Metadata map[string]string
	// UserData is served verbatim at user-data.
	UserData string
	// RegistryCache, when set, is carried at KeyRegistryCache.
	RegistryCache *registrycache.GuestConfig
}

// Document is a VM's metadata. Its zero value is not valid; use New or
// Parse.
type Document struct {
	root map[string]any
}

// New builds the document for one VM.
func New(in Input) (Document, error) {
	if err := checkInstanceID(in.InstanceID); err != nil {
		return Document{}, err
	}
	host := in.Hostname
	if host == "" {
		host = in.InstanceID
	}
	if !validHostname(host) {
		return Document{}, fmt.Errorf("metadata: local-hostname %q is not a hostname (letters, digits and '-' in dot-separated labels); set Input.Hostname", host)
	}
	md := map[string]any{}
	for _, k := range slices.Sorted(maps.Keys(in.Metadata)) {
		if err := checkUserKey(k); err != nil {
			return Document{}, err
		}
		if err := put(md, k, in.Metadata[k]); err != nil {
			return Document{}, err
		}
	}
	own := map[string]string{
		KeyInstanceID:    in.InstanceID,
		KeyLocalHostname: host,
		KeyRunnerID:      in.RunnerID,
		KeyPool:          in.Pool,
	}
	if in.RegistryCache != nil {
		gc, err := json.Marshal(in.RegistryCache)
		if err != nil {
			return Document{}, fmt.Errorf("metadata: encode registry cache: %w", err)
		}
		own[KeyRegistryCache] = string(gc)
	}
	for _, k := range slices.Sorted(maps.Keys(own)) {
		v := own[k]
		if v == "" {
			continue
		}
		if !utf8.ValidString(v) || strings.IndexFunc(v, unicode.IsControl) >= 0 {
			return Document{}, fmt.Errorf("metadata: %s %q holds control characters or invalid UTF-8", k, v)
		}
		if err := put(md, k, v); err != nil {
			return Document{}, err
		}
	}
	if !utf8.ValidString(in.UserData) {
		return Document{}, errors.New("metadata: user-data is not valid UTF-8; MMDS carries JSON strings")
	}
	root := map[string]any{}
	for _, v := range Versions {
		// Each version gets its own copy so that no caller can make them
		// drift apart through a shared map.
		root[v] = map[string]any{
			"meta-data": clone(md),
			"user-data": in.UserData,
		}
	}
	return Document{root: root}, nil
}

func checkInstanceID(id string) error {
	if id == "" {
		return errors.New("metadata: instance-id is required")
	}
	// cloud-init names a directory after it.
	if !utf8.ValidString(id) || strings.ContainsRune(id, '/') || id == "." || id == ".." ||
		strings.IndexFunc(id, func(r rune) bool { return unicode.IsSpace(r) || unicode.IsControl(r) }) >= 0 {
		return fmt.Errorf("metadata: instance-id %q must be one word without '/', spaces or control characters", id)
	}
	return nil
}

func validHostname(h string) bool {
	if len(h) > 253 {
		return false
	}
	for _, label := range strings.Split(h, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for _, r := range label {
			if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-') {
				return false
			}
		}
	}
	return true
}

// checkUserKey enforces what the tree needs of a vm.metadata key; config
// validation reports the same problems with their YAML path.
func checkUserKey(k string) error {
	switch {
	case k == "":
		return errors.New("metadata: empty meta-data key")
	case !utf8.ValidString(k) || strings.IndexFunc(k, func(r rune) bool { return unicode.IsSpace(r) || unicode.IsControl(r) }) >= 0:
		return fmt.Errorf("metadata: meta-data key %q must not contain whitespace or control characters", k)
	case k == KeyInstanceID || k == KeyLocalHostname || k == "fireactions" || strings.HasPrefix(k, "fireactions/"):
		return fmt.Errorf("metadata: meta-data key %q is reserved: fireactions sets instance-id, local-hostname and everything under fireactions/", k)
	}
	for _, seg := range strings.Split(k, "/") {
		if seg == "" || seg == "." || seg == ".." {
			return fmt.Errorf("metadata: meta-data key %q must be '/'-separated names without empty, '.' or '..' parts", k)
		}
	}
	return nil
}

// put stores value at the '/'-separated path key, creating subtrees.
func put(tree map[string]any, key, value string) error {
	segs := strings.Split(key, "/")
	node := tree
	for i, seg := range segs[:len(segs)-1] {
		switch next := node[seg].(type) {
		case nil:
			sub := map[string]any{}
			node[seg] = sub
			node = sub
		case map[string]any:
			node = next
		default:
			return fmt.Errorf("metadata: meta-data key %q puts a tree under %q, which is a value", key, strings.Join(segs[:i+1], "/"))
		}
	}
	last := segs[len(segs)-1]
	if _, isTree := node[last].(map[string]any); isTree {
		return fmt.Errorf("metadata: meta-data key %q is a value but other keys put a tree under it", key)
	}
	node[last] = value
	return nil
}

func clone(m map[string]any) map[string]any {
	out := make(map[string]any, len(m))
	for k, v := range m {
		if sub, ok := v.(map[string]any); ok {
			out[k] = clone(sub)
		} else {
			out[k] = v
		}
	}
	return out
}

// JSON returns the document as Firecracker's PUT /mmds takes it. Keys are
// sorted, so identical documents give identical bytes.
func (d Document) JSON() ([]byte, error) {
	if d.root == nil {
		return nil, errors.New("metadata: empty document; build it with New")
	}
	return encode(d.root)
}

func encode(v any) ([]byte, error) {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, fmt.Errorf("metadata: encode: %w", err)
	}
	return bytes.TrimSuffix(b.Bytes(), []byte("\n")), nil
}

// Parse reads a document written by JSON. Every value must be a string or
// an object, and both version trees must be present.
func Parse(data []byte) (Document, error) {
	var root map[string]any
	dec := json.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&root); err != nil {
		return Document{}, fmt.Errorf("metadata: %w", err)
	}
	if err := checkTree(root, ""); err != nil {
		return Document{}, err
	}
	for _, v := range Versions {
		tree, ok := root[v].(map[string]any)
		if !ok {
			return Document{}, fmt.Errorf("metadata: no %q tree", v)
		}
		if _, ok := tree["meta-data"].(map[string]any); !ok {
			return Document{}, fmt.Errorf("metadata: no %s/meta-data tree", v)
		}
	}
	return Document{root: root}, nil
}

func checkTree(m map[string]any, at string) error {
	for k, v := range m {
		switch sub := v.(type) {
		case string:
		case map[string]any:
			if err := checkTree(sub, at+k+"/"); err != nil {
				return err
			}
		default:
			return fmt.Errorf("metadata: %s%s is neither a string nor an object", at, k)
		}
	}
	return nil
}

// lookup returns the node at a '/'-separated path from the root; "" is the
// root itself.
func (d Document) lookup(p string) (any, bool) {
	var node any = d.root
	if p == "" {
		return node, d.root != nil
	}
	for _, seg := range strings.Split(p, "/") {
		m, ok := node.(map[string]any)
		if !ok {
			return nil, false
		}
		if node, ok = m[seg]; !ok {
			return nil, false
		}
	}
	return node, true
}

// MetaData returns the latest/meta-data leaf at key ("instance-id",
// "fireactions/runner_id").
func (d Document) MetaData(key string) (string, bool) {
	v, ok := d.lookup("latest/meta-data/" + key)
	s, isString := v.(string)
	return s, ok && isString
}

// UserData returns latest/user-data.
func (d Document) UserData() string {
	v, _ := d.lookup("latest/user-data")
	s, _ := v.(string)
	return s
}

// RegistryCache returns the GuestConfig carried at KeyRegistryCache, or
// nil when the document has none.
func (d Document) RegistryCache() (*registrycache.GuestConfig, error) {
	raw, ok := d.MetaData(KeyRegistryCache)
	if !ok {
		return nil, nil
	}
	g, err := registrycache.ParseGuestConfig([]byte(raw))
	if err != nil {
		return nil, err
	}
	return &g, nil
}
