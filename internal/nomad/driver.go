package nomad

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"sync"
	"time"

	hclog "github.com/hashicorp/go-hclog"
	goversion "github.com/hashicorp/go-version"
	"github.com/hashicorp/nomad/client/lib/cpustats"
	"github.com/hashicorp/nomad/drivers/shared/eventer"
	"github.com/hashicorp/nomad/plugins/base"
	"github.com/hashicorp/nomad/plugins/drivers"
	"github.com/hashicorp/nomad/plugins/drivers/fsisolation"
	"github.com/hashicorp/nomad/plugins/shared/hclspec"
	pstructs "github.com/hashicorp/nomad/plugins/shared/structs"

	"github.com/fireactions/fireactions/internal/config"
	"github.com/fireactions/fireactions/internal/hostnet"
	"github.com/fireactions/fireactions/internal/image"
	"github.com/fireactions/fireactions/internal/initramfs"
	"github.com/fireactions/fireactions/internal/network"
	"github.com/fireactions/fireactions/internal/runtime"
	"github.com/fireactions/fireactions/internal/vm"
	"github.com/fireactions/fireactions/internal/vm/firecracker"
	"github.com/fireactions/fireactions/internal/vm/qemu"
)

// Version is the plugin's version, reported to Nomad; set at build time
// (-ldflags -X github.com/fireactions/fireactions/internal/nomad.Version=...).
var Version = "dev"

// fingerprintPeriod is how often the driver re-checks that it can run VMs.
const fingerprintPeriod = 30 * time.Second

// recoverTimeout bounds re-attaching to one VM.
const recoverTimeout = time.Minute

var pluginInfo = &base.PluginInfoResponse{
	Type:              base.PluginTypeDriver,
	PluginApiVersions: []string{drivers.ApiVersion010},
	Name:              PluginName,
}

// capabilities: signals reach the guest's process; exec is not offered
// (the guest init has no exec channel; see docs/nomad.md); tasks run in
// their own root file system (the image), with their own network stack.
var capabilities = &drivers.Capabilities{
	SendSignals:       true,
	Exec:              false,
	FSIsolation:       fsisolation.Image,
	NetIsolationModes: []drivers.NetIsolationMode{drivers.NetIsolationModeHost},
	MountConfigs:      drivers.MountConfigSupportNone,
}

// Driver is the firecracker-task-driver. Create it with NewDriver; Nomad
// configures it with SetConfig before anything else.
type Driver struct {
	eventer *eventer.Eventer
	hlog    hclog.Logger
	log     *slog.Logger

	// ctx ends when the driver shuts down; VMs keep running.
	ctx    context.Context
	cancel context.CancelFunc

	mu      sync.RWMutex
	config  *PluginConfig
	compute cpustats.Compute
	rt      *runtime.Runtime
	// backends are the VMMs, in auto's order of preference.
	backends []vm.Backend

	tasksMu sync.RWMutex
	tasks   map[string]*taskHandle

	orphans sync.Once
}

// NewDriver returns the driver, logging to logger (Nomad collects a
// plugin's hclog output into the agent's log).
func NewDriver(logger hclog.Logger) *Driver {
	ctx, cancel := context.WithCancel(context.Background())
	logger = logger.Named(PluginName)
	return &Driver{
		eventer: eventer.NewEventer(ctx, logger),
		hlog:    logger,
		log:     newSlogLogger(logger),
		ctx:     ctx,
		cancel:  cancel,
		tasks:   map[string]*taskHandle{},
	}
}

// Shutdown detaches from every VM without stopping them, as a plugin
// process that exits does; a new driver recovers them.
func (d *Driver) Shutdown() {
	d.cancel()
	d.tasksMu.Lock()
	for _, h := range d.tasks {
		h.cancel()
		h.release()
	}
	d.tasksMu.Unlock()
	d.mu.RLock()
	rt := d.rt
	d.mu.RUnlock()
	if rt != nil {
		rt.Close()
	}
}

// PluginInfo implements base.BasePlugin.
func (d *Driver) PluginInfo() (*base.PluginInfoResponse, error) {
	info := *pluginInfo
	info.PluginVersion = pluginVersion(Version)
	return &info, nil
}

