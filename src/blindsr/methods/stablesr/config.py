"""StableSR's configs: the model (what a checkpoint is built from) and the inference settings.

Official vs paper, the defaults named (README §4.4-4.7 of ``shared/reference/stablesr``; script
``sr_val_ddpm_text_T_vqganfin_oldcanvas_tile.py``):

============== ====================================== ============================= ===================
field          official script                        paper                         default here
============== ====================================== ============================= ===================
steps          ``--ddpm_steps`` 200                   200                           200
color_fix      ``--colorfix_type nofix`` (tile script) adain                         adain (paper)
dec_w          ``--dec_w`` 0.5                        0.5                           0.5
input_size     512: short side >= 512, resized back   --                            512 (official)
posterior      z_lr a VAE posterior sample            --                            sample (official)
crop           keeps a downscaled pad border when     --                            exact x``upscale``
               padding and ``input_size`` both apply                                (the pad is cropped
                                                                                    before resizing back)
============== ====================================== ============================= ===================
"""

from __future__ import annotations

from dataclasses import dataclass

from blindsr.errors import BlindSRError

COLOR_FIXES = ("adain", "wavelet", "none")  # official names: adain | wavelet | nofix


@dataclass
class StableSRModel:
    """The ``model`` section of ``blindsr train stablesr`` and the base a checkpoint names (duck-typed for
    ``uddm.ddm_stablesr.build_ddm_net``: the frozen SD part + the trainable encoder and SPADE layers)."""

    weights: str = ""          # base: SD 2.1-base (.ckpt/.safetensors/diffusers folder: fresh encoder + SPADE) or an
    #                            official StableSR stage-1 .ckpt (fine-tune it); "" = seeded random init (tests)
    size: str = "full"         # full (SD 2.1 + the released encoder sizes) | tiny (the conformance fixture's; tests)
    context: str = "text"      # null text context: text = the base's text encoder on "" (official) | zeros
    posterior: str = "sample"  # VAE latents in training: a posterior sample (official) | mode

    def __post_init__(self) -> None:
        choices = {"size": ("full", "tiny"), "context": ("text", "zeros"), "posterior": ("sample", "mode")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise BlindSRError(f"StableSR: model.{name} {getattr(self, name)!r}: choose {' or '.join(allowed)}")


@dataclass
class StableSRInference:
    """``StableSRPipeline`` settings (every field a per-call override)."""

    upscale: int = 4             # output = upscale x input
    input_size: int = 512        # official: upsample so the short side is >= this, resize back at the end; 0 = off
    steps: int = 200             # respaced DDPM steps (--ddpm_steps)
    tile: int = 64               # latent aggregation tile (official input_size / 8); 0 = the whole latent at once
    tile_overlap: int = 32       # --tile_overlap (latent px)
    pixel_tile: int = 1280       # --vqgantile_size: pixel tiles above this size (each runs the whole chain); 0 = never
    pixel_overlap: int = 280     # --vqgantile_size - --vqgantile_stride (1280 - 1000)
    dec_w: float = 0.5           # CFW fusion weight (--dec_w; only with a CFW checkpoint; 0 = the SD decoder)
    color_fix: str = "adain"     # adain (paper) | wavelet | none (official tile script's default, "nofix")
    posterior: str = "sample"    # z_lr: a VAE posterior sample (official get_first_stage_encoding) | mode
    pad: int = 32                # reflect-pad to multiples of this, the official way (a whole side more if aligned)

    def __post_init__(self) -> None:
        if self.upscale < 1 or self.steps < 1 or self.input_size < 0:
            raise BlindSRError("StableSR: upscale >= 1, steps >= 1 and input_size >= 0 are required")
        if self.color_fix not in COLOR_FIXES:
            raise BlindSRError(f"StableSR: color_fix {self.color_fix!r}: choose {', '.join(COLOR_FIXES)}")
        if self.posterior not in ("sample", "mode"):
            raise BlindSRError(f"StableSR: posterior {self.posterior!r}: choose sample or mode")
        if self.tile < 0 or (self.tile and not 0 <= self.tile_overlap < self.tile):
            raise BlindSRError("StableSR: tile must be >= 0 (0: never) and 0 <= tile_overlap < tile")
        if self.pixel_tile < 0 or (self.pixel_tile and not 0 <= self.pixel_overlap < self.pixel_tile):
            raise BlindSRError("StableSR: pixel_tile must be >= 0 (0: never) and 0 <= pixel_overlap < pixel_tile")
        if self.pixel_tile % 8 or self.pixel_overlap % 8 or self.pad < 8 or self.pad % 8:
            raise BlindSRError("StableSR: pixel_tile, pixel_overlap and pad must be multiples of 8 (the VAE's factor)")
        if not self.dec_w >= 0:
            raise BlindSRError(f"StableSR: dec_w must be >= 0, got {self.dec_w}")


__all__ = ["COLOR_FIXES", "StableSRModel", "StableSRInference"]
