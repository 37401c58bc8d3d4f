// Command fireactions runs pools of ephemeral GitHub Actions runners in
// microVMs and offers the tools around them: bootstrap, validation, image
// and VM management.
package main

import (
	"os"

	"github.com/fireactions/fireactions/internal/cli"
)

func main() {
	os.Exit(cli.Main(os.Args[1:], os.Stdout, os.Stderr))
}
