"""Ship a DM-SR-S run as the embedded model: ``src/blindsr/weights/dmsr_s.safetensors`` (E_θ + T, EMA, its prior
named ``prior-s``) + ``dmsr_s.json`` (the config and how it was trained), after checking that the run's prior is
the embedded Prior-S tensor for tensor.

    .venv/bin/python scripts/ship_dmsr.py --run runs/dmsr_s --note "..."
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from blindsr.io.weights import load_state_dict  # noqa: E402
from blindsr.methods.dmsr.pipeline import load_pipeline, read_checkpoint, save_pipeline  # noqa: E402
from blindsr.weights import part_path, prior_path  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default=str(REPO / "runs" / "dmsr_s"))
    ap.add_argument("--note", default="", help="free text for the training record")
    args = ap.parse_args()
    run = Path(args.run)
    meta, _ = read_checkpoint(run / "final.safetensors")
    run_prior = meta.get("prior")
    if run_prior not in (None, "prior-s"):  # a file: it must be the embedded prior, tensor for tensor
        a, b = load_state_dict(run_prior), load_state_dict(prior_path())
        if a.keys() != b.keys() or any(not torch.equal(a[k], b[k]) for k in a):
            raise SystemExit(f"the run's prior {run_prior} is not the embedded Prior-S")
    pipe = load_pipeline(run / "final.safetensors")
    out = save_pipeline(pipe, part_path("dmsr-s"), "pixel", prior="prior-s")
    rows = list(csv.DictReader((run / "log.csv").open()))
    val = list(csv.DictReader((run / "val.csv").open())) if (run / "val.csv").is_file() else []
    runs = json.loads((run / "meta.json").read_text())["runs"]
    record = {
        "name": "DM-SR-S",
        "config": json.loads(json.dumps(read_checkpoint(out)[0])),
        "parameters": sum(p.numel() for m in (pipe.estimator, pipe.encoder) for p in m.parameters()),
        "trained": {
            "command": "OMP_NUM_THREADS=1 blindsr train dmsr --config configs/dmsr_s.yaml --device cpu (--resume auto)",
            "starts": [{k: r.get(k) for k in ("git_commit", "argv", "started", "resume")} for r in runs],
            "steps": int(rows[-1]["step"]),
            "train_time_s": float(rows[-1]["time"]),
            "hardware": "1 CPU thread (2-core machine, the other core in use), torch " + torch.__version__,
            "last_logged_losses": {k: float(v) for k, v in rows[-1].items() if "/" in k and v != ""},
            "validation": val,
            "note": args.note,
            "log": "docs/training/dmsr_s/",
        },
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB) and {out.with_suffix('.json').name}")


if __name__ == "__main__":
    main()
