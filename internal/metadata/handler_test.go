package metadata

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"
)

type client struct {
	t   *testing.T
	url string
}

func (c client) do(method, path string, hdr map[string]string) (int, string, http.Header) {
	c.t.Helper()
	req, err := http.NewRequest(method, c.url+path, nil)
	if err != nil {
		c.t.Fatal(err)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		c.t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body), resp.Header
}

func serve(t *testing.T, v Version) (*Handler, client) {
	t.Helper()
	h, err := NewHandler(mustNew(t, testInput()), v)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return h, client{t, srv.URL}
}

func TestHandlerV1IMDSFormat(t *testing.T) {
	_, c := serve(t, V1)
	gc, _ := json.Marshal(testInput().RegistryCache)
	for path, want := range map[string]string{
		"/":                                            "2009-04-04/\nlatest/",
		"/latest":                                      "meta-data/\nuser-data",
		"/latest/":                                     "meta-data/\nuser-data",
		"/latest/meta-data":                            "fireactions/\ninstance-id\nlocal-hostname\nowner/\nteam",
		"/latest/meta-data/":                           "fireactions/\ninstance-id\nlocal-hostname\nowner/\nteam",
		"/latest/meta-data/instance-id":                "runner-7f3a",
		"/2009-04-04/meta-data/instance-id":            "runner-7f3a",
		"/latest/meta-data/local-hostname":             "runner-7f3a",
		"/latest/meta-data/fireactions/":               "pool\nregistry-cache\nrunner_id",
		"/latest/meta-data/fireactions/runner_id":      "42",
		"/latest/meta-data/fireactions/registry-cache": string(gc),
		"/latest/meta-data/owner/email":                "o@example.com",
		"/latest/user-data":                            userData,
		"/2009-04-04/user-data":                        userData,
	} {
		code, body, hdr := c.do("GET", path, nil)
		if code != 200 || body != want {
			t.Errorf("GET %s = %d %q, want 200 %q", path, code, body, want)
		}
		if ct := hdr.Get("Content-Type"); ct != "text/plain" {
			t.Errorf("GET %s: Content-Type %q", path, ct)
		}
	}
	for _, path := range []string{"/latest/meta-data/nope", "/latest/meta-data/instance-id/x", "/2010-01-01/meta-data"} {
		if code, _, _ := c.do("GET", path, nil); code != 404 {
			t.Errorf("GET %s = %d, want 404", path, code)
		}
	}
	// V1 answers with a bad token or none.
	if code, body, _ := c.do("GET", "/latest/meta-data/instance-id", map[string]string{"X-metadata-token": "bogus"}); code != 200 || body != "runner-7f3a" {
		t.Errorf("V1 with a bogus token = %d %q", code, body)
	}
	if code, _, hdr := c.do("HEAD", "/latest/meta-data/instance-id", nil); code != 200 || hdr.Get("Content-Type") != "text/plain" {
		t.Errorf("HEAD = %d", code)
	}
}

func TestHandlerJSONFormat(t *testing.T) {
	_, c := serve(t, V1)
	accept := map[string]string{"Accept": "application/json"}
	code, body, hdr := c.do("GET", "/latest/meta-data/instance-id", accept)
	if code != 200 || body != `"runner-7f3a"` || hdr.Get("Content-Type") != "application/json" {
		t.Errorf("JSON leaf = %d %q %q", code, body, hdr.Get("Content-Type"))
	}
	code, body, _ = c.do("GET", "/latest/meta-data/owner", accept)
	var owner map[string]string
	if code != 200 || json.Unmarshal([]byte(body), &owner) != nil || !reflect.DeepEqual(owner, map[string]string{"name": "octo", "email": "o@example.com"}) {
		t.Errorf("JSON subtree = %d %q", code, body)
	}
	// The whole document, as the host would PUT it.
	code, body, _ = c.do("GET", "/", map[string]string{"Accept": "text/html, application/json;q=0.9"})
	want, _ := mustNew(t, testInput()).JSON()
	if code != 200 || body != string(want) {
		t.Errorf("JSON root = %d\n%s\nwant\n%s", code, body, want)
	}
}

