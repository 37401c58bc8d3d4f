package bootstrap

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/fireactions/fireactions/internal/config"
)

// Output file and directory modes: the file holds the GitHub App key.
const (
	OutputMode    os.FileMode = 0o640
	OutputDirMode os.FileMode = 0o750
)

// Run generates the configuration from in and writes it to output (see
// Write).
func Run(in Inputs, output string) error {
	cfg, err := Generate(in)
	if err != nil {
		return err
	}
	return Write(cfg, output)
}

// Write encodes cfg canonically and writes it to path atomically, mode
// 0640, creating the directory (0750) if needed: the daemon, or a
// concurrent `fireactions validate`, sees the old file or the new one,
// never a partial one.
func Write(cfg *config.Config, path string) error {
	data, err := config.Marshal(cfg)
	if err != nil {
		return err
	}
	return writeAtomic(path, data)
}

// writeAtomic writes data to a temporary file beside path, syncs it and
// renames it over path, then syncs the directory so the rename survives a
// crash.
func writeAtomic(path string, data []byte) (err error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, OutputDirMode); err != nil {
		return fmt.Errorf("create output directory: %w", err)
	}
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	// CreateTemp makes the file 0600; set the mode before any secret is
	// written rather than after.
	if err := tmp.Chmod(OutputMode); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if _, err := tmp.Write(data); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Sync(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	return nil
}
