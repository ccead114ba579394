"""blindsr: diffusion-based blind super-resolution and image restoration.

Four methods that share their parts: BlindDiff, DiffBIR, DM-SR and UDDM.
Heavy modules are imported lazily; ``import blindsr`` stays cheap.
"""

__version__ = "0.1.0"

from blindsr.errors import BlindSRError  # noqa: F401
