package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"reflect"
	"strconv"
	"strings"

	"go.yaml.in/yaml/v3"
)

// Parse decodes a configuration strictly, applies the defaults and validates
// it without touching the file system (see ParseWith). On failure the error
// is a Problems listing everything wrong, in document order.
func Parse(data []byte) (*Config, error) {
	return ParseWith(data, ValidateOptions{})
}

// Load reads and parses the configuration file at path. Files the
// configuration names are not checked; use LoadWith for that.
func Load(path string) (*Config, error) {
	return LoadWith(path, ValidateOptions{})
}

// LoadWith reads and parses the configuration file at path, validating with
// opts. A file that cannot be read is a plain error; a configuration with
// problems returns Problems.
func LoadWith(path string, opts ValidateOptions) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	return ParseWith(data, opts)
}

// ParseWith decodes data strictly: it must be one YAML document whose top
// level is a mapping; unknown keys, duplicate keys and values of the wrong
// type are problems. The defaults are then applied and the result
// validated with opts. Every problem is reported, each with its path.
func ParseWith(data []byte, opts ValidateOptions) (*Config, error) {
	root, err := parseDocument(data)
	if err != nil {
		return nil, err
	}
	d := &decoder{lines: map[string]int{}}
	var c Config
	if root != nil {
		d.lines[""] = root.Line
		d.value(root, reflect.ValueOf(&c).Elem(), "", false)
	}
	if d.tooLarge {
		return nil, d.problems.list // what was decoded is partial: validating it would only add noise
	}
	c.ApplyDefaults()
	var validated Problems
	if err := c.Validate(opts); err != nil {
		validated = err.(Problems)
	}
	if ps := merge(d.problems.list, validated, d.lines); len(ps) > 0 {
		return nil, ps
	}
	return &c, nil
}

// parseDocument returns the top-level mapping node of the only document in
// data, or nil when data holds no document at all.
func parseDocument(data []byte) (*yaml.Node, error) {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc yaml.Node
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, nil
		}
		return nil, Problems{{Message: "invalid YAML: " + strings.TrimPrefix(err.Error(), "yaml: ")}}
	}
	var extra yaml.Node
	switch err := dec.Decode(&extra); {
	case errors.Is(err, io.EOF):
	case err != nil:
		return nil, Problems{{Message: "invalid YAML: " + strings.TrimPrefix(err.Error(), "yaml: ")}}
	default:
		return nil, Problems{{Line: extra.Line, Message: "a second YAML document; the configuration must be a single document (remove the '---' separator)"}}
	}
	root := &doc
	if root.Kind == yaml.DocumentNode {
		if len(root.Content) == 0 {
			return nil, nil
		}
		root = root.Content[0]
	}
	root = resolve(root)
	if root.Kind == yaml.ScalarNode && root.ShortTag() == "!!null" {
		return nil, nil
	}
	if root.Kind != yaml.MappingNode {
		return nil, Problems{{Line: root.Line, Message: "the top level must be a mapping of settings (server:, github:, pools:, ...), got " + describe(root, false)}}
	}
	return root, nil
}

// maxWork bounds the nodes a decode visits, so aliases cannot blow a small
// document up into an expensive one.
const maxWork = 100_000

type decoder struct {
	problems problems
	lines    map[string]int // path -> line where it appears
	work     int
	tooLarge bool
}

var unmarshalerType = reflect.TypeFor[yaml.Unmarshaler]()

// value decodes n into v, recording a problem at path for anything that
// does not fit. secret marks values that must never be echoed.
func (d *decoder) value(n *yaml.Node, v reflect.Value, path string, secret bool) {
	d.work++
	if d.work > maxWork {
		if !d.tooLarge {
			d.tooLarge = true
			d.problems.addLine(path, n.Line, "document too large (too many nodes or alias expansions)")
		}
		return
	}
	n = resolve(n)
	if n.Kind == yaml.ScalarNode && n.ShortTag() == "!!null" {
		return // an empty value leaves the field unset, so its default applies
	}
	if v.Type() == reflect.TypeFor[Secret]() {
		secret = true
	}
	if v.CanAddr() && v.Addr().Type().Implements(unmarshalerType) {
		if n.Kind != yaml.ScalarNode {
			d.problems.addLine(path, n.Line, fmt.Sprintf("want %s, got %s", want(v.Type()), describe(n, secret)))
			return
		}
		if err := v.Addr().Interface().(yaml.Unmarshaler).UnmarshalYAML(n); err != nil {
			d.problems.addLine(path, n.Line, err.Error())
		}
		return
	}
	switch v.Kind() {
	case reflect.Struct:
		d.structure(n, v, path)
	case reflect.Slice:
		d.list(n, v, path, secret)
	case reflect.Map:
		d.mapping(n, v, path, secret)
	case reflect.String:
		if s, ok := scalarText(n); ok {
			v.SetString(s)
			return
		}
		d.problems.addLine(path, n.Line, "want a string, got "+describe(n, secret))
	case reflect.Int, reflect.Int64:
		var i int64
		if n.Kind != yaml.ScalarNode || n.ShortTag() != "!!int" || n.Decode(&i) != nil || v.OverflowInt(i) {
			d.problems.addLine(path, n.Line, "want an integer, got "+describe(n, secret))
			return
		}
		v.SetInt(i)
	case reflect.Bool:
		var b bool
		if n.Kind != yaml.ScalarNode || n.ShortTag() != "!!bool" || n.Decode(&b) != nil {
			d.problems.addLine(path, n.Line, "want true or false, got "+describe(n, secret))
			return
		}
		v.SetBool(b)
	default:
		// The schema only uses the kinds above; a new kind needs code here.
		panic(fmt.Sprintf("config: no decoder for %s at %s", v.Type(), path))
	}
}

