package hostnet

import (
	"fmt"
	"net"
	"net/netip"
	"strings"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// MetadataAddr is the address guests reach the metadata service at.
var MetadataAddr = netip.MustParseAddr("169.254.169.254")

// BlockedIPv4 are destinations VMs may never reach: all of link-local
// (which holds the cloud metadata endpoints of AWS, GCP, Azure, OpenStack,
// Oracle, DigitalOcean, Hetzner, Tencent...) and the metadata and platform
// endpoints that live elsewhere. 169.254.169.254 port 80 is redirected to
// fireactions' own metadata service before this applies.
var BlockedIPv4 = []netip.Prefix{
	netip.MustParsePrefix("169.254.0.0/16"),     // link-local, incl. most cloud metadata services
	netip.MustParsePrefix("100.100.100.200/32"), // Alibaba Cloud metadata
	netip.MustParsePrefix("168.63.129.16/32"),   // Azure WireServer
	netip.MustParsePrefix("192.0.0.192/32"),     // Oracle Cloud legacy metadata
}

// BlockedIPv6 are the IPv6 equivalents. The bridge table already drops all
// IPv6 from VMs (they get none); this is the second line.
var BlockedIPv6 = []netip.Prefix{
	netip.MustParsePrefix("fe80::/10"),         // link-local
	netip.MustParsePrefix("fd00:ec2::254/128"), // AWS IMDS over IPv6
	netip.MustParsePrefix("fd20:ce::254/128"),  // GCP metadata over IPv6
}

// TableName is the name of the isolation tables (one inet, one bridge)
// of a VM bridge.
func TableName(bridge string) string {
	var b strings.Builder
	b.WriteString("fireactions_")
	for _, r := range bridge {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' {
			b.WriteRune(r)
		} else {
			b.WriteByte('_')
		}
	}
	return b.String()
}

// rules is the input of the isolation ruleset.
type rules struct {
	bridge    string
	subnet    netip.Prefix
	hostAddrs []netip.Addr // the gateway (and the registry cache's address)
	tcpPorts  []uint16     // allowed VM-to-host TCP ports
	udpPorts  []uint16     // allowed VM-to-host UDP ports
	mmdsPort  uint16       // where 169.254.169.254:80 is redirected on the gateway
	rate      RateLimit
}

// Chain and set names, also used by the tests and the docs.
const (
	setHostTCP   = "host_tcp"
	setHostUDP   = "host_udp"
	setHostAddrs = "host_addrs"
	setBlocked4  = "blocked4"
	setBlocked6  = "blocked6"
	setRate4     = "ratelimit4"
	setPorts     = "ports"
	setVMPorts   = "vm_ports"
)

// Register numbers: NFT_REG_1 for single values, the 32-bit registers from
// NFT_REG32_00 for concatenations (each field starts on a 4-byte boundary).
const (
	reg1     = 1
	reg32_00 = 8
)

func ifname(s string) []byte {
	b := make([]byte, 16)
	copy(b, s)
	return b
}

func u16(v uint16) []byte { return binaryutil.BigEndian.PutUint16(v) }

func loadMeta(k expr.MetaKey, reg uint32) expr.Any { return &expr.Meta{Key: k, Register: reg} }

func cmp(op expr.CmpOp, data []byte) expr.Any {
	return &expr.Cmp{Op: op, Register: reg1, Data: data}
}

func eq(data []byte) expr.Any { return cmp(expr.CmpOpEq, data) }

func iif(name string) []expr.Any {
	return []expr.Any{loadMeta(expr.MetaKeyIIFNAME, reg1), eq(ifname(name))}
}

func oif(name string) []expr.Any {
	return []expr.Any{loadMeta(expr.MetaKeyOIFNAME, reg1), eq(ifname(name))}
}

func nfproto(p byte) []expr.Any {
	return []expr.Any{loadMeta(expr.MetaKeyNFPROTO, reg1), eq([]byte{p})}
}

func l4proto(p byte) []expr.Any {
	return []expr.Any{loadMeta(expr.MetaKeyL4PROTO, reg1), eq([]byte{p})}
}

