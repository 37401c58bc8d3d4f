package nixcheck

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/fireactions/fireactions/internal/config"
	"github.com/fireactions/fireactions/internal/registrycache"
)

// repo is the repository root; fireactionsBin the binary built for the
// tests (empty when the build failed, which TestMain reports).
var (
	repo           string
	fireactionsBin string
)

func TestMain(m *testing.M) {
	wd, err := os.Getwd()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	repo = filepath.Clean(filepath.Join(wd, "..", ".."))
	dir, err := os.MkdirTemp("", "nixcheck-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fireactionsBin = filepath.Join(dir, "fireactions")
	build := exec.Command("go", "build", "-o", fireactionsBin, "./cmd/fireactions")
	build.Dir = repo
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "go build ./cmd/fireactions: %v\n%s", err, out)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// needNix skips the test when nix-instantiate is missing; `make test`
// installs it (Debian package nix-bin).
func needNix(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("nix-instantiate"); err != nil {
		t.Skip("needs nix-instantiate (Debian package nix-bin; `make deps` installs it)")
	}
}

// nixFiles lists every .nix file of the repository, relative to its root.
func nixFiles(t *testing.T) []string {
	t.Helper()
	var files []string
	err := filepath.WalkDir(repo, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (d.Name() == ".git" || d.Name() == "node_modules") {
			return filepath.SkipDir
		}
		if !d.IsDir() && strings.HasSuffix(p, ".nix") {
			rel, _ := filepath.Rel(repo, p)
			files = append(files, rel)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return files
}

func TestEveryNixFileParses(t *testing.T) {
	needNix(t)
	files := nixFiles(t)
	for _, want := range []string{
		"flake.nix",
		"nix/modules/fireactions.nix",
		"nix/profiles/registry-cache.nix",
		"nix/profiles/security-hardened.nix",
		"nix/profiles/prod.nix",
		"nix/lib/units.nix",
		"nix/lib/settings.nix",
		"nix/packages/default.nix",
		"images/common.nix",
		"images/azure.nix",
		"images/qcow2.nix",
	} {
		if !slices.Contains(files, want) {
			t.Errorf("%s is missing", want)
		}
	}
	// One run for all files; on failure, one per file to name each.
	cmd := exec.Command("nix-instantiate", append([]string{"--parse"}, files...)...)
	cmd.Dir = repo
	if err := cmd.Run(); err == nil {
		return
	}
	for _, f := range files {
		cmd := exec.Command("nix-instantiate", "--parse", f)
		cmd.Dir = repo
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("nix-instantiate --parse %s: %v\n%s", f, err, out)
		}
	}
}

// nixEval evaluates expr (relative paths are the repository's) strictly
// and decodes its JSON value into v.
func nixEval(t *testing.T, expr string, v any) {
	t.Helper()
	out, err := nixEvalErr(expr)
	if err != nil {
		t.Fatalf("nix-instantiate --eval: %v\nexpression: %s", err, expr)
	}
	if err := json.Unmarshal(out, v); err != nil {
		t.Fatalf("decode %s: %v", out, err)
	}
}

func nixEvalErr(expr string) ([]byte, error) {
	cmd := exec.Command("nix-instantiate", "--eval", "--strict", "--json", "--readonly-mode", "-E", expr)
	cmd.Dir = repo
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("%w: %s", err, strings.TrimSpace(stderr.String()))
	}
	return out, nil
}

// nixString quotes s as a Nix string literal.
func nixString(s string) string {
	r := strings.NewReplacer(`\`, `\\`, `"`, `\"`, "${", `\${`)
	return `"` + r.Replace(s) + `"`
}

// nixAttrs writes a flat attribute set of strings, booleans, integers and
// string maps as Nix.
func nixAttrs(m map[string]any) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	var b strings.Builder
	b.WriteString("{ ")
	for _, k := range keys {
		fmt.Fprintf(&b, "%s = ", k)
		switch v := m[k].(type) {
		case string:
			b.WriteString(nixString(v))
		case bool:
			b.WriteString(strconv.FormatBool(v))
		case int:
			b.WriteString(strconv.Itoa(v))
		case map[string]string:
			b.WriteString(nixAttrsQuoted(v))
		case nil:
			b.WriteString("null")
		default:
			panic(fmt.Sprintf("nixAttrs: %T", v))
		}
		b.WriteString("; ")
	}
	b.WriteString("}")
	return b.String()
}

func nixAttrsQuoted(m map[string]string) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	var b strings.Builder
	b.WriteString("{ ")
	for _, k := range keys {
		fmt.Fprintf(&b, "%s = %s; ", nixString(k), nixString(m[k]))
	}
	b.WriteString("}")
	return b.String()
}

// units is what nix/lib/units.nix returns.
type units struct {
	DrainSeconds      int `json:"drainSeconds"`
	StopMarginSeconds int `json:"stopMarginSeconds"`
	Bootstrap         struct {
		InputFiles  []string          `json:"inputFiles"`
		Environment map[string]string `json:"environment"`
		ExecStart   [][]string        `json:"ExecStart"`
	} `json:"bootstrap"`
	CheckConfig []string `json:"checkConfig"`
	Daemon      struct {
		ExecStartPre   [][]string `json:"ExecStartPre"`
		ExecStart      [][]string `json:"ExecStart"`
		TimeoutStopSec int        `json:"TimeoutStopSec"`
	} `json:"daemon"`
	HostSetup struct {
		ExecStart [][]string `json:"ExecStart"`
		ExecStop  [][]string `json:"ExecStop"`
	} `json:"hostSetup"`
	RegistryCacheRender struct {
		ExecStart [][]string `json:"ExecStart"`
	} `json:"registryCacheRender"`
	Zot struct {
		ConfigFile    string     `json:"configFile"`
		StorageScript string     `json:"storageScript"`
		ExecStartPre  [][]string `json:"ExecStartPre"`
		ExecStart     [][]string `json:"ExecStart"`
	} `json:"zot"`
	Squid struct {
		RenderedConfig string     `json:"renderedConfig"`
		ConfigText     string     `json:"configText"`
		ExecStartPre   [][]string `json:"ExecStartPre"`
		ExecStart      [][]string `json:"ExecStart"`
	} `json:"squid"`
	SquidCertDB struct {
		Path      string     `json:"path"`
		ExecStart [][]string `json:"ExecStart"`
	} `json:"squidCertDB"`
	SquidCA struct {
		CertFile  string     `json:"certFile"`
		KeyFile   string     `json:"keyFile"`
		ExecStart [][]string `json:"ExecStart"`
	} `json:"squidCA"`
	Nftables struct {
		File      string     `json:"file"`
		Table     string     `json:"table"`
		ExecStart [][]string `json:"ExecStart"`
		ExecStop  [][]string `json:"ExecStop"`
	} `json:"nftables"`
}

func evalUnits(t *testing.T, args map[string]any) units {
	t.Helper()
	var u units
	nixEval(t, "import ./nix/lib/units.nix "+nixAttrs(args), &u)
	return u
}

// result is one command's outcome.
type result struct {
	argv   []string
	code   int
	stdout string
	stderr string
}

func (r result) String() string {
	return fmt.Sprintf("%q: exit %d\nstdout:\n%s\nstderr:\n%s", r.argv, r.code, r.stdout, r.stderr)
}

// run runs argv with env added to a minimal environment, as systemd would
// (no inherited variables but PATH), and with umask.
func run(t *testing.T, argv []string, env map[string]string) result {
	t.Helper()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH")}
	for k, v := range env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	r := result{argv: argv, stdout: stdout.String(), stderr: stderr.String()}
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		r.code = ee.ExitCode()
	case err != nil:
		t.Fatalf("run %q: %v", argv, err)
	}
	return r
}

