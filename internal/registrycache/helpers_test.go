package registrycache

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/fireactions/fireactions/internal/config"
)

const gw = "10.200.0.1"

// testConfig is the default configuration with the cache on, one extra
// registry that has a port, and two pools (one with its own user-data).
func testConfig(t testing.TB) *config.Config {
	t.Helper()
	cfg := &config.Config{
		RegistryCache: config.RegistryCache{Enabled: true},
		Pools: []config.Pool{
			{Name: "default"},
			{Name: "custom", VM: config.VM{UserData: "#cloud-config\nwrite_files: []\n"}},
		},
	}
	cfg.ApplyDefaults()
	cfg.RegistryCache.Mirrors = append(cfg.RegistryCache.Mirrors,
		config.Mirror{Registry: "registry.local:5000", URL: "https://registry.local:5000"})
	return cfg
}

// testCA writes a fresh CA certificate and key under dir and returns their
// paths.
func testCA(t testing.TB, dir string) (certFile, keyFile string) {
	t.Helper()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "fireactions test cache CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	pkcs8, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certFile = filepath.Join(dir, "ca.pem")
	keyFile = filepath.Join(dir, "ca.key")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: pkcs8}), 0o600); err != nil {
		t.Fatal(err)
	}
	return certFile, keyFile
}

// withBump turns on Squid with TLS interception for two domains, a test
// CA and every path inside dir.
func withBump(t testing.TB, cfg *config.Config, dir string) {
	t.Helper()
	sq := &cfg.RegistryCache.Squid
	sq.Enabled = true
	sq.BumpDomains = []string{".npmjs.org", "example.com"}
	sq.CACertFile, sq.CAKeyFile = testCA(t, dir)
	sq.CacheDir = filepath.Join(dir, "cache")
}

func fileMap(g GuestConfig) map[string]GuestFile {
	m := map[string]GuestFile{}
	for _, f := range g.Files {
		m[f.Path] = f
	}
	return m
}

func mustGuest(t testing.TB, cfg *config.Config) GuestConfig {
	t.Helper()
	g, err := Guest(cfg)
	if err != nil {
		t.Fatalf("Guest: %v", err)
	}
	return g
}

func mustHost(t testing.TB, cfg *config.Config) map[string][]byte {
	t.Helper()
	h, err := Host(cfg)
	if err != nil {
		t.Fatalf("Host: %v", err)
	}
	return h
}
