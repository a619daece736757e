"""npz files whose arrays are read in place: the bytes of a verified artifact become the
arrays without a copy.

`write_npz` writes what `np.savez` writes (an uncompressed zip of .npy members, which
`np.load` reads), except that each member's array data starts on a 64-byte boundary: a
padding record in the member's local header extra field, as Android's zipalign does.
`npz_arrays` then views the arrays in the buffer that holds the file; a member it cannot
view (compressed, misaligned, an unknown .npy version) is read by numpy with a copy.
"""

from __future__ import annotations

import hashlib
import io
import struct
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import numpy as np

ALIGN = 64  # what .npy aligns its data to within a member, and the zip here aligns members to
PADDING_ID = 0xD935  # the extra-field id zipalign's padding records use
ZIP64_EXTRA = 20  # zipfile adds this local extra record to a member opened with force_zip64
LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # signature ... name length, extra length


class NpzError(ValueError):
    """An npz file that is not what `np.savez` writes."""


def npy_header(array: np.ndarray) -> bytes:
    """The .npy header `np.lib.format.write_array` writes before `array`'s data."""
    header = io.BytesIO()
    fields = np.lib.format.header_data_from_array_1_0(array)
    try:
        np.lib.format.write_array_header_1_0(header, fields)
    except ValueError:  # a header past 64 KiB: format 2.0, as write_array picks
        header = io.BytesIO()
        np.lib.format.write_array_header_2_0(header, fields)
    return header.getvalue()


def write_npz(target: Path, arrays: dict[str, np.ndarray]) -> str:
    """`np.savez(target, **arrays)` with every member's data aligned to 64 bytes; the
    file's sha256, hashed in a thread of its own as the bytes are written (zip members
    written in one pass, sizes in data descriptors, so no byte is rewritten after)."""
    with target.open("wb") as handle, HashingWriter(handle) as sink, \
            zipfile.ZipFile(sink, "w", zipfile.ZIP_STORED) as archive:
        for name, value in arrays.items():
            array = np.asanyarray(value)
            header = npy_header(array)
            member = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            start = (sink.tell() + LOCAL_HEADER.size + len(member.filename.encode())
                     + 4 + ZIP64_EXTRA + len(header))
            member.extra = struct.pack("<HH", PADDING_ID, -start % ALIGN) + bytes(-start % ALIGN)
            with archive.open(member, "w", force_zip64=True) as stream:
                np.lib.format.write_array(stream, array, allow_pickle=False)
    return sink.sha256()


class HashingWriter(io.RawIOBase):
    """A write-once file that hashes what goes through it, beside the writing; it cannot
    seek, so a zip written to it is written in one pass."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle, self.position = handle, 0
        self.digest = hashlib.sha256()
        self.hashing = ThreadPoolExecutor(1)
        self.steps: list[Future[None]] = []

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        piece = bytes(data)  # its own copy: the caller may reuse its buffer
        self.steps.append(self.hashing.submit(self.digest.update, piece))
        self.handle.write(piece)
        self.position += len(piece)
        return len(piece)

    def tell(self) -> int:
        return self.position

    def sha256(self) -> str:
        self.hashing.shutdown()
        for step in self.steps:
            step.result()
        return self.digest.hexdigest()

    def close(self) -> None:
        self.hashing.shutdown()
        super().close()


def npz_arrays(data: bytearray | bytes) -> dict[str, np.ndarray]:
    """The arrays of the npz file in `data`, views of it where the format allows."""
    view = memoryview(data)
    try:
        archive = zipfile.ZipFile(io.BufferedReader(BufferReader(view)))
    except zipfile.BadZipFile as error:
        raise NpzError(f"not an npz file ({error})") from None
    arrays = {}
    with archive:
        for member in archive.infolist():
            name = member.filename.removesuffix(".npy")
            arrays[name] = in_place(data, view, member)
            if arrays[name] is None:
                with archive.open(member) as stream:
                    arrays[name] = np.lib.format.read_array(stream, allow_pickle=False)
    return arrays


def in_place(data: bytearray | bytes, view: memoryview, member: zipfile.ZipInfo
             ) -> np.ndarray | None:
    """The member's array as a view of `data`, or None where it cannot be one."""
    if member.compress_type != zipfile.ZIP_STORED:
        return None
    fields = LOCAL_HEADER.unpack_from(view, member.header_offset)
    start = member.header_offset + LOCAL_HEADER.size + fields[-2] + fields[-1]
    stream = io.BufferedReader(BufferReader(view[start:start + member.file_size]))
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        return None
    if dtype.hasobject:
        raise NpzError(f"array {member.filename} has dtype object, which would need pickle")
    offset = start + stream.tell()
    count = int(np.prod(shape, dtype=np.int64))
    if offset + count * dtype.itemsize > start + member.file_size:
        raise NpzError(f"array {member.filename} is truncated")
    if not dtype.itemsize or offset % dtype.alignment:
        return None  # a misaligned view would slow every operation on it
    array = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return array.reshape(shape, order="F" if fortran else "C")


class BufferReader(io.RawIOBase):
    """A read-only, seekable file over a buffer, without copying it."""

    def __init__(self, view: memoryview) -> None:
        self.view, self.position = view, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, target: memoryview) -> int:  # type: ignore[override]
        piece = self.view[self.position:self.position + len(target)]
        target[:len(piece)] = piece
        self.position += len(piece)
        return len(piece)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: len(self.view)}[whence]
        self.position = max(0, base + offset)
        return self.position

    def tell(self) -> int:
        return self.position
