"""``dirtybits bitmap --png FILE.png IMAGE NAME``: a picture of a dirty bitmap.

The disk is drawn as a grid of cells, row by row from the top left, each cell a run of
consecutive bytes of the disk. A clean cell is grey; a cell with dirty bytes is coloured from
light orange (a little dirty) to dark red (all dirty). Below the grid a legend gives the disk
size, granularity, dirty bytes and percentage, and the bytes one cell stands for.

Cells hold a power-of-two number of bits, at most ``MAX_CELLS`` cells in all, so a cell's dirty
fraction is one numpy reduction over popcounts of whole 64-bit words (or over unpacked bits
for a disk with fewer bits than cells): a 16 TiB bitmap at 64 KiB (4 Mi words) costs tens of
milliseconds, never a per-bit Python loop. Pillow is imported only here, only when drawing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from dirtybits.cli.info import size_to_str
from dirtybits.errors import ImageIOError
from dirtybits.qcow2.info import dirty_percent

if TYPE_CHECKING:
    from dirtybits.bitmap.dirty_bitmap import DirtyBitmap

COLUMNS = 256  # cells per row of a big disk
MAX_CELLS = COLUMNS * 256
GRID_PX = 768  # the grid's width in pixels at most (cells are square, >= 3 px)
MARGIN = 12
CLEAN = (190, 190, 190)
LIGHT = (255, 180, 80)  # a cell with one dirty granule
DARK = (170, 0, 0)  # a fully dirty cell
BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)


@dataclass(frozen=True)
class Layout:
    """Where the cells are: cell ``i`` is at column ``i % columns``, row ``i // columns``."""

    bits_per_cell: int
    cell_bytes: int
    cells: int
    columns: int
    rows: int
    cell_px: int
    grid_x: int
    grid_y: int
    width: int
    height: int
    legend_y: int

    def cell_box(self, i: int) -> tuple[int, int, int, int]:
        """Pixel box (left, top, right, bottom; exclusive) of cell ``i``."""
        x = self.grid_x + (i % self.columns) * self.cell_px
        y = self.grid_y + (i // self.columns) * self.cell_px
        return x, y, x + self.cell_px, y + self.cell_px


def plan_grid(bits: int, granularity: int) -> tuple[int, int, int, int]:
    """(bits per cell, cells, columns, rows) for a bitmap of ``bits`` bits."""
    per = 1
    while -(-bits // per) > MAX_CELLS:
        per <<= 1
    cells = max(1, -(-bits // per))
    # A grid about four times wider than tall: up to COLUMNS wide, fewer (bigger) cells for
    # a small disk so that it does not become one thin strip.
    columns = 16
    while columns < COLUMNS and columns * columns < 4 * cells:
        columns <<= 1
    columns = min(columns, cells)
    return per, cells, columns, -(-cells // columns)


def cell_dirty_bits(words: Any, bits: int, per: int, cells: int) -> Any:
    """Dirty bits in each cell of ``per`` bits (``words``: the bitmap's LE uint64 words)."""
    if per >= 64:
        wpc = per // 64
        out = np.zeros(cells, dtype=np.uint64)
        step = max(1, (1 << 20) // wpc)  # cells per block: ~1 Mi words of temporaries
        for c0 in range(0, cells, step):
            block = words[c0 * wpc:min(len(words), (c0 + step) * wpc)]
            counts = _popcounts(block)
            full = len(block) // wpc
            out[c0:c0 + full] = counts[:full * wpc].reshape(full, wpc).sum(axis=1,
                                                                           dtype=np.uint64)
            if len(block) % wpc:
                out[c0 + full] = counts[full * wpc:].sum(dtype=np.uint64)
        return out
    flat = np.unpackbits(words.view(np.uint8), bitorder="little")[:bits]
    padded = np.zeros(cells * per, dtype=np.uint8)
    padded[:len(flat)] = flat
    return padded.reshape(cells, per).sum(axis=1, dtype=np.uint64)


def _popcounts(words: Any) -> Any:
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(words)
    bits = np.unpackbits(words.view(np.uint8))  # pragma: no cover - numpy < 2.0
    return bits.reshape(-1, 64).sum(axis=1, dtype=np.uint64)  # pragma: no cover


def cell_colours(dirty: Any, bits: int, per: int, cells: int) -> Any:
    """RGB (uint8, shape (cells, 3)): grey when clean, LIGHT..DARK by the dirty fraction."""
    capacity = np.full(cells, per, dtype=np.float64)
    capacity[-1] = bits - (cells - 1) * per
    frac = dirty.astype(np.float64) / capacity
    light, dark = np.array(LIGHT, dtype=np.float64), np.array(DARK, dtype=np.float64)
    rgb = light + (dark - light) * frac[:, None]
    rgb[dirty == 0] = CLEAN
    return np.rint(rgb).astype(np.uint8)


def dirty_bytes(bm: DirtyBitmap) -> int:
    """Dirty granules x granularity, a last granule past the disk end clipped to it."""
    total = bm.count()
    if bm.size and bm.get(bm.size - 1):
        total -= bm.bits * bm.granularity - bm.size
    return total


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def render_png(bm: DirtyBitmap, path: str, *, title: str) -> Layout:
    """Draw ``bm`` into a PNG at ``path``; returns where the cells are."""
    from PIL import Image, ImageDraw

    bits = bm.bits
    per, cells, columns, rows = plan_grid(bits, bm.granularity)
    words = np.frombuffer(bm.to_bytes(), dtype="<u8")
    dirty = cell_dirty_bits(words, bits, per, cells)
    rgb = cell_colours(dirty, bits, per, cells) if bits else np.zeros((1, 3), np.uint8)
    cell_px = max(3, min(24, GRID_PX // columns))

    count = dirty_bytes(bm)
    size = bm.size
    cell_bytes = per * bm.granularity
    lines = [
        title,
        f"disk size: {size_to_str(size)} ({size} bytes)    granularity: "
        f"{size_to_str(bm.granularity)} ({bm.granularity} bytes)",
        f"dirty: {size_to_str(count)} ({count} bytes, {dirty_percent(count, size)}%)",
        f"one cell: {size_to_str(cell_bytes)} ({cell_bytes} bytes); {cells} cells, "
        f"{columns} per row, left to right and top to bottom from offset 0",
    ]
    font = _font(14)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = max(int(probe.textbbox((0, 0), "Ag", font=font)[3]), 10) + 6
    text_w = max(int(probe.textlength(line, font=font)) for line in lines)
    key_w = 420
    grid_w, grid_h = columns * cell_px, rows * cell_px
    width = max(grid_w, text_w, key_w) + 2 * MARGIN
    legend_y = MARGIN + grid_h + MARGIN
    height = legend_y + line_h * len(lines) + 8 + 16 + MARGIN

    canvas = Image.new("RGB", (width, height), BACKGROUND)
    grid = np.empty((rows * columns, 3), dtype=np.uint8)
    grid[:] = BACKGROUND
    grid[:len(rgb)] = rgb
    cells_img = Image.fromarray(grid.reshape(rows, columns, 3), "RGB")
    canvas.paste(cells_img.resize((grid_w, grid_h), Image.Resampling.NEAREST),
                 (MARGIN, MARGIN))
    draw = ImageDraw.Draw(canvas)
    y = legend_y
    for line in lines:
        draw.text((MARGIN, y), line, fill=TEXT, font=font)
        y += line_h
    # Colour key: clean, then the ramp from one dirty granule to a fully dirty cell.
    y += 4
    draw.rectangle((MARGIN, y, MARGIN + 15, y + 15), fill=CLEAN, outline=TEXT)
    draw.text((MARGIN + 22, y), "clean", fill=TEXT, font=font)
    x0 = MARGIN + 90
    for k in range(100):
        t = k / 99
        colour = tuple(round(a + (b - a) * t) for a, b in zip(LIGHT, DARK, strict=True))
        draw.line((x0 + k, y, x0 + k, y + 15), fill=colour)
    draw.text((x0 + 108, y), "partly dirty -> all dirty", fill=TEXT, font=font)
    try:
        canvas.save(path, format="PNG")
    except OSError as exc:
        raise ImageIOError(f"Could not write '{path}': {exc.strerror or exc}") from exc
    return Layout(per, cell_bytes, cells, columns, rows, cell_px, MARGIN, MARGIN, width,
                  height, legend_y)
