"""MCFormer: BlindDiff's modulated conditional transformer denoiser (Li et al., "BlindDiff", 2024, Sec. 3.3).

A Restormer U-Net over ``cat(x_t, bicubic_up(y))`` whose every block is shift/scale-modulated by
``t_emb + k_emb``, where ``k_emb`` embeds the blur kernel estimated from (x_t, y) by a small CNN.
``forward`` returns ``(out, kernel)``: out = (eps, v) with v the learned-range variance value, kernel the estimate.

Two variants (``MCFormerConfig.variant``):

* ``official`` (default): the released code (lifengcs/BlindDiff ``basicsr/archs/blinddiff_arch.py``), the
  26,509,267-parameter model of the paper. Kernel estimator: six 5x5 convs (the 4th with stride 2) + LReLU(0.2),
  global average pool, 1x1 conv to k*k = 441 logits, softmax -> the full 21x21 kernel (B, 441), row-major.
  Kernel MLP 441 -> dim -> dim. State-dict keys are identical to the official ones (official checkpoints load
  strictly, see :func:`load_official`).
* ``paper``: the paper's description. Four 5x5 convs (the 3rd with stride 2, keeping the official "stride 2 after
  three full-resolution convs" layout as far as four convs allow) + LReLU(0.2), global average pool, 1x1 conv to
  ``pca_dim`` = 10 -> the kernel's PCA code (B, 10), no softmax (a code, not a kernel). Kernel MLP 10 -> dim -> dim.
  The PCA basis (k*k, pca_dim) and mean (k*k,) are persistent buffers (saved with the weights);
  :meth:`MCFormer.decode_kernel` maps a code to the (B, k, k) kernel as ``mean + code @ basisᵀ``. With the
  mean of the fitted kernels stored, decoded kernels sum to 1 (each principal component of kernels that all
  sum to 1 sums to 0); with a zero mean (the DAN/IKC convention of encoding without centring) they need not.

``modulation=False`` (either variant): the "w/o modulation" ablation of MCFormer's kernel/time modulation
(Sec. 3.3). The blocks are plain pre-norm Restormer blocks (x + MDTA(LN(x)), x + GDFN(LN(x))) with no
``modulation`` Linear, and ``t_embedder`` / ``k_mlp`` are not built: with no modulation neither embedding has a
path to the output (building them would leave dead parameters, which also breaks multi-GPU DDP). The network is
then conditioned on the noise level only through x_t itself (a noise-blind denoiser, which works for Gaussian
diffusion: the noise level is visible in x_t), and the kernel head still estimates k from cat(x_t, y_up) for the
kernel loss and the kernel-aware guidance. Neither the paper nor the released code specifies how the ablated
model keeps time conditioning (the official code has no switch); this is the plain reading. Full config:
25,206,355 parameters (vs 26,509,267).
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blindsr.errors import BlindSRError, WeightsError
from blindsr.io.weights import load_into, load_state_dict
from blindsr.models.restormer_blocks import (
    Downsample,
    ModulatedBlock,
    PatchEmbed,
    TimestepEmbedder,
    Upsample,
    run_blocks,
)

VARIANTS = ("official", "paper")
_OFFICIAL_ALIASES = {"inp_channels": "in_channels", "LayerNorm_type": "layernorm_type"}


@dataclass
class MCFormerConfig:
    """MCFormer hyper-parameters. Defaults are the official full model (every official yml; 26,509,267 params)."""

    in_channels: int = 3  # image channels; the network sees cat(x_t, y_up) = 2 * in_channels
    out_channels: int = 6  # 2 * in_channels: eps + learned-range variance value (learn_sigma); in_channels: eps only
    dim: int = 48  # level-1 width; levels are dim * (1, 2, 4, 8); also the t/k embedding width
    num_blocks: tuple[int, int, int, int] = (2, 3, 6, 8)  # transformer blocks per level (decoder mirrors encoder)
    num_refinement_blocks: int = 2  # blocks after decoder level 1 (width 2 * dim)
    heads: tuple[int, int, int, int] = (1, 2, 4, 8)  # MDTA heads per level
    ffn_expansion_factor: float = 2.66  # GDFN hidden = int(C * factor)
    bias: bool = False  # bias of the 1x1/dw convs in MDTA/GDFN, the reduce convs and the output conv
    layernorm_type: str = "WithBias"  # "WithBias" or "BiasFree" (Restormer)
    scale: int = 4  # SR factor: the LR condition is bicubic-upsampled by this inside the model
    kernel_size: int = 21  # blur kernel side; the official head predicts kernel_size**2 = 441 values
    variant: str = "official"  # "official" (released code) or "paper" (4 convs, PCA code)
    pca_dim: int = 10  # kernel code length (variant "paper" only)
    modulation: bool = True  # t/k shift-scale modulation of every block; False = "w/o modulation" ablation

    def __post_init__(self) -> None:
        self.num_blocks = tuple(int(n) for n in self.num_blocks)
        self.heads = tuple(int(n) for n in self.heads)
        if self.variant not in VARIANTS:
            raise BlindSRError(f"MCFormer variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.layernorm_type not in ("WithBias", "BiasFree"):
            raise BlindSRError(f"layernorm_type must be 'WithBias' or 'BiasFree', got {self.layernorm_type!r}")
        if len(self.num_blocks) != 4 or len(self.heads) != 4:
            raise BlindSRError(f"num_blocks and heads need 4 entries, got {self.num_blocks} and {self.heads}")
        if self.out_channels not in (self.in_channels, 2 * self.in_channels):
            raise BlindSRError(f"out_channels must be {self.in_channels} or {2 * self.in_channels}, "
                               f"got {self.out_channels}")
        widths = (self.dim, 2 * self.dim, 4 * self.dim, 8 * self.dim)
        for level, (c, h) in enumerate(zip(widths, self.heads, strict=True)):
            if c % h or (level == 0 and (2 * c) % h):
                raise BlindSRError(f"level {level + 1}: width {c} is not divisible by {h} heads")
        if self.dim % 2:
            raise BlindSRError(f"dim must be even (sin/cos time embedding), got {self.dim}")

    def activation_bytes_per_pixel(self, grad: bool) -> float:
        """Rough peak activation memory of one forward pass per output pixel (fp32), for choosing tile sizes:
        ``dim`` times the blocks weighted by their width x resolution (level l: 2^(l-1) dim at 1/4^(l-1) of
        the pixels; decoder level 1 and the refinement run at 2 dim), times bytes per unit measured on CPU
        (with grad, i.e. a guided step: the small config 147-164 B at 256²-512² outputs since the blocks work on
        channels-last views, taken as 170; a no-grad forward: about a fifth)."""
        b = self.num_blocks
        units = b[0] + b[1] / 2 + b[2] / 4 + b[3] / 8 + b[2] / 4 + b[1] / 2 + 2 * b[0] + 2 * self.num_refinement_blocks
        return self.dim * units * (170.0 if grad else 40.0)

    @property
    def learn_sigma(self) -> bool:
        """True when the model also outputs the learned-range variance value (out_channels = 2 * in_channels)."""
        return self.out_channels == 2 * self.in_channels

    @classmethod
    def full(cls, **overrides: Any) -> MCFormerConfig:
        """The official full model (26,509,267 parameters)."""
        return cls(**overrides)

    @classmethod
    def small(cls, **overrides: Any) -> MCFormerConfig:
        """A smaller model for CPU use/training on a budget (not in the paper): dim 32, blocks [1,2,2,4]."""
        kw: dict[str, Any] = dict(dim=32, num_blocks=(1, 2, 2, 4), num_refinement_blocks=1, heads=(1, 2, 4, 8))
        return cls(**{**kw, **overrides})

    @classmethod
    def tiny(cls, **overrides: Any) -> MCFormerConfig:
        """The conformance fixture's tiny config (880,496 parameters)."""
        kw: dict[str, Any] = dict(dim=16, num_blocks=(1, 1, 1, 1), num_refinement_blocks=1, heads=(1, 1, 2, 2))
        return cls(**{**kw, **overrides})

    @classmethod
    def from_official(cls, d: dict[str, Any]) -> MCFormerConfig:
        """``blindsr.config.from_dict`` that also accepts the official constructor kwargs (inp_channels,
        LayerNorm_type, dual_pixel_task=False, learn_sigma consistent with out_channels)."""
        from blindsr.config import from_dict

        kw: dict[str, Any] = {}
        learn_sigma = None
        for key, value in d.items():
            key = _OFFICIAL_ALIASES.get(key, key)
            if key == "dual_pixel_task":
                if value:
                    raise BlindSRError("MCFormer: dual_pixel_task=True (Restormer defocus deblurring) is not supported")
            elif key == "learn_sigma":
                learn_sigma = bool(value)
            else:
                kw[key] = value
        cfg = from_dict(cls, kw, "model")
        if learn_sigma is not None and learn_sigma != cfg.learn_sigma:
            raise BlindSRError(f"MCFormer config: learn_sigma={learn_sigma} contradicts out_channels={cfg.out_channels}")
        return cfg


