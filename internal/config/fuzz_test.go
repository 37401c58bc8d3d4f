package config

import (
	"bytes"
	"errors"
	"reflect"
	"testing"
)

// FuzzParse feeds arbitrary documents to Parse. It must never panic, must
// fail only with Problems, and whatever it accepts must survive
// Marshal → Parse unchanged and Marshal to the same bytes again. The seed
// corpus is in testdata/fuzz/FuzzParse; a configuration with a freshly
// generated inline key is added here because keys are not committed.
func FuzzParse(f *testing.F) {
	f.Add([]byte(baseYAML))
	f.Add([]byte("github:\n  app_id: 7\n  private_key: |\n" + indentLines(pkcs1PEM(f), "    ") + "pools:\n  - name: a\n    max_runners: 1\n    runner: {organization: o}\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := Parse(data)
		if err != nil {
			var ps Problems
			if !errors.As(err, &ps) || len(ps) == 0 {
				t.Fatalf("Parse failed without Problems: %T %v", err, err)
			}
			for _, p := range ps {
				if p.Message == "" {
					t.Fatalf("problem without a message at %q", p.Path)
				}
			}
			return
		}
		out, err := Marshal(c)
		if err != nil {
			t.Fatalf("Marshal of a parsed config: %v", err)
		}
		back, err := Parse(out)
		if err != nil {
			t.Fatalf("Marshal output does not parse: %v\n%s", err, out)
		}
		if !reflect.DeepEqual(back, c) {
			t.Fatalf("round trip changed the config:\n got %#v\nwant %#v\nyaml:\n%s", back, c, out)
		}
		again, err := Marshal(back)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(again, out) {
			t.Fatalf("Marshal is not stable:\n%s\n---\n%s", out, again)
		}
	})
}

func indentLines(s, by string) string {
	var b bytes.Buffer
	for _, l := range bytes.SplitAfter([]byte(s), []byte("\n")) {
		if len(l) > 0 {
			b.WriteString(by)
			b.Write(l)
		}
	}
	return b.String()
}
