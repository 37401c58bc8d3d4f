// Command firecracker-task-driver is a Nomad task driver plugin that runs
// tasks as microVMs (Firecracker, or QEMU where Firecracker cannot run).
// Nomad starts it from its plugin_dir; it is not meant to be run by hand.
//
// The same executable also serves two helpers that must outlive the plugin
// process: the QEMU backend's per-connection metadata helper (QEMU runs it
// with qemu.MetadataHelperArg for each guest connection to
// 169.254.169.254) and each task's log shipper (nomad.ShipperArg), which
// copies a VM's output into Nomad's log fifos.
package main

import (
	"fmt"
	"os"

	hclog "github.com/hashicorp/go-hclog"
	"github.com/hashicorp/nomad/plugins"

	"github.com/fireactions/fireactions/internal/nomad"
	"github.com/fireactions/fireactions/internal/vm/qemu"
)

func main() {
	if len(os.Args) > 1 {
		switch os.Args[1] {
		case qemu.MetadataHelperArg:
			os.Exit(qemu.MetadataHelperMain(os.Args[2:]))
		case nomad.ShipperArg:
			os.Exit(nomad.ShipperMain(os.Args[2:]))
		case "--version", "version":
			fmt.Println(nomad.PluginName, nomad.Version)
			return
		}
	}
	plugins.Serve(func(logger hclog.Logger) any {
		return nomad.NewDriver(logger)
	})
}
