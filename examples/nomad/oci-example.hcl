# A long-running service from a public OCI image, on the host's CNI
# network (installed by `fireactions host setup`; "default" means the
# plugin's default_network). The VM's address is handed to Nomad, so
# services registered with address_mode = "driver" point at the VM.
#
#   nomad job run oci-example.hcl
#   nomad alloc logs -f <alloc-id>
#   nomad job stop oci-example     # kill_signal to the guest's process, then power-off
job "oci-example" {
  datacenters = ["*"]
  type        = "service"

  group "microvm" {
    task "ubuntu-vm" {
      driver       = "firecracker-task-driver"
      kill_timeout = "20s"
      kill_signal  = "SIGTERM"

      config {
        # Use any OCI-compatible image.
        OCIImage = "ubuntu:22.04"

        # Optional: the plugin's kernel is used when this is left out.
        # A kernel named here must lie in allowed_image_paths.
        KernelImage = "/var/lib/fireactions/kernels/vmlinux"

        # VM configuration.
        Vcpus   = 1
        Mem     = 512
        Network = "default"

        # ubuntu:22.04 runs bash, which exits at once without a
        # terminal: give the VM something to do.
        Command = "/bin/sh"
        Args    = ["-c", "echo \"up on $(hostname)\"; while :; do sleep 3600; done"]
      }

      # Nomad schedules what the task reserves: at least Mem, plus a
      # little for the VMM itself.
      resources {
        cpu    = 500
        memory = 600
      }
    }
  }
}
