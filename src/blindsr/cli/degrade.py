"""``blindsr degrade``: synthesise LR images from HR images with a named degradation preset.

Writes, under --output:
  lr/NAME.png         the degraded image (sub-folders of a --recursive input are kept)
  hr/NAME.png         the HR it pairs with (modcropped to the scale; USM-sharpened for realesrgan/stablesr)
  kernels/NAME.png    with --save-kernels: a picture of the (first) blur kernel, and NAME.npy with its taps
  manifest.jsonl      one JSON line per written LR: names, sizes, per-image seed, drawn parameters
  preset.json         the preset's name and full config
For gaussian8 without --kernel-index, every image is degraded with all 8 kernels and each kernel gets its own
folder: sig1.8/{lr,hr,kernels}/NAME.png ... sig3.2/...; manifest.jsonl stays at the top.

Reproducibility: image NAME is degraded with its own CPU generator seeded from (--seed, NAME), so its result
does not depend on which other images are processed or their order (across devices it agrees up to
floating-point rounding, which can flip an 8-bit level).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from blindsr.cli.common import add_common, check_unique_outputs, collect_inputs, run_batch
from blindsr.registry import names


def register(subparsers, help_: str) -> None:
    p = subparsers.add_parser("degrade", help=help_, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True, metavar="NAME", help="one of: " + ", ".join(names("preset")))
    p.add_argument("--input", required=True, nargs="+", type=Path, help="HR image file(s) or folder(s)")
    p.add_argument("--output", required=True, type=Path, help="output folder")
    p.add_argument("--scale", type=int, help="override the preset's scale (default: the preset's, usually 4)")
    p.add_argument("--kernel-index", type=int, metavar="K",
                   help="gaussian8 only: use kernel K (0..7, sigma 1.8 + 0.2K) instead of all 8")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any preset config field (VALUE as YAML or JSON, e.g. noise_max=15 or "
                        "jpeg_range=[50,95]); repeatable")
    p.add_argument("--ckpt", metavar="RUN", help="uddm only: the `blindsr uddm fit` run folder (= --set ckpt=RUN)")
    p.add_argument("--w", type=float, metavar="W", help="uddm only: Eq. 1's fusion weight (= --set w=W; default 0.5)")
    p.add_argument("--recursive", action="store_true", help="descend into sub-folders of input folders")
    p.add_argument("--save-kernels", action="store_true", help="also write kernels/NAME.png and NAME.npy")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    add_common(p)
    p.set_defaults(func=run)


def image_seed(seed: int, name: str) -> int:
    """The per-image seed: a hash of (seed, relative name), independent of batch and order."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _parse_overrides(items: list[str]) -> dict:
    """``--set KEY=VALUE`` items (VALUE parsed as YAML, so JSON works too) as preset config overrides."""
    from blindsr.config import apply_overrides
    from blindsr.errors import BlindSRError

    out = apply_overrides({}, list(items))
    nested = sorted(k for k, v in out.items() if isinstance(v, dict))
    if nested:
        raise BlindSRError(f"--set {nested[0]}.…: preset options are flat (KEY=VALUE)")
    return {k.replace("-", "_"): v for k, v in out.items()}


def build_degradation(args):
    """The configured preset from the command-line arguments (errors are BlindSRError)."""
    from blindsr.degradations.pipelines import get_preset, preset_config
    from blindsr.errors import BlindSRError

    overrides = _parse_overrides(args.overrides)
    cfg = preset_config(args.preset)  # unknown preset -> error listing the valid ones
    if args.scale is not None:
        if not hasattr(cfg, "scale"):
            raise BlindSRError(f"--scale: preset {args.preset} keeps the image size (it has no scale)")
        overrides["scale"] = args.scale
    for flag, key in (("--ckpt", "ckpt"), ("--w", "w")):
        value = getattr(args, key)
        if value is not None:
            if args.preset != "uddm":
                raise BlindSRError(f"{flag} applies to --preset uddm only")
            overrides[key] = value
    if args.kernel_index is not None:
        if args.preset != "gaussian8":
            raise BlindSRError("--kernel-index applies to --preset gaussian8 only")
        overrides["kernel_index"] = args.kernel_index
    return get_preset(args.preset, **overrides)


