package bootstrap

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/fireactions/fireactions/internal/config"
)

// Defaults of the seed's generate-config.py that the daemon's configuration
// does not share (its own defaults, applied by config.ApplyDefaults, cover
// the rest: runner name prefix, image, pull policy, labels, vCPUs, memory,
// kernel arguments).
const (
	DefaultPoolName   = "default"
	DefaultMaxRunners = 10
	DefaultMinRunners = 1
)

// The keys pools.json accepts at each level. The first block of each list is
// the seed's format; the rest are fireactions extensions.
var (
	poolKeys   = []string{"name", "maxRunners", "minRunners", "runner", "firecracker"}
	runnerKeys = []string{
		"name", "image", "imagePullPolicy", "organization", "groupId", "labels",
		"repository", "enterprise",
	}
	firecrackerKeys = []string{
		"vcpuCount", "memSizeMib", "kernelArgs",
		"backend", "diskSize", "kernelModules", "metadata",
	}
)

// fieldProblem is a problem at a path inside one JSON document.
type fieldProblem struct {
	path jsonPath
	off  int64
	msg  string
}

// poolsDecoder maps the seed's camelCase pools.json onto config.Pool,
// collecting every problem instead of stopping at the first.
type poolsDecoder struct {
	problems []fieldProblem
}

func (d *poolsDecoder) fail(path jsonPath, n *jsonNode, format string, args ...any) {
	d.problems = append(d.problems, fieldProblem{path: path, off: n.off, msg: fmt.Sprintf(format, args...)})
}

// decodePools decodes the parsed pools.json. Pools whose problems make them
// unusable are still returned (with zero fields) so that later checks see
// the right indexes; callers must not use the result when problems exist.
func decodePools(root *jsonNode) ([]config.Pool, []fieldProblem) {
	d := &poolsDecoder{}
	if root.kind != jsonArray {
		d.fail("", root, "want a JSON array of pools, got %s", root.describe())
		return nil, d.problems
	}
	if len(root.items) == 0 {
		d.fail("", root, "no pools; list at least one pool")
		return nil, d.problems
	}
	pools := make([]config.Pool, len(root.items))
	for i, item := range root.items {
		pools[i] = d.pool(jsonPath("").index(i), item)
	}
	d.crossCheck(root, pools)
	return pools, d.problems
}

func (d *poolsDecoder) pool(path jsonPath, n *jsonNode) config.Pool {
	p := config.Pool{Name: DefaultPoolName, MaxRunners: DefaultMaxRunners, MinRunners: DefaultMinRunners}
	if !d.object(path, n, poolKeys) {
		return p
	}
	d.str(path.key("name"), n.member("name"), &p.Name)
	d.integer(path.key("maxRunners"), n.member("maxRunners"), &p.MaxRunners)
	d.integer(path.key("minRunners"), n.member("minRunners"), &p.MinRunners)
	if r := n.member("runner"); r != nil {
		p.Runner = d.runner(path.key("runner"), r)
	}
	if f := n.member("firecracker"); f != nil {
		p.VM = d.firecracker(path.key("firecracker"), f)
	}
	return p
}

func (d *poolsDecoder) runner(path jsonPath, n *jsonNode) config.Runner {
	var r config.Runner
	if !d.object(path, n, runnerKeys) {
		return r
	}
	d.str(path.key("name"), n.member("name"), &r.NamePrefix)
	d.str(path.key("image"), n.member("image"), &r.Image)
	var policy string
	d.str(path.key("imagePullPolicy"), n.member("imagePullPolicy"), &policy)
	r.ImagePullPolicy = config.PullPolicy(policy)
	d.str(path.key("organization"), n.member("organization"), &r.Organization)
	d.str(path.key("repository"), n.member("repository"), &r.Repository)
	d.str(path.key("enterprise"), n.member("enterprise"), &r.Enterprise)
	d.integer64(path.key("groupId"), n.member("groupId"), &r.GroupID)
	if l := n.member("labels"); l != nil {
		r.Labels = d.strings(path.key("labels"), l)
	}
	return r
}

func (d *poolsDecoder) firecracker(path jsonPath, n *jsonNode) config.VM {
	var vm config.VM
	if !d.object(path, n, firecrackerKeys) {
		return vm
	}
	d.integer(path.key("vcpuCount"), n.member("vcpuCount"), &vm.VCPUs)
	d.integer(path.key("memSizeMib"), n.member("memSizeMib"), &vm.MemoryMiB)
	d.str(path.key("kernelArgs"), n.member("kernelArgs"), &vm.KernelArgs)
	var backend string
	d.str(path.key("backend"), n.member("backend"), &backend)
	vm.Backend = config.Backend(backend)
	d.str(path.key("kernelModules"), n.member("kernelModules"), &vm.KernelModules)
	if s := n.member("diskSize"); s != nil {
		vm.DiskSize = d.size(path.key("diskSize"), s)
	}
	if m := n.member("metadata"); m != nil {
		vm.Metadata = d.stringMap(path.key("metadata"), m)
	}
	return vm
}

// crossCheck finds the problems that involve more than one field or pool.
func (d *poolsDecoder) crossCheck(root *jsonNode, pools []config.Pool) {
	first := map[string]int{}
	for i, p := range pools {
		item := root.items[i]
		path := jsonPath("").index(i)
		if item.kind != jsonObject {
			continue
		}
		// A name of the wrong type is already reported; it cannot clash.
		nameKnown := item.member("name") == nil || item.member("name").kind == jsonString
		if j, dup := first[p.Name]; nameKnown && dup {
			at := item
			if n := item.member("name"); n != nil {
				at = n
			}
			hint := ""
			if item.member("name") == nil || root.items[j].member("name") == nil {
				hint = fmt.Sprintf("; a pool without a name is called %q", DefaultPoolName)
			}
			d.fail(path.key("name"), at, "duplicate pool name %q, already used by [%d]%s", p.Name, j, hint)
		} else if nameKnown {
			first[p.Name] = i
		}
		if p.MinRunners > p.MaxRunners {
			at := item
			if n := item.member("minRunners"); n != nil {
				at = n
			}
			d.fail(path.key("minRunners"), at, "minRunners (%d) is greater than maxRunners (%d)%s",
				p.MinRunners, p.MaxRunners, defaultedNote(item))
		}
	}
}

