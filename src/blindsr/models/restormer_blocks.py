"""Restormer building blocks with BlindDiff's time+kernel modulation (MCFormer).

Restormer (Zamir et al., CVPR 2022): channel LayerNorm, MDTA (multi-Dconv head transposed attention, Sec. 3.1),
GDFN (gated-Dconv feed-forward network, Sec. 3.2). BlindDiff (Li et al., 2024, Sec. 3.3 / Fig. 3) adds a DiT-style
shift/scale of each sub-layer's LayerNorm'd input, driven by ``Mish(t_emb + k_emb)`` (no gate).
With ``emb_dim=None`` a block is the plain pre-norm Restormer block (the "w/o modulation" ablation).

Module and attribute names follow the official code so that official state dicts load with no renaming.
Precision: LayerNorm, the L2-normalisation of q/k, q·kᵀ and the attention softmax run in (at least) fp32,
also under bf16 autocast or with bf16 weights.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def _fp32_or_wider(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, the dtype itself for float32/float64."""
    return torch.promote_types(dtype, torch.float32)


def sinusoidal_embedding(t: Tensor, dim: int) -> Tensor:
    """BlindDiff's timestep encoding: ``[sin(t f), cos(t f)]`` (sin FIRST), ``f_j = exp(-ln(1e4) j / (dim/2))``.

    ``t`` holds the original 0..999 indices, shape (B,). Computed in fp32 (fp64 when ``t`` is fp64).
    Note the order is the reverse of guided-diffusion / Stable Diffusion (cos first).
    """
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    half = dim // 2
    freqs = torch.exp(-math.log(1e4) * (torch.arange(half, device=t.device, dtype=dtype) / half))
    args = t.to(dtype)[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


class SinusoidalEncoding(nn.Module):
    """Parameter-free module wrapper of :func:`sinusoidal_embedding` (index 0 of ``t_embedder``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: Tensor) -> Tensor:
        return sinusoidal_embedding(t, self.dim)


class TimestepEmbedder(nn.Sequential):
    """``t_embedder``: encoding -> Linear(dim, 4dim) -> Mish -> Linear(4dim, dim) (keys t_embedder.1 / .3)."""

    def __init__(self, dim: int):
        super().__init__(SinusoidalEncoding(dim), nn.Linear(dim, 4 * dim), nn.Mish(), nn.Linear(4 * dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        emb = self[0](t).to(self[1].weight.dtype)
        return self[3](self[2](self[1](emb)))


def _nhwc(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H, W, C): a free view of a channels-last tensor (a copy otherwise)."""
    return x.permute(0, 2, 3, 1)


def _nchw(x: Tensor) -> Tensor:
    """(B, H, W, C) -> (B, C, H, W), channels-last in memory (a free view)."""
    return x.permute(0, 3, 1, 2)


def _pointwise(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """A 1x1 conv on a (B, H, W, C) tensor: one matrix product over all pixels (F.linear)."""
    return F.linear(x, conv.weight.view(conv.weight.shape[0], -1), conv.bias)


def _split_1x1_dw(x: Tensor, pw: nn.Conv2d, dw: nn.Conv2d, parts: int) -> tuple[Tensor, ...]:
    """``DWConv3x3(Conv1x1(x)).chunk(parts, -1)`` computed part by part on a (B, H, W, C) tensor (the depthwise
    conv on the channels-last view: oneDNN's channels-last kernel, about 2x the NCHW one).

    Both convs act channel by channel on their output, so each part uses its slice of the weights and the
    results are the same. The parts come out contiguous (no strided views of one wide tensor), and the
    backward has no concatenation of the parts' gradients (autograd's chunk backward); each part is 1/parts
    the size, which on CPU keeps level-1 maps under glibc's 32 MiB mmap threshold at 256² outputs."""
    n = pw.out_channels // parts
    w_pw = pw.weight.view(pw.out_channels, -1)
    out = []
    for i in range(parts):
        sl = slice(i * n, (i + 1) * n)
        y = F.linear(x, w_pw[sl], None if pw.bias is None else pw.bias[sl])
        y = F.conv2d(_nchw(y), dw.weight[sl], None if dw.bias is None else dw.bias[sl], padding=dw.padding,
                     groups=n)
        out.append(_nhwc(y))
    return tuple(out)


class _LayerNormBody(nn.Module):
    """Per-pixel LayerNorm over channels, in fp32 (eps 1e-5, biased variance).

    ``WithBias``: (x - mu) / sqrt(var + eps) * w + b.  ``BiasFree``: x / sqrt(var + eps) * w (no centring,
    as in Restormer). :meth:`nhwc` works on (B, H, W, C) (one fused ``F.layer_norm`` for WithBias) and can
    apply a per-sample modulation after it, LN(x)(1 + scale) + shift, as one fused multiply-add.
    """

    def __init__(self, channels: int, with_bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels)) if with_bias else None

    def nhwc(self, x: Tensor, shift: Tensor | None = None, scale: Tensor | None = None) -> Tensor:
        x32 = x.to(_fp32_or_wider(x.dtype))
        w = self.weight.to(x32.dtype)
        if self.bias is None:
            y = x32 * torch.rsqrt(torch.var(x32, dim=-1, keepdim=True, correction=0) + 1e-5) * w
        else:
            y = F.layer_norm(x32, (x32.shape[-1],), w, self.bias.to(x32.dtype), 1e-5)
        if shift is not None:  # the per-sample modulation, one fused multiply-add
            y = torch.addcmul(shift[:, None, None].to(y.dtype), y, 1 + scale[:, None, None].to(y.dtype))
        return y.to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return _nchw(self.nhwc(_nhwc(x)))


class LayerNorm(nn.Module):
    """Channel LayerNorm; holds its parameters in ``body`` (keys ``normN.body.weight/bias``)."""

    def __init__(self, channels: int, layernorm_type: str = "WithBias"):
        super().__init__()
        self.body = _LayerNormBody(channels, with_bias=layernorm_type != "BiasFree")

    def nhwc(self, x: Tensor, shift: Tensor | None = None, scale: Tensor | None = None) -> Tensor:
        return self.body.nhwc(x, shift, scale)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class MDTA(nn.Module):
    """Multi-Dconv head transposed attention (Restormer Eq. 2): attention over channels, linear in H*W.

    q, k, v = split(DWConv3x3(Conv1x1(x))); per head (contiguous channel groups) q and k are L2-normalised
    along the spatial axis; A = softmax(q kᵀ * temperature) is (C/heads x C/heads); out = Conv1x1(A v).
    Computed on (B, H, W, C) views: q, k and v stay in the layout the depthwise conv wrote them.
    """

    def __init__(self, channels: int, num_heads: int, bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Conv2d(channels, 3 * channels, 1, bias=bias)
        self.qkv_dwconv = nn.Conv2d(3 * channels, 3 * channels, 3, padding=1, groups=3 * channels, bias=bias)
        self.project_out = nn.Conv2d(channels, channels, 1, bias=bias)

    def nhwc(self, x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        q, k, v = (t.reshape(b, h * w, self.num_heads, -1).transpose(1, 2)  # (B, heads, HW, C/heads) views
                   for t in _split_1x1_dw(x, self.qkv, self.qkv_dwconv, 3))
        with torch.autocast(x.device.type, enabled=False):  # norms, q kᵀ and softmax in fp32
            dt = _fp32_or_wider(q.dtype)
            q, k = q.to(dt), k.to(dt)
            # normalize(q)ᵀ normalize(k) (L2 along the pixels, F.normalize's eps) formed as (qᵀk) / (|q| |k|ᵀ):
            # the division touches the (C/heads)² scores instead of every pixel, forward and backward
            nq = torch.linalg.vector_norm(q, dim=2).clamp_min(1e-12)  # (B, heads, C/heads)
            nk = torch.linalg.vector_norm(k, dim=2).clamp_min(1e-12)
            scores = q.transpose(-2, -1) @ k / (nq[..., :, None] * nk[..., None, :])
            attn = (scores * self.temperature.to(dt)).softmax(dim=-1)
        out = v @ attn.to(v.dtype).transpose(-2, -1)  # (B, heads, HW, C/heads) = (A v)ᵀ
        return _pointwise(out.transpose(1, 2).reshape(b, h, w, c), self.project_out)

    def forward(self, x: Tensor) -> Tensor:
        return _nchw(self.nhwc(_nhwc(x)))


class GDFN(nn.Module):
    """Gated-Dconv feed-forward network (Restormer Eq. 3): Conv1x1(GELU(x1) * x2), [x1, x2] = DWConv(Conv1x1(x))."""

    def __init__(self, channels: int, expansion: float, bias: bool):
        super().__init__()
        hidden = int(channels * expansion)
        self.project_in = nn.Conv2d(channels, 2 * hidden, 1, bias=bias)
        self.dwconv = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden, bias=bias)
        self.project_out = nn.Conv2d(hidden, channels, 1, bias=bias)

    def nhwc(self, x: Tensor) -> Tensor:
        x1, x2 = _split_1x1_dw(x, self.project_in, self.dwconv, 2)
        return _pointwise(F.gelu(x1) * x2, self.project_out)  # exact (erf) GELU

    def forward(self, x: Tensor) -> Tensor:
        return _nchw(self.nhwc(_nhwc(x)))


class ModulatedBlock(nn.Module):
    """MCFormer transformer block (BlindDiff Fig. 3): MDTA and GDFN, each on a modulated LayerNorm'd input.

    ``emb`` = t_emb + k_emb, width ``emb_dim`` (the model's ``dim``) whatever the block width C.
    m = Linear(Mish(emb)) is split into shift_attn, scale_attn, shift_ffn, scale_ffn (in that order), then
    x = x + MDTA(LN1(x) (1 + scale_attn) + shift_attn);  x = x + GDFN(LN2(x) (1 + scale_ffn) + shift_ffn).

    ``emb_dim=None``: no ``modulation`` Linear; the plain Restormer block x = x + MDTA(LN1(x));
    x = x + GDFN(LN2(x)) (``emb`` is ignored).

    Input and output are (B, C, H, W); the block works on the (B, H, W, C) view, so a channels-last input
    (what :class:`~blindsr.models.mcformer.MCFormer` passes) costs no copies: 1x1 convs are matrix products,
    LayerNorm is one fused kernel, depthwise convs use the channels-last kernel. Faster forward + backward on
    CPU than the NCHW form (1.2-2x, depending on the load; docs/results.md), equal to it within float rounding.
    """

    def __init__(self, channels: int, num_heads: int, expansion: float, bias: bool, layernorm_type: str,
                 emb_dim: int | None):
        super().__init__()
        self.norm1 = LayerNorm(channels, layernorm_type)
        self.attn = MDTA(channels, num_heads, bias)
        self.norm2 = LayerNorm(channels, layernorm_type)
        self.ffn = GDFN(channels, expansion, bias)
        self.modulation = nn.Sequential(nn.Mish(), nn.Linear(emb_dim, 4 * channels)) if emb_dim else None

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        x = _nhwc(x)
        if self.modulation is None:
            x = x + self.attn.nhwc(self.norm1.nhwc(x))
            return _nchw(x + self.ffn.nhwc(self.norm2.nhwc(x)))
        shift_attn, scale_attn, shift_ffn, scale_ffn = self.modulation(emb).chunk(4, dim=1)
        x = x + self.attn.nhwc(self.norm1.nhwc(x, shift_attn, scale_attn))
        return _nchw(x + self.ffn.nhwc(self.norm2.nhwc(x, shift_ffn, scale_ffn)))


def _call_block(block: nn.Module, x: Tensor, emb: Tensor | None) -> Tensor:
    return block(x, emb)


@functools.cache
def compiled_block_call():
    """``torch.compile`` of one block call, shared by every block of every model (``run_blocks(compiled=True)``).

    The block is an argument, so its parameters are graph inputs: blocks of the same width, heads and input
    shape reuse one compiled graph (an MCFormer needs 5 per input shape and grad mode, instead of one graph
    of the whole network: about 3x less compile time). ``dynamic=False``: a new shape compiles anew (cached
    on disk by inductor), it never falls back to slower dynamic-shape kernels. Inductor fuses the
    element-wise work (LayerNorm + modulation, GELU gate, the q/k normalisation) of forward and backward."""
    return torch.compile(_call_block, dynamic=False)


def run_blocks(blocks: nn.ModuleList, x: Tensor, emb: Tensor | None, use_checkpoint: bool = False,
               compiled: bool = False) -> Tensor:
    """Apply a stage of :class:`ModulatedBlock` in order (optionally with activation checkpointing, or each
    block through :func:`compiled_block_call`)."""
    call = compiled_block_call() if compiled else _call_block
    for block in blocks:
        x = checkpoint(call, block, x, emb, use_reentrant=False) if use_checkpoint else call(block, x, emb)
    return x


class PatchEmbed(nn.Module):
    """Overlapped patch embedding: 3x3 conv, no bias (key ``patch_embed.proj``)."""

    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class Downsample(nn.Module):
    """3x3 conv n -> n/2 (no bias) + PixelUnshuffle(2): (n, H, W) -> (2n, H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels // 2, 3, padding=1, bias=False), nn.PixelUnshuffle(2))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class Upsample(nn.Module):
    """3x3 conv n -> 2n (no bias) + PixelShuffle(2): (n, H, W) -> (n/2, 2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels * 2, 3, padding=1, bias=False), nn.PixelShuffle(2))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)
