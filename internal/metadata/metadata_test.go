package metadata

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"

	"github.com/fireactions/fireactions/internal/registrycache"
)

const userData = "#cloud-config\nwrite_files:\n- path: /etc/x\n  content: |\n    echo \"$HOME\" ${USER}\n"

func testInput() Input {
	return Input{
		InstanceID: "runner-7f3a",
		RunnerID:   "42",
		Pool:       "default",
		Metadata:   map[string]string{"team": "infra", "owner/name": "octo", "owner/email": "o@example.com"},
		UserData:   userData,
		RegistryCache: &registrycache.GuestConfig{Files: []registrycache.GuestFile{
			{Path: "/etc/docker/daemon.json", Mode: 0o644, Content: "{\n  \"registry-mirrors\": [\"http://10.200.0.1:5000\"]\n}\n"},
		}},
	}
}

func mustNew(t *testing.T, in Input) Document {
	t.Helper()
	d, err := New(in)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return d
}

func TestDocumentShape(t *testing.T) {
	d := mustNew(t, testInput())
	raw, err := d.JSON()
	if err != nil {
		t.Fatal(err)
	}
	var root map[string]map[string]any
	if err := json.Unmarshal(raw, &root); err != nil {
		t.Fatalf("not JSON: %v", err)
	}
	if len(root) != 2 {
		t.Fatalf("top-level keys: %v, want latest and 2009-04-04", root)
	}
	if !reflect.DeepEqual(root["latest"], root["2009-04-04"]) {
		t.Fatal("2009-04-04 differs from latest")
	}
	latest := root["latest"]
	if len(latest) != 2 || latest["user-data"] != userData {
		t.Fatalf("latest = %v, want meta-data and user-data only, user-data verbatim", latest)
	}
	gc, _ := json.Marshal(testInput().RegistryCache)
	want := map[string]any{
		"instance-id":    "runner-7f3a",
		"local-hostname": "runner-7f3a",
		"team":           "infra",
		"owner":          map[string]any{"name": "octo", "email": "o@example.com"},
		"fireactions": map[string]any{
			"runner_id":      "42",
			"pool":           "default",
			"registry-cache": string(gc),
		},
	}
	if !reflect.DeepEqual(latest["meta-data"], want) {
		t.Errorf("meta-data =\n%v\nwant\n%v", latest["meta-data"], want)
	}
	assertStringLeaves(t, "latest", root["latest"])

	again, _ := mustNew(t, testInput()).JSON()
	if string(again) != string(raw) {
		t.Error("JSON differs between two identical documents")
	}
}

func assertStringLeaves(t *testing.T, at string, v any) {
	t.Helper()
	switch x := v.(type) {
	case string:
	case map[string]any:
		for k, sub := range x {
			assertStringLeaves(t, at+"/"+k, sub)
		}
	default:
		t.Errorf("%s is %T, want a string", at, v)
	}
}

func TestDocumentAccessors(t *testing.T) {
	in := testInput()
	in.Hostname = "vm-1.example"
	raw, _ := mustNew(t, in).JSON()
	d, err := Parse(raw)
	if err != nil {
		t.Fatal(err)
	}
	for key, want := range map[string]string{
		KeyInstanceID: "runner-7f3a", KeyLocalHostname: "vm-1.example",
		KeyRunnerID: "42", KeyPool: "default", "owner/name": "octo",
	} {
		if got, ok := d.MetaData(key); !ok || got != want {
			t.Errorf("MetaData(%q) = %q, %v; want %q", key, got, ok, want)
		}
	}
	if _, ok := d.MetaData("owner"); ok {
		t.Error("MetaData returned a subtree as a string")
	}
	if d.UserData() != userData {
		t.Error("UserData differs")
	}
	g, err := d.RegistryCache()
	if err != nil || !reflect.DeepEqual(g, in.RegistryCache) {
		t.Errorf("RegistryCache = %+v, %v", g, err)
	}

	// A VM that is not a runner and has no cache.
	bare := mustNew(t, Input{InstanceID: "task-1"})
	if _, ok := bare.MetaData(KeyRunnerID); ok {
		t.Error("runner_id present without a runner")
	}
	if g, err := bare.RegistryCache(); g != nil || err != nil {
		t.Errorf("RegistryCache = %v, %v; want none", g, err)
	}
	raw, _ = bare.JSON()
	if strings.Contains(string(raw), "fireactions") {
		t.Errorf("empty fireactions tree rendered: %s", raw)
	}
}

func TestNewRejects(t *testing.T) {
	cases := []struct {
		name string
		edit func(*Input)
		want string
	}{
		{"no instance id", func(in *Input) { in.InstanceID = "" }, "instance-id is required"},
		{"slash in instance id", func(in *Input) { in.InstanceID = "a/b" }, "instance-id"},
		{"space in instance id", func(in *Input) { in.InstanceID = "a b" }, "instance-id"},
		{"bad hostname", func(in *Input) { in.Hostname = "under_score" }, "local-hostname"},
		{"instance id is not a hostname", func(in *Input) { in.InstanceID = "runner@1" }, "set Input.Hostname"},
		{"reserved key", func(in *Input) { in.Metadata = map[string]string{"instance-id": "x"} }, "reserved"},
		{"reserved subtree", func(in *Input) { in.Metadata = map[string]string{"fireactions/x": "x"} }, "reserved"},
		{"leaf and tree", func(in *Input) { in.Metadata = map[string]string{"a": "1", "a/b": "2"} }, `"a/b" puts a tree under "a"`},
		{"empty segment", func(in *Input) { in.Metadata = map[string]string{"a//b": "1"} }, "empty"},
		{"trailing slash", func(in *Input) { in.Metadata = map[string]string{"a/": "1"} }, "empty"},
		{"dot segment", func(in *Input) { in.Metadata = map[string]string{"a/../b": "1"} }, "'..'"},
		{"whitespace key", func(in *Input) { in.Metadata = map[string]string{"a b": "1"} }, "whitespace"},
		{"bad utf-8 user-data", func(in *Input) { in.UserData = "\xff" }, "user-data is not valid UTF-8"},
		{"newline in pool", func(in *Input) { in.Pool = "a\nb" }, "control characters"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			in := testInput()
			tc.edit(&in)
			_, err := New(in)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want it to contain %q", err, tc.want)
			}
		})
	}
}

func TestParseRejects(t *testing.T) {
	for _, doc := range []string{
		`[]`,
		`{"latest":{"meta-data":{}}}`,
		`{"latest":{"meta-data":{"n":1}},"2009-04-04":{"meta-data":{}}}`,
		`{"latest":{"meta-data":"x"},"2009-04-04":{"meta-data":{}}}`,
	} {
		if _, err := Parse([]byte(doc)); err == nil {
			t.Errorf("Parse(%s) accepted it", doc)
		}
	}
}
