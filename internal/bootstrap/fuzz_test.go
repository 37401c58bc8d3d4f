package bootstrap

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/fireactions/fireactions/internal/config"
)

// FuzzPoolsJSON feeds arbitrary pools.json content to the bootstrap (seed
// corpus in testdata/fuzz/FuzzPoolsJSON). It must never panic; rejected
// input must come back as located Problems that never reveal the key;
// accepted input must give a configuration that validates, marshals, and
// survives the daemon's strict decoder unchanged.
func FuzzPoolsJSON(f *testing.F) {
	seed, err := os.ReadFile(filepath.Join(seedDir, FilePools))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(seed)
	appID, err := os.ReadFile(filepath.Join(seedDir, FileAppID))
	if err != nil {
		f.Fatal(err)
	}
	key, err := os.ReadFile(filepath.Join(seedDir, FilePrivateKey))
	if err != nil {
		f.Fatal(err)
	}
	keyBody := fixtureKey(f)

	f.Fuzz(func(t *testing.T, pools []byte) {
		in := Inputs{Dir: "/in"}
		cfg, err := build(in, files{FileAppID: appID, FilePrivateKey: key, FilePools: pools}, nil)
		if err != nil {
			var ps Problems
			if !errors.As(err, &ps) || len(ps) == 0 {
				t.Fatalf("rejected without Problems: %T %v", err, err)
			}
			for _, p := range ps {
				if p.Source == "" || p.Message == "" {
					t.Fatalf("problem without source or message: %#v", p)
				}
			}
			for _, line := range strings.Split(keyBody, "\n") {
				if len(line) > 20 && strings.Contains(err.Error(), line) {
					t.Fatalf("error reveals the private key:\n%s", err)
				}
			}
			if !json.Valid(pools) {
				// Malformed JSON must be located for the operator.
				if ps[0].Source != "/in/pools.json" || ps[0].Line == 0 {
					t.Fatalf("invalid JSON reported without a position: %v", err)
				}
			}
			return
		}
		if !json.Valid(pools) {
			t.Fatalf("accepted invalid JSON %q", pools)
		}
		if err := cfg.Validate(config.ValidateOptions{}); err != nil {
			t.Fatalf("accepted a configuration that does not validate: %v", err)
		}
		data, err := config.Marshal(cfg)
		if err != nil {
			t.Fatalf("Marshal: %v", err)
		}
		parsed, err := config.Parse(data)
		if err != nil {
			t.Fatalf("config.Parse rejects the output: %v\n%s", err, data)
		}
		if !reflect.DeepEqual(parsed, cfg) {
			t.Fatalf("config.Parse(output) differs from the generated config:\n%s", data)
		}
		again, err := config.Marshal(parsed)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(again, data) {
			t.Fatalf("output does not round-trip:\n%s\n---\n%s", data, again)
		}
	})
}
