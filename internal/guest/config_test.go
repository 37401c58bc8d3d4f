package guest

import (
	"reflect"
	"strings"
	"testing"
	"testing/fstest"
	"time"
)

func validConfig() Config {
	return Config{
		Mode:     ModeApp,
		Hostname: "vm-1",
		Process:  Process{Args: []string{"/bin/true"}, Env: []string{"A=1"}, StopSignal: "SIGINT"},
		Drives: []Drive{
			{Role: RoleBase, Serial: "base"},
			{Role: RoleScratch, Device: "/dev/vdb"},
			{Role: RoleExtra, Serial: "data", MountPoint: "/data", ReadOnly: true},
		},
		Interfaces: []Interface{{MAC: "52:54:00:12:34:56", Address: "10.0.0.2/24", Gateway: "10.0.0.1",
			MTU: 1400, Nameservers: []string{"10.0.0.1"}, MMDS: true}},
		ConsoleKey:    testKey,
		ClockUnixNano: time.Now().UnixNano(),
		Sysctls:       map[string]string{"net.ipv4.ip_forward": "1"},
	}
}

func TestConfigRoundTrip(t *testing.T) {
	c := validConfig()
	data, err := c.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	got, err := ParseConfig(data)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(*got, c) {
		t.Errorf("round trip:\n got %+v\nwant %+v", *got, c)
	}
	if !reflect.DeepEqual(got.EffectiveBindMounts(), DefaultBindMounts) {
		t.Errorf("nil bind mounts should mean the defaults, got %v", got.EffectiveBindMounts())
	}
	got.BindMounts = []string{}
	if len(got.EffectiveBindMounts()) != 0 {
		t.Error("empty bind mounts should mean none")
	}
	if got.EffectiveStopGrace() != DefaultStopGrace {
		t.Errorf("stop grace %v", got.EffectiveStopGrace())
	}
}

func TestParseConfigRejectsUnknownFields(t *testing.T) {
	_, err := ParseConfig([]byte(`{"mode":"app","bogus":1}`))
	if err == nil || !strings.Contains(err.Error(), "bogus") {
		t.Errorf("err = %v", err)
	}
}

func TestConfigValidateNamesFields(t *testing.T) {
	cases := map[string]func(*Config){
		"mode":                     func(c *Config) { c.Mode = "vm" },
		"process.args":             func(c *Config) { c.Process.Args = nil },
		"hostname":                 func(c *Config) { c.Hostname = "bad_name" },
		"process.env[1]":           func(c *Config) { c.Process.Env = append(c.Process.Env, "NOEQUALS") },
		"process.working_dir":      func(c *Config) { c.Process.WorkingDir = "rel" },
		"process.stop_signal":      func(c *Config) { c.Process.StopSignal = "SIGNOPE" },
		"drives[2].mount_point":    func(c *Config) { c.Drives[2].MountPoint = "/" },
		"drives[1].device":         func(c *Config) { c.Drives[1].Device = "vdb" },
		"drives[0]: set serial":    func(c *Config) { c.Drives[0].Serial = "" },
		"drives[0].serial":         func(c *Config) { c.Drives[0].Serial = strings.Repeat("s", 21) },
		"one base drive":           func(c *Config) { c.Drives = c.Drives[1:] },
		"one scratch drive":        func(c *Config) { c.Drives = append(c.Drives, Drive{Role: RoleScratch, Device: "/dev/vdd"}) },
		"drives[3].role":           func(c *Config) { c.Drives = append(c.Drives, Drive{Role: "boot", Device: "/dev/vdd"}) },
		"interfaces[0].mac":        func(c *Config) { c.Interfaces[0].MAC = "zz" },
		"interfaces[0].address":    func(c *Config) { c.Interfaces[0].Address = "10.0.0.2" },
		"interfaces[0].gateway":    func(c *Config) { c.Interfaces[0].Gateway = "10.9.9.9" },
		"interfaces[0].mtu":        func(c *Config) { c.Interfaces[0].MTU = 10 },
		"nameservers[0]":           func(c *Config) { c.Interfaces[0].Nameservers = []string{"dns"} },
		"marked mmds":              func(c *Config) { c.Interfaces = append(c.Interfaces, Interface{MAC: "52:54:00:00:00:01", MMDS: true}) },
		"modules[0]":               func(c *Config) { c.Modules = []string{"virtio.ko"} },
		"console_key":              func(c *Config) { c.ConsoleKey = nil },
		"bind_mounts[0]":           func(c *Config) { c.BindMounts = []string{"var/lib/docker"} },
		"sysctls":                  func(c *Config) { c.Sysctls = map[string]string{"../x": "1"} },
		"stop_grace":               func(c *Config) { c.StopGrace = -1 },
		"interfaces[0].gateway: n": func(c *Config) { c.Interfaces[0].Address = "" },
	}
	for want, mutate := range cases {
		c := validConfig()
		mutate(&c)
		err := c.Validate()
		field := strings.SplitN(want, ": ", 2)[0]
		if err == nil || !strings.Contains(err.Error(), field) {
			t.Errorf("%s: err = %v", want, err)
		}
	}
	if err := (&Config{}).Validate(); err == nil {
		t.Error("empty config validated")
	}
	c := validConfig()
	c.Mode = ModeSystem
	c.Process = Process{}
	if err := c.Validate(); err != nil {
		t.Errorf("system mode without process: %v", err)
	}
}