func mustRun(t *testing.T, argv []string, env map[string]string) result {
	t.Helper()
	r := run(t, argv, env)
	if r.code != 0 {
		t.Fatalf("unit command failed: %v", r)
	}
	return r
}

// one returns the only argv of an Exec list.
func one(t *testing.T, name string, lines [][]string) []string {
	t.Helper()
	if len(lines) != 1 {
		t.Fatalf("%s: want 1 command line, got %q", name, lines)
	}
	return lines[0]
}

// checkFlagsParse runs a unit's command line with --help appended: the
// subcommand exists and accepts every flag the unit passes.
func checkFlagsParse(t *testing.T, argv []string) {
	t.Helper()
	r := run(t, append(slices.Clone(argv), "--help"), nil)
	if r.code != 0 {
		t.Errorf("flags of the unit's command line do not parse: %v", r)
	}
}

func rsaKeyPEM(t *testing.T) []byte {
	t.Helper()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)})
}

func writeFile(t *testing.T, path string, data []byte, mode fs.FileMode) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, data, mode); err != nil {
		t.Fatal(err)
	}
}

// docsUserData returns the first #cloud-config block of docs/images.md:
// the user-data the images document.
func docsUserData(t *testing.T) []byte {
	t.Helper()
	doc, err := os.ReadFile(filepath.Join(repo, "docs", "images.md"))
	if err != nil {
		t.Fatal(err)
	}
	var block []string
	in := false
	sc := bufio.NewScanner(bytes.NewReader(doc))
	for sc.Scan() {
		line := sc.Text()
		switch {
		case !in && line == "```yaml":
			in = true
			block = nil
		case in && line == "```":
			if len(block) > 0 && block[0] == "#cloud-config" {
				return []byte(strings.Join(block, "\n") + "\n")
			}
			in = false
		case in:
			block = append(block, line)
		}
	}
	t.Fatal("docs/images.md has no ```yaml block starting with #cloud-config")
	return nil
}

