"""UDDM's DDM (paper Eqs. 2-4), ``stablesr`` backend: the paper's DDM, built on StableSR (SD 2.1 frozen, a
trainable time-aware encoder and SFT/SPADE layers; ``blindsr.models.sd.stablesr``), on SD VAE latents.

- **Condition** (Eq. 2): as the pixel backend, ``ULR = (LR ↓s) ↑s`` (``ddm.condition``); its latent ``z_c``
  (``2 ULR - 1`` through the VAE encoder, x 0.18215) is what the time-aware encoder sees.
- **Training** (Eq. 3): ``z_0`` = the latent of ``2 LR - 1``; ε-MSE of ``StableSR.eps(q_sample(z_0, t, ε), t,
  c_null, z_c)`` on StableSR's own process (``stablesr.base_process``: T = 1000, LDM linear 0.00085 -> 0.012),
  t ~ U{0..T-1}. Only the encoder and the SPADE layers train (StableSR's stage 1); the SD UNet, the VAE and the
  text encoder are frozen. VAE latents are posterior samples by default (``posterior: sample``, as StableSR's
  ``get_first_stage_encoding``), drawn from the step's generator; ``posterior: mode`` uses the means.
- **Synthesis** (Eq. 4): the condition ``(HR ↓ r s)`` at size HR / r is reflect-padded to whole latent levels
  (``StableSRDDMNet.multiple`` image pixels), encoded, and StableSR's sampler runs from the noised condition
  latent (``stablesr.start_latent``: x_T = sqrt(abar_999) z_c + sqrt(1 - abar_999) ε), ``sample_steps`` respaced
  DDPM steps (200) with the aggregation tiles (``tile`` / ``overlap`` latent px, official 64 / 32); the plain
  SD VAE decoder (no CFW) gives the LR, cropped back, in [0, 1].

The module the trainer sees, :class:`StableSRDDMNet`, holds only the trainable part (``encoder.*`` and
``spade.<i>.*``, i in ``SFTUNet.resnets()`` order) as parameters, so the optimiser, the EMA, the checkpoints
and ``final.safetensors`` hold only those tensors; the frozen UNet and VAE are held by reference
(:class:`FrozenParts`: no submodule, shared by ``copy.deepcopy``). ``load_uddm`` rebuilds the frozen part
from ``StableSRDDM.weights`` (named in the checkpoint's metadata) and loads the trainable part strictly.

The null text context: the text encoder of the weights on "" (official: OpenCLIP of the empty prompt), or a
fixed zero context (``context: zeros``; always so for a random init, which has no text encoder). Random parts
(all of them for ``weights: ""``, the encoder and the SPADE layers when starting from SD 2.1) are drawn from a
fixed seed (:data:`INIT_SEED`) so that a resumed run and ``load_uddm`` rebuild the same frozen part.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blindsr.diffusion import parameterization
from blindsr.diffusion.gaussian import GaussianDiffusion
from blindsr.diffusion.samplers import Generators, randn
from blindsr.errors import BlindSRError, WeightsError
from blindsr.methods.uddm.ddm import DDMConfig, StableSRDDM
from blindsr.models.sd import freeze
from blindsr.models.sd import stablesr as ss
from blindsr.models.sd.tokenizer import CONTEXT_LENGTH
from blindsr.ops.progress import Progress
from blindsr.ops.resize import pad_to_multiple

if TYPE_CHECKING:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

INIT_SEED = 0  # the random parts of a build (see the module docstring)


def stablesr_config(size: str) -> ss.StableSRConfig:
    """``full``: the release's StableSR (SD 2.1 + the released encoder); ``tiny``: the fixture's sizes."""
    return ss.tiny_config() if size == "tiny" else ss.StableSRConfig()


def image_multiple(config: StableSRDDM) -> int:
    """Image sides the DDM takes whole: the VAE's factor x 2^(UNet levels - 1) (64 px full, 16 px tiny)."""
    cfg = stablesr_config(config.size)
    return ss.vae_factor(cfg) * ss.latent_multiple(cfg)


def check_tile(config: StableSRDDM, latent_multiple: int, what: str = "DDM stablesr") -> None:
    """Synthesis tiles must hold whole UNet levels (a config without ``tile``: nothing to check)."""
    tile = getattr(config, "tile", 0)
    if tile % latent_multiple:
        raise BlindSRError(f"{what}: tile {tile} must be a multiple of {latent_multiple} latent px "
                           "(the UNet's levels)")


class FrozenParts:
    """The frozen SFT UNet and VAE, held by reference: not submodules (never in a state dict, an optimiser or a
    DDP broadcast) and not copied by ``copy.deepcopy`` (the trainer's EMA copies only the trainable part)."""

    def __init__(self, unet: ss.SFTUNet, vae: AutoencoderKL):
        self.unet, self.vae = unet, vae

    def __deepcopy__(self, memo: dict[int, Any]) -> FrozenParts:
        return self

    def on(self, device: torch.device) -> FrozenParts:
        """Moved to ``device`` (where the trainable part is) when not already there."""
        if self.unet.unet.conv_in.weight.device != device:
            self.unet.to(device)
            self.vae.to(device)
        return self


