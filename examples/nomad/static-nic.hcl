# A VM on a static interface instead of a CNI network: the guest gets Ip
# on the host tap device Interface. An existing tap is used as it is; a
# missing one is created (and removed with the task), without an address.
# Give the host end the gateway's address first, e.g.
#
#   ip tuntap add dev fctap0 mode tap
#   ip addr add 192.168.50.1/24 dev fctap0
#   ip link set fctap0 up
#   nomad job run static-nic.hcl
job "static-nic" {
  datacenters = ["*"]
  type        = "batch"

  group "microvm" {
    task "pinger" {
      driver = "firecracker-task-driver"

      config {
        OCIImage = "busybox:1.36"

        Nic {
          Ip          = "192.168.50.10/24"
          Gateway     = "192.168.50.1"
          Interface   = "fctap0"
          Nameservers = ["192.168.50.1"]
        }

        Command = "/bin/sh"
        Args    = ["-c", "ip -4 addr; ping -c 3 192.168.50.1"]
      }
    }
  }
}
