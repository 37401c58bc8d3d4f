// Package nomad is the firecracker-task-driver: a Nomad task driver plugin
// that runs each task as a microVM. It owns the plugin's configuration
// schema, the task configuration (the attribute names of the original
// firecracker-task-driver: OCIImage, OCIAuth, BootDisk, KernelImage, Vcpus,
// Mem, ...) and its validation, the DriverPlugin methods, the task state
// Nomad persists for recovery, and the copy of the guest's output into
// Nomad's log fifos.
//
// Booting, stopping and re-attaching VMs is internal/runtime's job: this
// package translates Nomad's requests into runtime requests and the
// runtime's answers (exit status, events, addresses) back into Nomad's
// types. A VM is never tied to the plugin process: the plugin may restart
// (or be upgraded) while its VMs run, and RecoverTask re-attaches to them
// from the persisted task state without ever booting a second VM.
package nomad
