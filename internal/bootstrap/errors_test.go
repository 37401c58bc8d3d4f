package bootstrap

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestErrors runs the bootstrap on the seed fixture with one input broken
// per case, and checks every expected problem line (the input directory is
// written as DIR).
func TestErrors(t *testing.T) {
	ecKey := func() string {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		der, err := x509.MarshalPKCS8PrivateKey(k)
		if err != nil {
			t.Fatal(err)
		}
		return string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}))
	}()
	pool := func(extra string) string {
		return `[{"name": "p", "runner": {"organization": "acme"}` + extra + `}]`
	}

	for _, tc := range []struct {
		name   string
		files  map[string]string // content to write; "" deletes the file
		env    func(*Inputs)
		want   []string // every line of the error, in order (see below)
		absent []string // must not appear anywhere in the error
	}{
		{
			name:  "missing app id",
			files: map[string]string{FileAppID: ""},
			want:  []string{"DIR/github-app-id: missing required file; write the GitHub App's numeric ID into it"},
		},
		{
			name:  "missing key and pools",
			files: map[string]string{FilePrivateKey: "", FilePools: ""},
			want: []string{
				"DIR/github-private-key.pem: missing required file; write the GitHub App's PEM private key into it",
				"DIR/pools.json: missing required file; write the pool definitions into it as a JSON array (see docs/operations.md)",
			},
		},
		{
			name:  "non-numeric app id",
			files: map[string]string{FileAppID: "abc\n"},
			want:  []string{`DIR/github-app-id: "abc" is not a number; write the GitHub App's numeric ID`},
		},
		{
			name:  "zero app id",
			files: map[string]string{FileAppID: "0"},
			want:  []string{"DIR/github-app-id: must be a positive number, got 0"},
		},
		{
			name:  "empty app id",
			files: map[string]string{FileAppID: " \n"},
			want:  []string{"DIR/github-app-id: empty; write the GitHub App's numeric ID into it"},
		},
		{
			name:   "key is not PEM",
			files:  map[string]string{FilePrivateKey: "ghp_notakey-but-a-secret\n"},
			want:   []string{"DIR/github-private-key.pem: not a PEM private key; want the GitHub App's key as downloaded: -----BEGIN RSA PRIVATE KEY----- (PKCS #1) or -----BEGIN PRIVATE KEY----- (PKCS #8)"},
			absent: []string{"ghp_notakey"},
		},
		{
			name:   "PEM block of garbage",
			files:  map[string]string{FilePrivateKey: "-----BEGIN RSA PRIVATE KEY-----\nc2VjcmV0LWJ5dGVz\n-----END RSA PRIVATE KEY-----\n"},
			want:   []string{"DIR/github-private-key.pem: the RSA PRIVATE KEY block does not hold a valid private key; want the GitHub App's key as downloaded: -----BEGIN RSA PRIVATE KEY----- (PKCS #1) or -----BEGIN PRIVATE KEY----- (PKCS #8)"},
			absent: []string{"c2VjcmV0LWJ5dGVz"},
		},
		{
			name:  "EC key",
			files: map[string]string{FilePrivateKey: ecKey},
			want:  []string{"DIR/github-private-key.pem: the key is *ecdsa.PrivateKey, not RSA; GitHub App keys are RSA; want the GitHub App's key as downloaded: -----BEGIN RSA PRIVATE KEY----- (PKCS #1) or -----BEGIN PRIVATE KEY----- (PKCS #8)"},
		},
		{
			name:  "encrypted key",
			files: map[string]string{FilePrivateKey: "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n"},
			want:  []string{"DIR/github-private-key.pem: the private key is encrypted; the daemon needs it unencrypted, as GitHub issues it"},
		},
		{
			name:  "invalid JSON",
			files: map[string]string{FilePools: "[\n  {\"name\": \"p\",\n   \"maxRunners\": 3 \"minRunners\": 1}\n]\n"},
			want:  []string{`DIR/pools.json:3:20: invalid JSON: invalid character '"' after object key:value pair`},
		},
		{
			name:  "truncated JSON",
			files: map[string]string{FilePools: "[{\"name\": \"p\"},\n"},
			want:  []string{"DIR/pools.json:2:1: invalid JSON: unexpected end of JSON input"},
		},
		{
			name:  "trailing data",
			files: map[string]string{FilePools: pool("") + "\n]"},
			want:  []string{"DIR/pools.json:2:1: invalid JSON: invalid character ']' after top-level value"},
		},
		{
			name:  "empty file",
			files: map[string]string{FilePools: "\n"},
			want:  []string{"DIR/pools.json:1:1: empty file; want a JSON array of pools"},
		},
		{
			name:  "not an array",
			files: map[string]string{FilePools: `{"name": "p"}`},
			want:  []string{"DIR/pools.json:1:1: want a JSON array of pools, got an object"},
		},
		{
			name:  "empty pools",
			files: map[string]string{FilePools: " [ ]"},
			want:  []string{"DIR/pools.json:1:2: no pools; list at least one pool"},
		},
		{
			name:  "duplicate names",
			files: map[string]string{FilePools: `[{"name": "a", "runner": {"organization": "o"}}, {"name": "a", "runner": {"organization": "o"}}]`},
			want:  []string{`DIR/pools.json:1:59: [1].name: duplicate pool name "a", already used by [0]`},
		},
		{
			name:  "duplicate default names",
			files: map[string]string{FilePools: "[{\"runner\": {\"organization\": \"o\"}},\n {\"runner\": {\"organization\": \"o\"}}]"},
			want:  []string{`DIR/pools.json:2:2: [1].name: duplicate pool name "default", already used by [0]; a pool without a name is called "default"`},
		},
		{
			name:  "min greater than max",
			files: map[string]string{FilePools: pool(`, "minRunners": 5, "maxRunners": 2`)},
			want:  []string{"DIR/pools.json:1:66: [0].minRunners: minRunners (5) is greater than maxRunners (2)"},
		},
		{
			name:  "min greater than default max",
			files: map[string]string{FilePools: pool(`, "minRunners": 11`)},
			want:  []string{"DIR/pools.json:1:66: [0].minRunners: minRunners (11) is greater than maxRunners (10); maxRunners defaults to 10"},
		},
		{
			name:  "unknown fields",
			files: map[string]string{FilePools: "[{\"name\": \"p\", \"runner\": {\"organization\": \"o\",\n \"lables\": [\"x\"]}, \"firecracker\": {\"memSizeMiB\": 512}, \"zone\": 1}]"},
			want: []string{
				"DIR/pools.json:2:2: [0].runner.lables: unknown field; did you mean labels?",
				"DIR/pools.json:2:36: [0].firecracker.memSizeMiB: unknown field; did you mean memSizeMib?",
				"DIR/pools.json:2:56: [0].zone: unknown field; known fields are name, maxRunners, minRunners, runner, firecracker",
			},
		},
		{
			name:  "snake_case key",
			files: map[string]string{FilePools: pool(`, "max_runners": 2`)},
			want:  []string{"DIR/pools.json:1:52: [0].max_runners: unknown field; did you mean maxRunners?"},
		},
		{
			name: "wrong types",
			files: map[string]string{FilePools: `[{"name": 7, "maxRunners": "ten", "minRunners": 1.5,
 "runner": {"organization": "o", "labels": "x", "groupId": "3"},
 "firecracker": {"vcpuCount": true, "metadata": {"team": 1}, "diskSize": [], "backend": null}},
 {"name": "q", "runner": "o", "firecracker": {"diskSize": "huge"}},
 {"name": "r", "runner": {"organization": "o", "labels": ["a", 2]}, "firecracker": {"vcpuCount": 99999999999}}]`},
			want: []string{
				"DIR/pools.json:1:11: [0].name: want a string, got 7",
				`DIR/pools.json:1:28: [0].maxRunners: want an integer, got "ten"`,
				"DIR/pools.json:1:49: [0].minRunners: want an integer, got 1.5",
				`DIR/pools.json:2:44: [0].runner.labels: want an array of strings, got "x"`,
				`DIR/pools.json:2:60: [0].runner.groupId: want an integer, got "3"`,
				"DIR/pools.json:3:31: [0].firecracker.vcpuCount: want an integer, got true",
				"DIR/pools.json:3:58: [0].firecracker.metadata.team: want a string, got 1 (quote it)",
				`DIR/pools.json:3:74: [0].firecracker.diskSize: want a size such as "20GiB", got an array`,
				`DIR/pools.json:4:26: [1].runner: want an object, got "o"`,
				`DIR/pools.json:4:59: [1].firecracker.diskSize: "huge" is not a size; write a number with a unit such as 512MiB or 20GiB`,
				"DIR/pools.json:5:64: [2].runner.labels[1]: want a string, got 2",
				"DIR/pools.json:5:98: [2].firecracker.vcpuCount: 99999999999 is out of range",
			},
		},
		{
			name:  "duplicate JSON key",
			files: map[string]string{FilePools: `[{"name": "a", "name": "b"}]`},
			want:  []string{`DIR/pools.json:1:16: duplicate key "name"`},
		},
		{
			// Problems found by config validation are restated at the
			// pools.json field that produced the value.
			name:  "validation problems located in pools.json",
			files: map[string]string{FilePools: "[{\"name\": \"Bad Name\",\n \"runner\": {\"labels\": [\"a,b\"]},\n \"firecracker\": {\"vcpuCount\": 64, \"backend\": \"kvm\"}}]"},
			want: []string{
				`DIR/pools.json:1:11: [0].name: "Bad Name" is not a valid pool name`,
				"DIR/pools.json:2:12: [0].runner.organization: required: set exactly one of organization, repository (owner/name) or enterprise",
				`DIR/pools.json:2:24: [0].runner.labels[0]: "a,b" contains a comma`,
				"DIR/pools.json:3:31: [0].firecracker.vcpuCount: 64 is out of range; use 1 to 32",
				`DIR/pools.json:3:46: [0].firecracker.backend: "kvm" is not allowed; use one of auto, firecracker, qemu`,
			},
		},
		{
			name:  "reserved metadata key",
			files: map[string]string{FilePools: pool(`, "firecracker": {"metadata": {"ok": "1", "fireactions/runner_id": "x"}}`)},
			want:  []string{`DIR/pools.json:1:117: [0].firecracker.metadata["fireactions/runner_id"]: reserved`},
		},
		{
			name:  "public bind address without a token",
			files: map[string]string{FileBindAddress: "0.0.0.0:8080\n"},
			want:  []string{`DIR/bind-address: "0.0.0.0:8080" accepts connections from other hosts…; to set it, write the token into DIR/auth-token`},
		},
		{
			name:  "empty auth token",
			files: map[string]string{FileBindAddress: "0.0.0.0:8080\n", FileAuthToken: "\n"},
			want:  []string{"DIR/auth-token: empty; write the API bearer token into it, or delete the file"},
		},
		{
			name:  "bad log level",
			files: map[string]string{FileLogLevel: "loud"},
			want:  []string{`DIR/log-level: "loud" is not allowed; use one of debug, info, warn, error`},
		},
		{
			name: "bad environment",
			env: func(in *Inputs) {
				in.RegistryCacheEnabled = "maybe"
				in.RegistryCacheGateway = "gateway.local"
				in.ZotPort = "0"
				in.KernelPath = "vmlinux"
			},
			want: []string{
				`KERNEL_PATH (--kernel-path): "vmlinux" is not an absolute path`,
				`REGISTRY_CACHE_ENABLED (--registry-cache-enabled): "maybe" is not a boolean; use true or false`,
				`REGISTRY_CACHE_GATEWAY (--registry-cache-gateway): "gateway.local" is not an IP address; use the VM bridge address, e.g. 10.200.0.1`,
				`ZOT_PORT (--zot-port): "0" is not a port; use 1-65535`,
			},
		},
		{
			name: "ZOT_MIRRORS not JSON",
			env:  func(in *Inputs) { in.RegistryCacheEnabled, in.ZotMirrors = "true", `{"docker.io": }` },
			want: []string{`ZOT_MIRRORS (--zot-mirrors): 1:15: invalid JSON: invalid character '}' looking for beginning of value; want a JSON object such as {"docker.io": {"url": "https://registry-1.docker.io"}, "ghcr.io": {}}`},
		},
		{
			name: "ZOT_MIRRORS not an object",
			env:  func(in *Inputs) { in.ZotMirrors = `["docker.io"]` },
			want: []string{`ZOT_MIRRORS (--zot-mirrors): want a JSON object such as {"docker.io": {"url": "https://registry-1.docker.io"}, "ghcr.io": {}}, got an array`},
		},
		{
			name: "ZOT_MIRRORS bad entries",
			env: func(in *Inputs) {
				in.ZotMirrors = `{"ghcr.io": {"uri": "https://ghcr.io"}, "quay.io": 5, "gcr.io": {"url": 1}}`
			},
			want: []string{`ZOT_MIRRORS (--zot-mirrors): ["ghcr.io"].uri: unknown field; did you mean url?; ["quay.io"]: want an object with a url or a URL string, got 5; ["gcr.io"].url: want a string, got 1`},
		},
		{
			name: "ZOT_MIRRORS bad URL",
			env:  func(in *Inputs) { in.ZotMirrors = `{"ghcr.io": "ftp://ghcr.io"}` },
			want: []string{`ZOT_MIRRORS (--zot-mirrors): ["ghcr.io"]: `},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := seedInputs(t)
			for name, content := range tc.files {
				if content == "" {
					if err := os.Remove(filepath.Join(dir, name)); err != nil {
						t.Fatal(err)
					}
					continue
				}
				writeFile(t, dir, name, content)
			}
			in := Inputs{Dir: dir}
			if tc.env != nil {
				tc.env(&in)
			}
			cfg, err := Generate(in)
			if err == nil {
				t.Fatalf("Generate accepted the input: %+v", cfg)
			}
			var ps Problems
			if !errors.As(err, &ps) {
				t.Fatalf("error is %T, want Problems: %v", err, err)
			}
			got := strings.Split(strings.ReplaceAll(err.Error(), dir, "DIR"), "\n")
			if len(got) != len(tc.want) {
				t.Errorf("got %d problems, want %d:\n%s", len(got), len(tc.want), strings.Join(got, "\n"))
			}
			for i := range min(len(got), len(tc.want)) {
				// want is a prefix of the problem, or prefix…suffix where
				// the middle is config validation's wording.
				prefix, suffix, _ := strings.Cut(tc.want[i], "…")
				if !strings.HasPrefix(got[i], prefix) || !strings.HasSuffix(got[i], suffix) {
					t.Errorf("problem %d:\n got: %s\nwant: %s…", i, got[i], tc.want[i])
				}
			}
			assertNoKey(t, err.Error())
			for _, s := range tc.absent {
				if strings.Contains(err.Error(), s) {
					t.Errorf("error reveals %q:\n%s", s, err)
				}
			}
		})
	}
}

// assertNoKey fails if any line of the fixture key's body is in s.
func assertNoKey(t *testing.T, s string) {
	t.Helper()
	for _, line := range strings.Split(fixtureKey(t), "\n") {
		if len(line) > 20 && !strings.HasPrefix(line, "-----") && strings.Contains(s, line) {
			t.Fatalf("output reveals the private key:\n%s", s)
		}
	}
}

func TestMissingInputDir(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "nope")
	_, err := Generate(Inputs{Dir: dir})
	want := dir + ": no such file or directory; pass the directory cloud-init writes the inputs to with --input-dir"
	if err == nil || err.Error() != want {
		t.Errorf("error = %v, want %s", err, want)
	}
}
