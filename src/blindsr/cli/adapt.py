"""``blindsr adapt``: an SR model for YOUR camera from its LR photos alone (UDDM, issue 12), in three steps.

    blindsr adapt --real-lr my_photos/ --hr clean_hr/ -o my_model/
    blindsr sr --ckpt my_model/srnet/final.safetensors photo.png -o out/      (the method is read from the file)

1. ``my_model/uddm``   learn the camera's degradation (= ``blindsr uddm fit``; about 40 min on 2 CPU cores)
2. ``my_model/pairs``  degrade the HR images like the camera does (= ``blindsr degrade --preset uddm``)
3. ``my_model/srnet``  train an SR network on those pairs (= ``blindsr train srnet``; about 15 min)
4. ``my_model/report`` real vs synthetic LR side by side, their patch distributions (PCA -> t-SNE, with the
   Real-ESRGAN degradation of the same HR images for comparison) and a distance that needs no network (SWD).
Every step is resumable: run the same command again and finished steps are skipped.
"""

from __future__ import annotations

import argparse
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def register(subparsers, help_: str) -> None:
    from blindsr.cli.common import add_common

    p = subparsers.add_parser("adapt", help=help_, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real-lr", required=True, type=Path, help="folder of the camera's LR photos")
    p.add_argument("--hr", required=True, type=Path, help="folder of clean HR images to degrade and learn from")
    p.add_argument("-o", "--output", required=True, type=Path, help="model folder")
    p.add_argument("--w", type=float, default=0.5, help="fusion weight of Eq. 1 (0 = DDM only, 1 = P-DDM only)")
    p.add_argument("--steps", type=int, default=25, help="DDM sampling steps for the pairs (paper: 200)")
    p.add_argument("--fit-minutes", type=float, default=40.0, help="time for step 1")
    p.add_argument("--srnet-minutes", type=float, default=15.0, help="time for step 3")
    p.add_argument("--fit-set", action="append", default=[], metavar="KEY=VALUE", help="step 1 config override")
    p.add_argument("--srnet-set", action="append", default=[], metavar="KEY=VALUE", help="step 3 config override")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from blindsr.cli.main import main as cli
    from blindsr.errors import BlindSRError
    from blindsr.train.config import load_config
    from blindsr.train.run import run_training

    for flag, folder in (("--real-lr", args.real_lr), ("--hr", args.hr)):
        if not folder.is_dir():
            raise BlindSRError(f"{flag} {folder}: not a folder")
    if not 0 <= args.w <= 1:
        raise BlindSRError(f"--w must be in [0, 1], got {args.w}")
    out = args.output
    progress = not args.no_progress
    fit = out / "uddm"
    if not (fit / "final_pddm.safetensors").is_file():
        cfg = load_config(CONFIGS / "uddm_s.yaml", args.fit_set)
        cfg.data.lr_root, cfg.data.root, cfg.output = str(args.real_lr), str(args.hr), str(fit)
        cfg.train.time_limit_min = args.fit_minutes
        print(f"blindsr adapt: 1/4 learning the degradation -> {fit}")
        run_training(cfg, device=args.device, resume="auto", progress=progress)
    pairs = out / "pairs"
    if not (pairs / "preset.json").is_file():
        print(f"blindsr adapt: 2/4 degrading {args.hr} -> {pairs}")
        rc = cli(["degrade", "--preset", "uddm", "--set", f"ckpt={fit}", "--set", f"w={args.w}", "--set",
                  f"steps={args.steps}", "--input", str(args.hr), "--output", str(pairs), "--seed", str(args.seed),
                  "--device", args.device, "--overwrite"])
        if rc:
            raise BlindSRError(f"degrading {args.hr} failed (see above)")
    srnet = out / "srnet"
    if not (srnet / "final.safetensors").is_file():
        cfg = load_config(CONFIGS / "srnet_s.yaml", args.srnet_set)
        cfg.data.root, cfg.data.lr_root, cfg.output = str(pairs / "hr"), str(pairs / "lr"), str(srnet)
        cfg.train.time_limit_min = args.srnet_minutes
        print(f"blindsr adapt: 3/4 training the SR network -> {srnet}")
        run_training(cfg, device=args.device, resume="auto", progress=progress)
    print(f"blindsr adapt: 4/4 report -> {out / 'report'}")
    swd = _report(args, pairs, out / "report")
    (out / "adapt.json").write_text(json.dumps({"real_lr": str(args.real_lr), "hr": str(args.hr), "w": args.w,
                                                "steps": args.steps, "swd": swd}, indent=1) + "\n")
    print(f"done: blindsr sr --ckpt {srnet / 'final.safetensors'} PHOTO -o OUT   "
          f"(SWD to your photos: " + ", ".join(f"{k} {v:.4f}" for k, v in swd.items()) + ")")
    return 0


def _report(args: argparse.Namespace, pairs: Path, out: Path) -> dict[str, float]:
    import torch

    from blindsr.data.datasets import mix_seed
    from blindsr.degradations.pipelines import get_preset
    from blindsr.io.images import list_images, read_image
    from blindsr.methods.uddm.report import make_report

    real = [read_image(f) for f in list_images([args.real_lr])[0][:64]]
    synthetic = [read_image(f) for f in list_images([pairs / "lr"])[0][:64]]
    degrade, base = get_preset("realesrgan"), []
    for i, f in enumerate(list_images([pairs / "hr"])[0][:64]):
        g = torch.Generator().manual_seed(mix_seed(args.seed, "adapt-baseline", i))
        base.append(degrade(read_image(f)[None], g).lr[0])
    return make_report(real, synthetic, base, out, args.seed)
