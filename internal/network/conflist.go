package network

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"

	"github.com/containernetworking/cni/libcni"

	"github.com/fireactions/fireactions/internal/config"
)

// CNIVersion is the spec version of the rendered configuration list. 1.0.0
// is the newest version every plugin of the chain speaks: Debian 12's
// plugins (1.1.1) and tc-redirect-tap (built against CNI 1.0) stop there.
const CNIVersion = "1.0.0"

// Plugins are the CNI plugin binaries the default network runs, in order.
var Plugins = []string{"bridge", "host-local", "firewall", "tc-redirect-tap"}

// ConflistOptions tunes RenderConflist beyond what the configuration says.
type ConflistOptions struct {
	// IPAMDataDir is host-local's reservation directory; empty means the
	// plugin's default (/var/lib/cni/networks).
	IPAMDataDir string
}

// RenderConflist returns the CNI configuration list of the default network
// described by n: the bridge plugin (the bridge is the VMs' gateway and
// masquerades their traffic) with host-local addresses from n.Subnet, the
// firewall plugin (so hosts whose FORWARD policy is drop still pass VM
// traffic), and tc-redirect-tap, which adds the tap the VMM attaches to,
// wired to the VM's veth inside its namespace.
func RenderConflist(n config.Network, opts ConflistOptions) ([]byte, error) {
	subnet, err := netip.ParsePrefix(n.Subnet)
	if err != nil {
		return nil, fmt.Errorf("network.subnet: %q is not a CIDR such as 10.200.0.0/24", n.Subnet)
	}
	gw, err := netip.ParseAddr(n.Gateway)
	if err != nil || !subnet.Contains(gw) {
		return nil, fmt.Errorf("network.gateway: %q is not an address inside %s", n.Gateway, subnet)
	}
	if n.Name == "" || n.Bridge == "" {
		return nil, fmt.Errorf("network.name and network.bridge are required (apply the configuration defaults first)")
	}
	ipam := map[string]any{
		"type":   "host-local",
		"ranges": [][]map[string]string{{{"subnet": subnet.String(), "gateway": gw.String()}}},
		"routes": []map[string]string{{"dst": "0.0.0.0/0"}},
	}
	if opts.IPAMDataDir != "" {
		ipam["dataDir"] = opts.IPAMDataDir
	}
	bridge := map[string]any{
		"type":        "bridge",
		"bridge":      n.Bridge,
		"isGateway":   true,
		"ipMasq":      true,
		"hairpinMode": false,
		"ipam":        ipam,
	}
	if n.MTU > 0 {
		bridge["mtu"] = n.MTU
	}
	if len(n.DNS) > 0 {
		bridge["dns"] = map[string]any{"nameservers": n.DNS}
	}
	list := map[string]any{
		"cniVersion": CNIVersion,
		"name":       n.Name,
		"plugins": []any{
			bridge,
			map[string]any{"type": "firewall", "backend": "iptables"},
			map[string]any{"type": "tc-redirect-tap"},
		},
	}
	out, err := json.MarshalIndent(list, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("render conflist %s: %w", n.Name, err)
	}
	out = append(out, '\n')
	// Parse it back as libcni will, so a bad rendering fails here and not
	// on the first VM.
	if _, err := libcni.ConfListFromBytes(out); err != nil {
		return nil, fmt.Errorf("render conflist %s: %w", n.Name, err)
	}
	return out, nil
}

// ConflistPath is where the configuration list of network name is installed.
func ConflistPath(confDir, name string) string {
	return filepath.Join(confDir, name+".conflist")
}

// CacheBinDir is where scripts/build-cni.sh puts tc-redirect-tap:
// $FIREACTIONS_CACHE/cni/bin, else ~/.cache/fireactions/cni/bin.
func CacheBinDir() string {
	if d := os.Getenv("FIREACTIONS_CACHE"); d != "" {
		return filepath.Join(d, "cni", "bin")
	}
	if h, err := os.UserHomeDir(); err == nil {
		return filepath.Join(h, ".cache", "fireactions", "cni", "bin")
	}
	return ""
}

// PluginDirs is the CNI plugin search path: the configured directories,
// then CacheBinDir (tc-redirect-tap is not packaged by Debian).
func PluginDirs(n config.Network) []string {
	dirs := append([]string(nil), n.BinDirs...)
	if c := CacheBinDir(); c != "" {
		seen := false
		for _, d := range dirs {
			seen = seen || d == c
		}
		if !seen {
			dirs = append(dirs, c)
		}
	}
	return dirs
}

// FindPlugin returns the path of the plugin binary name in dirs.
func FindPlugin(dirs []string, name string) (string, error) {
	for _, d := range dirs {
		p := filepath.Join(d, name)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("CNI plugin %s not found in %v", name, dirs)
}