func payload(base expr.PayloadBase, off, n uint32, reg uint32) expr.Any {
	return &expr.Payload{DestRegister: reg, Base: base, Offset: off, Len: n}
}

func ip4Saddr(reg uint32) expr.Any { return payload(expr.PayloadBaseNetworkHeader, 12, 4, reg) }
func ip4Daddr(reg uint32) expr.Any { return payload(expr.PayloadBaseNetworkHeader, 16, 4, reg) }
func ip6Daddr(reg uint32) expr.Any { return payload(expr.PayloadBaseNetworkHeader, 24, 16, reg) }
func thDport(reg uint32) expr.Any  { return payload(expr.PayloadBaseTransportHeader, 2, 2, reg) }

func lookup(set string, invert bool) expr.Any {
	return &expr.Lookup{SourceRegister: reg1, SetName: set, Invert: invert}
}

// ctState matches packets whose conntrack state has any of bits.
func ctState(bits uint32) []expr.Any {
	return []expr.Any{
		&expr.Ct{Register: reg1, Key: expr.CtKeySTATE},
		&expr.Bitwise{SourceRegister: reg1, DestRegister: reg1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(bits), Xor: binaryutil.NativeEndian.PutUint32(0)},
		cmp(expr.CmpOpNeq, binaryutil.NativeEndian.PutUint32(0)),
	}
}

// ctStatusDNAT matches connections whose destination was NATed.
func ctStatusDNAT() []expr.Any {
	const ipsDstNAT = 1 << 5 // IPS_DST_NAT
	return []expr.Any{
		&expr.Ct{Register: reg1, Key: expr.CtKeySTATUS},
		&expr.Bitwise{SourceRegister: reg1, DestRegister: reg1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(ipsDstNAT), Xor: binaryutil.NativeEndian.PutUint32(0)},
		cmp(expr.CmpOpNeq, binaryutil.NativeEndian.PutUint32(0)),
	}
}

// inPrefix matches when the value in reg1 (an IPv4 address) is in p.
func inPrefix(p netip.Prefix, op expr.CmpOp) []expr.Any {
	mask := net.CIDRMask(p.Bits(), 32)
	return []expr.Any{
		&expr.Bitwise{SourceRegister: reg1, DestRegister: reg1, Len: 4, Mask: mask, Xor: make([]byte, 4)},
		cmp(op, p.Masked().Addr().AsSlice()),
	}
}

// seq flattens expressions and lists of expressions into one rule body.
func seq(parts ...any) []expr.Any {
	var out []expr.Any
	for _, p := range parts {
		switch p := p.(type) {
		case []expr.Any:
			out = append(out, p...)
		case expr.Any:
			out = append(out, p)
		default:
			panic(fmt.Sprintf("seq: %T is not an nftables expression", p))
		}
	}
	return out
}

func one(e ...expr.Any) []expr.Any { return e }

var (
	accept  = one(&expr.Verdict{Kind: expr.VerdictAccept})
	drop    = one(&expr.Verdict{Kind: expr.VerdictDrop})
	counter = one(&expr.Counter{})
)

func jump(chain string) []expr.Any {
	return one(&expr.Verdict{Kind: expr.VerdictJump, Chain: chain})
}

// rateLimited matches a new connection from a source address that
// exceeded its own budget: the dynamic set keeps one token bucket per
// source address (an nftables meter), so one busy VM cannot use up the
// others' budget.
func rateLimited(rl RateLimit) []expr.Any {
	return seq(
		nfproto(unix.NFPROTO_IPV4),
		ctState(expr.CtStateBitNEW),
		one(ip4Saddr(reg1)),
		one(&expr.Dynset{
			SrcRegKey: reg1,
			SetName:   setRate4,
			Operation: uint32(unix.NFT_DYNSET_OP_UPDATE),
			Exprs: []expr.Any{&expr.Limit{
				Type: expr.LimitTypePkts, Rate: rl.Rate, Unit: expr.LimitTime(rl.Per / time.Second),
				Burst: rl.Burst, Over: true,
			}},
		}),
	)
}

