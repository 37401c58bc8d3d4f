package nomad

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"

	"github.com/containernetworking/cni/libcni"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/hashicorp/nomad/plugins/drivers"
	"github.com/hashicorp/nomad/plugins/shared/hclspec"

	"github.com/fireactions/fireactions/internal/config"
	"github.com/fireactions/fireactions/internal/image"
	"github.com/fireactions/fireactions/internal/metadata"
	"github.com/fireactions/fireactions/internal/network"
	"github.com/fireactions/fireactions/internal/runtime"
)

// Defaults of the task configuration, as in the original driver.
const (
	DefaultVcpus = 1
	DefaultMem   = 512
	// MaxVcpus is the most vCPUs a microVM gets (Firecracker's limit).
	MaxVcpus = 32
	// MinMem is the least memory (MiB) a Linux guest boots with.
	MinMem = 64
)

// taskConfigSpec is the schema of a task's config block. The attribute
// names are those of the original firecracker-task-driver, so its job
// files work unchanged; Backend, Command, Args and DiskSize are ours.
var taskConfigSpec = hclspec.NewObject(map[string]*hclspec.Spec{
	"OCIImage": hclspec.NewAttr("OCIImage", "string", false),
	"OCIAuth": hclspec.NewBlock("OCIAuth", false, hclspec.NewObject(map[string]*hclspec.Spec{
		"Username": hclspec.NewAttr("Username", "string", false),
		"Password": hclspec.NewAttr("Password", "string", false),
	})),
	"BootDisk":    hclspec.NewAttr("BootDisk", "string", false),
	"KernelImage": hclspec.NewAttr("KernelImage", "string", false),
	"Vcpus":       hclspec.NewAttr("Vcpus", "number", false),
	"Mem":         hclspec.NewAttr("Mem", "number", false),
	"Cputype":     hclspec.NewAttr("Cputype", "string", false),
	"DisableHt":   hclspec.NewAttr("DisableHt", "bool", false),
	"BootOptions": hclspec.NewAttr("BootOptions", "string", false),
	"Network":     hclspec.NewAttr("Network", "string", false),
	"Nic": hclspec.NewBlock("Nic", false, hclspec.NewObject(map[string]*hclspec.Spec{
		"Ip":          hclspec.NewAttr("Ip", "string", false),
		"Gateway":     hclspec.NewAttr("Gateway", "string", false),
		"Interface":   hclspec.NewAttr("Interface", "string", false),
		"Nameservers": hclspec.NewAttr("Nameservers", "list(string)", false),
	})),
	"Disks":       hclspec.NewAttr("Disks", "list(string)", false),
	"Firecracker": hclspec.NewAttr("Firecracker", "string", false),
	"Log":         hclspec.NewAttr("Log", "string", false),
	"Backend":     hclspec.NewAttr("Backend", "string", false),
	"Command":     hclspec.NewAttr("Command", "string", false),
	"Args":        hclspec.NewAttr("Args", "list(string)", false),
	"DiskSize":    hclspec.NewAttr("DiskSize", "string", false),
})

// TaskConfig is a task's config block.
type TaskConfig struct {
	OCIImage    string   `codec:"OCIImage"`
	OCIAuth     *OCIAuth `codec:"OCIAuth"`
	BootDisk    string   `codec:"BootDisk"`
	KernelImage string   `codec:"KernelImage"`
	// Vcpus and Mem (MiB) size the VM; 0 means the default (1 vCPU, or
	// the task's reserved cores; 512 MiB).
	Vcpus       int64  `codec:"Vcpus"`
	Mem         int64  `codec:"Mem"`
	Cputype     string `codec:"Cputype"`
	DisableHt   bool   `codec:"DisableHt"`
	BootOptions string `codec:"BootOptions"`
	Network     string `codec:"Network"`
	Nic         *Nic   `codec:"Nic"`
	// Disks are "PATH:ro" or "PATH:rw", optionally ":MOUNTPOINT".
	Disks       []string `codec:"Disks"`
	Firecracker string   `codec:"Firecracker"`
	Log         string   `codec:"Log"`
	Backend     string   `codec:"Backend"`
	Command     string   `codec:"Command"`
	Args        []string `codec:"Args"`
	DiskSize    string   `codec:"DiskSize"`
}

// OCIAuth are credentials for OCIImage's registry.
type OCIAuth struct {
	Username string `codec:"Username"`
	Password string `codec:"Password"`
}

