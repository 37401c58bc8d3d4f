package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/fireactions/fireactions/internal/config"
	"github.com/fireactions/fireactions/internal/guest"
	"github.com/fireactions/fireactions/internal/hostnet"
	"github.com/fireactions/fireactions/internal/image"
	"github.com/fireactions/fireactions/internal/network"
	"github.com/fireactions/fireactions/internal/runtime"
	"github.com/fireactions/fireactions/internal/vm"
	"github.com/fireactions/fireactions/internal/vm/firecracker"
	"github.com/fireactions/fireactions/internal/vm/qemu"
)

func init() {
	register(newVMCmd)
	register(newMetadataHelperCmd)
}

// Labels the CLI puts on its VMs. A foreground `vm run` VM is useless once
// its process is gone (nobody reads its output), so any later vm command
// removes it; a detached one lives until `vm stop`/`vm rm`.
const (
	labelCLI      = "fireactions/cli"
	cliForeground = "foreground"
	cliDetached   = "detached"
)

// Environment variables naming the guest kernel when --kernel and
// --kernel-modules are not given.
const (
	envKernel        = "FIREACTIONS_KERNEL"
	envKernelModules = "FIREACTIONS_KERNEL_MODULES"
)

// Exit codes of `vm run` when the workload did not report its own.
const (
	exitVMFailed = 125 // the VM or the guest init failed (like docker run)
	exitTimeout  = 124 // --timeout passed (like timeout(1))
	exitStopped  = 130 // stopped by Ctrl-C before the workload reported (128+SIGINT)
)

func newVMCmd(g *Globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "vm",
		Short: "Run OCI images as microVMs and manage them",
		Long: `Run an OCI image as a microVM (the image's Entrypoint, Cmd, Env,
WorkingDir and User, like docker run), list the VMs of this data directory,
follow their output, stop and remove them.

VM state lives under <data-dir>/vms, so several fireactions processes see
the same VMs; each VM is owned (watched) by at most one process. The
configuration file is optional: when it exists, its data_dir, network and
registry cache apply.`,
	}
	cmd.AddCommand(newVMRunCmd(g), newVMLsCmd(g), newVMStopCmd(g), newVMLogsCmd(g), newVMRmCmd(g), newVMInspectCmd(g))
	return cmd
}

// vmFlags are what every vm command needs to open the runtime.
type vmFlags struct {
	backend, kernel, modules string
}

// libLogger is the logger for the packages a vm command drives: the
// global one when --log-level was given, else the same handler at warn
// level, so that `vm run` prints the workload's output and a few lines of
// its own rather than every step of the machinery.
func libLogger(w io.Writer, g *Globals) *slog.Logger {
	if g.LogLevel != "" {
		return slog.Default()
	}
	opts := &slog.HandlerOptions{Level: slog.LevelWarn}
	if g.LogFormat == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

// loadOptionalConfig reads the configuration file when it exists; without
// one the documented defaults apply.
func loadOptionalConfig(g *Globals) (*config.Config, error) {
	if _, err := os.Stat(g.ConfigPath); err == nil {
		return config.Load(g.ConfigPath)
	} else if !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("config %s: %w", g.ConfigPath, err)
	}
	var cfg config.Config
	cfg.ApplyDefaults()
	return &cfg, nil
}

// vmBackends are the backends the CLI can use, most preferred first:
// auto takes Firecracker where it can run (KVM and the binary), else QEMU.
func vmBackends(log *slog.Logger) []vm.Backend {
	return []vm.Backend{firecracker.New(firecracker.Options{Logger: log}), qemu.New(qemu.Options{Logger: log})}
}

// openRuntime opens the runtime over the data directory.
func openRuntime(cmd *cobra.Command, g *Globals, f vmFlags) (*runtime.Runtime, error) {
	log := libLogger(cmd.ErrOrStderr(), g)
	cfg, err := loadOptionalConfig(g)
	if err != nil {
		return nil, err
	}
	dataDir := g.ResolveDataDir(cfg)
	store, err := openImageStore(g, image.Options{Logger: log})
	if err != nil {
		return nil, err
	}
	// Creates nothing on the host until a VM asks for a network.
	nm, err := network.New(network.Options{
		Network:    cfg.Network,
		StateDir:   filepath.Join(dataDir, "network"),
		PortFilter: hostnet.NewIsolation(cfg.Network.Bridge),
		Logger:     log,
	})
	if err != nil {
		return nil, err
	}
	return runtime.New(runtime.Options{
		DataDir:       dataDir,
		Kernel:        f.kernel,
		KernelModules: f.modules,
		Backend:       f.backend,
		Backends:      vmBackends(log),
		Images:        store,
		Network:       nm,
		Logger:        log,
	})
}

