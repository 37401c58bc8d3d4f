// Package bootstrap owns `fireactions bootstrap`: it turns the files a
// cloud-init user-data writes into the input directory (GitHub App ID and
// key, the seed's camelCase pools.json) plus the seed's environment
// variables into the daemon's runtime configuration, validates it, and
// writes it atomically. Identical inputs give byte-identical output, so it
// is safe to run on every boot.
package bootstrap

import (
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/fireactions/fireactions/internal/config"
	"github.com/fireactions/fireactions/internal/registrycache"
)

// The files of the input directory.
const (
	FileAppID       = "github-app-id"
	FilePrivateKey  = "github-private-key.pem"
	FilePools       = "pools.json"
	FileBindAddress = "bind-address" // optional
	FileLogLevel    = "log-level"    // optional
	FileAuthToken   = "auth-token"   // optional
)

// The seed's environment variables.
const (
	EnvKernelPath           = "KERNEL_PATH"
	EnvRegistryCacheEnabled = "REGISTRY_CACHE_ENABLED"
	EnvRegistryCacheGateway = "REGISTRY_CACHE_GATEWAY"
	EnvZotPort              = "ZOT_PORT"
	EnvZotMirrors           = "ZOT_MIRRORS"
)

// DefaultInputDir is where cloud-init writes the inputs.
const DefaultInputDir = "/etc/fireactions"

// Inputs are everything the bootstrap reads. The string fields hold the raw
// values of the seed's environment variables (or the flags that override
// them); empty means unset.
type Inputs struct {
	// Dir holds github-app-id, github-private-key.pem, pools.json and the
	// optional bind-address, log-level and auth-token.
	Dir string

	KernelPath           string // KERNEL_PATH: vm.kernel of every pool
	RegistryCacheEnabled string // REGISTRY_CACHE_ENABLED: "true" or "false"
	RegistryCacheGateway string // REGISTRY_CACHE_GATEWAY: an IP address
	ZotPort              string // ZOT_PORT: 1-65535
	ZotMirrors           string // ZOT_MIRRORS: {"registry": {"url": "https://..."} | "https://..." | {}}
}

// InputsFromEnv fills the environment-variable fields from getenv
// (os.Getenv in production).
func InputsFromEnv(dir string, getenv func(string) string) Inputs {
	return Inputs{
		Dir:                  dir,
		KernelPath:           getenv(EnvKernelPath),
		RegistryCacheEnabled: getenv(EnvRegistryCacheEnabled),
		RegistryCacheGateway: getenv(EnvRegistryCacheGateway),
		ZotPort:              getenv(EnvZotPort),
		ZotMirrors:           getenv(EnvZotMirrors),
	}
}

// Sources name the non-file inputs in problems: the variable and the flag
// that overrides it.
const (
	srcKernelPath = EnvKernelPath + " (--kernel-path)"
	srcEnabled    = EnvRegistryCacheEnabled + " (--registry-cache-enabled)"
	srcGateway    = EnvRegistryCacheGateway + " (--registry-cache-gateway)"
	srcZotPort    = EnvZotPort + " (--zot-port)"
	srcZotMirrors = EnvZotMirrors + " (--zot-mirrors)"
	srcGenerated  = "generated configuration"
)

// rank orders problems as the inputs are documented.
var sourceRank = map[string]int{
	FileAppID: 1, FilePrivateKey: 2, FilePools: 3, FileBindAddress: 4, FileLogLevel: 5, FileAuthToken: 6,
	srcKernelPath: 7, srcEnabled: 8, srcGateway: 9, srcZotPort: 10, srcZotMirrors: 11, srcGenerated: 12,
}

// files is the content of the input directory; a missing optional file is
// absent from the map.
type files map[string][]byte

// Generate reads the inputs and returns the validated daemon configuration
// with every default filled in. On bad input the error is a Problems listing
// every problem, each located in the input the operator has to fix.
func Generate(in Inputs) (*config.Config, error) {
	if in.Dir == "" {
		in.Dir = DefaultInputDir
	}
	// Paths into the directory end up in the configuration (auth-token),
	// which the daemon reads from another working directory.
	if abs, err := filepath.Abs(in.Dir); err == nil {
		in.Dir = abs
	}
	f, probs := readInputs(in.Dir)
	return build(in, f, probs)
}

