package metrics

import (
	"errors"
	"io"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/fireactions/fireactions/internal/github"
)

func scrape(t *testing.T, m *Metrics) string {
	t.Helper()
	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	if rec.Code != 200 {
		t.Fatalf("scrape: %d %s", rec.Code, rec.Body)
	}
	b, _ := io.ReadAll(rec.Body)
	return string(b)
}

func TestMetrics(t *testing.T) {
	reset := time.Unix(1_900_000_000, 0)
	cacheErr := error(nil)
	m := New(Sources{
		Pools: func() []PoolSizes {
			return []PoolSizes{{Pool: "ci", Desired: 3, Current: 2, Starting: 1, Idle: 0, Busy: 1}, {Pool: "gpu", Paused: true}}
		},
		GitHub: func() github.Stats {
			return github.Stats{Requests: 42, Retries: 3, Errors: map[github.ErrorKind]uint64{github.KindServer: 2, github.KindRateLimited: 1},
				RateLimit: github.RateLimit{Limit: 5000, Remaining: 4711, Reset: reset, Observed: time.Now()}}
		},
		CacheSize: func() (int64, error) { return 1 << 30, cacheErr },
	})
	m.RunnerCreated("ci")
	m.RunnerCreated("ci")
	m.RunnerFailed("ci", "vm_start", "qemu did not start: Could not access KVM kernel module")
	m.RunnerFailed("ci", "boot_timeout", "runner ci-1 did not report idle within 5m0s")
	m.BootToIdle("ci", 12*time.Second)
	m.JobDuration("ci", 50*time.Minute)
	m.ImagePulled("pulled", 3*time.Second)
	out := scrape(t, m)
	for _, want := range []string{
		`fireactions_pool_runners{pool="ci",state="desired"} 3`,
		`fireactions_pool_runners{pool="ci",state="current"} 2`,
		`fireactions_pool_runners{pool="ci",state="starting"} 1`,
		`fireactions_pool_runners{pool="ci",state="idle"} 0`,
		`fireactions_pool_runners{pool="ci",state="busy"} 1`,
		`fireactions_pool_paused{pool="gpu"} 1`,
		`fireactions_runner_creations_total{pool="ci"} 2`,
		`fireactions_runner_failures_total{pool="ci",reason="vm_start"} 1`,
		`fireactions_runner_failures_total{pool="ci",reason="boot_timeout"} 1`,
		`fireactions_pool_last_failure_timestamp_seconds{message="runner ci-1 did not report idle within 5m0s",pool="ci",reason="boot_timeout"}`,
		`fireactions_runner_boot_to_idle_seconds_bucket{pool="ci",le="15"} 1`,
		`fireactions_runner_boot_to_idle_seconds_bucket{pool="ci",le="3600"} 1`,
		`fireactions_runner_job_duration_seconds_bucket{pool="ci",le="2700"} 0`,
		`fireactions_runner_job_duration_seconds_bucket{pool="ci",le="3600"} 1`,
		`fireactions_image_pull_duration_seconds_count{outcome="pulled"} 1`,
		`fireactions_github_requests_total 42`,
		`fireactions_github_retries_total 3`,
		`fireactions_github_errors_total{kind="server_error"} 2`,
		`fireactions_github_errors_total{kind="rate_limited"} 1`,
		`fireactions_github_rate_limit_remaining{resource="core"} 4711`,
		`fireactions_github_rate_limit_reset_timestamp_seconds{resource="core"} 1.9e+09`,
		`fireactions_image_cache_bytes 1.073741824e+09`,
		`process_resident_memory_bytes`,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("metrics lack %s", want)
		}
	}
	// Only the last failure of a pool is kept as a series.
	if strings.Contains(out, `reason="vm_start"}`) && strings.Contains(out, `last_failure_timestamp_seconds{message="qemu`) {
		t.Error("an older failure is still exported as the last one")
	}
	// A cache size that cannot be read fails the scrape of that metric
	// only loudly, not silently as 0.
	cacheErr = errors.New("disk gone")
	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	if rec.Code != 500 || !strings.Contains(rec.Body.String(), "disk gone") {
		t.Errorf("cache size error: %d %s", rec.Code, rec.Body)
	}
}

func TestClip(t *testing.T) {
	if got := clip("héllo", 2); got != "h…" {
		t.Errorf("clip = %q", got)
	}
	if got := clip("abc", 5); got != "abc" {
		t.Errorf("clip = %q", got)
	}
}
