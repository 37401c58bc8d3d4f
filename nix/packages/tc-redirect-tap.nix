# tc-redirect-tap, the CNI plugin that gives a VMM a tap device wired to the
# VM's veth with tc redirects. It is pinned to commit e30dfca224c2 of
# github.com/awslabs/tc-redirect-tap, the Go module version
# v0.0.0-20211025175357-e30dfca224c2 (go.sum h1:adfgQeMA2JpYPIQ4vaumP4xA0anx19jRDZLGq47jh4k=).
#
# The source is that module version's zip from the Go module proxy, whose
# bytes are fixed (the checksum database vouches for its content); both
# hashes below were computed from it, the vendor hash with `go mod vendor`
# (Go 1.26.8).
{
  lib,
  buildGo126Module,
  fetchurl,
  unzip,
}:
let
  version = "0.0.0-20211025175357-e30dfca224c2";
in
buildGo126Module {
  pname = "tc-redirect-tap";
  inherit version;

  src = fetchurl {
    url = "https://proxy.golang.org/github.com/awslabs/tc-redirect-tap/@v/v${version}.zip";
    hash = "sha256-Cut0QkuHXqvk18xpd0/G4EQ74yKyDC9n5iNzWQffubQ=";
  };
  nativeBuildInputs = [ unzip ];
  sourceRoot = "github.com/awslabs/tc-redirect-tap@v${version}";

  vendorHash = "sha256-QQ+tSybYinFp0MaNH46Y2QZxiVJKXNkCwy98FRkM+x0=";

  subPackages = [ "cmd/tc-redirect-tap" ];
  env.CGO_ENABLED = 0;
  ldflags = [
    "-s"
    "-w"
  ];
  # Its tests create network namespaces.
  doCheck = false;

  meta = {
    description = "CNI plugin that redirects a veth to a tap device for VMMs";
    homepage = "https://github.com/awslabs/tc-redirect-tap";
    license = lib.licenses.asl20;
    mainProgram = "tc-redirect-tap";
    platforms = lib.platforms.linux;
  };
}
