"""Image-quality metrics.

- :mod:`.psnr_ssim`: PSNR and SSIM in the BasicSR convention (our own code, numpy float64, no weights).
- :mod:`.learned`: LPIPS, DISTS, FID, NIQE, MUSIQ, MANIQA, CLIP-IQA, TOPIQ, LIQE through pyiqa
  (``blindsr[metrics]`` extra), offline only; pyiqa is imported on first use, never here.
"""

from blindsr.metrics.learned import LEARNED_METRICS, create_learned_metric, missing_files
from blindsr.metrics.psnr_ssim import psnr, rgb_to_y, ssim

__all__ = ["psnr", "ssim", "rgb_to_y", "LEARNED_METRICS", "create_learned_metric", "missing_files"]
