"""A sweep as one labelled picture, the way people know an X/Y plot: rows = strengths (with
the steps that ran), columns = seeds (or targets, side by side), the source as the first
column; each tile with its P(target) badge and, when curated, a green frame and a tick.
A sweep too wide for the page (all other classes, many seeds) wraps into bands stacked
top to bottom, each with its own column labels and the source again, so the picture stays
at most :data:`MAX_WIDTH` px wide and its tiles keep their size where the app shows it.

The app shows this picture and maps a click on it back to a tile (:func:`cell_at`); the
same picture is the grid PNG offered for download. Plain PIL, no Gradio.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

LABEL_W = 96      # px: the row-label column
HEAD_H = 34       # px: the column-label row
GAP = 6           # px between tiles
BORDER = 3        # px: the frame of a curated tile
CURATED = (22, 163, 74)
PLAIN = (209, 213, 219)
MAX_WIDTH = 860   # px: wider sweeps wrap into bands (the app shows the grid about 800 px wide: tiles >= 120 px)


def tile_size(resolution: int) -> int:
    """Displayed tile side: small worlds enlarged by a whole factor to about 128 px (crisp pixels),
    large images shown at 192 px (the inspector shows the full image)."""
    if resolution <= 128:
        return resolution * max(1, round(128 / resolution))
    return 192


@dataclass(frozen=True)
class GridLayout:
    """Where every tile of a sweep sits; rows and columns in display order. The rows run band
    after band (``band_rows`` each: one per strength); each band has its own column labels."""

    rows: tuple[str, ...]                       # row labels ("s 0.50", "13/25 steps"), band after band
    bands: tuple[tuple[str, ...], ...]          # column labels of each band; the first is "source" when there is one
    cells: tuple[tuple[str | None, ...], ...]   # record id per (row, column); None on the source column
    tile: int                                   # tile side in px
    has_source: bool
    band_rows: int                              # rows per band

    @property
    def columns(self) -> tuple[str, ...]:
        """The column labels of the first band."""
        return self.bands[0] if self.bands else ()

    @property
    def size(self) -> tuple[int, int]:
        n_cols, n_rows = max((len(b) for b in self.bands), default=0), len(self.rows)
        return (LABEL_W + n_cols * (self.tile + GAP) + GAP,
                len(self.bands) * HEAD_H + n_rows * (self.tile + GAP) + GAP)

    def band_top(self, band: int) -> int:
        """The top of a band's column-label strip."""
        return band * (HEAD_H + self.band_rows * (self.tile + GAP))

    def box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of a tile in the picture."""
        band, r = divmod(row, self.band_rows)
        x = LABEL_W + GAP + col * (self.tile + GAP)
        y = self.band_top(band) + HEAD_H + GAP + r * (self.tile + GAP)
        return x, y, x + self.tile, y + self.tile

    def center(self, row: int, col: int) -> tuple[int, int]:
        left, top, right, bottom = self.box(row, col)
        return (left + right) // 2, (top + bottom) // 2

    def without_source(self) -> GridLayout:
        """The same grid with the source column dropped (its image is not there)."""
        if not self.has_source:
            return self
        return GridLayout(self.rows, tuple(b[1:] for b in self.bands), tuple(c[1:] for c in self.cells),
                          self.tile, False, self.band_rows)


def screen_point(grid: GridLayout, row: int, col: int, rect: tuple[float, float, float, float]) -> tuple[float, float]:
    """Where the centre of tile (row, col) shows on screen when the grid picture is drawn into
    ``rect`` = (left, top, width, height), scaled to fit and centred (CSS object-fit: contain, as
    Gradio shows it and maps a click back to picture pixels). Browser tests and docs/screenshot.py
    click tiles through this."""
    left, top, width, height = rect
    natural_w, natural_h = grid.size
    scale = max(natural_w / width, natural_h / height)
    x, y = grid.center(row, col)
    return left + (width - natural_w / scale) / 2 + x / scale, top + (height - natural_h / scale) / 2 + y / scale


def _row_label(records: Sequence[dict], strength: float) -> str:
    rec = next(r for r in records if r["strength"] == strength)
    return f"s {strength:.2f}\n{rec.get('steps_run', '?')}/{rec.get('num_inference_steps', '?')} steps"


def layout(records: Sequence[dict], resolution: int,
           column: Callable[[dict], str] | None = None, block: Callable[[dict], str] | None = None) -> GridLayout:
    """Rows: strengths in ascending order. Columns: (target, seed) in the sweep's order,
    labelled by what differs (seed, target or both); the source first when there is one.
    ``block`` (record -> label, e.g. its strategy) groups the columns into one labelled block per
    label, side by side, in the records' order (a cell a block lacks stays empty).
    ``column`` (record -> label) sets other columns instead, one per label (a calibration's
    sources, each with its own source image in its records); then there is no source column.
    Columns beyond what :data:`MAX_WIDTH` holds wrap into further bands (:func:`band_width`)."""
    strengths = sorted({r["strength"] for r in records})
    rows = tuple(_row_label(records, s) for s in strengths)
    if column is not None:
        by_col = {(r["strength"], column(r)): r["id"] for r in records}
        labels = list(dict.fromkeys(column(r) for r in records))
        cells = tuple(tuple(by_col.get((s, c)) for c in labels) for s in strengths)
        return GridLayout(rows, (tuple(labels),), cells, tile_size(resolution), False, len(strengths))
    key = block or (lambda r: "")
    columns = list(dict.fromkeys((key(r), r["target_class"], r["seed"]) for r in records))
    targets = {t for _, t, _ in columns}
    seeds = {s for _, _, s in columns}

    def col_label(name: str, target: str, seed: int) -> str:
        text = f"seed {seed}" if len(targets) == 1 else f"-> {target}" + (f", seed {seed}" if len(seeds) > 1 else "")
        return f"{name} · {text}" if name else text

    by_key = {(r["strength"], key(r), r["target_class"], r["seed"]): r for r in records}
    has_source = any(r.get("source_path") for r in records)
    tile = tile_size(resolution)
    width = band_width(len(columns), len(seeds), tile, has_source)
    lead = [None] if has_source else []
    row_labels, cells, bands = [], [], []
    for start in range(0, len(columns), width):
        band = columns[start:start + width]
        bands.append(tuple((["source"] if has_source else []) + [col_label(*c) for c in band]))
        row_labels += rows
        for s in strengths:
            cells.append(tuple(lead + [by_key[(s, *c)]["id"] if (s, *c) in by_key else None for c in band]))
    return GridLayout(tuple(row_labels), tuple(bands), tuple(cells), tile, has_source, len(strengths))


def band_width(n_columns: int, seeds_per_target: int, tile: int, has_source: bool) -> int:
    """How many (target, seed) columns one band holds: as many as fit in :data:`MAX_WIDTH` beside
    the labels and the source (at least one), whole targets (all their seeds) where that fits."""
    fit = max(1, (MAX_WIDTH - LABEL_W - GAP) // (tile + GAP) - (1 if has_source else 0))
    if n_columns <= fit:
        return max(1, n_columns)
    return fit - fit % seeds_per_target if seeds_per_target <= fit else fit


def cell_at(grid: GridLayout, x: float, y: float) -> tuple[int, int] | None:
    """(row, column) of the tile under picture pixel (x, y); None between tiles or on labels."""
    for row, cells in enumerate(grid.cells):
        for col in range(len(cells)):
            left, top, right, bottom = grid.box(row, col)
            if left <= x < right and top <= y < bottom:
                return row, col
    return None


def _font(size: int):
    try:
        return ImageFont.load_default(size)
    except TypeError:   # Pillow < 10.1
        return ImageFont.load_default()


def _fit(image: Image.Image, side: int) -> Image.Image:
    image = image.convert("RGB")
    resample = Image.NEAREST if side >= max(image.size) else Image.LANCZOS
    scale = side / max(image.size)
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    canvas = Image.new("RGB", (side, side), (243, 244, 246))
    canvas.paste(image.resize((w, h), resample), ((side - w) // 2, (side - h) // 2))
    return canvas


def render(records: Sequence[dict], load: Callable[[dict], Image.Image], source: Image.Image | None,
           resolution: int, curated: set[str] = frozenset(), title: str = "",
           min_p_target: float = 0.5, column: Callable[[dict], str] | None = None,
           block: Callable[[dict], str] | None = None) -> tuple[Image.Image, GridLayout]:
    """The labelled grid picture of a sweep and its layout.

    Args:
        records: the sweep's records (translate.make_record, with ``scores`` when scored).
        load: record -> its image.
        source: the source image (first column), None for text-to-image sweeps.
        resolution: the model resolution (sets the tile size).
        curated: ids shown framed and ticked.
        title: written in the top-left corner (e.g. "owl -> duck").
        min_p_target: a P(target) badge is green at or above this, red below.
        column: record -> column label, instead of (target, seed) columns (see :func:`layout`).
        block: record -> block label: one labelled block of columns per label (see :func:`layout`).
    """
    grid = layout(records, resolution, column, block)
    if source is None:
        grid = grid.without_source()
    by_id = {r["id"]: r for r in records}
    picture = Image.new("RGB", grid.size, "white")
    draw = ImageDraw.Draw(picture)
    small, bold = _font(12), _font(14)
    draw.text((6, 8), title, fill=(17, 24, 39), font=bold)
    for band, labels in enumerate(grid.bands):
        top = grid.band_top(band)
        if band:
            draw.line([(6, top + 4), (grid.size[0] - 6, top + 4)], fill=PLAIN, width=1)
        for col, label in enumerate(labels):
            left, _, right, _ = grid.box(band * grid.band_rows, col)
            draw.text(((left + right) // 2, top + HEAD_H - 8), label, fill=(55, 65, 81), font=small, anchor="ms")
    source_tile = _fit(source, grid.tile) if source is not None else None
    for row, label in enumerate(grid.rows):
        _, top, _, bottom = grid.box(row, 0)
        draw.multiline_text((8, (top + bottom) // 2), label, fill=(17, 24, 39), font=small, anchor="lm", spacing=4)
        for col, rid in enumerate(grid.cells[row]):
            left, top, right, bottom = grid.box(row, col)
            if rid is None:
                if source_tile is not None and grid.has_source and col == 0:
                    picture.paste(source_tile, (left, top))
                continue
            rec = by_id[rid]
            picture.paste(_fit(load(rec), grid.tile), (left, top))
            _badge(draw, rec, (left, top, right, bottom), small, min_p_target)
            on = rid in curated
            draw.rectangle((left - BORDER, top - BORDER, right + BORDER - 1, bottom + BORDER - 1),
                           outline=CURATED if on else PLAIN, width=BORDER if on else 1)
            if on:
                draw.ellipse((right - 20, top + 3, right - 3, top + 20), fill=CURATED)
                draw.line([(right - 16, top + 12), (right - 13, top + 16), (right - 7, top + 7)], fill="white",
                          width=2)
    return picture, grid


def _badge(draw: ImageDraw.ImageDraw, rec: dict, box: tuple[int, int, int, int], font, bar: float) -> None:
    """P(target) (else CLIP(target)) in the tile's bottom-left corner."""
    sc = rec.get("scores") or {}
    if sc.get("p_target") is not None:
        text, good = f"P {sc['p_target']:.2f}", sc["p_target"] >= bar
    elif sc.get("clip_target") is not None:
        text, good = f"CLIP {sc['clip_target']:.2f}", None
    else:
        return
    left, _, _, bottom = box
    tw = draw.textlength(text, font=font)
    fill = (21, 128, 61) if good else (185, 28, 28) if good is False else (55, 65, 81)
    draw.rectangle((left, bottom - 17, left + tw + 8, bottom), fill=fill)
    draw.text((left + 4, bottom - 9), text, fill="white", font=font, anchor="lm")

