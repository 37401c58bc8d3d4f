package pool

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/fireactions/fireactions/internal/config"
	"github.com/fireactions/fireactions/internal/github/githubtest"
)

// rssKiB reads the process's resident set size.
func rssKiB(b *testing.B) float64 {
	data, err := os.ReadFile("/proc/self/status")
	if err != nil {
		b.Fatal(err)
	}
	for _, l := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			n, _ := strconv.ParseFloat(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 64)
			return n
		}
	}
	b.Fatal("no VmRSS")
	return 0
}

// BenchmarkReconcile50Pools20VMs times one reconcile pass over 50 pools
// of 20 idle runners each (1,000 runner VMs, fake runtime, fake GitHub),
// and reports the daemon's resident memory with all of them watched.
func BenchmarkReconcile50Pools20VMs(b *testing.B) {
	var pools []config.Pool
	for i := range 50 {
		pools = append(pools, testPool(fmt.Sprintf("p%02d", i), config.ScalingLabels, 20, 20))
	}
	e := newEnv(b, pools...)
	e.tweak = func(o *Options) {
		o.Resync = time.Hour
		// The test log buffer would dominate the memory figure.
		o.Logger = slog.New(slog.DiscardHandler)
	}
	e.start()
	e.waitFor("1,000 idle runners", func() bool {
		n := 0
		for _, st := range e.m.Pools() {
			n += st.Idle
		}
		return n == 1000
	})
	runtime.GC()
	rss := rssKiB(b)
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	ctx := context.Background()
	b.ResetTimer()
	for range b.N {
		for _, p := range e.m.pools {
			p.reconcile(ctx)
		}
	}
	b.StopTimer()
	b.ReportMetric(rss, "RSS-KiB")
	b.ReportMetric(float64(ms.HeapAlloc)/1024, "heap-KiB")
	b.ReportMetric(float64(runtime.NumGoroutine()), "goroutines")
	if n := e.rt.startCount(); n != 1000 {
		b.Fatalf("%d VMs started, want 1000: a pass changed the pools", n)
	}
}

// BenchmarkJobAvailableToStartRequest measures the latency from a job
// being queued on a scale set (the fake GitHub answers the pending long
// poll with JobAvailable) to the pool's VM start request: long-poll
// wake-up, job acquisition, the reconcile pass, the JIT registration and
// the runtime's Start call.
func BenchmarkJobAvailableToStartRequest(b *testing.B) {
	e := newEnv(b, testPool("lat", config.ScalingScaleSet, 0, 100000))
	e.start()
	e.waitFor("the session", func() bool { s := e.gh.ScaleSets(); return len(s) == 1 && s[0].Sessions == 1 })
	b.ResetTimer()
	var total time.Duration
	for range b.N {
		t0 := time.Now()
		id, err := e.gh.QueueJob("lat", nil)
		if err != nil {
			b.Fatal(err)
		}
		vm := <-e.rt.startedC
		total += time.Since(t0)
		b.StopTimer()
		// Cancel the job: the pool scales back down before the next one.
		if err := e.gh.CompleteJob(id); err != nil {
			b.Fatal(err)
		}
		e.waitFor("the pool back to zero", func() bool { return e.rt.vm(vm) == nil && len(e.m.VMs()) == 0 })
		b.StartTimer()
	}
	b.ReportMetric(float64(total.Microseconds())/float64(b.N)/1000, "ms/job")
	_ = githubtest.JobAssigned
}