// pluginVersion is v as Nomad accepts it: the agent refuses to load a
// plugin whose version is not a semantic version, and a build from a git
// checkout is versioned by `git describe` (a tag, or a commit id).
func pluginVersion(v string) string {
	if _, err := goversion.NewSemver(v); err == nil {
		return strings.TrimPrefix(v, "v")
	}
	meta := strings.Trim(versionMetaUnsafe.ReplaceAllString(v, "."), ".")
	if meta == "" {
		return "0.0.0"
	}
	return "0.0.0+" + meta
}

var versionMetaUnsafe = regexp.MustCompile(`[^0-9A-Za-z]+`)

// ConfigSchema implements base.BasePlugin.
func (d *Driver) ConfigSchema() (*hclspec.Spec, error) { return configSpec, nil }

// SetConfig implements base.BasePlugin: it reads the plugin block, opens
// the image cache and the VM runtime, and cleans up what crashed starts
// left behind.
func (d *Driver) SetConfig(c *base.Config) error {
	var pc PluginConfig
	if c != nil && len(c.PluginConfig) != 0 {
		if err := base.MsgPackDecode(c.PluginConfig, &pc); err != nil {
			return fmt.Errorf("plugin %q config: %w", PluginName, err)
		}
	}
	pc = pc.withDefaults()
	if err := pc.validate(); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if c != nil && c.AgentConfig != nil {
		d.compute = c.AgentConfig.Compute()
	}
	if d.rt != nil {
		// Nomad sets the configuration more than once (the plugin
		// loader validates it, then the client hands it over with the
		// agent's settings).
		if reflect.DeepEqual(*d.config, pc) {
			return nil
		}
		d.tasksMu.RLock()
		n := len(d.tasks)
		d.tasksMu.RUnlock()
		if n > 0 {
			return fmt.Errorf("plugin %q: the configuration cannot change while %d tasks run", PluginName, n)
		}
		d.rt.Close()
		d.rt = nil
	}
	var imgOpts image.Options
	imgOpts.Logger = d.log
	if pc.ImageCacheSize != "" {
		size, _ := config.ParseByteSize(pc.ImageCacheSize)
		imgOpts.MaxCacheSize = int64(size)
	}
	images, err := image.Open(pc.ImageCacheDir, imgOpts)
	if err != nil {
		return fmt.Errorf("plugin %q: image cache %s: %w", PluginName, pc.ImageCacheDir, err)
	}
	netCfg := config.Network{
		Name:    pc.DefaultNetwork,
		ConfDir: pc.CNIConfDir,
		BinDirs: pc.CNIBinDirs,
		Bridge:  pc.Bridge,
	}
	nets, err := network.New(network.Options{
		Network:    netCfg,
		StateDir:   filepath.Join(pc.DataDir, "network"),
		NetNSDir:   pc.NetNSDir,
		PortFilter: hostnet.NewIsolation(pc.Bridge),
		Logger:     d.log,
	})
	if err != nil {
		return fmt.Errorf("plugin %q: %w", PluginName, err)
	}
	d.backends = []vm.Backend{
		firecracker.New(firecracker.Options{Binary: pc.Firecracker, Logger: d.log}),
		qemu.New(qemu.Options{Binary: pc.QEMU, Logger: d.log}),
	}
	rt, err := runtime.New(runtime.Options{
		DataDir:       pc.DataDir,
		Kernel:        pc.Kernel,
		KernelModules: pc.KernelModules,
		Init:          pc.Init,
		Backend:       pc.Backend,
		Backends:      d.backends,
		Images:        images,
		Network:       nets,
		Logger:        d.log,
	})
	if err != nil {
		return fmt.Errorf("plugin %q: %w", PluginName, err)
	}
	d.config, d.rt = &pc, rt
	// Leftovers of starts that died half-way (records without a VM,
	// scratch disks, network attachments of vanished VMs). VMs themselves
	// are left for RecoverTask: one that ended while the plugin was down
	// still has its exit status to report.
	if _, err := rt.Recover(d.ctx, runtime.RecoverOptions{Match: func(map[string]string) bool { return false }}); err != nil {
		d.log.Warn("cleaning up after earlier runs", "err", err)
	}
	d.orphans.Do(func() { go d.collectOrphans() })
	return nil
}