type writeFileEntry struct {
	Path        string `yaml:"path"`
	Content     string `yaml:"content"`
	Encoding    string `yaml:"encoding"`
	Permissions string `yaml:"permissions"`
}

// applyUserData does what cloud-init's write_files does with the
// documented user-data, under root, with the placeholder contents replaced
// by real ones (keyed by path). It fails if the document has anything but
// write_files, or other files than the contract's.
func applyUserData(t *testing.T, userData []byte, root string, contents map[string][]byte) {
	t.Helper()
	var doc map[string]yaml.Node
	if err := yaml.Unmarshal(userData, &doc); err != nil {
		t.Fatalf("documented user-data: %v", err)
	}
	for k := range doc {
		if k != "write_files" {
			t.Errorf("documented user-data has %q; the bootstrap runs as a systemd unit, the user-data only writes files", k)
		}
	}
	wf := doc["write_files"]
	var entries []writeFileEntry
	if err := wf.Decode(&entries); err != nil {
		t.Fatalf("documented user-data: write_files: %v", err)
	}
	var paths []string
	for _, e := range entries {
		paths = append(paths, e.Path)
		data, ok := contents[e.Path]
		if !ok {
			t.Fatalf("documented user-data writes %s, which is not part of the contract", e.Path)
		}
		content := string(data)
		if e.Encoding == "b64" {
			content = base64.StdEncoding.EncodeToString(data)
		}
		// Decode the way cloud-init does, from the (substituted) entry.
		out := []byte(content)
		if e.Encoding == "b64" {
			var err error
			if out, err = base64.StdEncoding.DecodeString(content); err != nil {
				t.Fatal(err)
			}
		} else if e.Encoding != "" {
			t.Fatalf("%s: unexpected encoding %q", e.Path, e.Encoding)
		}
		perm, err := strconv.ParseUint(e.Permissions, 8, 32)
		if err != nil {
			t.Fatalf("%s: permissions %q: %v", e.Path, e.Permissions, err)
		}
		writeFile(t, filepath.Join(root, e.Path), out, fs.FileMode(perm))
		if err := os.Chmod(filepath.Join(root, e.Path), fs.FileMode(perm)); err != nil {
			t.Fatal(err)
		}
	}
	slices.Sort(paths)
	want := []string{"/etc/fireactions/github-app-id", "/etc/fireactions/github-private-key.pem", "/etc/fireactions/pools.json"}
	if !slices.Equal(paths, want) {
		t.Errorf("documented user-data writes %q, want the contract's %q", paths, want)
	}
}

func lookPath(t *testing.T, name, pkg string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Skipf("needs %s (Debian package %s)", name, pkg)
	}
	return p
}

func isRoot() bool { return os.Geteuid() == 0 }

// inNetns runs each argv in turn inside one new network namespace, so
// nftables changes stay there.
func inNetns(t *testing.T, argvs ...[]string) result {
	t.Helper()
	if !isRoot() {
		t.Skip("needs root (CAP_SYS_ADMIN) to create a network namespace for the nftables commands")
	}
	unshare := lookPath(t, "unshare", "util-linux")
	var script []string
	for _, argv := range argvs {
		q := make([]string, len(argv))
		for i, a := range argv {
			q[i] = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
		}
		script = append(script, strings.Join(q, " "))
	}
	return run(t, []string{unshare, "--net", "--", "sh", "-ec", strings.Join(script, "\n")}, nil)
}