// buildInet queues the inet table: VM-to-host filtering, the forward
// filter (VM-to-VM, blocked destinations, rate limit), the metadata
// redirect and NAT.
func buildInet(c *nftables.Conn, r rules) error {
	t := &nftables.Table{Family: nftables.TableFamilyINet, Name: TableName(r.bridge)}
	// add+delete+add in one batch replaces the table atomically.
	c.AddTable(t)
	c.DelTable(t)
	c.AddTable(t)

	addSet := func(s *nftables.Set, elems []nftables.SetElement) error {
		s.Table = t
		if err := c.AddSet(s, elems); err != nil {
			return fmt.Errorf("set %s: %w", s.Name, err)
		}
		return nil
	}
	var tcp, udp, hosts []nftables.SetElement
	for _, p := range r.tcpPorts {
		tcp = append(tcp, nftables.SetElement{Key: u16(p)})
	}
	for _, p := range r.udpPorts {
		udp = append(udp, nftables.SetElement{Key: u16(p)})
	}
	for _, a := range r.hostAddrs {
		hosts = append(hosts, nftables.SetElement{Key: a.AsSlice()})
	}
	if err := addSet(&nftables.Set{Name: setHostTCP, KeyType: nftables.TypeInetService}, tcp); err != nil {
		return err
	}
	if err := addSet(&nftables.Set{Name: setHostUDP, KeyType: nftables.TypeInetService}, udp); err != nil {
		return err
	}
	if err := addSet(&nftables.Set{Name: setHostAddrs, KeyType: nftables.TypeIPAddr}, hosts); err != nil {
		return err
	}
	if err := addSet(&nftables.Set{Name: setBlocked4, KeyType: nftables.TypeIPAddr, Interval: true}, intervals(BlockedIPv4)); err != nil {
		return err
	}
	if err := addSet(&nftables.Set{Name: setBlocked6, KeyType: nftables.TypeIP6Addr, Interval: true}, intervals(BlockedIPv6)); err != nil {
		return err
	}
	if err := addSet(&nftables.Set{
		Name: setRate4, KeyType: nftables.TypeIPAddr,
		Dynamic: true, HasTimeout: true, Timeout: time.Minute, Size: 65535,
	}, nil); err != nil {
		return err
	}

	chain := func(name string, typ nftables.ChainType, hook *nftables.ChainHook, prio *nftables.ChainPriority) *nftables.Chain {
		ch := &nftables.Chain{Name: name, Table: t}
		if hook != nil {
			policy := nftables.ChainPolicyAccept
			ch.Type, ch.Hooknum, ch.Priority, ch.Policy = typ, hook, prio, &policy
		}
		return c.AddChain(ch)
	}
	rule := func(ch *nftables.Chain, e ...any) {
		c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: seq(e...)})
	}
	gw := r.hostAddrs[0]

	vmToHost := chain("vm_to_host", "", nil, nil)
	vmOut := chain("vm_out", "", nil, nil)

	input := chain("input", nftables.ChainTypeFilter, nftables.ChainHookInput, nftables.ChainPriorityFilter)
	rule(input, iif(r.bridge), jump(vmToHost.Name))

	rule(vmToHost, ctState(expr.CtStateBitESTABLISHED|expr.CtStateBitRELATED), accept)
	rule(vmToHost, ctState(expr.CtStateBitINVALID), drop)
	rule(vmToHost, rateLimited(r.rate), counter, drop)
	// The metadata service: only what the prerouting chain redirected
	// from 169.254.169.254:80 reaches its port.
	rule(vmToHost, nfproto(unix.NFPROTO_IPV4), one(ip4Daddr(reg1)), eq(gw.AsSlice()),
		l4proto(unix.IPPROTO_TCP), one(thDport(reg1)), eq(u16(r.mmdsPort)), ctStatusDNAT(), accept)
	rule(vmToHost, nfproto(unix.NFPROTO_IPV4), one(ip4Daddr(reg1)), one(lookup(setHostAddrs, false)),
		l4proto(unix.IPPROTO_UDP), one(thDport(reg1)), one(lookup(setHostUDP, false)), accept)
	rule(vmToHost, nfproto(unix.NFPROTO_IPV4), one(ip4Daddr(reg1)), one(lookup(setHostAddrs, false)),
		l4proto(unix.IPPROTO_TCP), one(thDport(reg1)), one(lookup(setHostTCP, false)), accept)
	// Ping the gateway (the new-connection limit above applies).
	rule(vmToHost, nfproto(unix.NFPROTO_IPV4), one(ip4Daddr(reg1)), one(lookup(setHostAddrs, false)),
		l4proto(unix.IPPROTO_ICMP), one(payload(expr.PayloadBaseTransportHeader, 0, 1, reg1)), eq([]byte{8}), accept)
	rule(vmToHost, counter, drop)

	forward := chain("forward", nftables.ChainTypeFilter, nftables.ChainHookForward, nftables.ChainPriorityFilter)
	// VM to VM through the host's routing (the bridge table stops it at
	// layer 2).
	rule(forward, iif(r.bridge), oif(r.bridge), counter, drop)
	rule(forward, iif(r.bridge), jump(vmOut.Name))
	// Nobody outside opens connections to VMs.
	rule(forward, oif(r.bridge), ctState(expr.CtStateBitESTABLISHED|expr.CtStateBitRELATED), accept)
	rule(forward, oif(r.bridge), counter, drop)

	rule(vmOut, ctState(expr.CtStateBitESTABLISHED|expr.CtStateBitRELATED), accept)
	rule(vmOut, ctState(expr.CtStateBitINVALID), drop)
	rule(vmOut, nfproto(unix.NFPROTO_IPV4), one(ip4Daddr(reg1)), one(lookup(setBlocked4, false)), counter, drop)
	rule(vmOut, nfproto(unix.NFPROTO_IPV6), one(ip6Daddr(reg1)), one(lookup(setBlocked6, false)), counter, drop)
	rule(vmOut, rateLimited(r.rate), counter, drop)

	prerouting := chain("prerouting", nftables.ChainTypeNAT, nftables.ChainHookPrerouting, nftables.ChainPriorityNATDest)
	rule(prerouting, iif(r.bridge), nfproto(unix.NFPROTO_IPV4),
		one(ip4Daddr(reg1)), eq(MetadataAddr.AsSlice()),
		l4proto(unix.IPPROTO_TCP), one(thDport(reg1)), eq(u16(80)),
		one(&expr.Immediate{Register: reg1, Data: gw.AsSlice()}),
		one(&expr.Immediate{Register: 2, Data: u16(r.mmdsPort)}),
		one(&expr.NAT{Type: expr.NATTypeDestNAT, Family: unix.NFPROTO_IPV4, RegAddrMin: reg1, RegProtoMin: 2, Specified: true}))

	postrouting := chain("postrouting", nftables.ChainTypeNAT, nftables.ChainHookPostrouting, nftables.ChainPriorityNATSource)
	rule(postrouting, nfproto(unix.NFPROTO_IPV4),
		one(ip4Saddr(reg1)), inPrefix(r.subnet, expr.CmpOpEq),
		one(ip4Daddr(reg1)), inPrefix(r.subnet, expr.CmpOpNeq),
		one(loadMeta(expr.MetaKeyOIFNAME, reg1)), cmp(expr.CmpOpNeq, ifname(r.bridge)),
		one(&expr.Masq{}))
	return nil
}

