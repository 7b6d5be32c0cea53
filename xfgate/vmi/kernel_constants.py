"""Constants of the Linux kernel that xfgate mirrors, each defined once, named as the kernel
names them (the header each comes from is given)."""

from __future__ import annotations

import enum

# include/linux/sched.h: task_struct.comm is char[TASK_COMM_LEN], NUL-terminated, so a task
# name keeps at most TASK_COMM_LEN - 1 characters. A comm match compares that many.
TASK_COMM_LEN = 16
COMM_MAX_CHARS = TASK_COMM_LEN - 1


def comm_key(name: str) -> str:
    """What the kernel would keep of `name` as a task's comm: the part a comm match compares."""
    return name[:COMM_MAX_CHARS]


PROC_NAME_LEN = 64  # fs/proc/array.c proc_task_name(): char tcomm[64]
PID_MAX_LIMIT = 4 * 1024 * 1024  # include/linux/threads.h: PID_MAX_LIMIT on 64-bit
PF_WQ_WORKER = 0x00000020  # include/linux/sched.h
PF_KTHREAD = 0x00200000


class SockType(enum.IntEnum):
    """include/linux/net.h enum sock_type (the values x86 uses)."""

    SOCK_STREAM = 1
    SOCK_DGRAM = 2
    SOCK_RAW = 3
    SOCK_RDM = 4
    SOCK_SEQPACKET = 5
    SOCK_DCCP = 6
    SOCK_PACKET = 10


# include/linux/socket.h: the packet socket family (sock_common.skc_family of an AF_PACKET sock).
AF_PACKET = 17

# include/uapi/linux/in.h: a socket protocol that is no IP protocol number on the wire (an MPTCP
# socket's subflows are TCP); the IP protocol numbers themselves are xfgate.inet.IPProto.
IPPROTO_MPTCP = 262

# fs/namei.c: a path we rebuild from a dentry chain is at most PATH_MAX bytes; NAME_MAX per name.
PATH_MAX = 4096
NAME_MAX = 255


class TCPState(enum.IntEnum):
    """include/net/tcp_states.h; names as /proc/net/tcp readers (ss, the lab truth) spell them."""

    ESTABLISHED = 1
    SYN_SENT = 2
    SYN_RECV = 3
    FIN_WAIT1 = 4
    FIN_WAIT2 = 5
    TIME_WAIT = 6
    CLOSE = 7
    CLOSE_WAIT = 8
    LAST_ACK = 9
    LISTEN = 10
    CLOSING = 11
    NEW_SYN_RECV = 12


# skc_state is one byte: every name computed once (an Enum call per socket cost ~5 us).
_STATE_NAMES = tuple(
    TCPState(n).name if n in TCPState._value2member_map_ else f"UNKNOWN({n})" for n in range(256)
)


def tcp_state_name(state: int) -> str:
    """The state's name, or UNKNOWN(n) for a value the kernel does not define."""
    return _STATE_NAMES[state] if 0 <= state < 256 else f"UNKNOWN({state})"
