package nomad

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/nomad/client/lib/cpustats"
	"github.com/hashicorp/nomad/plugins/drivers"
)

// clockTicks is USER_HZ, the unit of the CPU times in /proc/<pid>/stat. It
// is 100 on every Linux architecture Firecracker and QEMU run on.
const clockTicks = 100

// procSample is one reading of a VMM process's usage.
type procSample struct {
	at         time.Time
	user, sys  time.Duration // CPU time since the process started
	rss, swap  uint64        // bytes
	mappedFile uint64        // bytes of RSS backed by files
}

// readProc samples /proc/<pid>. The VMM's CPU time is the guest's vCPUs
// plus the VMM's own work; its resident memory is the guest memory the
// guest has touched plus the VMM's own.
func readProc(pid int) (procSample, error) {
	s := procSample{at: time.Now()}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return s, err
	}
	// The command name (field 2) may hold spaces and parentheses: the
	// fields after it start after the last ')'.
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return s, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	f := strings.Fields(string(stat[i+1:]))
	// f[0] is field 3 (state); utime and stime are fields 14 and 15.
	if len(f) < 13 {
		return s, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	ut, err1 := strconv.ParseUint(f[11], 10, 64)
	st, err2 := strconv.ParseUint(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return s, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	s.user = time.Duration(ut) * time.Second / clockTicks
	s.sys = time.Duration(st) * time.Second / clockTicks

	status, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return s, err
	}
	defer status.Close()
	sc := bufio.NewScanner(status)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		kb := func() uint64 {
			n, _ := strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return n << 10
		}
		switch k {
		case "VmRSS":
			s.rss = kb()
		case "VmSwap":
			s.swap = kb()
		case "RssFile":
			s.mappedFile = kb()
		}
	}
	return s, sc.Err()
}

// usageTracker turns successive samples into Nomad's resource usage:
// CPU percentages over the interval between samples.
type usageTracker struct {
	compute cpustats.Compute
	prev    *procSample
}

func (u *usageTracker) usage(s procSample) *drivers.TaskResourceUsage {
	cpu := &drivers.CpuStats{Measured: []string{"System Mode", "User Mode", "Percent", "Total Ticks"}}
	if p := u.prev; p != nil {
		wall := s.at.Sub(p.at)
		if wall > 0 {
			pct := func(a, b time.Duration) float64 { return float64(b-a) / float64(wall) * 100 }
			cpu.UserMode = pct(p.user, s.user)
			cpu.SystemMode = pct(p.sys, s.sys)
			cpu.Percent = pct(p.user+p.sys, s.user+s.sys)
			if u.compute.NumCores > 0 {
				cpu.TotalTicks = cpu.Percent / 100 * float64(u.compute.TotalCompute) / float64(u.compute.NumCores)
			}
		}
	}
	u.prev = &s
	mem := &drivers.MemoryStats{
		RSS:        s.rss,
		Swap:       s.swap,
		MappedFile: s.mappedFile,
		Usage:      s.rss + s.swap,
		Measured:   []string{"RSS", "Swap", "Mapped File", "Usage"},
	}
	return &drivers.TaskResourceUsage{
		ResourceUsage: &drivers.ResourceUsage{MemoryStats: mem, CpuStats: cpu},
		Timestamp:     s.at.UnixNano(),
	}
}
