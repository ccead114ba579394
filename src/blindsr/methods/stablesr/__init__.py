"""StableSR as an SR model (issue 12): the official pipeline on a stage-1 checkpoint (+ CFW), and its stage 1
trained on any folder of pairs (``blindsr train stablesr``). The networks are ``blindsr.models.sd.stablesr`` /
``cfw``; the trainable-part module, its loss and export are UDDM's (``uddm.ddm_stablesr``). See docs/stablesr.md."""

from blindsr.methods.stablesr.config import COLOR_FIXES, StableSRInference, StableSRModel
from blindsr.methods.stablesr.pipeline import StableSRPipeline, load_net, load_pipeline, official_pad

__all__ = ["COLOR_FIXES", "StableSRInference", "StableSRModel", "StableSRPipeline", "load_net", "load_pipeline",
           "official_pad"]