// TestImageUnits runs the command lines the images' units run (the module
// with bootstrap.enable and the registry-cache profile) on the documented
// user-data: the bootstrap writes the configuration, the daemon's
// ExecStartPre validates it, the render unit writes the cache's files, and
// the files the other units read are where they look for them.
func TestImageUnits(t *testing.T) {
	needNix(t)
	root := t.TempDir()

	pools, err := os.ReadFile(filepath.Join(repo, "examples", "pools.json"))
	if err != nil {
		t.Fatal(err)
	}
	applyUserData(t, docsUserData(t), root, map[string][]byte{
		"/etc/fireactions/github-app-id":          []byte("123456"),
		"/etc/fireactions/github-private-key.pem": rsaKeyPEM(t),
		"/etc/fireactions/pools.json":             pools,
	})
	kernel := filepath.Join(root, "nix/store/kernel/vmlinux")
	writeFile(t, kernel, []byte("not really a kernel"), 0o644)

	configFile := filepath.Join(root, "run/fireactions/config.yaml")
	renderDir := filepath.Join(root, "run/fireactions/registry-cache")
	u := evalUnits(t, map[string]any{
		"fireactions":         fireactionsBin,
		"nft":                 "nft",
		"inputDir":            filepath.Join(root, "etc/fireactions"),
		"configFile":          configFile,
		"renderDir":           renderDir,
		"kernel":              kernel,
		"registryCacheEnable": true,
		"zotPort":             5001,
		"mirrors": map[string]string{
			"docker.io": "https://registry-1.docker.io",
			"quay.io":   "https://quay.io",
		},
	})

	// ConditionPathExists= of the bootstrap holds once cloud-init ran.
	for _, p := range u.Bootstrap.InputFiles {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("bootstrap condition: %v", err)
		}
	}

	// fireactions-bootstrap.service.
	mustRun(t, one(t, "bootstrap ExecStart", u.Bootstrap.ExecStart), u.Bootstrap.Environment)
	st, err := os.Stat(configFile)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o640 {
		t.Errorf("%s: mode %v, want 0640", configFile, st.Mode().Perm())
	}
	cfg, err := config.Load(configFile)
	if err != nil {
		t.Fatal(err)
	}
	// What the module passes through the environment arrived.
	if cfg.Pools[0].VM.Kernel != kernel {
		t.Errorf("pools[0].vm.kernel = %q, want KERNEL_PATH %q", cfg.Pools[0].VM.Kernel, kernel)
	}
	if !cfg.RegistryCache.Enabled || cfg.RegistryCache.Zot.Port != 5001 {
		t.Errorf("registry_cache: enabled %v, zot port %d; want true, 5001", cfg.RegistryCache.Enabled, cfg.RegistryCache.Zot.Port)
	}
	var mirrors []string
	for _, m := range cfg.RegistryCache.Mirrors {
		mirrors = append(mirrors, m.Registry+"="+m.URL)
	}
	if want := []string{"docker.io=https://registry-1.docker.io", "quay.io=https://quay.io"}; !slices.Equal(mirrors, want) {
		t.Errorf("registry_cache.mirrors = %q, want %q", mirrors, want)
	}
	// systemd's stop timeout outlasts the drain deadline the daemon will
	// actually use: the bootstrap's configuration does not carry the
	// module's drainTimeout, so the module may only use the default.
	if got := cfg.Server.DrainTimeout.Std(); got != time.Duration(u.DrainSeconds)*time.Second {
		t.Errorf("server.drain_timeout is %v, but TimeoutStopSec (%d s) was computed for %d s", got, u.Daemon.TimeoutStopSec, u.DrainSeconds)
	}
	if cfg.GitHub.AppID != 123456 || cfg.Pools[0].Runner.Organization != "your-org" {
		t.Errorf("github.app_id %d, pools[0].runner.organization %q: not the user-data's", cfg.GitHub.AppID, cfg.Pools[0].Runner.Organization)
	}

	// A second boot: the same inputs give the same file.
	first, _ := os.ReadFile(configFile)
	mustRun(t, one(t, "bootstrap ExecStart", u.Bootstrap.ExecStart), u.Bootstrap.Environment)
	if second, _ := os.ReadFile(configFile); !bytes.Equal(first, second) {
		t.Error("the bootstrap wrote a different file from the same inputs on the second run")
	}

	// fireactions.service's ExecStartPre.
	r := mustRun(t, one(t, "daemon ExecStartPre", u.Daemon.ExecStartPre), nil)
	if strings.TrimSpace(r.stdout) != "valid" {
		t.Errorf("validate said %q, want valid", r.stdout)
	}

	// fireactions-registry-cache-render.service, and what the Zot and
	// nftables units then read.
	mustRun(t, one(t, "render ExecStart", u.RegistryCacheRender.ExecStart), nil)
	for _, p := range []string{u.Zot.ConfigFile, u.Zot.StorageScript, u.Nftables.File} {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("a unit reads %s: %v", p, err)
		}
	}
	if _, err := os.Stat(u.Squid.RenderedConfig); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("%s exists without Squid (the bootstrap cannot enable it): %v", u.Squid.RenderedConfig, err)
	}
	var zot struct {
		HTTP struct{ Port string } `json:"http"`
	}
	data, err := os.ReadFile(u.Zot.ConfigFile)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(data, &zot); err != nil || zot.HTTP.Port != "5001" {
		t.Errorf("zot config.json: port %q (%v), want 5001", zot.HTTP.Port, err)
	}
	pre := u.Zot.ExecStartPre
	if len(pre) != 2 || pre[0][len(pre[0])-1] != u.Zot.StorageScript {
		t.Errorf("zot ExecStartPre %q does not run %s", pre, u.Zot.StorageScript)
	}
	// The storage script mounts a loop device, which a test cannot; its
	// syntax is checked with the shell the unit uses.
	mustRun(t, []string{pre[0][0], "-n", u.Zot.StorageScript}, nil)
	if got := one(t, "zot ExecStart", u.Zot.ExecStart); got[len(got)-1] != u.Zot.ConfigFile {
		t.Errorf("zot ExecStart %q does not read %s", got, u.Zot.ConfigFile)
	}

	// fireactions-registry-cache-nft.service: with Squid off the file only
	// clears the table.
	lookPath(t, "nft", "nftables")
	if u.Nftables.Table != registrycache.NftTable {
		t.Errorf("units.nix table %q, registrycache.NftTable %q", u.Nftables.Table, registrycache.NftTable)
	}
	r = inNetns(t, one(t, "nft ExecStart", u.Nftables.ExecStart), []string{"nft", "list", "tables"})
	if r.code != 0 || strings.Contains(r.stdout, u.Nftables.Table) {
		t.Errorf("loading the rules without Squid: %v", r)
	}

	// fireactions.service's ExecStart and fireactions-host-setup.service
	// change the host (a daemon, a bridge): their subcommands and flags are
	// checked.
	checkFlagsParse(t, one(t, "daemon ExecStart", u.Daemon.ExecStart))
	checkFlagsParse(t, one(t, "host-setup ExecStart", u.HostSetup.ExecStart))
	checkFlagsParse(t, one(t, "host-setup ExecStop", u.HostSetup.ExecStop))
}