def _conv_lrelu(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 5, stride=stride, padding=2), nn.LeakyReLU(0.2)]


def kernel_predictor(cfg: MCFormerConfig) -> nn.Sequential:
    """The kernel estimator (BlindDiff Sec. 3.3) on cat(x_t, y_up); returns logits / code as (B, n, 1, 1).

    official: indices 0..10 = six 5x5 convs (stride 2 at index 6) with LReLU, 12 = pool, 13 = 1x1 conv to k*k.
    paper:    indices 0..6 = four 5x5 convs (stride 2 at index 4) with LReLU, 8 = pool, 9 = 1x1 conv to pca_dim.
    """
    c, d = 2 * cfg.in_channels, cfg.dim
    if cfg.variant == "official":
        strides, n_out = (1, 1, 1, 2, 1, 1), cfg.kernel_size**2
    else:
        strides, n_out = (1, 1, 2, 1), cfg.pca_dim
    layers: list[nn.Module] = []
    for i, s in enumerate(strides):
        layers += _conv_lrelu(c if i == 0 else d, d, s)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Conv2d(d, n_out, 1))


class MCFormer(nn.Module):
    """BlindDiff denoiser. ``forward(x_t, t, cond) -> (out (B, out_channels, H, W), kernel)``.

    kernel is (B, k*k) softmax-normalised (official) or the (B, pca_dim) PCA code (paper); the batch dim is
    always kept. Use :meth:`kernel_from_output` to get (B, k, k) kernels in either variant.
    """

    def __init__(self, config: MCFormerConfig | None = None, pca_basis: Tensor | None = None,
                 pca_mean: Tensor | None = None):
        super().__init__()
        cfg = self.config = config or MCFormerConfig()
        d, nb, hd = cfg.dim, cfg.num_blocks, cfg.heads
        self.gradient_checkpointing = False  # set True to trade compute for memory in training
        self.compiled_blocks = False  # set True to run the blocks through torch.compile (`blindsr sr --compile`)

        def stage(width: int, heads: int, n: int) -> nn.ModuleList:
            return nn.ModuleList(ModulatedBlock(width, heads, cfg.ffn_expansion_factor, cfg.bias,
                                                cfg.layernorm_type, emb_dim=d if cfg.modulation else None)
                                 for _ in range(n))

        # Registration order = official state-dict key order.
        self.t_embedder = TimestepEmbedder(d) if cfg.modulation else None
        self.patch_embed = PatchEmbed(2 * cfg.in_channels, d)
        self.predictor = kernel_predictor(cfg)
        self.encoder_level1 = stage(d, hd[0], nb[0])
        self.down1_2 = Downsample(d)
        self.encoder_level2 = stage(2 * d, hd[1], nb[1])
        self.down2_3 = Downsample(2 * d)
        self.encoder_level3 = stage(4 * d, hd[2], nb[2])
        self.down3_4 = Downsample(4 * d)
        self.latent = stage(8 * d, hd[3], nb[3])
        self.up4_3 = Upsample(8 * d)
        self.reduce_chan_level3 = nn.Conv2d(8 * d, 4 * d, 1, bias=cfg.bias)
        self.decoder_level3 = stage(4 * d, hd[2], nb[2])
        self.up3_2 = Upsample(4 * d)
        self.reduce_chan_level2 = nn.Conv2d(4 * d, 2 * d, 1, bias=cfg.bias)
        self.decoder_level2 = stage(2 * d, hd[1], nb[1])
        self.up2_1 = Upsample(2 * d)  # level 1: no reduce conv, decoder runs at 2 * dim
        self.decoder_level1 = stage(2 * d, hd[0], nb[0])
        self.refinement = stage(2 * d, hd[0], cfg.num_refinement_blocks)
        k_in = cfg.kernel_size**2 if cfg.variant == "official" else cfg.pca_dim
        self.k_mlp = nn.Sequential(nn.Linear(k_in, d), nn.Mish(), nn.Linear(d, d)) if cfg.modulation else None
        self.output = nn.Conv2d(2 * d, cfg.out_channels, 3, padding=1, bias=cfg.bias)
        if cfg.variant == "paper":
            self.register_buffer("pca_basis", torch.zeros(cfg.kernel_size**2, cfg.pca_dim))
            self.register_buffer("pca_mean", torch.zeros(cfg.kernel_size**2))
            if pca_basis is not None:
                self.set_pca(pca_basis, pca_mean)
        elif pca_basis is not None:
            raise BlindSRError("MCFormer: pca_basis is only used by variant='paper'")

    # ---- kernel helpers -------------------------------------------------------------------------------------
    def set_pca(self, basis: Tensor, mean: Tensor | None = None) -> None:
        """Set the (k*k, pca_dim) PCA basis and optional (k*k,) mean (variant 'paper')."""
        if self.config.variant != "paper":
            raise BlindSRError("MCFormer.set_pca: only variant='paper' uses a PCA basis")
        n, p = self.config.kernel_size**2, self.config.pca_dim
        if tuple(basis.shape) != (n, p):
            raise BlindSRError(f"PCA basis must have shape ({n}, {p}), got {tuple(basis.shape)}")
        if mean is not None and tuple(mean.reshape(-1).shape) != (n,):
            raise BlindSRError(f"PCA mean must have {n} entries, got shape {tuple(mean.shape)}")
        with torch.no_grad():
            self.pca_basis.copy_(basis)
            self.pca_mean.copy_(mean.reshape(-1) if mean is not None else torch.zeros(n))

    def decode_kernel(self, code: Tensor) -> Tensor:
        """PCA code (B, pca_dim) -> kernel (B, k, k) = mean + code @ basisᵀ, in fp32 (variant 'paper')."""
        if self.config.variant != "paper":
            raise BlindSRError("MCFormer.decode_kernel: only variant='paper' predicts a PCA code")
        if not bool(self.pca_basis.any()):
            raise BlindSRError("MCFormer: the PCA basis is not set (pass pca_basis= or call set_pca)")
        dt = torch.promote_types(code.dtype, torch.float32)
        flat = self.pca_mean.to(dt) + code.to(dt) @ self.pca_basis.to(dt).T
        return flat.reshape(-1, self.config.kernel_size, self.config.kernel_size)

    def kernel_from_output(self, kernel: Tensor) -> Tensor:
        """The model's kernel output -> (B, k, k) kernels (row-major reshape, or PCA decode), both variants."""
        if self.config.variant == "paper":
            return self.decode_kernel(kernel)
        k = self.config.kernel_size
        return kernel.reshape(-1, k, k)

    # ---- forward ----------------------------------------------------------------------------------------------
    def _check_inputs(self, x_t: Tensor, cond: Tensor) -> None:
        cfg = self.config
        if x_t.ndim != 4 or x_t.shape[1] != cfg.in_channels:
            raise BlindSRError(f"MCFormer: x_t must be (B, {cfg.in_channels}, H, W), got {tuple(x_t.shape)}")
        h, w = x_t.shape[-2:]
        if h % 8 or w % 8:
            raise BlindSRError(f"MCFormer: H and W must be divisible by 8 (three 2x downsamplings), got {h}x{w}")
        want = (x_t.shape[0], cfg.in_channels, h // cfg.scale, w // cfg.scale)
        if tuple(cond.shape) != want or h % cfg.scale or w % cfg.scale:
            raise BlindSRError(f"MCFormer: cond must be {want} for x_t of size {h}x{w} at scale {cfg.scale}, "
                               f"got {tuple(cond.shape)}")

    def predict_kernel(self, a: Tensor) -> Tensor:
        """Kernel head on a = cat(x_t, y_up): (B, k*k) softmax kernel (official, fp32) or (B, pca_dim) code."""
        logits = self.predictor(a).flatten(1)
        if self.config.variant == "paper":
            return logits
        return logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=1)

    def head_input(self, x_t: Tensor, cond: Tensor) -> Tensor:
        """a = cat(x_t, bicubic↑cond): the input of both the kernel head and the denoiser's patch embedding."""
        up_dtype = torch.promote_types(cond.dtype, torch.float32)  # bicubic a=-0.75, no antialias, no clamp
        cond_up = F.interpolate(cond.to(up_dtype), scale_factor=self.config.scale, mode="bicubic",
                                align_corners=False).to(x_t.dtype)
        # channels-last from here on: the blocks work on (B, H, W, C) views (restormer_blocks), convs keep it
        return torch.cat([x_t, cond_up], dim=1).contiguous(memory_format=torch.channels_last)

    def forward(self, x_t: Tensor, t: Tensor | int | float, cond: Tensor,
                kernel_only: bool = False) -> tuple[Tensor | None, Tensor]:
        """x_t (B, C, H, W) noisy HR sample; t (B,) ORIGINAL 0..999 timesteps; cond (B, C, H/s, W/s) LR in [0, 1].

        ``kernel_only``: run the kernel head alone and return (None, kernel) (training the head: no denoiser).
        """
        self._check_inputs(x_t, cond)
        b = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(b) if t.ndim == 0 else t.reshape(b)
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()

        a = self.head_input(x_t, cond)
        kernel = self.predict_kernel(a)
        if kernel_only:
            return None, kernel
        emb = None  # modulation=False: plain Restormer blocks, t and k do not reach them
        if self.config.modulation:  # t_emb + k_emb drives every block's modulation (Fig. 3)
            emb = self.t_embedder(t) + self.k_mlp(kernel.to(self.k_mlp[0].weight.dtype))

        with _recompile_room(self.compiled_blocks):
            blocks = functools.partial(run_blocks, emb=emb, use_checkpoint=ckpt, compiled=self.compiled_blocks)
            enc1 = blocks(self.encoder_level1, self.patch_embed(a))
            enc2 = blocks(self.encoder_level2, self.down1_2(enc1))
            enc3 = blocks(self.encoder_level3, self.down2_3(enc2))
            lat = blocks(self.latent, self.down3_4(enc3))
            dec3 = blocks(self.decoder_level3, self.reduce_chan_level3(torch.cat([self.up4_3(lat), enc3], dim=1)))
            dec2 = blocks(self.decoder_level2, self.reduce_chan_level2(torch.cat([self.up3_2(dec3), enc2], dim=1)))
            dec1 = blocks(self.decoder_level1, torch.cat([self.up2_1(dec2), enc1], dim=1))
            dec1 = blocks(self.refinement, dec1)
        residual = torch.cat([x_t, x_t], dim=1) if self.config.learn_sigma else x_t  # added to BOTH halves
        return (self.output(dec1) + residual).contiguous(), kernel


