package cli

import (
	"bytes"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func runCLI(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errb bytes.Buffer
	code = Main(args, &out, &errb)
	return code, out.String(), errb.String()
}

// writeConfig writes a configuration whose key, token and kernel files
// exist in a temporary directory, and returns its path and the directory.
func writeConfig(t *testing.T, edit func(string) string) (string, string) {
	t.Helper()
	dir := t.TempDir()
	key, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)})
	for name, content := range map[string][]byte{"app.pem": keyPEM, "token": []byte("t0ken\n"), "vmlinux": []byte("\x7fELF")} {
		if err := os.WriteFile(filepath.Join(dir, name), content, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	doc := `server:
  address: 0.0.0.0:8080
  auth_token_file: DIR/token
github:
  app_id: 42
  private_key_file: DIR/app.pem
pools:
  - name: default
    max_runners: 2
    runner:
      organization: acme
    vm:
      kernel: DIR/vmlinux
`
	if edit != nil {
		doc = edit(doc)
	}
	doc = strings.ReplaceAll(doc, "DIR", dir)
	path := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(path, []byte(doc), 0o600); err != nil {
		t.Fatal(err)
	}
	return path, dir
}

func TestValidateValid(t *testing.T) {
	path, _ := writeConfig(t, nil)
	code, out, errOut := runCLI(t, "validate", "-c", path)
	if code != 0 || out != "valid\n" || errOut != "" {
		t.Fatalf("exit %d, stdout %q, stderr %q", code, out, errOut)
	}
}

func TestValidateReportsEveryProblem(t *testing.T) {
	path, _ := writeConfig(t, func(doc string) string {
		doc = strings.Replace(doc, "  auth_token_file: ", "  auth_tokn_file: ", 1)
		doc = strings.Replace(doc, "max_runners: 2", "max_runners: 2\n    min_runners: 3", 1)
		doc = strings.Replace(doc, "      organization: acme", "      organization: acme\n      lables: [gpu]", 1)
		return doc + "  - name: default\n    runner: {repository: acme}\n    vm: {vcpus: two, kernel: DIR/missing}\n"
	})
	code, out, errOut := runCLI(t, "validate", "-c", path)
	want := `server.address: "0.0.0.0:8080" accepts connections from other hosts but server.auth_token_file is not set; set auth_token_file to a file holding a bearer token, or bind to 127.0.0.1:8080 (line 2)
server.auth_tokn_file: unknown field; did you mean auth_token_file? (line 3)
pools[0].min_runners: 3 is more than max_runners (2) (line 10)
pools[0].runner.lables: unknown field; did you mean labels? (line 13)
pools[1].name: "default" is already the name of pools[0]; pool names must be unique (line 16)
pools[1].runner.repository: "acme" is not a repository; write owner/name (line 17)
pools[1].vm.vcpus: want an integer, got "two" (line 18)
pools[1].vm.kernel: DIR/missing does not exist (line 18)
pools[1].max_runners: required: the most runners the pool may run at once, at least 1
`
	want = strings.ReplaceAll(want, "DIR", filepath.Dir(path))
	if code != 1 || out != want || errOut != "" {
		t.Fatalf("exit %d, stderr %q, stdout:\n%s\nwant:\n%s", code, errOut, out, want)
	}
}

func TestValidateCheckFiles(t *testing.T) {
	path, dir := writeConfig(t, func(doc string) string {
		return strings.Replace(doc, "/vmlinux", "/vmlinux-not-installed-yet", 1)
	})
	code, out, _ := runCLI(t, "validate", "-c", path)
	if want := "pools[0].vm.kernel: " + filepath.Join(dir, "vmlinux-not-installed-yet") + " does not exist (line 13)\n"; code != 1 || out != want {
		t.Fatalf("exit %d, stdout %q, want %q", code, out, want)
	}
	code, out, _ = runCLI(t, "validate", "-c", path, "--check-files=false")
	if code != 0 || out != "valid\n" {
		t.Fatalf("--check-files=false: exit %d, stdout %q", code, out)
	}
}

func TestValidateNeverPrintsTheKey(t *testing.T) {
	const fake = "MIIEpAIBAAKCAQEA0Z3VS5JJcds3xfn/ygWyF8PbnGy0AHB7MhgHcTz6sE2I2yPB"
	path, _ := writeConfig(t, func(doc string) string {
		doc = strings.Replace(doc, "  private_key_file: ", "  private_key: |\n    "+fake+"\n  private_key_file: ", 1)
		return doc
	})
	code, out, errOut := runCLI(t, "validate", "-c", path)
	if code != 1 || !strings.Contains(out, "github.private_key: set either private_key or private_key_file, not both") {
		t.Fatalf("exit %d, stdout %q", code, out)
	}
	path, _ = writeConfig(t, func(doc string) string {
		return strings.Replace(doc, "  private_key_file: ", "  private_key: |\n    "+fake+"\n  x_key_file: ", 1)
	})
	code, out2, errOut2 := runCLI(t, "validate", "-c", path)
	if code != 1 || !strings.Contains(out2, "github.private_key: not a PEM private key") {
		t.Fatalf("exit %d, stdout %q", code, out2)
	}
	for _, s := range []string{out, errOut, out2, errOut2} {
		if strings.Contains(s, fake) || strings.Contains(s, fake[:20]) {
			t.Fatalf("key material printed: %q", s)
		}
	}
}

func TestValidateUnreadable(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "nope.yaml")
	code, out, errOut := runCLI(t, "validate", "-c", missing)
	if code != 1 || out != "" || !strings.Contains(errOut, "read config: open "+missing+": no such file or directory") {
		t.Fatalf("exit %d, stdout %q, stderr %q", code, out, errOut)
	}
	code, _, errOut = runCLI(t, "validate", "extra-arg")
	if code != 1 || !strings.Contains(errOut, "unknown command") && !strings.Contains(errOut, "accepts 0 arg") {
		t.Fatalf("extra argument: exit %d, stderr %q", code, errOut)
	}
}
