"""Student backbones: plain timm models whose classifier outputs the face embedding.

A student is ``timm.create_model(name, num_classes=embed_dim, **kwargs)``: every architecture
choice is a ``create_model`` keyword, so a trained student round-trips through a timm hub folder
(``config.json`` + ``model.safetensors``). Where timm has no keyword for a choice face models need,
this package registers a small timm model variant (see :mod:`students.variants`); importing
``students`` registers them with timm.
"""

from __future__ import annotations

from typing import Any

import timm
import torch.nn as nn

from . import variants  # noqa: F401  (registers the face variants with timm)

__all__ = ["create_student", "first_conv_stride"]


def create_student(name: str, embed_dim: int = 512, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build a timm backbone whose output is an ``embed_dim``-sized (unnormalised) embedding.

    ``kwargs`` go to ``timm.create_model`` unchanged (``patch_size=8, img_size=112`` for a ViT/Ti-8,
    ``patch_size=2`` for the seed's ConvNeXt recipes, ``stem_stride=1`` for the ``*_face`` ResNets).
    """
    from timmface.errors import ConfigError

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ConfigError(f"model.backbone: '{name}' is not a timm model{hint}")
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=embed_dim, **kwargs)
    except TypeError as e:  # an unknown create_model keyword
        raise ConfigError(f"model.kwargs: timm model '{name}' rejected its arguments {kwargs}: {e}") from e


def first_conv_stride(model: nn.Module) -> tuple[int, ...] | None:
    """The stride of the model's first convolution (from timm's ``pretrained_cfg['first_conv']``)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("first_conv")
    if not name:
        return None
    module = model
    for part in name.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return tuple(getattr(module, "stride", ())) or None
