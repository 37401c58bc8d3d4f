package config

import (
	"sort"
	"strconv"
	"strings"
)

// Problem is one thing wrong with a configuration: where (the YAML path,
// e.g. "pools[0].runner.labels[2]"), what, and the line it sits on when the
// configuration came from a file and the path appears in it (0 otherwise).
type Problem struct {
	Path    string
	Message string
	Line    int
}

// String formats the problem as "path: message (line N)".
func (p Problem) String() string {
	var b strings.Builder
	if p.Path != "" {
		b.WriteString(p.Path)
		b.WriteString(": ")
	}
	b.WriteString(p.Message)
	if p.Line > 0 {
		b.WriteString(" (line ")
		b.WriteString(strconv.Itoa(p.Line))
		b.WriteString(")")
	}
	return b.String()
}

// Problems is every problem found in a configuration. It is returned as an
// error so callers can print all of them at once, one per line.
type Problems []Problem

func (ps Problems) Error() string {
	lines := make([]string, len(ps))
	for i, p := range ps {
		lines[i] = p.String()
	}
	return strings.Join(lines, "\n")
}

// problems collects Problems while a configuration is decoded or validated.
type problems struct {
	list Problems
}

func (ps *problems) add(path, msg string) {
	ps.list = append(ps.list, Problem{Path: path, Message: msg})
}

func (ps *problems) addLine(path string, line int, msg string) {
	ps.list = append(ps.list, Problem{Path: path, Message: msg, Line: line})
}

func (ps *problems) err() error {
	if len(ps.list) == 0 {
		return nil
	}
	return ps.list
}

// field appends a mapping key to a path. Keys that are not plain words (they
// may come from metadata maps) are quoted so the path stays unambiguous.
func field(path, key string) string {
	if !plainKey(key) {
		return path + "[" + strconv.Quote(key) + "]"
	}
	if path == "" {
		return key
	}
	return path + "." + key
}

// index appends a list index to a path.
func index(path string, i int) string {
	return path + "[" + strconv.Itoa(i) + "]"
}

func plainKey(k string) bool {
	if k == "" || k[0] == '/' || k[len(k)-1] == '/' || strings.Contains(k, "//") {
		return false
	}
	for _, r := range k {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9':
		case r == '_' || r == '-' || r == '/':
		default:
			return false
		}
	}
	return true
}

// within reports whether path is base or lies below it.
func within(path, base string) bool {
	if base == "" || path == base {
		return true
	}
	if !strings.HasPrefix(path, base) {
		return false
	}
	c := path[len(base)]
	return c == '.' || c == '['
}

// parent returns the path one level up, or "" at the top.
func parent(path string) string {
	depth := 0
	for i := len(path) - 1; i >= 0; i-- {
		switch path[i] {
		case ']':
			depth++
		case '[':
			depth--
			if depth == 0 {
				return path[:i]
			}
		case '.':
			if depth == 0 {
				return path[:i]
			}
		}
	}
	return ""
}

// merge combines the problems found while decoding with those found by
// validation, in the order their paths appear in the document. A problem
// about a field that is absent sorts after everything written inside its
// nearest present ancestor. A validation problem at or below a path that
// already failed to decode is dropped: it only restates the decoding
// problem.
func merge(decoded, validated Problems, lines map[string]int) Problems {
	type ranked struct {
		Problem
		rank int
	}
	// end is the last line of anything written at or below each path.
	end := map[string]int{}
	extend := func(p string, l int) {
		for q := p; ; q = parent(q) {
			end[q] = max(end[q], l)
			if q == "" {
				break
			}
		}
	}
	for p, l := range lines {
		extend(p, l)
	}
	for _, d := range decoded {
		extend(d.Path, d.Line)
	}
	out := make([]ranked, 0, len(decoded)+len(validated))
	failed := map[string]bool{}
	for _, d := range decoded {
		if d.Path != "" {
			failed[d.Path] = true
		}
		out = append(out, ranked{d, 2 * d.Line})
	}
next:
	for _, p := range validated {
		for q := p.Path; q != ""; q = parent(q) {
			if failed[q] {
				continue next
			}
		}
		if l, ok := lines[p.Path]; ok {
			p.Line = l
			out = append(out, ranked{p, 2 * l})
			continue
		}
		q := p.Path
		for q != "" {
			if _, ok := lines[q]; ok {
				break
			}
			q = parent(q)
		}
		out = append(out, ranked{p, 2*end[q] + 1})
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].rank < out[j].rank })
	res := make(Problems, len(out))
	for i, r := range out {
		res[i] = r.Problem
	}
	return res
}
