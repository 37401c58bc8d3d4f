package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"regexp"
	"slices"
	"strings"

	"github.com/go-openapi/loads"
	"github.com/go-openapi/spec"
	"github.com/go-openapi/strfmt"
	"github.com/go-openapi/validate"
)

// apiSpec is the Firecracker API as the SDK's swagger file describes it.
type apiSpec struct {
	version string
	routes  []route
}

// route is one path template with its operations by method.
type route struct {
	template string
	re       *regexp.Regexp
	params   []string // path parameter names, in order
	ops      map[string]*operation
}

type operation struct {
	id   string
	body *spec.Schema // nil: no body parameter
	// bodyRequired: the body parameter is required.
	bodyRequired bool
}

func loadAPI() (*apiSpec, error) {
	path := os.Getenv("FAKEFC_SWAGGER")
	if path == "" {
		path = swaggerPath
	}
	if path == "" {
		return nil, errors.New("no swagger file: build with -ldflags \"-X main.swaggerPath=<firecracker-go-sdk dir>/client/swagger.yaml\" or set FAKEFC_SWAGGER")
	}
	sw, err := expandedSpec(path)
	if err != nil {
		return nil, err
	}
	api := &apiSpec{version: sw.Info.Version}
	for tmpl, item := range sw.Paths.Paths {
		r := route{template: tmpl, ops: map[string]*operation{}}
		// Each {name} matches one non-empty path segment.
		var b strings.Builder
		rest := tmpl
		for {
			i := strings.Index(rest, "{")
			if i < 0 {
				b.WriteString(regexp.QuoteMeta(rest))
				break
			}
			j := i + strings.Index(rest[i:], "}")
			b.WriteString(regexp.QuoteMeta(rest[:i]))
			b.WriteString(`([^/]+)`)
			r.params = append(r.params, rest[i+1:j])
			rest = rest[j+1:]
		}
		r.re = regexp.MustCompile("^" + b.String() + "$")
		for method, op := range map[string]*spec.Operation{
			"GET": item.Get, "PUT": item.Put, "PATCH": item.Patch, "POST": item.Post, "DELETE": item.Delete,
		} {
			if op == nil {
				continue
			}
			o := &operation{id: op.ID}
			for _, p := range op.Parameters {
				if p.In == "body" && p.Schema != nil {
					s := *p.Schema
					closeObjects(&s)
					o.body, o.bodyRequired = &s, p.Required
				}
			}
			r.ops[method] = o
		}
		api.routes = append(api.routes, r)
	}
	// Literal paths before templated ones, so /mmds/config is not taken
	// for an instance of some /mmds/{x}.
	slices.SortFunc(api.routes, func(a, b route) int { return len(a.params) - len(b.params) })
	return api, nil
}

// closeObjects forbids properties a schema does not declare, recursively:
// Firecracker deserialises bodies with serde's deny_unknown_fields, which
// the swagger file does not spell out. Free-form objects (no declared
// properties, such as the MMDS contents) stay open.
func closeObjects(s *spec.Schema) {
	if s == nil {
		return
	}
	if len(s.Properties) > 0 && s.AdditionalProperties == nil {
		s.AdditionalProperties = &spec.SchemaOrBool{Allows: false}
	}
	for k, p := range s.Properties {
		closeObjects(&p)
		s.Properties[k] = p
	}
	if s.Items != nil {
		closeObjects(s.Items.Schema)
		for i := range s.Items.Schemas {
			closeObjects(&s.Items.Schemas[i])
		}
	}
	for i := range s.AllOf {
		closeObjects(&s.AllOf[i])
	}
}

// match finds the operation for a request.
func (a *apiSpec) match(method, path string) (*operation, map[string]string, bool) {
	for _, r := range a.routes {
		m := r.re.FindStringSubmatch(path)
		if m == nil {
			continue
		}
		op, ok := r.ops[method]
		if !ok {
			return nil, nil, false
		}
		params := map[string]string{}
		for i, name := range r.params {
			params[name] = m[i+1]
		}
		return op, params, true
	}
	return nil, nil, false
}

// validateBody checks a decoded JSON body against the operation's schema.
func (o *operation) validateBody(body any) error {
	if o.body == nil {
		return nil
	}
	if err := validate.AgainstSchema(o.body, body, strfmt.Default); err != nil {
		msg := strings.TrimPrefix(err.Error(), "validation failure list:\n")
		return fmt.Errorf("the request body does not match the Firecracker API: %s", strings.ReplaceAll(msg, "\n", "; "))
	}
	return nil
}

// expandedSpec returns the swagger file with every $ref resolved. Parsing
// the YAML and expanding it takes hundreds of milliseconds, paid once: the
// result is cached as JSON next to the fake's executable, keyed by the
// source file's path, size and modification time.
func expandedSpec(path string) (*spec.Swagger, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	key := fmt.Sprintf("%s %d %d", path, fi.Size(), fi.ModTime().UnixNano())
	var cachePath string
	if exe, err := os.Executable(); err == nil {
		cachePath = exe + ".swagger.json"
	}
	type cached struct {
		Key     string        `json:"key"`
		Swagger *spec.Swagger `json:"swagger"`
	}
	if cachePath != "" {
		if b, err := os.ReadFile(cachePath); err == nil {
			var c cached
			if json.Unmarshal(b, &c) == nil && c.Key == key && c.Swagger != nil {
				return c.Swagger, nil
			}
		}
	}
	doc, err := loads.Spec(path)
	if err != nil {
		return nil, fmt.Errorf("load %s: %w", path, err)
	}
	doc, err = doc.Expanded()
	if err != nil {
		return nil, fmt.Errorf("expand %s: %w", path, err)
	}
	sw := doc.Spec()
	if cachePath != "" {
		if b, err := json.Marshal(cached{Key: key, Swagger: sw}); err == nil {
			tmp := fmt.Sprintf("%s.%d.tmp", cachePath, os.Getpid())
			if os.WriteFile(tmp, b, 0o644) == nil {
				_ = os.Rename(tmp, cachePath)
			}
		}
	}
	return sw, nil
}

// specVersion reads the API version from the swagger file without parsing
// it (for --version, which must be quick).
func specVersion() string {
	path := os.Getenv("FAKEFC_SWAGGER")
	if path == "" {
		path = swaggerPath
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return "0.0.0"
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "version: "); ok {
			return strings.Trim(v, `"`)
		}
	}
	return "0.0.0"
}
