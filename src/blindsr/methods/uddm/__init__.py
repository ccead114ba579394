"""UDDM (Chen et al., AAAI 2025): unsupervised degradation modelling from unpaired real LR photos (issue 12).

So far: P-DDM, the physics-based degradation network (``pddm``). The DDM, the fusion, ``blindsr uddm fit`` and
``blindsr adapt`` are not built yet.
"""
