"""The bpf(2) system call from Python: maps, programs, attachment.

No compiler, no bcc, no native dependency: the system call goes through
ctypes, instructions are assembled here (:func:`insn` and friends) and the
kernel's verifier checks them at load. Only what the socket-map relay needs
(:mod:`proxy.io.sockmap`) is wrapped; each call raises :class:`BpfError`
carrying the errno and, for a refused program, the verifier's log.

Layouts follow ``union bpf_attr`` in include/uapi/linux/bpf.h. Every
attribute block is zero-padded to ``_ATTR_SIZE`` bytes: a kernel that knows
a larger union reads zeros for the rest, and one that knows a smaller union
accepts the longer block as long as its tail is zero (bpf_check_uarg_tail_zero).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import struct
from dataclasses import dataclass

# bpf(2)'s number differs per architecture; the machines Warren runs on:
# x86_64 (arch/x86/entry/syscalls/syscall_64.tbl) and arm64, which uses the
# generic table (include/uapi/asm-generic/unistd.h).
_SYSCALL_NUMBERS = {"x86_64": 321, "aarch64": 280, "arm64": 280}

# Commands (enum bpf_cmd).
MAP_CREATE = 0
MAP_LOOKUP_ELEM = 1
MAP_UPDATE_ELEM = 2
MAP_DELETE_ELEM = 3
PROG_LOAD = 5
MAP_UPDATE_BATCH = 26  # kernel 5.6+ (hash and array maps; not socket maps)
MAP_DELETE_BATCH = 27  # kernel 5.6+
PROG_ATTACH = 8
PROG_DETACH = 9

# Map types (enum bpf_map_type).
MAP_TYPE_HASH = 1
MAP_TYPE_ARRAY = 2
MAP_TYPE_SOCKHASH = 18
MAP_TYPE_RINGBUF = 27  # kernel 5.8+

# Map flags.
F_NO_PREALLOC = 1 << 0
F_MMAPABLE = 1 << 10  # array maps only, kernel 5.5+

# Program types (enum bpf_prog_type) and attach types (enum bpf_attach_type).
PROG_TYPE_SK_SKB = 14
SK_SKB_STREAM_PARSER = 4
SK_SKB_STREAM_VERDICT = 5
SK_SKB_VERDICT = 38  # kernel 5.13+: a verdict without a parser

# Update flags.
ANY = 0

# Helper functions (enum bpf_func_id) used by Warren's program.
FUNC_MAP_LOOKUP_ELEM = 1
FUNC_SKB_LOAD_BYTES = 26
FUNC_SKB_PULL_DATA = 39
FUNC_SKB_ADJUST_ROOM = 50  # on sk_skb: kernel 5.10+, shrinking or growing at the front by at most 0xfff
FUNC_GET_SOCKET_COOKIE = 46
FUNC_SK_REDIRECT_HASH = 72
FUNC_RINGBUF_OUTPUT = 130  # kernel 5.8+
FUNC_SKC_TO_TCP_SOCK = 137  # kernel 5.9+; in sk_skb programs only with CAP_PERFMON

# struct __sk_buff: where `sk` (a struct bpf_sock *, sock_common to the verifier) sits.
SKB_SK = 168

# sk_skb verdicts.
SK_DROP = 0
SK_PASS = 1

_ATTR_SIZE = 128
_LOG_SIZE = 64 * 1024


class BpfError(OSError):
    """A bpf(2) call failed: ``errno`` says why; ``log`` holds the verifier's
    explanation when a program was refused."""

    def __init__(self, err: int, what: str, log: str = "") -> None:
        super().__init__(err, f"{what}: {os.strerror(err)}")
        self.what = what
        self.log = log


class Unsupported(Exception):
    """bpf(2) cannot be called on this machine at all (architecture)."""


def syscall_number(machine: str | None = None) -> int:
    """bpf(2)'s number here; raises Unsupported on an unknown architecture."""
    machine = machine or platform.machine()
    try:
        return _SYSCALL_NUMBERS[machine]
    except KeyError:
        raise Unsupported(f"no bpf(2) system call number known for the {machine} architecture") from None


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
try:
    _number: int | None = syscall_number()
except Unsupported:
    _number = None  # bpf() raises it when called