func (d *decoder) structure(n *yaml.Node, v reflect.Value, path string) {
	if n.Kind != yaml.MappingNode {
		d.problems.addLine(path, n.Line, "want a mapping, got "+describe(n, false))
		return
	}
	fields := yamlFields(v.Type())
	for _, kv := range d.pairs(n, path) {
		key := kv.key.Value
		i, ok := fields.index[key]
		p := field(path, key)
		if !ok {
			d.problems.addLine(p, kv.key.Line, unknownField(key, fields.names))
			continue
		}
		d.lines[p] = kv.key.Line
		fv := v.Field(i)
		d.value(kv.value, fv, p, false)
		// An empty list in an omitempty field is written as nothing, so it
		// must decode as nothing for the YAML to round-trip.
		if fields.omitEmpty[i] && fv.Kind() == reflect.Slice && fv.Len() == 0 {
			fv.SetZero()
		}
	}
}

func (d *decoder) list(n *yaml.Node, v reflect.Value, path string, secret bool) {
	if n.Kind != yaml.SequenceNode {
		d.problems.addLine(path, n.Line, fmt.Sprintf("want %s, got %s", want(v.Type()), describe(n, secret)))
		return
	}
	s := reflect.MakeSlice(v.Type(), len(n.Content), len(n.Content))
	for i, e := range n.Content {
		p := index(path, i)
		d.lines[p] = e.Line
		d.value(e, s.Index(i), p, secret)
	}
	v.Set(s)
}

func (d *decoder) mapping(n *yaml.Node, v reflect.Value, path string, secret bool) {
	if n.Kind != yaml.MappingNode {
		d.problems.addLine(path, n.Line, fmt.Sprintf("want %s, got %s", want(v.Type()), describe(n, secret)))
		return
	}
	pairs := d.pairs(n, path)
	if len(pairs) == 0 {
		return // empty and absent are the same, so the YAML round-trips
	}
	m := reflect.MakeMapWithSize(v.Type(), len(pairs))
	for _, kv := range pairs {
		key := kv.key.Value
		p := field(path, key)
		d.lines[p] = kv.key.Line
		e := reflect.New(v.Type().Elem()).Elem()
		d.value(kv.value, e, p, secret)
		m.SetMapIndex(reflect.ValueOf(key).Convert(v.Type().Key()), e)
	}
	v.Set(m)
}

type pair struct{ key, value *yaml.Node }

// pairs lists the entries of a mapping in document order, with merge keys
// ("<<: *defaults") expanded: explicit keys win over merged ones, and an
// earlier merge source wins over a later one. A key written twice, or a
// key that is not a plain scalar, is a problem.
func (d *decoder) pairs(n *yaml.Node, path string) []pair {
	var out []pair
	seen := map[string]int{} // key -> line of its explicit occurrence
	var merged []*yaml.Node
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, val := resolve(n.Content[i]), n.Content[i+1]
		if k.Kind == yaml.ScalarNode && k.ShortTag() == "!!merge" {
			merged = append(merged, val)
			continue
		}
		if _, ok := scalarText(k); !ok {
			d.problems.addLine(path, k.Line, "a key must be a plain string, got "+describe(k, true))
			continue
		}
		if first, dup := seen[k.Value]; dup {
			d.problems.addLine(field(path, k.Value), k.Line, fmt.Sprintf("duplicate key (first set on line %d)", first))
			continue
		}
		seen[k.Value] = k.Line
		out = append(out, pair{k, val})
	}
	visited := map[*yaml.Node]bool{n: true}
	var mergeFrom func(src *yaml.Node, depth int)
	mergeFrom = func(src *yaml.Node, depth int) {
		src = resolve(src)
		if visited[src] || depth > 32 {
			return
		}
		visited[src] = true
		switch src.Kind {
		case yaml.MappingNode:
			inner := make([]*yaml.Node, 0)
			for i := 0; i+1 < len(src.Content); i += 2 {
				d.work++
				k, val := resolve(src.Content[i]), src.Content[i+1]
				if k.Kind == yaml.ScalarNode && k.ShortTag() == "!!merge" {
					inner = append(inner, val)
					continue
				}
				if _, ok := scalarText(k); !ok {
					continue // reported where the merged mapping is decoded, if ever
				}
				if _, ok := seen[k.Value]; ok {
					continue
				}
				seen[k.Value] = k.Line
				out = append(out, pair{k, val})
			}
			for _, in := range inner {
				mergeFrom(in, depth+1)
			}
		case yaml.SequenceNode:
			for _, e := range src.Content {
				if resolve(e).Kind != yaml.MappingNode {
					d.problems.addLine(path, e.Line, "a merge key (<<) takes a mapping or a list of mappings, got "+describe(resolve(e), false))
					continue
				}
				mergeFrom(e, depth+1)
			}
		default:
			d.problems.addLine(path, src.Line, "a merge key (<<) takes a mapping or a list of mappings, got "+describe(src, false))
		}
	}
	for _, m := range merged {
		mergeFrom(m, 0)
	}
	return out
}

