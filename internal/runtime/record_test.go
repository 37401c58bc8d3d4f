package runtime

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/fireactions/fireactions/internal/image"
	"github.com/fireactions/fireactions/internal/image/imagetest"
	"github.com/fireactions/fireactions/internal/vm"
	"github.com/fireactions/fireactions/internal/vm/qemu"
)

// A process that dies while creating an instance leaves a record, a lease
// and a scratch disk but no VM: Recover must leave them alone while the
// creator lives and release all of them once it is gone.
func TestRecoverFinishesAbandonedCreation(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	dir := t.TempDir()
	rt, err := New(Options{DataDir: dir, Backends: []vm.Backend{qemu.New(qemu.Options{})}})
	if err != nil {
		t.Fatal(err)
	}
	defer rt.Close()
	reg := imagetest.NewRegistry(t)
	ref := reg.Host + "/busybox:latest"
	imagetest.Push(t, ref, imagetest.Image(t, "linux/amd64", v1.Config{Cmd: []string{"sh"}}, imagetest.BusyboxLayer(t)), nil)
	img, err := rt.Images().Pull(ctx, ref, image.PullOptions{Insecure: true})
	if err != nil {
		t.Fatal(err)
	}

	// What Run does up to the scratch disk, in its order.
	rec := &record{ID: "halfway", Image: ref, Network: "none", Labels: map[string]string{"pool": "x"}, CreatedAt: time.Now()}
	lock, err := rt.recs.create(rec)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := rt.recs.create(&record{ID: "halfway"}); !errors.Is(err, ErrExists) {
		t.Fatalf("second record with the same id: %v, want ErrExists", err)
	}
	rec.Digest, rec.Lease = img.Digest, rec.ID
	if err := rt.recs.save(lock, rec); err != nil {
		t.Fatal(err)
	}
	if _, err := rt.Images().Acquire(img.Digest, image.Holder(rec.ID)); err != nil {
		t.Fatal(err)
	}
	rec.Scratch = rt.scratchPath(rec.ID)
	if err := rt.recs.save(lock, rec); err != nil {
		t.Fatal(err)
	}
	if err := rt.Images().CreateScratch(ctx, rec.Scratch, 64<<20); err != nil {
		t.Fatal(err)
	}

	// The creator is alive (holds the lock): hands off.
	in, err := rt.Inspect("halfway")
	if err != nil || in.State != StateCreating {
		t.Fatalf("inspect during creation: %+v, %v", in, err)
	}
	res, err := rt.Recover(ctx, RecoverOptions{})
	if err != nil || len(res.Cleaned) != 0 {
		t.Fatalf("recover during creation: %+v, %v", res, err)
	}
	if _, err := os.Stat(rec.Scratch); err != nil {
		t.Fatalf("scratch disk of a live creation removed: %v", err)
	}

	// The creator dies; a write of its was interrupted too.
	lock.release()
	stray := filepath.Join(dir, "instances", ".new-halfway-0123")
	if err := os.WriteFile(stray, []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	if in, _ := rt.Inspect("halfway"); in.State != StateDead {
		t.Errorf("state after the creator died: %s, want %s", in.State, StateDead)
	}
	res, err = rt.Recover(ctx, RecoverOptions{Match: func(map[string]string) bool { return false }})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Cleaned) != 1 || res.Cleaned[0].ID != "halfway" || res.Cleaned[0].Labels["pool"] != "x" {
		t.Fatalf("cleaned %+v; want the abandoned creation, whatever Match says", res.Cleaned)
	}
	for _, p := range []string{rec.Scratch, rt.recs.path("halfway"), stray} {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s still there: %v", p, err)
		}
	}
	if ls, err := rt.Images().Leases(img.Digest); err != nil || len(ls) != 0 {
		t.Errorf("leases after recovery: %+v, %v", ls, err)
	}
	if _, err := rt.Inspect("halfway"); !errors.Is(err, ErrNotFound) {
		t.Errorf("inspect after recovery: %v", err)
	}
}

// Replacing a record keeps it locked: another process never gets the lock
// of the old or the new file while the holder lives.
func TestRecordSaveKeepsLock(t *testing.T) {
	r := records{dir: t.TempDir()}
	rec := &record{ID: "a", Network: "none"}
	l, err := r.create(rec)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		rec.Scratch = filepath.Join("/x", string(rune('a'+i)))
		if err := r.save(l, rec); err != nil {
			t.Fatal(err)
		}
		if _, _, err := r.lock("a", false); !errors.Is(err, errBusy) {
			t.Fatalf("lock after save %d: %v, want busy", i, err)
		}
	}
	got, err := r.load("a")
	if err != nil || got.Scratch != "/x/c" {
		t.Fatalf("load: %+v, %v", got, err)
	}
	if err := r.remove(l); err != nil {
		t.Fatal(err)
	}
	l.release()
	if _, _, err := r.lock("a", false); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("lock after remove: %v", err)
	}
	if ids, _ := r.ids(); len(ids) != 0 {
		t.Errorf("ids after remove: %v", ids)
	}
}
