package network

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"
)

// record is what survives a crash for one VM: written before anything is
// created on the host and updated as the attachment progresses, so that
// Detach in a new process knows everything to undo.
type record struct {
	VMID string `json:"vm_id"`
	Kind Kind   `json:"kind"`
	// CNI: the network, the namespace we created, the interface name and
	// arguments ADD ran with, and the configuration list itself, so DEL
	// works even if ADD died before libcni cached it or the list on disk
	// changed since.
	Network  string          `json:"network,omitempty"`
	NetNS    string          `json:"netns,omitempty"`
	IfName   string          `json:"if_name,omitempty"`
	CNIArgs  [][2]string     `json:"cni_args,omitempty"`
	Conflist json.RawMessage `json:"conflist,omitempty"`
	// Static: the tap, and whether fireactions created it (and so must
	// remove it).
	Tap        string `json:"tap,omitempty"`
	TapCreated bool   `json:"tap_created,omitempty"`
	// Port is the anti-spoofing registration, once made.
	Port *Port `json:"port,omitempty"`
	// Attachment is set once the attachment is complete.
	Attachment *Attachment `json:"attachment,omitempty"`
	Created    time.Time   `json:"created"`
}

type records struct{ dir string }

func (r records) path(id string) string { return filepath.Join(r.dir, id+".json") }

func (r records) load(id string) (*record, error) {
	data, err := os.ReadFile(r.path(id))
	if err != nil {
		return nil, err
	}
	var rec record
	if err := json.Unmarshal(data, &rec); err != nil {
		return nil, fmt.Errorf("network record %s: %w", r.path(id), err)
	}
	return &rec, nil
}

// save writes rec atomically (temp file, fsync, rename) so a crash leaves
// either the old or the new record, never a torn one.
func (r records) save(rec *record) error {
	data, err := json.MarshalIndent(rec, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(r.dir, 0o700); err != nil {
		return fmt.Errorf("network state dir: %w", err)
	}
	tmp, err := os.CreateTemp(r.dir, "."+rec.VMID+".*.tmp")
	if err != nil {
		return fmt.Errorf("save network record %s: %w", rec.VMID, err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return fmt.Errorf("save network record %s: %w", rec.VMID, err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("save network record %s: %w", rec.VMID, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("save network record %s: %w", rec.VMID, err)
	}
	if err := os.Rename(tmp.Name(), r.path(rec.VMID)); err != nil {
		return fmt.Errorf("save network record %s: %w", rec.VMID, err)
	}
	return nil
}

func (r records) remove(id string) error {
	if err := os.Remove(r.path(id)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove network record %s: %w", id, err)
	}
	return nil
}

// ids lists the VM ids that have a record.
func (r records) ids() ([]string, error) {
	entries, err := os.ReadDir(r.dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list network records: %w", err)
	}
	var ids []string
	for _, e := range entries {
		n := e.Name()
		if e.Type().IsRegular() && strings.HasSuffix(n, ".json") && !strings.HasPrefix(n, ".") {
			ids = append(ids, strings.TrimSuffix(n, ".json"))
		}
	}
	sort.Strings(ids)
	return ids, nil
}
