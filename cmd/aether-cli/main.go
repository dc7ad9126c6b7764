// Command aether-cli is the command line of Aetherium Core.
package main

import (
	"os"

	"github.com/aetherium/aetherium-core/internal/cli"
)

func main() {
	os.Exit(cli.Main(os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
}
