package firecracker_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/fireactions/fireactions/internal/guest"
	"github.com/fireactions/fireactions/internal/vm"
	"github.com/fireactions/fireactions/internal/vm/firecracker"
)

// The tests run the backend against fakefc, a firecracker stand-in built
// here once per test binary (see fakefc's package comment). The test binary
// doubles as a "previous fireactions process" that starts a VM and is then
// killed.
const helperEnv = "FIREACTIONS_FC_TEST_HELPER"

// fakeBinary is the built fakefc, or why it could not be built.
var fakeBinary, fakeBuildErr = "", error(nil)

func TestMain(m *testing.M) {
	if os.Getenv(helperEnv) == "start-vm" {
		os.Exit(startVMAndHang())
	}
	// The SDK gives every API request 500 ms; the fake boots QEMU on
	// InstanceStart, and CI machines may be busy.
	if os.Getenv("FIRECRACKER_GO_SDK_REQUEST_TIMEOUT_MILLISECONDS") == "" {
		os.Setenv("FIRECRACKER_GO_SDK_REQUEST_TIMEOUT_MILLISECONDS", "10000")
	}
	dir, err := os.MkdirTemp("", "fakefc-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fakeBinary, fakeBuildErr = buildFake(dir)
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// buildFake builds fakefc with the path of the SDK's swagger file compiled
// in.
func buildFake(dir string) (string, error) {
	sdk, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "github.com/firecracker-microvm/firecracker-go-sdk").Output()
	if err != nil {
		return "", fmt.Errorf("locate firecracker-go-sdk: %v", err)
	}
	swagger := filepath.Join(strings.TrimSpace(string(sdk)), "client", "swagger.yaml")
	if _, err := os.Stat(swagger); err != nil {
		return "", err
	}
	// Named firecracker: the jailer names its chroot after the binary.
	out := filepath.Join(dir, "firecracker")
	cmd := exec.Command("go", "build", "-ldflags", "-X main.swaggerPath="+swagger, "-o", out, "./fakefc")
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build fakefc: %v: %s", err, b)
	}
	return out, nil
}

// fake returns the fakefc binary.
func fake(tb testing.TB) string {
	tb.Helper()
	if fakeBuildErr != nil {
		tb.Fatal(fakeBuildErr)
	}
	return fakeBinary
}

func newBackend(tb testing.TB) *firecracker.Backend {
	return firecracker.New(firecracker.Options{Binary: fake(tb)})
}

// helperSpec is what the parent test hands startVMAndHang.
type helperSpec struct {
	Root     string
	Binary   string
	Spec     vm.Spec
	Guest    *guest.Config   // not part of Spec's JSON
	Metadata json.RawMessage `json:",omitempty"` // idem
}

// startVMAndHang runs in a child process: it starts a VM, reports it on
// stdout and waits to be killed.
func startVMAndHang() int {
	var hs helperSpec
	if err := json.Unmarshal([]byte(os.Getenv(helperEnv+"_SPEC")), &hs); err != nil {
		fmt.Println("ERROR", err)
		return 1
	}
	hs.Spec.Guest, hs.Spec.Metadata = hs.Guest, hs.Metadata
	b := firecracker.New(firecracker.Options{Binary: hs.Binary})
	m, err := vm.NewManager(vm.Options{Root: hs.Root, Backends: []vm.Backend{b}})
	if err != nil {
		fmt.Println("ERROR", err)
		return 1
	}
	st, err := m.Start(context.Background(), b, hs.Spec)
	if err != nil {
		fmt.Println("ERROR", strings.ReplaceAll(err.Error(), "\n", " "))
		return 1
	}
	fmt.Println("STARTED", st.Pid)
	select {}
}

// startInChild starts spec from a child process, which it then SIGKILLs:
// the VM is left running with no owner. It returns the VMM's pid.
func startInChild(t *testing.T, root string, spec vm.Spec) int {
	t.Helper()
	b, err := json.Marshal(helperSpec{Root: root, Binary: fake(t), Spec: spec, Guest: spec.Guest, Metadata: spec.Metadata})
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"=start-vm", helperEnv+"_SPEC="+string(b))
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	var pid int
	if _, perr := fmt.Sscanf(line, "STARTED %d", &pid); err != nil || perr != nil {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("helper process: %v %s", err, line)
	}
	// The owner dies without any chance to clean up.
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = cmd.Wait()
	return pid
}

// waitCtx bounds a test's waits so a regression fails instead of hanging.
func waitCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	t.Cleanup(cancel)
	return ctx
}
