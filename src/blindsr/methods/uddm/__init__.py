"""UDDM (Chen et al., AAAI 2025): unsupervised degradation modelling from unpaired real LR photos (issue 12).

``pddm`` (P-DDM, the physics-based degradation network), ``ddm`` (the conditional diffusion model from an extremely
downsampled image to a real LR: the ``pixel`` backend, and ``ddm_stablesr``, the paper's StableSR backend),
``recipe`` (``blindsr train uddm`` / ``uddm fit``), ``model`` (loading, Eq. 1's fusion, the ``uddm`` preset) and
``report`` (side by side crops, PCA -> t-SNE, the sliced Wasserstein distance). See docs/uddm.md.
"""
