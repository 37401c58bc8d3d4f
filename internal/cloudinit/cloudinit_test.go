package cloudinit

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"io/fs"
	"os"
	"os/exec"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"
)

// tricky holds contents that naive YAML writers or shell-style expansion
// have mangled before.
var tricky = []string{
	"#!/bin/sh\necho \"$HOME\" '${USER}' `id -u` $(hostname)\n",
	"no trailing newline",
	"two trailing newlines\n\n",
	"three\n\n\n",
	"\n",
	"\n\n",
	"\nstarts with a newline\n",
	"   starts with spaces\n  and keeps them\n",
	"\tstarts with a tab\n",
	"trailing spaces   \nand tabs\t\n",
	"line with only spaces follows\n      \nend\n",
	"- looks: like yaml\n? key\n: value\n--- \n...\n",
	"# not a comment\n  # nor this\n",
	"quotes ' \" \\ and unicode é 日本 🙂\n",
	"key: \"value\" # toml\n[host.\"http://10.0.0.1:5000/v2/ghcr.io\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
	"carriage\r\nreturns\r\n",
	"control \x01 \x1b[0m characters\n",
	"nel \u0085 and line separator \u2028\n",
	"invalid utf-8 \xff\xfe\n",
	"bom \ufeff inside\n",
	"",
}

func render(t *testing.T, c Config) []byte {
	t.Helper()
	out, err := c.Render()
	if err != nil {
		t.Fatalf("Render: %v", err)
	}
	return out
}

type writeFile struct {
	Path        string `yaml:"path"`
	Owner       string `yaml:"owner"`
	Permissions string `yaml:"permissions"`
	Encoding    string `yaml:"encoding"`
	Content     string `yaml:"content"`
}

// decode reads the document the way cloud-init does: YAML, then base64 for
// entries that say encoding: b64.
func decode(t *testing.T, doc []byte) []writeFile {
	t.Helper()
	var top map[string][]writeFile
	dec := yaml.NewDecoder(bytes.NewReader(doc))
	dec.KnownFields(true)
	if err := dec.Decode(&top); err != nil {
		t.Fatalf("output is not YAML: %v\n%s", err, doc)
	}
	if len(top) != 1 {
		t.Fatalf("top-level keys = %d, want only write_files", len(top))
	}
	files, ok := top["write_files"]
	if !ok {
		t.Fatalf("no write_files key:\n%s", doc)
	}
	for i := range files {
		if files[i].Encoding == "b64" {
			raw, err := base64.StdEncoding.DecodeString(files[i].Content)
			if err != nil {
				t.Fatalf("bad base64 in %s: %v", files[i].Path, err)
			}
			files[i].Content = string(raw)
		}
	}
	return files
}

func trickyConfig() Config {
	var c Config
	for i, s := range tricky {
		c.WriteFiles = append(c.WriteFiles, File{
			Path:    "/etc/fireactions/test-" + string(rune('a'+i)),
			Content: s,
		})
	}
	return c
}

func TestRenderRoundTripsContentExactly(t *testing.T) {
	c := trickyConfig()
	out := render(t, c)
	if !bytes.HasPrefix(out, []byte("#cloud-config\n")) {
		t.Fatalf("output does not start with #cloud-config:\n%s", out)
	}
	files := decode(t, out)
	if len(files) != len(c.WriteFiles) {
		t.Fatalf("got %d files, want %d", len(files), len(c.WriteFiles))
	}
	for i, want := range c.WriteFiles {
		got := files[i]
		if got.Path != want.Path {
			t.Errorf("file %d: path %q, want %q", i, got.Path, want.Path)
		}
		if got.Content != want.Content {
			t.Errorf("%s: content %q, want %q", want.Path, got.Content, want.Content)
		}
		if got.Owner != "root:root" || got.Permissions != "0644" {
			t.Errorf("%s: owner %q permissions %q, want root:root 0644", want.Path, got.Owner, got.Permissions)
		}
	}
}

func TestRenderUsesLiteralBlocksForText(t *testing.T) {
	out := render(t, trickyConfig())
	var root yaml.Node
	if err := yaml.Unmarshal(out, &root); err != nil {
		t.Fatal(err)
	}
	list := root.Content[0].Content[1]
	for i, item := range list.Content {
		var content, encoding *yaml.Node
		for j := 0; j < len(item.Content); j += 2 {
			switch item.Content[j].Value {
			case "content":
				content = item.Content[j+1]
			case "encoding":
				encoding = item.Content[j+1]
			}
		}
		text := tricky[i]
		switch {
		case text == "":
			if content.Value != "" || encoding != nil {
				t.Errorf("empty content rendered as %q", content.Value)
			}
		case literalSafe(text):
			if content.Style != yaml.LiteralStyle || encoding != nil {
				t.Errorf("content %q: style %v, want a literal block", text, content.Style)
			}
		default:
			if encoding == nil || encoding.Value != "b64" {
				t.Errorf("content %q: YAML cannot carry it literally, want encoding b64", text)
			}
		}
	}
	// A reader sees shell text as it is written.
	if !bytes.Contains(out, []byte("    #!/bin/sh\n    echo \"$HOME\" '${USER}' `id -u` $(hostname)\n")) {
		t.Errorf("shell script not written verbatim in a literal block:\n%s", out)
	}
}

