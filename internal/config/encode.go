package config

import (
	"bytes"
	"fmt"
	"strings"
	"unicode"

	"go.yaml.in/yaml/v3"
)

// Marshal encodes c as canonical YAML: two-space indent, fields in schema
// order, and every multi-line string (PEM keys, user-data) as a block
// literal, so the output is readable, diffable and byte-identical for
// identical input.
func Marshal(c *Config) ([]byte, error) {
	var n yaml.Node
	if err := n.Encode(c); err != nil {
		return nil, fmt.Errorf("encode config: %w", err)
	}
	literalBlocks(&n)
	var buf bytes.Buffer
	enc := yaml.NewEncoder(&buf)
	enc.SetIndent(2)
	if err := enc.Encode(&n); err != nil {
		return nil, fmt.Errorf("encode config: %w", err)
	}
	if err := enc.Close(); err != nil {
		return nil, fmt.Errorf("encode config: %w", err)
	}
	return buf.Bytes(), nil
}

func literalBlocks(n *yaml.Node) {
	if n.Kind == yaml.ScalarNode && n.Tag == "!!str" && literalSafe(n.Value) {
		n.Style = yaml.LiteralStyle
	}
	for _, c := range n.Content {
		literalBlocks(c)
	}
}

// literalSafe reports whether s is multi-line and reads back unchanged from
// a block literal. A literal cannot hold carriage returns or the Unicode
// line breaks (YAML readers turn them into "\n"), trailing spaces on a line
// or non-printable characters; such strings stay double-quoted with escapes.
func literalSafe(s string) bool {
	if !strings.Contains(s, "\n") {
		return false
	}
	for i, line := range strings.Split(s, "\n") {
		if strings.HasSuffix(line, " ") || strings.HasSuffix(line, "\t") {
			return false
		}
		// A leading space on the first line needs an indentation
		// indicator, which not every emitter writes correctly.
		if i == 0 && (strings.HasPrefix(line, " ") || strings.HasPrefix(line, "\t")) {
			return false
		}
		for _, r := range line {
			if r == '\t' {
				continue
			}
			if r == '\r' || r == '\u0085' || r == '\u2028' || r == '\u2029' || r == '\ufeff' || !unicode.IsPrint(r) && r != ' ' {
				return false
			}
		}
	}
	return true
}