// buildBridge queues the bridge-family table: frames from a VM port must
// carry that port's registered MAC and IPv4 address (IPv4 and ARP only),
// and no frame is forwarded from one VM port to another. VM ports are
// recognised by name (set vm_ports, filled by Isolation.AllowPort) rather
// than by `meta ibrname`, which needs CONFIG_NFT_BRIDGE_META, missing from
// some kernels.
func buildBridge(c *nftables.Conn, bridge string, vmPorts, ports []nftables.SetElement) error {
	t := &nftables.Table{Family: nftables.TableFamilyBridge, Name: TableName(bridge)}
	c.AddTable(t)
	c.DelTable(t)
	c.AddTable(t)
	// Host key byte order (that of nft's string type) makes nft print the
	// names as strings.
	if err := c.AddSet(&nftables.Set{Table: t, Name: setVMPorts, KeyType: nftables.TypeIFName, KeyByteOrder: binaryutil.NativeEndian}, vmPorts); err != nil {
		return fmt.Errorf("set %s: %w", setVMPorts, err)
	}
	if err := c.AddSet(&nftables.Set{Table: t, Name: setPorts, KeyType: portKeyType, Concatenation: true}, ports); err != nil {
		return fmt.Errorf("set %s: %w", setPorts, err)
	}
	chain := func(name string, hook *nftables.ChainHook, prio *nftables.ChainPriority) *nftables.Chain {
		ch := &nftables.Chain{Name: name, Table: t}
		if hook != nil {
			policy := nftables.ChainPolicyAccept
			ch.Type, ch.Hooknum, ch.Priority, ch.Policy = nftables.ChainTypeFilter, hook, prio, &policy
		}
		return c.AddChain(ch)
	}
	rule := func(ch *nftables.Chain, e ...any) {
		c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: seq(e...)})
	}
	etherType := func(v uint16) []expr.Any {
		return one(payload(expr.PayloadBaseLLHeader, 12, 2, reg1), eq(u16(v)))
	}
	// iifname . ether saddr . (ip saddr | arp saddr ip) in @ports
	portKey := func(ipOffset uint32) []expr.Any {
		return one(
			loadMeta(expr.MetaKeyIIFNAME, reg32_00),
			payload(expr.PayloadBaseLLHeader, 6, 6, reg32_00+4),
			payload(expr.PayloadBaseNetworkHeader, ipOffset, 4, reg32_00+6),
			&expr.Lookup{SourceRegister: reg32_00, SetName: setPorts},
		)
	}
	vmPort := func(key expr.MetaKey) []expr.Any {
		return one(loadMeta(key, reg1), lookup(setVMPorts, false))
	}
	fromVM := chain("from_vm", nil, nil)
	pre := chain("prerouting", nftables.ChainHookPrerouting, nftables.ChainPriorityFilter)
	rule(pre, vmPort(expr.MetaKeyIIFNAME), jump(fromVM.Name))
	rule(fromVM, etherType(unix.ETH_P_IP), portKey(12), one(&expr.Verdict{Kind: expr.VerdictReturn}))
	rule(fromVM, etherType(unix.ETH_P_ARP), portKey(14), one(&expr.Verdict{Kind: expr.VerdictReturn}))
	rule(fromVM, counter, drop)

	fwd := chain("forward", nftables.ChainHookForward, nftables.ChainPriorityFilter)
	rule(fwd, vmPort(expr.MetaKeyIIFNAME), counter, drop)
	rule(fwd, vmPort(expr.MetaKeyOIFNAME), counter, drop)
	return nil
}

