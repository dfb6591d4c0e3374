"""Backups: `zraft snapshot save FILE` and `zraft snapshot restore FILE`.

``save`` asks one node (the leader, unless told otherwise) for a point-in-time copy of
its state machine over the client protocol (op ``snapshot``, one chunk per request; see
docs/PROTOCOL.md) and writes it to a file; ``restore`` checks the file and creates
fresh node databases from it, from which a new cluster starts.

File format (all integers big-endian)::

    b"ZRAFTSNAP\\x01"                       magic and format version
    u32 n, n bytes                           header: msgpack map {index, term, node, created, records}
    repeated: u32 n (n > 0), n bytes         chunks: the records, as the peers' snapshot stream carries them
    u32 0                                    end of chunks
    32 bytes                                 SHA-256 of everything before it

The file is written to ``FILE.tmp``, fsynced and renamed, so a crash never leaves a
half-written backup under the name asked for. ``restore`` verifies the checksum over
the whole file before it writes anything.
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import msgpack
import zmq

from zraft.node.leveldb import restore_into
from zraft.node.statemachine import decode_chunk

MAGIC = b"ZRAFTSNAP\x01"
_U32 = struct.Struct(">I")
_DIGEST = 32
_MAX_CHUNK = 64 << 20


class BackupError(RuntimeError):
    """A backup could not be taken, read or restored (the message says why)."""


@dataclass
class BackupInfo:
    index: int
    term: int
    node: int
    created: float
    records: int
    bytes: int


def _request(sock: zmq.Socket, req: dict[str, Any], timeout: float) -> dict[str, Any]:
    sock.send(msgpack.packb(req, use_bin_type=True))
    if not sock.poll(int(timeout * 1000)):
        raise BackupError(f"no answer within {timeout} s")
    rep = msgpack.unpackb(sock.recv(), raw=False)
    if not isinstance(rep, dict) or rep.get("ok") is not True:
        msg = rep.get("message") if isinstance(rep, dict) else rep
        raise BackupError(f"the node refused: {msg}")
    return rep


def save(endpoint: str, path: str | os.PathLike, timeout: float = 10.0,
         progress: Callable[[int, int], None] | None = None, keys: Any = None) -> BackupInfo:
    """Stream the state machine of the node at ``endpoint`` into the file ``path``.

    ``progress(records, bytes)`` is called after every chunk. ``keys``: a KeyRing (zraft.cluster.keys).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        keys.connect_to(sock, keys.server_key(endpoint))
    sock.connect(endpoint)
    digest = hashlib.sha256()
    records = written = 0
    try:
        first = _request(sock, {"op": "snapshot", "stream": None}, timeout)
        header = msgpack.packb({"index": first["index"], "term": first["term"], "node": first["id"],
                                "created": time.time()}, use_bin_type=True)
        with open(tmp, "wb") as f:
            def put(b: bytes) -> None:
                nonlocal written
                f.write(b)
                digest.update(b)
                written += len(b)

            put(MAGIC)
            put(_U32.pack(len(header)) + header)
            rep = first
            while True:
                data = rep["data"]
                if data:
                    records += len(decode_chunk(data))
                    put(_U32.pack(len(data)) + data)
                if progress:
                    progress(records, written)
                if rep["done"]:
                    break
                rep = _request(sock, {"op": "snapshot", "stream": first["stream"]}, timeout)
            put(_U32.pack(0))
            f.write(digest.digest())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        sock.close()
    return BackupInfo(first["index"], first["term"], first["id"], time.time(), records, written + _DIGEST)


def _read_exact(f: BinaryIO, n: int, what: str) -> bytes:
    b = f.read(n)
    if len(b) != n:
        raise BackupError(f"the file ends inside {what}: truncated or not a zraft backup")
    return b


def _frames(f: BinaryIO) -> Iterator[bytes]:
    while True:
        (n,) = _U32.unpack(_read_exact(f, 4, "a chunk length"))
        if n == 0:
            return
        if n > _MAX_CHUNK:
            raise BackupError(f"a chunk of {n} bytes: the file is corrupt")
        yield _read_exact(f, n, "a chunk")


def _open(path: Path) -> tuple[BinaryIO, dict[str, Any]]:
    f = open(path, "rb")  # noqa: SIM115 -- handed to the caller, who closes it
    try:
        if f.read(len(MAGIC)) != MAGIC:
            raise BackupError(f"{path} is not a zraft backup (wrong magic bytes)")
        (n,) = _U32.unpack(_read_exact(f, 4, "the header length"))
        if n > 1 << 20:
            raise BackupError(f"{path}: header of {n} bytes: the file is corrupt")
        try:
            header = msgpack.unpackb(_read_exact(f, n, "the header"), raw=False)
        except (ValueError, msgpack.UnpackException) as exc:
            raise BackupError(f"{path}: unreadable header ({exc}): the file is corrupt") from None
        if not isinstance(header, dict) or not all(isinstance(header.get(k), int) for k in ("index", "term")):
            raise BackupError(f"{path}: the header lacks index and term: the file is corrupt")
        return f, header
    except BaseException:
        f.close()
        raise


def verify(path: str | os.PathLike) -> BackupInfo:
    """Check a backup file end to end (structure, every record, the SHA-256); its description."""
    path = Path(path)
    if path.is_dir():
        raise BackupError(f"{path} is a directory, not a backup file")
    if not path.is_file():
        raise BackupError(f"{path}: no such file")
    size = path.stat().st_size
    if size < len(MAGIC) + 4 + 4 + _DIGEST:
        raise BackupError(f"{path} is too short ({size} bytes) to be a zraft backup")
    with open(path, "rb") as raw:
        if raw.read(len(MAGIC)) != MAGIC:
            raise BackupError(f"{path} is not a zraft backup (wrong magic bytes)")
        raw.seek(0)
        digest = hashlib.sha256()
        left = size - _DIGEST
        while left:
            b = raw.read(min(left, 1 << 20))
            digest.update(b)
            left -= len(b)
        if raw.read() != digest.digest():
            raise BackupError(f"{path}: checksum mismatch: the file is corrupt or truncated; refusing it")
    f, header = _open(path)
    records = 0
    with f:
        try:
            for chunk in _frames(f):
                records += len(decode_chunk(chunk))
        except ValueError as exc:
            raise BackupError(f"{path}: {exc}") from None
        if f.tell() != size - _DIGEST:
            raise BackupError(f"{path}: data after the last chunk: the file is corrupt")
    return BackupInfo(header["index"], header["term"], header.get("node", 0), header.get("created", 0.0),
                      records, size)


def restore(path: str | os.PathLike, node_dirs: list[Path],
            progress: Callable[[int], None] | None = None) -> BackupInfo:
    """Verify the backup, then create a fresh database in each of ``node_dirs`` (DATA_DIR/<id>) from it."""
    info = verify(path)
    for d in node_dirs:
        if (d / "db").exists():
            raise BackupError(f"{d / 'db'} already exists; restore only into a fresh data dir")
    for d in node_dirs:
        d.mkdir(parents=True, exist_ok=True)
        f, _ = _open(Path(path))
        with f:
            restore_into(d / "db", info.index, info.term, _frames(f))
        if progress:
            progress(1)
    return info