class StableSRDDMNet(nn.Module):
    """The stablesr DDM: parameters = the time-aware encoder + the SPADE layers (the trainable part); the frozen
    SD UNet and VAE in :attr:`frozen`; the null text context a non-persistent buffer.

    ``forward(z_t, t, z_c) -> eps`` (Eq. 3's network, with the null context); :meth:`eps` is the
    ``stablesr.EpsModel`` contract of the sampler. Both run the frozen UNet with THIS module's SPADE layers, so
    an EMA copy of it is a working DDM too.
    """

    def __init__(self, parts: ss.StableSR, context: Tensor, config: StableSRDDM, sr_config: ss.StableSRConfig):
        super().__init__()
        freeze(parts.unet, parts.vae)
        self.encoder = parts.encoder.train().requires_grad_(True)
        self.spade = nn.ModuleList(r.spade for r in parts.unet.resnets()).train().requires_grad_(True)
        self.register_buffer("context", context.detach().float(), persistent=False)
        self.frozen = FrozenParts(parts.unet, parts.vae)
        self.config, self.sr_config = config, sr_config
        self.scale_factor = float(parts.scale_factor)
        self.latent_multiple = ss.latent_multiple(sr_config)
        self.multiple = ss.vae_factor(sr_config) * self.latent_multiple  # image px per whole latent level

    def _frozen(self) -> FrozenParts:
        return self.frozen.on(self.context.device)

    def eps(self, z_t: Tensor, t: Tensor | int, context: Tensor, z_lr: Tensor) -> Tensor:
        """One StableSR evaluation: the encoder's features of ``z_lr`` at t steer the frozen UNet via SFT."""
        unet = self._frozen().unet
        return unet(z_t, t, context.to(z_t.dtype), self.encoder(z_lr, t), spades=self.spade)

    def forward(self, z_t: Tensor, t: Tensor | int, z_c: Tensor) -> Tensor:
        return self.eps(z_t, t, self.context.expand(z_t.shape[0], -1, -1), z_c)

    @torch.no_grad()
    def encode(self, img: Tensor, generator: Generators = None, sample: bool = True) -> Tensor:
        """The scaled latent of images in [0, 1] (``2 img - 1`` through the VAE encoder, x 0.18215): a posterior
        sample (noise from ``generator``: one, or one per image) or the mode; fp32, outside autocast."""
        vae = self._frozen().vae
        with torch.autocast(img.device.type, enabled=False):
            dist = vae.encode((img.float() * 2 - 1).to(vae.dtype)).latent_dist
            z = dist.mean
            if sample:
                z = z + dist.std * randn(z.shape, generator, z.device, z.dtype)
        # contiguous: the posterior's mean is a strided chunk view, on which a CPU conv backward has crashed
        return (z * self.scale_factor).contiguous()

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Images in about [-1, 1] from scaled latents (the plain SD VAE decoder)."""
        vae = self._frozen().vae
        with torch.autocast(z.device.type, enabled=False):
            return vae.decode((z.float() / self.scale_factor).to(vae.dtype)).sample


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Module inits (which draw from the global CPU RNG) from ``seed``, leaving the caller's RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _load_parts(path: Path, cfg: ss.StableSRConfig, want_text: bool) -> tuple[ss.StableSR, CLIPTextModel | None]:
    """A StableSR stage-1 checkpoint (every part), or SD 2.1(-base) (a checkpoint or a diffusers folder: UNet,
    VAE, text encoder) with a fresh encoder and fresh SPADE layers."""
    from blindsr.io.weights import load_state_dict
    from blindsr.models.sd import load_diffusers_folder, load_sd_checkpoint

    if path.is_dir():
        sd = load_diffusers_folder(path)
    else:
        state = load_state_dict(path)
        if any(k.startswith(ss.STAGE1_PREFIXES["encoder"]) for k in state):
            parts = ss.load_stablesr(state, cfg, text_encoder=None if want_text else False)
            text, parts.text_encoder = parts.text_encoder, None
            return parts, text
        sd = load_sd_checkpoint(state, {"unet": cfg.unet, "vae": cfg.vae, "text_encoder": cfg.text_encoder})
    levels = len(sd.unet.config.block_out_channels)
    if levels != len(cfg.encoder.channel_mult):
        raise WeightsError(f"{path}: a {levels}-level UNet; the time-aware encoder has "
                           f"{len(cfg.encoder.channel_mult)} levels (one feature per level)")
    unet = ss.SFTUNet(sd.unet, cfg.semb_channels)  # fresh SPADE layers (StableSR's stage 1 from SD)
    parts = ss.StableSR(unet, ss.StableSREncoder(cfg.encoder), sd.vae, None, sd.scale_factor)
    return parts, sd.text_encoder


def null_text_context(text_encoder: CLIPTextModel) -> Tensor:
    """(1, 77, C): the text encoder on the empty prompt ([SOT, EOT, 0, ...]; no BPE vocabulary needed)."""
    from blindsr.models.sd import encode_text
    from blindsr.models.sd.tokenizer import pack_tokens

    with torch.no_grad():
        return encode_text(text_encoder, pack_tokens([[]])).float()


def build_ddm_net(config: StableSRDDM, weights: str | Path | None = None, *, what: str = "DDM stablesr",
                  section: str = "model.ddm.stablesr") -> StableSRDDMNet:
    """The stablesr DDM from ``config.weights`` (``weights`` overrides it: a moved base file), on the CPU.

    ``config``: any config with the fields ``weights``, ``size``, ``context``, ``posterior`` (and optionally
    ``tile``): UDDM's ``StableSRDDM`` or the ``stablesr`` method's model section; ``what`` / ``section`` name
    it in errors. A missing file is a one-line ``WeightsError``; ``weights: ""`` is a seeded random init."""
    path = config.weights if weights is None else str(weights)
    cfg = stablesr_config(config.size)
    check_tile(config, ss.latent_multiple(cfg), what)
    if path and not Path(path).exists():
        raise WeightsError(f"{what} weights not found: {path} ({section}.weights: a StableSR "
                           "stage-1 .ckpt or an SD 2.1-base checkpoint)")
    want_text = bool(path) and config.context == "text"
    with _seeded(INIT_SEED):
        parts, text = _load_parts(Path(path), cfg, want_text) if path else (ss.build_stablesr(cfg), None)
    width = int(parts.unet.unet.config.cross_attention_dim)
    if want_text:
        if text is None:
            raise WeightsError(f"{path} has no text encoder for the null context: set "
                               f"{section}.context=zeros (or start from SD 2.1-base)")
        context = null_text_context(text)
        if context.shape[-1] != width:
            raise WeightsError(f"{path}: a {context.shape[-1]}-wide text context for a UNet of {width}")
    else:
        context = torch.zeros(1, CONTEXT_LENGTH, width)
    del text
    return StableSRDDMNet(parts, context, config, cfg)


def eps_loss(net: nn.Module, diffusion: GaussianDiffusion, target: Tensor, cond: Tensor,
             generator: torch.Generator, t: Tensor | None = None) -> Tensor:
    """StableSR's stage-1 loss: the images ``target`` (z_0's) and ``cond`` (z_c's, the time-aware encoder's
    input), both (B, 3, H, W) in [0, 1], to latents, then the ε-MSE at t ~ U{0..T-1} (unless given).
    ``net``: a :class:`StableSRDDMNet`, possibly wrapped (DDP). UDDM: (real LR, ULR); SR: (HR, upsampled LR)."""
    inner: StableSRDDMNet = getattr(net, "module", net)
    sample = inner.config.posterior == "sample"
    dev, B = target.device, target.shape[0]
    with torch.no_grad():
        z0 = inner.encode(target, generator, sample)
        z_c = inner.encode(cond, generator, sample)
        if t is None:
            t = torch.randint(0, diffusion.num_timesteps, (B,), generator=generator, device=dev)
        eps = torch.randn(z0.shape, generator=generator, device=dev)
        z_t = diffusion.q_sample(z0, t, eps).float()
        goal = parameterization.target("eps", z0, eps, diffusion.abar(t, z0)).float()
    return F.mse_loss(net(z_t, t, z_c).float(), goal)


def synthesize_stablesr(net: StableSRDDMNet, config: DDMConfig, cond: Tensor, generator: Generators = None,
                        steps: int | None = None, progress: Progress = False) -> Tensor:
    """Eq. 4 on StableSR: an LR image (B, 3, h, w) in [0, 1] from its condition (B, 3, h, w) in [0, 1].

    ``generator``: one, or one per image (image i then does not depend on the batch it is in: its posterior
    noise, x_T noise and step noises all come from its own generator)."""
    sc = config.stablesr
    check_tile(sc, net.latent_multiple)
    h, w = cond.shape[-2:]
    c = pad_to_multiple(cond.float().to(net.context.device), net.multiple, mode="reflect")
    with torch.no_grad():
        z_c = net.encode(c, generator, sc.posterior == "sample")
        tile = sc.tile if sc.tile and max(z_c.shape[-2:]) > sc.tile else None
        z0 = ss.sample_latent(net, z_c, net.context.expand(z_c.shape[0], -1, -1), steps=steps or config.sample_steps,
                              tile=tile, overlap=sc.overlap, generator=generator, progress=progress)
        x = net.decode(z0)
    return ((x[..., :h, :w].float() + 1) / 2).clamp(0, 1)


__all__ = ["INIT_SEED", "FrozenParts", "StableSRDDMNet", "stablesr_config", "build_ddm_net", "null_text_context",
           "eps_loss", "synthesize_stablesr", "check_tile", "image_multiple"]
