// Package cloudinit renders cloud-init user-data: a "#cloud-config" document
// whose only module is write_files. It owns the exact bytes cloud-init reads,
// so that file contents (shell scripts, TOML, JSON, PEM) reach the guest
// unchanged: every content is written as a YAML literal block, nothing is
// ever subject to variable expansion, and the output is deterministic.
//
// Only write_files is offered on purpose: it runs in cloud-init's init
// stage, before docker starts, whereas runcmd runs after the runner has
// started, and restarting docker from it has killed live jobs.
package cloudinit

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io/fs"
	"path"
	"strings"
	"unicode/utf8"
)

// Header is the first line cloud-init requires to treat user-data as
// cloud-config.
const Header = "#cloud-config"

// DefaultOwner is the owner written when a File names none.
const DefaultOwner = "root:root"

// File is one write_files entry.
type File struct {
	// Path is absolute inside the guest.
	Path string
	// Content is written byte for byte.
	Content string
	// Permissions are the file mode bits; zero means 0644.
	Permissions fs.FileMode
	// Owner is "user:group"; empty means root:root.
	Owner string
}

// Config is a cloud-config document made of write_files entries only.
type Config struct {
	WriteFiles []File
}

// Render returns the document. Identical input gives identical bytes.
//
// Content that YAML cannot carry in a literal block (carriage returns,
// control characters other than tab, invalid UTF-8) is written with
// cloud-init's "encoding: b64" instead, which is equally exact.
func (c Config) Render() ([]byte, error) {
	var b bytes.Buffer
	b.WriteString(Header)
	b.WriteString("\n")
	if len(c.WriteFiles) == 0 {
		b.WriteString("write_files: []\n")
		return b.Bytes(), nil
	}
	b.WriteString("write_files:\n")
	seen := make(map[string]bool, len(c.WriteFiles))
	for i, f := range c.WriteFiles {
		if err := f.validate(); err != nil {
			return nil, fmt.Errorf("write_files[%d]: %w", i, err)
		}
		if seen[f.Path] {
			return nil, fmt.Errorf("write_files[%d]: path %s is listed twice", i, f.Path)
		}
		seen[f.Path] = true

		owner := f.Owner
		if owner == "" {
			owner = DefaultOwner
		}
		perm := f.Permissions.Perm()
		if perm == 0 {
			perm = 0o644
		}
		fmt.Fprintf(&b, "- path: %s\n", quote(f.Path))
		fmt.Fprintf(&b, "  owner: %s\n", quote(owner))
		fmt.Fprintf(&b, "  permissions: %s\n", quote(fmt.Sprintf("%#04o", uint32(perm))))
		switch {
		case f.Content == "":
			b.WriteString("  content: \"\"\n")
		case literalSafe(f.Content):
			b.WriteString("  content: ")
			writeLiteral(&b, f.Content, 2)
		default:
			b.WriteString("  encoding: b64\n")
			fmt.Fprintf(&b, "  content: %s\n", base64.StdEncoding.EncodeToString([]byte(f.Content)))
		}
	}
	return b.Bytes(), nil
}

func (f File) validate() error {
	if f.Path == "" {
		return fmt.Errorf("path is empty")
	}
	if !path.IsAbs(f.Path) || path.Clean(f.Path) != f.Path {
		return fmt.Errorf("path %q must be absolute and clean, e.g. /etc/docker/daemon.json", f.Path)
	}
	if !utf8.ValidString(f.Path) || strings.ContainsAny(f.Path, "\x00\n\r") {
		return fmt.Errorf("path %q contains characters a file name cannot hold", f.Path)
	}
	if f.Permissions&^fs.ModePerm != 0 {
		return fmt.Errorf("%s: permissions %v carry more than permission bits", f.Path, f.Permissions)
	}
	if f.Owner != "" && !validOwner(f.Owner) {
		return fmt.Errorf("%s: owner %q must be \"user\" or \"user:group\"", f.Path, f.Owner)
	}
	return nil
}

func validOwner(s string) bool {
	parts := strings.Split(s, ":")
	if len(parts) > 2 {
		return false
	}
	for _, p := range parts {
		if p == "" {
			return false
		}
		for _, r := range p {
			ok := r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '_' || r == '-' || r == '.'
			if !ok {
				return false
			}
		}
	}
	return true
}

// quote returns s as a YAML double-quoted scalar. JSON strings are valid
// YAML double-quoted scalars, and JSON escapes every control character.
func quote(s string) string {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	_ = enc.Encode(s) // a string always encodes
	return strings.TrimSuffix(b.String(), "\n")
}

// literalSafe reports whether s survives a YAML literal block unchanged:
// YAML normalises every line break to \n, so CR, NEL and the Unicode line
// separators would be rewritten, and non-printable characters are not
// allowed in a YAML stream at all.
func literalSafe(s string) bool {
	if !utf8.ValidString(s) {
		return false
	}
	for _, r := range s {
		switch {
		case r == '\n' || r == '\t':
		case r < 0x20 || r == 0x7f:
			return false
		case r >= 0x80 && r <= 0x9f: // C1 controls, including NEL
			return false
		case r == 0x2028 || r == 0x2029 || r == 0xfeff:
			return false
		case r >= 0xd800 && r <= 0xdfff, r == 0xfffe, r == 0xffff:
			return false
		}
	}
	return true
}

// writeLiteral writes s as a literal block scalar for a mapping value whose
// key starts at column keyCol. The header always carries an explicit
// indentation indicator, so content that begins with spaces or blank lines
// reads back exactly, and a chomping indicator that keeps the trailing
// newlines exactly as they are.
func writeLiteral(b *bytes.Buffer, s string, keyCol int) {
	body := strings.TrimRight(s, "\n")
	trailing := len(s) - len(body)
	// Content is indented two columns past the key; the indicator counts
	// from the key's column.
	b.WriteString("|2")
	switch {
	case trailing == 0:
		b.WriteString("-") // strip: no final newline
	case trailing == 1 && body != "":
		// clip: exactly one final newline
	default:
		b.WriteString("+") // keep: every trailing newline is content
	}
	b.WriteString("\n")
	pad := strings.Repeat(" ", keyCol+2)
	for _, line := range strings.Split(body, "\n") {
		if line != "" {
			b.WriteString(pad)
			b.WriteString(line)
		}
		b.WriteString("\n")
	}
	for i := 1; i < trailing; i++ {
		b.WriteString("\n")
	}
}