// resolveKernel picks the guest kernel: the flag, $FIREACTIONS_KERNEL, then
// the default path; and its modules: the flag, $FIREACTIONS_KERNEL_MODULES,
// then lib/modules/<version> next to the kernel (the layout
// scripts/test-kernel.sh produces), if there is exactly one.
func resolveKernel(kernel, modules string) (string, string, error) {
	if kernel == "" {
		kernel = os.Getenv(envKernel)
	}
	if kernel == "" {
		kernel = config.DefaultKernel
	}
	if fi, err := os.Stat(kernel); err != nil || !fi.Mode().IsRegular() {
		return "", "", fmt.Errorf("guest kernel %s not found: give one with --kernel or $%s; scripts/test-kernel.sh fetches Debian's cloud kernel and prints KERNEL= and MODULES= paths for --kernel and --kernel-modules (see docs/kernels.md)", kernel, envKernel)
	}
	if modules == "" {
		modules = os.Getenv(envKernelModules)
	}
	if modules == "" {
		if m, _ := filepath.Glob(filepath.Join(filepath.Dir(kernel), "lib", "modules", "*", "modules.dep")); len(m) == 1 {
			modules = filepath.Dir(m[0])
		}
	}
	if modules != "" {
		if fi, err := os.Stat(modules); err != nil || !fi.IsDir() {
			return "", "", fmt.Errorf("--kernel-modules: %s is not a directory (give the kernel's lib/modules/<version>)", modules)
		}
	}
	return kernel, modules, nil
}

// reapForeground removes the VMs of foreground `vm run` processes that
// died (kill -9, a crash): nobody will read their output again. Live
// processes' VMs are left alone.
func reapForeground(ctx context.Context, rt *runtime.Runtime) error {
	res, err := rt.Recover(ctx, runtime.RecoverOptions{Match: func(l map[string]string) bool { return l[labelCLI] == cliForeground }})
	for _, inst := range res.Adopted {
		slog.Warn("removing the VM of a vm run process that died", "vm", inst.ID())
		if rerr := inst.Remove(ctx); rerr != nil {
			err = errors.Join(err, rerr)
		}
	}
	return err
}

