"""The SD 2.x family (SD 2.1, SD 2.1-base, SD-Turbo): UNet, VAE and OpenCLIP ViT-H text tower through
diffusers / transformers. :func:`load_sd` takes an original checkpoint file or a local diffusers folder.

The package also holds the family's tiled VAE (``vae_tiling``) and the CLIP tokenizer (``tokenizer``);
fp16/bf16 with fp32 norms is ``blindsr.ops.precision.cast_keep_norms_fp32``.

The modules are plain ``diffusers.UNet2DConditionModel``, ``diffusers.AutoencoderKL`` and
``transformers.CLIPTextModel``, built from JSON configs shipped in ``blindsr/configs/sd21`` (never from a hub).
Weights come from an original SD checkpoint (LDM key layout, e.g. ``v2-1_512-ema-pruned.ckpt`` or DiffBIR's
zero-SNR ``sd2.1-base-zsnr-laionaes5.ckpt``) through the key converters below, or from a local diffusers folder.

Key layouts handled:
- SD checkpoint: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE), ``cond_stage_model.model.*``
  (OpenCLIP text tower); DiffBIR's own ``ControlLDM.state_dict()`` uses ``unet.``, ``vae.``, ``clip.model.``.
- OpenCLIP text tower -> ``CLIPTextModel``: SD 2.x uses the *penultimate* layer followed by ``ln_final``, which is
  exactly a 23-layer ``CLIPTextModel`` (its ``last_hidden_state`` passes through ``final_layer_norm``). The 24th
  resblock, ``text_projection`` and ``logit_scale`` are in the checkpoint but never used; the converter drops
  exactly those (12,596,224 + 1,048,576 + 1 = 13,644,801 params), so 354,032,641 official = 340,387,840 ours
  + 13,644,801 dropped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from blindsr.errors import WeightsError

if TYPE_CHECKING:  # heavy imports stay inside the functions
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "sd21"
SCALE_FACTOR = 0.18215  # SD latent scale (LDM `scale_factor`, diffusers `scaling_factor`)

# Prefixes of the three parts: (original SD checkpoint, DiffBIR ControlLDM state dict).
SD_PREFIXES = {
    "unet": ("model.diffusion_model.", "unet."),
    "vae": ("first_stage_model.", "vae."),
    "clip": ("cond_stage_model.model.", "clip.model."),
}


# ----------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------
def load_config(name: str) -> dict[str, Any]:
    """A shipped SD 2.1 config: ``unet``, ``vae`` or ``text_encoder``."""
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        raise WeightsError(f"no shipped SD config named {name!r} (looked for {path})")
    return json.loads(path.read_text())


def unet_config_from_ldm(p: Mapping[str, Any]) -> dict[str, Any]:
    """diffusers ``UNet2DConditionModel`` kwargs from LDM ``openaimodel.UNetModel`` kwargs (SD 2.x style)."""
    mult, mc = list(p["channel_mult"]), int(p["model_channels"])
    channels = [mc * m for m in mult]
    attn = [2**i in p["attention_resolutions"] for i in range(len(mult))]
    heads = [c // p["num_head_channels"] for c in channels]  # diffusers' `attention_head_dim` = heads (legacy name)
    return {
        "sample_size": int(p.get("image_size", 64)),
        "in_channels": int(p["in_channels"]),
        "out_channels": int(p.get("out_channels", p["in_channels"])),
        "block_out_channels": channels,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "layers_per_block": int(p["num_res_blocks"]),
        "attention_head_dim": heads,
        "cross_attention_dim": int(p["context_dim"]),
        "use_linear_projection": bool(p.get("use_linear_in_transformer", False)),
        "transformer_layers_per_block": int(p.get("transformer_depth", 1)),
        "flip_sin_to_cos": True,  # LDM timestep embedding is [cos, sin]
        "freq_shift": 0,
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
    }


def vae_config_from_ldm(p: Mapping[str, Any]) -> dict[str, Any]:
    """diffusers ``AutoencoderKL`` kwargs from LDM ``AutoencoderKL`` kwargs (``embed_dim``, ``ddconfig``)."""
    dd = p["ddconfig"]
    if dd.get("attn_resolutions"):
        raise WeightsError("LDM VAEs with attention outside the mid block are not supported")
    n = len(dd["ch_mult"])
    return {
        "in_channels": int(dd["in_channels"]),
        "out_channels": int(dd["out_ch"]),
        "block_out_channels": [dd["ch"] * m for m in dd["ch_mult"]],
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "layers_per_block": int(dd["num_res_blocks"]),
        "latent_channels": int(p["embed_dim"]),
        "norm_num_groups": 32,
        "sample_size": int(dd.get("resolution", 512)),
        "scaling_factor": SCALE_FACTOR,
    }


def text_config_from_openclip(p: Mapping[str, Any]) -> dict[str, Any]:
    """``CLIPTextConfig`` kwargs from DiffBIR's ``FrozenOpenCLIPEmbedder`` kwargs (``text_cfg``, ``layer``)."""
    t, layer = p["text_cfg"], p.get("layer", "penultimate")
    if layer not in ("last", "penultimate"):
        raise WeightsError(f"unsupported OpenCLIP layer {layer!r}")
    return {
        "vocab_size": int(t["vocab_size"]),
        "hidden_size": int(t["width"]),
        "intermediate_size": int(t["width"] * t.get("mlp_ratio", 4)),
        "num_hidden_layers": int(t["layers"]) - (layer == "penultimate"),
        "num_attention_heads": int(t["heads"]),
        "max_position_embeddings": int(t["context_length"]),
        "projection_dim": int(p.get("embed_dim", t["width"])),
        "hidden_act": "gelu",  # OpenCLIP ViT-H uses exact GELU (not quick_gelu)
        "layer_norm_eps": 1e-5,
        "pad_token_id": 0,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
    }


