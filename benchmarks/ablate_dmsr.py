"""DM-SR's loss ablations in miniature (paper Table 6): the same short fine-tune of DM-SR-S with one loss term
switched off at a time, then PSNR / SSIM / LR consistency on Set5 (and any other sets) degraded x4.

Every variant starts from the same weights (``--init``, default the 312-iteration preliminary DM-SR-S), trains
the same number of iterations with the same seed and data order, and differs only in the weight that is set to 0;
"all terms" is the reference. The adversarial term starts at once (``loss.adv_start=0``): at these lengths the
default start of 200 would leave it off. One CPU thread per run:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ablate_dmsr.py --steps 100 --md docs/training/dmsr_ablation.md

Runs land in ``runs/dmsr_ablate/<variant>`` (resumable: a finished run is not trained again; ``--variants`` with
``--train-only`` splits the training over processes, a last call without them evaluates).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from eval_dmsr import cell, pairs, scores  # noqa: E402

from blindsr.methods.dmsr.pipeline import load_pipeline  # noqa: E402

VARIANTS = {  # name -> the --set overrides that define it (Table 6's rows)
    "all terms": [],
    "w/o L_adv": ["loss.w_adv=0"],
    "w/o L_dm": ["loss.w_dm=0"],
    "w/o L_eps": ["loss.w_eps=0"],
    "w/o L_per": ["loss.w_per=0"],
}


def slug(name: str) -> str:
    return name.replace("w/o ", "no_").replace(" ", "_")


def train(name: str, sets: list[str], args) -> Path:
    out = Path(args.runs) / slug(name)
    final = out / "final.safetensors"
    if final.is_file():
        return final
    cmd = [sys.executable, "-m", "blindsr", "train", "dmsr", "--config", str(REPO / "configs" / "dmsr_s.yaml"),
           "--device", "cpu", "--no-progress", "--output", str(out), "--resume", "auto",
           "--set", f"train.init_from={args.init}", "--set", f"train.max_steps={args.steps}",
           "--set", "train.time_limit_min=null", "--set", "train.val_every=0", "--set", "loss.adv_start=0",
           "--set", f"model.prior={args.prior}", *[x for s in sets for x in ("--set", s)]]
    print(" ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)
    return final


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=100, help="fine-tuning iterations per variant")
    ap.add_argument("--init", default=str(REPO / "benchmarks" / "weights" / "dmsr_s_prelim.safetensors"))
    ap.add_argument("--prior", default="prior-s")
    ap.add_argument("--runs", default=str(REPO / "runs" / "dmsr_ablate"))
    ap.add_argument("--sets", nargs="+", default=["Set5"])
    ap.add_argument("--presets", nargs="+", default=["resshift"])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "val"))
    ap.add_argument("--md", help="also write the table as Markdown here")
    ap.add_argument("--variants", nargs="+", choices=[slug(v) for v in VARIANTS], help="train only these (e.g. two "
                    "processes on two cores); the table needs them all")
    ap.add_argument("--train-only", action="store_true", help="train, do not evaluate")
    args = ap.parse_args()

    chosen = {k: v for k, v in VARIANTS.items() if not args.variants or slug(k) in args.variants}
    finals = {name: train(name, sets, args) for name, sets in chosen.items()}
    if args.train_only:
        return
    torch.set_grad_enabled(False)
    cols = [f"{s} / {p}" for s in args.sets for p in args.presets]
    lines = ["| variant | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, final in finals.items():
        pipe = load_pipeline(final)
        cells = []
        for s in args.sets:
            for preset in args.presets:
                cells.append(cell([scores(pipe(lr).sr, hr, lr) for _, lr, hr in pairs(Path(args.data) / s, preset,
                                                                                     None)]))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        print(lines[-1], file=sys.stderr, flush=True)
    text = (f"PSNR / SSIM (Y, border 4) / LR-consistency PSNR, x4, after {args.steps} fine-tuning iterations from "
            f"{Path(args.init).name}\n\n" + "\n".join(lines) + "\n")
    print(text)
    if args.md:
        Path(args.md).write_text(text)


if __name__ == "__main__":
    main()
