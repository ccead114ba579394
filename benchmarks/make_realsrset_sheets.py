"""Full-size RealSRSet comparison sheets: bicubic | each embedded BlindDiff model | RealESRGAN-x4plus (stage 1).

    python benchmarks/make_realsrset_sheets.py --restorer realesrgan_x4plus.safetensors \
        --photos Lincoln oldphoto2 comic1 chip --out docs/images

Each photo is processed uncropped with each model's own defaults (seed 0; the denoiser tiled to the default
3 GiB budget, as ``blindsr sr`` does) and written as ``realsrset_<photo>.png`` (one row, every panel at the
output size). Prints the time of every model on every photo.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from blindsr.degradations.operators import imresize  # noqa: E402
from blindsr.io.images import read_image  # noqa: E402
from blindsr.io.visual import contact_sheet  # noqa: E402
from blindsr.methods.blinddiff import load_pipeline  # noqa: E402
from blindsr.weights import DEFAULT_MODEL, EMBEDDED, embedded_path  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photos", nargs="+", default=["Lincoln", "oldphoto2", "comic1", "chip"])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "real-lr" / "RealSRSet"))
    ap.add_argument("--models", nargs="+", default=list(EMBEDDED)[::-1], help="embedded model names")
    ap.add_argument("--restorer", help="an x4 RRDBNet checkpoint (the converted RealESRGAN-x4plus)")
    ap.add_argument("--budget-gib", type=float, default=3.0, help="sampling memory budget (tiles)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "docs" / "images"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    pipes = {m: load_pipeline(embedded_path(m)) for m in args.models}
    net = None
    if args.restorer:
        from blindsr.models.restorers import load_restorer, restore_tiled

        net = load_restorer("realesrgan", args.restorer)
    for photo in args.photos:
        lr = read_image(Path(args.data) / f"{photo}.png")[:3][None]
        panels, labels = [imresize(lr, scale=4).clamp(0, 1)[0]], ["bicubic x4"]
        for name, pipe in pipes.items():
            t0 = time.perf_counter()
            sr = pipe(lr, generator=torch.Generator().manual_seed(0), max_memory=int(args.budget_gib * 2**30)).sr
            print(f"{photo} {tuple(lr.shape[-2:])}: {name} {time.perf_counter() - t0:.1f} s", flush=True)
            panels.append(sr[0])
            labels.append(name + (" (default)" if name == DEFAULT_MODEL else ""))
        if net is not None:
            with torch.no_grad():
                panels.append(restore_tiled(net, lr, tile=256, overlap=32)[0].clamp(0, 1))
            labels.append("RealESRGAN-x4plus (DiffBIR stage 1)")
        path = Path(args.out) / f"realsrset_{photo}.png"
        contact_sheet(panels, labels, path, overwrite=True)
        print(f"wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