def bpf(cmd: int, attr: bytes | ctypes.Array, what: str) -> int:
    """One bpf(2) call; returns its result (an fd for creations), raises BpfError."""
    number = _number if _number is not None else syscall_number()
    if isinstance(attr, (bytes, bytearray)):
        attr = ctypes.create_string_buffer(bytes(attr).ljust(_ATTR_SIZE, b"\0"), _ATTR_SIZE)
    result = _libc.syscall(ctypes.c_long(number), ctypes.c_long(cmd), attr, ctypes.c_long(ctypes.sizeof(attr)))
    if result < 0:
        raise BpfError(ctypes.get_errno() or errno.EINVAL, what)
    return result


# --- the instruction set -----------------------------------------------------
# struct bpf_insn { u8 code; u8 dst_reg:4, src_reg:4; s16 off; s32 imm; }
# On little-endian machines dst_reg is the low nibble.

R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10 = range(11)

_INSN = struct.Struct("<BBhi")

# Opcode parts (include/uapi/linux/bpf_common.h, bpf.h).
_LD, _LDX, _STX, _ALU, _ALU64, _JMP = 0x00, 0x01, 0x03, 0x04, 0x07, 0x05
_W, _DW = 0x00, 0x18
_IMM, _MEM, _ATOMIC = 0x00, 0x60, 0xC0
_K, _X = 0x00, 0x08
_ADD, _SUB, _RSH, _MOV = 0x00, 0x10, 0x70, 0xB0
_JA, _JEQ, _JGE, _JNE, _CALL, _EXIT, _JLE = 0x00, 0x10, 0x30, 0x50, 0x80, 0x90, 0xB0
_PSEUDO_MAP_FD = 1
_PSEUDO_KFUNC_CALL = 2


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return _INSN.pack(code, dst | (src << 4), off, imm)


def mov_reg(dst: int, src: int) -> bytes:
    """dst = src (64 bits)."""
    return insn(_ALU64 | _MOV | _X, dst, src)


def mov_imm(dst: int, imm: int) -> bytes:
    """dst = imm (sign-extended to 64 bits)."""
    return insn(_ALU64 | _MOV | _K, dst, imm=imm)


def add_imm(dst: int, imm: int) -> bytes:
    """dst += imm (64 bits)."""
    return insn(_ALU64 | _ADD | _K, dst, imm=imm)


def sub_reg(dst: int, src: int) -> bytes:
    """dst -= src (64 bits)."""
    return insn(_ALU64 | _SUB | _X, dst, src)


def rsh_imm(dst: int, imm: int) -> bytes:
    """dst >>= imm (64 bits, logical)."""
    return insn(_ALU64 | _RSH | _K, dst, imm=imm)


def mov32_reg(dst: int, src: int) -> bytes:
    """dst = (u32)src: 32-bit operations clear the upper half of dst."""
    return insn(_ALU | _MOV | _X, dst, src)


def add32_reg(dst: int, src: int) -> bytes:
    """dst = (u32)(dst + src)."""
    return insn(_ALU | _ADD | _X, dst, src)


def sub32_reg(dst: int, src: int) -> bytes:
    """dst = (u32)(dst - src): a distance between TCP sequence numbers."""
    return insn(_ALU | _SUB | _X, dst, src)


def load_map_fd(dst: int, map_fd: int) -> bytes:
    """dst = the map behind map_fd: a two-slot instruction the kernel rewrites
    into the map's address at load (BPF_PSEUDO_MAP_FD)."""
    return insn(_LD | _IMM | _DW, dst, _PSEUDO_MAP_FD, imm=map_fd) + insn(0)


def load_mem(size: int, dst: int, src: int, off: int) -> bytes:
    """dst = *(size *)(src + off); size is _W (u32) or _DW (u64)."""
    return insn(_LDX | _MEM | size, dst, src, off)


def store_mem(size: int, dst: int, off: int, src: int) -> bytes:
    """*(size *)(dst + off) = src."""
    return insn(_STX | _MEM | size, dst, src, off)


def atomic_add64(dst: int, off: int, src: int) -> bytes:
    """lock *(u64 *)(dst + off) += src (BPF_XADD; BPF_ATOMIC | BPF_ADD since 5.12)."""
    return insn(_STX | _ATOMIC | _DW, dst, src, off, imm=_ADD)


@dataclass(frozen=True)
class Jump:
    """if (dst op operand) goto label: ``operand`` is a register with
    ``reg=True`` (unsigned comparisons), else an immediate. Resolved into an
    offset by :func:`assemble`."""

    op: int
    dst: int
    operand: int
    label: str
    reg: bool = False


@dataclass(frozen=True)
class Label:
    """Marks where a Jump lands."""

    name: str


def goto(label: str) -> Jump:
    return Jump(_JA, 0, 0, label)


def jump_if_imm(op: int, dst: int, imm: int, label: str) -> Jump:
    return Jump(op, dst, imm, label)


