"""Evaluate BlindDiff-S (and baselines) on Set5/Set14 degraded with the Gaussian8 kernels (x4).

Regenerates the table in docs/results.md:

    python benchmarks/eval_gaussian8.py --json docs/results.json --md docs/results_full.md

(sampler and steps default to the checkpoint's: for the shipped BlindDiff-S 3 DDPM steps; one H100 ran the table in
about 3 minutes; on 2 CPU cores Set5 with bicubic, regression and the lambda=0 row took 614 s, --chunk 8.)

Rows: bicubic (MATLAB imresize x4), the regression baseline (same backbone, L1), BlindDiff-S with lambda=0,
lambda=1 (kernel-aware gradient, Algorithm 2) applied per step as in the official code, lambda=1 scaled by
500/steps (the same total pull as the official 500-step sampler; best for the stage-1 eps model), and the bicubic-based
gradient (identity kernel, the paper's ablation, λ=1 per step like the shipped default). Columns: PSNR/SSIM on Y (BT.601), border 4, per kernel width and mean. For the BlindDiff rows also
the kernel estimate's L1 error sum|k_hat - k| and the "LR consistency" PSNR (the SR output re-degraded with the
estimated kernel, compared with the input LR, as in the paper's Fig. 7).
Each image's 8 kernels run as one batch, each sample with its own seeded generator.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from blindsr.degradations import operators as O  # noqa: E402
from blindsr.degradations.kernels import GAUSSIAN8_SIGMAS  # noqa: E402
from blindsr.degradations.pipelines import get_preset  # noqa: E402
from blindsr.device import resolve_device  # noqa: E402
from blindsr.io.images import list_images, read_image, write_bytes_atomic  # noqa: E402
from blindsr.methods.blinddiff import degrade, load_pipeline  # noqa: E402
from blindsr.metrics import psnr, ssim  # noqa: E402

VARIANTS = {  # name -> (BlindDiffPipeline keyword arguments, BlindDiffConfig overrides)
    "BlindDiff-S, λ=0": (dict(lam=0.0), {}),
    "BlindDiff-S, λ=1 per step (official rule, shipped default)": (dict(lam=1.0), dict(lam_ref_steps=None)),
    "BlindDiff-S, λ=1 × 500/steps (lam_ref_steps 500)": (dict(lam=1.0), dict(lam_ref_steps=500)),
    "BlindDiff-S, bicubic-based gradient (λ=1 per step)": (dict(lam=1.0, kernel_mode="bicubic"),
                                                           dict(lam_ref_steps=None)),
}


def mean(xs):
    return sum(xs) / len(xs)


def evaluate(args, on_image_done=None) -> dict:
    device = resolve_device(args.device)
    shared = Path(args.data)
    g8 = get_preset("gaussian8")
    bd = load_pipeline(args.ckpt, device=device)
    base_cfg = bd.config
    args.steps = args.steps or base_cfg.sample_steps  # recorded in the results as run
    args.sampler = args.sampler or base_cfg.sampler
    reg = None
    if args.reg_ckpt:
        from blindsr.io.weights import load_into, load_safetensors_metadata, load_state_dict
        from blindsr.methods.blinddiff.regression import RegressionPipeline
        from blindsr.models.mcformer import MCFormer, MCFormerConfig

        meta = json.loads(load_safetensors_metadata(args.reg_ckpt)["config"])
        model = MCFormer(MCFormerConfig.from_official(meta["model"]))
        load_into(model, load_state_dict(args.reg_ckpt))
        reg = RegressionPipeline(model.to(device))
    # acc[method][f"{set}:{metric}"][kernel j] -> values over the set's images
    acc: dict[str, dict[str, list[list[float]]]] = {}

    def add(method: str, key: str, j: int, value: float) -> None:
        acc.setdefault(method, {}).setdefault(key, [[] for _ in GAUSSIAN8_SIGMAS])[j].append(value)

    timing: dict[str, list[float]] = {}
    raw: dict = {"per_image": {}, "seconds": {}}  # per image, so that runs over disjoint images can be merged
    for set_name in args.sets:
        files, _ = list_images([shared / "val" / set_name])
        order = list(enumerate(files))
        if args.images:  # a subset, in the given order; an image keeps its index (its seeds) in the full set
            by_name = {f.stem: (i, f) for i, f in order}
            order = [by_name[n] for n in args.images if n in by_name]
        for i, f in order:
            res = g8(read_image(f)[None])  # (8, 3, H, W): kernel j of this image at index j
            lr, hr8, kernels = res.lr, res.hr, res.kernel
            outs = {"bicubic": O.imresize(lr, scale=4).clamp(0, 1)}
            if reg is not None:
                outs["regression baseline (same backbone, L1)"] = reg(lr.to(device)).sr.cpu()
            est = {}
            for name, (kw, over) in VARIANTS.items():
                if args.variants and not any(v in name for v in args.variants):
                    continue
                bd.config = dataclasses.replace(base_cfg, **over)
                srs, ks = [], []
                t0 = time.perf_counter()
                for c in range(0, 8, args.chunk):  # chunks of the 8 kernels; results do not depend on the chunking
                    gens = [torch.Generator(device).manual_seed(args.seed * 1000003 + 1009 * i + j)
                            for j in range(c, min(c + args.chunk, 8))]
                    out = bd(lr[c:c + args.chunk].to(device), steps=args.steps, generator=gens,
                             sampler=args.sampler, kernel_estimate=args.kernel_estimate, **kw)
                    srs.append(out.sr.cpu())
                    ks.append(out.kernel.cpu())
                timing.setdefault(name, []).append(time.perf_counter() - t0)
                raw["seconds"].setdefault(name, {})[f"{set_name}/{f.stem}"] = timing[name][-1]
                outs[name], est[name] = torch.cat(srs), torch.cat(ks)
            for name, sr in outs.items():
                for j in range(8):
                    add(name, f"{set_name}:psnr", j, psnr(sr[j], hr8[j], crop_border=4, y_channel=True))
                    add(name, f"{set_name}:ssim", j, ssim(sr[j], hr8[j], crop_border=4, y_channel=True))
                    if name in est:
                        k = est[name][j]
                        add(name, f"{set_name}:kernel_l1", j, float((k - kernels[j]).abs().sum()))
                        re = degrade(sr[j:j + 1], k[None], 4).clamp(0, 1)[0]
                        add(name, f"{set_name}:lr_consistency", j, psnr(re, lr[j], y_channel=True))
            for name in outs:
                for key, per_k in acc[name].items():
                    if key.startswith(f"{set_name}:"):
                        raw["per_image"].setdefault(name, {}).setdefault(key, {})[f.stem] = [v[-1] for v in per_k]
            print(f"{set_name}/{f.name}: " + ", ".join(
                f"{n} {mean([acc[n][f'{set_name}:psnr'][j][-1] for j in range(8)]):.2f}" for n in outs), flush=True)
            if on_image_done is not None:  # partial results survive an interrupted run
                on_image_done(summary(acc, timing, raw, device, args))
    return summary(acc, timing, raw, device, args)


def summary(acc, timing, raw, device, args) -> dict:
    per_set = {m: {key: [mean(v) for v in per_k] for key, per_k in d.items()} for m, d in acc.items()}
    return {"per_set": per_set, "sigmas": list(GAUSSIAN8_SIGMAS), "steps": args.steps, "seed": args.seed,
            "sampler": args.sampler, "kernel_estimate": args.kernel_estimate,
            "device": str(device), "ckpt": str(args.ckpt or "default"),
            "seconds_per_image_8_kernels": {k: mean(v) for k, v in timing.items()}, "raw": raw}


def merge(results: list[dict]) -> dict:
    """Combine result dicts of parallel runs (same steps/seed); a row computed twice must give the same numbers.

    Files with per-image records ("raw") are merged image by image, so runs may split a set's images between
    them (--images); a set's row then averages the union of its images."""
    keys = ("steps", "seed", "sigmas", "sampler", "kernel_estimate", "ckpt")
    if any(r.get(k) != results[0].get(k) for r in results for k in keys):
        raise SystemExit("merge: the files differ in checkpoint, steps, seed, kernels, sampler or kernel estimate")
    if all("raw" in r for r in results):
        return merge_raw(results)
    out = dict(results[0], per_set={}, seconds_per_image_8_kernels={}, total_seconds=0.0)
    for r in results:
        for method, d in r["per_set"].items():
            row = out["per_set"].setdefault(method, {})
            for key, vals in d.items():
                if key in row and max(abs(a - b) for a, b in zip(row[key], vals, strict=True)) > 1e-3:
                    raise SystemExit(f"merge: {method} {key} differs between files")
                row[key] = vals
        out["seconds_per_image_8_kernels"].update(r.get("seconds_per_image_8_kernels", {}))
        out["total_seconds"] = max(out["total_seconds"], r.get("total_seconds", 0.0))
    return out


