"""The frozen pixel-space diffusion prior (DM-SR's pixel backend, DiffBIR's pixel backend): a miniature SD UNet
trained here, unconditionally, on HR crops. See ``config.py`` for the choices."""

from blindsr.methods.prior.config import PriorDiffusion, PriorUNetConfig
from blindsr.methods.prior.model import (
    Prior,
    load_prior,
    null_context,
    sample_prior,
    save_prior,
    unet_prediction,
)

__all__ = ["Prior", "PriorDiffusion", "PriorUNetConfig", "load_prior", "null_context", "sample_prior", "save_prior",
           "unet_prediction"]
