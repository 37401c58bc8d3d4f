package mmds_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fireactions/fireactions/internal/config"
	"github.com/fireactions/fireactions/internal/hostnet"
	"github.com/fireactions/fireactions/internal/metadata"
	"github.com/fireactions/fireactions/internal/network"
	"github.com/fireactions/fireactions/internal/network/mmds"
	"github.com/fireactions/fireactions/internal/network/netnstest"
)

func TestMain(m *testing.M) { netnstest.Main(m) }

func handler(t *testing.T, id string, v metadata.Version) http.Handler {
	t.Helper()
	doc, err := metadata.New(metadata.Input{InstanceID: id, UserData: "#cloud-config\n"})
	if err != nil {
		t.Fatal(err)
	}
	h, err := metadata.NewHandler(doc, v)
	if err != nil {
		t.Fatal(err)
	}
	return h
}

func get(s http.Handler, remote, path string, hdr http.Header) (int, string) {
	r := httptest.NewRequest(http.MethodGet, "http://169.254.169.254"+path, nil)
	r.RemoteAddr = remote
	for k, v := range hdr {
		r.Header[k] = v
	}
	w := httptest.NewRecorder()
	s.ServeHTTP(w, r)
	return w.Code, w.Body.String()
}

func TestDispatchBySourceAddress(t *testing.T) {
	s := mmds.NewServer(nil)
	a, b := netip.MustParseAddr("10.0.0.2"), netip.MustParseAddr("10.0.0.3")
	if err := s.Register("vm-a", a, handler(t, "vm-a", metadata.V1)); err != nil {
		t.Fatal(err)
	}
	if err := s.Register("vm-b", b, handler(t, "vm-b", metadata.V1)); err != nil {
		t.Fatal(err)
	}
	if code, body := get(s, "10.0.0.2:40000", "/latest/meta-data/instance-id", nil); code != 200 || body != "vm-a" {
		t.Errorf("A: %d %q", code, body)
	}
	if code, body := get(s, "10.0.0.3:40000", "/latest/meta-data/instance-id", nil); code != 200 || body != "vm-b" {
		t.Errorf("B: %d %q", code, body)
	}
	// Headers never change who is asking.
	if _, body := get(s, "10.0.0.2:40000", "/latest/meta-data/instance-id", http.Header{"X-Forwarded-For": {"10.0.0.3"}, "X-Real-Ip": {"10.0.0.3"}}); body != "vm-a" {
		t.Errorf("A with forged headers got %q", body)
	}
	if code, _ := get(s, "10.0.0.9:40000", "/latest/meta-data/instance-id", nil); code != http.StatusNotFound {
		t.Errorf("unknown address: %d, want 404", code)
	}
	// An address belongs to one VM at a time.
	if err := s.Register("vm-c", a, handler(t, "vm-c", metadata.V1)); err == nil {
		t.Error("registered a second VM on A's address")
	}
	s.Unregister("vm-c", a) // not the holder: no effect
	if _, body := get(s, "10.0.0.2:40000", "/latest/meta-data/instance-id", nil); body != "vm-a" {
		t.Errorf("A after a foreign unregister: %q", body)
	}
	s.Unregister("vm-a", a)
	if code, _ := get(s, "10.0.0.2:40000", "/latest/meta-data/instance-id", nil); code != http.StatusNotFound {
		t.Errorf("A after unregister: %d", code)
	}
}

