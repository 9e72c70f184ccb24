"""What the kernel's own type information (BTF) says about its layout.

The kernel path's repaired verdict program (:mod:`proxy.io.sockmap`) reads
fields of kernel structures (an skb's TCP sequence number, a socket's
``copied_seq``) and calls a kernel function (``bpf_cast_to_kern_ctx``). Their
offsets and the function's id differ between kernel builds; the running
kernel publishes them in /sys/kernel/btf/vmlinux (CONFIG_DEBUG_INFO_BTF),
whose format is include/uapi/linux/btf.h: a header, an array of variable
length type records, a string section.

Only what the program needs is looked up: :func:`lookup` gives a function's
type id and the byte offset of a named member of a named struct (members of
anonymous structs and unions inside it included). The file is read once per
process. Anything malformed raises :class:`BtfError`, nothing else.
"""

from __future__ import annotations

import functools
import struct

VMLINUX = "/sys/kernel/btf/vmlinux"

_MAGIC = 0xEB9F
_HEADER = struct.Struct("<HBBIIIII")  # magic, version, flags, hdr_len, type_off, type_len, str_off, str_len
_TYPE = struct.Struct("<III")  # name_off, info (vlen, kind, kind_flag), size or type
_MEMBER = struct.Struct("<III")  # name_off, type, offset (bits; with kind_flag: bitfield size << 24 | offset)

_STRUCT, _UNION, _FUNC = 4, 5, 12
# Kinds that only qualify another type (typedef, volatile, const, restrict, type tag).
_QUALIFIERS = {8, 9, 10, 11, 18}
# Bytes after the 12-byte record: fixed, and per vlen item, for each kind
# this reader knows (1 int ... 19 enum64); another kind cannot be skipped.
_FIXED = {1: 4, 2: 0, 3: 12, 4: 0, 5: 0, 6: 0, 7: 0, 8: 0, 9: 0, 10: 0, 11: 0, 12: 0,
          13: 0, 14: 4, 15: 0, 16: 0, 17: 4, 18: 0, 19: 0}  # fmt: skip
_PER_ITEM = {4: 12, 5: 12, 6: 8, 13: 8, 15: 12, 19: 12}


class BtfError(Exception):
    """The BTF could not be read, or lacks what was asked for."""


class Btf:
    """One BTF blob, indexed: each type's kind, name offset, record position."""

    def __init__(self, data: bytes) -> None:
        if len(data) < _HEADER.size:
            raise BtfError("BTF shorter than its header")
        magic, _version, _flags, hdr_len, type_off, type_len, str_off, str_len = _HEADER.unpack_from(data)
        if magic != _MAGIC:
            raise BtfError(f"not BTF (magic {magic:#x})")
        types_at, strings_at = hdr_len + type_off, hdr_len + str_off
        if hdr_len < _HEADER.size or types_at + type_len > len(data) or strings_at + str_len > len(data):
            raise BtfError("BTF sections lie outside the data")
        self._data = data
        self._strings = data[strings_at : strings_at + str_len]
        # Type ids start at 1; [0] is "void".
        self._kinds, self._names, self._at = [0], [0], [0]
        position, end = types_at, types_at + type_len
        kinds, names, at = self._kinds, self._names, self._at
        while position < end:
            if position + _TYPE.size > end:
                raise BtfError(f"type record {len(kinds)} cut short")
            name_off, info, _ = _TYPE.unpack_from(data, position)
            kind = (info >> 24) & 0x1F
            try:
                length = _TYPE.size + _FIXED[kind] + (info & 0xFFFF) * _PER_ITEM.get(kind, 0)
            except KeyError:
                raise BtfError(f"type {len(kinds)} has kind {kind}, unknown to this reader") from None
            kinds.append(kind)
            names.append(name_off)
            at.append(position)
            position += length
        if position != end:
            raise BtfError("the last type record runs past the type section")

    def name(self, offset: int) -> str:
        strings = self._strings
        if not 0 <= offset < len(strings):
            raise BtfError(f"name offset {offset} outside the string section")
        stop = strings.find(b"\0", offset)
        return strings[offset : stop if stop >= 0 else len(strings)].decode("ascii", "replace")

    def _named(self, kind: int, name: str) -> list[int]:
        wanted = name.encode()
        strings = self._strings
        ids = []
        for type_id, (k, offset) in enumerate(zip(self._kinds, self._names)):
            if k == kind and strings.startswith(wanted, offset) and strings[offset + len(wanted) : offset + len(wanted) + 1] in (b"\0", b""):
                ids.append(type_id)
        return ids

    def function(self, name: str) -> int:
        """The type id of the kernel function `name` (what a kfunc call names)."""
        ids = self._named(_FUNC, name)
        if not ids:
            raise BtfError(f"no function {name} in the kernel's BTF")
        return ids[0]

    def offset(self, struct_name: str, member: str) -> int:
        """The byte offset of `member` in `struct struct_name`."""
        for type_id in self._named(_STRUCT, struct_name):
            found = self._member_offset(type_id, member, depth=0)
            if found is not None:
                if found % 8:
                    raise BtfError(f"{struct_name}.{member} is a bit field")
                return found // 8
        raise BtfError(f"no member {member} in struct {struct_name} in the kernel's BTF")

    def _member_offset(self, type_id: int, member: str, depth: int) -> int | None:
        """Bit offset of `member` in the struct or union `type_id`, looking
        into its anonymous members; None if it has none of that name."""
        if depth > 8:
            raise BtfError("anonymous members nested too deep")
        data, position = self._data, self._at[type_id]
        _, info, _ = _TYPE.unpack_from(data, position)
        flagged = info >> 31
        for index in range(info & 0xFFFF):
            name_off, member_type, offset = _MEMBER.unpack_from(data, position + _TYPE.size + index * _MEMBER.size)
            bits = offset & 0xFFFFFF if flagged else offset
            if name_off and self.name(name_off) == member:
                return bits
            if not name_off:
                inner = self._resolve(member_type)
                if self._kinds[inner] in (_STRUCT, _UNION):
                    found = self._member_offset(inner, member, depth + 1)
                    if found is not None:
                        return bits + found
        return None

    def _resolve(self, type_id: int) -> int:
        """`type_id` without its qualifiers and typedefs."""
        for _ in range(16):
            if not 0 <= type_id < len(self._kinds):
                raise BtfError(f"type id {type_id} out of range")
            if self._kinds[type_id] not in _QUALIFIERS:
                return type_id
            type_id = _TYPE.unpack_from(self._data, self._at[type_id])[2]
        raise BtfError("a chain of qualifiers too long")


@functools.cache
def kernel() -> Btf:
    """The running kernel's BTF, read once; raises BtfError (OSError
    becomes one: no file means a kernel built without BTF)."""
    try:
        with open(VMLINUX, "rb") as file:
            return Btf(file.read())
    except OSError as exc:
        raise BtfError(f"the kernel's BTF cannot be read ({VMLINUX}: {exc.strerror})") from exc