func TestParseSignal(t *testing.T) {
	for in, want := range map[string]int{"SIGTERM": 15, "term": 15, "9": 9, "SIGKILL": 9, "SIGRTMIN": 34,
		"SIGRTMIN+3": 37, "RTMAX-1": 63, "SIGWINCH": 28} {
		if got, err := ParseSignal(in); err != nil || got != want {
			t.Errorf("ParseSignal(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "0", "65", "SIGFOO", "RTMIN+40", "RTMIN3", "-1"} {
		if _, err := ParseSignal(in); err == nil {
			t.Errorf("ParseSignal(%q) accepted", in)
		}
	}
}

func TestLookupUser(t *testing.T) {
	fsys := fstest.MapFS{
		"etc/passwd": {Data: []byte("root:x:0:0:root:/root:/bin/sh\n" +
			"# comment\n" +
			"daemon:x:1:1::/usr/sbin:/usr/sbin/nologin\n" +
			"app:x:1000:1000:App:/home/app:/bin/sh\n" +
			"broken line\n")},
		"etc/group": {Data: []byte("root:x:0:\nwheel:x:10:app,other\napp:x:1000:\ndocker:x:999:app\nstaff:x:50:\n")},
	}
	cases := []struct {
		spec string
		want User
	}{
		{"", User{UID: 0, GID: 0, Name: "root", Home: "/root"}},
		{"app", User{UID: 1000, GID: 1000, Groups: []uint32{10, 999}, Name: "app", Home: "/home/app"}},
		{"1000", User{UID: 1000, GID: 1000, Groups: []uint32{10, 999}, Name: "app", Home: "/home/app"}},
		{"app:staff", User{UID: 1000, GID: 50, Name: "app", Home: "/home/app"}},
		{"app:4242", User{UID: 1000, GID: 4242, Name: "app", Home: "/home/app"}},
		{"4242", User{UID: 4242, GID: 0, Home: "/"}},
		{"4242:7", User{UID: 4242, GID: 7, Home: "/"}},
		{"daemon", User{UID: 1, GID: 1, Name: "daemon", Home: "/usr/sbin"}},
	}
	for _, c := range cases {
		got, err := LookupUser(fsys, c.spec)
		if err != nil {
			t.Errorf("%q: %v", c.spec, err)
			continue
		}
		if !reflect.DeepEqual(got, c.want) {
			t.Errorf("%q = %+v, want %+v", c.spec, got, c.want)
		}
	}
	for _, spec := range []string{"nobody", "app:nogroup", "app:", ":1"} {
		if _, err := LookupUser(fsys, spec); err == nil {
			t.Errorf("%q accepted", spec)
		}
	}
	// A scratch image has no /etc/passwd: numeric users still work.
	got, err := LookupUser(fstest.MapFS{}, "123:456")
	if err != nil || got.UID != 123 || got.GID != 456 {
		t.Errorf("scratch image: %+v, %v", got, err)
	}
	if _, err := LookupUser(fstest.MapFS{}, "app"); err == nil || !strings.Contains(err.Error(), "/etc/passwd") {
		t.Errorf("named user without passwd: %v", err)
	}
}
