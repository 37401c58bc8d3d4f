// Command fakefc stands in for the firecracker executable in tests on hosts
// without KVM. It takes firecracker's command line, serves the Firecracker
// HTTP API on --api-sock, and refuses every request that does not validate
// against the swagger file shipped in the firecracker-go-sdk module (paths,
// methods, bodies with required fields, types, enums and no unknown
// fields), and applies Firecracker's pre-boot and post-boot rules.
//
// On InstanceStart it boots the configured kernel, initrd and drives with
// qemu-system-x86_64 -M microvm (the device model of the qemu backend:
// virtio-mmio block devices in drive order, virtio-net on the configured
// taps) with the serial console on its own stdin and stdout, so the console
// path is Firecracker's. The MMDS data store (PUT/PATCH /mmds) is served to
// the guest at the MMDS address on the interfaces allowed to reach it,
// through a restricted QEMU user-mode NIC. When QEMU exits because the guest
// reset (QEMU runs with -no-reboot), the fake exits 0, as Firecracker does;
// killed, it takes QEMU with it (parent-death signal).
//
// Differences from Firecracker, by necessity:
//   - SendCtrlAltDel presses the ACPI power button (QMP system_powerdown):
//     QEMU's microvm machine has no i8042 keyboard controller to press
//     Ctrl-Alt-Del on. A guest that handles neither ignores it.
//   - An interface allowed to reach MMDS carries only MMDS traffic; its
//     tap is opened (and created if missing, as Firecracker does) but not
//     connected to the guest.
//   - vsock: the host socket is created, but no guest device exists.
//   - Balloon, snapshots, entropy and CPU configuration are refused.
//
// The swagger file's path is compiled in:
//
//	go build -ldflags "-X main.swaggerPath=$(go list -m -f '{{.Dir}}' github.com/firecracker-microvm/firecracker-go-sdk)/client/swagger.yaml"
//
// or given in $FAKEFC_SWAGGER.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"
)

// swaggerPath is set at link time (see the package comment).
var swaggerPath string

// Firecracker's exit codes that the fake uses.
const (
	exitOK          = 0
	exitGeneric     = 1
	exitBadConfig   = 152
	exitArgParsing  = 153
	defaultAPISock  = "/run/firecracker.socket"
	defaultInstance = "anonymous-instance"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == relayArg {
		os.Exit(relay(os.Args[2:]))
	}
	os.Exit(run(os.Args[1:]))
}

// options are firecracker's command-line arguments.
type options struct {
	apiSock, id                string
	logPath, level, metrics    string
	showLevel, showLogOrigin   bool
	noSeccomp, bootTimer       bool
	seccompFilter              string
	version                    bool
	maxPayload, mmdsSizeLimit  int
	startUS, startCPUUS, cpuUS int64
	configFile                 string
	noAPI                      bool
}

func parseArgs(args []string) (*options, error) {
	var o options
	fs := flag.NewFlagSet("firecracker", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.StringVar(&o.apiSock, "api-sock", defaultAPISock, "")
	fs.StringVar(&o.id, "id", defaultInstance, "")
	fs.StringVar(&o.logPath, "log-path", "", "")
	fs.StringVar(&o.level, "level", "Warning", "")
	fs.StringVar(&o.metrics, "metrics-path", "", "")
	fs.BoolVar(&o.showLevel, "show-level", false, "")
	fs.BoolVar(&o.showLogOrigin, "show-log-origin", false, "")
	fs.BoolVar(&o.noSeccomp, "no-seccomp", false, "")
	fs.StringVar(&o.seccompFilter, "seccomp-filter", "", "")
	fs.BoolVar(&o.bootTimer, "boot-timer", false, "")
	fs.BoolVar(&o.version, "version", false, "")
	fs.IntVar(&o.maxPayload, "http-api-max-payload-size", 51200, "")
	fs.IntVar(&o.mmdsSizeLimit, "mmds-size-limit", 51200, "")
	fs.Int64Var(&o.startUS, "start-time-us", 0, "")
	fs.Int64Var(&o.startCPUUS, "start-time-cpu-us", 0, "")
	fs.Int64Var(&o.cpuUS, "parent-cpu-time-us", 0, "")
	fs.StringVar(&o.configFile, "config-file", "", "")
	fs.BoolVar(&o.noAPI, "no-api", false, "")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if err := validInstanceID(o.id); err != nil {
		return nil, err
	}
	switch strings.ToLower(o.level) {
	case "error", "warning", "warn", "info", "debug", "trace", "off":
	default:
		return nil, fmt.Errorf("invalid value for --level: %q", o.level)
	}
	if o.configFile != "" || o.noAPI {
		return nil, errors.New("fakefc: --config-file and --no-api are not supported")
	}
	if o.seccompFilter != "" && o.noSeccomp {
		return nil, errors.New("--seccomp-filter and --no-seccomp are mutually exclusive")
	}
	return &o, nil
}

// validInstanceID applies Firecracker's rule: 1 to 64 letters, digits or
// '-'.
func validInstanceID(id string) error {
	if len(id) < 1 || len(id) > 64 {
		return fmt.Errorf("invalid instance ID %q: its length must be 1 to 64", id)
	}
	for i, r := range id {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-') {
			return fmt.Errorf("invalid instance ID %q: invalid char (%c) at position %d", id, r, i)
		}
	}
	return nil
}

func run(args []string) int {
	o, err := parseArgs(args)
	if err != nil {
		fmt.Fprintf(os.Stderr, "Arguments parsing error: %v\n", err)
		return exitArgParsing
	}
	if o.version {
		fmt.Printf("Firecracker v%s\n\n(fakefc: the fireactions test stand-in)\n", specVersion())
		return exitOK
	}
	api, err := loadAPI()
	if err != nil {
		fmt.Fprintf(os.Stderr, "fakefc: %v\n", err)
		return exitGeneric
	}
	l := &logger{id: o.id, showLevel: o.showLevel, w: io.Discard}
	if o.logPath != "" {
		// Firecracker opens an existing file or FIFO; it creates neither.
		f, err := os.OpenFile(o.logPath, os.O_RDWR|os.O_APPEND, 0)
		if err != nil {
			fmt.Fprintf(os.Stderr, "Failed to initialize logger: %v\n", err)
			return exitGeneric
		}
		l.w = f
	}
	v, err := newVMM(o, api, l)
	if err != nil {
		l.Errorf("%v", err)
		fmt.Fprintf(os.Stderr, "%v\n", err)
		return exitGeneric
	}
	l.Infof("Running Firecracker v%s (fakefc)", api.version)
	return v.serve()
}

// logger writes Firecracker-style log lines.
type logger struct {
	id        string
	showLevel bool
	mu        sync.Mutex
	w         io.Writer
}

func (l *logger) logf(level, format string, args ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	tag := l.id + ":fakefc"
	if l.showLevel {
		tag += ":" + level
	}
	fmt.Fprintf(l.w, "%s [%s] %s\n", time.Now().UTC().Format("2006-01-02T15:04:05.000000000"), tag, fmt.Sprintf(format, args...))
}

func (l *logger) Infof(format string, args ...any)  { l.logf("INFO", format, args...) }
func (l *logger) Warnf(format string, args ...any)  { l.logf("WARN", format, args...) }
func (l *logger) Errorf(format string, args ...any) { l.logf("ERROR", format, args...) }
