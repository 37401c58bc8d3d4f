package registrycache

import (
	"fmt"
	"strings"

	"github.com/fireactions/fireactions/internal/config"
)

// Host file names, relative to the directory the host side is rendered to.
const (
	HostZotConfig  = "zot/config.json"
	HostZotStorage = "zot/storage.sh"
	HostSquidConf  = "squid/squid.conf"
	HostNftables   = "nftables/registry-cache.nft"
)

// NftTable is the nftables table that holds the interception rules.
const NftTable = "fireactions_registry_cache"

// Host renders what the host runs, keyed by relative path: Zot's config
// and the script that mounts its size-bounded storage, Squid's config
// (only when Squid is enabled) and the nftables rules. The rules file is
// always rendered: with Squid disabled it only removes the table, so
// loading it clears rules left from an earlier configuration.
func Host(cfg *config.Config) (map[string][]byte, error) {
	l, err := newLayout(cfg)
	if err != nil {
		return nil, err
	}
	zot, err := l.zotConfigJSON()
	if err != nil {
		return nil, err
	}
	files := map[string][]byte{
		HostZotConfig:  zot,
		HostZotStorage: l.zotStorageScript(),
	}
	if !l.rc.Squid.Enabled {
		files[HostNftables] = nftRules(nil)
		return files, nil
	}
	n, err := l.hostNetwork(cfg.Network)
	if err != nil {
		return nil, err
	}
	conf, err := l.squidConf(n)
	if err != nil {
		return nil, err
	}
	files[HostSquidConf] = conf
	files[HostNftables] = nftRules(&redirect{
		net:       n,
		httpPort:  l.rc.Squid.HTTPPort,
		httpsPort: l.rc.Squid.HTTPSPort,
		https:     l.bumping(),
	})
	return files, nil
}

// redirect says where the VMs' web traffic goes.
type redirect struct {
	net       hostNet
	httpPort  int
	httpsPort int
	https     bool
}

// nftRules renders an nftables script that replaces the table atomically.
// The exceptions come first: the metadata service, the gateway itself
// (Zot, Squid, DNS) and the VM subnet are never redirected; then TCP 80
// (and 443 when Squid bumps TLS) from the VM subnet on the bridge is
// DNATed to Squid's intercept ports on the gateway.
func nftRules(r *redirect) []byte {
	var b strings.Builder
	b.WriteString("#!/usr/sbin/nft -f\n")
	b.WriteString("# Rendered by fireactions from registry_cache; do not edit.\n")
	// Declaring the table before deleting it makes the delete succeed
	// whether or not the table exists, so the file loads on every boot.
	fmt.Fprintf(&b, "table ip %s\n", NftTable)
	fmt.Fprintf(&b, "delete table ip %s\n", NftTable)
	if r == nil {
		b.WriteString("# Squid is disabled: no VM traffic is redirected.\n")
		return []byte(b.String())
	}
	in := fmt.Sprintf("iifname %q", r.net.bridge)
	gw := r.net.gw.String()
	fmt.Fprintf(&b, "table ip %s {\n", NftTable)
	b.WriteString("\tchain prerouting {\n")
	b.WriteString("\t\ttype nat hook prerouting priority dstnat; policy accept;\n")
	fmt.Fprintf(&b, "\t\t%s ip daddr %s return comment \"metadata service: never redirected\"\n", in, MetadataAddress)
	fmt.Fprintf(&b, "\t\t%s ip daddr %s return comment \"the gateway itself: never redirected\"\n", in, gw)
	fmt.Fprintf(&b, "\t\t%s ip daddr %s return comment \"VM to VM: never redirected\"\n", in, r.net.subnet)
	fmt.Fprintf(&b, "\t\t%s ip saddr %s tcp dport 80 dnat to %s:%d\n", in, r.net.subnet, gw, r.httpPort)
	if r.https {
		fmt.Fprintf(&b, "\t\t%s ip saddr %s tcp dport 443 dnat to %s:%d\n", in, r.net.subnet, gw, r.httpsPort)
	}
	b.WriteString("\t}\n")
	b.WriteString("}\n")
	return []byte(b.String())
}
