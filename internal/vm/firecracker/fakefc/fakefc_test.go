package main

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func TestMergePatch(t *testing.T) {
	var target, patch, want map[string]any
	json.Unmarshal([]byte(`{"a":"b","c":{"d":"e","f":"g"},"x":"y"}`), &target)
	json.Unmarshal([]byte(`{"a":"z","c":{"f":null,"h":"i"},"x":null,"n":{"m":"o"}}`), &patch)
	json.Unmarshal([]byte(`{"a":"z","c":{"d":"e","h":"i"},"n":{"m":"o"}}`), &want)
	if got := mergePatch(target, patch); !reflect.DeepEqual(got, want) {
		t.Fatalf("mergePatch = %v, want %v", got, want)
	}
}

func swaggerForTest(t *testing.T) {
	t.Helper()
	dir, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "github.com/firecracker-microvm/firecracker-go-sdk").Output()
	if err != nil {
		t.Fatalf("locate firecracker-go-sdk: %v", err)
	}
	t.Setenv("FAKEFC_SWAGGER", filepath.Join(strings.TrimSpace(string(dir)), "client", "swagger.yaml"))
}

func TestRoutes(t *testing.T) {
	swaggerForTest(t)
	api, err := loadAPI()
	if err != nil {
		t.Fatal(err)
	}
	if api.version == "" || specVersion() != api.version {
		t.Errorf("version %q, quick version %q", api.version, specVersion())
	}
	for _, c := range []struct {
		method, path, op string
		params           map[string]string
	}{
		{"GET", "/", "describeInstance", map[string]string{}},
		{"PUT", "/mmds/config", "putMmdsConfig", map[string]string{}},
		{"PATCH", "/mmds", "patchMmds", map[string]string{}},
		{"PUT", "/drives/scratch", "putGuestDriveByID", map[string]string{"drive_id": "scratch"}},
		{"PUT", "/network-interfaces/2", "putGuestNetworkInterfaceByID", map[string]string{"iface_id": "2"}},
		{"PUT", "/actions", "createSyncAction", map[string]string{}},
	} {
		op, params, ok := api.match(c.method, c.path)
		if !ok || op.id != c.op || !reflect.DeepEqual(params, c.params) {
			t.Errorf("%s %s: %v %+v %v, want %s %v", c.method, c.path, ok, op, params, c.op, c.params)
		}
	}
	for _, c := range [][2]string{{"GET", "/drives/x/y"}, {"POST", "/actions"}, {"GET", "/drives/"}} {
		if _, _, ok := api.match(c[0], c[1]); ok {
			t.Errorf("%s %s matched", c[0], c[1])
		}
	}
}

func TestMMDSGuestView(t *testing.T) {
	s := newMMDSStore(51200)
	srv := httptest.NewServer(s)
	defer srv.Close()
	get := func(path string, hdr ...string) (int, string) {
		req, _ := http.NewRequest("GET", srv.URL+path, nil)
		for i := 0; i+1 < len(hdr); i += 2 {
			req.Header.Set(hdr[i], hdr[i+1])
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, _ := get("/latest/meta-data/instance-id"); code != 404 {
		t.Errorf("before PUT /mmds: %d", code)
	}
	if err := s.put([]byte(`{"latest":{"meta-data":{"instance-id":"i-1","placement":{"zone":"z"}},"user-data":"#cloud-config"}}`)); err != nil {
		t.Fatal(err)
	}
	for path, want := range map[string]string{
		"/latest/meta-data/instance-id": "i-1",
		"/latest/meta-data/":            "instance-id\nplacement/",
		"/latest/":                      "meta-data/\nuser-data",
	} {
		if code, body := get(path); code != 200 || body != want {
			t.Errorf("GET %s: %d %q, want %q", path, code, body, want)
		}
	}
	if code, body := get("/latest/meta-data/placement", "Accept", "application/json"); code != 200 || strings.TrimSpace(body) != `{"zone":"z"}` {
		t.Errorf("JSON: %d %q", code, body)
	}
	if code, _ := get("/latest/nothing"); code != 404 {
		t.Errorf("missing path: %d", code)
	}

	s.setVersion("V2")
	if code, _ := get("/latest/meta-data/instance-id"); code != 401 {
		t.Errorf("V2 without a token: %d", code)
	}
	req, _ := http.NewRequest("PUT", srv.URL+"/latest/api/token", nil)
	req.Header.Set("X-metadata-token-ttl-seconds", "60")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	tok, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if code, body := get("/latest/meta-data/instance-id", "X-metadata-token", string(tok)); code != 200 || body != "i-1" {
		t.Errorf("V2 with a token: %d %q", code, body)
	}
	req.Header.Set("X-metadata-token-ttl-seconds", "0")
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != 400 {
		t.Errorf("token with ttl 0: %v %v", resp.StatusCode, err)
	}
}
