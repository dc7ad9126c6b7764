package jail

import (
	"fmt"
	"unsafe"

	seccomp "github.com/elastic/go-seccomp-bpf"
	"github.com/elastic/go-seccomp-bpf/arch"
	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// deniedSyscalls are refused (EPERM) to every jailed VMM: what changes
// mounts, namespaces, credentials, the kernel or other processes, which a
// VMM never needs once it runs. It is a deny-list, not an allow-list,
// because a VMM's needs vary with its version and devices; QEMU adds its own allow-list style filter on top
// (-sandbox).
var deniedSyscalls = []string{
	// mounts and the root
	"mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree",
	"fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
	// namespaces
	"unshare", "setns",
	// other processes
	"ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
	// the kernel and the machine
	"kexec_load", "kexec_file_load", "init_module", "finit_module",
	"delete_module", "reboot", "swapon", "swapoff", "acct", "bpf",
	"perf_event_open", "userfaultfd", "iopl", "ioperm", "syslog",
	"settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
	"sethostname", "setdomainname", "quotactl", "lookup_dcookie",
	"open_by_handle_at", "name_to_handle_at", "nfsservctl",
	// keyrings
	"keyctl", "add_key", "request_key",
	// credentials: the VMM keeps the uid it was given
	"setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid",
	"setfsuid", "setfsgid", "setgroups", "capset",
	// new processes (threads are made with clone(CLONE_THREAD))
	"fork", "vfork",
}

// cloneNotThread is the clone flag whose absence means a new process.
const cloneNotThread = unix.CLONE_THREAD

// personalityQuery and personalityLinux are the personality(2) arguments
// glibc and Rust's runtime use (read, and the default); others (e.g.
// READ_IMPLIES_EXEC, ADDR_NO_RANDOMIZE) weaken the process and are
// refused.
const (
	personalityLinux = 0
	personalityQuery = 0xffffffff
)

// Policy returns the jailer's seccomp policy as the library assembles it:
// default allow, deniedSyscalls and clone without CLONE_THREAD refused.
func Policy() seccomp.Policy {
	return seccomp.Policy{
		DefaultAction: seccomp.ActionAllow,
		Syscalls: []seccomp.SyscallGroup{{
			Action: seccomp.ActionErrno,
			Names:  deniedSyscalls,
			NamesWithCondtions: []seccomp.NameWithConditions{
				{Name: "clone", Conditions: []seccomp.Condition{{Argument: 0, Operation: seccomp.BitsNotSet, Value: cloneNotThread}}},
				{Name: "personality", Conditions: []seccomp.Condition{
					{Argument: 0, Operation: seccomp.NotEqual, Value: personalityLinux},
					{Argument: 0, Operation: seccomp.NotEqual, Value: personalityQuery},
				}},
			},
		}},
	}
}

// Program assembles the filter the jailer loads: Policy, preceded by two
// rules the library cannot express.
//   - A call of another architecture's ABI (i386 through int 0x80 on
//     x86_64) kills the process: the library's policy allows those by
//     default, which would let a deny-list be bypassed.
//   - clone3 gets ENOSYS. It passes its flags in a struct the filter
//     cannot read, so it cannot be allowed for threads only; ENOSYS (not
//     the library's fixed EPERM) makes glibc and Rust fall back to clone,
//     whose flags the policy checks.
//
// That is why the jailer assembles with go-seccomp-bpf but loads the
// program itself.
func Program() ([]bpf.RawInstruction, error) {
	pol := Policy()
	insts, err := pol.Assemble()
	if err != nil {
		return nil, fmt.Errorf("assembling the seccomp filter: %w", err)
	}
	native, err := arch.GetInfo("")
	if err != nil {
		return nil, fmt.Errorf("assembling the seccomp filter: %w", err)
	}
	const (
		offNr   = 0
		offArch = 4
	)
	prefix := []bpf.Instruction{
		bpf.LoadAbsolute{Off: offArch, Size: 4},
		bpf.JumpIf{Cond: bpf.JumpEqual, Val: uint32(native.ID), SkipTrue: 1},
		bpf.RetConstant{Val: unix.SECCOMP_RET_KILL_PROCESS},
		bpf.LoadAbsolute{Off: offNr, Size: 4},
		bpf.JumpIf{Cond: bpf.JumpNotEqual, Val: unix.SYS_CLONE3, SkipTrue: 1},
		bpf.RetConstant{Val: unix.SECCOMP_RET_ERRNO | uint32(unix.ENOSYS)},
	}
	raw, err := bpf.Assemble(append(prefix, insts...))
	if err != nil {
		return nil, fmt.Errorf("assembling the seccomp filter: %w", err)
	}
	return raw, nil
}

// loadSeccomp installs Program on every thread of this process (TSYNC:
// the Go runtime's threads too, whichever of them calls execve). The
// caller must have set no_new_privs.
func loadSeccomp() error {
	raw, err := Program()
	if err != nil {
		return err
	}
	filter := make([]unix.SockFilter, len(raw))
	for i, r := range raw {
		filter[i] = unix.SockFilter{Code: r.Op, Jt: r.Jt, Jf: r.Jf, K: r.K}
	}
	prog := unix.SockFprog{Len: uint16(len(filter)), Filter: &filter[0]}
	if _, _, errno := unix.Syscall(unix.SYS_SECCOMP, unix.SECCOMP_SET_MODE_FILTER, unix.SECCOMP_FILTER_FLAG_TSYNC, uintptr(unsafe.Pointer(&prog))); errno != 0 {
		return fmt.Errorf("loading the seccomp filter: %w", errno)
	}
	return nil
}