// TestModuleConfigUnits checks the configuration the module writes when it
// is configured in Nix: nix/lib/settings.nix renders the option values,
// the build-time check and the daemon's ExecStartPre accept it, the CA
// oneshot's openssl command makes a CA the configuration accepts, and
// Squid parses the NixOS-side squid.conf around the rendered one.
func TestModuleConfigUnits(t *testing.T) {
	needNix(t)
	root := t.TempDir()

	var cfgJSON json.RawMessage
	nixEval(t, fmt.Sprintf(`(import ./nix/lib/settings.nix).toConfig (import ./internal/nixcheck/testdata/module-values.nix { root = %s; })`, nixString(root)), &cfgJSON)
	configFile := filepath.Join(root, "nix/store/fireactions-config.json")
	writeFile(t, configFile, cfgJSON, 0o444)

	squid := lookPath(t, "squid", "squid-openssl")
	openssl := lookPath(t, "openssl", "openssl")
	certgen := registrycache.SquidCertgen
	if _, err := os.Stat(certgen); err != nil {
		t.Skipf("needs %s and an ssl-bump capable Squid (Debian package squid-openssl)", certgen)
	}
	squidUser := "proxy" // Debian's Squid user
	squidConf := filepath.Join(root, "nix/store/fireactions-squid.conf")
	u := evalUnits(t, map[string]any{
		"fireactions":     fireactionsBin,
		"squid":           squid,
		"openssl":         openssl,
		"certgen":         certgen,
		"chown":           "chown",
		"configFile":      configFile,
		"renderDir":       filepath.Join(root, "run/fireactions/registry-cache"),
		"squidConfigFile": squidConf,
		"squidPidFile":    filepath.Join(root, "run/squid.pid"),
		"squidLogDir":     filepath.Join(root, "var/log/squid"),
		"squidUser":       squidUser,
		"squidCacheDir":   filepath.Join(root, "var/cache/squid"),
		"zotStorageDir":   filepath.Join(root, "var/lib/zot"),
		"caCertFile":      filepath.Join(root, "ca/ca.pem"),
		"caKeyFile":       filepath.Join(root, "ca/ca.key"),
	})

	// The build-time check: files named need not exist.
	r := mustRun(t, u.CheckConfig, nil)
	if strings.TrimSpace(r.stdout) != "valid" {
		t.Errorf("build-time check said %q", r.stdout)
	}
	cfg, err := config.Load(configFile)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Server.DrainTimeout.Std() != 45*time.Minute {
		t.Errorf("server.drain_timeout %v, want the module's drainTimeout 45m", cfg.Server.DrainTimeout.Std())
	}
	if cfg.Network.Bridge != "fa-test0" || cfg.Pools[1].VM.Kernel != filepath.Join(root, "kernel/other-vmlinux") ||
		cfg.Pools[0].VM.Kernel != filepath.Join(root, "kernel/vmlinux") || cfg.RegistryCache.Zot.GCInterval.Std() != 12*time.Hour {
		t.Errorf("the configuration does not carry the option values: %+v", cfg)
	}

	// At run time the files exist: the key and token (secrets outside the
	// store), the kernels, and the CA made by fireactions-squid-ca.
	writeFile(t, cfg.GitHub.PrivateKeyFile, rsaKeyPEM(t), 0o600)
	writeFile(t, cfg.Server.AuthTokenFile, []byte("token\n"), 0o600)
	for _, p := range cfg.Pools {
		writeFile(t, p.VM.Kernel, []byte("kernel"), 0o644)
	}
	if u.SquidCA.CertFile != cfg.RegistryCache.Squid.CACertFile || u.SquidCA.KeyFile != cfg.RegistryCache.Squid.CAKeyFile {
		t.Fatalf("the CA unit writes %s and %s, the configuration names %s and %s",
			u.SquidCA.CertFile, u.SquidCA.KeyFile, cfg.RegistryCache.Squid.CACertFile, cfg.RegistryCache.Squid.CAKeyFile)
	}
	if err := os.MkdirAll(filepath.Dir(u.SquidCA.CertFile), 0o700); err != nil {
		t.Fatal(err)
	}
	// UMask=0077, as in the unit.
	caArgv := one(t, "squid-ca ExecStart", u.SquidCA.ExecStart)
	mustRun(t, append([]string{"sh", "-c", `umask 077 && exec "$@"`, "sh"}, caArgv...), nil)
	if st, err := os.Stat(u.SquidCA.KeyFile); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("CA key %s: %v, mode %v; want 0600", u.SquidCA.KeyFile, err, st.Mode().Perm())
	}

	// fireactions.service's ExecStartPre, with every file checked.
	r = mustRun(t, one(t, "daemon ExecStartPre", u.Daemon.ExecStartPre), nil)
	if strings.TrimSpace(r.stdout) != "valid" {
		t.Errorf("validate said %q, want valid", r.stdout)
	}

	// The render unit, then the files the Squid, Zot and nftables units read.
	mustRun(t, one(t, "render ExecStart", u.RegistryCacheRender.ExecStart), nil)
	for _, p := range []string{u.Zot.ConfigFile, u.Zot.StorageScript, u.Nftables.File, u.Squid.RenderedConfig} {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("a unit reads %s: %v", p, err)
		}
	}
	rendered, err := os.ReadFile(u.Squid.RenderedConfig)
	if err != nil {
		t.Fatal(err)
	}
	wantHelper := fmt.Sprintf("sslcrtd_program %s -s %s -M 4MB", certgen, u.SquidCertDB.Path)
	if !strings.Contains(string(rendered), wantHelper) {
		t.Errorf("rendered squid.conf lacks %q: the certificate store unit creates %s", wantHelper, u.SquidCertDB.Path)
	}

	// The NixOS-side squid.conf includes the rendered one; Squid parses
	// both (and loads the CA).
	writeFile(t, squidConf, []byte(u.Squid.ConfigText), 0o444)
	if got := one(t, "squid ExecStart", u.Squid.ExecStart); got[len(got)-1] != squidConf {
		t.Errorf("squid ExecStart %q does not read %s", got, squidConf)
	}
	r = run(t, []string{squid, "-k", "parse", "-f", squidConf}, nil)
	if r.code != 0 || strings.Contains(r.stdout+r.stderr, "FATAL") {
		t.Errorf("squid -k parse of the unit's configuration: %v", r)
	}

	// fireactions-squid-certdb.service.
	certArgv := u.SquidCertDB.ExecStart
	if len(certArgv) != 2 {
		t.Fatalf("certdb ExecStart: %q", certArgv)
	}
	// /var/cache exists on a real host.
	if err := os.MkdirAll(filepath.Dir(u.SquidCertDB.Path), 0o755); err != nil {
		t.Fatal(err)
	}
	mustRun(t, certArgv[0], nil)
	if st, err := os.Stat(u.SquidCertDB.Path); err != nil || !st.IsDir() {
		t.Errorf("certificate store %s: %v", u.SquidCertDB.Path, err)
	}
	if isRoot() {
		mustRun(t, certArgv[1], nil)
	}

	// fireactions-registry-cache-nft.service: with bump domains the rules
	// redirect ports 80 and 443; ExecStop removes the table.
	lookPath(t, "nft", "nftables")
	nft := one(t, "nft ExecStart", u.Nftables.ExecStart)
	list := []string{nft[0], "list", "table", "ip", u.Nftables.Table}
	r = inNetns(t, nft, list, one(t, "nft ExecStop", u.Nftables.ExecStop), []string{nft[0], "list", "tables"})
	if r.code != 0 {
		t.Fatalf("nft unit commands: %v", r)
	}
	if !strings.Contains(r.stdout, "dport 443") || strings.Contains(r.stdout, "table ip "+u.Nftables.Table+"\n") {
		t.Errorf("nft: want the 443 redirect while loaded and no table after ExecStop:\n%s", r.stdout)
	}
}

