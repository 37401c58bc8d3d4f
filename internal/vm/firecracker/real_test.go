package firecracker_test

import (
	"os"
	"strings"
	"testing"

	"github.com/fireactions/fireactions/internal/vm"
	"github.com/fireactions/fireactions/internal/vm/firecracker"
)

// TestRealFirecracker runs a workload under a real Firecracker. It needs
// /dev/kvm and a firecracker binary in PATH (or $FIREACTIONS_FIRECRACKER);
// the guest kernel is the test kernel unless $FIREACTIONS_FC_KERNEL names a
// Firecracker-ready one (Firecracker before 1.8 finds virtio devices only
// through virtio_mmio.device= arguments, which Debian's kernels ignore).
func TestRealFirecracker(t *testing.T) {
	bin := os.Getenv("FIREACTIONS_FIRECRACKER")
	if bin == "" {
		bin = firecracker.DefaultBinary
	}
	b := firecracker.New(firecracker.Options{Binary: bin})
	if err := b.Available(); err != nil {
		t.Skipf("needs /dev/kvm and a firecracker binary: %v", err)
	}
	spec := imageSpec(t, "real-fc")
	if k := os.Getenv("FIREACTIONS_FC_KERNEL"); k != "" {
		spec.Kernel = k
	}
	spec.Metadata = []byte(`{"latest":{"meta-data":{"instance-id":"i-real"}},"2009-04-04":{"meta-data":{"instance-id":"i-real"}}}`)
	spec.Guest.Process.Args = []string{"sh", "-c", `wget -qO- http://169.254.169.254/latest/meta-data/instance-id; echo; echo err >&2; exit 7`}
	m := newManager(t, t.TempDir())
	st, err := m.Start(waitCtx(t), b, spec)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(st.Details["firecracker_version"], "v") {
		t.Errorf("version %q", st.Details["firecracker_version"])
	}
	es, err := m.Wait(waitCtx(t), spec.ID)
	if err != nil {
		t.Fatal(err)
	}
	stdout, stderr, console := output(t, m, spec.ID)
	if es.Reason != vm.ReasonWorkloadExit || es.Code != 7 || stdout != "i-real\n" || stderr != "err\n" {
		t.Fatalf("exit %+v, stdout %q, stderr %q; console:\n%s\nVMM log:\n%s", es, stdout, stderr, console, vm.TailFile(st.VMMLog, 4096))
	}
}
