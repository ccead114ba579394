"""``blindsr uddm fit``: learn a camera's degradation from its LR photos (UDDM: the DDM + P-DDM, issue 12).

    blindsr uddm fit --real-lr my_photos/ --hr clean_hr/ -o runs/my_camera        (--resume auto to continue)
    blindsr degrade --preset uddm --ckpt runs/my_camera --w 0.5 --input clean_hr/ --output pairs/

The photos need no ground truth: the DDM learns "extremely downsampled -> real LR" on them, P-DDM learns to turn
the HR images into LR images the discriminator cannot tell from them. Defaults: src/blindsr/configs/uddm_s.yaml
(about 40 minutes on 2 CPU cores); --config FILE and --set KEY=VALUE change them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "uddm_s.yaml"


def register(subparsers, help_: str) -> None:
    from blindsr.cli.common import add_common

    p = subparsers.add_parser("uddm", help=help_, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="uddm_command", required=True, metavar="COMMAND")
    f = sub.add_parser("fit", help="train the DDM and P-DDM on real LR photos + unpaired HR images",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    f.add_argument("--real-lr", required=True, type=Path, help="folder of the camera's LR photos")
    f.add_argument("--hr", required=True, type=Path, help="folder of clean HR images (any, unpaired)")
    f.add_argument("-o", "--output", required=True, type=Path, help="run folder")
    f.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="run config (default: uddm_s.yaml)")
    f.add_argument("--minutes", type=float, help="time limit (overrides train.time_limit_min)")
    f.add_argument("--resume", help="'auto' (the run folder's latest checkpoint) or a checkpoint")
    f.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.SUB=VALUE",
                   help="override any config value, e.g. --set model.ddm.s=8; repeatable")
    f.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_common(f, seed=False)
    f.set_defaults(func=fit)


def fit(args: argparse.Namespace) -> int:
    from blindsr.errors import BlindSRError
    from blindsr.train.config import load_config
    from blindsr.train.run import run_training

    for flag, folder in (("--real-lr", args.real_lr), ("--hr", args.hr)):
        if not folder.is_dir():
            raise BlindSRError(f"{flag} {folder}: not a folder")
    cfg = load_config(args.config, args.overrides)
    if cfg.method != "uddm":
        raise BlindSRError(f"--config {args.config} is a {cfg.method!r} config, not 'uddm'")
    cfg.data.lr_root, cfg.data.root, cfg.output = str(args.real_lr), str(args.hr), str(args.output)
    if args.minutes is not None:
        cfg.train.time_limit_min = args.minutes
    res = run_training(cfg, device=args.device, resume=args.resume, progress=not args.no_progress)
    print(f"trained to step {res.step}; DDM: {res.final}; P-DDM: {Path(res.final).with_name('final_pddm.safetensors')}")
    print(f"pairs: blindsr degrade --preset uddm --ckpt {args.output} --w 0.5 --input HR --output PAIRS")
    return 0