// TestBootstrapConflicts: with the bootstrap, options it cannot carry are
// refused by the module's assertion, and the images set none.
func TestBootstrapConflicts(t *testing.T) {
	needNix(t)
	var images, full []string
	nixEval(t, `(import ./nix/lib/settings.nix).bootstrapConflicts (import ./internal/nixcheck/testdata/module-values.nix { root = "/r"; bootstrap = true; })`, &images)
	nixEval(t, `(import ./nix/lib/settings.nix).bootstrapConflicts (import ./internal/nixcheck/testdata/module-values.nix { root = "/r"; })`, &full)
	if len(images) != 0 {
		t.Errorf("the images' settings conflict with the bootstrap: %q", images)
	}
	for _, want := range []string{"pools", "github.appId", "github.privateKeyFile", "network.subnet", "registryCache.squid.enable", "dataDir", "log.level", "drainTimeout"} {
		if !slices.Contains(full, want) {
			t.Errorf("bootstrapConflicts misses %s: %q", want, full)
		}
	}
}

// TestDrainTimeout: the module's duration parser agrees with Go's, and
// systemd's stop timeout outlasts the drain.
func TestDrainTimeout(t *testing.T) {
	needNix(t)
	valid := []string{"30m", "1h30m", "90s", "2h", "1h0m5s", "05m", "0s"}
	var list []string
	for _, d := range valid {
		list = append(list, nixString(d))
	}
	var got []units
	nixEval(t, `map (d: import ./nix/lib/units.nix { fireactions = "f"; drainTimeout = d; }) [ `+strings.Join(list, " ")+` ]`, &got)
	for i, d := range valid {
		u := got[i]
		want, err := time.ParseDuration(d)
		if err != nil {
			t.Fatal(err)
		}
		if time.Duration(u.DrainSeconds)*time.Second != want {
			t.Errorf("drainTimeout %q: %d s, Go says %v", d, u.DrainSeconds, want)
		}
		if u.Daemon.TimeoutStopSec <= u.DrainSeconds || u.Daemon.TimeoutStopSec != u.DrainSeconds+u.StopMarginSeconds {
			t.Errorf("drainTimeout %q: TimeoutStopSec %d is not the drain plus the margin", d, u.Daemon.TimeoutStopSec)
		}
	}

	invalid := []string{"", "1.5h", "10ms", "30", "m", "1m1h"}
	list = nil
	for _, d := range invalid {
		list = append(list, nixString(d))
	}
	var ok []bool
	nixEval(t, `map (d: (builtins.tryEval (import ./nix/lib/units.nix { fireactions = "f"; drainTimeout = d; }).drainSeconds).success) [ `+strings.Join(list, " ")+` ]`, &ok)
	for i, d := range invalid {
		if ok[i] {
			t.Errorf("drainTimeout %q was accepted", d)
		}
	}
	_, err := nixEvalErr(`(import ./nix/lib/units.nix { fireactions = "f"; drainTimeout = "1.5h"; }).drainSeconds`)
	if err == nil || !strings.Contains(err.Error(), `drainTimeout: "1.5h" is not a duration`) {
		t.Errorf("want a message naming the option and the value, got %v", err)
	}
}

