"""Training logs: CSV (always), TensorBoard (when installed), and a small Pillow loss plot."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]


class CSVLog:
    """Append rows to a CSV file whose columns are fixed by the first row.

    ``truncate_after(step)`` drops rows logged after ``step`` (used on resume, so the log of a resumed run is
    the log of an uninterrupted one).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.columns: list[str] | None = None
        if self.path.is_file():
            with self.path.open(newline="") as f:
                self.columns = next(csv.reader(f), None)

    def truncate_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        rows = read_csv(self.path)
        keep = [r for r in rows if float(r.get("step", 0)) <= step]
        if self.columns:
            self._write(keep, "w")

    def log(self, row: dict[str, Any]) -> None:
        if self.columns is None:
            self.columns = list(row)
            self._write([], "w")
        extra = [k for k in row if k not in self.columns]
        if extra:  # a new column appeared: rewrite the file with the wider header
            rows = read_csv(self.path)
            self.columns += extra
            self._write(rows, "w")
        self._write([row], "a")

    def _write(self, rows: list[dict[str, Any]], mode: str) -> None:
        with self.path.open(mode, newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns, restval="")
            if mode == "w":
                w.writeheader()
            w.writerows({k: _fmt(v) for k, v in r.items()} for r in rows)


def _fmt(v: Any) -> Any:
    return repr(v) if isinstance(v, float) else v  # repr: full precision, exactly comparable


def read_csv(path: str | Path) -> list[dict[str, str]]:
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


class TensorBoard:
    """Scalars to TensorBoard when ``torch.utils.tensorboard`` works (needs the optional ``tensorboard``)."""

    def __init__(self, log_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.writer = None
        else:
            self.writer = SummaryWriter(str(log_dir))

    def log(self, row: dict[str, float], step: int, prefix: str = "train") -> None:
        if self.writer is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, int | float):
                    self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 5, 10) if m * mag >= raw), default=raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def plot_losses(csv_path: str | Path, png_path: str | Path, keys: list[str] | None = None,
                log_y: bool = True, size: tuple[int, int] = (800, 480)) -> Path:
    """Line plot of loss columns against ``step`` from a training ``log.csv``, drawn with Pillow.

    ``keys`` defaults to every column containing "loss" (plus the other loss components when present).
    With ``log_y`` (and all values positive) the y axis is log10.
    """
    from PIL import Image, ImageDraw, ImageFont

    rows = read_csv(csv_path)
    if not rows:
        raise ValueError(f"{csv_path}: no rows to plot")
    skip = {"step", "lr", "it_s", "time", "skipped"}
    keys = keys or [k for k in rows[0] if k not in skip]
    steps = [float(r["step"]) for r in rows]
    series = {k: [float(r[k]) if r.get(k) not in (None, "") else math.nan for r in rows] for k in keys}
    values = [v for s in series.values() for v in s if math.isfinite(v)]
    log_y = log_y and bool(values) and min(values) > 0
    tf = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    ys = [tf(v) for v in values] or [0.0]
    y0, y1 = min(ys), max(ys)
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5, y1 + 0.5
    x0, x1 = min(steps), max(steps) if max(steps) > min(steps) else min(steps) + 1

    w, h = size
    ml, mr, mt, mb = 70, 20, 20, 40
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    px = lambda x: ml + (x - x0) / (x1 - x0) * (w - ml - mr)  # noqa: E731
    py = lambda y: h - mb - (y - y0) / (y1 - y0) * (h - mt - mb)  # noqa: E731
    d.rectangle([ml, mt, w - mr, h - mb], outline="black")
    if not log_y:
        yticks = _nice_ticks(y0, y1)
    elif y1 - y0 >= 1:  # decades
        yticks = [float(e) for e in range(math.ceil(y0), math.floor(y1) + 1)]
    else:  # round values inside less than a decade
        yticks = [math.log10(t) for t in _nice_ticks(10 ** y0, 10 ** y1) if t > 0]
    for t in yticks:
        d.line([ml - 4, py(t), w - mr, py(t)], fill=(225, 225, 225))
        label = f"{10 ** t:.3g}" if log_y else f"{t:.3g}"
        d.text((ml - 6, py(t)), label, fill="black", font=font, anchor="rm")
    for t in _nice_ticks(x0, x1):
        d.line([px(t), h - mb, px(t), h - mb + 4], fill="black")
        d.text((px(t), h - mb + 6), f"{t:g}", fill="black", font=font, anchor="ma")
    d.text(((ml + w - mr) / 2, h - 14), "step", fill="black", font=font, anchor="ma")
    for i, (k, vals) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        pts = [(px(s), py(tf(v))) for s, v in zip(steps, vals, strict=True) if math.isfinite(v) and (v > 0 or not log_y)]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        elif pts:
            d.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=colour)
        d.text((w - mr - 8, mt + 8 + 14 * i), k, fill=colour, font=font, anchor="ra")
    png_path = Path(png_path)
    img.save(png_path)
    return png_path