// TestRenderReadByPyYAML parses the output with PyYAML, the parser
// cloud-init itself uses.
func TestRenderReadByPyYAML(t *testing.T) {
	py, err := exec.LookPath("python3")
	if err != nil {
		t.Skip("needs python3 with PyYAML (Debian python3-yaml), the YAML parser cloud-init uses")
	}
	if err := exec.Command(py, "-c", "import yaml").Run(); err != nil {
		t.Skip("needs PyYAML (Debian python3-yaml), the YAML parser cloud-init uses")
	}
	c := trickyConfig()
	doc := filepathIn(t, "user-data", render(t, c))
	script := `
import base64, json, sys, yaml
with open(sys.argv[1], "rb") as f:
    raw = f.read()
assert raw.startswith(b"#cloud-config\n")
d = yaml.safe_load(raw)
assert list(d.keys()) == ["write_files"], d.keys()
out = []
for e in d["write_files"]:
    c = e["content"]
    if e.get("encoding") == "b64":
        c = base64.b64decode(c)
    else:
        c = c.encode("utf-8")
    out.append({"path": e["path"], "owner": e["owner"], "permissions": e["permissions"], "content": base64.b64encode(c).decode()})
json.dump(out, sys.stdout)
`
	raw, err := exec.Command(py, "-c", script, doc).Output()
	if err != nil {
		t.Fatalf("PyYAML could not read the document: %v", err)
	}
	var got []struct{ Path, Owner, Permissions, Content string }
	if err := json.Unmarshal(raw, &got); err != nil {
		t.Fatal(err)
	}
	if len(got) != len(c.WriteFiles) {
		t.Fatalf("PyYAML saw %d files, want %d", len(got), len(c.WriteFiles))
	}
	for i, want := range c.WriteFiles {
		content, _ := base64.StdEncoding.DecodeString(got[i].Content)
		if got[i].Path != want.Path || string(content) != want.Content || got[i].Permissions != "0644" || got[i].Owner != "root:root" {
			t.Errorf("PyYAML read %+v (content %q), want path %s content %q", got[i], content, want.Path, want.Content)
		}
	}
}

func filepathIn(t *testing.T, name string, data []byte) string {
	t.Helper()
	p := t.TempDir() + "/" + name
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestRenderIsDeterministic(t *testing.T) {
	a := render(t, trickyConfig())
	b := render(t, trickyConfig())
	if !bytes.Equal(a, b) {
		t.Fatal("two renders of the same config differ")
	}
}

func TestRenderPermissionsAndOwner(t *testing.T) {
	out := render(t, Config{WriteFiles: []File{
		{Path: "/etc/a", Content: "x\n", Permissions: 0o600, Owner: "runner:docker"},
		{Path: "/etc/b", Content: "y\n", Permissions: 0o755},
	}})
	files := decode(t, out)
	if files[0].Permissions != "0600" || files[0].Owner != "runner:docker" {
		t.Errorf("got %+v", files[0])
	}
	if files[1].Permissions != "0755" || files[1].Owner != "root:root" {
		t.Errorf("got %+v", files[1])
	}
}

func TestRenderEmpty(t *testing.T) {
	out := render(t, Config{})
	if string(out) != "#cloud-config\nwrite_files: []\n" {
		t.Fatalf("got %q", out)
	}
	if len(decode(t, out)) != 0 {
		t.Fatal("want no files")
	}
}

func TestRenderOnlyWriteFiles(t *testing.T) {
	out := render(t, trickyConfig())
	var top map[string]any
	if err := yaml.Unmarshal(out, &top); err != nil {
		t.Fatal(err)
	}
	for k := range top {
		if k != "write_files" {
			t.Errorf("unexpected top-level key %q", k)
		}
	}
	for _, banned := range []string{"runcmd", "bootcmd"} {
		if _, ok := top[banned]; ok {
			t.Errorf("output has %s", banned)
		}
	}
}

func TestRenderRejectsBadFiles(t *testing.T) {
	cases := []struct {
		name string
		file File
		want string
	}{
		{"empty path", File{Content: "x"}, "path is empty"},
		{"relative path", File{Path: "etc/x"}, "must be absolute"},
		{"unclean path", File{Path: "/etc/../x"}, "must be absolute and clean"},
		{"newline in path", File{Path: "/etc/x\ny"}, "cannot hold"},
		{"setuid", File{Path: "/x", Permissions: fs.ModeSetuid | 0o755}, "more than permission bits"},
		{"bad owner", File{Path: "/x", Owner: "root:root:root"}, "owner"},
		{"owner with space", File{Path: "/x", Owner: "ro ot"}, "owner"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Config{WriteFiles: []File{tc.file}}.Render()
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want it to mention %q", err, tc.want)
			}
			if !strings.Contains(err.Error(), "write_files[0]") {
				t.Errorf("err = %v, want it to name write_files[0]", err)
			}
		})
	}
	_, err := Config{WriteFiles: []File{{Path: "/x"}, {Path: "/x"}}}.Render()
	if err == nil || !strings.Contains(err.Error(), "listed twice") {
		t.Fatalf("duplicate path: err = %v", err)
	}
}