// Nic is a static network interface on a host tap device.
type Nic struct {
	Ip          string   `codec:"Ip"`
	Gateway     string   `codec:"Gateway"`
	Interface   string   `codec:"Interface"`
	Nameservers []string `codec:"Nameservers"`
}

// cpuTypes are Firecracker's static CPU templates.
var cpuTypes = []string{"None", "T2", "T2S", "T2CL", "T2A", "C3"}

// plan is a validated task: the runtime request plus what the driver
// itself does with the task (its log file, warnings for the task's
// events).
type plan struct {
	req runtime.Request
	// logPath is the Log attribute, resolved; empty means none.
	logPath string
	// warnings are surfaced as task events: settings that were accepted
	// but have a consequence the user should know about.
	warnings []string
}

// taskEnv is the environment a task's process sees in app mode: the task's
// environment from Nomad (job env, NOMAD_* variables), sorted.
func taskEnv(tc *drivers.TaskConfig) []string {
	env := make([]string, 0, len(tc.Env))
	for k, v := range tc.Env {
		env = append(env, k+"="+v)
	}
	sort.Strings(env)
	return env
}

// vmID derives the VM's id from the task: readable (task name and
// allocation) and unique per task instance (Nomad's task id includes a
// random part per start).
func vmID(tc *drivers.TaskConfig) string {
	sum := sha256.Sum256([]byte(tc.ID))
	alloc := tc.AllocID
	if len(alloc) > 8 {
		alloc = alloc[:8]
	}
	task := idUnsafe.ReplaceAllString(tc.Name, "-")
	task = strings.Trim(task, "-._")
	if len(task) > 32 {
		task = task[:32]
	}
	if task == "" {
		task = "task"
	}
	return fmt.Sprintf("%s-%s-%s", task, idUnsafe.ReplaceAllString(alloc, "-"), hex.EncodeToString(sum[:3]))
}

var idUnsafe = regexp.MustCompile(`[^A-Za-z0-9_.-]+`)

// hostnameUnsafe matches what a host name cannot hold.
var hostnameUnsafe = regexp.MustCompile(`[^A-Za-z0-9-]+`)

// hostname is the guest's host name: the task's name made DNS-safe.
func hostname(tc *drivers.TaskConfig) string {
	h := strings.Trim(hostnameUnsafe.ReplaceAllString(tc.Name, "-"), "-")
	if len(h) > 63 {
		h = strings.Trim(h[:63], "-")
	}
	if h == "" {
		return "nomad-task"
	}
	return h
}

// Labels put on every VM the driver starts.
const (
	labelOwner    = "fireactions.owner"
	labelAllocID  = "nomad.alloc_id"
	labelAllocDir = "nomad.alloc_dir"
	labelTask     = "nomad.task"
	labelJob      = "nomad.job"
)