func readInputs(dir string) (files, Problems) {
	out := files{}
	var probs Problems
	if st, err := os.Stat(dir); err != nil || !st.IsDir() {
		msg := "not a directory"
		if err != nil {
			msg = unwrapPath(err).Error()
		}
		return out, Problems{{Source: dir, Message: msg + "; pass the directory cloud-init writes the inputs to with --input-dir"}}
	}
	for _, name := range []string{FileAppID, FilePrivateKey, FilePools, FileBindAddress, FileLogLevel, FileAuthToken} {
		path := filepath.Join(dir, name)
		data, err := os.ReadFile(path)
		required := name == FileAppID || name == FilePrivateKey || name == FilePools
		switch {
		case errors.Is(err, fs.ErrNotExist) && !required:
		case errors.Is(err, fs.ErrNotExist):
			probs = append(probs, Problem{Source: path, Message: "missing required file; " + missingHint[name], rank: sourceRank[name]})
		case err != nil:
			probs = append(probs, Problem{Source: path, Message: fmt.Sprintf("cannot read: %v", unwrapPath(err)), rank: sourceRank[name]})
		default:
			out[name] = data
		}
	}
	return out, probs
}

var missingHint = map[string]string{
	FileAppID:      "write the GitHub App's numeric ID into it",
	FilePrivateKey: "write the GitHub App's PEM private key into it",
	FilePools:      "write the pool definitions into it as a JSON array (see docs/operations.md)",
}

// unwrapPath drops the *fs.PathError wrapper, whose path the problem
// already names.
func unwrapPath(err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

// build turns the input files and variables into the configuration.
// readProblems are the inputs that could not be read; the rest are still
// checked so that one run reports everything.
func build(in Inputs, f files, readProblems Problems) (*config.Config, error) {
	b := &builder{dir: in.Dir, files: f, problems: readProblems, structural: len(readProblems) > 0}
	cfg := &config.Config{
		// The seed's generator enabled metrics; the address default keeps
		// them on loopback.
		Metrics: config.Metrics{Enabled: true},
	}
	if _, ok := f[FileAppID]; ok {
		cfg.GitHub.AppID = b.appID()
	}
	if _, ok := f[FilePrivateKey]; ok {
		cfg.GitHub.PrivateKey = b.privateKey()
	}
	if _, ok := f[FilePools]; ok {
		cfg.Pools = b.pools()
	}
	cfg.Server.Address = b.optional(FileBindAddress)
	if _, ok := f[FileAuthToken]; ok {
		b.authToken()
		cfg.Server.AuthTokenFile = b.path(FileAuthToken)
	}
	cfg.Log.Level = strings.ToLower(b.optional(FileLogLevel))
	if in.KernelPath != "" {
		b.kernelFromEnv = true
		for i := range cfg.Pools {
			cfg.Pools[i].VM.Kernel = in.KernelPath
		}
	}
	b.registryCache(in, &cfg.RegistryCache)
	if b.structural {
		// Validation of a half-decoded configuration would only restate
		// the problems above, less precisely.
		return nil, b.problems.sorted()
	}

	cfg.ApplyDefaults()
	// With the cache on, every pool's VMs get the cache's user-data; the
	// daemon does the same on load, so /run carries what it will use.
	if err := registrycache.ApplyUserData(cfg); err != nil {
		b.add(srcGenerated, "", 0, fmt.Sprintf("registry cache user-data: %v", err))
	}
	if err := cfg.Validate(config.ValidateOptions{CheckFiles: false}); err != nil {
		var cps config.Problems
		if !errors.As(err, &cps) {
			return nil, fmt.Errorf("validate generated configuration: %w", err)
		}
		for _, cp := range cps {
			b.translate(cp)
		}
	}
	if len(b.problems) > 0 {
		return nil, b.problems.sorted()
	}
	return cfg, nil
}

type builder struct {
	dir      string
	files    files
	problems Problems
	// structural is set when an input could not be decoded at all.
	structural bool
	// poolsData and poolsTree locate pools.json paths in validation
	// problems.
	poolsData []byte
	poolsTree *jsonNode
	// kernelFromEnv and mirrors tell which inputs produced vm.kernel and
	// registry_cache.mirrors.
	kernelFromEnv bool
	mirrors       []config.Mirror
}

func (b *builder) path(name string) string { return filepath.Join(b.dir, name) }

func isInputFile(name string) bool {
	switch name {
	case FileAppID, FilePrivateKey, FilePools, FileBindAddress, FileLogLevel, FileAuthToken:
		return true
	}
	return false
}

// add records a problem; source is a file name of the input directory or
// one of the src* names.
func (b *builder) add(source, path string, off int64, msg string) {
	p := Problem{Source: source, Path: path, Message: msg, rank: sourceRank[source], off: off}
	if isInputFile(source) {
		p.Source = b.path(source)
	}
	b.problems = append(b.problems, p)
}

func (b *builder) appID() int64 {
	s := strings.TrimSpace(string(b.files[FileAppID]))
	if s == "" {
		b.add(FileAppID, "", 0, "empty; write the GitHub App's numeric ID into it")
		return 0
	}
	id, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		if ne, ok := err.(*strconv.NumError); ok && ne.Err == strconv.ErrRange {
			b.add(FileAppID, "", 0, fmt.Sprintf("%s is out of range", strconv.Quote(truncate(s))))
		} else {
			b.add(FileAppID, "", 0, fmt.Sprintf("%s is not a number; write the GitHub App's numeric ID", strconv.Quote(truncate(s))))
		}
		return 0
	}
	if id <= 0 {
		b.add(FileAppID, "", 0, fmt.Sprintf("must be a positive number, got %d", id))
		return 0
	}
	return id
}

