// Package github owns fireactions' conversation with GitHub for runner
// pools: GitHub App authentication (App JWT, per-scope installation lookup,
// installation tokens via ghinstallation) or a personal access token
// (classic) where an App cannot act, the REST and GitHub Enterprise Server
// endpoints, retries with backoff and rate limit handling, just-in-time
// runner registration and deregistration in labels mode, the runner scale
// set API in scale-set mode (through github.com/actions/scaleset), and
// workflow_job webhook verification.
//
// Labels mode keeps a warm pool of JIT runners:
//
//	jit, err := client.GenerateJITConfig(ctx, scope, name, labels, groupID)
//	// boot a VM with jit.EncodedJITConfig.Reveal(); when it ends:
//	err = client.DeleteRunner(ctx, scope, jit.RunnerID) // gone already is fine
//
// Scale-set mode sizes the pool from GitHub's statistics and acknowledges a
// message only after acting on it:
//
//	set, err := client.EnsureScaleSet(ctx, scope, github.ScaleSetSpec{Name: pool.Name, Labels: labels})
//	sess, err := set.OpenSession(ctx, github.SessionOptions{MaxCapacity: pool.MaxRunners})
//	defer sess.Close(context.WithoutCancel(ctx))
//	for {
//		msg, err := sess.Next(ctx) // long poll; nil when nothing happened
//		stats := sess.Statistics()
//		if msg != nil {
//			sess.AcquireJobs(ctx, msg.AvailableRequestIDs())
//		}
//		resize(clamp(stats.TotalAssignedJobs, pool.MinRunners, pool.MaxRunners))
//		if msg != nil {
//			sess.Ack(ctx, msg)
//		}
//	}
//
// Consumers should declare the small interfaces they need, for example
//
//	type Registrar interface {
//		GenerateJITConfig(ctx context.Context, name string) (github.JITConfig, error)
//		RemoveRunner(ctx context.Context, runnerID int64) error
//	}
//
// which *ScaleSet satisfies, and fake them in unit tests; integration tests
// run the real client against the fake GitHub in package githubtest.
//
// JIT configurations and tokens are secrets: JITConfig and config.Secret
// redact themselves in fmt, slog and encoding/json output, and this package
// never logs them.
package github
