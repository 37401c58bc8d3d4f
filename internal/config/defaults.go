package config

import (
	"os"
	"path/filepath"
	"time"
)

// Defaults applied to every field the user leaves empty. docs/configuration.md
// lists each one; keep the two in step.
const (
	DefaultServerAddress  = "127.0.0.1:8080"
	DefaultMetricsAddress = "127.0.0.1:8081"
	DefaultGitHubAPIURL   = "https://api.github.com/"
	DefaultNetworkName    = "fireactions"
	DefaultBridge         = "fireactions0"
	DefaultSubnet         = "10.200.0.0/24"
	DefaultGateway        = "10.200.0.1"
	DefaultCNIConfDir     = "/etc/cni/conf.d"
	DefaultKernel         = "/var/lib/fireactions/kernels/vmlinux"
	DefaultKernelArgs     = "console=ttyS0 reboot=k panic=1 pci=off"
	DefaultRunnerImage    = "ghcr.io/thpham/fireactions-images/ubuntu-24.04:latest"
	DefaultZotPort        = 5000
	DefaultSquidHTTPPort  = 3128
	DefaultSquidHTTPSPort = 3129
	DefaultDrainTimeout   = Duration(30 * time.Minute)
	DefaultBootTimeout    = Duration(5 * time.Minute)
	DefaultMaxJob         = Duration(6 * time.Hour)
)

// DefaultCNIBinDirs are searched in order: Debian's package, then the
// upstream convention.
var DefaultCNIBinDirs = []string{"/usr/lib/cni", "/opt/cni/bin"}

// DefaultLabels are the runner labels when a pool lists none.
var DefaultLabels = []string{"self-hosted", "fireactions"}

// DefaultMirrors are the registries the cache serves when none are listed.
var DefaultMirrors = []Mirror{
	{Registry: "docker.io", URL: "https://registry-1.docker.io"},
	{Registry: "ghcr.io", URL: "https://ghcr.io"},
	{Registry: "quay.io", URL: "https://quay.io"},
	{Registry: "gcr.io", URL: "https://gcr.io"},
}

// DefaultDataDir is /var/lib/fireactions for root and the XDG data directory
// for everyone else, so an unprivileged user can pull and convert images.
func DefaultDataDir() string {
	if os.Geteuid() == 0 {
		return "/var/lib/fireactions"
	}
	if d := os.Getenv("XDG_DATA_HOME"); d != "" {
		return filepath.Join(d, "fireactions")
	}
	if h, err := os.UserHomeDir(); err == nil {
		return filepath.Join(h, ".local", "share", "fireactions")
	}
	return filepath.Join(os.TempDir(), "fireactions")
}

// ApplyDefaults fills every empty field with its documented default. It
// never overwrites a value the user set.
func (c *Config) ApplyDefaults() {
	if c.Server.Address == "" {
		c.Server.Address = DefaultServerAddress
	}
	if c.Server.DrainTimeout == 0 {
		c.Server.DrainTimeout = DefaultDrainTimeout
	}
	if c.Metrics.Address == "" {
		c.Metrics.Address = DefaultMetricsAddress
	}
	if c.Log.Level == "" {
		c.Log.Level = "info"
	}
	if c.Log.Format == "" {
		c.Log.Format = "text"
	}
	if c.GitHub.APIURL == "" {
		c.GitHub.APIURL = DefaultGitHubAPIURL
	}
	n := &c.Network
	if n.Name == "" {
		n.Name = DefaultNetworkName
	}
	if n.ConfDir == "" {
		n.ConfDir = DefaultCNIConfDir
	}
	if len(n.BinDirs) == 0 {
		n.BinDirs = append([]string(nil), DefaultCNIBinDirs...)
	}
	if n.Bridge == "" {
		n.Bridge = DefaultBridge
	}
	if n.Subnet == "" {
		n.Subnet = DefaultSubnet
	}
	if n.Gateway == "" {
		n.Gateway = DefaultGateway
	}
	rc := &c.RegistryCache
	if rc.Gateway == "" {
		rc.Gateway = n.Gateway
	}
	if rc.Zot.Port == 0 {
		rc.Zot.Port = DefaultZotPort
	}
	if rc.Zot.StorageDir == "" {
		rc.Zot.StorageDir = "/var/lib/zot"
	}
	if rc.Zot.MaxSize == 0 {
		rc.Zot.MaxSize = 50 << 30
	}
	if rc.Zot.GCInterval == 0 {
		rc.Zot.GCInterval = Duration(24 * time.Hour)
	}
	if len(rc.Mirrors) == 0 {
		rc.Mirrors = append([]Mirror(nil), DefaultMirrors...)
	}
	sq := &rc.Squid
	if sq.HTTPPort == 0 {
		sq.HTTPPort = DefaultSquidHTTPPort
	}
	if sq.HTTPSPort == 0 {
		sq.HTTPSPort = DefaultSquidHTTPSPort
	}
	if sq.MemoryCache == 0 {
		sq.MemoryCache = 256 << 20
	}
	if sq.DiskCache == 0 {
		sq.DiskCache = 10 << 30
	}
	if sq.MaxObjectSize == 0 {
		sq.MaxObjectSize = 1 << 30
	}
	if sq.CacheDir == "" {
		sq.CacheDir = "/var/cache/squid"
	}
	for i := range c.Pools {
		c.Pools[i].applyDefaults()
	}
}

func (p *Pool) applyDefaults() {
	if p.Scaling == "" {
		p.Scaling = ScalingScaleSet
	}
	if p.Timeouts.Boot == 0 {
		p.Timeouts.Boot = DefaultBootTimeout
	}
	if p.Timeouts.MaxJob == 0 {
		p.Timeouts.MaxJob = DefaultMaxJob
	}
	r := &p.Runner
	if r.NamePrefix == "" {
		r.NamePrefix = "runner"
	}
	if r.Image == "" {
		r.Image = DefaultRunnerImage
	}
	if r.ImagePullPolicy == "" {
		r.ImagePullPolicy = PullIfNotPresent
	}
	if r.Labels == nil {
		r.Labels = append([]string(nil), DefaultLabels...)
	}
	v := &p.VM
	if v.Mode == "" {
		v.Mode = VMModeSystem
	}
	if v.Backend == "" {
		v.Backend = BackendAuto
	}
	if v.VCPUs == 0 {
		v.VCPUs = 2
	}
	if v.MemoryMiB == 0 {
		v.MemoryMiB = 2048
	}
	if v.Kernel == "" {
		v.Kernel = DefaultKernel
	}
	if v.KernelArgs == "" {
		v.KernelArgs = DefaultKernelArgs
	}
	if v.DiskSize == 0 {
		v.DiskSize = 20 << 30
	}
}
