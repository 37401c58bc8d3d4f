package runtime_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	goruntime "runtime"
	"runtime/debug"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/fireactions/fireactions/internal/image/imagetest"
	"github.com/fireactions/fireactions/internal/runtime"
	"github.com/fireactions/fireactions/internal/runtime/runtimetest"
)

// firstByte is a writer that closes ch on its first write.
type firstByte struct {
	once sync.Once
	ch   chan struct{}
}

func (f *firstByte) Write(p []byte) (int, error) {
	f.once.Do(func() { close(f.ch) })
	return len(p), nil
}

// BenchmarkBootToWorkload measures, with the qemu backend and the test
// kernel, the time from Run (image already cached) to the workload's first
// byte of output on the host. guest-ms is the part between the VMM being
// ready and the init's "started" report.
func BenchmarkBootToWorkload(b *testing.B) {
	reg := imagetest.NewRegistry(b)
	ref := runtimetest.PushBusybox(b, reg, "bench", v1.Config{Entrypoint: []string{"/bin/echo"}, Cmd: []string{"ready"}}, nil)
	rt, err := runtime.New(runtimetest.Options(b, b.TempDir()))
	if err != nil {
		b.Fatal(err)
	}
	defer rt.Close()
	ctx := context.Background()
	if _, err := rt.Images().Pull(ctx, ref, insecure()); err != nil {
		b.Fatal(err)
	}
	var guest time.Duration
	b.ResetTimer()
	for range b.N {
		fb := &firstByte{ch: make(chan struct{})}
		inst, err := rt.Run(ctx, runtime.Request{Image: ref, Pull: insecure(), MemoryMiB: 256, DiskSize: 256 << 20})
		if err != nil {
			b.Fatal(err)
		}
		out := make(chan error, 1)
		go func() { out <- inst.Output(ctx, fb, io.Discard) }()
		select {
		case <-fb.ch:
		case err := <-out:
			b.Fatalf("no output: %v", err)
		}
		b.StopTimer()
		if es, err := inst.Wait(ctx); err != nil || es.Code != 0 {
			b.Fatalf("wait: %s, %v", es, err)
		}
		<-out
		if in, err := inst.Inspect(); err == nil && in.VM != nil {
			guest += in.VM.GuestStartedAt.Sub(in.VM.StartedAt)
		}
		if err := inst.Remove(ctx); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
	b.ReportMetric(float64(guest.Milliseconds())/float64(b.N), "guest-ms")
}

// rssKiB is this process's resident set size.
func rssKiB(b *testing.B) float64 {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			var kb float64
			fmt.Sscanf(strings.TrimSpace(v), "%f", &kb)
			return kb
		}
	}
	b.Fatal("no VmRSS in /proc/self/status")
	return 0
}

func settledRSS(b *testing.B) float64 {
	goruntime.GC()
	debug.FreeOSMemory()
	return rssKiB(b)
}

// BenchmarkMemoryPerVM measures what each running VM costs the process
// that owns it (supervision, console follower, state): the growth of this
// process's RSS with 1 to 4 VMs running, per VM. The VMMs' own memory is
// not part of it.
func BenchmarkMemoryPerVM(b *testing.B) {
	const vms = 4
	reg := imagetest.NewRegistry(b)
	ref := runtimetest.PushBusybox(b, reg, "idle", v1.Config{Entrypoint: []string{"/bin/sleep"}, Cmd: []string{"600"}}, nil)
	rt, err := runtime.New(runtimetest.Options(b, b.TempDir()))
	if err != nil {
		b.Fatal(err)
	}
	defer rt.Close()
	ctx := context.Background()
	// Warm up: pull, initramfs, one full VM life, so that caches and
	// code paths are in the baseline.
	warm, err := rt.Run(ctx, runtime.Request{Image: ref, Pull: insecure(), MemoryMiB: 128, DiskSize: 64 << 20, Args: []string{"0"}})
	if err != nil {
		b.Fatal(err)
	}
	if _, err := warm.Wait(ctx); err != nil {
		b.Fatal(err)
	}
	if err := warm.Remove(ctx); err != nil {
		b.Fatal(err)
	}
	var perVM float64
	b.ResetTimer()
	for range b.N {
		base := settledRSS(b)
		var insts []*runtime.Instance
		for i := 1; i <= vms; i++ {
			inst, err := rt.Run(ctx, runtime.Request{Image: ref, Pull: insecure(), MemoryMiB: 128, DiskSize: 64 << 20})
			if err != nil {
				b.Fatal(err)
			}
			insts = append(insts, inst)
			if _, err := inst.WaitStarted(ctx, nil); err != nil {
				b.Fatal(err)
			}
			b.Logf("%d VM(s) running: RSS +%.0f KiB", i, settledRSS(b)-base)
		}
		perVM += (settledRSS(b) - base) / vms
		for _, inst := range insts {
			if err := inst.Remove(ctx); err != nil {
				b.Fatal(err)
			}
		}
	}
	b.ReportMetric(perVM/float64(b.N), "KiB/vm")
}
