package config

import (
	"bytes"
	"encoding/json"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"
)

// TestSecretRedaction prints a configuration holding a key every way a
// program might and checks the key never shows.
func TestSecretRedaction(t *testing.T) {
	key := pkcs1PEM(t)
	c := validConfig(t)
	c.GitHub.PrivateKeyFile = ""
	c.GitHub.PrivateKey = Secret(key)
	s := c.GitHub.PrivateKey

	var outputs []string
	for _, verb := range []string{"%v", "%+v", "%#v", "%s", "%q", "%x", "%X", "%d", "%10.3s"} {
		outputs = append(outputs,
			fmt.Sprintf(verb, s), fmt.Sprintf(verb, &s),
			fmt.Sprintf(verb, c.GitHub), fmt.Sprintf(verb, *c), fmt.Sprintf(verb, c),
			fmt.Sprintf(verb, []Secret{s}), fmt.Sprintf(verb, map[string]Secret{"k": s}))
	}
	outputs = append(outputs, fmt.Sprint(s), fmt.Sprintln(c.GitHub), s.String(), s.GoString())
	for _, h := range []func(*bytes.Buffer) slog.Handler{
		func(b *bytes.Buffer) slog.Handler { return slog.NewTextHandler(b, nil) },
		func(b *bytes.Buffer) slog.Handler { return slog.NewJSONHandler(b, nil) },
	} {
		var buf bytes.Buffer
		log := slog.New(h(&buf))
		log.Info("loaded", "key", s, "github", c.GitHub, "config", c, slog.Any("secret", s), slog.Group("g", "key", s))
		outputs = append(outputs, buf.String())
	}
	for _, v := range []any{s, c.GitHub, c} {
		j, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		outputs = append(outputs, string(j))
	}
	body := keyBody(key)
	for _, out := range outputs {
		for _, line := range body {
			if strings.Contains(out, line) {
				t.Fatalf("key material printed:\n%s", out)
			}
		}
		if strings.Contains(out, "BEGIN") {
			t.Fatalf("key header printed:\n%s", out)
		}
	}
	if !strings.Contains(fmt.Sprintf("%+v", c.GitHub), "PrivateKey:[redacted]") {
		t.Errorf("%%+v: %+v", c.GitHub)
	}
	if j, _ := json.Marshal(c.GitHub); !strings.Contains(string(j), `"PrivateKey":"[redacted]"`) {
		t.Errorf("json: %s", j)
	}
	if fmt.Sprint(Secret("")) != "" {
		t.Error("an empty secret should print as empty, so 'not set' stays visible")
	}
	// YAML is the one encoding that keeps the value: the bootstrap writes
	// the key into the daemon's configuration with it.
	y, err := yaml.Marshal(c.GitHub)
	if err != nil {
		t.Fatal(err)
	}
	var back GitHub
	if err := yaml.Unmarshal(y, &back); err != nil || back.PrivateKey != s {
		t.Errorf("yaml round trip lost the key: %v", err)
	}
}

// TestSecretsNotInProblems feeds malformed keys through Parse and checks
// the problems name the field without quoting it.
func TestSecretsNotInProblems(t *testing.T) {
	key := pkcs1PEM(t)
	body := keyBody(key)
	bodyOnly := strings.Join(body, "\n") + "\n" // the key without its PEM lines
	base := replace(t, baseYAML, "  private_key_file: /etc/fireactions/github-private-key.pem\n", "")
	indent := func(s, by string) string {
		return by + strings.ReplaceAll(strings.TrimSuffix(s, "\n"), "\n", "\n"+by) + "\n"
	}
	tests := []struct {
		name, github string
		path, msg    string
	}{
		{"body without PEM lines", "  private_key: |\n" + indent(bodyOnly, "    "), "github.private_key", "not a PEM private key"},
		{"corrupted body", "  private_key: |\n" + indent(strings.Replace(key, body[2], strings.Repeat("A", len(body[2])), 1), "    "),
			"github.private_key", "does not parse as a PKCS#1 key"},
		{"a token instead of a key", "  private_key: ghp_16C7e42F292c6912E7710c838347Ae178B4a\n", "github.private_key", "not a PEM private key"},
		{"a number", "  private_key: 1234567890123\n", "github.private_key", "not a PEM private key"},
		{"as a list", "  private_key:\n" + indent("- "+body[0]+"\n- "+body[1]+"\n", "    "), "github.private_key", "want a string, got a list"},
		{"as a mapping", "  private_key: {" + body[0] + ": " + body[1] + "}\n", "github.private_key", "want a string, got a mapping"},
		{"as a tagged value", "  private_key: !!binary " + body[0] + "\n", "github.private_key", "want a string, got a value tagged !!binary"},
		{"key with a stray second key", "  private_key: |\n" + indent(key+key, "    "), "github.private_key", "extra data after the PEM key"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			doc := replace(t, base, "  app_id: 123456\n", "  app_id: 123456\n"+tt.github)
			_, err := Parse([]byte(doc))
			ps := problemsOf(t, err)
			if len(ps) != 1 || ps[0].Path != tt.path || !strings.Contains(ps[0].Message, tt.msg) {
				t.Fatalf("got %v, want %s: ...%s...", err, tt.path, tt.msg)
			}
			for _, secret := range append(body, "ghp_16C7e42F292c6912E7710c838347Ae178B4a", "1234567890123") {
				if strings.Contains(err.Error(), secret) {
					t.Fatalf("problem quotes the secret: %v", err)
				}
			}
		})
	}
}

func TestByteSize(t *testing.T) {
	for _, tt := range []struct {
		in   string
		want ByteSize
		str  string
	}{
		{"4096", 4096, "4KiB"},
		{"20GiB", 20 << 30, "20GiB"},
		{"512M", 512 << 20, "512MiB"},
		{"1GB", 1000 * 1000 * 1000, "1000000000"},
		{"1.5GiB", 3 << 29, "1536MiB"},
		{" 2 TiB ", 2 << 40, "2TiB"},
		{"9007199254740993", 9007199254740993, "9007199254740993"}, // exact beyond float precision
		{"0", 0, "0"},
		{"100B", 100, "100"},
	} {
		got, err := ParseByteSize(tt.in)
		if err != nil || got != tt.want || got.String() != tt.str {
			t.Errorf("ParseByteSize(%q) = %d (%s), %v; want %d (%s)", tt.in, got, got, err, tt.want, tt.str)
		}
	}
	for _, bad := range []string{"", "GiB", "-1GiB", "lots", "1e400", "NaN", "1 XB", "9999999999TiB"} {
		if _, err := ParseByteSize(bad); err == nil {
			t.Errorf("ParseByteSize(%q) succeeded", bad)
		}
	}
}

func TestDuration(t *testing.T) {
	var d Duration
	if err := d.UnmarshalYAML(&yaml.Node{Kind: yaml.ScalarNode, Value: "90s"}); err != nil || d.Std() != 90*time.Second {
		t.Errorf("90s: %v, %v", d, err)
	}
	if err := d.UnmarshalYAML(&yaml.Node{Kind: yaml.ScalarNode, Value: "daily"}); err == nil || !strings.Contains(err.Error(), "write e.g. 90s") {
		t.Errorf("daily: %v", err)
	}
	if v, _ := Duration(36 * time.Hour).MarshalYAML(); v != "36h0m0s" {
		t.Errorf("MarshalYAML = %v", v)
	}
}
