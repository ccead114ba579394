"""DiffBIR's pixel backend on the real RealSRSet photos at full size (issue 14): stage 1 only | two-stage s = 0 |
two-stage s = 1, time and peak memory per image, and one comparison sheet.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/realsrset_diffbir_pixel.py --steps 15 --tile-overlap 64
    ... --photos chip comic1        # a subset (the default: every photo, smallest first)
    ... --sheet-only                # only (re)build the sheet and the table from what is done

Every (photo, mode) is one ``blindsr restore`` process, as a user runs it (the embedded SwinIR-S, IRControlNet
and Prior-S; seed 0; the CLI's automatic tiling), so its wall time includes start-up and its peak RSS is its own
(``os.wait4``). Outputs and logs go to ``--out`` (``<mode>/<photo>.png``, ignored by git); the measurements to
``--record`` (``<mode>/<photo>.json``, committed, so the table survives a fresh clone). A recorded pair is skipped,
so the run resumes, and two processes may share the work with disjoint ``--photos``. The sheet shows,
per photo, a 1:1 centre crop of each output (full frames are far too large to commit); the table is Markdown.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

MODES = {"stage1": ["--stage1-only"], "s0": ["--guidance-scale", "0"], "s1": ["--guidance-scale", "1"]}
LABELS = {"stage1": "stage 1 (SwinIR-S)", "s0": "two-stage, s = 0", "s1": "two-stage, s = 1"}


def photos_by_size(data: Path) -> list[str]:
    from PIL import Image

    area = {f.stem: math.prod(Image.open(f).size) for f in data.glob("*.png")}
    return sorted(area, key=lambda stem: (area[stem], stem))


def run_one(photo: Path, mode: str, out: Path, extra: list[str]) -> dict:
    """One ``blindsr restore`` process; its wall time and its own peak RSS."""
    (out / mode).mkdir(parents=True, exist_ok=True)
    cmd = [str(REPO / ".venv" / "bin" / "blindsr"), "restore", str(photo), "-o", str(out / mode), "--seed", "0",
           "--overwrite", *MODES[mode], *([] if mode == "stage1" else extra)]
    t0 = time.perf_counter()
    with open(out / mode / f"{photo.stem}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed; see {out / mode / photo.stem}.log")
    from PIL import Image

    w, h = Image.open(photo).size
    return {"photo": photo.stem, "mode": mode, "input": [w, h], "output": [4 * w, 4 * h], "wall_s": round(wall, 1),
            "peak_rss_gib": round(usage.ru_maxrss / 2**20, 3), "command": " ".join(cmd[1:]),
            "threads": os.environ.get("OMP_NUM_THREADS", "default")}


def rows(record: Path) -> list[dict]:
    found = [json.loads(p.read_text()) for mode in MODES for p in sorted((record / mode).glob("*.json"))]
    return sorted(found, key=lambda r: (r["output"][0] * r["output"][1], r["photo"], list(MODES).index(r["mode"])))


def table(record: Path) -> str:
    by_photo: dict[str, dict[str, dict]] = {}
    for r in rows(record):
        by_photo.setdefault(r["photo"], {})[r["mode"]] = r
    lines = ["| photo | input → output | " + " | ".join(f"{LABELS[m]}: s / GiB" for m in MODES) + " |",
             "|---|---|" + "---|" * len(MODES)]
    for photo, rs in by_photo.items():
        r0 = next(iter(rs.values()))
        cells = [f"{rs[m]['wall_s']:.0f} / {rs[m]['peak_rss_gib']:.2f}" if m in rs else "–" for m in MODES]
        lines.append(f"| {photo} | {r0['input'][0]}×{r0['input'][1]} → {r0['output'][0]}×{r0['output'][1]} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def sheet(out: Path, record: Path, data: Path, path: Path, crop: int) -> int:
    """One row per recorded photo: the nearest-upscaled input, then each mode's 1:1 centre crop. Written only when
    every recorded photo's outputs are in ``out`` (a fresh clone has the records, not the outputs: keep the sheet)."""
    import torch.nn.functional as F

    from blindsr.data.datasets import centre_crop
    from blindsr.io.images import read_image
    from blindsr.io.visual import contact_grid

    order = list(dict.fromkeys(r["photo"] for r in rows(record)))  # smallest first, each photo once
    if not order or not all((out / m / f"{p}.png").exists() for p in order for m in MODES):
        return 0
    panels, labels = [], []
    for p in order:
        lr = read_image(data / f"{p}.png")[:3]
        up = F.interpolate(lr[None], scale_factor=4, mode="nearest")[0]
        panels.append([centre_crop(up, crop)] + [centre_crop(read_image(out / m / f"{p}.png")[:3], crop) for m in MODES])
        labels.append([f"{p} {lr.shape[-1]}x{lr.shape[-2]} (nearest x4)"] + [LABELS[m] for m in MODES])
    contact_grid(panels, labels, path, height=crop, overwrite=True)
    return len(order)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "real-lr" / "RealSRSet")
    ap.add_argument("--photos", nargs="+", help="photo stems (default: all, smallest first)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--steps", type=int, help="DDPM steps (default: the pixel preset's 25)")
    ap.add_argument("--tile-overlap", type=int, help="diffusion tile overlap in px (default: the preset's 128)")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "realsrset_diffbir_pixel")
    ap.add_argument("--record", type=Path, default=REPO / "docs" / "results" / "realsrset_diffbir_pixel")
    ap.add_argument("--sheet", type=Path, default=REPO / "docs" / "images" / "diffbir_pixel_realsrset.jpg")
    ap.add_argument("--crop", type=int, default=192, help="side of each panel's 1:1 centre crop")
    ap.add_argument("--sheet-only", action="store_true")
    args = ap.parse_args(argv)

    from blindsr.io.images import atomic_write

    extra = (["--steps", str(args.steps)] if args.steps else []) + \
        (["--tile-overlap", str(args.tile_overlap)] if args.tile_overlap is not None else [])
    if not args.sheet_only:
        for name in args.photos or photos_by_size(args.data):
            photo = args.data / f"{name}.png"
            for mode in args.modes:
                rec = args.record / mode / f"{name}.json"
                if rec.exists():
                    continue
                r = run_one(photo, mode, args.out, extra)
                r["settings"] = extra
                with atomic_write(rec, "w") as f:
                    json.dump(r, f, indent=1)
                print(f"{name} {mode}: {r['wall_s']} s, {r['peak_rss_gib']} GiB", flush=True)
    n = sheet(args.out, args.record, args.data, args.sheet, args.crop)
    print(table(args.record))
    print(f"sheet: {args.sheet} ({n} photos)" if n else f"sheet: kept ({args.sheet}); not every recorded output is in "
          f"{args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
