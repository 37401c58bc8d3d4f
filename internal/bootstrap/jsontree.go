package bootstrap

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"unicode/utf8"
)

// jsonNode is one JSON value with the byte offset where it starts.
// encoding/json's struct decoding neither keeps positions nor reports more
// than the first problem, and DisallowUnknownFields names no path; decoding
// to this tree first lets every problem carry its path, line and column.
type jsonNode struct {
	kind    jsonKind
	off     int64
	str     string      // jsonString
	num     json.Number // jsonNumber
	boolean bool        // jsonBool
	members []jsonMember
	items   []*jsonNode
}

type jsonMember struct {
	key string
	off int64 // where the key starts
	val *jsonNode
}

type jsonKind int

const (
	jsonNull jsonKind = iota
	jsonBool
	jsonNumber
	jsonString
	jsonArray
	jsonObject
)

// jsonSyntaxError is malformed JSON at a byte offset.
type jsonSyntaxError struct {
	off int64
	msg string
}

func (e *jsonSyntaxError) Error() string { return e.msg }

// parseJSONTree decodes exactly one JSON value. Duplicate object keys are
// reported as syntax errors: encoding/json silently keeps the last one,
// which hides a copy-paste mistake.
func parseJSONTree(data []byte) (*jsonNode, error) {
	if len(bytes.TrimSpace(data)) == 0 {
		return nil, &jsonSyntaxError{off: 0, msg: "empty file; want a JSON array of pools"}
	}
	// The token decoder's SyntaxError offsets depend on its buffering;
	// Unmarshal's are exact (the offending byte is the one before Offset),
	// so it locates syntax errors before the tree is built.
	var raw json.RawMessage
	if err := json.Unmarshal(data, &raw); err != nil {
		var se *json.SyntaxError
		if !errors.As(err, &se) {
			return nil, &jsonSyntaxError{off: 0, msg: "invalid JSON: " + err.Error()}
		}
		at := se.Offset - 1
		if se.Offset >= int64(len(data)) && strings.HasPrefix(se.Error(), "unexpected end") {
			at = int64(len(data))
		}
		return nil, &jsonSyntaxError{off: max(at, 0), msg: "invalid JSON: " + se.Error()}
	}
	p := &treeParser{data: data, dec: json.NewDecoder(bytes.NewReader(data))}
	p.dec.UseNumber()
	n, err := p.value()
	if err != nil {
		return nil, err
	}
	return n, nil
}

type treeParser struct {
	data []byte
	dec  *json.Decoder
}

// next returns the offset where the next token starts: InputOffset points
// just past the previous token, before any whitespace or separator.
func (p *treeParser) next() int64 {
	off := p.dec.InputOffset()
	for off < int64(len(p.data)) {
		switch p.data[off] {
		case ' ', '\t', '\r', '\n', ':', ',':
			off++
			continue
		}
		break
	}
	return off
}

func (p *treeParser) token() (json.Token, int64, error) {
	off := p.next()
	tok, err := p.dec.Token()
	if err != nil {
		// Unreachable for input Unmarshal accepted; kept so a decoder
		// change cannot turn into a panic.
		return nil, off, &jsonSyntaxError{off: off, msg: "invalid JSON: " + err.Error()}
	}
	return tok, off, nil
}

func (p *treeParser) value() (*jsonNode, error) {
	tok, off, err := p.token()
	if err != nil {
		return nil, err
	}
	n := &jsonNode{off: off}
	switch t := tok.(type) {
	case nil:
		n.kind = jsonNull
	case bool:
		n.kind, n.boolean = jsonBool, t
	case json.Number:
		n.kind, n.num = jsonNumber, t
	case string:
		n.kind, n.str = jsonString, t
	case json.Delim:
		switch t {
		case '[':
			n.kind = jsonArray
			for p.dec.More() {
				item, err := p.value()
				if err != nil {
					return nil, err
				}
				n.items = append(n.items, item)
			}
		case '{':
			n.kind = jsonObject
			seen := map[string]bool{}
			for p.dec.More() {
				ktok, koff, err := p.token()
				if err != nil {
					return nil, err
				}
				key, _ := ktok.(string) // the decoder only yields string keys here
				if seen[key] {
					return nil, &jsonSyntaxError{off: koff, msg: fmt.Sprintf("duplicate key %q", key)}
				}
				seen[key] = true
				val, err := p.value()
				if err != nil {
					return nil, err
				}
				n.members = append(n.members, jsonMember{key: key, off: koff, val: val})
			}
		}
		if _, _, err := p.token(); err != nil { // the closing delimiter
			return nil, err
		}
	}
	return n, nil
}

// member returns the value of key, or nil when the key is absent or null:
// the seed's generator treated both as "use the default".
func (n *jsonNode) member(key string) *jsonNode {
	for _, m := range n.members {
		if m.key == key {
			if m.val.kind == jsonNull {
				return nil
			}
			return m.val
		}
	}
	return nil
}

// describe names a value for "want X, got Y" messages without dumping
// large values.
func (n *jsonNode) describe() string {
	switch n.kind {
	case jsonNull:
		return "null"
	case jsonBool:
		return strconv.FormatBool(n.boolean)
	case jsonNumber:
		return truncate(n.num.String())
	case jsonString:
		return strconv.Quote(truncate(n.str))
	case jsonArray:
		return "an array"
	default:
		return "an object"
	}
}

func truncate(s string) string {
	const limit = 40
	if utf8.RuneCountInString(s) <= limit {
		return s
	}
	r := []rune(s)
	return string(r[:limit]) + "…"
}

// position converts a byte offset into a 1-based line and column (in
// characters).
func position(data []byte, off int64) (line, col int) {
	off = min(max(off, 0), int64(len(data)))
	head := data[:off]
	line = 1 + bytes.Count(head, []byte{'\n'})
	if i := bytes.LastIndexByte(head, '\n'); i >= 0 {
		head = head[i+1:]
	}
	return line, utf8.RuneCount(head) + 1
}

// jsonPath is a path inside pools.json, written like "[0].runner.labels[1]".
type jsonPath string

func (p jsonPath) index(i int) jsonPath { return jsonPath(fmt.Sprintf("%s[%d]", p, i)) }

func (p jsonPath) key(k string) jsonPath {
	if isIdentifier(k) {
		if p == "" {
			return jsonPath(k)
		}
		return p + "." + jsonPath(k)
	}
	return jsonPath(fmt.Sprintf("%s[%s]", p, strconv.Quote(k)))
}

func isIdentifier(s string) bool {
	if s == "" {
		return false
	}
	return strings.IndexFunc(s, func(r rune) bool {
		return !(r == '_' || r == '-' || r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9')
	}) < 0
}
