//go:build linux

package main

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func TestBuildEnv(t *testing.T) {
	got := buildEnv([]string{"A=1"}, "/home/app", "vm-1")
	want := []string{"A=1", "PATH=" + defaultPath, "HOME=/home/app", "HOSTNAME=vm-1"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("buildEnv = %q, want %q", got, want)
	}
	// The image's own values win.
	img := []string{"PATH=/opt/bin", "HOME=/srv", "HOSTNAME=img"}
	if got := buildEnv(img, "/root", "vm-1"); !reflect.DeepEqual(got, img) {
		t.Errorf("buildEnv = %q, want %q", got, img)
	}
	if got := buildEnv(nil, "/", ""); len(got) != 2 {
		t.Errorf("no hostname: %q", got)
	}
}

func TestLookPath(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "bin")
	os.MkdirAll(filepath.Join(bin, "adir"), 0o755)
	os.WriteFile(filepath.Join(bin, "tool"), []byte("#!/bin/sh\n"), 0o755)
	os.WriteFile(filepath.Join(bin, "data"), []byte("x"), 0o644)
	env := []string{"PATH=" + filepath.Join(dir, "nothing") + ":" + bin}

	if got, err := lookPath("tool", env); err != nil || got != filepath.Join(bin, "tool") {
		t.Errorf("lookPath(tool) = %q, %v", got, err)
	}
	for _, name := range []string{"data", "adir", "missing"} {
		_, err := lookPath(name, env)
		if err == nil || !strings.Contains(err.Error(), "not found in $PATH") || !strings.Contains(err.Error(), bin) {
			t.Errorf("lookPath(%s): %v", name, err)
		}
	}
	if _, err := lookPath(filepath.Join(bin, "data"), env); err == nil || !strings.Contains(err.Error(), "not executable") {
		t.Errorf("absolute non-executable: %v", err)
	}
	if got, err := lookPath(filepath.Join(bin, "tool"), nil); err != nil || got != filepath.Join(bin, "tool") {
		t.Errorf("absolute: %q, %v", got, err)
	}
}
