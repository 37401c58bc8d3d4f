package pool

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/fireactions/fireactions/internal/config"
	"github.com/fireactions/fireactions/internal/github"
)

// The store keeps what a restarted daemon needs, under <data-dir>/pools:
//
//	<pool>/pool.json            sizes and pause set at run time through the API
//	<pool>/runners/<name>.json  one record per runner this daemon registered
//
// A runner's record is written before its registration is requested, so
// that no registration can exist without a record naming it, and removed
// only once GitHub no longer has the runner and its VM is gone.
type store struct {
	dir string
}

// record is the persisted form of one runner. It never holds the JIT
// configuration.
type record struct {
	Name      string    `json:"name"`
	Pool      string    `json:"pool"`
	ScopeKind string    `json:"scope_kind"`
	ScopeName string    `json:"scope_name"`
	RunnerID  int64     `json:"runner_id,omitempty"`
	State     State     `json:"state"`
	Created   time.Time `json:"created"`
	Started   time.Time `json:"started,omitzero"`
	IdleAt    time.Time `json:"idle_at,omitzero"`
	BusyAt    time.Time `json:"busy_at,omitzero"`
}

func (r record) scope() github.Scope {
	return github.Scope{Kind: config.Scope(r.ScopeKind), Name: r.ScopeName}
}

// poolState is what the API changed about a pool at run time.
type poolState struct {
	Min    *int `json:"min_runners,omitempty"`
	Max    *int `json:"max_runners,omitempty"`
	Paused bool `json:"paused,omitempty"`
}

func newStore(dir string) (*store, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("pool state: %w", err)
	}
	return &store{dir: dir}, nil
}

func (s *store) runnerPath(pool, name string) string {
	return filepath.Join(s.dir, pool, "runners", name+".json")
}

func (s *store) saveRunner(r record) error {
	return writeJSON(s.runnerPath(r.Pool, r.Name), r)
}

func (s *store) deleteRunner(pool, name string) error {
	err := os.Remove(s.runnerPath(pool, name))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("pool state: %w", err)
	}
	return nil
}

// runners reads every runner record of every pool, including pools no
// longer configured. Unreadable records are reported, not skipped.
func (s *store) runners() ([]record, error) {
	paths, err := filepath.Glob(filepath.Join(s.dir, "*", "runners", "*.json"))
	if err != nil {
		return nil, err
	}
	var out []record
	var errs []error
	for _, p := range paths {
		var r record
		if err := readJSON(p, &r); err != nil {
			errs = append(errs, err)
			continue
		}
		if r.Name+".json" != filepath.Base(p) || r.Pool != filepath.Base(filepath.Dir(filepath.Dir(p))) {
			errs = append(errs, fmt.Errorf("pool state %s: names runner %q of pool %q", p, r.Name, r.Pool))
			continue
		}
		out = append(out, r)
	}
	return out, errors.Join(errs...)
}

func (s *store) loadPool(pool string) (poolState, error) {
	var st poolState
	err := readJSON(filepath.Join(s.dir, pool, "pool.json"), &st)
	if errors.Is(err, fs.ErrNotExist) {
		return poolState{}, nil
	}
	return st, err
}

func (s *store) savePool(pool string, st poolState) error {
	return writeJSON(filepath.Join(s.dir, pool, "pool.json"), st)
}

// writeJSON replaces path atomically (temporary file, fsync, rename), so a
// crash leaves the old or the new content, never a torn file.
func writeJSON(path string, v any) error {
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return fmt.Errorf("pool state %s: %w", path, err)
	}
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("pool state: %w", err)
	}
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".*")
	if err != nil {
		return fmt.Errorf("pool state: %w", err)
	}
	_, werr := f.Write(append(data, '\n'))
	if werr == nil {
		werr = f.Sync()
	}
	if cerr := f.Close(); werr == nil {
		werr = cerr
	}
	if werr == nil {
		werr = os.Rename(f.Name(), path)
	}
	if werr != nil {
		os.Remove(f.Name())
		return fmt.Errorf("pool state %s: %w", path, werr)
	}
	return nil
}

func readJSON(path string, v any) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	dec := json.NewDecoder(strings.NewReader(string(data)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("pool state %s: %w", path, err)
	}
	return nil
}
