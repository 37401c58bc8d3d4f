// Package agent is fireactions' guest agent, the program that runs inside a
// runner VM (`fireactions agent`, or fireactions-init started as
// fireactions-agent). It reads the VM's metadata, writes the registry
// mirror configuration before Docker and containerd start, runs the actions
// runner with its just-in-time configuration as an unprivileged user,
// reports the runner's state (starting, idle, busy, done) to the host, and
// powers the VM off when the job is over.
//
// It also defines the contract between the host and the agent: the report
// line format (Report, ParseReport), the metadata key of the JIT
// configuration (KeyJITConfig), and where the guest init installs the agent
// (GuestPath, KernelArg).
package agent

// KeyJITConfig is the meta-data key holding the runner's encoded JIT
// configuration. It is a secret: only the VM's own metadata carries it.
const KeyJITConfig = "fireactions/jitconfig"

// KernelArg on a VM's kernel command line asks fireactions-init to install
// itself as the agent at GuestPath (and, in system mode, to enable the
// agent's systemd unit and hand it the console key).
const KernelArg = "fireactions.agent=1"

// GuestPath is where fireactions-init installs the agent in the guest.
const GuestPath = "/run/fireactions/bin/fireactions-agent"

// GuestArgs is the process an app-mode runner VM runs: the agent.
var GuestArgs = []string{GuestPath}
