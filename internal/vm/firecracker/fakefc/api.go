package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// Firecracker's answers to requests made in the wrong phase.
const (
	errAfterBoot  = "The requested operation is not supported after starting the microVM."
	errBeforeBoot = "The requested operation is not supported before starting the microVM."
)

// vmm is the fake's state: what the API has configured, then the running
// guest.
type vmm struct {
	opts *options
	api  *apiSpec
	log  *logger
	dir  string // where the fake keeps its sockets: the API socket's directory

	mu       sync.Mutex
	state    string // "Not started", "Running", "Paused"
	machine  machineConfig
	boot     *bootSource
	drives   []drive
	nics     []*nic
	vsock    *vsockConfig
	mmdsCfg  *mmdsConfig
	mmds     *mmdsStore
	metrics  *os.File
	guest    *qemu
	exitCode chan int
}

type machineConfig struct {
	VcpuCount       int    `json:"vcpu_count"`
	MemSizeMib      int    `json:"mem_size_mib"`
	Smt             bool   `json:"smt"`
	CPUTemplate     string `json:"cpu_template,omitempty"`
	TrackDirtyPages bool   `json:"track_dirty_pages"`
}

type bootSource struct {
	KernelImagePath string `json:"kernel_image_path"`
	InitrdPath      string `json:"initrd_path,omitempty"`
	BootArgs        string `json:"boot_args,omitempty"`
}

type drive struct {
	DriveID      string `json:"drive_id"`
	PathOnHost   string `json:"path_on_host"`
	IsReadOnly   bool   `json:"is_read_only"`
	IsRootDevice bool   `json:"is_root_device"`
	CacheType    string `json:"cache_type,omitempty"`
	IoEngine     string `json:"io_engine,omitempty"`
	Partuuid     string `json:"partuuid,omitempty"`
}

type nic struct {
	IfaceID     string `json:"iface_id"`
	HostDevName string `json:"host_dev_name"`
	GuestMAC    string `json:"guest_mac,omitempty"`
	tap         *os.File
}

type vsockConfig struct {
	GuestCID int    `json:"guest_cid"`
	UDSPath  string `json:"uds_path"`
	VsockID  string `json:"vsock_id,omitempty"`
	listener net.Listener
}

type mmdsConfig struct {
	Version           string   `json:"version,omitempty"`
	NetworkInterfaces []string `json:"network_interfaces"`
	IPv4Address       string   `json:"ipv4_address,omitempty"`
}

func newVMM(o *options, api *apiSpec, l *logger) (*vmm, error) {
	v := &vmm{
		opts: o, api: api, log: l, dir: filepath.Dir(o.apiSock),
		state:    "Not started",
		machine:  machineConfig{VcpuCount: 1, MemSizeMib: 128},
		mmds:     newMMDSStore(o.mmdsSizeLimit),
		exitCode: make(chan int, 1),
	}
	if o.metrics != "" {
		f, err := os.OpenFile(o.metrics, os.O_RDWR|os.O_APPEND, 0)
		if err != nil {
			return nil, fmt.Errorf("Failed to initialize metrics: %v", err)
		}
		v.metrics = f
	}
	return v, nil
}

// serve answers the API until the guest ends, then returns the exit code.
func (v *vmm) serve() int {
	l, err := net.Listen("unix", v.opts.apiSock)
	if err != nil {
		v.log.Errorf("Failed to open the API socket: %v", err)
		fmt.Fprintf(os.Stderr, "Failed to open the API socket: %v\n", err)
		return exitGeneric
	}
	v.log.Infof("API server listening on %s", v.opts.apiSock)
	srv := &http.Server{Handler: v, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(l) }()
	code := <-v.exitCode
	v.flushMetrics()
	return code
}

// fault answers with Firecracker's error body.
func fault(w http.ResponseWriter, status int, format string, args ...any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(map[string]string{"fault_message": fmt.Sprintf(format, args...)})
}

func reply(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(v)
}

