package nomad

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"

	"github.com/hashicorp/nomad/plugins/shared/hclspec"

	"github.com/fireactions/fireactions/internal/config"
)

// PluginName is the driver's name: jobs say driver = "firecracker-task-driver"
// and the agent configuration plugin "firecracker-task-driver" {}.
const PluginName = "firecracker-task-driver"

// Defaults of the plugin configuration.
const (
	DefaultDataDir       = "/var/lib/fireactions/nomad"
	DefaultImageCacheDir = "/var/lib/fireactions/images"
	DefaultBackend       = "auto"
	DefaultFirecracker   = "firecracker"
	DefaultQEMU          = "qemu-system-x86_64"
)

// configSpec is the schema of the plugin block in the agent configuration:
//
//	plugin "firecracker-task-driver" {
//	  config {
//	    kernel = "/var/lib/fireactions/kernels/vmlinux"
//	    ...
//	  }
//	}
var configSpec = hclspec.NewObject(map[string]*hclspec.Spec{
	"kernel":              hclspec.NewAttr("kernel", "string", false),
	"kernel_modules":      hclspec.NewAttr("kernel_modules", "string", false),
	"init":                hclspec.NewAttr("init", "string", false),
	"data_dir":            hclspec.NewAttr("data_dir", "string", false),
	"image_cache_dir":     hclspec.NewAttr("image_cache_dir", "string", false),
	"image_cache_size":    hclspec.NewAttr("image_cache_size", "string", false),
	"backend":             hclspec.NewAttr("backend", "string", false),
	"firecracker":         hclspec.NewAttr("firecracker", "string", false),
	"qemu":                hclspec.NewAttr("qemu", "string", false),
	"allowed_image_paths": hclspec.NewAttr("allowed_image_paths", "list(string)", false),
	"allowed_disk_paths":  hclspec.NewAttr("allowed_disk_paths", "list(string)", false),
	"insecure_registries": hclspec.NewAttr("insecure_registries", "list(string)", false),
	"pull_policy":         hclspec.NewAttr("pull_policy", "string", false),
	"cni_conf_dir":        hclspec.NewAttr("cni_conf_dir", "string", false),
	"cni_bin_dirs":        hclspec.NewAttr("cni_bin_dirs", "list(string)", false),
	"default_network":     hclspec.NewAttr("default_network", "string", false),
	"bridge":              hclspec.NewAttr("bridge", "string", false),
	"netns_dir":           hclspec.NewAttr("netns_dir", "string", false),
})

// PluginConfig is the plugin's configuration (the agent's plugin block).
type PluginConfig struct {
	// Kernel is the guest kernel (an uncompressed PVH ELF vmlinux) tasks
	// boot when they give no KernelImage; KernelModules is its
	// lib/modules/<version> directory, whose virtio, ext4 and overlay
	// modules go into the initramfs.
	Kernel        string `codec:"kernel"`
	KernelModules string `codec:"kernel_modules"`
	// Init is the fireactions-init binary; empty means the usual places
	// (next to this plugin, /usr/lib/fireactions, $PATH).
	Init string `codec:"init"`
	// DataDir holds the VMs' state, scratch disks and the initramfs cache.
	DataDir string `codec:"data_dir"`
	// ImageCacheDir is the converted-image cache; the fireactions CLI
	// (<data-dir>/images) may share it.
	ImageCacheDir string `codec:"image_cache_dir"`
	// ImageCacheSize bounds the image cache (e.g. "20GiB"); empty means
	// no bound. Images in use are never removed.
	ImageCacheSize string `codec:"image_cache_size"`
	// Backend is the default VMM: auto (firecracker when usable, else
	// qemu), firecracker or qemu.
	Backend string `codec:"backend"`
	// Firecracker and QEMU are the VMM binaries.
	Firecracker string `codec:"firecracker"`
	QEMU        string `codec:"qemu"`
	// AllowedImagePaths are the host directories KernelImage and BootDisk
	// may name; AllowedDiskPaths those of Disks. A task's own allocation
	// directory is always allowed.
	AllowedImagePaths []string `codec:"allowed_image_paths"`
	AllowedDiskPaths  []string `codec:"allowed_disk_paths"`
	// InsecureRegistries (host[:port]) are pulled from over plain HTTP or
	// unverified TLS. Loopback registries speak plain HTTP without this.
	InsecureRegistries []string `codec:"insecure_registries"`
	// PullPolicy is Always, IfNotPresent (default) or Never.
	PullPolicy string `codec:"pull_policy"`
	// CNIConfDir holds the CNI configuration lists Network names;
	// CNIBinDirs the plugins.
	CNIConfDir string   `codec:"cni_conf_dir"`
	CNIBinDirs []string `codec:"cni_bin_dirs"`
	// DefaultNetwork is the CNI network `Network = "default"` means: the
	// one `fireactions host setup` installs, unless changed.
	DefaultNetwork string `codec:"default_network"`
	// Bridge is the bridge `fireactions host setup` manages; VM ports on
	// it are registered in its isolation table (anti-spoofing).
	Bridge string `codec:"bridge"`
	// NetNSDir is where per-VM network namespaces are bound.
	NetNSDir string `codec:"netns_dir"`
}

