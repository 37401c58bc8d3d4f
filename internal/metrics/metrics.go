// Package metrics owns the Prometheus metrics of `fireactions serve`: per
// pool runner counts (desired, current, starting, idle, busy), VM
// boot-to-idle and job-duration histograms, runner creations and failures
// by reason (with the last failure's text), GitHub API traffic, errors and
// the remaining rate limit, image pull durations and the image cache size.
// Gauges are read from their sources at scrape time; events are recorded
// through the Observe methods the pools and the runtime call.
package metrics

import (
	"net/http"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/fireactions/fireactions/internal/github"
)

const namespace = "fireactions"

// PoolSizes is one pool's runner counts at scrape time.
type PoolSizes struct {
	Pool     string
	Desired  int
	Current  int
	Starting int
	Idle     int
	Busy     int
	Paused   bool
}

// Sources are read at every scrape; nil ones are skipped.
type Sources struct {
	Pools     func() []PoolSizes
	GitHub    func() github.Stats
	CacheSize func() (int64, error)
}

// Durations up to an hour: a runner VM boots in seconds to minutes, a job
// runs for minutes.
var (
	bootBuckets = []float64{1, 2, 5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1200, 1800, 3600}
	jobBuckets  = []float64{10, 30, 60, 120, 300, 600, 900, 1200, 1800, 2700, 3600}
	pullBuckets = []float64{0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600}
)

// Metrics is the daemon's registry. It implements pool.Observer.
type Metrics struct {
	reg         *prometheus.Registry
	created     *prometheus.CounterVec
	failures    *prometheus.CounterVec
	lastFailure *prometheus.GaugeVec
	bootToIdle  *prometheus.HistogramVec
	jobDuration *prometheus.HistogramVec
	imagePull   *prometheus.HistogramVec

	mu       sync.Mutex
	lastSeen map[string]prometheus.Labels // pool -> labels of its last_failure series
}

// New builds the registry with the Go and process collectors.
func New(src Sources) *Metrics {
	m := &Metrics{
		reg: prometheus.NewRegistry(),
		created: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "runner_creations_total",
			Help: "Runner VMs started, by pool.",
		}, []string{"pool"}),
		failures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "runner_failures_total",
			Help: "Runner failures by pool and reason (github, vm_start, vm_exit, boot_timeout, max_job, agent, session, state).",
		}, []string{"pool", "reason"}),
		lastFailure: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: namespace, Name: "pool_last_failure_timestamp_seconds",
			Help: "When the pool's last failure happened; its labels carry the reason and the error text (the VMM's own words for VM start failures).",
		}, []string{"pool", "reason", "message"}),
		bootToIdle: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "runner_boot_to_idle_seconds",
			Help: "Time from a runner VM's start request until its runner listens for a job.", Buckets: bootBuckets,
		}, []string{"pool"}),
		jobDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "runner_job_duration_seconds",
			Help: "Time a runner spent on its job.", Buckets: jobBuckets,
		}, []string{"pool"}),
		imagePull: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "image_pull_duration_seconds",
			Help: "Time to pull and convert a runner image, by outcome (cached, pulled, error).", Buckets: pullBuckets,
		}, []string{"outcome"}),
		lastSeen: map[string]prometheus.Labels{},
	}
	m.reg.MustRegister(m.created, m.failures, m.lastFailure, m.bootToIdle, m.jobDuration, m.imagePull,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		&sourceCollector{src: src})
	return m
}

// Registry is the registry the metrics live in.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// Handler serves the metrics in the Prometheus exposition format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{Registry: m.reg})
}

// RunnerCreated counts a started runner VM.
func (m *Metrics) RunnerCreated(pool string) { m.created.WithLabelValues(pool).Inc() }

// RunnerFailed counts a failure and makes it the pool's last one.
func (m *Metrics) RunnerFailed(pool, reason, message string) {
	m.failures.WithLabelValues(pool, reason).Inc()
	l := prometheus.Labels{"pool": pool, "reason": reason, "message": clip(message, 300)}
	m.mu.Lock()
	defer m.mu.Unlock()
	if old, ok := m.lastSeen[pool]; ok {
		m.lastFailure.Delete(old)
	}
	m.lastSeen[pool] = l
	m.lastFailure.With(l).Set(float64(time.Now().UnixNano()) / 1e9)
}

// BootToIdle records a runner's time from start request to idle.
func (m *Metrics) BootToIdle(pool string, d time.Duration) {
	m.bootToIdle.WithLabelValues(pool).Observe(d.Seconds())
}