func newVMRunCmd(g *Globals) *cobra.Command {
	var (
		f                                       vmFlags
		insecure, detach                        bool
		cpus, memory                            int
		diskSize, netSpec, pull, name, platform string
		entrypoint, workdir, user, mode, kargs  string
		hostname                                string
		env, disks                              []string
		timeout, stopTimeout                    time.Duration
	)
	cmd := &cobra.Command{
		Use:   "run [flags] IMAGE [-- CMD ARG...]",
		Short: "Run an OCI image as a microVM and stream its output",
		Long: `Run pulls IMAGE (or uses the cached copy: --pull missing), boots it as a
microVM and runs the image's process: Entrypoint + Cmd with the image's
Env, WorkingDir and User. Arguments after -- replace the Cmd and keep the
Entrypoint, as docker run does; --entrypoint replaces both.

The workload's stdout and stderr go to this command's stdout and stderr,
and its exit code becomes this command's (128+N when signal N killed it).
Ctrl-C (SIGINT or SIGTERM) stops the VM cleanly: the image's stop signal to
the workload, then the power button, then the VMM is killed, all within
--stop-timeout; a second Ctrl-C kills it at once. The VM is removed when it
ends. Exit code 124 means --timeout passed; without a workload status, 125
means the VM or the guest init failed and 130 that Ctrl-C stopped it.

With --detach, run prints the VM's id and returns; the VM keeps running
until it ends or "fireactions vm stop" stops it, and stays listed until
"fireactions vm rm".

The guest kernel is --kernel, else $FIREACTIONS_KERNEL, else
` + config.DefaultKernel + `; its modules --kernel-modules, else
$FIREACTIONS_KERNEL_MODULES, else lib/modules/<version> next to the kernel.
scripts/test-kernel.sh fetches a suitable kernel.`,
		Example: `  fireactions vm run --insecure 127.0.0.1:5000/demo:latest
  fireactions vm run busybox -- sh -c 'echo hello; uname -a'
  fireactions vm run -e GREETING=hi --cpus 2 --memory 1024 --disk-size 10GiB ubuntu:24.04 -- bash -c 'echo $GREETING'
  fireactions vm run --detach --name web --net cni nginx:alpine`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			req := runtime.Request{
				ID: name, Image: args[0], VCPUs: cpus, MemoryMiB: memory, Env: env,
				WorkingDir: workdir, User: user, KernelArgs: kargs, Hostname: hostname,
				Timeout: timeout, StopTimeout: stopTimeout, Mode: guest.Mode(mode),
				Labels: map[string]string{labelCLI: cliForeground},
			}
			if detach {
				req.Labels[labelCLI] = cliDetached
			}
			if cmd.ArgsLenAtDash() >= 0 {
				req.Args = append([]string{}, args[cmd.ArgsLenAtDash():]...)
				if cmd.ArgsLenAtDash() != 1 {
					return fmt.Errorf("give one IMAGE before --, got %q", args[:cmd.ArgsLenAtDash()])
				}
			} else if len(args) > 1 {
				return fmt.Errorf("put the command after --: fireactions vm run %s -- %s", args[0], strings.Join(args[1:], " "))
			}
			if entrypoint != "" {
				req.Entrypoint = []string{entrypoint}
			}
			switch pull {
			case "always":
				req.Pull.Policy = config.PullAlways
			case "missing":
				req.Pull.Policy = config.PullIfNotPresent
			case "never":
				req.Pull.Policy = config.PullNever
			default:
				return fmt.Errorf("--pull: %q is not a policy; use always, missing or never", pull)
			}
			req.Pull.Insecure, req.Pull.Platform = insecure, platform
			if diskSize != "" {
				n, err := config.ParseByteSize(diskSize)
				if err != nil || n <= 0 {
					return fmt.Errorf("--disk-size: %q is not a size; write e.g. 10GiB", diskSize)
				}
				req.DiskSize = int64(n)
			}
			for i, e := range env {
				if k, _, ok := strings.Cut(e, "="); !ok || k == "" {
					return fmt.Errorf("-e/--env: %q (number %d) is not KEY=VALUE", e, i+1)
				}
			}
			for i, d := range disks {
				disk, err := runtime.ParseDisk(d, i)
				if err != nil {
					return fmt.Errorf("--disk: %w", err)
				}
				req.Disks = append(req.Disks, disk)
			}
			var err error
			if req.Network, err = runtime.ParseNetwork(netSpec); err != nil {
				return fmt.Errorf("--net: %w", err)
			}
			switch f.backend {
			case "", "auto", "firecracker", "qemu":
			default:
				return fmt.Errorf("--backend: %q is not auto, firecracker or qemu", f.backend)
			}
			if f.kernel, f.modules, err = resolveKernel(f.kernel, f.modules); err != nil {
				return err
			}
			return runVM(cmd, g, f, req, detach)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&f.backend, "backend", "auto", "VM backend: auto (firecracker when usable, else qemu), firecracker or qemu")
	fl.StringVar(&f.kernel, "kernel", "", "guest kernel, a PVH ELF vmlinux (default $"+envKernel+", else "+config.DefaultKernel+")")
	fl.StringVar(&f.modules, "kernel-modules", "", "the kernel's lib/modules/<version> directory (default $"+envKernelModules+", else next to the kernel)")
	fl.BoolVar(&insecure, "insecure", false, "allow plain HTTP and unverified TLS for the image's registry")
	fl.StringVar(&platform, "platform", "", "os/arch of a multi-platform image (default linux/<host architecture>)")
	fl.StringVar(&pull, "pull", "missing", "when to contact the registry: missing (only if not cached), always, never")
	fl.IntVar(&cpus, "cpus", 1, "vCPUs")
	fl.IntVar(&memory, "memory", 512, "memory in MiB")
	fl.StringVar(&diskSize, "disk-size", "", "size of the VM's writable scratch disk (sparse; default 4GiB)")
	fl.StringArrayVarP(&env, "env", "e", nil, "environment variable KEY=VALUE for the workload, over the image's (repeatable)")
	fl.StringVar(&entrypoint, "entrypoint", "", "replace the image's Entrypoint (and drop its Cmd)")
	fl.StringVarP(&workdir, "workdir", "w", "", "working directory of the workload (default the image's)")
	fl.StringVarP(&user, "user", "u", "", "user[:group] of the workload (default the image's)")
	fl.StringArrayVar(&disks, "disk", nil, "extra disk PATH:ro|rw[:MOUNTPOINT] (repeatable; default mount point /mnt/diskN)")
	fl.StringVar(&netSpec, "net", "none", "network: none, cni (the configured network) or cni:NAME")
	fl.StringVar(&hostname, "hostname", "", "guest host name (default the VM id)")
	fl.StringVar(&kargs, "kernel-args", "", "extra kernel command line arguments")
	fl.StringVar(&mode, "mode", "", "app (run the image's process) or system (boot the image's /sbin/init); default app")
	fl.BoolVarP(&detach, "detach", "d", false, "print the VM id and return; the VM keeps running")
	fl.StringVar(&name, "name", "", "VM id (default a random one)")
	fl.DurationVar(&timeout, "timeout", 0, "stop the VM after this long (0: no limit)")
	fl.DurationVar(&stopTimeout, "stop-timeout", 10*time.Second, "how long Ctrl-C waits for a graceful stop before killing the VM")
	return cmd
}

