package qemu_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"syscall"
	"testing"
	"time"

	"github.com/fireactions/fireactions/internal/guest"
	"github.com/fireactions/fireactions/internal/vm"
	"github.com/fireactions/fireactions/internal/vm/qemu"
)

// The test binary doubles as the two helper programs the tests need:
//   - the per-connection metadata server QEMU runs (as fireactions does);
//   - a "previous fireactions process" that starts a VM and is then killed.
const helperEnv = "FIREACTIONS_VM_TEST_HELPER"

func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == qemu.MetadataHelperArg {
		os.Exit(qemu.MetadataHelperMain(os.Args[2:]))
	}
	if os.Getenv(helperEnv) == "start-vm" {
		os.Exit(startVMAndHang())
	}
	os.Exit(m.Run())
}

// helperSpec is what the parent test hands startVMAndHang.
type helperSpec struct {
	Root     string
	Spec     vm.Spec
	Guest    *guest.Config   // not part of Spec's JSON
	Metadata json.RawMessage // idem
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
	m, err := vm.NewManager(vm.Options{Root: hs.Root, Backends: []vm.Backend{newBackend()}})
	if err != nil {
		fmt.Println("ERROR", err)
		return 1
	}
	st, err := m.Start(context.Background(), newBackend(), hs.Spec)
	if err != nil {
		fmt.Println("ERROR", err)
		return 1
	}
	fmt.Println("STARTED", st.Pid)
	select {}
}

// startInChild starts spec from a child process, which it then SIGKILLs:
// the VM is left running with no owner. It returns the VMM's pid.
func startInChild(t *testing.T, root string, spec vm.Spec) int {
	t.Helper()
	b, err := json.Marshal(helperSpec{Root: root, Spec: spec, Guest: spec.Guest, Metadata: spec.Metadata})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// Whatever the test did, the VM it left behind goes.
		if m, err := vm.NewManager(vm.Options{Root: root, Backends: []vm.Backend{newBackend()}}); err == nil {
			removeAll(m)
			m.Close()
		}
	})
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
	if err != nil {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("helper process: %v", err)
	}
	var pid int
	if _, err := fmt.Sscanf(line, "STARTED %d", &pid); err != nil {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("helper process: %s", line)
	}
	// The owner dies without any chance to clean up.
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = cmd.Wait()
	return pid
}

func newBackend() *qemu.Backend {
	return qemu.New(qemu.Options{Logger: nil})
}

// waitCtx bounds a test's waits so a regression fails instead of hanging.
func waitCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}
