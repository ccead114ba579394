"""How close each fitted P-DDM alone comes to the real LR photos: the sliced Wasserstein distance between 8x8
mean-removed patches of P-DDM's LR of the HR images and of the real LR (the `adapt` report's distance, no network).

    .venv/bin/python benchmarks/uddm_pddm_swd.py runs/adapt_realsrset/uddm runs/adapt_realsrset_full/uddm \
        --real-lr ../shared/data/real-lr/RealSRSet --hr runs/uddm_bench/phone/hr

Image i is degraded with a generator seeded i, the patches are drawn with seed 0, so runs compare alike.
``--lr-dirs``: the same distance for folders of synthetic LR (e.g. ``blindsr degrade --preset uddm --set w=0``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from blindsr.io.images import list_images, read_image  # noqa: E402
from blindsr.methods.uddm.model import load_uddm  # noqa: E402
from blindsr.methods.uddm.report import patches, sliced_wasserstein  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*", help="UDDM run folders (blindsr uddm fit / adapt's uddm/)")
    ap.add_argument("--lr-dirs", nargs="*", default=[], type=Path, metavar="DIR",
                    help="also: folders of synthetic LR (a `blindsr degrade` output: its lr/), same distance")
    ap.add_argument("--real-lr", type=Path, required=True)
    ap.add_argument("--hr", type=Path, required=True)
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)

    real = [read_image(f)[:3] for f in list_images([args.real_lr])[0]]
    hr = [read_image(f)[:3] for f in list_images([args.hr])[0]]
    ref = patches(real, generator=torch.Generator().manual_seed(0))

    def swd_to_real(lrs) -> float:  # the same patch draw and projections for every set
        got = patches(lrs, generator=torch.Generator().manual_seed(0))
        return float(sliced_wasserstein(got, ref, generator=torch.Generator().manual_seed(0)))

    for run in args.runs:
        pddm = load_uddm(run).pddm
        lrs = [pddm(h[None], torch.Generator().manual_seed(i))[0].clamp(0, 1) for i, h in enumerate(hr)]
        print(f"{run}: P-DDM alone, SWD to the real LR {swd_to_real(lrs):.4f} ({len(hr)} HR images, "
              f"{len(real)} real LR)")
    for d in args.lr_dirs:
        lrs = [read_image(f)[:3] for f in list_images([d / "lr" if (d / "lr").is_dir() else d])[0]]
        print(f"{d}: SWD to the real LR {swd_to_real(lrs):.4f} ({len(lrs)} LR images, {len(real)} real LR)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
