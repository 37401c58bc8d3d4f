package guest

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"strconv"
	"strings"
)

// User is a resolved Process.User.
type User struct {
	UID, GID uint32
	// Groups are the supplementary group IDs.
	Groups []uint32
	Name   string
	Home   string
}

type passwdEntry struct {
	name     string
	uid, gid uint32
	home     string
}

type groupEntry struct {
	name    string
	gid     uint32
	members []string
}

// LookupUser resolves spec ("", "uid", "uid:gid", "name", "name:group")
// against etc/passwd and etc/group in fsys, the image's root, with the
// rules container runtimes use: a numeric uid need not exist in
// etc/passwd (its group is then 0 and its home "/"); a name must; an
// explicit group replaces the passwd group and drops supplementary groups,
// otherwise the user's memberships in etc/group become supplementary
// groups.
func LookupUser(fsys fs.FS, spec string) (User, error) {
	userPart, groupPart, hasGroup := strings.Cut(spec, ":")
	if hasGroup && groupPart == "" {
		return User{}, fmt.Errorf("user %q: empty group after ':'", spec)
	}
	if userPart == "" {
		if hasGroup {
			return User{}, fmt.Errorf("user %q: empty user before ':'", spec)
		}
		userPart = "0"
	}
	users, err := readPasswd(fsys)
	if err != nil {
		return User{}, err
	}
	u := User{Home: "/"}
	uid, uidErr := parseID(userPart)
	var found *passwdEntry
	for i := range users {
		if (uidErr == nil && users[i].uid == uid) || (uidErr != nil && users[i].name == userPart) {
			found = &users[i]
			break
		}
	}
	switch {
	case found != nil:
		u.UID, u.GID, u.Name, u.Home = found.uid, found.gid, found.name, found.home
		if u.Home == "" {
			u.Home = "/"
		}
	case uidErr == nil:
		u.UID = uid
	default:
		return User{}, fmt.Errorf("user %q: no such user in /etc/passwd", userPart)
	}

	if !hasGroup && found == nil {
		return u, nil
	}
	groups, err := readGroup(fsys)
	if err != nil {
		return User{}, err
	}
	if hasGroup {
		gid, gidErr := parseID(groupPart)
		if gidErr == nil {
			u.GID = gid
			return u, nil
		}
		for _, g := range groups {
			if g.name == groupPart {
				u.GID = g.gid
				return u, nil
			}
		}
		return User{}, fmt.Errorf("group %q: no such group in /etc/group", groupPart)
	}
	for _, g := range groups {
		for _, m := range g.members {
			if m == u.Name {
				u.Groups = append(u.Groups, g.gid)
				break
			}
		}
	}
	return u, nil
}

func parseID(s string) (uint32, error) {
	n, err := strconv.ParseUint(s, 10, 32)
	return uint32(n), err
}

// readLines returns the lines of name split at ':'; a missing file has no
// lines, as in a scratch image.
func readLines(fsys fs.FS, name string, minFields int) ([][]string, error) {
	f, err := fsys.Open(name)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read /%s: %w", name, err)
	}
	defer f.Close()
	var out [][]string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || line[0] == '#' || line[0] == '+' || line[0] == '-' {
			continue
		}
		fields := strings.Split(line, ":")
		if len(fields) < minFields {
			continue
		}
		out = append(out, fields)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read /%s: %w", name, err)
	}
	return out, nil
}

func readPasswd(fsys fs.FS) ([]passwdEntry, error) {
	lines, err := readLines(fsys, "etc/passwd", 4)
	if err != nil {
		return nil, err
	}
	var out []passwdEntry
	for _, f := range lines {
		uid, err1 := parseID(f[2])
		gid, err2 := parseID(f[3])
		if err1 != nil || err2 != nil {
			continue
		}
		e := passwdEntry{name: f[0], uid: uid, gid: gid}
		if len(f) > 5 {
			e.home = f[5]
		}
		out = append(out, e)
	}
	return out, nil
}

func readGroup(fsys fs.FS) ([]groupEntry, error) {
	lines, err := readLines(fsys, "etc/group", 3)
	if err != nil {
		return nil, err
	}
	var out []groupEntry
	for _, f := range lines {
		gid, err := parseID(f[2])
		if err != nil {
			continue
		}
		e := groupEntry{name: f[0], gid: gid}
		if len(f) > 3 && f[3] != "" {
			e.members = strings.Split(f[3], ",")
		}
		out = append(out, e)
	}
	return out, nil
}