// defaultedNote explains a min > max problem that involves a default the
// operator did not write.
func defaultedNote(pool *jsonNode) string {
	switch {
	case pool.member("minRunners") == nil:
		return fmt.Sprintf("; minRunners defaults to %d", DefaultMinRunners)
	case pool.member("maxRunners") == nil:
		return fmt.Sprintf("; maxRunners defaults to %d", DefaultMaxRunners)
	}
	return ""
}

// object checks that n is an object with only known keys.
func (d *poolsDecoder) object(path jsonPath, n *jsonNode, known []string) bool {
	if n.kind != jsonObject {
		d.fail(path, n, "want an object, got %s", n.describe())
		return false
	}
	for _, m := range n.members {
		if !contains(known, m.key) {
			d.problems = append(d.problems, fieldProblem{
				path: path.key(m.key), off: m.off, msg: unknownField(m.key, known),
			})
		}
	}
	return true
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

// unknownField names the nearest known key, as the config decoder does.
func unknownField(key string, known []string) string {
	best, bestDist := "", -1
	for _, k := range known {
		dist := editDistance(strings.ToLower(key), strings.ToLower(k))
		if bestDist < 0 || dist < bestDist {
			best, bestDist = k, dist
		}
	}
	// Suggest only near misses: a typo, a case or snake_case slip.
	if bestDist >= 0 && bestDist <= max(2, len(best)/3) {
		return fmt.Sprintf("unknown field; did you mean %s?", best)
	}
	return fmt.Sprintf("unknown field; known fields are %s", strings.Join(known, ", "))
}

// editDistance is the Levenshtein distance between a and b.
func editDistance(a, b string) int {
	ra, rb := []rune(a), []rune(b)
	prev := make([]int, len(rb)+1)
	cur := make([]int, len(rb)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(ra); i++ {
		cur[0] = i
		for j := 1; j <= len(rb); j++ {
			cost := 1
			if ra[i-1] == rb[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(rb)]
}

// str stores a string value; an absent value leaves dst untouched.
func (d *poolsDecoder) str(path jsonPath, n *jsonNode, dst *string) {
	if n == nil {
		return
	}
	if n.kind != jsonString {
		d.fail(path, n, "want a string, got %s", n.describe())
		return
	}
	*dst = n.str
}

func (d *poolsDecoder) integer(path jsonPath, n *jsonNode, dst *int) {
	if n == nil {
		return
	}
	v, ok := d.parseInt(path, n, 32)
	if ok {
		*dst = int(v)
	}
}

func (d *poolsDecoder) integer64(path jsonPath, n *jsonNode, dst *int64) {
	if n == nil {
		return
	}
	if v, ok := d.parseInt(path, n, 64); ok {
		*dst = v
	}
}

func (d *poolsDecoder) parseInt(path jsonPath, n *jsonNode, bits int) (int64, bool) {
	if n.kind != jsonNumber {
		d.fail(path, n, "want an integer, got %s", n.describe())
		return 0, false
	}
	v, err := strconv.ParseInt(n.num.String(), 10, bits)
	if err != nil {
		if ne, ok := err.(*strconv.NumError); ok && ne.Err == strconv.ErrRange {
			d.fail(path, n, "%s is out of range", n.describe())
		} else {
			d.fail(path, n, "want an integer, got %s", n.describe())
		}
		return 0, false
	}
	return v, true
}

// strings decodes an array of strings; an explicit [] stays empty (not the
// default labels).
func (d *poolsDecoder) strings(path jsonPath, n *jsonNode) []string {
	if n.kind != jsonArray {
		d.fail(path, n, "want an array of strings, got %s", n.describe())
		return nil
	}
	out := make([]string, 0, len(n.items))
	for i, item := range n.items {
		if item.kind != jsonString {
			d.fail(path.index(i), item, "want a string, got %s", item.describe())
			continue
		}
		out = append(out, item.str)
	}
	return out
}

func (d *poolsDecoder) stringMap(path jsonPath, n *jsonNode) map[string]string {
	if n.kind != jsonObject {
		d.fail(path, n, "want an object of strings, got %s", n.describe())
		return nil
	}
	out := make(map[string]string, len(n.members))
	for _, m := range n.members {
		if m.val.kind != jsonString {
			// Every meta-data leaf must be a string: cloud-init's Ec2
			// datasource reads nothing else.
			d.fail(path.key(m.key), m.val, "want a string, got %s (quote it)", m.val.describe())
			continue
		}
		out[m.key] = m.val.str
	}
	return out
}

// size accepts "20GiB"-style strings and plain byte counts.
func (d *poolsDecoder) size(path jsonPath, n *jsonNode) config.ByteSize {
	var text string
	switch n.kind {
	case jsonString:
		text = n.str
	case jsonNumber:
		text = n.num.String()
	default:
		d.fail(path, n, "want a size such as \"20GiB\", got %s", n.describe())
		return 0
	}
	v, err := config.ParseByteSize(text)
	if err != nil {
		d.fail(path, n, "%v", err)
		return 0
	}
	return v
}
