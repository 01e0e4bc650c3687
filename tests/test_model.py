"""Partial FC sampling, the margin head, and student backbones."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from students import create_student, first_conv_stride
from timmface.errors import ConfigError
from timmface.losses import CosFace
from timmface.model import FaceModel, MarginHead, num_sampled_classes, partial_fc_sample


def test_num_sampled_classes():
    assert num_sampled_classes(0, 1000) == 1000
    assert num_sampled_classes(0.1, 1000) == 100
    assert num_sampled_classes(16384, 93431) == 16384
    assert num_sampled_classes(16384, 1000) == 1000


def test_partial_fc_keeps_positives_and_samples_k():
    torch.manual_seed(0)
    labels = torch.tensor([5, 17, 5, 99, 3])
    index = partial_fc_sample(labels, 100, 20)
    assert index.numel() == 20 and torch.equal(index, index.sort().values)
    assert len(set(index.tolist())) == 20
    assert {3, 5, 17, 99} <= set(index.tolist())
    # more classes in the batch than k: all of them, nothing else
    assert partial_fc_sample(torch.arange(30), 100, 20).tolist() == list(range(30))


def test_head_with_partial_fc_equals_full_softmax_over_the_sampled_centres():
    torch.manual_seed(0)
    head = MarginHead(50, 8, CosFace(), partial_fc=10).train()
    emb = torch.randn(6, 8)
    labels = torch.tensor([1, 7, 7, 30, 49, 2])
    torch.manual_seed(123)
    out = head(emb, labels)["margin"]
    torch.manual_seed(123)
    index = partial_fc_sample(labels, 50, 10)
    w = F.normalize(head.weight[index], dim=1)
    cos = F.normalize(emb, dim=1) @ w.T
    remapped = torch.tensor([index.tolist().index(int(y)) for y in labels])
    expected = CosFace()(cos, emb.norm(dim=1), remapped)
    torch.testing.assert_close(out, expected)


def test_model_eval_returns_normalised_embeddings():
    model = FaceModel(create_student("test_vit", embed_dim=16, img_size=32), MarginHead(4, 16, CosFace())).eval()
    with torch.no_grad():
        emb = model(torch.randn(3, 3, 32, 32))
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))


def test_face_resnet_variant_is_a_timm_kwarg():
    m = create_student("face_resnet18", embed_dim=64)
    assert first_conv_stride(m) == (1, 1)
    assert m(torch.randn(1, 3, 112, 112)).shape == (1, 64)
    # the stem stride is a create_model keyword, so a config.json rebuilds the same model
    m2 = timm.create_model("face_resnet18", num_classes=64, stem_stride=2)
    assert first_conv_stride(m2) == (2, 2)
    assert first_conv_stride(create_student("resnet18")) == (2, 2)
    # final feature map 7x7 at 112 (like iResNet) instead of 4x4
    assert m.forward_features(torch.randn(1, 3, 112, 112)).shape[-2:] == (7, 7)


def test_unknown_backbone_is_a_config_error():
    with pytest.raises(ConfigError, match="model.backbone: 'vit_tinyy_patch16_224' is not a timm model"):
        create_student("vit_tinyy_patch16_224")
    with pytest.raises(ConfigError, match="model.kwargs"):
        create_student("resnet18", no_such_kwarg=3)