def _recompile_room(compiled: bool):
    """Compiled blocks need 5 graphs per input shape and grad mode (dynamo's default limit is 8 per function):
    room for about 12 shapes / modes before it would fall back to eager."""
    if not compiled:
        return contextlib.nullcontext()
    import torch._dynamo

    return torch._dynamo.config.patch(recompile_limit=max(64, torch._dynamo.config.recompile_limit))


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (buffers such as the PCA basis are not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# ---- loading official / BasicSR checkpoints ---------------------------------------------------------------------
def _block_count(sd: dict[str, Tensor], stage: str) -> int:
    idx = {int(k.split(".")[1]) for k in sd if k.startswith(stage + ".") and k.split(".")[1].isdigit()}
    return max(idx) + 1 if idx else 0


def _infer_ffn_factor(sd: dict[str, Tensor], dim: int, stages: tuple[str, ...]) -> float:
    """The GDFN factor f with int(C * f) = hidden at every level: 2.66 when it fits, else the simplest
    value read off the widest level."""
    hidden = {dim * 2**i: int(sd[f"{s}.0.ffn.project_out.weight"].shape[1]) for i, s in enumerate(stages)}
    ratio = hidden[8 * dim] / (8 * dim)
    for f in (2.66, round(ratio, 2), round(ratio, 4), ratio + 1e-9):
        if all(int(c * f) == h for c, h in hidden.items()):
            return f
    raise WeightsError(f"MCFormer state dict: GDFN widths {hidden} fit no single ffn_expansion_factor")


def infer_config(sd: dict[str, Tensor], scale: int = 4) -> MCFormerConfig:
    """Infer an :class:`MCFormerConfig` from an (official or blindsr) MCFormer state dict.

    dim / in_channels from ``patch_embed``, block counts by counting, heads from ``attn.temperature``, the FFN
    factor from the hidden width, bias / LayerNorm type / modulation from key presence, the variant and the
    kernel size / code length from the kernel head (and the PCA basis).
    ``scale`` cannot be seen in the weights (default 4, as in every official config).
    """
    try:
        pe = sd["patch_embed.proj.weight"]
        dim, in_channels = int(pe.shape[0]), int(pe.shape[1]) // 2
        stages = ("encoder_level1", "encoder_level2", "encoder_level3", "latent")
        num_blocks = tuple(_block_count(sd, s) for s in stages)
        heads = tuple(int(sd[f"{s}.0.attn.temperature"].shape[0]) for s in stages)
        variant = "official" if "predictor.13.weight" in sd else "paper"
        n_k = int(sd["predictor.13.weight" if variant == "official" else "predictor.9.weight"].shape[0])
        kernel_size = math.isqrt(n_k) if variant == "official" else math.isqrt(int(sd["pca_basis"].shape[0]))
        cfg = dict(in_channels=in_channels, out_channels=int(sd["output.weight"].shape[0]), dim=dim,
                   num_blocks=num_blocks, num_refinement_blocks=_block_count(sd, "refinement"), heads=heads,
                   ffn_expansion_factor=_infer_ffn_factor(sd, dim, stages),
                   bias="output.bias" in sd,
                   layernorm_type="WithBias" if "encoder_level1.0.norm1.body.bias" in sd else "BiasFree",
                   scale=scale, kernel_size=kernel_size, variant=variant,
                   pca_dim=n_k if variant == "paper" else MCFormerConfig.pca_dim,
                   modulation="encoder_level1.0.modulation.1.weight" in sd)
    except (KeyError, IndexError, AttributeError) as e:
        raise WeightsError(f"not an MCFormer/BlindDiff state dict (cannot infer its config: missing {e})") from None
    return MCFormerConfig(**cfg)


def load_official(source: str | Path | dict[str, Tensor], config: MCFormerConfig | None = None,
                  scale: int = 4) -> MCFormer:
    """Build an MCFormer from an official BlindDiff checkpoint (or any MCFormer state dict), loaded strictly.

    ``source``: a path (.pth BasicSR checkpoint, ``params_ema`` preferred over ``params``; bare state dict;
    .safetensors) or an in-memory checkpoint / state dict. ``config``: inferred from the weights when None
    (see :func:`infer_config`). Mismatching weights raise a one-line :class:`WeightsError`.
    """
    sd = _unwrap(source) if isinstance(source, dict) else load_state_dict(source)
    model = MCFormer(config or infer_config(sd, scale=scale))
    load_into(model, sd, strict=True)
    return model.eval()


def _unwrap(ckpt: dict[str, Any]) -> dict[str, Tensor]:
    """Unwrap an in-memory BasicSR / Lightning checkpoint dict (params_ema > params > state_dict; strip module.)."""
    for key in ("params_ema", "params", "state_dict"):
        if isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            break
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in ckpt.items()}


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model inside DDP / ``torch.compile`` / Accelerate wrappers (accelerate's
    ``extract_model_from_parallel``)."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model)


def predicted_kernels(model: nn.Module, raw: Tensor) -> Tensor:
    """A (possibly wrapped) model's kernel output -> (B, k, k) kernels in fp32."""
    bare = unwrap_model(model)
    if hasattr(bare, "kernel_from_output"):
        return bare.kernel_from_output(raw).float()
    k = math.isqrt(raw.shape[-1])
    return raw.float().reshape(-1, k, k)