// buildPlan validates cfg for task tc and turns it into a runtime request.
// Every problem is reported at once, each naming the attribute and the
// fix; nothing on the host is changed.
func buildPlan(tc *drivers.TaskConfig, cfg *TaskConfig, pc *PluginConfig) (*plan, error) {
	var errs []error
	bad := func(attr, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", attr, fmt.Sprintf(format, args...)))
	}
	p := &plan{}
	req := &p.req
	req.ID = vmID(tc)
	req.Hostname = hostname(tc)
	taskDir := tc.TaskDir().Dir

	// The root file system.
	switch {
	case cfg.OCIImage == "" && cfg.BootDisk == "":
		bad("OCIImage", "required: set OCIImage to an OCI image reference (such as \"ubuntu:22.04\") or BootDisk to an ext4 root file system")
	case cfg.OCIImage != "" && cfg.BootDisk != "":
		bad("BootDisk", "OCIImage and BootDisk are exclusive: set only one of them")
	case cfg.OCIImage != "":
		ref, err := name.ParseReference(cfg.OCIImage)
		if err != nil {
			bad("OCIImage", "%q is not an image reference: %v", cfg.OCIImage, err)
			break
		}
		req.Image = cfg.OCIImage
		req.Pull = image.PullOptions{
			Policy:   config.PullPolicy(pc.PullPolicy),
			Insecure: pc.insecure(ref.Context().RegistryStr()),
		}
	default:
		path, err := allowedFile(cfg.BootDisk, taskDir, tc.AllocDir, pc.AllowedImagePaths, "allowed_image_paths")
		if err != nil {
			bad("BootDisk", "%v", err)
		}
		req.BootDisk = path
	}
	if a := cfg.OCIAuth; a != nil {
		switch {
		case cfg.OCIImage == "":
			bad("OCIAuth", "only applies to OCIImage: remove it, or set OCIImage")
		case a.Username == "" || a.Password == "":
			bad("OCIAuth", "both Username and Password are required")
		default:
			req.Pull.Auth = &image.Auth{Username: a.Username, Password: a.Password}
		}
	}

	// Kernel.
	if cfg.KernelImage != "" {
		path, err := allowedFile(cfg.KernelImage, taskDir, tc.AllocDir, pc.AllowedImagePaths, "allowed_image_paths")
		switch {
		case err != nil:
			bad("KernelImage", "%v", err)
		case sameFile(path, pc.Kernel):
			// The plugin's own kernel, with its modules.
		default:
			req.Kernel, req.KernelModules = path, kernelModules(path)
		}
	} else if fi, err := os.Stat(pc.Kernel); err != nil || !fi.Mode().IsRegular() {
		bad("KernelImage", "not set, and the plugin's default kernel %s is not usable (%v): set KernelImage, or kernel in the plugin config (scripts/test-kernel.sh builds one)", pc.Kernel, statErr(err, pc.Kernel))
	}
	req.KernelArgs = strings.TrimSpace(cfg.BootOptions)

	// Process.
	if cfg.Command != "" {
		req.Entrypoint = []string{cfg.Command}
		req.Args = append([]string{}, cfg.Args...)
	} else if cfg.Args != nil {
		req.Args = append([]string{}, cfg.Args...)
	}
	req.Env = taskEnv(tc)
	// The task's `user` runs the process inside the guest, resolved in
	// the image's /etc/passwd; without it the image's User applies.
	req.User = tc.User

	// Resources.
	res := tc.Resources
	req.VCPUs = int(cfg.Vcpus)
	switch {
	case cfg.Vcpus < 0 || cfg.Vcpus > MaxVcpus:
		bad("Vcpus", "%d is outside 1..%d", cfg.Vcpus, MaxVcpus)
	case cfg.Vcpus == 0:
		req.VCPUs = DefaultVcpus
		if n := reservedCores(res); n > 0 {
			req.VCPUs = min(n, MaxVcpus)
		}
	}
	if n := reservedCores(res); n > 0 && req.VCPUs > n {
		p.warnings = append(p.warnings, fmt.Sprintf("Vcpus = %d exceeds the %d cores the task reserves (resources.cores): the VM's vCPUs share them", req.VCPUs, n))
	}
	req.MemoryMiB = int(cfg.Mem)
	switch {
	case cfg.Mem == 0:
		req.MemoryMiB = DefaultMem
	case cfg.Mem < MinMem || cfg.Mem > 1<<20:
		bad("Mem", "%d MiB is outside %d..%d", cfg.Mem, MinMem, 1<<20)
	}
	if limit := memoryLimit(res); limit > 0 && int64(req.MemoryMiB) > limit {
		p.warnings = append(p.warnings, fmt.Sprintf("Mem = %d MiB exceeds the task's memory reservation of %d MB: raise resources.memory to at least %d (plus the VMM's own overhead) so Nomad schedules what the VM uses", req.MemoryMiB, limit, req.MemoryMiB))
	}
	// Hyper-threading: with DisableHt the guest sees one thread per core;
	// otherwise an even vCPU count is presented as hyper-thread pairs
	// (Firecracker's smt), which needs an even count.
	req.SMT = !cfg.DisableHt && req.VCPUs >= 2 && req.VCPUs%2 == 0
	if cfg.Cputype != "" {
		if !slices.Contains(cpuTypes, cfg.Cputype) {
			bad("Cputype", "%q is not one of %s", cfg.Cputype, strings.Join(cpuTypes, ", "))
		}
		req.CPUTemplate = cfg.Cputype
	}
	if cfg.DiskSize != "" {
		size, err := config.ParseByteSize(cfg.DiskSize)
		switch {
		case err != nil:
			bad("DiskSize", "%v", err)
		case size < 16<<20:
			bad("DiskSize", "%s is too small for the scratch file system: give at least 16MiB", cfg.DiskSize)
		default:
			req.DiskSize = int64(size)
		}
	}

	// Disks.
	for i, d := range cfg.Disks {
		attr := fmt.Sprintf("Disks[%d]", i)
		disk, err := runtime.ParseDisk(d, i)
		if err != nil {
			bad(attr, "%v", err)
			continue
		}
		raw, _, _ := strings.Cut(d, ":")
		path, err := allowedFile(raw, taskDir, tc.AllocDir, pc.AllowedDiskPaths, "allowed_disk_paths")
		if err != nil {
			bad(attr, "%v", err)
			continue
		}
		disk.Path = path
		req.Disks = append(req.Disks, disk)
	}

	// Network.
	switch {
	case cfg.Network != "" && cfg.Nic != nil:
		bad("Nic", "Network and Nic are exclusive: use a CNI network (Network) or a static interface (Nic), not both")
	case cfg.Network != "":
		// "default" is the plugin's default network, as for the runtime.
		name := cfg.Network
		if name == "default" {
			name = pc.DefaultNetwork
		}
		if _, err := libcni.LoadConfList(pc.CNIConfDir, name); err != nil {
			bad("Network", "CNI network %q: %v (add its configuration list to %s, the plugin's cni_conf_dir; `fireactions host setup` installs %q)", name, err, pc.CNIConfDir, pc.DefaultNetwork)
		}
		req.Network = runtime.Network{UseCNI: true, CNI: name}
	case cfg.Nic != nil:
		nic := &network.StaticNIC{IP: cfg.Nic.Ip, Gateway: cfg.Nic.Gateway, Interface: cfg.Nic.Interface, Nameservers: cfg.Nic.Nameservers}
		if err := nic.Validate(); err != nil {
			for _, e := range unjoin(err) {
				errs = append(errs, errors.New(nicAttr(e.Error())))
			}
		}
		req.Network = runtime.Network{Static: nic}
	}

	// Backend.
	if cfg.Backend != "" {
		switch cfg.Backend {
		case "auto", "firecracker", "qemu":
			req.Backend = cfg.Backend
		default:
			bad("Backend", "%q is not auto, firecracker or qemu", cfg.Backend)
		}
	}
	if cfg.Firecracker != "" {
		if cfg.Backend != "" && cfg.Backend != "firecracker" {
			bad("Firecracker", "names a Firecracker binary, but Backend is %q: remove one of them", cfg.Backend)
		}
		if !sameBinary(cfg.Firecracker, pc.Firecracker) {
			bad("Firecracker", "%q is not the Firecracker binary this plugin runs (%s): per-task binaries are not supported; set firecracker in the plugin config, or remove the attribute", cfg.Firecracker, pc.Firecracker)
		}
		req.Backend = "firecracker"
	}
	if req.CPUTemplate != "" && req.CPUTemplate != "None" && req.Backend != "firecracker" && !(req.Backend == "" && pc.Backend == "firecracker") {
		p.warnings = append(p.warnings, fmt.Sprintf("Cputype %q applies only to the firecracker backend; the qemu backend ignores it", req.CPUTemplate))
	}

	// The driver's own console log.
	if cfg.Log != "" {
		path, err := logPath(cfg.Log, taskDir, tc.AllocDir)
		if err != nil {
			bad("Log", "%v", err)
		}
		p.logPath = path
	}

	req.Labels = map[string]string{
		labelOwner:    PluginName,
		labelAllocID:  tc.AllocID,
		labelAllocDir: tc.AllocDir,
		labelTask:     tc.Name,
		labelJob:      tc.JobName,
	}
	req.Metadata = metadata.Input{Metadata: map[string]string{
		"nomad/alloc_id":  tc.AllocID,
		"nomad/job":       tc.JobName,
		"nomad/group":     tc.TaskGroupName,
		"nomad/task":      tc.Name,
		"nomad/namespace": tc.Namespace,
		"nomad/node_id":   tc.NodeID,
	}}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return p, nil
}