// withDefaults fills every empty field.
func (c PluginConfig) withDefaults() PluginConfig {
	def := func(s *string, v string) {
		if *s == "" {
			*s = v
		}
	}
	def(&c.Kernel, config.DefaultKernel)
	def(&c.DataDir, DefaultDataDir)
	def(&c.ImageCacheDir, DefaultImageCacheDir)
	def(&c.Backend, DefaultBackend)
	def(&c.Firecracker, DefaultFirecracker)
	def(&c.QEMU, DefaultQEMU)
	def(&c.PullPolicy, string(config.PullIfNotPresent))
	def(&c.CNIConfDir, config.DefaultCNIConfDir)
	def(&c.Bridge, config.DefaultBridge)
	def(&c.DefaultNetwork, config.DefaultNetworkName)
	if len(c.CNIBinDirs) == 0 {
		c.CNIBinDirs = append([]string(nil), config.DefaultCNIBinDirs...)
	}
	return c
}

// validate names every bad field of the plugin block with its fix.
func (c *PluginConfig) validate() error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("plugin %q config: %s: %s", PluginName, field, fmt.Sprintf(format, args...)))
	}
	abs := func(field, p string) {
		if p != "" && !filepath.IsAbs(p) {
			bad(field, "%q must be an absolute path", p)
		}
	}
	abs("kernel", c.Kernel)
	abs("kernel_modules", c.KernelModules)
	abs("init", c.Init)
	abs("data_dir", c.DataDir)
	abs("image_cache_dir", c.ImageCacheDir)
	abs("cni_conf_dir", c.CNIConfDir)
	abs("netns_dir", c.NetNSDir)
	for i, p := range c.AllowedImagePaths {
		abs(fmt.Sprintf("allowed_image_paths[%d]", i), p)
	}
	for i, p := range c.AllowedDiskPaths {
		abs(fmt.Sprintf("allowed_disk_paths[%d]", i), p)
	}
	switch c.Backend {
	case "auto", "firecracker", "qemu":
	default:
		bad("backend", "%q is not auto, firecracker or qemu", c.Backend)
	}
	switch config.PullPolicy(c.PullPolicy) {
	case config.PullAlways, config.PullIfNotPresent, config.PullNever:
	default:
		bad("pull_policy", "%q is not Always, IfNotPresent or Never", c.PullPolicy)
	}
	if c.ImageCacheSize != "" {
		if _, err := config.ParseByteSize(c.ImageCacheSize); err != nil {
			bad("image_cache_size", "%v", err)
		}
	}
	for i, r := range c.InsecureRegistries {
		if r == "" || strings.ContainsAny(r, "/ ") {
			bad(fmt.Sprintf("insecure_registries[%d]", i), "%q is not a registry host[:port]", r)
		}
	}
	return errors.Join(errs...)
}

// insecure reports whether the registry of ref is listed as insecure.
func (c *PluginConfig) insecure(registry string) bool {
	for _, r := range c.InsecureRegistries {
		if strings.EqualFold(r, registry) {
			return true
		}
	}
	return false
}
