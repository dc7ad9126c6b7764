// Command aether-jailer confines one VMM process and exec()s it: the
// backends start it as root in a private mount namespace with the VM's
// uid, gid, cgroups and jail contents on its command line (see
// pkg/vmm/internal/jail). It is built statically (CGO_ENABLED=0) and
// installed next to the worker.
package main

import (
	"os"
	"runtime"

	"github.com/aetherium/aetherium-core/pkg/vmm/jailer"
)

func main() {
	// Every step up to execve runs on this one thread; the credentials
	// and the seccomp filter are applied to all threads regardless.
	runtime.LockOSThread()
	os.Exit(jailer.Main(os.Args[1:], os.Stderr))
}