func TestHandlerV2Tokens(t *testing.T) {
	h, c := serve(t, V2)
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	var mu sync.Mutex
	h.now = func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	advance := func(d time.Duration) { mu.Lock(); now = now.Add(d); mu.Unlock() }

	if code, _, _ := c.do("GET", "/latest/meta-data/instance-id", nil); code != 401 {
		t.Errorf("V2 without a token = %d, want 401", code)
	}
	if code, _, _ := c.do("GET", "/latest/meta-data/instance-id", map[string]string{"X-metadata-token": "bogus"}); code != 401 {
		t.Errorf("V2 with a bogus token = %d, want 401", code)
	}
	for _, tc := range []struct {
		name string
		hdr  map[string]string
	}{
		{"no ttl", nil},
		{"ttl 0", map[string]string{"X-metadata-token-ttl-seconds": "0"}},
		{"ttl too long", map[string]string{"X-metadata-token-ttl-seconds": "21601"}},
		{"ttl not a number", map[string]string{"X-metadata-token-ttl-seconds": "10s"}},
		{"forwarded", map[string]string{"X-metadata-token-ttl-seconds": "60", "X-Forwarded-For": "10.0.0.9"}},
	} {
		if code, _, _ := c.do("PUT", "/latest/api/token", tc.hdr); code != 400 {
			t.Errorf("PUT token (%s) = %d, want 400", tc.name, code)
		}
	}
	if code, _, _ := c.do("PUT", "/latest/meta-data", map[string]string{"X-metadata-token-ttl-seconds": "60"}); code != 405 {
		t.Errorf("PUT elsewhere = %d, want 405", code)
	}

	code, token, _ := c.do("PUT", "/latest/api/token", map[string]string{"X-metadata-token-ttl-seconds": "60"})
	if code != 200 || len(token) < 40 {
		t.Fatalf("PUT token = %d %q", code, token)
	}
	if code, body, _ := c.do("GET", "/latest/meta-data/instance-id", map[string]string{"X-metadata-token": token}); code != 200 || body != "runner-7f3a" {
		t.Errorf("GET with token = %d %q", code, body)
	}
	// The AWS header names work too (cloud-init's Ec2 datasource sends them).
	_, awsToken, _ := c.do("PUT", "/latest/api/token", map[string]string{"X-aws-ec2-metadata-token-ttl-seconds": "21600"})
	if code, _, _ := c.do("GET", "/latest/user-data", map[string]string{"X-aws-ec2-metadata-token": awsToken}); code != 200 {
		t.Errorf("GET with the AWS token header = %d", code)
	}
	if awsToken == token {
		t.Error("two tokens are equal")
	}

	advance(59 * time.Second)
	if code, _, _ := c.do("GET", "/latest", map[string]string{"X-metadata-token": token}); code != 200 {
		t.Errorf("token rejected before its TTL: %d", code)
	}
	advance(time.Second)
	if code, _, _ := c.do("GET", "/latest", map[string]string{"X-metadata-token": token}); code != 401 {
		t.Errorf("token accepted after its TTL: %d", code)
	}
	if code, _, _ := c.do("GET", "/latest", map[string]string{"X-aws-ec2-metadata-token": awsToken}); code != 200 {
		t.Errorf("longer-lived token expired early: %d", code)
	}
}

func TestHandlerBoundsLiveTokens(t *testing.T) {
	h, c := serve(t, V2)
	// Every token is issued a second after the previous one, so the first
	// is the one closest to expiry.
	var mu sync.Mutex
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	h.now = func() time.Time { mu.Lock(); defer mu.Unlock(); now = now.Add(time.Second); return now }
	hdr := map[string]string{"X-metadata-token-ttl-seconds": "21600"}
	_, first, _ := c.do("PUT", TokenPath, hdr)
	for i := 0; i < maxLiveTokens+10; i++ {
		c.do("PUT", TokenPath, hdr)
	}
	h.mu.RLock()
	n := len(h.tokens)
	h.mu.RUnlock()
	if n > maxLiveTokens {
		t.Errorf("%d live tokens, want at most %d", n, maxLiveTokens)
	}
	if code, _, _ := c.do("GET", "/", map[string]string{"X-metadata-token": first}); code != 401 {
		t.Errorf("the oldest token survived the cap: %d", code)
	}
}

func TestHandlerMethodsAndUpdate(t *testing.T) {
	h, c := serve(t, V1)
	code, _, hdr := c.do("POST", "/latest", nil)
	if code != 405 || hdr.Get("Allow") != "GET, PUT" {
		t.Errorf("POST = %d, Allow %q", code, hdr.Get("Allow"))
	}
	in := testInput()
	in.InstanceID = "runner-next"
	h.Update(mustNew(t, in))
	if _, body, _ := c.do("GET", "/latest/meta-data/instance-id", nil); body != "runner-next" {
		t.Errorf("after Update: %q", body)
	}
	if _, err := NewHandler(Document{}, V1); err == nil {
		t.Error("NewHandler accepted an empty document")
	}
	if _, err := NewHandler(mustNew(t, in), "V3"); err == nil {
		t.Error("NewHandler accepted version V3")
	}
}

// TestCrawlLikeCloudInit walks meta-data the way cloud-init's Ec2
// datasource does (list, recurse into entries ending in '/', fetch the
// rest) through the V2 token flow, and must rebuild the document's tree.
func TestCrawlLikeCloudInit(t *testing.T) {
	_, c := serve(t, V2)
	_, token, _ := c.do("PUT", TokenPath, map[string]string{"X-aws-ec2-metadata-token-ttl-seconds": "21600"})
	auth := map[string]string{"X-aws-ec2-metadata-token": token}
	var crawl func(path string) map[string]any
	crawl = func(path string) map[string]any {
		code, listing, _ := c.do("GET", path, auth)
		if code != 200 {
			t.Fatalf("GET %s = %d", path, code)
		}
		out := map[string]any{}
		for _, entry := range strings.Split(listing, "\n") {
			if name, ok := strings.CutSuffix(entry, "/"); ok {
				out[name] = crawl(path + entry)
				continue
			}
			_, value, _ := c.do("GET", path+entry, auth)
			out[entry] = value
		}
		return out
	}
	got := crawl("/2009-04-04/meta-data/")
	raw, _ := mustNew(t, testInput()).JSON()
	var doc map[string]map[string]any
	json.Unmarshal(raw, &doc)
	if !reflect.DeepEqual(got, doc["2009-04-04"]["meta-data"]) {
		t.Errorf("crawled\n%v\nwant\n%v", got, doc["2009-04-04"]["meta-data"])
	}
}