// privateKey returns the first PEM private key block of the key file,
// re-encoded: surrounding text and other blocks (a certificate, comments)
// are dropped and line endings normalised, so the configuration carries
// only the key, byte-identically on every run. The key itself never
// appears in a message.
func (b *builder) privateKey() config.Secret {
	data := b.files[FilePrivateKey]
	const want = "want the GitHub App's key as downloaded: -----BEGIN RSA PRIVATE KEY----- (PKCS #1) or -----BEGIN PRIVATE KEY----- (PKCS #8)"
	for rest := data; ; {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			b.add(FilePrivateKey, "", 0, "not a PEM private key; "+want)
			return ""
		}
		if !strings.HasSuffix(block.Type, "PRIVATE KEY") {
			continue
		}
		if _, encrypted := block.Headers["Proc-Type"]; encrypted || block.Type == "ENCRYPTED PRIVATE KEY" {
			b.add(FilePrivateKey, "", 0, "the private key is encrypted; the daemon needs it unencrypted, as GitHub issues it")
			return ""
		}
		if msg := checkRSAKey(block); msg != "" {
			b.add(FilePrivateKey, "", 0, msg+"; "+want)
			return ""
		}
		return config.Secret(pem.EncodeToMemory(&pem.Block{Type: block.Type, Bytes: block.Bytes}))
	}
}

// checkRSAKey explains why block is not a usable GitHub App key, or
// returns "". GitHub App keys are RSA.
func checkRSAKey(block *pem.Block) string {
	if _, err := x509.ParsePKCS1PrivateKey(block.Bytes); err == nil {
		return ""
	}
	key, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return fmt.Sprintf("the %s block does not hold a valid private key", block.Type)
	}
	if _, ok := key.(*rsa.PrivateKey); !ok {
		return fmt.Sprintf("the key is %T, not RSA; GitHub App keys are RSA", key)
	}
	return ""
}

func (b *builder) pools() []config.Pool {
	data := b.files[FilePools]
	b.poolsData = data
	tree, err := parseJSONTree(data)
	if err != nil {
		var se *jsonSyntaxError
		errors.As(err, &se)
		b.addAt(FilePools, "", se.off, se.msg)
		b.structural = true
		return nil
	}
	b.poolsTree = tree
	pools, probs := decodePools(tree)
	for _, p := range probs {
		b.addAt(FilePools, string(p.path), p.off, p.msg)
	}
	if len(probs) > 0 && len(pools) == 0 {
		b.structural = true
	}
	return pools
}

// addAt records a problem in pools.json with its line and column.
func (b *builder) addAt(name, path string, off int64, msg string) {
	b.add(name, path, off, msg)
	p := &b.problems[len(b.problems)-1]
	p.Line, p.Column = position(b.poolsData, off)
}

// optional returns the trimmed content of an optional file; an empty file
// counts as absent (cloud-init writes empty files for empty values).
func (b *builder) optional(name string) string {
	return strings.TrimSpace(string(b.files[name]))
}

func (b *builder) authToken() {
	if strings.TrimSpace(string(b.files[FileAuthToken])) == "" {
		b.add(FileAuthToken, "", 0, "empty; write the API bearer token into it, or delete the file")
	}
}