// runVM runs req in the foreground (or detached) and turns its end into the
// command's exit code.
func runVM(cmd *cobra.Command, g *Globals, f vmFlags, req runtime.Request, detach bool) error {
	stdout, stderr := cmd.OutOrStdout(), cmd.ErrOrStderr()
	sigc := make(chan os.Signal, 2)
	signal.Notify(sigc, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(sigc)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	// Until the VM runs, a signal just abandons the start (Run cleans up).
	starting := make(chan struct{})
	go func() {
		select {
		case s := <-sigc:
			slog.Info("interrupted; cleaning up", "signal", s)
			cancel()
		case <-starting:
		}
	}()

	rt, err := openRuntime(cmd, g, f)
	if err != nil {
		return err
	}
	defer rt.Close()
	if err := reapForeground(ctx, rt); err != nil {
		slog.Warn("cleaning up after earlier vm run processes", "err", err)
	}

	t0 := time.Now()
	var pullTook time.Duration
	var cached bool
	req.Events = func(e runtime.Event) {
		switch {
		case e.Phase == runtime.PhaseBackend:
			slog.Info("backend", "vm", e.ID, "choice", e.Message)
		case e.Phase == runtime.PhasePull && e.Done && e.Err == nil:
			pullTook, cached = e.Duration, e.Cached
		}
	}
	inst, err := rt.Run(ctx, req)
	close(starting)
	if err != nil {
		if ctx.Err() != nil {
			return &ExitError{Code: exitStopped, Err: fmt.Errorf("interrupted before the VM started; nothing is left behind")}
		}
		return err
	}
	if detach {
		fmt.Fprintln(stdout, inst.ID())
		return nil
	}

	// From here on: Ctrl-C stops the VM, a second one kills it.
	stopped := make(chan struct{})
	go func() {
		select {
		case <-sigc:
		case <-stopped:
			return
		}
		slog.Info("stopping the VM (Ctrl-C again to kill it)", "vm", inst.ID(), "within", req.StopTimeout)
		go func() {
			select {
			case <-sigc:
				slog.Warn("killing the VM", "vm", inst.ID())
				cancel()
			case <-stopped:
			}
		}()
		if _, err := inst.Stop(ctx, req.StopTimeout); err != nil && ctx.Err() == nil {
			slog.Error("stop", "vm", inst.ID(), "err", err)
		}
	}()
	defer close(stopped)

	out := make(chan error, 1)
	go func() { out <- inst.Output(context.Background(), stdout, stderr) }()
	go func() {
		st, err := inst.WaitStarted(ctx, nil)
		if err == nil {
			slog.Info("workload started", "vm", inst.ID(), "boot", st.GuestStartedAt.Sub(st.StartedAt).Round(time.Millisecond),
				"total", st.GuestStartedAt.Sub(t0).Round(time.Millisecond), "pull", pullTook.Round(time.Millisecond), "image_cached", cached)
		}
	}()
	es, werr := inst.Wait(ctx)
	if werr != nil && ctx.Err() != nil {
		// Killed by a second Ctrl-C: Remove below kills it at once.
		es = vm.ExitStatus{Reason: vm.ReasonStopped}
		werr = nil
	}
	if werr == nil {
		if err := <-out; err != nil {
			slog.Warn("reading the VM's output", "vm", inst.ID(), "err", err)
		}
	}
	rctx, rcancel := context.WithTimeout(context.Background(), time.Minute)
	defer rcancel()
	if err := inst.Remove(rctx); err != nil {
		slog.Error("removing the VM", "vm", inst.ID(), "err", err)
	}
	if werr != nil {
		return werr
	}
	slog.Info("vm ended", "vm", inst.ID(), "how", es.String())
	return exitFor(inst.ID(), es)
}

// exitFor turns how a VM ended into the command's result.
func exitFor(id string, es vm.ExitStatus) error {
	switch {
	case es.Reason == vm.ReasonTimeout:
		return &ExitError{Code: exitTimeout, Err: fmt.Errorf("vm %s: stopped after --timeout", id)}
	case es.WorkloadExited:
		if es.Code == 0 {
			return nil
		}
		return &ExitError{Code: es.Code}
	case es.Reason == vm.ReasonGuestShutdown && es.Message == "":
		return nil
	case es.Reason == vm.ReasonStopped:
		return &ExitError{Code: exitStopped}
	}
	return &ExitError{Code: exitVMFailed, Err: fmt.Errorf("vm %s: %s", id, es)}
}

func newVMLsCmd(g *Globals) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "ls",
		Short: "List the VMs of this data directory",
		Long: `Lists every VM: ID, IMAGE, STATE (creating, starting, running, stopping,
exited), BACKEND, PID of the VMM and CREATED. It first removes what
foreground "vm run" processes that were killed left behind.`,
		Aliases: []string{"ps", "list"},
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			rt, err := openRuntime(cmd, g, vmFlags{})
			if err != nil {
				return err
			}
			defer rt.Close()
			if err := reapForeground(cmd.Context(), rt); err != nil {
				slog.Warn("cleaning up after earlier vm run processes", "err", err)
			}
			list, err := rt.List()
			if err != nil {
				return err
			}
			if asJSON {
				if list == nil {
					list = []runtime.Info{}
				}
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(list)
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tIMAGE\tSTATE\tBACKEND\tPID\tCREATED")
			now := time.Now()
			for _, in := range list {
				img := in.Image
				if in.BootDisk != "" {
					img = in.BootDisk
				}
				pid := "-"
				if in.Pid > 0 && in.State != runtime.StateExited {
					pid = fmt.Sprint(in.Pid)
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", in.ID, orDash(img), in.State, orDash(in.Backend), pid, ago(now, in.Created))
			}
			return tw.Flush()
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func newVMStopCmd(g *Globals) *cobra.Command {
	var timeout time.Duration
	cmd := &cobra.Command{
		Use:   "stop [flags] ID...",
		Short: "Stop VMs gracefully",
		Long: `Stop takes over each VM (it must not be owned by a live process, such as a
foreground vm run: press Ctrl-C there) and stops it within --time: the
workload's stop signal through the guest init, then the power button, then
SIGTERM and SIGKILL to the VMM. The VM stays listed, with its output, until
"fireactions vm rm".`,
		Example: `  fireactions vm stop web
  fireactions vm stop --time 30s web worker`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			rt, err := openRuntime(cmd, g, vmFlags{})
			if err != nil {
				return err
			}
			defer rt.Close()
			var errs []error
			for _, id := range args {
				inst, err := rt.Attach(cmd.Context(), id)
				if err != nil {
					errs = append(errs, err)
					continue
				}
				es, err := inst.Stop(cmd.Context(), timeout)
				if err != nil {
					errs = append(errs, fmt.Errorf("stop %s: %w", id, err))
					continue
				}
				fmt.Fprintf(cmd.OutOrStdout(), "%s: %s\n", id, es)
			}
			return errors.Join(errs...)
		},
	}
	cmd.Flags().DurationVarP(&timeout, "time", "t", 10*time.Second, "deadline of the graceful stop before the VMM is killed")
	return cmd
}

func newVMRmCmd(g *Globals) *cobra.Command {
	var force bool
	cmd := &cobra.Command{
		Use:   "rm [flags] ID...",
		Short: "Remove VMs and everything they hold",
		Long: `Remove deletes each VM's files, scratch disk, network attachment and image
lease. A running VM needs --force, which kills it at once (use
"fireactions vm stop" first for a graceful end).`,
		Aliases: []string{"remove"},
		Args:    cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			rt, err := openRuntime(cmd, g, vmFlags{})
			if err != nil {
				return err
			}
			defer rt.Close()
			var errs []error
			for _, id := range args {
				in, err := rt.Inspect(id)
				if err != nil {
					errs = append(errs, err)
					continue
				}
				if !force && (in.State == runtime.StateRunning || in.State == runtime.StateStarting || in.State == runtime.StateStopping) {
					errs = append(errs, fmt.Errorf("vm %s is %s: stop it first (fireactions vm stop %s) or use --force", id, in.State, id))
					continue
				}
				if err := rt.Remove(cmd.Context(), id); err != nil {
					errs = append(errs, err)
					continue
				}
				fmt.Fprintln(cmd.OutOrStdout(), id)
			}
			return errors.Join(errs...)
		},
	}
	cmd.Flags().BoolVarP(&force, "force", "f", false, "kill and remove running VMs")
	return cmd
}

func newVMLogsCmd(g *Globals) *cobra.Command {
	var follow, console bool
	cmd := &cobra.Command{
		Use:   "logs [flags] ID",
		Short: "Print a VM's output",
		Long: `Logs prints the workload's stdout and stderr (to stdout and stderr) from the
start of the VM's life; with --follow it keeps printing until the VM ends.
--console adds the kernel's and the guest init's messages (to stderr). A
system-mode VM's whole console goes to stdout.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			rt, err := openRuntime(cmd, g, vmFlags{})
			if err != nil {
				return err
			}
			defer rt.Close()
			in, err := rt.Inspect(args[0])
			if err != nil {
				return err
			}
			if in.VM == nil {
				return fmt.Errorf("vm %s has not started yet", args[0])
			}
			opts := vm.LogOptions{Follow: follow, Stdout: cmd.OutOrStdout(), Stderr: cmd.ErrOrStderr()}
			if console {
				opts.Console = cmd.ErrOrStderr()
			}
			if in.Mode == guest.ModeSystem {
				opts.Console = cmd.OutOrStdout()
			}
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			err = rt.VMs().Logs(ctx, args[0], opts)
			if errors.Is(err, context.Canceled) {
				return nil
			}
			return err
		},
	}
	cmd.Flags().BoolVarP(&follow, "follow", "f", false, "keep printing until the VM ends")
	cmd.Flags().BoolVar(&console, "console", false, "also print kernel and guest init messages (to stderr)")
	return cmd
}

func newVMInspectCmd(g *Globals) *cobra.Command {
	return &cobra.Command{
		Use:   "inspect ID",
		Short: "Print everything known about a VM as JSON",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			rt, err := openRuntime(cmd, g, vmFlags{})
			if err != nil {
				return err
			}
			defer rt.Close()
			in, err := rt.Inspect(args[0])
			if err != nil {
				return err
			}
			enc := json.NewEncoder(cmd.OutOrStdout())
			enc.SetIndent("", "  ")
			return enc.Encode(in)
		},
	}
}

// newMetadataHelperCmd is the program QEMU runs for each guest connection
// to the metadata address (see qemu.MetadataHelperMain): the fireactions
// executable with qemu.MetadataHelperArg first. Hidden; not for people.
func newMetadataHelperCmd(_ *Globals) *cobra.Command {
	return &cobra.Command{
		Use:                qemu.MetadataHelperArg,
		Hidden:             true,
		DisableFlagParsing: true,
		RunE: func(_ *cobra.Command, args []string) error {
			if code := qemu.MetadataHelperMain(args); code != 0 {
				return &ExitError{Code: code}
			}
			return nil
		},
	}
}