// resolve follows aliases to the node they name.
func resolve(n *yaml.Node) *yaml.Node {
	for i := 0; n.Kind == yaml.AliasNode && n.Alias != nil && i < 64; i++ {
		n = n.Alias
	}
	return n
}

// scalarText returns the text of a scalar that can stand for a string: any
// plain or quoted scalar of a standard type. Numbers and booleans keep their
// written form ("0700" stays "0700").
func scalarText(n *yaml.Node) (string, bool) {
	if n.Kind != yaml.ScalarNode {
		return "", false
	}
	switch n.ShortTag() {
	case "!!str", "!!int", "!!float", "!!bool", "!!timestamp":
		return n.Value, true
	}
	return "", false
}

// describe names what a node is, for "want X, got Y" messages. A secret's
// value is never shown, only its kind.
func describe(n *yaml.Node, secret bool) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	case yaml.AliasNode:
		return "an alias"
	}
	tag := n.ShortTag()
	if secret {
		switch tag {
		case "!!str":
			return "a string"
		case "!!int", "!!float":
			return "a number"
		case "!!bool":
			return "a boolean"
		}
		return "a value tagged " + tag
	}
	switch tag {
	case "!!str", "!!timestamp":
		return strconv.Quote(clip(n.Value))
	case "!!int", "!!float", "!!bool":
		return clip(n.Value)
	}
	return "a value tagged " + tag
}

// clip shortens long values quoted in messages.
func clip(s string) string {
	const max = 60
	if r := []rune(s); len(r) > max {
		return string(r[:max]) + "…"
	}
	return s
}

// want names what a type expects, for "want X, got Y" messages.
func want(t reflect.Type) string {
	switch t {
	case reflect.TypeFor[ByteSize]():
		return "a size such as 20GiB"
	case reflect.TypeFor[Duration]():
		return "a duration such as 90s or 24h"
	}
	switch t.Kind() {
	case reflect.Slice:
		return "a list"
	case reflect.Map, reflect.Struct:
		return "a mapping"
	case reflect.String:
		return "a string"
	case reflect.Int, reflect.Int64:
		return "an integer"
	case reflect.Bool:
		return "true or false"
	}
	return t.String()
}

type structFields struct {
	index     map[string]int
	names     []string
	omitEmpty map[int]bool
}

// yamlFields maps a struct's YAML keys to its field indexes.
func yamlFields(t reflect.Type) structFields {
	fs := structFields{index: map[string]int{}, omitEmpty: map[int]bool{}}
	for i := range t.NumField() {
		f := t.Field(i)
		if !f.IsExported() {
			continue
		}
		name, opts, _ := strings.Cut(f.Tag.Get("yaml"), ",")
		if name == "-" {
			continue
		}
		if name == "" {
			name = strings.ToLower(f.Name)
		}
		fs.index[name] = i
		fs.omitEmpty[i] = strings.Contains(opts, "omitempty")
		fs.names = append(fs.names, name)
	}
	return fs
}

// unknownField suggests the nearest known key, or lists them all when none
// is close enough to be a likely typo.
func unknownField(key string, known []string) string {
	best, bestDist := "", -1
	for _, k := range known {
		dist := editDistance(strings.ToLower(key), k)
		if bestDist < 0 || dist < bestDist {
			best, bestDist = k, dist
		}
	}
	limit := max(1, len([]rune(key))/3)
	if bestDist >= 0 && bestDist <= limit {
		return "unknown field; did you mean " + best + "?"
	}
	for _, k := range known {
		if len(key) >= 3 && (strings.HasPrefix(k, strings.ToLower(key)) || strings.HasPrefix(strings.ToLower(key), k)) {
			return "unknown field; did you mean " + k + "?"
		}
	}
	return "unknown field; known fields are " + strings.Join(known, ", ")
}

// editDistance is the optimal string alignment distance: insertions,
// deletions, substitutions and transpositions of neighbours each cost one,
// so "lables" is one step from "labels".
func editDistance(a, b string) int {
	s, t := []rune(a), []rune(b)
	prev2 := make([]int, len(t)+1)
	prev := make([]int, len(t)+1)
	cur := make([]int, len(t)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(s); i++ {
		cur[0] = i
		for j := 1; j <= len(t); j++ {
			cost := 1
			if s[i-1] == t[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
			if i > 1 && j > 1 && s[i-1] == t[j-2] && s[i-2] == t[j-1] {
				cur[j] = min(cur[j], prev2[j-2]+1)
			}
		}
		prev2, prev, cur = prev, cur, prev2
	}
	return prev[len(t)]
}
