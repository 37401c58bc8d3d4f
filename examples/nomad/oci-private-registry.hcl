# An image from a registry that requires credentials. OCIAuth is handed
# to the registry only: it never appears in process arguments, logs or
# task events. Keep the password out of the job file with an HCL2
# variable:
#
#   nomad job run -var registry_password="$(cat password-file)" oci-private-registry.hcl
variable "registry_password" {
  type = string
}

job "oci-private-registry" {
  datacenters = ["*"]
  type        = "batch"

  group "microvm" {
    task "app" {
      driver = "firecracker-task-driver"

      config {
        OCIImage = "registry.example.com/myorg/myapp:latest"

        OCIAuth = {
          Username = "myuser"
          Password = var.registry_password
        }

        KernelImage = "/var/lib/fireactions/kernels/vmlinux"
        Vcpus       = 2
        Mem         = 1024
      }

      resources {
        cpu    = 1000
        memory = 1100
      }
    }
  }
}