var portKeyType = nftables.MustConcatSetType(nftables.TypeIFName, nftables.TypeEtherAddr, nftables.TypeIPAddr)

// vmPortElement is the vm_ports-set key of a VM port.
func vmPortElement(hostIf string) nftables.SetElement {
	return nftables.SetElement{Key: ifname(hostIf)}
}

// portElement is the ports-set key of a VM port.
func portElement(hostIf string, mac net.HardwareAddr, ip netip.Addr) nftables.SetElement {
	key := make([]byte, 0, 28)
	key = append(key, ifname(hostIf)...)
	key = append(key, mac...)
	key = append(key, 0, 0)
	key = append(key, ip.AsSlice()...)
	return nftables.SetElement{Key: key}
}

// intervals turns prefixes into interval-set elements: each range starts
// at the prefix and ends (exclusively) at the next address after it.
func intervals(ps []netip.Prefix) []nftables.SetElement {
	var out []nftables.SetElement
	for _, p := range ps {
		start := p.Masked().Addr()
		end := lastAddr(p).Next()
		out = append(out, nftables.SetElement{Key: start.AsSlice()})
		if end.IsValid() {
			out = append(out, nftables.SetElement{Key: end.AsSlice(), IntervalEnd: true})
		}
	}
	return out
}

func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 1 << (7 - i%8)
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}