func (b *builder) registryCache(in Inputs, rc *config.RegistryCache) {
	if s := strings.TrimSpace(in.RegistryCacheEnabled); s != "" {
		v, err := strconv.ParseBool(s)
		if err != nil {
			b.add(srcEnabled, "", 0, fmt.Sprintf("%s is not a boolean; use true or false", strconv.Quote(truncate(s))))
		}
		rc.Enabled = v
	}
	if s := strings.TrimSpace(in.RegistryCacheGateway); s != "" {
		if _, err := netip.ParseAddr(s); err != nil {
			b.add(srcGateway, "", 0, fmt.Sprintf("%s is not an IP address; use the VM bridge address, e.g. %s", strconv.Quote(truncate(s)), config.DefaultGateway))
		}
		rc.Gateway = s
	}
	if s := strings.TrimSpace(in.ZotPort); s != "" {
		port, err := strconv.Atoi(s)
		if err != nil || port < 1 || port > 65535 {
			b.add(srcZotPort, "", 0, fmt.Sprintf("%s is not a port; use 1-65535", strconv.Quote(truncate(s))))
		} else {
			rc.Zot.Port = port
		}
	}
	if s := strings.TrimSpace(in.ZotMirrors); s != "" {
		mirrors, err := parseMirrors(s)
		if err != nil {
			// The seed fell back to default mirrors here, hiding the typo.
			b.add(srcZotMirrors, "", 0, err.Error())
		}
		rc.Mirrors = mirrors
		b.mirrors = mirrors
	}
}

// parseMirrors reads ZOT_MIRRORS, a JSON object from registry name to its
// upstream: an object with an optional "url", or a URL string. A missing
// url means https://<registry> (https://registry-1.docker.io for
// docker.io). The result is sorted by registry so the output is
// deterministic; an empty object means the configuration's defaults.
func parseMirrors(s string) ([]config.Mirror, error) {
	tree, err := parseJSONTree([]byte(s))
	if err != nil {
		var se *jsonSyntaxError
		errors.As(err, &se)
		line, col := position([]byte(s), se.off)
		msg := se.msg
		if se.off == 0 && strings.HasPrefix(msg, "empty file") {
			msg = "empty"
		}
		return nil, fmt.Errorf("%d:%d: %s; want a JSON object such as %s", line, col, msg, mirrorsExample)
	}
	if tree.kind != jsonObject {
		return nil, fmt.Errorf("want a JSON object such as %s, got %s", mirrorsExample, tree.describe())
	}
	var mirrors []config.Mirror
	var errs []string
	for _, m := range tree.members {
		url := defaultUpstream(m.key)
		switch v := m.val; v.kind {
		case jsonNull:
		case jsonString:
			url = v.str
		case jsonObject:
			for _, f := range v.members {
				switch {
				case f.key != "url":
					errs = append(errs, fmt.Sprintf("%s: %s", jsonPath("").key(m.key).key(f.key), unknownField(f.key, []string{"url"})))
				case f.val.kind == jsonString:
					url = f.val.str
				case f.val.kind != jsonNull:
					errs = append(errs, fmt.Sprintf("%s: want a string, got %s", jsonPath("").key(m.key).key(f.key), f.val.describe()))
				}
			}
		default:
			errs = append(errs, fmt.Sprintf("%s: want an object with a url or a URL string, got %s", jsonPath("").key(m.key), v.describe()))
		}
		mirrors = append(mirrors, config.Mirror{Registry: m.key, URL: url})
	}
	if len(errs) > 0 {
		return nil, errors.New(strings.Join(errs, "; "))
	}
	slices.SortFunc(mirrors, func(a, b config.Mirror) int { return strings.Compare(a.Registry, b.Registry) })
	return mirrors, nil
}

const mirrorsExample = `{"docker.io": {"url": "https://registry-1.docker.io"}, "ghcr.io": {}}`

func defaultUpstream(registry string) string {
	if registry == "docker.io" {
		return "https://registry-1.docker.io"
	}
	return "https://" + registry
}

// Summary describes a generated configuration without its secrets, for the
// command's output.
func Summary(cfg *config.Config) string {
	names := make([]string, len(cfg.Pools))
	for i, p := range cfg.Pools {
		names[i] = p.Name
	}
	cache := "off"
	if cfg.RegistryCache.Enabled {
		cache = fmt.Sprintf("on (%s:%d, %d mirrors)", cfg.RegistryCache.Gateway, cfg.RegistryCache.Zot.Port, len(cfg.RegistryCache.Mirrors))
	}
	return fmt.Sprintf("pools: %s\nregistry cache: %s", strings.Join(names, ", "), cache)
}