def jump_if_reg(op: int, dst: int, src: int, label: str) -> Jump:
    return Jump(op, dst, src, label, reg=True)


def assemble(items: list[bytes | Jump | Label]) -> bytes:
    """Lay out instructions, resolving jumps to labels (an offset counts
    8-byte slots after the jump; a map load takes two)."""
    positions: dict[str, int] = {}
    position = 0
    for item in items:
        if isinstance(item, Label):
            positions[item.name] = position
        else:
            position += 1 if isinstance(item, Jump) else len(item) // _INSN.size
    code, position = [], 0
    for item in items:
        if isinstance(item, Label):
            continue
        if isinstance(item, Jump):
            off = positions[item.label] - position - 1
            if item.reg:
                code.append(insn(_JMP | item.op | _X, item.dst, item.operand, off))
            else:
                code.append(insn(_JMP | item.op | _K, item.dst, off=off, imm=item.operand))
            position += 1
        else:
            code.append(item)
            position += len(item) // _INSN.size
    return b"".join(code)


def call(helper: int) -> bytes:
    """r0 = helper(r1, ..., r5); r1-r5 are clobbered."""
    return insn(_JMP | _CALL, imm=helper)


def call_kernel(btf_id: int) -> bytes:
    """r0 = the kernel function (kfunc) of type id `btf_id` in the kernel's
    BTF (:mod:`proxy.io.btf`); r1-r5 are clobbered."""
    return insn(_JMP | _CALL, src=_PSEUDO_KFUNC_CALL, imm=btf_id)


def exit_() -> bytes:
    """return r0."""
    return insn(_JMP | _EXIT)


U32, U64 = _W, _DW
JEQ, JGE, JNE, JLE = _JEQ, _JGE, _JNE, _JLE  # JLE: kernel 4.14+


# --- maps and programs ---------------------------------------------------------


def create_map(map_type: int, key_size: int, value_size: int, max_entries: int, flags: int = 0, name: str = "") -> int:
    """A new map's fd (the caller closes it); raises BpfError."""
    attr = struct.pack("IIIIIII16s", map_type, key_size, value_size, max_entries, flags, 0, 0, name.encode()[:15])
    return bpf(MAP_CREATE, attr, f"creating a map of type {map_type}")


def _pointer(buffer: ctypes.Array) -> int:
    return ctypes.addressof(buffer)


def update_elem(map_fd: int, key: bytes, value: bytes, flags: int = ANY) -> None:
    key_buf = ctypes.create_string_buffer(key, len(key))
    value_buf = ctypes.create_string_buffer(value, len(value))
    attr = struct.pack("IIQQQ", map_fd, 0, _pointer(key_buf), _pointer(value_buf), flags)
    bpf(MAP_UPDATE_ELEM, attr, "updating a map element")


class Updates:
    """Repeated updates of one map from buffers allocated once: each
    :meth:`update` is one bpf(2) call and nothing else (the kernel path
    updates maps for every new connection). ``batch`` entries at most per
    call; :meth:`update` with more than one uses BPF_MAP_UPDATE_BATCH
    (kernel 5.6+, hash and array maps), which raises BpfError (EINVAL,
    ENOTSUPP) where the kernel or the map type has none."""

    __slots__ = ("map_fd", "key_size", "value_size", "keys", "values", "attr", "batch_attr", "_args")

    def __init__(self, map_fd: int, key_size: int, value_size: int, batch: int = 1) -> None:
        self.map_fd, self.key_size, self.value_size = map_fd, key_size, value_size
        self.keys = ctypes.create_string_buffer(key_size * batch)
        self.values = ctypes.create_string_buffer(value_size * batch)
        keys, values = ctypes.addressof(self.keys), ctypes.addressof(self.values)
        self.attr = ctypes.create_string_buffer(_ATTR_SIZE)
        struct.pack_into("IIQQQ", self.attr, 0, map_fd, 0, keys, values, ANY)
        # struct { u64 in_batch, out_batch, keys, values; u32 count, map_fd; u64 elem_flags, flags; }
        self.batch_attr = ctypes.create_string_buffer(_ATTR_SIZE)
        struct.pack_into("QQQQIIQQ", self.batch_attr, 0, 0, 0, keys, values, batch, map_fd, ANY, 0)
        self._args = (ctypes.c_long(MAP_UPDATE_ELEM), ctypes.c_long(MAP_UPDATE_BATCH), ctypes.c_long(_ATTR_SIZE))

    def update(self, keys: bytes, values: bytes) -> None:
        """Store ``values`` under ``keys`` (both concatenated, as many of
        each, at most ``batch``); raises BpfError."""
        count = len(keys) // self.key_size
        self.keys[: len(keys)] = keys
        self.values[: len(values)] = values
        single, batched, size = self._args
        if count == 1:
            result = _libc.syscall(_c_number, single, self.attr, size)
        else:
            struct.pack_into("I", self.batch_attr, 32, count)
            result = _libc.syscall(_c_number, batched, self.batch_attr, size)
        if result < 0:
            raise BpfError(ctypes.get_errno() or errno.EINVAL, "updating map elements")


