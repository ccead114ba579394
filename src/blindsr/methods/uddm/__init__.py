"""UDDM (Chen et al., AAAI 2025): unsupervised degradation modelling from unpaired real LR photos (issue 12).

So far: P-DDM, the physics-based degradation network (``pddm``), and the DDM's pixel backend (``ddm``: the
conditional diffusion model from an extremely downsampled image to a real LR, its loss and tiled synthesis).
Not built yet: the fusion and synthesis of pairs, the ``uddm`` training recipe, ``blindsr uddm fit`` / ``degrade
--preset uddm`` / ``train srnet`` / ``adapt``, the stablesr backend.
"""