// TestUnitsComeFromUnitsNix: every Exec line of the module and profiles
// is built from nix/lib/units.nix, so the lines the tests run are the
// lines systemd runs.
func TestUnitsComeFromUnitsNix(t *testing.T) {
	execLine := regexp.MustCompile(`^\s*(Exec[A-Za-z]+)\s*=\s*(.*)$`)
	allowed := regexp.MustCompile(`^(execAll|privileged|ignoreFailure) units\.[A-Za-z.]+;$`)
	for _, dir := range []string{"nix/modules", "nix/profiles"} {
		files, err := filepath.Glob(filepath.Join(repo, dir, "*.nix"))
		if err != nil || len(files) == 0 {
			t.Fatalf("%s: %v", dir, err)
		}
		for _, f := range files {
			data, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			for i, line := range strings.Split(string(data), "\n") {
				m := execLine.FindStringSubmatch(line)
				if m == nil || m[1] == "ExecReload" {
					continue
				}
				if !allowed.MatchString(m[2]) {
					t.Errorf("%s:%d: %s is not taken from nix/lib/units.nix: %s", f, i+1, m[1], strings.TrimSpace(line))
				}
			}
		}
	}
}

// TestVendorHash: nix/packages/vendor-hash.json is either not filled in
// yet, or filled in for the go.sum in the tree. A vendor hash left over
// from an older go.sum would make Nix reuse the old dependencies silently
// when they are still in its store.
func TestVendorHash(t *testing.T) {
	data, err := os.ReadFile(filepath.Join(repo, "nix/packages/vendor-hash.json"))
	if err != nil {
		t.Fatal(err)
	}
	var h struct {
		VendorHash  string `json:"vendorHash"`
		GoSumSha256 string `json:"goSumSha256"`
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&h); err != nil {
		t.Fatalf("vendor-hash.json: %v", err)
	}
	if h.VendorHash == "" {
		if h.GoSumSha256 != "" {
			t.Error("vendor-hash.json: goSumSha256 is set but vendorHash is not")
		}
		return
	}
	if !regexp.MustCompile(`^sha256-[A-Za-z0-9+/]{43}=$`).MatchString(h.VendorHash) {
		t.Errorf("vendorHash %q is not an SRI sha256 hash", h.VendorHash)
	}
	sum, err := os.ReadFile(filepath.Join(repo, "go.sum"))
	if err != nil {
		t.Fatal(err)
	}
	got := sha256.Sum256(sum)
	if hex.EncodeToString(got[:]) != h.GoSumSha256 {
		t.Errorf("go.sum changed since vendorHash was computed (its sha256 is %s, vendor-hash.json says %s): "+
			"refresh vendorHash as docs/images.md describes", hex.EncodeToString(got[:]), h.GoSumSha256)
	}
}

