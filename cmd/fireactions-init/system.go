//go:build linux

package main

import (
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/fireactions/fireactions/internal/guest"
)

// systemInit is what system mode hands PID 1 to.
const systemInit = "/sbin/init"

// runSystem replaces this process with the image's init. The console key
// does not survive: it is only in this process's memory, and the console
// descriptor used for frames is close-on-exec. From here on the host sees
// console output as noise and learns of the end of the VM from the VMM.
//
// With the guest agent, the key is handed to the agent instead (see
// handOffConsole), which goes on reporting in authenticated frames.
func (in *initProcess) runSystem(withAgent bool) {
	if err := isExecutable(systemInit); err != nil {
		in.fail(fmt.Errorf("system mode needs the image's %s: %w", systemInit, err))
	}
	in.fw.WriteJSON(guest.FrameStarted, guest.Started{PID: 1, Mode: guest.ModeSystem})
	if withAgent {
		if err := in.handOffConsole(); err != nil {
			in.fail(fmt.Errorf("hand the console to the agent: %w", err))
		}
	}
	in.restoreConsole()
	// The image's init starts with the console as stdin, stdout and
	// stderr, as the kernel would have given it. Signal handlers need no
	// reset: exec returns caught signals to their defaults.
	fd := int(in.console.Fd())
	for target := 0; target <= 2; target++ {
		if fd != target {
			unix.Dup3(fd, target, 0)
		}
	}
	env := []string{"HOME=/", "TERM=linux", "PATH=" + defaultPath}
	err := unix.Exec(systemInit, []string{systemInit}, env)
	in.fail(fmt.Errorf("exec %s: %w", systemInit, err))
}
