"""DiffBIR's controlled denoiser: official ``ControlLDM.forward`` + classifier-free guidance + tiling.

The unconditional branch uses the negative prompt with the *same* condition latent ``c_img`` (so CFG contrasts
text only); ``cfg == 1`` runs the conditional branch alone. With a ``tile`` the latent is cut into overlapping
windows at every call (``blindsr.diffusion.tiling.tiled``), the ControlNet sees the matching crop of ``c_img``,
and the outputs are blended with Gaussian weights (MultiDiffusion-style; official ``--cldm_tiled``, Gaussian
sigma 0.1 of the tile as the official weights). The output is the raw UNet prediction (eps or v), wrapped as a
``ModelOutput`` for the shared sampling loop.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from blindsr.diffusion.samplers import ModelOutput
from blindsr.diffusion.tiling import tiled
from blindsr.models.ircontrolnet import controlled_unet
from blindsr.ops.tiling import Box


def cfg_rescale(t: Tensor, cfg: float, T: int = 1000) -> Tensor:
    """Official ``--rescale_cfg``: cfg_t = 1 + cfg * (1 - cos(pi * ((T - t) / T) ** 5)) / 2."""
    return 1 + cfg * (1 - torch.cos(math.pi * ((T - t.float()) / T) ** 5)) / 2


class CLDMDenoiser:
    """``(z_t, t) -> ModelOutput`` (the UNet's eps or v) with the control branch, CFG and optional tiling."""

    def __init__(self, unet: nn.Module, controlnet: nn.Module, c_img: Tensor, c_txt: Tensor,
                 c_txt_uncond: Tensor | None = None, *, cfg: float = 1.0, rescale_cfg: bool = False,
                 strength: float = 1.0, tile: int = 0, overlap: int = 32, sigma: float = 0.1,
                 batch_cfg: bool = True, dtype: torch.dtype | None = None, prediction: str = "eps"):
        self.unet, self.controlnet = unet, controlnet
        self.c_img, self.c_txt, self.c_txt_uncond = c_img, c_txt, c_txt_uncond
        self.cfg, self.rescale_cfg, self.strength, self.batch_cfg = cfg, rescale_cfg, strength, batch_cfg
        self.dtype = dtype or next(unet.parameters()).dtype
        self.tile, self.overlap, self.sigma = tile, overlap, sigma
        self.prediction = prediction
        self.calls = 0  # network evaluations (cond + uncond count once each); for benchmarks

    def _net(self, z: Tensor, t: Tensor, c_img: Tensor, c_txt: Tensor) -> Tensor:
        self.calls += 1
        z, c_img, c_txt = z.to(self.dtype), c_img.to(self.dtype), c_txt.to(self.dtype)
        controls = self.controlnet(z, t, c_img, c_txt)
        return controlled_unet(self.unet, z, t, c_txt, controls, self.strength).float()

    def _guided(self, z: Tensor, t: Tensor, box: Box | None = None) -> Tensor:
        """CFG on one window: ``uncond + cfg * (cond - uncond)`` (official order)."""
        c_img = self.c_img if box is None else self.c_img[..., box.slices[0], box.slices[1]]
        if self.c_txt_uncond is None or (self.cfg == 1 and not self.rescale_cfg):
            return self._net(z, t, c_img, self.c_txt)
        if self.batch_cfg:
            out = self._net(torch.cat([z, z]), torch.cat([t, t]), torch.cat([c_img, c_img]),
                            torch.cat([self.c_txt, self.c_txt_uncond]))
            cond, uncond = out.chunk(2)
        else:
            cond = self._net(z, t, c_img, self.c_txt)
            uncond = self._net(z, t, c_img, self.c_txt_uncond)
        scale = cfg_rescale(t, self.cfg).view(-1, 1, 1, 1) if self.rescale_cfg else self.cfg
        return uncond + scale * (cond - uncond)

    def __call__(self, z: Tensor, t: Tensor) -> ModelOutput:
        t = torch.as_tensor(t, device=z.device).reshape(-1).expand(z.shape[0])
        h, w = z.shape[-2:]
        if self.tile <= 0 or (h <= self.tile and w <= self.tile):
            return ModelOutput(self._guided(z, t), self.prediction)
        fn = tiled(lambda x, tt, box: ModelOutput(self._guided(x, tt, box), self.prediction), self.tile,
                   self.overlap, align=1, sigma=self.sigma, pass_box=True)
        return fn(z, t)