// JobDuration records how long a runner ran its job.
func (m *Metrics) JobDuration(pool string, d time.Duration) {
	m.jobDuration.WithLabelValues(pool).Observe(d.Seconds())
}

// ImagePulled records an image pull (outcome cached, pulled or error).
func (m *Metrics) ImagePulled(outcome string, d time.Duration) {
	m.imagePull.WithLabelValues(outcome).Observe(d.Seconds())
}

func clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	s = s[:n]
	for !utf8.ValidString(s) {
		s = s[:len(s)-1]
	}
	return s + "…"
}

// sourceCollector reads the gauges from their sources at scrape time.
type sourceCollector struct{ src Sources }

var (
	descRunners = prometheus.NewDesc(namespace+"_pool_runners", "Runners of a pool by state: desired (the size it works towards), current, starting, idle, busy.",
		[]string{"pool", "state"}, nil)
	descPaused    = prometheus.NewDesc(namespace+"_pool_paused", "1 when the pool is paused.", []string{"pool"}, nil)
	descRequests  = prometheus.NewDesc(namespace+"_github_requests_total", "GitHub API requests, retries included.", nil, nil)
	descRetries   = prometheus.NewDesc(namespace+"_github_retries_total", "GitHub API requests retried.", nil, nil)
	descErrors    = prometheus.NewDesc(namespace+"_github_errors_total", "Failed GitHub API requests by kind.", []string{"kind"}, nil)
	descRemaining = prometheus.NewDesc(namespace+"_github_rate_limit_remaining", "Requests left in the GitHub REST rate limit window, as GitHub last reported it.", []string{"resource"}, nil)
	descLimit     = prometheus.NewDesc(namespace+"_github_rate_limit", "The GitHub REST rate limit, as GitHub last reported it.", []string{"resource"}, nil)
	descReset     = prometheus.NewDesc(namespace+"_github_rate_limit_reset_timestamp_seconds", "When the GitHub REST rate limit window resets.", []string{"resource"}, nil)
	descCache     = prometheus.NewDesc(namespace+"_image_cache_bytes", "Bytes of converted images in the image cache.", nil, nil)
)

func (c *sourceCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descRunners, descPaused, descRequests, descRetries, descErrors, descRemaining, descLimit, descReset, descCache} {
		ch <- d
	}
}

func (c *sourceCollector) Collect(ch chan<- prometheus.Metric) {
	if c.src.Pools != nil {
		for _, p := range c.src.Pools() {
			for _, s := range []struct {
				state string
				n     int
			}{{"desired", p.Desired}, {"current", p.Current}, {"starting", p.Starting}, {"idle", p.Idle}, {"busy", p.Busy}} {
				ch <- prometheus.MustNewConstMetric(descRunners, prometheus.GaugeValue, float64(s.n), p.Pool, s.state)
			}
			paused := 0.0
			if p.Paused {
				paused = 1
			}
			ch <- prometheus.MustNewConstMetric(descPaused, prometheus.GaugeValue, paused, p.Pool)
		}
	}
	if c.src.GitHub != nil {
		st := c.src.GitHub()
		ch <- prometheus.MustNewConstMetric(descRequests, prometheus.CounterValue, float64(st.Requests))
		ch <- prometheus.MustNewConstMetric(descRetries, prometheus.CounterValue, float64(st.Retries))
		for _, k := range []github.ErrorKind{github.KindServer, github.KindRateLimited, github.KindUnauthorized, github.KindForbidden,
			github.KindNotFound, github.KindConflict, github.KindClient, github.KindNetwork} {
			ch <- prometheus.MustNewConstMetric(descErrors, prometheus.CounterValue, float64(st.Errors[k]), string(k))
		}
		if rl := st.RateLimit; !rl.Observed.IsZero() {
			res := rl.Resource
			if res == "" {
				res = "core"
			}
			ch <- prometheus.MustNewConstMetric(descRemaining, prometheus.GaugeValue, float64(rl.Remaining), res)
			ch <- prometheus.MustNewConstMetric(descLimit, prometheus.GaugeValue, float64(rl.Limit), res)
			ch <- prometheus.MustNewConstMetric(descReset, prometheus.GaugeValue, float64(rl.Reset.Unix()), res)
		}
	}
	if c.src.CacheSize != nil {
		if n, err := c.src.CacheSize(); err == nil {
			ch <- prometheus.MustNewConstMetric(descCache, prometheus.GaugeValue, float64(n))
		} else {
			ch <- prometheus.NewInvalidMetric(descCache, err)
		}
	}
}
