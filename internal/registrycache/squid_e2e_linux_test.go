//go:build linux

package registrycache

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"testing"
	"time"
)

// originTLS returns a server certificate for example.com and other.test
// signed by a fresh "public" CA, and that CA's PEM.
func originTLS(t *testing.T) (tls.Certificate, []byte) {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(10), Subject: pkix.Name{CommonName: "test origin CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(11), Subject: pkix.Name{CommonName: "example.com"},
		DNSNames:  []string{"example.com", "other.test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key},
		pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})
}

// TestSquidInterceptsCachesAndBumpsOnlyOptInDomains runs the real Squid
// with the rendered squid.conf behind the rendered nftables rules. From the
// VM namespace: plain HTTP is intercepted and the second fetch is served
// from Squid's cache; HTTPS to a bump domain is decrypted (the VM sees a
// certificate from the cache's CA); HTTPS to any other domain is spliced
// (the VM sees the origin's own certificate).
func TestSquidInterceptsCachesAndBumpsOnlyOptInDomains(t *testing.T) {
	needSquid(t, true)
	if os.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces and run squid")
	}
	proxy, err := user.Lookup("proxy")
	if err != nil {
		t.Skip("needs the proxy user Debian's squid runs as")
	}
	uid, _ := strconv.Atoi(proxy.Uid)
	gid, _ := strconv.Atoi(proxy.Gid)

	// Squid drops to the proxy user, which must reach every path.
	dir, err := os.MkdirTemp("", "farc-squid-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755)

	cfg := testConfig(t)
	withBump(t, cfg, dir)
	cfg.RegistryCache.Squid.BumpDomains = []string{"example.com"}
	cfg.RegistryCache.Squid.DiskCache = 64 << 20
	cfg.RegistryCache.Squid.MaxObjectSize = 16 << 20
	host := mustHost(t, cfg)
	n := newTestNet(t, host[HostNftables])

	originCert, originCA := originTLS(t)
	originCAFile := filepath.Join(dir, "origin-ca.pem")
	os.WriteFile(originCAFile, originCA, 0o644)

	// Test-only additions: keep Squid's state in dir, trust the test
	// origin's CA upstream, and resolve the test names from a hosts file
	// (Squid checks that an intercepted connection's destination is an
	// address of the name the client asked for; no DNS leaves the test).
	hostsFile := filepath.Join(dir, "hosts")
	os.WriteFile(hostsFile, []byte("203.0.113.10 example.com other.test\n"), 0o644)
	conf := append(append([]byte{}, host[HostSquidConf]...), []byte(
		"pid_filename "+dir+"/squid.pid\n"+
			"cache_log "+dir+"/cache.log\n"+
			"access_log "+dir+"/access.log\n"+
			"netdb_filename none\n"+
			"coredump_dir "+dir+"\n"+
			"hosts_file "+hostsFile+"\n"+
			"dns_nameservers 127.0.0.1\n"+
			"dns_timeout 2 seconds\n"+
			"tls_outgoing_options cafile="+originCAFile+"\n")...)
	confFile := filepath.Join(dir, "squid.conf")
	os.WriteFile(confFile, conf, 0o644)

	sq := cfg.RegistryCache.Squid
	if out, err := exec.Command(SquidCertgen, "-c", "-s", SquidCertDB(sq.CacheDir), "-M", "4MB").CombinedOutput(); err != nil {
		t.Fatalf("init certificate db: %v\n%s", err, out)
	}
	os.MkdirAll(sq.CacheDir, 0o755)
	filepath.Walk(dir, func(p string, _ os.FileInfo, err error) error {
		if err == nil {
			os.Lchown(p, uid, gid)
		}
		return nil
	})
	if out, err := exec.Command("squid", "-z", "-N", "-f", confFile).CombinedOutput(); err != nil {
		t.Fatalf("squid -z: %v\n%s", err, out)
	}

	// Origins on 203.0.113.10, inside the host namespace.
	var hits atomic.Int32
	originHTTP := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		w.Header().Set("Cache-Control", "public, max-age=3600")
		w.Header().Set("Last-Modified", time.Now().Add(-time.Hour).UTC().Format(http.TimeFormat))
		io.WriteString(w, "package bytes")
	})}
	go originHTTP.Serve(listen(t, n.host, "203.0.113.10:80"))
	t.Cleanup(func() { originHTTP.Close() })
	originHTTPS := &http.Server{
		Handler:   http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "tls origin") }),
		TLSConfig: &tls.Config{Certificates: []tls.Certificate{originCert}},
	}
	go originHTTPS.ServeTLS(listen(t, n.host, "203.0.113.10:443"), "", "")
	t.Cleanup(func() { originHTTPS.Close() })

	var squidLog bytes.Buffer
	squid := exec.Command("ip", "netns", "exec", n.host, "squid", "-N", "-f", confFile)
	squid.Stdout, squid.Stderr = &squidLog, &squidLog
	if err := squid.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { squid.Wait(); close(exited) }()
	t.Cleanup(func() {
		squid.Process.Signal(os.Interrupt)
		select {
		case <-exited:
		case <-time.After(20 * time.Second):
			squid.Process.Kill()
			<-exited
		}
	})
	// Ready when both intercept ports accept connections.
	deadline := time.Now().Add(60 * time.Second)
	for _, port := range []string{":3128", ":3129"} {
		for {
			c, err := dial(context.Background(), n.host, "tcp4", gw+port)
			if err == nil {
				c.Close()
				break
			}
			select {
			case <-exited:
				cacheLog, _ := os.ReadFile(filepath.Join(dir, "cache.log"))
				t.Fatalf("squid exited: %s\n%s\n%s", squid.ProcessState, squidLog.String(), cacheLog)
			default:
			}
			if time.Now().After(deadline) {
				cacheLog, _ := os.ReadFile(filepath.Join(dir, "cache.log"))
				t.Fatalf("squid never listened on %s: %v\n%s\n%s", port, err, squidLog.String(), cacheLog)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}

	fromVM := func(tlsCfg *tls.Config) *http.Client {
		return &http.Client{Transport: &http.Transport{
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				return dial(ctx, n.vm, "tcp4", addr)
			},
			TLSClientConfig:   tlsCfg,
			DisableKeepAlives: true,
		}}
	}
	get := func(c *http.Client, url, host string) (*http.Response, string) {
		t.Helper()
		req, _ := http.NewRequest("GET", url, nil)
		if host != "" {
			req.Host = host
		}
		resp, err := c.Do(req)
		if err != nil {
			cacheLog, _ := os.ReadFile(filepath.Join(dir, "cache.log"))
			t.Fatalf("GET %s from the VM: %v\n%s", url, err, cacheLog)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp, string(body)
	}

	// HTTP: intercepted, and the second fetch comes from Squid's cache.
	plain := fromVM(nil)
	for i := 0; i < 2; i++ {
		resp, body := get(plain, "http://203.0.113.10/pool/main/p/pkg.deb", "")
		if resp.StatusCode != 200 || body != "package bytes" {
			t.Fatalf("fetch %d: %d %q", i, resp.StatusCode, body)
		}
		if resp.Header.Get("Via") == "" {
			t.Errorf("fetch %d did not go through Squid (no Via header)", i)
		}
	}
	if got := hits.Load(); got != 1 {
		t.Errorf("origin saw %d requests for two fetches, want 1 (the second from Squid's cache)", got)
	}

	// HTTPS to a bump domain: the VM talks TLS with Squid, which presents
	// a certificate from the cache's CA.
	ours := x509.NewCertPool()
	caPEM, _ := os.ReadFile(sq.CACertFile)
	ours.AppendCertsFromPEM(caPEM)
	resp, body := get(fromVM(&tls.Config{RootCAs: ours, ServerName: "example.com"}), "https://203.0.113.10/", "example.com")
	if body != "tls origin" {
		t.Errorf("bumped fetch body %q", body)
	}
	if issuer := resp.TLS.PeerCertificates[0].Issuer.CommonName; issuer != "fireactions test cache CA" {
		t.Errorf("bumped site presented a certificate issued by %q, want the cache's CA", issuer)
	}

	// HTTPS to any other domain is spliced: the VM sees the origin itself.
	theirs := x509.NewCertPool()
	theirs.AppendCertsFromPEM(originCA)
	resp, body = get(fromVM(&tls.Config{RootCAs: theirs, ServerName: "other.test"}), "https://203.0.113.10/", "other.test")
	if body != "tls origin" {
		t.Errorf("spliced fetch body %q", body)
	}
	if issuer := resp.TLS.PeerCertificates[0].Issuer.CommonName; issuer != "test origin CA" {
		t.Errorf("spliced site presented a certificate issued by %q, want the origin's own", issuer)
	}
}