def build_unet(config: Mapping[str, Any] | None = None) -> UNet2DConditionModel:
    """SD UNet (random init) on the current default device; use ``with torch.device("meta")`` for a shell."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**dict(config or load_config("unet")))


def build_vae(config: Mapping[str, Any] | None = None) -> AutoencoderKL:
    from diffusers import AutoencoderKL

    return AutoencoderKL(**dict(config or load_config("vae")))


def build_text_encoder(config: Mapping[str, Any] | None = None) -> CLIPTextModel:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**dict(config or load_config("text_encoder")))).eval()


# ----------------------------------------------------------------------------------------------------------
# Key conversion: LDM / OpenCLIP layout -> diffusers / transformers layout
# ----------------------------------------------------------------------------------------------------------
_RESNET = {"in_layers.0.": "norm1.", "in_layers.2.": "conv1.", "emb_layers.1.": "time_emb_proj.",
           "out_layers.0.": "norm2.", "out_layers.3.": "conv2.", "skip_connection.": "conv_shortcut."}
_VAE_RESNET = {"nin_shortcut.": "conv_shortcut."}
_VAE_ATTN = {"norm.": "group_norm.", "q.": "to_q.", "k.": "to_k.", "v.": "to_v.", "proj_out.": "to_out.0."}
_KIND_RENAMES = {"res": _RESNET, "attn": {}, "plain": {}, "vae_res": _VAE_RESNET, "vae_attn": _VAE_ATTN}


def unet_block_rows(cfg: Mapping[str, Any], decoder: bool = True) -> list[tuple[str, str, str]]:
    """``(ldm_prefix, diffusers_prefix, kind)`` for every block of an LDM UNet described by diffusers ``cfg``.

    ``decoder=False`` gives the encoder + middle block only (the ControlNet trunk).
    """
    n_res, n_lvl = int(cfg["layers_per_block"]), len(cfg["block_out_channels"])
    attn = ["CrossAttn" in t for t in cfg["down_block_types"]]
    rows = [("time_embed.0.", "time_embedding.linear_1.", "plain"),
            ("time_embed.2.", "time_embedding.linear_2.", "plain"),
            ("input_blocks.0.0.", "conv_in.", "plain")]
    i = 1
    for lvl in range(n_lvl):
        for j in range(n_res):
            rows.append((f"input_blocks.{i}.0.", f"down_blocks.{lvl}.resnets.{j}.", "res"))
            if attn[lvl]:
                rows.append((f"input_blocks.{i}.1.", f"down_blocks.{lvl}.attentions.{j}.", "attn"))
            i += 1
        if lvl < n_lvl - 1:
            rows.append((f"input_blocks.{i}.0.op.", f"down_blocks.{lvl}.downsamplers.0.conv.", "plain"))
            i += 1
    rows += [("middle_block.0.", "mid_block.resnets.0.", "res"),
             ("middle_block.1.", "mid_block.attentions.0.", "attn"),
             ("middle_block.2.", "mid_block.resnets.1.", "res")]
    if not decoder:
        return rows
    up_attn = ["CrossAttn" in t for t in cfg["up_block_types"]]
    i = 0
    for k in range(n_lvl):
        for j in range(n_res + 1):
            rows.append((f"output_blocks.{i}.0.", f"up_blocks.{k}.resnets.{j}.", "res"))
            if up_attn[k]:
                rows.append((f"output_blocks.{i}.1.", f"up_blocks.{k}.attentions.{j}.", "attn"))
            if j == n_res and k < n_lvl - 1:
                rows.append((f"output_blocks.{i}.{1 + up_attn[k]}.conv.", f"up_blocks.{k}.upsamplers.0.conv.", "plain"))
            i += 1
    rows += [("out.0.", "conv_norm_out.", "plain"), ("out.2.", "conv_out.", "plain")]
    return rows


def vae_block_rows(cfg: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """``(ldm_prefix, diffusers_prefix, kind)`` for an LDM ``AutoencoderKL`` described by diffusers ``cfg``."""
    n_res, n_lvl = int(cfg["layers_per_block"]), len(cfg["block_out_channels"])
    rows = [(f"{p}.", f"{p}.", "plain") for p in ("quant_conv", "post_quant_conv")]
    for part in ("encoder", "decoder"):
        rows += [(f"{part}.conv_in.", f"{part}.conv_in.", "plain"),
                 (f"{part}.conv_out.", f"{part}.conv_out.", "plain"),
                 (f"{part}.norm_out.", f"{part}.conv_norm_out.", "plain"),
                 (f"{part}.mid.block_1.", f"{part}.mid_block.resnets.0.", "vae_res"),
                 (f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0.", "vae_attn"),
                 (f"{part}.mid.block_2.", f"{part}.mid_block.resnets.1.", "vae_res")]
    for i in range(n_lvl):
        k = n_lvl - 1 - i  # the LDM decoder's `up` list is stored in reverse order
        rows += [(f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.", "vae_res")
                 for j in range(n_res)]
        rows += [(f"decoder.up.{i}.block.{j}.", f"decoder.up_blocks.{k}.resnets.{j}.", "vae_res")
                 for j in range(n_res + 1)]
        if i < n_lvl - 1:
            rows.append((f"encoder.down.{i}.downsample.conv.", f"encoder.down_blocks.{i}.downsamplers.0.conv.", "plain"))
        if i > 0:
            rows.append((f"decoder.up.{i}.upsample.conv.", f"decoder.up_blocks.{k}.upsamplers.0.conv.", "plain"))
    return rows


def convert_by_rows(sd: Mapping[str, torch.Tensor], rows: list[tuple[str, str, str]], what: str,
                    reverse: bool = False) -> dict[str, torch.Tensor]:
    """Rename every key through the longest matching (src, dst, kind) row; an unmatched key is an error
    (strict). ``reverse``: map dst -> src (ours back to the LDM layout, e.g. to save official checkpoints)."""
    if reverse:
        rows = [(dst, src, kind) for src, dst, kind in rows]
    table = sorted(rows, key=lambda r: -len(r[0]))
    out, unknown = {}, []
    for key, value in sd.items():
        row = next((r for r in table if key.startswith(r[0])), None)
        if row is None:
            unknown.append(key)
            continue
        src, dst, kind = row
        rest = key[len(src):]
        for a, b in _KIND_RENAMES[kind].items():
            if reverse:
                a, b = b, a
            if rest.startswith(a):
                rest = b + rest[len(a):]
                break
        if kind == "vae_attn" and value.ndim == 4 and not reverse:  # 1x1 conv -> linear
            value = value[:, :, 0, 0]
        out[dst + rest] = value
    if unknown:
        raise WeightsError(f"{what}: {len(unknown)} unexpected key(s), e.g. {unknown[:3]}")
    return out


def convert_ldm_unet(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """LDM UNet keys (no prefix) -> ``UNet2DConditionModel`` keys."""
    return convert_by_rows(sd, unet_block_rows(config), "SD UNet")


def convert_ldm_vae(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """LDM VAE keys (no prefix) -> ``AutoencoderKL`` keys (mid-block attention 1x1 convs become linears)."""
    return convert_by_rows(sd, vae_block_rows(config), "SD VAE")


_CLIP_LAYER = {"ln_1.": "layer_norm1.", "ln_2.": "layer_norm2.", "attn.out_proj.": "self_attn.out_proj.",
               "mlp.c_fc.": "mlp.fc1.", "mlp.c_proj.": "mlp.fc2."}


def convert_openclip_text(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """OpenCLIP text-tower keys (``token_embedding``, ``transformer.resblocks.*``, ...) -> ``CLIPTextModel`` keys.

    Drops exactly the tensors the penultimate-layer encoder never uses: resblocks ``>= num_hidden_layers``,
    ``text_projection`` and ``logit_scale``. The packed ``in_proj`` (q, k, v order) is split into three linears.
    Keys are given without the ``text_model.`` level that transformers < 5 has; ``load_text_encoder_state`` adds it.
    """
    n_layers = int(config["num_hidden_layers"])
    out, unknown = {}, []
    for key, value in sd.items():
        m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", key)
        if key in ("text_projection", "logit_scale") or (m and int(m[1]) >= n_layers):
            continue
        if key == "token_embedding.weight":
            out["embeddings.token_embedding.weight"] = value
        elif key == "positional_embedding":
            out["embeddings.position_embedding.weight"] = value
        elif key.startswith("ln_final."):
            out["final_layer_norm." + key[len("ln_final."):]] = value
        elif m and m[2] in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = "weight" if m[2].endswith("weight") else "bias"
            for name, part in zip("qkv", value.chunk(3, dim=0), strict=True):
                out[f"encoder.layers.{m[1]}.self_attn.{name}_proj.{kind}"] = part
        elif m and (new := next((b + m[2][len(a):] for a, b in _CLIP_LAYER.items() if m[2].startswith(a)), None)):
            out[f"encoder.layers.{m[1]}.{new}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise WeightsError(f"OpenCLIP text encoder: {len(unknown)} unexpected key(s), e.g. {unknown[:3]}")
    return out


def split_sd_checkpoint(sd: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Split an SD / DiffBIR-ControlLDM state dict into ``{"unet", "vae", "clip"}`` dicts with prefixes removed.

    Keys outside the three parts (DDPM buffers, ``model_ema.*``, ``controlnet.*``, ...) are ignored, as the official
    loader does.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in SD_PREFIXES}
    for key, value in sd.items():
        for name, prefixes in SD_PREFIXES.items():
            prefix = next((p for p in prefixes if key.startswith(p)), None)
            if prefix is not None:
                parts[name][key[len(prefix):]] = value
                break
    empty = [name for name, part in parts.items() if not part]
    if empty:
        raise WeightsError(f"not a Stable Diffusion checkpoint: no keys for {', '.join(empty)} "
                           f"(expected prefixes {', '.join(SD_PREFIXES[n][0] for n in empty)})")
    return parts


def load_converted(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], what: str,
                   dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Strict load with a one-line error; meta-device models get the tensors assigned (cast to ``dtype``)."""
    on_meta = any(p.is_meta for p in model.parameters())
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(dict(sd), strict=False, assign=on_meta)
    if missing or unexpected:
        raise WeightsError(f"{what}: {len(missing)} missing key(s) {missing[:3]}, "
                           f"{len(unexpected)} unexpected key(s) {unexpected[:3]}")
    return model


