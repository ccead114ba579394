"""``blindsr train METHOD --config FILE``: train on Hugging Face Accelerate (CPU, one or many GPUs/nodes).

Multi-GPU / multi-node: ``accelerate launch -m blindsr.cli.main train blinddiff --config FILE`` (or
``accelerate launch $(which blindsr) train ...``); ``data.batch_size`` is per process.
"""

from __future__ import annotations

import argparse

EPILOG = """examples:
  blindsr train blinddiff --config configs/blinddiff_setting1.yaml --output runs/bd1
  blindsr train blinddiff --config configs/blinddiff_setting1.yaml --output runs/bd1 --resume auto
  blindsr train blinddiff --config configs/blinddiff_tiny.yaml --set data.batch_size=2 --set optim.lr=1e-4
  accelerate launch --num_processes 4 -m blindsr.cli.main train blinddiff --config configs/blinddiff_setting1.yaml

writes to the run dir: config.yaml (resolved), meta.json (git commit, ...), log.csv, val.csv, losses.png,
checkpoints/step_*/ (safetensors weights + EMA, optimiser/RNG state), final.safetensors (EMA weights, usable
by `blindsr sr --ckpt`)."""


def register(subparsers, help_: str) -> None:
    from blindsr.cli.common import add_common
    from blindsr.registry import names

    p = subparsers.add_parser("train", help=help_, description=help_ + ".", epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("method", choices=names("recipe"), help="what to train")
    p.add_argument("--config", required=True, help="YAML run config (see configs/)")
    p.add_argument("--output", help="run directory (overrides `output` in the config)")
    p.add_argument("--max-steps", type=int, help="optimiser steps (overrides train.max_steps)")
    p.add_argument("--resume", help="'auto' (latest checkpoint in the run dir, if any) or a checkpoint/run dir")
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"),
                   help="overrides train.mixed_precision (fp16 needs CUDA)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.SUB=VALUE",
                   help="override any config value (VALUE is YAML), e.g. --set optim.lr=1e-4; repeatable")
    p.add_argument("--seed", type=int, help="overrides train.seed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_common(p, seed=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from blindsr.errors import BlindSRError
    from blindsr.train.config import load_config
    from blindsr.train.run import run_training

    cfg = load_config(args.config, args.overrides)
    if cfg.method != args.method:
        raise BlindSRError(f"--config {args.config} is a {cfg.method!r} config, not {args.method!r}")
    if args.output is not None:
        cfg.output = args.output
    if args.max_steps is not None:
        cfg.train.max_steps = args.max_steps
    if args.seed is not None:
        cfg.train.seed = args.seed
    if args.mixed_precision is not None:
        cfg.train.mixed_precision = args.mixed_precision
    res = run_training(cfg, device=args.device, resume=args.resume, progress=not args.no_progress)
    last = res.history[-1] if res.history else {}
    loss = f", last loss {last['loss']:.4g}" if "loss" in last else ""
    print(f"trained to step {res.step}{loss}; EMA weights: {res.final}")
    return 0
