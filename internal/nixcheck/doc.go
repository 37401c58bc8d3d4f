// Package nixcheck holds the checks of the repository's Nix files
// (flake.nix, nix/, images/), which cannot be built here: every file
// parses with nix-instantiate, and the command lines that the NixOS
// module's systemd units run (nix/lib/units.nix, evaluated by real Nix) do
// their job with the real fireactions, squid, openssl and nft binaries
// against a temporary root. It has no code outside its tests.
package nixcheck
