"""Issue 12's measurement: does a degradation learnt by UDDM from a camera's unpaired LR photos train a better SR
network for that camera than the usual synthetic pipelines? (Paper Tables 1 and 2, in miniature.)

    python benchmarks/uddm_protocol.py --camera phone --root runs/uddm_bench            # every stage, resumable
    python benchmarks/uddm_protocol.py --camera phone --root runs/uddm_bench --stage eval

Protocol (nothing is tuned on what is evaluated):
1. ``data``: ``../shared/data/train-hr`` (180 photos) is split into two disjoint halves by sorted index: the even
   ones go through the simulated camera (``benchmarks/cameras.py``) and become the unpaired "real LR" photos; the
   odd ones are the clean HR images that the degradations turn into pairs. Test: Set5 + Set14 through the same
   camera, with their HR as ground truth.
2. ``fit``: ``blindsr uddm fit`` on (real LR, HR half) with the packaged ``uddm_s.yaml`` (``--fit-minutes``).
3. ``pairs``: the HR half degraded by ``bicubic``, ``realesrgan`` (preset defaults) and the fitted UDDM at
   w = 0 (DDM only), 0.5 (UDDM) and 1 (P-DDM only). The DDM and P-DDM outputs are computed once per image and
   fused for every w (Eq. 1), so the w rows differ only in w.
4. ``train``: the same SR network (``srnet_s.yaml``: RRDBNet-S x4, L1) from the same seed for the same number of
   iterations on each pair set; and the converted RealESRGAN-x4plus fine-tuned alike on the UDDM pairs and on
   the ``realesrgan`` pairs (``--x4plus``).
5. ``eval``: PSNR / SSIM on Y, border 4, on the camera's Set5 / Set14; rows also bicubic upsampling and
   RealESRGAN-x4plus as it is. Writes ``results.json`` and ``table.md`` in the camera's folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from cameras import CAMERAS, camera_generator, capture, prepare_hr  # noqa: E402

from blindsr.data.datasets import mix_seed  # noqa: E402
from blindsr.io.images import list_images, read_image, write_image  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
CONFIGS = REPO / "src" / "blindsr" / "configs"
WS = (0.0, 0.5, 1.0)
STAGES = ("data", "fit", "pairs", "train", "eval", "sweep-s")


def pair_name(w: float) -> str:
    return f"uddm_w{w:g}"


def stage_data(cam: str, root: Path) -> None:
    files = list_images([SHARED / "train-hr"])[0]
    for f in files[1::2]:                                    # the clean HR half: pairs are made from these
        if not (root / "hr" / f"{f.stem}.png").exists():
            write_image(root / "hr" / f"{f.stem}.png", prepare_hr(read_image(f)))
    jobs = [(f, root / "real_lr", None) for f in files[0::2]]  # the other half: only its camera LR is kept
    through_camera(cam, jobs)
    make_test(cam, root / "test")
    print(f"data: {len(files[0::2])} real LR, {len(files[1::2])} HR, test Set5 + Set14 through {cam}")


def make_test(cam: str, folder: Path) -> None:
    """Set5 + Set14 through ``cam``: ``folder/<set>/lr`` and the HR ground truth ``folder/<set>/hr``."""
    through_camera(cam, [(f, folder / s / "lr", folder / s / "hr")
                         for s in ("Set5", "Set14") for f in list_images([SHARED / "val" / s])[0]])


def through_camera(cam: str, jobs: list[tuple[Path, Path, Path | None]]) -> None:
    camera = CAMERAS[cam]
    for f, lr_dir, hr_dir in jobs:
        if (lr_dir / f"{f.stem}.png").exists():
            continue
        hr = prepare_hr(read_image(f))
        write_image(lr_dir / f"{f.stem}.png", capture(hr, camera, camera_generator(cam, f.name)))
        if hr_dir is not None:
            write_image(hr_dir / f"{f.stem}.png", hr)


def stage_fit(root: Path, minutes: float, out: Path | None = None, sets: tuple[str, ...] = ()) -> None:
    from blindsr.train.config import load_config
    from blindsr.train.run import run_training

    out = out or root / "uddm"
    if (out / "final_pddm.safetensors").is_file():
        return
    cfg = load_config(CONFIGS / "uddm_s.yaml", list(sets))
    cfg.data.lr_root, cfg.data.root, cfg.output = str(root / "real_lr"), str(root / "hr"), str(out)
    cfg.train.time_limit_min = minutes
    run_training(cfg, device="cpu", resume="auto", progress=False)


def swd_to_real(root: Path, lr_images: list[torch.Tensor], seed: int = 0) -> float:
    """The sliced Wasserstein distance between 8x8 mean-removed patches of ``lr_images`` and of the real LR."""
    from blindsr.methods.uddm.report import patches, sliced_wasserstein

    real = [read_image(f) for f in list_images([root / "real_lr"])[0]]
    g = torch.Generator().manual_seed(seed)
    a, b = patches(real, 8, 32, g), patches(lr_images, 8, 32, g)
    return sliced_wasserstein(a, b, generator=torch.Generator().manual_seed(seed))


def stage_sweep_s(root: Path, args: argparse.Namespace) -> None:
    """Fig. 4b in miniature, on unpaired data only: for each s, a short fit, then the DDM's LR of the first 30
    HR images (``--ddm-steps``) against the real LR photos by SWD. Nothing here sees the test sets."""
    from blindsr.methods.uddm.ddm import condition, synthesize
    from blindsr.methods.uddm.model import load_uddm

    rows = {}
    hr_files = list_images([root / "hr"])[0][:30]
    for s in args.s_values:
        run = root / "sweep" / f"s{s}"
        stage_fit(root, args.sweep_minutes, run, (f"model.ddm.s={s}",))
        model, lrs = load_uddm(run), []
        for i, f in enumerate(hr_files):
            hr = read_image(f)[None]
            size = (hr.shape[-2] // 4, hr.shape[-1] // 4)
            g = torch.Generator().manual_seed(mix_seed(args.seed, "sweep", i))
            with torch.no_grad():
                lrs.append(synthesize(model.ddm, model.ddm_config, condition(hr, 4 * s, size), g, args.ddm_steps)[0])
        steps = sum(1 for _ in (run / "log.csv").open()) - 1
        rows[s] = swd_to_real(root, lrs)
        print(f"s = {s}: SWD(DDM LR, real LR) {rows[s]:.4f}  ({args.sweep_minutes:g} min fit, {steps} log rows)",
              flush=True)
    (root / "sweep" / "sweep_s.json").write_text(json.dumps(rows, indent=1) + "\n")


def stage_pairs(root: Path, ddm_steps: int, seed: int) -> None:
    from tqdm import tqdm

    from blindsr.degradations.pipelines import get_preset
    from blindsr.methods.uddm.ddm import condition, synthesize
    from blindsr.methods.uddm.model import fuse, load_uddm

    files = list_images([root / "hr"])[0]
    for name in ("bicubic", "realesrgan"):
        out = root / "pairs" / name
        degrade = get_preset(name)
        for i, f in enumerate(files):
            if (out / "lr" / f.name).exists():
                continue
            g = torch.Generator().manual_seed(mix_seed(seed, name, i))
            res = degrade(read_image(f)[None], g)
            write_image(out / "lr" / f.name, res.lr[0])
            write_image(out / "hr" / f.name, res.hr[0])
    model = load_uddm(root / "uddm")
    parts = root / "pairs" / "parts"
    for i, f in enumerate(tqdm(files, desc="DDM + P-DDM", unit="img")):
        if (parts / "pddm" / f.name).exists():
            continue
        hr = read_image(f)[None]
        g = torch.Generator().manual_seed(mix_seed(seed, "uddm", i))
        size = (hr.shape[-2] // model.scale, hr.shape[-1] // model.scale)
        with torch.no_grad():
            ddm = synthesize(model.ddm, model.ddm_config, condition(hr, model.scale * model.ddm_config.s, size),
                             g, ddm_steps)
            pddm = model.pddm(hr, g)
        write_image(parts / "ddm" / f.name, ddm[0])
        write_image(parts / "pddm" / f.name, pddm[0])
    for w in WS:  # Eq. 1 on the stored (8-bit) parts, so every w sees the same DDM / P-DDM samples
        out = root / "pairs" / pair_name(w)
        for f in files:
            if not (out / "lr" / f.name).exists():
                lr = fuse(read_image(parts / "ddm" / f.name), read_image(parts / "pddm" / f.name), w).clamp(0, 1)
                write_image(out / "lr" / f.name, lr)
                write_image(out / "hr" / f.name, read_image(f))
    print(f"pairs: {len(files)} HR images x {2 + len(WS)} degradations ({ddm_steps} DDM steps)")


def srnet_runs(args: argparse.Namespace) -> dict[str, tuple[str, list[str]]]:
    """run name -> (pairs folder name, config overrides)."""
    runs = {n: (n, []) for n in ("bicubic", "realesrgan", *map(pair_name, WS))}
    if args.x4plus:  # fine-tuned alike on UDDM pairs and, as the control, on the `realesrgan` preset's pairs
        ft = ["model.preset=full", f"model.init={args.x4plus}", "optim.lr=2.0e-5", f"data.batch_size={args.ft_batch}",
              f"train.max_steps={args.ft_steps}"]
        runs["x4plus_ft_uddm"] = (pair_name(0.5), ft)
        runs["x4plus_ft_realesrgan"] = ("realesrgan", ft)
    return runs


def stage_train(root: Path, args: argparse.Namespace, only: list[str]) -> None:
    from blindsr.train.config import load_config
    from blindsr.train.run import run_training

    for run, (pairs, extra) in srnet_runs(args).items():
        out = root / "srnet" / run
        if (only and run not in only) or (out / "final.safetensors").is_file():
            continue
        sets = [f"data.root={root / 'pairs' / pairs / 'hr'}", f"data.lr_root={root / 'pairs' / pairs / 'lr'}",
                f"output={out}", f"train.max_steps={args.steps}", "train.time_limit_min=600", *extra]
        t0 = time.time()
        run_training(load_config(CONFIGS / "srnet_s.yaml", sets), device="cpu", resume="auto", progress=False)
        print(f"train {run}: {time.time() - t0:.0f} s")


def stage_eval(root: Path, args: argparse.Namespace, cam: str) -> dict:
    from blindsr.degradations.operators import imresize
    from blindsr.methods.srnet.pipeline import load_pipeline
    from blindsr.metrics import psnr, ssim

    models = {"bicubic upsampling": None}
    if args.x4plus:
        models["RealESRGAN-x4plus (as is)"] = args.x4plus
    labels = {"bicubic": "SRNet-S on bicubic pairs", "realesrgan": "SRNet-S on realesrgan pairs",
              pair_name(0): "SRNet-S on DDM-only pairs (w = 0)", pair_name(0.5): "SRNet-S on UDDM pairs (w = 0.5)",
              pair_name(1): "SRNet-S on P-DDM-only pairs (w = 1)", "x4plus_ft_uddm": "RealESRGAN-x4plus fine-tuned on UDDM pairs",
              "x4plus_ft_realesrgan": "RealESRGAN-x4plus fine-tuned on realesrgan pairs"}
    for run in srnet_runs(args):
        f = root / "srnet" / run / "final.safetensors"
        if args.weights == "raw":  # the trained weights themselves at the last step, not their EMA
            f = root / "srnet" / run / "checkpoints" / f"step_{args.ft_steps if run.startswith('x4plus_ft') else args.steps:09d}" / "model.safetensors"
        if f.is_file():
            models[labels[run]] = str(f)
    swd = {}
    for run, (pairs, _) in srnet_runs(args).items():
        lr_dir = root / "pairs" / pairs / "lr"
        if lr_dir.is_dir() and labels[run] in models and pairs not in swd:
            swd[pairs] = swd_to_real(root, [read_image(f) for f in list_images([lr_dir])[0]])
    tests = {"Set5": root / "test" / "Set5", "Set14": root / "test" / "Set14"}
    for other in args.test_cameras:  # the same models on another camera's photos: what generalises
        if other != cam:
            make_test(other, root / f"test_{other}")
            tests.update({f"Set5 ({other})": root / f"test_{other}" / "Set5",
                          f"Set14 ({other})": root / f"test_{other}" / "Set14"})
    done = json.loads((root / "results.json").read_text()) if (root / "results.json").is_file() else {}
    results = {}
    for label, ckpt in models.items():
        if set(done.get(label, {})) == set(tests) and not args.fresh:  # measured before (results.json)
            results[label] = {k: tuple(v) for k, v in done[label].items()}
            continue
        pipe = None if ckpt is None else load_pipeline(ckpt)
        row = {}
        for s, folder in tests.items():
            ps, ss = [], []
            for f in list_images([folder / "lr"])[0]:
                lr, hr = read_image(f)[None], read_image(folder / "hr" / f.name)[None]
                sr = imresize(lr, scale=4).clamp(0, 1) if pipe is None else pipe(lr).sr
                ps.append(psnr(sr[0], hr[0], crop_border=4, y_channel=True))
                ss.append(ssim(sr[0], hr[0], crop_border=4, y_channel=True))
            row[s] = (sum(ps) / len(ps), sum(ss) / len(ss))
        results[label] = row
        print(f"{label:48s} " + "  ".join(f"{s} {p:.2f} / {q:.4f}" for s, (p, q) in row.items()), flush=True)
    lines = [f"camera `{cam}` (benchmarks/cameras.py), x4, PSNR / SSIM on Y, border 4; SRNet-S rows: "
             f"{args.steps} iterations each, same seed, {args.weights} weights; SWD: the pairs' LR vs the camera's real LR photos (8x8 "
             "patches, lower = closer)", "", "| SR model | " + " | ".join(tests) + " | SWD of its training LR |",
             "|---|" + "---|" * (len(tests) + 1)]
    pair_of = {labels[r]: p for r, (p, _) in srnet_runs(args).items()}
    for k, v in results.items():
        d = f"{swd[pair_of[k]]:.4f}" if k in pair_of and pair_of[k] in swd else "-"
        lines.append(f"| {k} | " + " | ".join(f"{v[t][0]:.2f} / {v[t][1]:.4f}" for t in tests) + f" | {d} |")
    results["swd"] = swd
    (root / "table.md").write_text("\n".join(lines) + "\n")
    (root / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--camera", required=True, choices=sorted(CAMERAS))
    ap.add_argument("--root", type=Path, default=REPO / "runs" / "uddm_bench")
    ap.add_argument("--stage", choices=("all", *STAGES), default="all")
    ap.add_argument("--fit-minutes", type=float, default=40.0)
    ap.add_argument("--fit-set", action="append", default=[], metavar="KEY=VALUE",
                    help="fit: a uddm_s.yaml override (e.g. model.ddm.s=2)")
    ap.add_argument("--ddm-steps", type=int, default=25, help="DDM sampling steps for the pairs (paper: 200)")
    ap.add_argument("--steps", type=int, default=1000, help="SRNet-S iterations per pair set")
    ap.add_argument("--x4plus", help="the converted RealESRGAN-x4plus safetensors (rows 'as is' and fine-tuned)")
    ap.add_argument("--ft-steps", type=int, default=150, help="fine-tuning iterations of RealESRGAN-x4plus")
    ap.add_argument("--ft-batch", type=int, default=2)
    ap.add_argument("--only", nargs="*", default=[], help="train only these runs")
    ap.add_argument("--test-cameras", nargs="*", default=[], choices=sorted(CAMERAS),
                    help="eval: also test on these cameras' Set5 / Set14 (models trained for --camera)")
    ap.add_argument("--s-values", type=int, nargs="+", default=[2, 4, 8], help="sweep-s: the s to try")
    ap.add_argument("--sweep-minutes", type=float, default=8.0, help="sweep-s: fit time per s")
    ap.add_argument("--weights", choices=("ema", "raw"), default="ema",
                    help="eval: the runs' final.safetensors (EMA) or their raw weights at the last step")
    ap.add_argument("--fresh", action="store_true", help="eval: measure every row again (default: reuse "
                    "results.json rows measured on the same test sets)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    root = args.root / args.camera
    stages = STAGES[:5] if args.stage == "all" else (args.stage,)
    t0 = time.time()
    for st in stages:
        t = time.time()
        if st == "data":
            stage_data(args.camera, root)
        elif st == "fit":
            stage_fit(root, args.fit_minutes, sets=tuple(args.fit_set))
        elif st == "pairs":
            stage_pairs(root, args.ddm_steps, args.seed)
        elif st == "train":
            stage_train(root, args, args.only)
        elif st == "sweep-s":
            stage_sweep_s(root, args)
        else:
            stage_eval(root, args, args.camera)
        print(f"[{st}] {time.time() - t:.0f} s", flush=True)
    print(f"total {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
