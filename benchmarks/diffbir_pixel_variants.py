"""DiffBIR's pixel backend, the condition-network variants on training loss (issue 14; DiffBIR Table 1 Variant 2
and Table 6): the eps-MSE of runs trained alike, as a plot of the moving average and a Markdown table.

    .venv/bin/python benchmarks/diffbir_pixel_variants.py \
        "IRControlNet (shipped)=docs/training/diffbir_control_s" \
        "Variant 2: no x_t=runs/diffbir_variant2" "no stage 1 (Table 6)=runs/diffbir_table6" \
        --relative-to "IRControlNet (shipped)" --png docs/images/diffbir_pixel_variants_loss.png

Each run folder holds the trainer's ``log.csv`` (training loss every ``log_every`` steps, on that step's batch)
and ``val.csv`` (the loss on the held-out crops, with the validation's fixed noise). Runs from the same seed see
the same batches and noise, so their differences step by step are paired: the table gives the mean training loss
over step windows, every validation value and (``--relative-to``) the mean paired difference to one run; the plot
the moving mean over ``--window`` steps of the loss, or of the paired difference. ``--key`` compares another
logged column of any trainer's runs (UDDM's P-DDM reconstruction term, for one):

    .venv/bin/python benchmarks/diffbir_pixel_variants.py "no penalty=docs/training/uddm_adapt_realsrset_full" \
        "live penalty=docs/training/uddm_pddm_live" --key pddm/rec --window 50 --windows 1-250 251-500 501-1200 \
        --png docs/images/uddm_pddm_live_rec.png
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from blindsr.train.logging import plot_losses, read_csv  # noqa: E402


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="LABEL=RUN_DIR")
    ap.add_argument("--window", type=int, default=250, help="moving-mean window in steps")
    ap.add_argument("--windows", nargs="+", default=["1-500", "501-1000", "1001-1500"], help="table's step ranges")
    ap.add_argument("--relative-to", help="label of the run the others are compared with, step by step")
    ap.add_argument("--key", default="loss", help="the log.csv column to compare")
    ap.add_argument("--png", type=Path)
    ap.add_argument("--md", type=Path)
    args = ap.parse_args(argv)

    runs = {}
    for spec in args.runs:
        label, _, path = spec.partition("=")
        log = {int(r["step"]): float(r[args.key]) for r in read_csv(Path(path) / "log.csv")}
        val_file = Path(path) / "val.csv"
        val = {int(r["step"]): float(r["val_loss"]) for r in read_csv(val_file)} if val_file.exists() else {}
        runs[label] = (log, val)

    ranges = [tuple(int(x) for x in w.split("-")) for w in args.windows]
    val_steps = sorted({s for _, val in runs.values() for s in val})
    ref = runs[args.relative_to][0] if args.relative_to else None
    head = ["run"] + [f"train {args.key}, steps {a}–{b}" for a, b in ranges] + [f"val loss @ {s}" for s in val_steps]
    head += [f"minus {args.relative_to}, steps {a}–{b}" for a, b in ranges] if ref else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, (log, val) in runs.items():
        cells = [f"{mean([v for s, v in log.items() if a <= s <= b]):.5f}" for a, b in ranges]
        cells += [f"{val[s]:.5f}" if s in val else "–" for s in val_steps]
        if ref:
            cells += [f"{mean([v - ref[s] for s, v in log.items() if a <= s <= b and s in ref]):+.6f}"
                      for a, b in ranges]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.md:
        args.md.write_text(text)

    if args.png:  # moving means on a shared step axis, through the trainer's own plot
        steps = sorted(set.intersection(*(set(log) for log, _ in runs.values())))
        if ref:  # the paired differences
            runs = {f"{k} minus {args.relative_to}": ({s: v - ref[s] for s, v in log.items() if s in ref}, val)
                    for k, (log, val) in runs.items() if k != args.relative_to}
        with tempfile.TemporaryDirectory() as tmp:
            merged = Path(tmp) / "log.csv"
            with open(merged, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["step", *runs])
                for s in steps:
                    if s < args.window:
                        continue
                    w.writerow([s] + [mean([v for t, v in log.items() if s - args.window < t <= s])
                                      for log, _ in runs.values()])
            plot_losses(merged, args.png, keys=list(runs), log_y=False)
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
