package config

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"strings"
	"sync"
	"testing"
)

// baseYAML is a valid configuration that the decoding tests break one
// piece at a time. It names its key file rather than inlining a key, so it
// parses without touching the file system.
const baseYAML = `server:
  address: 127.0.0.1:8080
metrics:
  enabled: true
  address: 127.0.0.1:8081
log:
  level: info
  format: text
github:
  app_id: 123456
  private_key_file: /etc/fireactions/github-private-key.pem
pools:
  - name: default
    min_runners: 1
    max_runners: 10
    runner:
      name_prefix: runner
      image: ghcr.io/thpham/fireactions-images/ubuntu-24.04:latest
      image_pull_policy: IfNotPresent
      organization: your-org
      labels: [self-hosted, fireactions, linux]
    vm:
      vcpus: 2
      memory_mib: 4096
      kernel_args: console=ttyS0 reboot=k panic=1 pci=off
  - name: big
    max_runners: 2
    runner:
      repository: octo/hello
    vm:
      vcpus: 8
      memory_mib: 16384
      disk_size: 50GiB
      metadata:
        team: infra
`

var (
	keysOnce sync.Once
	rsaKey   *rsa.PrivateKey
	ecKey    *ecdsa.PrivateKey
)

func genKeys(t testing.TB) {
	t.Helper()
	keysOnce.Do(func() {
		var err error
		// 1024 bits keeps the tests fast; the validator does not look at
		// the size.
		if rsaKey, err = rsa.GenerateKey(rand.Reader, 1024); err != nil {
			panic(err)
		}
		if ecKey, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader); err != nil {
			panic(err)
		}
	})
}

// pkcs1PEM is a freshly generated RSA key in the PEM form GitHub hands out.
func pkcs1PEM(t testing.TB) string {
	genKeys(t)
	return string(pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(rsaKey)}))
}

func pkcs8PEM(t testing.TB, key any) string {
	t.Helper()
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}))
}

// keyBody is the base64 part of a PEM key: the part that must never be
// echoed.
func keyBody(pemText string) []string {
	var out []string
	for _, l := range strings.Split(pemText, "\n") {
		if l != "" && !strings.HasPrefix(l, "-----") {
			out = append(out, l)
		}
	}
	return out
}

// mustParse parses a configuration that must be valid.
func mustParse(t testing.TB, doc string) *Config {
	t.Helper()
	c, err := Parse([]byte(doc))
	if err != nil {
		t.Fatalf("Parse: %v\n%s", err, doc)
	}
	return c
}

// replace swaps one occurrence of old in s, failing if old is absent so a
// table entry cannot silently test the unchanged base.
func replace(t testing.TB, s, old, new string) string {
	t.Helper()
	if !strings.Contains(s, old) {
		t.Fatalf("fixture does not contain %q", old)
	}
	return strings.Replace(s, old, new, 1)
}

func problemsOf(t testing.TB, err error) Problems {
	t.Helper()
	if err == nil {
		t.Fatal("want problems, got none")
	}
	ps, ok := err.(Problems)
	if !ok {
		t.Fatalf("want Problems, got %T: %v", err, err)
	}
	return ps
}
