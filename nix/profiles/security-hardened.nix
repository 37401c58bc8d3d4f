# Profile: hardening of a fireactions host.
#
# - kernel: sysctls that hide kernel pointers and logs, restrict BPF and
#   ptrace, and make the network stack refuse redirects, source routes and
#   spoofed sources; rarely used network protocols cannot be loaded;
# - network: nftables firewall. The VM-side isolation (no VM-to-VM
#   traffic, VM-to-host only to DNS, the metadata service and the registry
#   cache, no other link-local or cloud metadata addresses, a new-connection
#   rate limit per VM address, anti-spoofing per VM port) is the table
#   `fireactions host setup` installs on the VM bridge (internal/hostnet);
#   the module opens the same ports on the bridge in the NixOS firewall;
# - access: SSH with keys only, no passwords anywhere, users only as
#   declared (users.mutableUsers = false), root's password locked;
# - storage (optional): the data disk encrypted, see
#   services.fireactions.dataDisk.encrypt.
{ config, lib, ... }:
let
  inherit (lib) mkDefault;
in
{
  imports = [ ../modules/fireactions.nix ];

  boot.kernel.sysctl = {
    # Kernel pointers and the kernel log are for root only.
    "kernel.kptr_restrict" = mkDefault 2;
    "kernel.dmesg_restrict" = mkDefault 1;
    # No BPF for unprivileged users; harden the BPF JIT against spraying.
    "kernel.unprivileged_bpf_disabled" = mkDefault 1;
    "net.core.bpf_jit_harden" = mkDefault 2;
    # ptrace only of one's own descendants.
    "kernel.yama.ptrace_scope" = mkDefault 1;
    # No replacing the running kernel, no magic SysRq, no perf for users.
    "kernel.kexec_load_disabled" = mkDefault 1;
    "kernel.sysrq" = mkDefault 0;
    "kernel.perf_event_paranoid" = mkDefault 3;
    # Full address space layout randomisation.
    "kernel.randomize_va_space" = mkDefault 2;
    # No core dumps of setuid programs; safer links and files in sticky dirs.
    "fs.suid_dumpable" = mkDefault 0;
    "fs.protected_hardlinks" = mkDefault 1;
    "fs.protected_symlinks" = mkDefault 1;
    "fs.protected_fifos" = mkDefault 2;
    "fs.protected_regular" = mkDefault 2;

    # Reverse-path filtering: drop packets whose source is not routed back
    # through the interface they came in on (spoofed VM addresses included).
    "net.ipv4.conf.all.rp_filter" = mkDefault 1;
    "net.ipv4.conf.default.rp_filter" = mkDefault 1;
    # Neither accept nor send ICMP redirects; the host routes for its VMs
    # and must not be re-routed by them.
    "net.ipv4.conf.all.accept_redirects" = mkDefault 0;
    "net.ipv4.conf.default.accept_redirects" = mkDefault 0;
    "net.ipv4.conf.all.secure_redirects" = mkDefault 0;
    "net.ipv4.conf.default.secure_redirects" = mkDefault 0;
    "net.ipv4.conf.all.send_redirects" = mkDefault 0;
    "net.ipv4.conf.default.send_redirects" = mkDefault 0;
    "net.ipv6.conf.all.accept_redirects" = mkDefault 0;
    "net.ipv6.conf.default.accept_redirects" = mkDefault 0;
    # No source-routed packets.
    "net.ipv4.conf.all.accept_source_route" = mkDefault 0;
    "net.ipv4.conf.default.accept_source_route" = mkDefault 0;
    "net.ipv6.conf.all.accept_source_route" = mkDefault 0;
    "net.ipv6.conf.default.accept_source_route" = mkDefault 0;
    # SYN flood protection; ignore broadcast pings and bogus ICMP errors;
    # log packets with impossible addresses.
    "net.ipv4.tcp_syncookies" = mkDefault 1;
    "net.ipv4.icmp_echo_ignore_broadcasts" = mkDefault 1;
    "net.ipv4.icmp_ignore_bogus_error_responses" = mkDefault 1;
    "net.ipv4.conf.all.log_martians" = mkDefault 1;
    "net.ipv4.conf.default.log_martians" = mkDefault 1;
  };

  # Network protocols nothing here uses, often the site of kernel bugs.
  # File systems are left alone: Azure's provisioning medium is UDF and
  # config drives are ISO 9660 or VFAT.
  boot.blacklistedKernelModules = [
    "dccp"
    "sctp"
    "rds"
    "tipc"
    "n-hdlc"
    "ax25"
    "netrom"
    "x25"
    "rose"
    "decnet"
    "econet"
    "af_802154"
    "ipx"
    "appletalk"
    "psnap"
    "p8022"
    "p8023"
    "can"
    "atm"
  ];

  networking.firewall.enable = true;
  networking.nftables.enable = mkDefault true;
  # NixOS would otherwise flush the whole ruleset on every reload (e.g.
  # nixos-rebuild switch), removing the isolation and redirect tables the
  # fireactions units installed. Without the flush it replaces only its own
  # tables.
  networking.nftables.flushRuleset = mkDefault false;

  services.openssh = {
    enable = true;
    settings = {
      PasswordAuthentication = false;
      KbdInteractiveAuthentication = false;
      PermitRootLogin = mkDefault "prohibit-password";
      X11Forwarding = false;
      MaxAuthTries = mkDefault 3;
    };
  };

  # Accounts exist only as declared here; none has a password.
  users.mutableUsers = false;
  users.users.root.hashedPassword = mkDefault "!";
  security.sudo.wheelNeedsPassword = mkDefault true;

  # The data disk, when there is one, is encrypted.
  services.fireactions.dataDisk.encrypt = mkDefault true;
}
