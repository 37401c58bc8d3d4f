# The smallest job: one OCI image, run as a microVM. The image's
# Entrypoint/Cmd run as the VM's only process; Args replaces the image's
# Cmd (as `docker run IMAGE ARGS...` does). The kernel comes from the
# plugin configuration.
#
#   nomad job run oci-simple.hcl
#   nomad alloc logs <alloc-id>
job "oci-simple" {
  datacenters = ["*"]
  type        = "batch"

  group "microvm" {
    task "hello" {
      driver = "firecracker-task-driver"

      config {
        OCIImage = "busybox:1.36"
        Args     = ["echo", "hello from a microVM"]
      }
    }
  }
}
