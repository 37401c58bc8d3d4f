// Package pool owns the runner pools of `fireactions serve`: for each
// configured pool a reconcile loop that keeps the right number of
// single-job GitHub Actions runners, one microVM each, and everything
// around their lives: just-in-time registration, the VM start request,
// the agent's state reports, host-side deadlines (boot, idle, job),
// deregistration on every end of a VM, per-pool exponential backoff, busy-
// aware scale-down, the drain on shutdown, and the state kept under
// <data-dir>/pools so that a restarted daemon adopts live VMs and
// deregisters every runner it created that no VM backs.
//
// Sizing follows actions-runner-controller: a pool wants
//
//	desired = min(max_runners, min_runners + jobs in flight)
//
// where jobs in flight are the scale set's TotalAssignedJobs (scale-set
// mode), or the queued and running jobs seen through workflow_job webhooks
// and the pool's busy runners (labels mode). min_runners is therefore the
// number of idle runners kept ready beyond the jobs being served.
//
// The package talks to the VM runtime and to GitHub through the small
// interfaces Runtime, Machine and GitHub declared here; the daemon adapts
// internal/runtime and internal/github to them, and the tests use a fake
// runtime and the fake GitHub of internal/github/githubtest.
package pool