// TestKernelFragments: the guest kernel fragments are well-formed and do
// not contradict each other; check-config.sh reports an option Kconfig
// dropped.
func TestKernelFragments(t *testing.T) {
	option := regexp.MustCompile(`^(CONFIG_[A-Z0-9_]+)=(y|m|[0-9]+|"[^"]*")$`)
	unset := regexp.MustCompile(`^# (CONFIG_[A-Z0-9_]+) is not set$`)
	common := filepath.Join(repo, "nix/kernel/guest.config")
	seen := map[string]string{}
	parse := func(f string) map[string]string {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		opts := map[string]string{}
		for i, line := range strings.Split(string(data), "\n") {
			switch {
			case option.MatchString(line):
				m := option.FindStringSubmatch(line)
				if _, dup := opts[m[1]]; dup {
					t.Errorf("%s:%d: %s set twice", f, i+1, m[1])
				}
				opts[m[1]] = m[2]
			case unset.MatchString(line):
				m := unset.FindStringSubmatch(line)
				opts[m[1]] = "n"
			case line == "" || strings.HasPrefix(line, "#"):
			default:
				t.Errorf("%s:%d: not an option line: %q", f, i+1, line)
			}
		}
		return opts
	}
	for k, v := range parse(common) {
		seen[k] = v
	}
	for _, arch := range []string{"x86_64", "aarch64"} {
		f := filepath.Join(repo, "nix/kernel/guest-"+arch+".config")
		for k, v := range parse(f) {
			if w, ok := seen[k]; ok && w != v {
				t.Errorf("%s sets %s=%s, guest.config %s", f, k, v, w)
			}
		}
	}
	for _, want := range []string{"CONFIG_VIRTIO_MMIO", "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES", "CONFIG_VIRTIO_BLK", "CONFIG_VIRTIO_NET",
		"CONFIG_VIRTIO_VSOCKETS", "CONFIG_EXT4_FS", "CONFIG_OVERLAY_FS", "CONFIG_SERIAL_8250_CONSOLE", "CONFIG_BLK_DEV_INITRD"} {
		if seen[want] != "y" {
			t.Errorf("guest.config: %s must be y (built in)", want)
		}
	}

	// check-config.sh against a .config missing one option and changing
	// another.
	dir := t.TempDir()
	frag := filepath.Join(dir, "frag")
	writeFile(t, frag, []byte("CONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\n"), 0o644)
	good := filepath.Join(dir, "good")
	writeFile(t, good, []byte("CONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\nCONFIG_D=y\n"), 0o644)
	bad := filepath.Join(dir, "bad")
	writeFile(t, bad, []byte("CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=y\n"), 0o644)
	script := filepath.Join(repo, "nix/kernel/check-config.sh")
	if r := run(t, []string{"sh", script, good, frag}, nil); r.code != 0 {
		t.Errorf("check-config.sh refused a matching .config: %v", r)
	}
	r := run(t, []string{"sh", script, bad, frag}, nil)
	if r.code != 1 || !strings.Contains(r.stderr, "want CONFIG_B=y") || !strings.Contains(r.stderr, "want # CONFIG_C is not set") {
		t.Errorf("check-config.sh did not report both differences: %v", r)
	}
}
