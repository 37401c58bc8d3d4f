package config

import (
	"bytes"
	"fmt"
	"os"
	"reflect"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"
)

// TestFullConfigGolden parses a configuration that sets every field to a
// non-default value, checks each field, and checks that Marshal gives the
// file back byte for byte (it is in canonical form).
func TestFullConfigGolden(t *testing.T) {
	data, err := os.ReadFile("testdata/full.yaml")
	if err != nil {
		t.Fatal(err)
	}
	c := mustParse(t, string(data))
	want := &Config{
		DataDir: "/var/lib/fireactions",
		Server:  Server{Address: "0.0.0.0:8080", AuthTokenFile: "/etc/fireactions/api-token", DrainTimeout: Duration(45 * time.Minute)},
		Metrics: Metrics{Enabled: true, Address: "127.0.0.1:8081"},
		Log:     Log{Level: "debug", Format: "json"},
		GitHub: GitHub{AppID: 123456, PrivateKeyFile: "/etc/fireactions/github-private-key.pem",
			APIURL: "https://github.example.com/api/v3/", TokenFile: "/etc/fireactions/github-token",
			WebhookSecretFile: "/etc/fireactions/webhook-secret"},
		Network: Network{Name: "fireactions", ConfDir: "/etc/cni/conf.d", BinDirs: []string{"/usr/lib/cni", "/opt/cni/bin"},
			Bridge: "fireactions0", Subnet: "10.200.0.0/24", Gateway: "10.200.0.1", MTU: 1500, DNS: []string{"1.1.1.1", "9.9.9.9"}},
		RegistryCache: RegistryCache{
			Enabled: true, Gateway: "10.200.0.1",
			Zot: Zot{Port: 5000, StorageDir: "/var/lib/zot", MaxSize: 100 << 30, GCInterval: Duration(12 * time.Hour)},
			Mirrors: []Mirror{
				{Registry: "docker.io", URL: "https://registry-1.docker.io"},
				{Registry: "ghcr.io", URL: "https://ghcr.io"},
				{Registry: "registry.example.com:5000", URL: "http://registry.example.com:5000"},
			},
			Squid: Squid{Enabled: true, HTTPPort: 3128, HTTPSPort: 3129, MemoryCache: 512 << 20, DiskCache: 20 << 30,
				MaxObjectSize: 2 << 30, CacheDir: "/var/cache/squid", BumpDomains: []string{".githubusercontent.com"},
				CACertFile: "/etc/fireactions/squid-ca.pem", CAKeyFile: "/etc/fireactions/squid-ca.key"},
		},
		Pools: []Pool{
			{
				Name: "default", Scaling: ScalingScaleSet, MinRunners: 1, MaxRunners: 10,
				Runner: Runner{NamePrefix: "runner", Image: "ghcr.io/thpham/fireactions-images/ubuntu-24.04:latest",
					ImagePullPolicy: PullIfNotPresent, Organization: "your-org", Group: "linux-runners",
					Labels: []string{"self-hosted", "fireactions", "linux"}},
				Timeouts: Timeouts{Boot: Duration(3 * time.Minute), IdleTTL: Duration(30 * time.Minute), MaxJob: Duration(12 * time.Hour)},
				VM: VM{Mode: VMModeApp, Backend: BackendFirecracker, VCPUs: 2, MemoryMiB: 4096, SMT: true, CPUTemplate: "T2",
					Kernel: "/var/lib/fireactions/kernels/vmlinux", KernelModules: "/var/lib/fireactions/kernels/modules",
					KernelArgs: "console=ttyS0 reboot=k panic=1 pci=off", DiskSize: 20 << 30,
					Metadata: map[string]string{"team": "infra", "motd": "line one\nline two\n"},
					UserData: "#cloud-config\nwrite_files:\n  - path: /etc/motd\n    content: |\n      hello\n"},
			},
			{
				Name: "repo-qemu", Scaling: ScalingLabels, MaxRunners: 2, Network: "fireactions",
				Timeouts: Timeouts{Boot: Duration(10 * time.Minute), IdleTTL: Duration(time.Hour), MaxJob: Duration(2 * time.Hour)},
				Runner: Runner{NamePrefix: "hello", Image: "ghcr.io/octo/runner:2.321.0", ImagePullPolicy: PullAlways,
					Repository: "octo/hello", Labels: []string{"qemu"}},
				VM: VM{Mode: VMModeSystem, Backend: BackendQEMU, VCPUs: 4, MemoryMiB: 8192, Kernel: "/var/lib/fireactions/kernels/vmlinux",
					KernelArgs: "console=ttyS0", DiskSize: 50 << 30},
			},
		},
	}
	if !reflect.DeepEqual(c, want) {
		t.Errorf("parsed config differs:\n got %#v\nwant %#v", c, want)
	}
	out, err := Marshal(c)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(out, data) {
		t.Errorf("Marshal is not canonical; got:\n%s", out)
	}
}

