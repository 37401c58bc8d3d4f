package bootstrap

import (
	"strconv"
	"strings"

	"github.com/fireactions/fireactions/internal/config"
)

// pools.json names of the config.Pool fields the bootstrap fills, by their
// path under pools[i] in the configuration.
var poolFieldNames = map[string]string{
	"name":                     "name",
	"min_runners":              "minRunners",
	"max_runners":              "maxRunners",
	"runner":                   "runner",
	"runner.name_prefix":       "runner.name",
	"runner.image":             "runner.image",
	"runner.image_pull_policy": "runner.imagePullPolicy",
	"runner.organization":      "runner.organization",
	"runner.repository":        "runner.repository",
	"runner.enterprise":        "runner.enterprise",
	"runner.group_id":          "runner.groupId",
	"runner.labels":            "runner.labels",
	"vm":                       "firecracker",
	"vm.backend":               "firecracker.backend",
	"vm.vcpus":                 "firecracker.vcpuCount",
	"vm.memory_mib":            "firecracker.memSizeMib",
	"vm.kernel_args":           "firecracker.kernelArgs",
	"vm.kernel_modules":        "firecracker.kernelModules",
	"vm.disk_size":             "firecracker.diskSize",
	"vm.metadata":              "firecracker.metadata",
}

// translate restates a validation problem of the generated configuration
// in terms of the input that produced the value, so the operator knows
// what to edit. Problems already reported while decoding are dropped.
func (b *builder) translate(cp config.Problem) {
	segs := splitPath(cp.Path)
	source, rest := srcGenerated, cp.Path
	var poolPath jsonPath
	inPools := false

	switch top := first(segs); {
	case top == "github" && len(segs) >= 2 && segs[1] == "app_id":
		source, rest = FileAppID, ""
	case top == "github" && (len(segs) == 1 || segs[1] == "private_key" || segs[1] == "private_key_file"):
		source, rest = FilePrivateKey, ""
	case top == "server" && len(segs) >= 2 && segs[1] == "address" && b.files[FileBindAddress] != nil:
		source, rest = FileBindAddress, ""
	case top == "server" && len(segs) >= 2 && segs[1] == "auth_token_file" && b.files[FileAuthToken] != nil:
		source, rest = FileAuthToken, ""
	case top == "log" && len(segs) >= 2 && segs[1] == "level" && b.files[FileLogLevel] != nil:
		source, rest = FileLogLevel, ""
	case top == "registry_cache" && len(segs) >= 2:
		switch {
		case segs[1] == "enabled":
			source, rest = srcEnabled, ""
		case segs[1] == "gateway":
			source, rest = srcGateway, ""
		case segs[1] == "zot" && len(segs) >= 3 && segs[2] == "port":
			source, rest = srcZotPort, ""
		case segs[1] == "mirrors":
			source, rest = srcZotMirrors, mirrorPath(segs[2:], b)
		}
	case top == "pools" && len(segs) == 1:
		source, rest, inPools = FilePools, "", true
	case top == "pools":
		i, ok := segs[1].(int)
		if !ok {
			break
		}
		field := joinKeys(segs[2:])
		switch {
		case field == "vm.kernel" && b.kernelFromEnv:
			source, rest = srcKernelPath, ""
		default:
			name, tail, ok := poolField(segs[2:])
			if !ok {
				break
			}
			poolPath = jsonPath("").index(i)
			if name != "" {
				for _, k := range strings.Split(name, ".") {
					poolPath = poolPath.key(k)
				}
			}
			for _, s := range tail {
				switch s := s.(type) {
				case int:
					poolPath = poolPath.index(s)
				case string:
					poolPath = poolPath.key(s)
				}
			}
			source, rest, inPools = FilePools, string(poolPath), true
		}
	}

	if b.problems.covers(b.sourceName(source), rest) {
		return
	}
	msg := cp.Message
	if source == FileBindAddress && b.files[FileAuthToken] == nil && strings.Contains(msg, "auth_token_file") {
		// The operator writes files, not configuration keys.
		msg += "; to set it, write the token into " + b.path(FileAuthToken)
	}
	if inPools {
		b.addAt(FilePools, rest, b.locate(rest), msg)
		return
	}
	b.add(source, rest, 0, msg)
}

// sourceName is the Source a problem in the named input carries.
func (b *builder) sourceName(source string) string {
	if isInputFile(source) {
		return b.path(source)
	}
	return source
}

// poolField maps the path under pools[i] to the pools.json name of the
// longest known field prefix and what follows it (list indexes, metadata
// keys).
func poolField(segs []any) (name string, tail []any, ok bool) {
	if len(segs) == 0 {
		return "", nil, true
	}
	for n := len(segs); n > 0; n-- {
		if name, known := poolFieldNames[joinKeys(segs[:n])]; known {
			return name, segs[n:], true
		}
	}
	return "", nil, false
}

// mirrorPath names the ZOT_MIRRORS entry of a mirrors[i] problem.
func mirrorPath(segs []any, b *builder) string {
	if len(segs) == 0 {
		return ""
	}
	i, ok := segs[0].(int)
	if !ok || i >= len(b.mirrors) {
		return ""
	}
	return string(jsonPath("").key(b.mirrors[i].Registry))
}

// locate finds where a pools.json path is, or its nearest present
// ancestor when the value was defaulted.
func (b *builder) locate(path string) int64 {
	n := b.poolsTree
	if n == nil {
		return 0
	}
	for _, s := range splitPath(path) {
		var next *jsonNode
		switch s := s.(type) {
		case int:
			if n.kind == jsonArray && s < len(n.items) {
				next = n.items[s]
			}
		case string:
			if n.kind == jsonObject {
				next = n.member(s)
			}
		}
		if next == nil {
			break
		}
		n = next
	}
	return n.off
}

func first(segs []any) any {
	if len(segs) == 0 {
		return nil
	}
	return segs[0]
}

// joinKeys joins the leading string segments with dots.
func joinKeys(segs []any) string {
	var keys []string
	for _, s := range segs {
		k, ok := s.(string)
		if !ok {
			break
		}
		keys = append(keys, k)
	}
	if len(keys) != len(segs) {
		return "\x00" // an index inside: no field name matches
	}
	return strings.Join(keys, ".")
}

// splitPath splits a path such as `pools[0].vm.metadata["a.b"]` (the form
// config.Problem and pools.json problems both use) into keys (string) and
// indexes (int).
func splitPath(path string) []any {
	var segs []any
	for i := 0; i < len(path); {
		switch path[i] {
		case '.':
			i++
		case '[':
			end := strings.IndexByte(path[i:], ']')
			if i+1 < len(path) && path[i+1] == '"' {
				// A quoted key may itself contain ']': find the closing
				// quote first.
				if q, err := strconv.QuotedPrefix(path[i+1:]); err == nil {
					k, _ := strconv.Unquote(q)
					segs = append(segs, k)
					i += 1 + len(q) + 1
					continue
				}
			}
			if end < 0 {
				segs = append(segs, path[i:])
				return segs
			}
			inner := path[i+1 : i+end]
			if n, err := strconv.Atoi(inner); err == nil {
				segs = append(segs, n)
			} else {
				segs = append(segs, inner)
			}
			i += end + 1
		default:
			j := i
			for j < len(path) && path[j] != '.' && path[j] != '[' {
				j++
			}
			segs = append(segs, path[i:j])
			i = j
		}
	}
	return segs
}