func (v *vmm) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	op, params, ok := v.api.match(r.Method, r.URL.Path)
	if !ok {
		v.log.Warnf("Invalid request method and/or path: %s %s", r.Method, r.URL.Path)
		fault(w, http.StatusBadRequest, "Invalid request method and/or path: %s %s.", r.Method, r.URL.Path)
		return
	}
	raw, err := io.ReadAll(io.LimitReader(r.Body, int64(v.opts.maxPayload)+1))
	if err != nil {
		fault(w, http.StatusBadRequest, "%v", err)
		return
	}
	if len(raw) > v.opts.maxPayload {
		fault(w, http.StatusBadRequest, "Request payload with size %d is larger than the limit of %d allowed by server.", len(raw), v.opts.maxPayload)
		return
	}
	var body any
	if op.body != nil {
		if len(bytes.TrimSpace(raw)) == 0 {
			if op.bodyRequired {
				fault(w, http.StatusBadRequest, "Empty request body: %s %s needs one", r.Method, r.URL.Path)
				return
			}
		} else {
			dec := json.NewDecoder(bytes.NewReader(raw))
			if err := dec.Decode(&body); err != nil || dec.More() {
				fault(w, http.StatusBadRequest, "An error occurred when deserializing the json body of a request: %v", err)
				return
			}
			if err := op.validateBody(body); err != nil {
				v.log.Warnf("%s %s: %v", r.Method, r.URL.Path, err)
				fault(w, http.StatusBadRequest, "%v", err)
				return
			}
		}
	}
	v.log.Infof("The API server received a %s request on %q.", r.Method, r.URL.Path)
	v.mu.Lock()
	defer v.mu.Unlock()
	status, answer, err := v.dispatch(op.id, params, raw)
	if err != nil {
		v.log.Warnf("%s %s: %v", r.Method, r.URL.Path, err)
		fault(w, status, "%v", err)
		return
	}
	if answer != nil {
		reply(w, answer)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// decode turns a validated body into a typed value.
func decode(raw []byte, v any) error {
	if err := json.Unmarshal(raw, v); err != nil {
		return fmt.Errorf("An error occurred when deserializing the json body of a request: %v", err)
	}
	return nil
}

// dispatch runs an operation; v.mu is held. It returns the HTTP status of
// an error, or the body of a 200 answer (nil: 204).
func (v *vmm) dispatch(op string, params map[string]string, raw []byte) (int, any, error) {
	bad := func(format string, args ...any) (int, any, error) {
		return http.StatusBadRequest, nil, fmt.Errorf(format, args...)
	}
	started := v.state != "Not started"
	preBoot := func() bool { return !started }
	switch op {
	case "describeInstance":
		return 0, map[string]string{"app_name": "Firecracker", "id": v.opts.id, "state": v.state, "vmm_version": v.api.version}, nil
	case "getFirecrackerVersion":
		return 0, map[string]string{"firecracker_version": v.api.version}, nil
	case "getMachineConfiguration":
		return 0, v.machine, nil
	case "getExportVmConfig":
		return 0, map[string]any{"machine-config": v.machine, "boot-source": v.boot, "drives": v.drives, "network-interfaces": v.nics, "vsock": v.vsock, "mmds-config": v.mmdsCfg}, nil

	case "putMachineConfiguration", "patchMachineConfiguration":
		if !preBoot() {
			return bad(errAfterBoot)
		}
		mc := v.machine
		if op == "putMachineConfiguration" {
			mc = machineConfig{}
		}
		if err := decode(raw, &mc); err != nil {
			return bad("%v", err)
		}
		if mc.Smt && mc.VcpuCount > 1 && mc.VcpuCount%2 != 0 {
			return bad("The vCPU number is invalid! The vCPU number can only be 1 or an even number when SMT is enabled.")
		}
		if mc.MemSizeMib < 1 {
			return bad("The memory size (MiB) is invalid.")
		}
		v.machine = mc
	case "putGuestBootSource":
		if !preBoot() {
			return bad(errAfterBoot)
		}
		var bs bootSource
		if err := decode(raw, &bs); err != nil {
			return bad("%v", err)
		}
		if err := readable(bs.KernelImagePath); err != nil {
			return bad("The kernel file cannot be opened: %v", err)
		}
		if bs.InitrdPath != "" {
			if err := readable(bs.InitrdPath); err != nil {
				return bad("The initrd file cannot be opened due to invalid path or invalid permissions. %v", err)
			}
		}
		v.boot = &bs
	case "putGuestDriveByID":
		if !preBoot() {
			return bad(errAfterBoot)
		}
		var d drive
		if err := decode(raw, &d); err != nil {
			return bad("%v", err)
		}
		if d.DriveID != params["drive_id"] {
			return bad("The id from the path [%s] does not match the id from the body [%s]!", params["drive_id"], d.DriveID)
		}
		flag := os.O_RDWR
		if d.IsReadOnly {
			flag = os.O_RDONLY
		}
		f, err := os.OpenFile(d.PathOnHost, flag, 0)
		if err != nil {
			return bad("Unable to create the block device: BackingFile(%v)", err)
		}
		f.Close()
		for i := range v.drives {
			if v.drives[i].DriveID == d.DriveID {
				v.drives[i] = d
				return 0, nil, nil
			}
		}
		if d.IsRootDevice {
			for _, o := range v.drives {
				if o.IsRootDevice {
					return bad("A root block device already exists!")
				}
			}
		}
		v.drives = append(v.drives, d)
	case "putGuestNetworkInterfaceByID":
		if !preBoot() {
			return bad(errAfterBoot)
		}
		var n nic
		if err := decode(raw, &n); err != nil {
			return bad("%v", err)
		}
		if n.IfaceID != params["iface_id"] {
			return bad("The id from the path [%s] does not match the id from the body [%s]!", params["iface_id"], n.IfaceID)
		}
		for _, o := range v.nics {
			if o.IfaceID == n.IfaceID {
				return bad("fakefc: updating network interface %s is not supported", n.IfaceID)
			}
			if o.HostDevName == n.HostDevName {
				return bad("Could not create the network device: Open tap device failed: the tap %s is used by interface %s", n.HostDevName, o.IfaceID)
			}
			if n.GuestMAC != "" && o.GuestMAC == n.GuestMAC {
				return bad("The MAC address is already in use: %s", n.GuestMAC)
			}
		}
		tap, err := openTap(n.HostDevName)
		if err != nil {
			return bad("Could not create the network device: Open tap device failed: %v", err)
		}
		n.tap = tap
		v.nics = append(v.nics, &n)
	case "putGuestVsock":
		if !preBoot() {
			return bad(errAfterBoot)
		}
		var vs vsockConfig
		if err := decode(raw, &vs); err != nil {
			return bad("%v", err)
		}
		v.vsock = &vs
	case "putMmdsConfig":
		if !preBoot() {
			return bad(errAfterBoot)
		}
		var c mmdsConfig
		if err := decode(raw, &c); err != nil {
			return bad("%v", err)
		}
		for _, id := range c.NetworkInterfaces {
			if v.nic(id) == nil {
				return bad("The list of network interface IDs that allow forwarding MMDS requests is empty or contains an ID that does not correspond to any existing network interface.")
			}
		}
		if len(c.NetworkInterfaces) == 0 {
			return bad("The list of network interface IDs that allow forwarding MMDS requests is empty or contains an ID that does not correspond to any existing network interface.")
		}
		if c.IPv4Address == "" {
			c.IPv4Address = "169.254.169.254"
		}
		if ip := net.ParseIP(c.IPv4Address).To4(); ip == nil || ip[0] != 169 || ip[1] != 254 {
			return bad("The MMDS IPv4 address is not link local.")
		}
		if c.Version == "" {
			c.Version = "V1"
		}
		v.mmdsCfg = &c
		v.mmds.setVersion(c.Version)
	case "putMmds":
		if err := v.mmds.put(raw); err != nil {
			return bad("%v", err)
		}
	case "patchMmds":
		if err := v.mmds.patch(raw); err != nil {
			return bad("%v", err)
		}
	case "getMmds":
		doc, ok := v.mmds.get()
		if !ok {
			return http.StatusNotFound, nil, errors.New("The MMDS data store is not initialized.")
		}
		return 0, doc, nil
	case "putLogger", "putMetrics":
		if !preBoot() {
			return bad(errAfterBoot)
		}
		return bad("fakefc: configure the log and metrics on the command line (--log-path, --metrics-path)")
	case "patchVm":
		if !started {
			return bad(errBeforeBoot)
		}
		var s struct {
			State string `json:"state"`
		}
		if err := decode(raw, &s); err != nil {
			return bad("%v", err)
		}
		cmd, state := "stop", "Paused"
		if s.State == "Resumed" {
			cmd, state = "cont", "Running"
		}
		if err := v.guest.qmpCommand(cmd); err != nil {
			return http.StatusInternalServerError, nil, err
		}
		v.state = state
	case "createSyncAction":
		var a struct {
			ActionType string `json:"action_type"`
		}
		if err := decode(raw, &a); err != nil {
			return bad("%v", err)
		}
		switch a.ActionType {
		case "InstanceStart":
			if started {
				return bad(errAfterBoot)
			}
			if err := v.start(); err != nil {
				return bad("Start microVM error: %v", err)
			}
			v.state = "Running"
		case "SendCtrlAltDel":
			if !started {
				return bad(errBeforeBoot)
			}
			if err := v.guest.qmpCommand("system_powerdown"); err != nil {
				return http.StatusInternalServerError, nil, fmt.Errorf("SendCtrlAltDel: %v", err)
			}
		case "FlushMetrics":
			if !started {
				return bad(errBeforeBoot)
			}
			v.flushMetrics()
		}
	default:
		return bad("fakefc does not implement %s", op)
	}
	return 0, nil, nil
}

func (v *vmm) nic(id string) *nic {
	for _, n := range v.nics {
		if n.IfaceID == id {
			return n
		}
	}
	return nil
}

func readable(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	return f.Close()
}

func (v *vmm) flushMetrics() {
	if v.metrics == nil {
		return
	}
	line, _ := json.Marshal(map[string]any{
		"utc_timestamp_ms": time.Now().UnixMilli(),
		"fakefc":           map[string]any{"state": v.state, "drives": len(v.drives), "nics": len(v.nics)},
	})
	_, _ = v.metrics.Write(append(line, '\n'))
}

// mmdsNICs reports whether the interface may reach MMDS.
func (v *vmm) mmdsAllowed(id string) bool {
	if v.mmdsCfg == nil {
		return false
	}
	for _, x := range v.mmdsCfg.NetworkInterfaces {
		if x == id {
			return true
		}
	}
	return false
}