def run(args) -> int:
    import torch
    from tqdm import tqdm

    from blindsr.degradations.pipelines import config_dict
    from blindsr.device import resolve_device
    from blindsr.errors import BlindSRError
    from blindsr.io.images import (
        atomic_write,
        check_output_folder,
        check_output_path,
        load_image,
        output_name,
    )

    deg = build_degradation(args)
    device = resolve_device(args.device)
    files = [f for f, _ in collect_inputs(args.input, recursive=args.recursive)]
    if not files:
        raise BlindSRError(f"no images found in {', '.join(map(str, args.input))}")
    out = check_output_folder(args.output, files, option="--output")
    manifest, preset_json = out / "manifest.jsonl", out / "preset.json"
    for path in (manifest, preset_json):
        check_output_path(path, overwrite=args.overwrite, inputs=files)
    roots = {f: next((r for r in args.input if r.is_dir() and _is_under(f, r)), None) for f in files}
    names = {f: output_name(f, roots[f], suffix=".png").as_posix() for f in files}
    check_unique_outputs({f: out / "lr" / names[f] for f in files})  # ok.bmp + ok.jpg -> lr/ok.png
    all_sigmas = args.preset == "gaussian8" and deg.config.kernel_index is None
    records: list[dict] = []
    bar = tqdm(total=len(files), desc="degrade", unit="img", disable=None)
    deg.progress = not bar.disable  # a preset's own per-image bar (uddm: its reverse diffusion)

    def process(path: Path) -> None:
        name = names[path]
        seed = image_seed(args.seed, name)
        img = load_image(path)
        hr = img.rgb.unsqueeze(0).to(device)
        try:
            with torch.no_grad():
                res = deg(hr, torch.Generator().manual_seed(seed))
        except BlindSRError as e:  # the preset's message names no file (e.g. "image (0, 0) is smaller ...")
            raise BlindSRError(f"{path} ({img.width}x{img.height}): {e}") from None
        recs = []
        for i, params in enumerate(res.params):
            sub = out / f"sig{params['sigma']:.1f}" if all_sigmas else out
            rec = {"name": name, "input": str(path), "seed": seed, "lr": _write(sub / "lr" / name, res.lr[i], out),
                   "hr": _write(sub / "hr" / name, res.hr[i], out, img.bit_depth),
                   "lr_size": list(res.lr.shape[-2:]), "hr_size": list(res.hr.shape[-2:]), "params": params}
            if args.save_kernels and res.kernel is not None:
                rec["kernel"] = _write_kernel(sub / "kernels" / name, res.kernel[i], out)
            recs.append(rec)
        records.extend(recs)
        bar.update(1)

    def _write(path: Path, t, root: Path, bit_depth: int = 8) -> str:
        from blindsr.io.images import write_image

        write_image(path, t.float().cpu(), bit_depth=bit_depth, overwrite=args.overwrite, inputs=files)
        return path.relative_to(root).as_posix()

    def _write_kernel(path: Path, k, root: Path) -> str:
        from blindsr.io.visual import save_kernel

        for p in (path, path.with_suffix(".npy")):
            check_output_path(p, overwrite=args.overwrite, inputs=files)
        save_kernel(k.float().cpu(), path, also_npy=True, overwrite=args.overwrite)
        return path.relative_to(root).as_posix()

    try:
        rc = run_batch(files, process, name=str)
    finally:
        bar.close()
    if records:
        with atomic_write(manifest, "w", overwrite=args.overwrite, inputs=files) as f:
            for rec in records:
                f.write(json.dumps({"preset": deg.name, **rec}) + "\n")
        with atomic_write(preset_json, "w", overwrite=args.overwrite, inputs=files) as f:
            json.dump({"preset": deg.name, "seed": args.seed, "config": config_dict(deg)}, f, indent=2)
        print(f"wrote {len(records)} LR image(s) for {len({r['name'] for r in records})} input(s) to {out}")
    return rc


def _is_under(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False
