"""Reading the kernel's type information (proxy.io.btf): hand-built blobs for
the format's cases, the running kernel's own for what the repaired verdict
program needs, and arbitrary bytes for the parser's only way to fail."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.io import btf
from proxy.io.btf import Btf, BtfError

INT, PTR, STRUCT, UNION, TYPEDEF, CONST, FUNC, FUNC_PROTO = 1, 2, 4, 5, 8, 10, 12, 13


class Blob:
    """A BTF blob built type by type (ids from 1, in the order added)."""

    def __init__(self) -> None:
        self.strings = bytearray(b"\0")
        self.types = bytearray()
        self.count = 0

    def name(self, text: str) -> int:
        if not text:
            return 0
        offset = len(self.strings)
        self.strings += text.encode() + b"\0"
        return offset

    def add(self, kind: int, name: str = "", size_or_type: int = 0, items: list[tuple] = (), kflag: int = 0,
            extra: bytes = b"") -> int:  # fmt: skip
        info = (kflag << 31) | (kind << 24) | len(items)
        self.types += struct.pack("<III", self.name(name), info, size_or_type) + extra
        for item in items:
            if kind in (STRUCT, UNION):
                member, type_id, bits = item
                self.types += struct.pack("<III", self.name(member), type_id, bits)
            else:
                self.types += struct.pack("<II", *item)
        self.count += 1
        return self.count

    def bytes(self) -> bytes:
        header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(self.types), len(self.types), len(self.strings))
        return header + bytes(self.types) + bytes(self.strings)


def kernel_like() -> Blob:
    """struct sk_buff { void *next; union { struct sock *sk; int frag; }; char cb[48]; }
    (an anonymous union behind a typedef and a const), a bit field, and
    the function the program calls."""
    blob = Blob()
    integer = blob.add(INT, "int", 4, extra=struct.pack("<I", 32))
    pointer = blob.add(PTR, "", integer)
    union = blob.add(UNION, "", 8, [("sk", pointer, 0), ("frag", integer, 0)])
    alias = blob.add(TYPEDEF, "anon_t", union)
    constant = blob.add(CONST, "", alias)
    blob.add(STRUCT, "sk_buff", 64, [("next", pointer, 0), ("", constant, 64), ("cb", integer, 128),
                                     ("flags", integer, (3 << 24) | 453)], kflag=1)  # fmt: skip
    proto = blob.add(FUNC_PROTO, "", integer, [(0, pointer)])
    blob.add(FUNC, "bpf_cast_to_kern_ctx", proto)
    return blob


def test_a_member_is_found_by_name_also_inside_an_anonymous_union_behind_qualifiers():
    types = Btf(kernel_like().bytes())
    assert types.offset("sk_buff", "next") == 0
    assert types.offset("sk_buff", "sk") == 8
    assert types.offset("sk_buff", "frag") == 8
    assert types.offset("sk_buff", "cb") == 16


def test_a_function_is_found_by_its_exact_name():
    blob = kernel_like()
    blob.add(FUNC, "bpf_cast_to_kern_ctx_not", 7)
    types = Btf(blob.bytes())
    assert types.function("bpf_cast_to_kern_ctx") == 8
    with pytest.raises(BtfError, match="no function bpf_cast_to"):
        types.function("bpf_cast_to")


def test_what_is_missing_or_unusable_is_named():
    types = Btf(kernel_like().bytes())
    with pytest.raises(BtfError, match="no member copied_seq in struct sk_buff"):
        types.offset("sk_buff", "copied_seq")
    with pytest.raises(BtfError, match="no member cb in struct tcp_sock"):
        types.offset("tcp_sock", "cb")
    with pytest.raises(BtfError, match="sk_buff.flags is a bit field"):
        types.offset("sk_buff", "flags")


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda data: data[:10], "shorter than its header"),
        (lambda data: b"\x9f\xec" + data[2:], "not BTF"),
        (lambda data: data[:-5], "outside the data"),
        # the first type record's info word, after the header and its name offset
        (lambda data: data[:28] + struct.pack("<I", 31 << 24) + data[32:], "kind 31, unknown to this reader"),
    ],
    ids=["short", "magic", "cut", "kind"],
)
def test_a_damaged_blob_is_refused_with_why(damage, message):
    with pytest.raises(BtfError, match=message):
        Btf(damage(kernel_like().bytes()))


def test_a_type_record_running_past_its_section_is_refused():
    blob = kernel_like()
    blob.add(STRUCT, "tail", 8, [("a", 1, 0)])
    data = bytearray(blob.bytes())
    # Claim one more member for the last struct than the section holds.
    record = 24 + len(blob.types) - 12 - 12
    info = struct.unpack_from("<I", data, record + 4)[0]
    struct.pack_into("<I", data, record + 4, info + 1)
    with pytest.raises(BtfError, match="runs past the type section"):
        Btf(bytes(data))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_are_refused_only_with_its_own_error(data):
    try:
        types = Btf(data)
        types.offset("sk_buff", "cb")
        types.function("bpf_cast_to_kern_ctx")
    except BtfError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_a_valid_blob_with_any_bytes_changed_fails_only_with_its_own_error(data):
    blob = bytearray(kernel_like().bytes())
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(0, len(blob) - 1))
        blob[at] = data.draw(st.integers(0, 255))
    try:
        types = Btf(bytes(blob))
        types.offset("sk_buff", "sk")
        types.offset("sk_buff", "cb")
        types.function("bpf_cast_to_kern_ctx")
    except BtfError:
        pass


@pytest.mark.skipif(not os.path.exists(btf.VMLINUX), reason="a kernel built without BTF")
def test_the_running_kernel_describes_what_the_repaired_program_reads():
    types = btf.kernel()
    assert types is btf.kernel()  # read once per process
    assert types.function("bpf_cast_to_kern_ctx") > 0
    # cb is 8-byte aligned in struct sk_buff; copied_seq lies past struct sock's 700-odd bytes.
    assert types.offset("sk_buff", "cb") % 8 == 0
    assert types.offset("tcp_sock", "copied_seq") > 700
