"""Face-specific timm model variants.

Face crops are 112x112, half the 224 ImageNet size, so backbones built for 224 end with tiny
feature maps (ResNets: 4x4). Face models (iResNet, the seed's ``--reduce_first_conv_stride``)
halve the stem stride instead. timm's ResNet has no keyword for that, so we register
``face_resnet{18,34,50,100}``: timm ResNets whose stem stride is the ``stem_stride`` keyword
(default 1), so the choice lives in ``config.json`` and a plain ``timm.create_model`` rebuilds it
once ``students`` is imported. ViT (``patch_size``, ``img_size``) and ConvNeXt (``patch_size``)
already expose the knob as keywords and need no variant.
"""

from __future__ import annotations

from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet, _cfg


class FaceResNet(ResNet):
    """A timm ``ResNet`` whose stem convolution has stride ``stem_stride``."""

    def __init__(self, *args: Any, stem_stride: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        conv = self.conv1[0] if hasattr(self.conv1, "__getitem__") else self.conv1
        conv.stride = (stem_stride, stem_stride)
        # timm reports the total stride of each feature level; keep that accurate
        factor = 2 // stem_stride if stem_stride in (1, 2) else 1
        for info in self.feature_info:
            info["reduction"] = max(1, info["reduction"] // factor)


def _face_cfg() -> dict[str, Any]:
    return _cfg(input_size=(3, 112, 112), pool_size=(7, 7), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


# timm's register_model reads this module's ``default_cfgs``
default_cfgs = generate_default_cfgs({f"face_resnet{d}": _face_cfg() for d in (18, 34, 50, 100)})


def _create(variant: str, pretrained: bool, block: type, layers: tuple[int, ...], **kwargs: Any) -> FaceResNet:
    return build_model_with_cfg(FaceResNet, variant, pretrained, block=block, layers=layers, **kwargs)


@register_model
def face_resnet18(pretrained: bool = False, **kwargs: Any) -> FaceResNet:
    """ResNet-18 with a stride-1 stem: 7x7 final feature map at 112x112 input."""
    return _create("face_resnet18", pretrained, BasicBlock, (2, 2, 2, 2), **kwargs)


@register_model
def face_resnet34(pretrained: bool = False, **kwargs: Any) -> FaceResNet:
    """ResNet-34 with a stride-1 stem."""
    return _create("face_resnet34", pretrained, BasicBlock, (3, 4, 6, 3), **kwargs)


@register_model
def face_resnet50(pretrained: bool = False, **kwargs: Any) -> FaceResNet:
    """ResNet-50 (bottleneck) with a stride-1 stem."""
    return _create("face_resnet50", pretrained, Bottleneck, (3, 4, 6, 3), **kwargs)


@register_model
def face_resnet100(pretrained: bool = False, **kwargs: Any) -> FaceResNet:
    """Basic-block ResNet with iResNet-100's stage depths [3, 13, 30, 3] and a stride-1 stem."""
    return _create("face_resnet100", pretrained, BasicBlock, (3, 13, 30, 3), **kwargs)
