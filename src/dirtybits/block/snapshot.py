"""Internal snapshots of an image by name: what ``dirtybits snapshot`` (qemu-img snapshot) does.

Each call opens the image as qemu-img would for that action (read-only and shareable with
``force_share`` to list, read-write and exclusively locked to change), does one thing and
closes it. Formats without internal snapshots (raw) answer as QEMU's raw driver does: an
empty list, and a refusal for everything else.

Persistent bitmaps are left as they are by create and delete: neither changes what the guest
reads. Apply changes it, so (as QEMU 7.2) it is refused while the image has persistent
bitmaps; a resilient-mode write-intent map is dropped (its autoclear bit cleared), since the
data it guards changed outside it.
"""

from __future__ import annotations

import errno
import logging

from dirtybits.errors import ImageError
from dirtybits.format.qcow2.header import AUTOCLEAR_WRITE_INTENT
from dirtybits.format.qcow2.snapshot import SnapshotTableEntry
from dirtybits.qcow2 import snapshots
from dirtybits.qcow2.image import Qcow2Image
from dirtybits.qcow2.snapshots import SnapshotError

log = logging.getLogger(__name__)


def _open(path: str, *, readonly: bool, force_share: bool = False) -> Qcow2Image | None:
    """The image as qcow2, or None when it is another format (raw: no snapshots)."""
    from dirtybits.block.children import open_qcow2
    from dirtybits.block.open import probe_format

    if probe_format(path, writable=not readonly) != "qcow2":
        return None
    # the bitmaps stay as they are: only apply changes guest data, and it refuses them
    return open_qcow2(path, readonly=readonly, keep_bitmaps=True, force_share=force_share)


def list_snapshots(path: str, *, force_share: bool = False) -> list[SnapshotTableEntry]:
    """The image's snapshots in table order (QEMU lists none for an external data file).

    Raises ImageError (the image can't be opened), FormatError (an unreadable table).
    """
    img = _open(path, readonly=True, force_share=force_share)
    if img is None:
        return []
    with img:
        return [] if img.has_data_file else img.snapshots


def create_snapshot(path: str, name: str) -> SnapshotTableEntry:
    """Take snapshot ``name`` (names need not be unique; IDs are). Raises SnapshotError
    (``errno`` as QEMU's: EOPNOTSUPP for raw or a data file, EINVAL for a refcount overflow,
    EFBIG for too many snapshots), ImageError."""
    img = _open(path, readonly=False)
    if img is None:
        raise SnapshotError("Operation not supported", errno=errno.EOPNOTSUPP)
    with img:
        return img.snapshot_create(name)


def apply_snapshot(path: str, id_or_name: str) -> None:
    """Revert the disk to the snapshot with this ID, else this name. Raises SnapshotError
    (not found, bitmaps present, raw), ImageError."""
    img = _open(path, readonly=False)
    if img is None:
        raise SnapshotError("Block driver does not support snapshots", errno=errno.ENOTSUP)
    with img:
        index = snapshots.find(img, id_or_name)
        if index < 0:
            raise SnapshotError("Failed to load snapshot: No such file or directory",
                                errno=errno.ENOENT)
        if not snapshots.has_bitmaps(img) and (img.hc.header.autoclear_features
                                               & AUTOCLEAR_WRITE_INTENT):
            log.info("%s: dropping the write-intent map: applying snapshot %s changes "
                     "the data it guards", path, id_or_name)
            img.update_header(autoclear_clear=AUTOCLEAR_WRITE_INTENT)
        try:
            img.snapshot_apply(index)
        except SnapshotError:
            raise
        except ImageError as exc:
            raise SnapshotError(f"Failed to load snapshot: {exc}", errno=errno.EIO) from exc


def delete_snapshot(path: str, name: str) -> None:
    """Delete the first snapshot named ``name`` (qemu-img -d matches names only). Raises
    SnapshotError ("snapshot not found"), ImageError."""
    img = _open(path, readonly=False)
    if img is None:
        raise SnapshotError("snapshot not found", errno=errno.ENOENT)
    with img:
        index = snapshots.find_by_name(img, name)
        if index < 0:
            raise SnapshotError("snapshot not found", errno=errno.ENOENT)
        img.snapshot_delete(index)


def load_snapshot(driver: object, *, snapshot_id: str | None = None,
                  name: str | None = None, id_or_name: str | None = None) -> None:
    """Show a snapshot instead of the active state in a read-only image (``convert -l``).

    ``snapshot_id`` and/or ``name`` must all match (QEMU's find_snapshot_by_id_and_name);
    ``id_or_name`` tries the ID, then the name (bdrv_snapshot_load_tmp_by_id_or_name).
    Raises SnapshotError (not found; a format without snapshots), UsageError (writable).
    """
    if not isinstance(driver, Qcow2Image):
        fmt = getattr(driver, "format_name", "raw")
        raise SnapshotError(f"Block format '{fmt}' used by device '' does not support "
                            "temporarily loading internal snapshots", errno=errno.ENOTSUP)
    entries = driver.snapshots
    if id_or_name is not None:
        index = next((i for i, s in enumerate(entries) if s.id_str == id_or_name), -1)
        if index < 0:
            index = snapshots.find_by_name(driver, id_or_name)
    else:
        index = next((i for i, s in enumerate(entries)
                      if (snapshot_id is None or s.id_str == snapshot_id)
                      and (name is None or s.name == name)
                      and (snapshot_id is not None or name is not None)), -1)
    if index < 0:
        raise SnapshotError("Can't find snapshot", errno=errno.ENOENT)
    log.debug("%s: showing snapshot %s read-only", driver.path, entries[index].id_str)
    driver.snapshot_load(index)
