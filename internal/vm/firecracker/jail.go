package firecracker

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	fc "github.com/firecracker-microvm/firecracker-go-sdk"
	"golang.org/x/sys/unix"
)

// Under the jailer the VMM sees only its jail. The backend mirrors the VM
// directory inside the jail (<jail root><VM dir>) and hard-links into it
// everything the VMM opens: the kernel, the initrd, the drives, the log and
// metrics files. The VMM is then told the same absolute paths it would get
// without the jailer, so its command line still names the VM directory (how
// a restarted manager recognises it) and its API socket appears at
// <jail root><VM dir>/firecracker.sock on the host. Hard links need the
// jail, the data directory and the images on one filesystem.
type jailPlan struct {
	opts *JailerOptions
	bin  string
	// root is <base>/<exec name>/<id>/root; dir is its parent, removed by
	// Cleanup.
	root, dir string
	// links are the host files linked into the jail.
	links   []jailLink
	cgroups []string
}

// jailLink is a host file seen at inJail from inside the jail. chown: the
// VMM writes it (or it is secret), so it is given to the jail's uid and gid.
type jailLink struct {
	inJail, host string
	chown        bool
}

func newJailPlan(j *JailerOptions, p *plan) (*jailPlan, error) {
	bin, err := exec.LookPath(j.Binary)
	if err != nil {
		return nil, fmt.Errorf("jailer %q not found: install it from the same Firecracker release, or turn the jailer off", j.Binary)
	}
	jp := &jailPlan{opts: j, bin: bin}
	jp.dir = filepath.Join(j.ChrootBaseDir, filepath.Base(p.bin), p.data.InstanceID)
	jp.root = filepath.Join(jp.dir, "root")
	dir := p.layout.Dir

	link := func(name, host string, chown bool) string {
		inJail := filepath.Join(dir, name)
		jp.links = append(jp.links, jailLink{inJail: inJail, host: host, chown: chown})
		return inJail
	}
	p.vmmSocket = filepath.Join(dir, apiSocketName)
	p.data.APISocket = jailPath(jp.root, p.vmmSocket)
	p.vmmLog = link("vmm.log", p.layout.VMMLog, true)
	p.vmmMetrics = link(metricsName, p.data.Metrics, true)
	p.kernel = link("kernel", p.kernel, false)
	if p.initrd != "" {
		// The per-VM initrd holds the console key: it belongs to the VM.
		p.initrd = link("initrd", p.initrd, p.layout.Initrd != "")
	}
	for i, d := range p.spec.Drives {
		p.drives[i] = link(fmt.Sprintf("drive%d", i), d.Path, d.Role == "scratch")
	}
	if p.vsock != "" {
		// Firecracker creates the vsock socket itself, inside the jail.
		p.data.Vsock = jailPath(jp.root, p.vsock)
	}
	jp.cgroups = cgroupDirs(j, p.data.InstanceID)
	p.data.Jail = &jailState{Dir: jp.dir, Cgroups: jp.cgroups, UID: j.UID, GID: j.GID}
	return jp, nil
}

// cgroupDirs are the cgroups the jailer creates for a VM.
func cgroupDirs(j *JailerOptions, id string) []string {
	if j.CgroupVersion != "1" {
		return []string{filepath.Join("/sys/fs/cgroup", j.ParentCgroup, id)}
	}
	controllers := map[string]bool{"cpuset": true}
	for _, a := range j.CgroupArgs {
		if c, _, ok := strings.Cut(a, "."); ok {
			controllers[c] = true
		}
	}
	var dirs []string
	for c := range controllers {
		dirs = append(dirs, filepath.Join("/sys/fs/cgroup", c, j.ParentCgroup, id))
	}
	return dirs
}

