"""Bob Jenkins' lookup3 hash as the kernel implements it (include/linux/jhash.h), and the socket
hash functions built on it (6.1: net/ipv4/inet_hashtables.c, net/ipv6/inet6_hashtables.c,
include/net/ipv6.h, include/net/ip.h). Pure functions over 32-bit words."""

from __future__ import annotations

import struct
from collections.abc import Sequence

JHASH_INITVAL = 0xDEADBEEF
M32 = 0xFFFFFFFF


def _rol32(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & M32


def _final(a: int, b: int, c: int) -> int:
    # __jhash_final; rol32 written out (a call per rotation was a third of a lookup's hash).
    c ^= b
    c = (c - (((b << 14) | (b >> 18)) & M32)) & M32
    a ^= c
    a = (a - (((c << 11) | (c >> 21)) & M32)) & M32
    b ^= a
    b = (b - (((a << 25) | (a >> 7)) & M32)) & M32
    c ^= b
    c = (c - (((b << 16) | (b >> 16)) & M32)) & M32
    a ^= c
    a = (a - (((c << 4) | (c >> 28)) & M32)) & M32
    b ^= a
    b = (b - (((a << 14) | (a >> 18)) & M32)) & M32
    c ^= b
    c = (c - (((b << 24) | (b >> 8)) & M32)) & M32
    return c


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    # __jhash_mix, rol32 written out as in _final.
    a = (a - c) & M32
    a ^= ((c << 4) | (c >> 28)) & M32
    c = (c + b) & M32
    b = (b - a) & M32
    b ^= ((a << 6) | (a >> 26)) & M32
    a = (a + c) & M32
    c = (c - b) & M32
    c ^= ((b << 8) | (b >> 24)) & M32
    b = (b + a) & M32
    a = (a - c) & M32
    a ^= ((c << 16) | (c >> 16)) & M32
    c = (c + b) & M32
    b = (b - a) & M32
    b ^= ((a << 19) | (a >> 13)) & M32
    a = (a + c) & M32
    c = (c - b) & M32
    c ^= ((b << 4) | (b >> 28)) & M32
    b = (b + a) & M32
    return a, b, c


def jhash_3words(a: int, b: int, c: int, initval: int) -> int:
    iv = (initval + JHASH_INITVAL + (3 << 2)) & M32
    return _final((a + iv) & M32, (b + iv) & M32, (c + iv) & M32)


def jhash_1word(a: int, initval: int) -> int:
    iv = (initval + JHASH_INITVAL + (1 << 2)) & M32
    return _final((a + iv) & M32, iv, iv)


def jhash2(words: Sequence[int], initval: int) -> int:
    length = len(words)
    a = b = c = (JHASH_INITVAL + (length << 2) + initval) & M32
    i = 0
    while length > 3:
        a = (a + words[i]) & M32
        b = (b + words[i + 1]) & M32
        c = (c + words[i + 2]) & M32
        a, b, c = _mix(a, b, c)
        length -= 3
        i += 3
    if length == 0:
        return c
    if length == 3:
        c = (c + words[i + 2]) & M32
    if length >= 2:
        b = (b + words[i + 1]) & M32
    a = (a + words[i]) & M32
    return _final(a, b, c)


def be32(addr: bytes) -> int:
    """A __be32 (network-order bytes) as the little-endian CPU sees it when hashing."""
    return int.from_bytes(addr[:4], "little")


def be16(port: int) -> int:
    """A __be16 holding `port` as the little-endian CPU sees it."""
    return int.from_bytes(port.to_bytes(2, "big"), "little")


def inet_ehashfn(laddr: bytes, lport: int, faddr: bytes, fport: int, secret: int) -> int:
    """__inet_ehashfn: `secret` = inet_ehash_secret + net_hash_mix(net)."""
    return jhash_3words(be32(laddr), be32(faddr), ((lport << 16) | be16(fport)) & M32, secret)


def _s6_addr32(addr: bytes) -> tuple[int, int, int, int]:
    """in6_addr.s6_addr32 as the little-endian CPU sees it (16 bytes: 4 words)."""
    words: tuple[int, int, int, int] = _S6_ADDR32.unpack(addr)
    return words


_S6_ADDR32 = struct.Struct("<4I")


def inet6_ehashfn(
    laddr: bytes,
    lport: int,
    faddr: bytes,
    fport: int,
    ehash_secret: int,
    ipv6_secret: int,
    hash_mix: int,
) -> int:
    """inet6_ehashfn: lhash is the last word of laddr, fhash = __ipv6_addr_jhash(faddr), which
    is jhash2 over the four words (include/net/ipv6.h, 6.1)."""
    lhash = _s6_addr32(laddr)[3]
    fhash = jhash2(_s6_addr32(faddr), ipv6_secret)
    return jhash_3words(
        lhash, fhash, ((lport << 16) | be16(fport)) & M32, (ehash_secret + hash_mix) & M32
    )


def ipv4_portaddr_hash(addr: bytes, port: int, hash_mix: int) -> int:
    return jhash_1word(be32(addr), hash_mix) ^ port


def ipv6_portaddr_hash(addr: bytes, port: int, hash_mix: int) -> int:
    words = _s6_addr32(addr)
    if not any(words):
        h = jhash_1word(0, hash_mix)
    elif words[0] == 0 and words[1] == 0 and words[2] == 0xFFFF0000:  # v4-mapped, LE view
        h = jhash_1word(words[3], hash_mix)
    else:
        h = jhash2(words, hash_mix)
    return h ^ port
