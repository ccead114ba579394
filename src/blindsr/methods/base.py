"""What every method shares: the result of a super-resolution pipeline, the pipeline protocol and the training
recipe. A leaf module (it imports nothing of blindsr at run time), so method packages, the trainer and the CLI
can all depend on it without cycles.

Adding a method ``foo`` (see docs/architecture.md, "Adding a method"): ``methods/foo/`` with ``config.py``
(dataclass configs), ``pipeline.py`` (a :class:`Pipeline`), ``losses.py`` and ``recipe.py`` (functions
``RunConfig -> Recipe``), plus one line per entry point in ``blindsr/registry.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from blindsr.train.config import OptimConfig, RunConfig


@dataclass
class SRResult:
    sr: Tensor  # (B, 3, sH, sW) in [0, 1]
    kernel: Tensor | None = None  # (B, k, k) the estimated blur kernel (BlindDiff: config.kernel_estimate)
    kernels_traj: Tensor | None = None  # (steps, B, k, k) when return_trajectory
    x0_traj: Tensor | None = None  # (n, B, 3, sH, sW) a few x0_hat snapshots when return_trajectory
    traj_steps: list[int] | None = None  # sampling-step numbers of the x0 snapshots
    t_hat: Tensor | None = None  # (B,) DM-SR: the timestep each image was mapped to


class Pipeline(Protocol):
    """``pipe(lr (B, 3, h, w) in [0, 1], generator=..., progress=..., **config overrides) -> SRResult``.

    Overrides are fields of the pipeline's dataclass ``config`` (applied with ``dataclasses.replace``); one
    generator per image makes a result independent of the batch it is in."""

    config: Any

    def __call__(self, lr: Tensor, *, generator: Any = None, progress: bool = False, **overrides: Any) -> Any: ...


LossFn = Callable[..., "dict[str, Tensor]"]


@dataclass
class Recipe:
    """What a method's ``recipe(RunConfig)`` gives the trainer.

    ``modules``: the named modules of the run; ``steps``: ``train.trainer.SubStep`` s run in order every
    iteration (each updates some modules); ``export``: the module whose EMA becomes ``final.safetensors``
    (default: the first). ``module_optim`` / ``module_ema`` override the run's optimiser / EMA decay per module.
    """

    modules: dict[str, torch.nn.Module]
    steps: list[Any]
    dataset: Any
    validate_fn: Callable[[torch.nn.Module], dict[str, float]] | None = None
    export_metadata: dict[str, str] = field(default_factory=dict)  # metadata of final.safetensors
    config: RunConfig | None = None  # the run config with its model/diffusion/loss sections fully resolved
    export_keys: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None  # final's key layout
    export: str | None = None
    module_optim: dict[str, OptimConfig] = field(default_factory=dict)
    module_ema: dict[str, float] = field(default_factory=dict)

    @classmethod
    def single(cls, model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, Any, torch.Generator], dict],
               dataset: Any, **kw: Any) -> Recipe:
        """One module ``model`` trained by one sub-step ``main`` with ``loss_fn(model, batch, generator)``."""
        from blindsr.train.trainer import single_step

        return cls({"model": model}, [single_step(loss_fn)], dataset, **kw)
