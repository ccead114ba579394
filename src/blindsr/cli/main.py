"""The ``blindsr`` command line.

Each command lives in its own module ``blindsr.cli.<name>`` exposing ``register(subparsers)``;
those modules import only the standard library at top level so ``blindsr --help`` is fast.
User errors (``BlindSRError``) print one line and exit non-zero; ``--debug`` shows the traceback. Python
warnings that reach the user print as one ``blindsr: warning: ...`` line (``--debug``: Python's format).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from blindsr import __version__

# (module, one-line help); order is the order shown by --help.
COMMANDS = [
    ("sr", "super-resolve images (BlindDiff; the default model needs no flags)"),
    ("restore", "two-stage blind restoration (DiffBIR)"),
    ("degrade", "synthesise LR images from HR images with a named degradation preset"),
    ("eval", "PSNR/SSIM (and learned metrics) of predictions against ground truth"),
    ("train", "train a model from a config file (on Accelerate)"),
    ("uddm", "learn a camera's degradation from its LR photos (UDDM): blindsr uddm fit"),
    ("adapt", "an SR model for your camera from its LR photos alone (UDDM fit -> pairs -> SR network)"),
    ("weights", "inspect and convert checkpoints"),
    ("web", "the web page: upload, compare, download (optional extra: pip install -e \".[web]\")"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blindsr", description="Diffusion-based blind super-resolution and image restoration.")
    parser.add_argument("--version", action="version", version=f"blindsr {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_ in COMMANDS:
        try:
            mod = importlib.import_module(f"blindsr.cli.{name.replace('-', '_')}")
        except ModuleNotFoundError as e:
            if e.name != f"blindsr.cli.{name}":
                raise
            continue  # command not built yet
        mod.register(sub, help_)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    text = str(message).strip().splitlines()
    print(f"blindsr: warning: {text[0] if text else category.__name__}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    from blindsr.errors import BlindSRError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = bool(getattr(args, "debug", False))
    try:
        with warnings.catch_warnings():
            if not debug:  # a warning that reaches the user is one line, without Python's source line
                warnings.showwarning = _one_line_warning
            rc = args.func(args)
        return int(rc or 0)
    except BlindSRError as e:
        if debug:
            raise
        print(f"blindsr: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("blindsr: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an internal bug: still one line unless --debug
        if debug:
            raise
        print(f"blindsr: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
