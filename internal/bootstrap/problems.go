package bootstrap

import (
	"cmp"
	"fmt"
	"slices"
	"strings"
)

// Problem is one thing wrong with the bootstrap inputs, located in the input
// the operator has to edit (a file of the input directory or an environment
// variable), not in the generated configuration they never wrote.
type Problem struct {
	// Source is the input: a file's full path, or an environment variable
	// with its flag ("ZOT_PORT (--zot-port)").
	Source string
	// Line and Column locate the problem in Source (1-based); 0 when
	// unknown or meaningless.
	Line, Column int
	// Path is the location inside Source, e.g. "[0].runner.labels[1]" in
	// pools.json; empty for the whole input.
	Path    string
	Message string

	rank int   // input order, for sorting
	off  int64 // byte offset in Source, for sorting
}

func (p Problem) String() string {
	var b strings.Builder
	b.WriteString(p.Source)
	if p.Line > 0 {
		fmt.Fprintf(&b, ":%d:%d", p.Line, p.Column)
	}
	b.WriteString(": ")
	if p.Path != "" {
		b.WriteString(p.Path)
		b.WriteString(": ")
	}
	b.WriteString(p.Message)
	return b.String()
}

// Problems is every problem found in the inputs. The bootstrap reports them
// all at once so one edit-run cycle fixes them all.
type Problems []Problem

func (ps Problems) Error() string {
	lines := make([]string, len(ps))
	for i, p := range ps {
		lines[i] = p.String()
	}
	return strings.Join(lines, "\n")
}

// sorted orders problems the way the inputs are listed in the docs, then by
// position inside each input.
func (ps Problems) sorted() Problems {
	slices.SortStableFunc(ps, func(a, b Problem) int {
		return cmp.Or(cmp.Compare(a.rank, b.rank), cmp.Compare(a.off, b.off), cmp.Compare(a.Path, b.Path))
	})
	return ps
}

// covers reports whether a problem is already reported at path in source,
// or at a path inside or around it: validation often restates what decoding
// found (a field with the wrong type is also out of range once zeroed).
func (ps Problems) covers(source, path string) bool {
	for _, p := range ps {
		if p.Source != source {
			continue
		}
		if p.Path == path || within(p.Path, path) || within(path, p.Path) {
			return true
		}
	}
	return false
}

// within reports whether path lies inside parent ("[0].runner.labels" is
// within "[0].runner" and within "").
func within(path, parent string) bool {
	if parent == "" {
		return true
	}
	if !strings.HasPrefix(path, parent) {
		return false
	}
	rest := path[len(parent):]
	return rest == "" || rest[0] == '.' || rest[0] == '['
}