// orphanGrace is how long after start-up the driver waits before removing
// VMs of allocations Nomad no longer has, leaving the agent time to
// recover its tasks first.
const orphanGrace = 2 * time.Minute

// collectOrphans removes this driver's VMs whose allocation directory is
// gone: Nomad deleted the allocation (garbage collection) while no plugin
// ran, so no DestroyTask will ever come for them.
func (d *Driver) collectOrphans() {
	t := time.NewTimer(orphanGrace)
	defer t.Stop()
	select {
	case <-d.ctx.Done():
		return
	case <-t.C:
	}
	d.removeOrphans(d.ctx)
}

func (d *Driver) removeOrphans(ctx context.Context) {
	rt := d.runtime()
	infos, err := rt.List()
	if err != nil {
		d.log.Warn("listing VMs", "err", err)
		return
	}
	for _, in := range infos {
		if in.Labels[labelOwner] != PluginName {
			continue
		}
		dir := in.Labels[labelAllocDir]
		if dir == "" {
			continue
		}
		if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
			continue
		}
		if d.ownsVM(in.ID) {
			continue
		}
		d.log.Warn("removing the VM of an allocation Nomad no longer has", "vm", in.ID, "alloc_id", in.Labels[labelAllocID])
		if err := rt.Remove(ctx, in.ID); err != nil {
			d.log.Warn("removing orphaned VM", "vm", in.ID, "err", err)
		}
		_ = os.Remove(offsetsPath(rt.DataDir(), in.ID))
		_ = os.Remove(shipperLogPath(rt.DataDir(), in.ID))
	}
}

func (d *Driver) ownsVM(id string) bool {
	d.tasksMu.RLock()
	defer d.tasksMu.RUnlock()
	for _, h := range d.tasks {
		if h.state.VMID == id {
			return true
		}
	}
	return false
}

func (d *Driver) runtime() *runtime.Runtime {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return d.rt
}

func (d *Driver) pluginConfig() *PluginConfig {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return d.config
}

// TaskConfigSchema implements drivers.DriverPlugin.
func (d *Driver) TaskConfigSchema() (*hclspec.Spec, error) { return taskConfigSpec, nil }

// Capabilities implements drivers.DriverPlugin.
func (d *Driver) Capabilities() (*drivers.Capabilities, error) { return capabilities, nil }

// Fingerprint implements drivers.DriverPlugin: healthy only when the
// configured backend can run VMs here and the default kernel and the guest
// init are in place.
func (d *Driver) Fingerprint(ctx context.Context) (<-chan *drivers.Fingerprint, error) {
	ch := make(chan *drivers.Fingerprint)
	go func() {
		defer close(ch)
		t := time.NewTimer(0)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-d.ctx.Done():
				return
			case <-t.C:
				t.Reset(fingerprintPeriod)
			}
			select {
			case ch <- d.fingerprint():
			case <-ctx.Done():
				return
			case <-d.ctx.Done():
				return
			}
		}
	}()
	return ch, nil
}

const attrPrefix = "driver." + PluginName + "."

