"""``blindsr eval``: score predictions against ground truth (PSNR/SSIM, optional learned metrics).

Files are paired by name: the prediction's path relative to ``--pred`` minus its extension (and minus
``--pred-suffix``, e.g. ``_x4`` or ``_SR``) must equal the ground truth's relative path minus its extension.
Prints a table (per image, then the mean over images) and writes CSV / JSON / Markdown reports atomically.

Example (x4 SR, the convention of SR papers)::

    blindsr eval --pred results/Set5 --gt data/Set5/HR --pred-suffix _x4 --crop-border 4 --y-channel \\
                 --output results/Set5_x4

--crop-border applies to every per-image metric (BlindDiff crops LPIPS too); --y-channel only to PSNR/SSIM.

Exit code: 0 when every ground truth was scored; 3 when some failed (size mismatch, unreadable) or have no
prediction; 2 when none could be scored. Predictions without a ground truth are only reported.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from pathlib import Path

from blindsr.cli.common import add_common, run_batch

PIXEL_METRICS = ("psnr", "ssim")


def register(subparsers, help_: str) -> None:
    p = subparsers.add_parser(
        "eval", help=help_, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pred", required=True, type=Path, metavar="DIR", help="folder (or one file) of predictions")
    p.add_argument("--gt", required=True, type=Path, metavar="DIR", help="folder (or one file) of ground truths")
    p.add_argument("--metrics", default="psnr,ssim", metavar="LIST",
                   help="comma list: psnr, ssim, and with blindsr[metrics]: lpips, lpips-vgg, dists, fid, niqe, "
                        "musiq, maniqa, maniqa-pipal, clipiqa, topiq_nr, topiq_fr, liqe (default: psnr,ssim)")
    p.add_argument("--crop-border", type=int, default=0, metavar="N",
                   help="pixels cropped from every side before scoring, usually = scale (default: 0)")
    p.add_argument("--y-channel", action="store_true", help="PSNR/SSIM on BT.601 limited-range Y (as SR papers)")
    p.add_argument("--pred-suffix", default="", metavar="SUFFIX", help="strip this from prediction names before pairing, e.g. _x4")
    p.add_argument("--modcrop", type=int, default=0, metavar="SCALE",
                   help="crop both images to a multiple of SCALE first (BasicSR mod_crop of the ground truth)")
    p.add_argument("--recursive", action="store_true", help="descend into subfolders (pairs by relative path)")
    p.add_argument("--output", metavar="PREFIX", help="write PREFIX.csv, PREFIX.json and PREFIX.md")
    p.add_argument("--csv", type=Path, metavar="FILE", help="write the per-image table as CSV")
    p.add_argument("--json", type=Path, metavar="FILE", help="write everything (settings, per image, mean, failures) as JSON")
    p.add_argument("--md", type=Path, metavar="FILE", help="write the table as Markdown")
    p.add_argument("--overwrite", action="store_true", help="replace existing report files")
    p.add_argument("--weights-dir", metavar="DIR", help="TORCH_HOME-like folder with hub/pyiqa, hub/checkpoints (learned metrics)")
    add_common(p, seed=False)
    p.set_defaults(func=run)


# --------------------------------------------------------------------------------------------------
# files: listing, reading, pairing


def _keys(root: Path, files, suffix: str = "") -> tuple[dict[str, Path], list[str]]:
    """Map pairing key -> file; keys shared by several files are returned as ambiguous."""
    out: dict[str, Path] = {}
    dup: set[str] = set()
    base = os.path.abspath(root)
    for f in map(Path, files):
        rel = Path(os.path.relpath(os.path.abspath(f), base))
        key = rel.with_suffix("").as_posix()
        if suffix and key.endswith(suffix):
            key = key[: -len(suffix)]
        if key in out:
            dup.add(key)
        out[key] = f
    return {k: v for k, v in out.items() if k not in dup}, sorted(dup)


def pair_files(pred: Path, gt: Path, recursive: bool = False, pred_suffix: str = ""):
    """Pairs ``[(name, pred_file, gt_file)]`` plus unpaired predictions, unpaired GTs and ambiguous names."""
    from blindsr.errors import BlindSRError

    for p, what in ((pred, "--pred"), (gt, "--gt")):
        if not p.exists():
            raise BlindSRError(f"{what} {p}: no such file or folder")
    if pred.is_file() and gt.is_file():
        return [(gt.stem, pred, gt)], [], [], []
    if pred.is_file() or gt.is_file():
        kind = {True: "file", False: "folder"}
        raise BlindSRError(f"--pred {pred} is a {kind[pred.is_file()]} but --gt {gt} is a {kind[gt.is_file()]}: "
                           "give two folders or two files")
    from blindsr.cli.common import list_inputs

    preds, dup_p = _keys(pred, list_inputs(pred, recursive), pred_suffix)
    gts, dup_g = _keys(gt, list_inputs(gt, recursive))
    pairs = [(k, preds[k], gts[k]) for k in gts if k in preds]  # in the GT folder's natural order
    if not pairs:
        raise BlindSRError(f"no prediction in {pred} matches a ground truth in {gt} by name"
                           + ("" if pred_suffix else " (names differ by a suffix? use --pred-suffix)"))
    return pairs, sorted(set(preds) - set(gts)), sorted(set(gts) - set(preds)), sorted(set(dup_p) | set(dup_g))


# --------------------------------------------------------------------------------------------------
# reports


def _finite(v):
    """JSON has no inf/nan: identical images (PSNR inf) are written as the string "inf"."""
    return v if not isinstance(v, float) or math.isfinite(v) else str(v)


def _some(names: list[str], n: int = 10) -> str:
    return ", ".join(names[:n]) + (" ..." if len(names) > n else "")


def _fmt(metric: str, v: float) -> str:
    return f"{v:.3f}" if metric == "psnr" else f"{v:.4f}"


def format_table(rows: list[dict], metrics: list[str], mean: dict[str, float], markdown: bool = False) -> str:
    header = ["image", *metrics]
    body = [[r["name"], *(_fmt(m, r[m]) for m in metrics)] for r in rows]
    body.append([f"mean ({len(rows)})", *(_fmt(m, mean[m]) for m in metrics)])
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":--"] + ["--:"] * len(metrics)) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in body[:-1]]
        lines.append("| " + " | ".join(f"**{c}**" for c in body[-1]) + " |")
        return "\n".join(lines) + "\n"
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))

    rule = "-" * len(line(header))
    return "\n".join([line(header), rule, *map(line, body[:-1]), rule, line(body[-1])]) + "\n"


def _csv_text(rows: list[dict], metrics: list[str], mean: dict[str, float]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image", *metrics])
    w.writerows([[r["name"], *(repr(r[m]) for m in metrics)] for r in rows])
    w.writerow(["mean", *(repr(mean[m]) for m in metrics)])
    return buf.getvalue()


def _report_paths(args, inputs: list[Path]) -> dict[str, Path]:
    from blindsr.errors import BlindSRError
    from blindsr.io.images import check_output_path

    if args.output and (args.csv or args.json or args.md):
        raise BlindSRError("give either --output PREFIX or --csv/--json/--md, not both")
    paths = {k: Path(f"{args.output}.{k}") for k in ("csv", "json", "md")} if args.output else {
        k: getattr(args, k) for k in ("csv", "json", "md") if getattr(args, k)}
    for p in paths.values():  # fail before scoring, not after
        check_output_path(p, overwrite=args.overwrite, inputs=inputs)
    return paths


# --------------------------------------------------------------------------------------------------
# the command


def score_pair(pred, gt, metrics: list[str], nets: dict, crop_border: int = 0, y_channel: bool = False,
               modcrop: int = 0) -> dict[str, float]:
    """Per-image scores of two (3, H, W) tensors in [0, 1]; raises BlindSRError on a size mismatch."""
    from blindsr.errors import BlindSRError
    from blindsr.metrics.psnr_ssim import psnr, ssim

    if modcrop > 1:  # BasicSR mod_crop: drop the bottom/right rows and columns beyond a multiple of the scale
        pred, gt = (x[:, : x.shape[1] - x.shape[1] % modcrop, : x.shape[2] - x.shape[2] % modcrop] for x in (pred, gt))
    (h, w), (gh, gw) = pred.shape[1:], gt.shape[1:]
    if (h, w) != (gh, gw):
        hint = " (try --modcrop SCALE)" if gh > h and gw > w else ""
        raise BlindSRError(f"size {w}x{h} differs from ground truth {gw}x{gh}{hint}")
    c = crop_border
    if 2 * c >= min(h, w):
        raise BlindSRError(f"--crop-border {c} leaves nothing of a {w}x{h} image")
    row = {}
    for m in metrics:
        if m in PIXEL_METRICS:
            row[m] = (psnr if m == "psnr" else ssim)(pred, gt, crop_border=c, y_channel=y_channel)
        else:  # learned metrics see the same crop (BlindDiff crops LPIPS by the scale), in RGB
            p, g = (x[:, c:-c, c:-c] if c else x for x in (pred, gt))
            row[m] = nets[m](p, g)[0]
    return row


def write_reports(paths: dict[str, Path], report: dict, metrics: list[str], overwrite: bool = False) -> None:
    """Write the CSV / JSON / Markdown reports (``paths`` keys: csv, json, md) atomically."""
    from blindsr.io.images import write_bytes_atomic

    rows, mean, dataset, st = report["images"], report["mean"], report["dataset"], report["settings"]
    render = {
        "csv": lambda: _csv_text(rows, metrics, mean),
        "md": lambda: (f"`{report['pred']}` vs `{report['gt']}`: crop_border={st['crop_border']}, "
                       f"y_channel={st['y_channel']}\n\n" + format_table(rows, metrics, mean, markdown=True)
                       + "".join(f"\n{m} (dataset): {v:.4f}\n" for m, v in dataset.items())),
        "json": lambda: json.dumps(_jsonable(report), indent=2, allow_nan=False) + "\n",
    }
    for kind, path in paths.items():
        write_bytes_atomic(path, render[kind]().encode("utf-8"), overwrite=overwrite)
        print(f"wrote {path}")


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_jsonable(v) for v in x]
    return _finite(x)


def run(args) -> int:
    from tqdm import tqdm

    from blindsr.errors import BlindSRError
    from blindsr.metrics.learned import create_learned_metric, get_spec

    metrics = list(dict.fromkeys(m.strip().lower() for m in args.metrics.split(",") if m.strip()))
    if not metrics:
        raise BlindSRError("--metrics is empty")
    learned = {m: get_spec(m) for m in metrics if m not in PIXEL_METRICS}
    if args.crop_border < 0 or args.modcrop < 0:
        raise BlindSRError("--crop-border and --modcrop must be >= 0")
    pairs, extra_pred, no_pred, ambiguous = pair_files(args.pred, args.gt, args.recursive, args.pred_suffix)
    if "fid" in learned and not (args.pred.is_dir() and args.gt.is_dir()):
        raise BlindSRError("fid compares folders: give folders to --pred and --gt")
    reports = _report_paths(args, [p for _, a, b in pairs for p in (a, b)])
    nets = {m: create_learned_metric(m, args.device, args.weights_dir) for m in learned}  # fail early
    per_image = [m for m in metrics if m in PIXEL_METRICS or learned[m].mode != "FID"]
    from blindsr.io.images import read_image


    rows: list[dict] = []
    errors: dict[str, str] = {k: "several files share this name" for k in ambiguous}
    for k, msg in errors.items():
        print(f"blindsr: error: {k}: {msg}", file=sys.stderr)
    bar = tqdm(total=len(pairs), desc="eval", unit="img", leave=False, disable=not sys.stderr.isatty())

    def step(pair) -> None:
        name, pf, gf = pair
        try:
            pred_img, gt_img = read_image(pf), read_image(gf)  # their errors name the file
            try:
                scores = score_pair(pred_img, gt_img, per_image, nets, args.crop_border, args.y_channel,
                                    args.modcrop)
            except BlindSRError as e:  # a size mismatch, a crop too large: about the pair
                raise BlindSRError(f"{pf} vs {gf}: {e}") from None
            rows.append({"name": name, "pred": str(pf), "gt": str(gf), **scores})
        except BlindSRError as e:
            errors[name] = str(e)
            raise
        finally:
            bar.update(1)

    rc = run_batch(pairs, step, name=lambda p: str(p[1]))
    bar.close()
    if no_pred:
        print(f"blindsr: {len(no_pred)} ground truth(s) have no prediction: {_some(no_pred)}", file=sys.stderr)
    if extra_pred:
        print(f"blindsr: note: {len(extra_pred)} prediction(s) have no ground truth: {_some(extra_pred)}",
              file=sys.stderr)
    if not rows:
        return 2

    mean = {m: sum(r[m] for r in rows) / len(rows) for m in per_image}
    dataset = {m: nets[m].folders(args.pred, args.gt) for m in learned if learned[m].mode == "FID"}
    settings = {"crop_border": args.crop_border, "y_channel": args.y_channel, "modcrop": args.modcrop,
                "pred_suffix": args.pred_suffix, "recursive": args.recursive, "metrics": metrics}
    print(f"{args.pred} vs {args.gt}: crop_border={args.crop_border}, y_channel={args.y_channel}")
    print(format_table(rows, per_image, mean), end="")
    for m, v in dataset.items():
        print(f"{m} (dataset): {v:.4f}")
    report = {"pred": str(args.pred), "gt": str(args.gt), "settings": settings, "count": len(rows),
              "images": rows, "mean": mean, "dataset": dataset,
              "failed": [{"name": n, "error": e} for n, e in errors.items()],
              "unpaired_gt": no_pred, "unpaired_pred": extra_pred}
    write_reports(reports, report, per_image, overwrite=args.overwrite)
    return 3 if rc == 0 and (no_pred or ambiguous) else rc