// TestRoundTripInlineKey checks the bootstrap's case: an inline PEM key and
// multi-line strings are written as block literals, with the real key, and
// read back to an equal configuration.
func TestRoundTripInlineKey(t *testing.T) {
	key := pkcs1PEM(t)
	c := validConfig(t)
	c.GitHub.PrivateKeyFile = ""
	c.GitHub.PrivateKey = Secret(key)
	c.Pools[0].VM.Metadata = map[string]string{"motd": "one\ntwo\n", "no-newline": "a\nb", "plain": "x"}
	c.Pools[0].VM.UserData = "#cloud-config\nwrite_files:\n  - path: /etc/x\n    content: |\n      hi\n"
	c.Pools[1].VM.UserData = "#!/bin/sh\r\necho windows line ends\r\n" // not literal-safe: stays quoted
	if err := c.Validate(ValidateOptions{}); err != nil {
		t.Fatal(err)
	}
	out, err := Marshal(c)
	if err != nil {
		t.Fatal(err)
	}
	text := string(out)
	for _, want := range []string{
		"  private_key: |\n    -----BEGIN RSA PRIVATE KEY-----\n",
		"        motd: |\n          one\n          two\n",
		"        no-newline: |-\n          a\n          b\n",
		"      user_data: |\n        #cloud-config\n        write_files:\n",
		`      user_data: "#!/bin/sh\r\necho windows line ends\r\n"`,
	} {
		if !strings.Contains(text, want) {
			t.Errorf("Marshal output lacks %q:\n%s", want, text)
		}
	}
	for _, line := range keyBody(key) {
		if !strings.Contains(text, "    "+line+"\n") {
			t.Fatalf("the key is not written verbatim as a block literal (line %q missing)", line)
		}
	}
	back := mustParse(t, text)
	if !reflect.DeepEqual(back, c) {
		t.Errorf("round trip changed the config:\n got %#v\nwant %#v", back, c)
	}
	if back.GitHub.PrivateKey.Reveal() != key {
		t.Error("the key changed in the round trip")
	}
	again, err := Marshal(back)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(again, out) {
		t.Errorf("second Marshal differs:\n%s\n---\n%s", out, again)
	}
}

func TestLiteralSafe(t *testing.T) {
	for _, tt := range []struct {
		s    string
		want bool
	}{
		{"one line", false},
		{"a\nb\n", true},
		{"a\nb", true},
		{"a\n\tb\n", true},
		{"a \nb\n", false},      // trailing space
		{"  a\nb\n", false},     // leading space on the first line
		{"a\r\nb\r\n", false},   // carriage return
		{"a\u2028b\n", false},   // Unicode line separator
		{"a\x01\nb", false},     // control character
		{"a\nb\u00a0\n", false}, // no-break space is not printable ASCII space
	} {
		if got := literalSafe(tt.s); got != tt.want {
			t.Errorf("literalSafe(%q) = %v, want %v", tt.s, got, tt.want)
		}
		// Whatever the style, the value must come back unchanged.
		out, err := yaml.Marshal(struct {
			V Secret `yaml:"v"`
		}{Secret(tt.s)})
		if err != nil {
			t.Fatal(err)
		}
		var back struct {
			V string `yaml:"v"`
		}
		if err := yaml.Unmarshal(out, &back); err != nil || back.V != tt.s {
			t.Errorf("%q does not round-trip through %q: %q, %v", tt.s, out, back.V, err)
		}
	}
}

// TestRoundTripAwkwardStrings writes strings that trip YAML emitters (line
// separators, leading spaces, document markers, trailing blank lines) as
// metadata values and user-data, and reads them back unchanged.
func TestRoundTripAwkwardStrings(t *testing.T) {
	awkward := []string{
		"", " ", "\n", "\n\n", "a\n\n\n", "  indented\nfirst line\n", "x\n  indented second\n",
		"---\n...\n", "# not a comment\n", "a: b\n- c\n", "tab\tinside\n", "trailing space \nx\n",
		"crlf\r\n", "nel\u0085x\n", "ls\u2028x\n", "bom\ufeffx\n", "nbsp\u00a0\n", "ctl\x07\n", "quote\"'\n",
		"yes", "null", "~", "0x10", "1e3", "2001-12-14", "@at", "*star", "&amp", "!bang", "%pct", "|pipe", ">gt",
		"emoji 🔥\nline\n", "\\backslash\n",
	}
	c := validConfig(t)
	c.Pools[0].VM.Metadata = map[string]string{}
	for i, s := range awkward {
		c.Pools[0].VM.Metadata[fmt.Sprintf("k%02d", i)] = s
	}
	c.Pools[1].VM.UserData = "#!/bin/sh\n" + strings.Join(awkward, "")
	c.Pools[0].Runner.Labels = []string{"yes", "null", "0x10", "~x", "@a"}
	if err := c.Validate(ValidateOptions{}); err != nil {
		t.Fatal(err)
	}
	out, err := Marshal(c)
	if err != nil {
		t.Fatal(err)
	}
	back := mustParse(t, string(out))
	if !reflect.DeepEqual(back, c) {
		for k, v := range c.Pools[0].VM.Metadata {
			if back.Pools[0].VM.Metadata[k] != v {
				t.Errorf("metadata %s: %q came back as %q", k, v, back.Pools[0].VM.Metadata[k])
			}
		}
		t.Fatalf("round trip changed the config; yaml:\n%s", out)
	}
}
