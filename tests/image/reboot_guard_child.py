"""The child of tests/image/test_reboot_guard.py: a fresh, single-threaded process.

    python3 reboot_guard_child.py FD CALLS_JSON

Enters a new user namespace (no CAP_SYS_BOOT for the machine from here on), installs a seccomp
filter sending reboot(2) to a listener, sends the listener on socket FD as runc does (the
container state as JSON, the descriptor as SCM_RIGHTS), makes each [magic1, magic2, command]
call and prints the errno each got as a JSON list.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import socket
import struct
import sys

LIBC = ctypes.CDLL(None, use_errno=True)
SYS = {"x86_64": {"reboot": 169, "seccomp": 317}, "aarch64": {"reboot": 142, "seccomp": 277}}[platform.machine()]


def filter_program() -> bytes:
    """BPF: reboot(2) -> SECCOMP_RET_USER_NOTIF, everything else allowed."""
    insns = [(0x20, 0, 0, 0),  # ld [0]: the system call number
             (0x15, 0, 1, SYS["reboot"]),  # jeq reboot
             (0x06, 0, 0, 0x7FC00000),  # ret USER_NOTIF
             (0x06, 0, 0, 0x7FFF0000)]  # ret ALLOW
    return b"".join(struct.pack("HBBI", *insn) for insn in insns)


def main(fd: int, calls: list[list[int]]) -> None:
    conn = socket.socket(fileno=fd)
    if LIBC.unshare(0x10000000) != 0:  # CLONE_NEWUSER
        raise OSError(ctypes.get_errno(), "unshare")
    if LIBC.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "prctl")
    prog = ctypes.create_string_buffer(filter_program())
    fprog = ctypes.create_string_buffer(struct.pack("HxxxxxxP", len(prog.raw) // 8, ctypes.addressof(prog)))
    listener = LIBC.syscall(ctypes.c_long(SYS["seccomp"]), ctypes.c_long(1), ctypes.c_long(8),  # NEW_LISTENER
                            ctypes.c_void_p(ctypes.addressof(fprog)))
    if listener < 0:
        raise OSError(ctypes.get_errno(), "seccomp")
    state = {"ociVersion": "1.2.0", "fds": ["seccompFd"], "pid": os.getpid(), "metadata": "",
             "state": {"ociVersion": "1.2.0", "id": "action-under-test", "status": "creating", "pid": os.getpid()}}
    socket.send_fds(conn, [json.dumps(state).encode()], [listener])
    os.close(listener)
    seen = []
    for magic1, magic2, command in calls:
        ctypes.set_errno(0)
        rc = LIBC.syscall(ctypes.c_long(SYS["reboot"]), ctypes.c_long(magic1), ctypes.c_long(magic2),
                          ctypes.c_long(ctypes.c_int64(command).value), ctypes.c_long(0))
        seen.append(0 if rc == 0 else ctypes.get_errno())
    print(json.dumps(seen))


if __name__ == "__main__":
    main(int(sys.argv[1]), json.loads(sys.argv[2]))
