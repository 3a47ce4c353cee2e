"""Cluster compression as QEMU 7.2's qcow2 writes it (block/qcow2-threads.c).

zlib: a raw deflate stream, ``deflateInit2(Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9,
Z_DEFAULT_STRATEGY)``; zstd: one zstd frame at the default level (3) with the content size,
as ``ZSTD_compressStream2(..., ZSTD_e_end)`` writes it. A cluster whose compressed form does
not fit in ``cluster_size - 1`` bytes is stored uncompressed (QEMU's ``-ENOMEM`` case), so
``compress_cluster`` returns None for it.

Both libraries release the GIL while they compress, so ``compress_clusters`` spreads a
multi-cluster write over a small thread pool, as qemu-img's qcow2 threads do (at most 4,
QCOW2_MAX_THREADS).
"""

from __future__ import annotations

import os
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from dirtybits.errors import UnsupportedFeatureError
from dirtybits.format.qcow2.header import COMPRESSION_ZLIB, COMPRESSION_ZSTD

Buffer = bytes | bytearray | memoryview

MAX_THREADS = 4  # QCOW2_MAX_THREADS
ZSTD_LEVEL = 3  # ZSTD_CLEVEL_DEFAULT: QEMU sets no level

_local = threading.local()
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _zstd_compressor() -> Any:
    cctx = getattr(_local, "zstd", None)
    if cctx is None:
        try:
            import zstandard
        except ImportError:
            raise UnsupportedFeatureError(
                "zstd-compressed clusters need the 'zstandard' module") from None
        cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
        _local.zstd = cctx
    return cctx


def compress_cluster(data: Buffer, compression_type: int, cluster_size: int) -> bytes | None:
    """The compressed form of one guest cluster (zero-padded to ``cluster_size`` when it is
    the disk's partial last one), or None when it would not fit in ``cluster_size - 1``
    bytes. Raises ``UnsupportedFeatureError`` for an unknown type or zstd without its module.
    """
    if len(data) < cluster_size:
        data = bytes(data) + bytes(cluster_size - len(data))
    if compression_type == COMPRESSION_ZLIB:
        c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9,
                             zlib.Z_DEFAULT_STRATEGY)
        out = c.compress(data) + c.flush()
    elif compression_type == COMPRESSION_ZSTD:
        out = _zstd_compressor().compress(data)
    else:
        raise UnsupportedFeatureError(f"unknown compression type {compression_type}")
    return out if len(out) <= cluster_size - 1 else None


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=min(MAX_THREADS, os.cpu_count() or 1),
                                       thread_name_prefix="dirtybits-compress")
        return _pool


def compress_clusters(chunks: list[Buffer], compression_type: int,
                      cluster_size: int) -> Iterator[bytes | None]:
    """``compress_cluster`` of each chunk, in order, computed in parallel when there are
    several: the caller stores the first while the pool compresses the next ones."""
    if len(chunks) <= 1 or (os.cpu_count() or 1) == 1:
        return (compress_cluster(c, compression_type, cluster_size) for c in chunks)
    return _executor().map(
        lambda c: compress_cluster(c, compression_type, cluster_size), chunks)