func (d *Driver) fingerprint() *drivers.Fingerprint {
	pc := d.pluginConfig()
	rt := d.runtime()
	if pc == nil || rt == nil {
		return &drivers.Fingerprint{Health: drivers.HealthStateUndetected, HealthDescription: "the plugin is not configured yet"}
	}
	attrs := map[string]*pstructs.Attribute{
		attrPrefix + "version": pstructs.NewStringAttribute(Version),
		attrPrefix + "kernel":  pstructs.NewStringAttribute(pc.Kernel),
	}
	unhealthy := func(format string, args ...any) *drivers.Fingerprint {
		return &drivers.Fingerprint{Attributes: attrs, Health: drivers.HealthStateUnhealthy, HealthDescription: fmt.Sprintf(format, args...)}
	}
	b, reason, err := rt.SelectBackend("")
	if err != nil {
		return unhealthy("no VM backend can run here: %v", err)
	}
	attrs[attrPrefix+"backend"] = pstructs.NewStringAttribute(b.Name())
	bin := pc.QEMU
	if b.Name() == firecracker.Name {
		bin = pc.Firecracker
	}
	version, err := binaryVersion(bin)
	if err != nil {
		return unhealthy("%s: %v", b.Name(), err)
	}
	attrs[attrPrefix+"backend_version"] = pstructs.NewStringAttribute(version)
	if desc, ok := b.(vm.Describer); ok {
		attrs[attrPrefix+"backend_description"] = pstructs.NewStringAttribute(desc.Describe())
	}
	if fi, err := os.Stat(pc.Kernel); err != nil || !fi.Mode().IsRegular() {
		return unhealthy("the default guest kernel %s is missing (%v): set kernel in the plugin config", pc.Kernel, statErr(err, pc.Kernel))
	}
	if pc.Init != "" {
		if _, err := os.Stat(pc.Init); err != nil {
			return unhealthy("the guest init %s is missing: %v", pc.Init, err)
		}
	} else if _, err := initramfs.FindInit(); err != nil {
		return unhealthy("no guest init: %v (set init in the plugin config)", err)
	}
	return &drivers.Fingerprint{Attributes: attrs, Health: drivers.HealthStateHealthy, HealthDescription: reason}
}

var versionPattern = regexp.MustCompile(`v?[0-9]+\.[0-9]+(\.[0-9]+)?`)

// binaryVersion runs `bin --version` and returns the version it names.
func binaryVersion(bin string) (string, error) {
	path, err := exec.LookPath(bin)
	if err != nil {
		return "", fmt.Errorf("%s not found: %w", bin, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, path, "--version").Output()
	if err != nil {
		return "", fmt.Errorf("%s --version: %w", path, err)
	}
	first, _, _ := strings.Cut(string(out), "\n")
	if v := versionPattern.FindString(first); v != "" {
		return strings.TrimPrefix(v, "v"), nil
	}
	return strings.TrimSpace(first), nil
}

// TaskEvents implements drivers.DriverPlugin.
func (d *Driver) TaskEvents(ctx context.Context) (<-chan *drivers.TaskEvent, error) {
	return d.eventer.TaskEvents(ctx)
}

func (d *Driver) emit(tc *drivers.TaskConfig, msg string, annotations map[string]string) {
	ev := &drivers.TaskEvent{
		TaskID: tc.ID, TaskName: tc.Name, AllocID: tc.AllocID,
		Timestamp: time.Now(), Message: msg, Annotations: annotations,
	}
	if err := d.eventer.EmitEvent(ev); err != nil {
		d.log.Warn("emitting task event", "task", tc.ID, "err", err)
	}
}

func (d *Driver) handle(taskID string) (*taskHandle, error) {
	d.tasksMu.RLock()
	defer d.tasksMu.RUnlock()
	h, ok := d.tasks[taskID]
	if !ok {
		return nil, drivers.ErrTaskNotFound
	}
	return h, nil
}

// SignalTask implements drivers.DriverPlugin: the signal goes to the
// guest's workload through the guest init, not to the VMM.
func (d *Driver) SignalTask(taskID string, signal string) error {
	h, err := d.handle(taskID)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(d.ctx, 30*time.Second)
	defer cancel()
	return h.signal(ctx, signal)
}

// ExecTask implements drivers.DriverPlugin. The guest init has no exec
// channel (its console protocol reserves the frame type only), so the
// capability is off and Nomad does not offer exec for these tasks.
func (d *Driver) ExecTask(taskID string, cmd []string, timeout time.Duration) (*drivers.ExecTaskResult, error) {
	if _, err := d.handle(taskID); err != nil {
		return nil, err
	}
	return nil, errors.New("exec is not supported by the firecracker-task-driver: the guest init has no exec channel; run a remote-access service (such as sshd) in the VM instead")
}