// TestOverTheBridge runs the service as deployed: host setup on a bridge
// in the test namespace, the server on the gateway's metadata port, and
// two VM stand-ins asking http://169.254.169.254.
func TestOverTheBridge(t *testing.T) {
	netnstest.Require(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	const br, gw = "fammds0", "10.220.0.1"
	var cfg config.Config
	cfg.Network = config.Network{Bridge: br, Subnet: "10.220.0.0/24", Gateway: gw, ConfDir: filepath.Join(t.TempDir(), "conf.d")}
	cfg.ApplyDefaults()
	opts := hostnet.OptionsFromConfig(&cfg, t.TempDir())
	if _, err := hostnet.Setup(ctx, opts); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _, _ = hostnet.Teardown(context.Background(), opts, true) })

	s := mmds.NewServer(nil)
	ln, err := mmds.Listen(fmt.Sprintf("%s:%d", gw, hostnet.DefaultMetadataPort))
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- s.Serve(ctx, ln) }()

	iso := hostnet.NewIsolation(br)
	var peers []netnstest.Peer
	for i, id := range []string{"vm-a", "vm-b", "vm-c"} {
		p := netnstest.NewPeer(t, "fa-mmds-"+id[3:], br, fmt.Sprintf("10.220.0.%d", 10+i), gw, fmt.Sprintf("06:fa:00:00:02:%02x", i))
		if err := iso.AllowPort(ctx, hostnetPort(br, p)); err != nil {
			t.Fatal(err)
		}
		peers = append(peers, p)
		if id != "vm-c" {
			v := metadata.V1
			if id == "vm-b" {
				v = metadata.V2
			}
			if err := s.Register(id, netip.MustParseAddr(p.IP), handler(t, id, v)); err != nil {
				t.Fatal(err)
			}
		}
	}
	fetch := func(p netnstest.Peer, method, path string, hdr map[string]string) (int, string, error) {
		var code int
		var body string
		err := netnstest.Do(p.NS, func() error {
			req, _ := http.NewRequest(method, "http://169.254.169.254"+path, nil)
			for k, v := range hdr {
				req.Header.Set(k, v)
			}
			// The socket is made on this thread, in p's namespace.
			d := net.Dialer{Timeout: 2 * time.Second}
			conn, err := d.DialContext(ctx, "tcp", "169.254.169.254:80")
			if err != nil {
				return err
			}
			defer conn.Close()
			if err := req.Write(conn); err != nil {
				return err
			}
			resp, err := http.ReadResponse(bufio.NewReader(conn), req)
			if err != nil {
				return err
			}
			defer resp.Body.Close()
			b, _ := io.ReadAll(resp.Body)
			code, body = resp.StatusCode, string(b)
			return nil
		})
		return code, body, err
	}
	if code, body, err := fetch(peers[0], "GET", "/latest/meta-data/instance-id", nil); err != nil || code != 200 || body != "vm-a" {
		t.Errorf("vm-a: %d %q %v", code, body, err)
	}
	if code, body, err := fetch(peers[0], "GET", "/2009-04-04/user-data", nil); err != nil || code != 200 || body != "#cloud-config\n" {
		t.Errorf("vm-a user-data: %d %q %v", code, body, err)
	}
	// V2: a token first.
	code, tok, err := fetch(peers[1], "PUT", "/latest/api/token", map[string]string{"X-metadata-token-ttl-seconds": "60"})
	if err != nil || code != 200 || tok == "" {
		t.Fatalf("vm-b token: %d %q %v", code, tok, err)
	}
	if code, body, err := fetch(peers[1], "GET", "/latest/meta-data/instance-id", map[string]string{"X-metadata-token": tok}); err != nil || code != 200 || body != "vm-b" {
		t.Errorf("vm-b: %d %q %v", code, body, err)
	}
	// A VM without a document gets none, in particular not another's.
	if code, body, err := fetch(peers[2], "GET", "/latest/meta-data/instance-id", nil); err != nil || code != http.StatusNotFound || strings.Contains(body, "vm-") {
		t.Errorf("vm-c: %d %q %v", code, body, err)
	}
	cancel()
	if err := <-served; err != nil {
		t.Errorf("serve: %v", err)
	}
}

func hostnetPort(bridge string, p netnstest.Peer) network.Port {
	return network.Port{Bridge: bridge, HostInterface: p.HostIf, MAC: p.MAC, IP: p.IP}
}
