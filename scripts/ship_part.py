"""Ship a run's ``final.safetensors`` as an embedded part of the pixel backends (``blindsr.weights.PARTS``: e.g.
``swinir-s``, ``diffbir-control-s``), with a ``<name>.json`` training record beside it, and copy the run's log,
plots and config to ``docs/training/<name>/``.

    .venv/bin/python scripts/ship_part.py --run runs/swinir_s --name swinir-s --note "..."
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from blindsr.io.weights import load_safetensors_metadata, load_state_dict  # noqa: E402
from blindsr.weights import PARTS, part_path  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--name", required=True, choices=sorted(PARTS))
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    run, out = Path(args.run), part_path(args.name)
    shutil.copyfile(run / "final.safetensors", out)
    meta = load_safetensors_metadata(out)
    rows = list(csv.DictReader((run / "log.csv").open()))
    val = list(csv.DictReader((run / "val.csv").open())) if (run / "val.csv").is_file() else []
    record = {
        "name": args.name,
        "what": PARTS[args.name][1],
        "config": json.loads(meta.get("config", "{}")),
        "parameters": sum(t.numel() for t in load_state_dict(out).values()),
        "trained": {
            "command": json.loads((run / "meta.json").read_text())["runs"][0]["argv"],
            "starts": len(json.loads((run / "meta.json").read_text())["runs"]),
            "steps": int(rows[-1]["step"]),
            "train_time_s": float(rows[-1]["time"]),
            "last_logged": {k: float(v) for k, v in rows[-1].items() if v not in ("", None) and k != "step"},
            "validation": val,
            "note": args.note,
            "log": f"docs/training/{out.stem}/",
        },
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    docs = REPO / "docs" / "training" / out.stem
    docs.mkdir(parents=True, exist_ok=True)
    for f in ("config.yaml", "log.csv", "losses.png", "meta.json", "val.csv"):
        if (run / f).is_file():
            shutil.copyfile(run / f, docs / f)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB), {out.with_suffix('.json').name}, {docs}")


if __name__ == "__main__":
    main()
