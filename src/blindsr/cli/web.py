"""``blindsr web``: the web page (an optional extra: ``pip install -e ".[web]"``), offline, on this machine.

    blindsr web                       # http://127.0.0.1:7860, the embedded BlindDiff models
    blindsr web --port 8000 --cleaner RealESRGAN_x4plus.safetensors   # then Cleaner: realesrgan

It binds to localhost unless --host says otherwise, sends no analytics and makes no request outside this
machine; there is no public share link (Gradio's needs the internet). DiffBIR's weights are found as by
``blindsr restore``: the flags below, the environment variables, or ~/.config/blindsr/weights.json; the page
shows the exact files a method still needs. Uploads and results live in a temporary folder per browser session,
removed when the session ends or the server stops.
"""

from __future__ import annotations

import argparse


def register(subparsers, help_: str) -> None:
    from blindsr.cli.common import add_common

    p = subparsers.add_parser("web", help=help_, description=__doc__.split("\n\n")[0],
                              epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--max-upload-mb", type=int, default=64, metavar="MB",
                   help="largest upload, refused before it is decoded (default 64)")
    w = p.add_argument_group("DiffBIR weights (local paths; as blindsr restore)")
    w.add_argument("--sd", metavar="PATH", help="SD 2.1 checkpoint or diffusers folder")
    w.add_argument("--controlnet", metavar="PATH", help="DiffBIR ControlNet")
    w.add_argument("--cleaner", metavar="PATH", help="stage-1 cleaner weights")
    d = p.add_argument_group("DM-SR weights (local paths; as blindsr sr --method dmsr)")
    d.add_argument("--dmsr-encoder", metavar="FILE", help="DM-SR checkpoint (E_θ + T)")
    d.add_argument("--sd-turbo", metavar="PATH", help="SD-Turbo weights, for a checkpoint of the sd-turbo backend")
    add_common(p, seed=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from blindsr.errors import BlindSRError

    if not 0 < args.port < 65536:
        raise BlindSRError(f"--port {args.port}: give a port in 1..65535")
    if args.max_upload_mb < 1:
        raise BlindSRError("--max-upload-mb must be at least 1")
    import importlib.util

    if importlib.util.find_spec("gradio") is None:  # not imported here: serve() sets its cache folder first
        raise BlindSRError('the web page needs the "web" extra: pip install -e ".[web]" (or make web)')
    from blindsr.web import serve

    serve(args.host, args.port, args.device, max_upload_mb=args.max_upload_mb,
          weights={"sd": args.sd, "controlnet": args.controlnet, "cleaner": args.cleaner},
          dmsr={"encoder": args.dmsr_encoder, "sd_turbo": args.sd_turbo})
    return 0