// prepare builds the jail's mirror of the VM directory before the jailer
// runs (the jailer keeps an existing chroot directory).
func (jp *jailPlan) prepare(p *plan) error {
	uid, gid := jp.opts.UID, jp.opts.GID
	mirror := jailPath(jp.root, p.layout.Dir)
	if err := os.MkdirAll(mirror, 0o700); err != nil {
		return fmt.Errorf("jail: %w", err)
	}
	if err := os.Chown(mirror, uid, gid); err != nil {
		return fmt.Errorf("jail: %w", err)
	}
	if p.vsock != "" {
		d := jailPath(jp.root, filepath.Dir(p.vsock))
		if err := os.MkdirAll(d, 0o700); err != nil {
			return fmt.Errorf("jail: vsock directory: %w", err)
		}
		if err := os.Chown(d, uid, gid); err != nil {
			return fmt.Errorf("jail: %w", err)
		}
	}
	for _, l := range jp.links {
		dst := jailPath(jp.root, l.inJail)
		if err := os.Link(l.host, dst); err != nil {
			var le *os.LinkError
			if errors.As(err, &le) && errors.Is(le.Err, unix.EXDEV) {
				return fmt.Errorf("jail: link %s into %s: the jail base directory %s is on another filesystem; put it on the filesystem of the data directory and images", l.host, jp.root, jp.opts.ChrootBaseDir)
			}
			return fmt.Errorf("jail: %w", err)
		}
		if l.chown {
			if err := os.Chown(l.host, uid, gid); err != nil {
				return fmt.Errorf("jail: %w", err)
			}
		}
	}
	return nil
}

// sdkConfig is the SDK's jailer configuration. The SDK validates it and
// derives the host path of the API socket from it; the command itself is
// built by command (the SDK's builder, with the VMM's log arguments).
func (jp *jailPlan) sdkConfig(p *plan) *fc.JailerConfig {
	uid, gid, node := jp.opts.UID, jp.opts.GID, jp.opts.NumaNode
	return &fc.JailerConfig{
		GID: &gid, UID: &uid, NumaNode: &node,
		ID:             p.data.InstanceID,
		ExecFile:       p.bin,
		JailerBinary:   jp.bin,
		ChrootBaseDir:  jp.opts.ChrootBaseDir,
		ChrootStrategy: linkedJail{},
		CgroupVersion:  jp.opts.CgroupVersion,
		CgroupArgs:     jp.opts.CgroupArgs,
		ParentCgroup:   jp.opts.ParentCgroup,
	}
}

// command is the jailer's command line.
func (jp *jailPlan) command(p *plan, level string, stdin io.Reader, stdout, stderr io.Writer) *exec.Cmd {
	b := fc.NewJailerCommandBuilder().
		WithBin(jp.bin).
		WithID(p.data.InstanceID).
		WithUID(jp.opts.UID).
		WithGID(jp.opts.GID).
		WithNumaNode(jp.opts.NumaNode).
		WithExecFile(p.bin).
		WithChrootBaseDir(jp.opts.ChrootBaseDir).
		WithCgroupVersion(jp.opts.CgroupVersion).
		WithCgroupArgs(jp.opts.CgroupArgs...).
		WithParentCgroup(jp.opts.ParentCgroup).
		WithFirecrackerArgs(p.vmmArgs(level)...).
		WithStdin(stdin).
		WithStdout(stdout).
		WithStderr(stderr)
	if p.spec.NetNS != "" {
		b = b.WithNetNS(p.spec.NetNS)
	}
	// Never cancelled: the VMM's lifetime is not tied to a context.
	return b.Build(context.Background())
}

// linkedJail is the SDK's chroot strategy hook. The jail is prepared before
// the jailer starts (jailPlan.prepare), so it changes no handlers.
type linkedJail struct{}

func (linkedJail) AdaptHandlers(*fc.Handlers) error { return nil }

// jailState is what Cleanup needs to remove a jail.
type jailState struct {
	Dir     string   `json:"dir"`
	Cgroups []string `json:"cgroups,omitempty"`
	UID     int      `json:"uid"`
	GID     int      `json:"gid"`
}

// cleanup removes the jail and the VM's cgroups. The VMM is not running.
func (s *jailState) cleanup() error {
	var errs []error
	if s.Dir != "" {
		if err := os.RemoveAll(s.Dir); err != nil {
			errs = append(errs, fmt.Errorf("remove jail: %w", err))
		}
	}
	for _, c := range s.Cgroups {
		if err := os.Remove(c); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, fmt.Errorf("remove cgroup: %w", err))
		}
	}
	return errors.Join(errs...)
}
