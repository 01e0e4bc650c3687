"""Augmentations from config data, by name, from an allow-list of torchvision v2 transforms.

A config lists augmentations as data, never as code::

    augmentations:
      - {name: RandomChoice, transforms: [{name: ColorJitter, args: [0.1, 0.1, 0.1, 0.1]},
                                          {name: RandomAffine, args: [0], kwargs: {translate: [0.1, 0.1]}}]}

They run in the data workers on ``uint8`` CHW tensors, so every allowed transform is one that is
defined on uint8 images. Horizontal flip is not listed here: it happens on the device, fused with
normalisation (``data.hflip``), so the trainer knows which samples were mirrored.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from torch import Tensor
from torchvision.transforms import v2

from timmface.errors import ConfigError

# transforms that keep a uint8 image uint8; RandomHorizontalFlip is refused with a pointer to data.hflip
ALLOWED: dict[str, Callable[..., v2.Transform]] = {
    name: getattr(v2, name)
    for name in [
        "AugMix",
        "AutoAugment",
        "CenterCrop",
        "ColorJitter",
        "ElasticTransform",
        "GaussianBlur",
        "Grayscale",
        "JPEG",
        "Pad",
        "RandAugment",
        "RandomAdjustSharpness",
        "RandomAffine",
        "RandomAutocontrast",
        "RandomChannelPermutation",
        "RandomCrop",
        "RandomEqualize",
        "RandomErasing",
        "RandomGrayscale",
        "RandomInvert",
        "RandomPerspective",
        "RandomPhotometricDistort",
        "RandomPosterize",
        "RandomResizedCrop",
        "RandomRotation",
        "RandomSolarize",
        "RandomZoomOut",
        "Resize",
        "TrivialAugmentWide",
    ]
}
COMPOSITES = {"RandomChoice": v2.RandomChoice, "RandomApply": v2.RandomApply, "RandomOrder": v2.RandomOrder}
COMPOSITES["Compose"] = v2.Compose


def _build_one(spec: Any, where: str) -> v2.Transform:
    if not isinstance(spec, dict) or "name" not in spec:
        raise ConfigError(f"{where}: an augmentation is a mapping with a 'name', got {spec!r}")
    unknown = set(spec) - {"name", "args", "kwargs", "transforms", "p"}
    if unknown:
        raise ConfigError(f"{where}: unknown augmentation field(s) {sorted(unknown)} (use name, args, kwargs)")
    name = spec["name"]
    args = list(spec.get("args") or [])
    kwargs = dict(spec.get("kwargs") or {})
    if name in ("RandomHorizontalFlip", "hflip"):
        raise ConfigError(f"{where}: horizontal flip is built in and runs on the device; use data.hflip=true")
    if name in COMPOSITES:
        children = [_build_one(s, f"{where}.{name}[{i}]") for i, s in enumerate(spec.get("transforms") or [])]
        if not children:
            raise ConfigError(f"{where}: {name} needs a non-empty 'transforms' list")
        if name == "RandomApply" and "p" in spec:
            kwargs.setdefault("p", spec["p"])
        try:
            return COMPOSITES[name](children, *args, **kwargs)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: {name}: {e}") from e
    if name not in ALLOWED:
        close = difflib.get_close_matches(str(name), [*ALLOWED, *COMPOSITES], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{where}: augmentation '{name}' is not in the allow-list{hint}")
    # YAML has no tuples; torchvision accepts lists wherever it takes a sequence
    try:
        return ALLOWED[name](*args, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {name}{tuple(args)} {kwargs}: {e}") from e


def build_transform(specs: list[dict[str, Any]] | None, where: str = "data.augmentations") -> Callable | None:
    """A callable uint8 CHW -> uint8 CHW, or ``None`` when there is nothing to do."""
    if not specs:
        return None
    transforms = [_build_one(s, f"{where}[{i}]") for i, s in enumerate(specs)]
    return transforms[0] if len(transforms) == 1 else v2.Compose(transforms)


def check_uint8(transform: Callable, image: Tensor) -> None:
    """Raise if ``transform`` turns a uint8 image into something else (checked once at start-up)."""
    out = transform(image)
    if not isinstance(out, Tensor) or out.dtype != image.dtype or out.shape[0] != image.shape[0]:
        raise ConfigError("data.augmentations: the augmentations must map a uint8 CHW image to a uint8 CHW image")
