"""Adversarial losses, shared by every recipe that trains a discriminator (DM-SR's, UDDM's P-DDM)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from blindsr.errors import BlindSRError

GAN_LOSSES = ("hinge", "bce")


def check_gan_loss(kind: str) -> None:
    if kind not in GAN_LOSSES:
        raise BlindSRError(f"GAN loss {kind!r}: choose one of {', '.join(GAN_LOSSES)}")


def d_loss(real_logits: Tensor, fake_logits: Tensor, kind: str = "hinge") -> Tensor:
    """The discriminator's loss (fp32). ``hinge`` (InvSR's, the default): mean relu(1 − r) + mean relu(1 + f);
    ``bce`` (the GAN log-loss): mean softplus(−r) + mean softplus(f) = −log σ(r) − log(1 − σ(f))."""
    check_gan_loss(kind)
    r, f = real_logits.float(), fake_logits.float()
    if kind == "hinge":
        return F.relu(1 - r).mean() + F.relu(1 + f).mean()
    return F.softplus(-r).mean() + F.softplus(f).mean()


def g_loss(fake_logits: Tensor, kind: str = "hinge") -> Tensor:
    """The generator's adversarial loss (fp32). ``hinge``: −mean f; ``bce`` (non-saturating): mean softplus(−f)
    = −log σ(f)."""
    check_gan_loss(kind)
    f = fake_logits.float()
    return -f.mean() if kind == "hinge" else F.softplus(-f).mean()


__all__ = ["GAN_LOSSES", "check_gan_loss", "d_loss", "g_loss"]