def merge_raw(results: list[dict]) -> dict:
    per_image: dict = {}
    seconds: dict = {}
    for r in results:
        for method, d in r["raw"]["per_image"].items():
            for key, images in d.items():
                row = per_image.setdefault(method, {}).setdefault(key, {})
                for image, vals in images.items():
                    if image in row and max(abs(a - b) for a, b in zip(row[image], vals, strict=True)) > 1e-3:
                        raise SystemExit(f"merge: {method} {key} {image} differs between files")
                    row[image] = vals
        for method, d in r["raw"]["seconds"].items():
            seconds.setdefault(method, {}).update(d)
    per_set = {m: {key: [mean([v[j] for v in images.values()]) for j in range(len(results[0]["sigmas"]))]
                   for key, images in d.items()} for m, d in per_image.items()}
    images = {m: {key: sorted(im) for key, im in d.items() if key.endswith(":psnr")} for m, d in per_image.items()}
    return dict(results[0], per_set=per_set, images=images,
                seconds_per_image_8_kernels={m: mean(list(d.values())) for m, d in seconds.items()},
                total_seconds=sum(r.get("total_seconds", 0.0) for r in results),
                raw={"per_image": per_image, "seconds": seconds})


def to_markdown(r: dict, sets: list[str]) -> str:
    sig = " | ".join(f"σ={s:.1f}" for s in r["sigmas"])
    lines = []
    for set_name in sets:
        lines += [f"### {set_name}-Gaussian8 (x4): PSNR (dB) / SSIM, Y channel, border 4", "",
                  f"| method | {sig} | mean PSNR | mean SSIM |", "|---|" + "---|" * (len(r["sigmas"]) + 2)]
        for name, d in r["per_set"].items():
            if f"{set_name}:psnr" not in d:  # a row that was not run on this set
                continue
            p, s = d[f"{set_name}:psnr"], d[f"{set_name}:ssim"]
            lines.append(f"| {name} | " + " | ".join(f"{a:.2f}/{b:.4f}" for a, b in zip(p, s, strict=True))
                         + f" | **{mean(p):.2f}** | {mean(s):.4f} |")
        lines += ["", f"Kernel estimate and LR consistency ({set_name}): mean over the 8 kernels", "",
                  "| method | kernel L1 error sum\\|k̂−k\\| | LR-consistency PSNR (dB) |", "|---|---|---|"]
        for name, d in r["per_set"].items():
            if f"{set_name}:kernel_l1" in d:
                lines.append(f"| {name} | {mean(d[f'{set_name}:kernel_l1']):.4f} | "
                             f"{mean(d[f'{set_name}:lr_consistency']):.2f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default=None, help="BlindDiff checkpoint (default: the embedded BlindDiff-S)")
    ap.add_argument("--reg-ckpt", default=str(REPO / "benchmarks/weights/regression_s.safetensors"),
                    help="regression-baseline checkpoint ('' to skip)")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="the shared data folder")
    ap.add_argument("--sets", nargs="+", default=["Set5", "Set14"])
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the checkpoint's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sampler", default=None, help="ddpm | ddim (default: the checkpoint's)")
    ap.add_argument("--variants", nargs="*", default=None,
                    help="only the BlindDiff rows whose name contains one of these (e.g. 'λ=0'); default all")
    ap.add_argument("--kernel-estimate", default="fit", choices=["fit", "model"],
                    help="the kernel scored: fit (shipped, since session 14) or model (MCFormer's last step; what "
                         "every table before session 14 scored)")
    ap.add_argument("--images", nargs="+", default=None, metavar="STEM",
                    help="only these images (file stems, e.g. barbara monarch), in this order; each keeps its seeds. "
                         "Runs over disjoint images can be combined with --merge")
    ap.add_argument("--chunk", type=int, default=4, help="kernels per batch (memory: lambda>0 backpropagates)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", default=None, help="write the raw results here")
    ap.add_argument("--md", default=None, help="write the Markdown tables here")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="only combine these result files (e.g. one per set or variant, run in parallel) into "
                         "--json/--md; rows present in several files must agree")
    args = ap.parse_args()
    if args.merge:
        r = merge([json.loads(Path(p).read_text()) for p in args.merge])
        if args.json:
            write_bytes_atomic(args.json, (json.dumps(r, indent=1) + "\n").encode())
        md = to_markdown(r, [s for s in args.sets if any(f"{s}:psnr" in d for d in r["per_set"].values())])
        if args.md:
            write_bytes_atomic(args.md, (md + "\n").encode())
        print(md)
        return
    if args.reg_ckpt and not Path(args.reg_ckpt).is_file():
        print(f"note: no regression baseline at {args.reg_ckpt}; skipping that row", file=sys.stderr)
        args.reg_ckpt = None
    t0 = time.perf_counter()

    def save(r: dict) -> None:
        r["total_seconds"] = time.perf_counter() - t0
        sets = [s for s in args.sets if any(f"{s}:psnr" in d for d in r["per_set"].values())]
        if args.json:
            write_bytes_atomic(args.json, (json.dumps(r, indent=1) + "\n").encode())
        if args.md:
            write_bytes_atomic(args.md, (to_markdown(r, sets) + "\n").encode())

    r = evaluate(args, on_image_done=save)
    save(r)
    md = to_markdown(r, args.sets)
    print(md)
    print(f"total {r['total_seconds']:.0f} s on {r['device']}")


if __name__ == "__main__":
    main()