# ----------------------------------------------------------------------------------------------------------
# Loading whole SD models
# ----------------------------------------------------------------------------------------------------------
@dataclass
class StableDiffusion:
    """The three frozen SD parts DiffBIR uses (all in ``eval`` mode)."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    scale_factor: float = SCALE_FACTOR

    def to(self, *args, **kwargs) -> StableDiffusion:
        for m in (self.unet, self.vae, self.text_encoder):
            m.to(*args, **kwargs)
        return self


def freeze(*modules: torch.nn.Module) -> None:
    """Eval mode, no gradients (frozen parts of a pipeline or a training recipe)."""
    for m in modules:
        m.eval().requires_grad_(False)


def load_sd_checkpoint(source: str | Path | Mapping[str, torch.Tensor], configs: Mapping[str, Mapping] | None = None,
                       dtype: torch.dtype | None = torch.float32) -> StableDiffusion:
    """Build SD from ``configs`` (default: shipped SD 2.1 configs) and load an original SD checkpoint (strict).

    ``source`` is a path (``.ckpt``/``.pt``/``.safetensors``; read through ``blindsr.io.weights``) or a state dict.
    ``configs`` may override ``unet``/``vae``/``text_encoder`` (diffusers/transformers kwargs). Weights are cast to
    ``dtype`` (``None`` keeps the checkpoint's, e.g. fp16 halves); the modules share memory with ``source``.
    """
    if isinstance(source, str | Path):
        from blindsr.io.weights import load_state_dict

        source = load_state_dict(source)
    cfg = {name: dict((configs or {}).get(name) or load_config(name)) for name in ("unet", "vae", "text_encoder")}
    parts = split_sd_checkpoint(source)
    with torch.device("meta"):
        unet, vae, text = build_unet(cfg["unet"]), build_vae(cfg["vae"]), build_text_encoder(cfg["text_encoder"])
    load_converted(unet, convert_ldm_unet(parts["unet"], cfg["unet"]), "SD UNet", dtype)
    load_converted(vae, convert_ldm_vae(parts["vae"], cfg["vae"]), "SD VAE", dtype)
    load_text_encoder_state(text, convert_openclip_text(parts["clip"], cfg["text_encoder"]), dtype)
    freeze(unet, vae, text)
    return StableDiffusion(unet, vae, text, float(cfg["vae"].get("scaling_factor", SCALE_FACTOR)))


def load_text_encoder_state(model: CLIPTextModel, sd: Mapping[str, torch.Tensor],
                            dtype: torch.dtype | None = None) -> CLIPTextModel:
    """Strict load of converted text-encoder keys, whatever the ``CLIPTextModel`` nesting of this transformers."""
    if hasattr(model, "text_model"):  # transformers < 5 nests everything under `text_model.`
        sd = {f"text_model.{k}": v for k, v in sd.items()}
    load_converted(model, sd, "SD text encoder", dtype)
    _restore_buffers(model)
    return model


def _restore_buffers(text_encoder: CLIPTextModel) -> None:
    """Non-persistent buffers (``position_ids``) are not in any checkpoint: re-create them after a meta build."""
    emb = getattr(text_encoder, "text_model", text_encoder).embeddings
    if emb.position_ids.is_meta:
        emb.register_buffer("position_ids", torch.arange(emb.position_embedding.num_embeddings)[None],
                            persistent=False)


def load_diffusers_folder(path: str | Path) -> StableDiffusion:
    """Load ``unet/``, ``vae/`` and ``text_encoder/`` from a local diffusers SD folder (never the hub)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    root = Path(path)
    missing = [d for d in ("unet", "vae", "text_encoder") if not (root / d / "config.json").is_file()]
    if missing:
        raise WeightsError(f"{root} is not a diffusers Stable Diffusion folder (missing {', '.join(missing)}/config.json)")
    unet = UNet2DConditionModel.from_pretrained(root / "unet", local_files_only=True)
    vae = AutoencoderKL.from_pretrained(root / "vae", local_files_only=True)
    text = CLIPTextModel.from_pretrained(root / "text_encoder", local_files_only=True)
    freeze(unet, vae, text)
    return StableDiffusion(unet, vae, text, float(vae.config.scaling_factor))


def load_sd(path: str | Path) -> StableDiffusion:
    """SD 2.1 / 2.1-base / SD-Turbo (one architecture) from a checkpoint file (.ckpt/.safetensors, LDM layout)
    or a local diffusers folder."""
    p = Path(path)
    if not p.exists():
        raise WeightsError(f"Stable Diffusion weights not found: {p}")
    return load_diffusers_folder(p) if p.is_dir() else load_sd_checkpoint(p)


# ----------------------------------------------------------------------------------------------------------
# The conditioning paths DiffBIR uses
# ----------------------------------------------------------------------------------------------------------
def encode_text(text_encoder: CLIPTextModel, tokens: torch.Tensor) -> torch.Tensor:
    """``c_txt`` (B, 77, W): penultimate OpenCLIP layer + ``ln_final`` for token ids (B, 77), no padding mask."""
    return text_encoder(input_ids=tokens.to(text_encoder.device)).last_hidden_state


def vae_encode(vae: AutoencoderKL, img: torch.Tensor, sample: bool = False,
               generator: torch.Generator | None = None, scale_factor: float = SCALE_FACTOR) -> torch.Tensor:
    """Latent of an image in [0, 1]: posterior mode (``sample=False``, DiffBIR's ``c_img``) or a sample, x scale."""
    dist = vae.encode(img * 2 - 1).latent_dist
    z = dist.sample(generator=generator) if sample else dist.mode()
    return z * scale_factor


def vae_decode(vae: AutoencoderKL, z: torch.Tensor, scale_factor: float = SCALE_FACTOR) -> torch.Tensor:
    """Image in about [-1, 1] from a scaled latent (DiffBIR's ``vae_decode``: decoder of ``z / scale``)."""
    return vae.decode(z / scale_factor).sample