_c_number = ctypes.c_long(_number if _number is not None else -1)


def delete_elem(map_fd: int, key: bytes) -> None:
    key_buf = ctypes.create_string_buffer(key, len(key))
    attr = struct.pack("IIQQQ", map_fd, 0, _pointer(key_buf), 0, 0)
    bpf(MAP_DELETE_ELEM, attr, "deleting a map element")


def delete_batch(map_fd: int, keys: list[bytes]) -> None:
    """Delete `keys` (all of one size) in one call; raises BpfError (EINVAL
    on kernels without batch operations, ENOENT at the first missing key:
    the ones before it are deleted)."""
    joined = b"".join(keys)
    keys_buf = ctypes.create_string_buffer(joined, len(joined))
    # struct { u64 in_batch, out_batch, keys, values; u32 count, map_fd; u64 elem_flags, flags; }
    attr = ctypes.create_string_buffer(
        struct.pack("QQQQIIQQ", 0, 0, _pointer(keys_buf), 0, len(keys), map_fd, 0, 0).ljust(_ATTR_SIZE, b"\0"),
        _ATTR_SIZE,
    )
    bpf(MAP_DELETE_BATCH, attr, "deleting map elements")


def lookup_elem(map_fd: int, key: bytes, value_size: int) -> bytes:
    key_buf = ctypes.create_string_buffer(key, len(key))
    value_buf = ctypes.create_string_buffer(value_size)
    attr = struct.pack("IIQQQ", map_fd, 0, _pointer(key_buf), _pointer(value_buf), 0)
    bpf(MAP_LOOKUP_ELEM, attr, "looking up a map element")
    return value_buf.raw


def load_program(prog_type: int, code: bytes, name: str, license: str = "GPL") -> int:
    """Load instructions; returns the program's fd. A refusal raises BpfError
    with the verifier's log (asked for only after a first failure, so the
    common case does not fill a 64 kB buffer)."""
    code_buf = ctypes.create_string_buffer(code, len(code))
    license_buf = ctypes.create_string_buffer(license.encode())
    count = len(code) // _INSN.size

    def attr(log_level: int, log_buf: ctypes.Array | None) -> bytes:
        return struct.pack(
            "IIQQIIQII16s",
            prog_type, count, _pointer(code_buf), _pointer(license_buf),
            log_level, _LOG_SIZE if log_buf is not None else 0,
            _pointer(log_buf) if log_buf is not None else 0,
            0, 0, name.encode()[:15],
        )  # fmt: skip

    try:
        return bpf(PROG_LOAD, attr(0, None), "loading the program")
    except BpfError as first:
        if first.errno in (errno.EPERM, errno.ENOSYS):
            raise
        log_buf = ctypes.create_string_buffer(_LOG_SIZE)
        try:
            return bpf(PROG_LOAD, attr(1, log_buf), "loading the program")
        except BpfError as second:
            raise BpfError(second.errno, second.what, log_buf.value.decode(errors="replace")) from None


def attach_program(target_fd: int, prog_fd: int, attach_type: int) -> None:
    attr = struct.pack("IIIII", target_fd, prog_fd, attach_type, 0, 0)
    bpf(PROG_ATTACH, attr, f"attaching the program (attach type {attach_type})")


def mmap_ring(map_fd: int, size: int) -> tuple[mmap.mmap, mmap.mmap]:
    """Map a BPF ring buffer of `size` data bytes: (the consumer page, read
    and written by the consumer; the producer page followed by the data,
    mapped twice in a row by the kernel so that no record wraps, read only)."""
    page = mmap.PAGESIZE
    consumer = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        producer = mmap.mmap(map_fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
    except BaseException:
        consumer.close()
        raise
    return consumer, producer


def mmap_map(map_fd: int, size: int) -> mmap.mmap:
    """Map a BPF_F_MMAPABLE array into this process (shared with the kernel)."""
    page = mmap.PAGESIZE
    return mmap.mmap(map_fd, -(-size // page) * page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