// sameFile reports whether a and b name the same file.
func sameFile(a, b string) bool {
	fa, err1 := os.Stat(a)
	fb, err2 := os.Stat(b)
	return err1 == nil && err2 == nil && os.SameFile(fa, fb)
}

// kernelModules finds the modules directory of a kernel laid out as
// scripts/test-kernel.sh lays it out: DIR/vmlinux with
// DIR/lib/modules/<version>/modules.dep. Empty when there is none: the
// kernel must then have its virtio and overlay drivers built in.
func kernelModules(kernel string) string {
	dirs, _ := filepath.Glob(filepath.Join(filepath.Dir(kernel), "lib", "modules", "*", "modules.dep"))
	if len(dirs) != 1 {
		return ""
	}
	return filepath.Dir(dirs[0])
}

func statErr(err error, path string) error {
	if err != nil {
		return err
	}
	return fmt.Errorf("%s is not a regular file", path)
}

func reservedCores(res *drivers.Resources) int {
	if res == nil || res.NomadResources == nil {
		return 0
	}
	return len(res.NomadResources.Cpu.ReservedCores)
}

// memoryLimit is the most memory (MB) Nomad lets the task use:
// resources.memory_max when set, else resources.memory.
func memoryLimit(res *drivers.Resources) int64 {
	if res == nil || res.NomadResources == nil {
		return 0
	}
	m := res.NomadResources.Memory
	return max(m.MemoryMaxMB, m.MemoryMB)
}

// allowedFile resolves p (relative paths are in the task directory) to an
// existing regular file inside the allocation directory or one of the
// allowed directories. Symbolic links are resolved first, so a link
// cannot lead outside.
func allowedFile(p, taskDir, allocDir string, allowed []string, setting string) (string, error) {
	if !filepath.IsAbs(p) {
		p = filepath.Join(taskDir, p)
	}
	real, err := filepath.EvalSymlinks(p)
	if err != nil {
		return "", fmt.Errorf("%s: %w", p, unwrapPath(err))
	}
	fi, err := os.Stat(real)
	if err != nil {
		return "", err
	}
	if !fi.Mode().IsRegular() {
		return "", fmt.Errorf("%s is not a regular file", p)
	}
	roots := append([]string{allocDir}, allowed...)
	for _, r := range roots {
		if r == "" {
			continue
		}
		if rr, err := filepath.EvalSymlinks(r); err == nil && inside(rr, real) {
			return real, nil
		}
	}
	if len(allowed) == 0 {
		return "", fmt.Errorf("%s is outside the task's allocation directory and the plugin allows no other paths: add its directory to %s in the plugin config", p, setting)
	}
	return "", fmt.Errorf("%s is outside the task's allocation directory and %s (%s): move it, or add its directory to %s in the plugin config", p, setting, strings.Join(allowed, ", "), setting)
}

// logPath resolves the Log attribute: a file inside the allocation
// directory (relative paths are in the task directory), whose directory
// exists.
func logPath(p, taskDir, allocDir string) (string, error) {
	if !filepath.IsAbs(p) {
		p = filepath.Join(taskDir, p)
	}
	p = filepath.Clean(p)
	dir, err := filepath.EvalSymlinks(filepath.Dir(p))
	if err != nil {
		return "", fmt.Errorf("directory of %s: %w", p, unwrapPath(err))
	}
	ad, err := filepath.EvalSymlinks(allocDir)
	if err != nil {
		return "", fmt.Errorf("allocation directory: %w", err)
	}
	full := filepath.Join(dir, filepath.Base(p))
	if !inside(ad, full) || full == ad {
		return "", fmt.Errorf("%s is outside the task's allocation directory: give a path such as \"alloc/logs/vm.log\" or \"local/console.log\"", p)
	}
	if fi, err := os.Lstat(full); err == nil && !fi.Mode().IsRegular() {
		return "", fmt.Errorf("%s exists and is not a regular file", p)
	}
	return full, nil
}

// inside reports whether p is root or below it (both clean and absolute).
func inside(root, p string) bool {
	rel, err := filepath.Rel(root, p)
	return err == nil && rel != ".." && !strings.HasPrefix(rel, "../") && !filepath.IsAbs(rel)
}

func unwrapPath(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

// sameBinary reports whether two names of an executable (paths or names
// looked up in PATH) are the same file.
func sameBinary(a, b string) bool {
	ra, errA := resolveBinary(a)
	rb, errB := resolveBinary(b)
	if errA != nil || errB != nil {
		return a == b
	}
	return ra == rb
}

func resolveBinary(s string) (string, error) {
	if !strings.Contains(s, "/") {
		p, err := exec.LookPath(s)
		if err != nil {
			return "", err
		}
		s = p
	}
	return filepath.EvalSymlinks(s)
}

// unjoin splits an errors.Join result into its parts.
func unjoin(err error) []error {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		return j.Unwrap()
	}
	return []error{err}
}

// nicFields maps the network package's field names to the Nic block's.
var nicFields = []struct{ from, to string }{
	{"nic.ip", "Nic.Ip"},
	{"nic.gateway", "Nic.Gateway"},
	{"nic.interface", "Nic.Interface"},
	{"nic.nameservers", "Nic.Nameservers"},
}

// nicAttr renames the field a network.StaticNIC error starts with.
func nicAttr(msg string) string {
	for _, f := range nicFields {
		if strings.HasPrefix(msg, f.from) {
			return f.to + msg[len(f.from):]
		}
	}
	return "Nic: " + msg
}
