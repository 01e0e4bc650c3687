"""Margin losses against independent float64 numpy computations of the published formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from timmface.losses import AdaFace, ArcFace, CosFace, build_loss


def _case(n: int = 6, c: int = 9, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cosine = torch.rand(n, c, generator=g, dtype=torch.float64) * 1.9 - 0.95
    labels = torch.randint(0, c, (n,), generator=g)
    norms = torch.rand(n, generator=g, dtype=torch.float64) * 40 + 1
    return cosine, norms, labels


def _softmax_ce(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy and its gradient w.r.t. the logits."""
    z = logits - logits.max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    n = len(labels)
    loss = -np.log(p[np.arange(n), labels]).mean()
    grad = p.copy()
    grad[np.arange(n), labels] -= 1
    return float(loss), grad / n


def _autograd(loss_fn, cosine, norms, labels):
    x = cosine.clone().requires_grad_(True)
    out = loss_fn(x, norms, labels)
    out.backward()
    return float(out.detach()), x.grad.numpy()


def test_cosface_value_and_gradient():
    cosine, norms, labels = _case()
    s, m = 64.0, 0.4
    c, y = cosine.numpy(), labels.numpy()
    logits = c.copy()
    logits[np.arange(len(y)), y] -= m
    ref_loss, dlogits = _softmax_ce(s * logits, y)
    loss, grad = _autograd(CosFace(s, m), cosine, norms, labels)
    assert loss == pytest.approx(ref_loss, rel=1e-10)
    np.testing.assert_allclose(grad, s * dlogits, rtol=1e-9, atol=1e-12)


def test_arcface_analytic_value_and_gradient():
    cosine, norms, labels = _case(seed=1)
    # one target far enough that theta + m passes pi: the logit stays at cos(pi) = -1, no gradient
    cosine[0, labels[0]] = -0.95
    s, m = 64.0, 0.5
    c, y = cosine.numpy(), labels.numpy()
    rows = np.arange(len(y))
    theta = np.arccos(c[rows, y])
    shifted = np.minimum(theta + m, math.pi)
    logits = c.copy()
    logits[rows, y] = np.cos(shifted)
    ref_loss, dlogits = _softmax_ce(s * logits, y)
    # d cos(theta + m) / d cos(theta) = sin(theta + m) / sin(theta), zero where clamped at pi
    dtarget = np.where(theta + m < math.pi, np.sin(theta + m) / np.sin(theta), 0.0)
    ref_grad = s * dlogits
    ref_grad[rows, y] *= dtarget
    loss, grad = _autograd(ArcFace(s, m), cosine, norms, labels)
    assert loss == pytest.approx(ref_loss, rel=1e-9)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-6, atol=1e-10)
    assert grad[0, y[0]] == 0.0


def test_arcface_straight_through_matches_combined_margin_loss():
    """arcface_torch: arccos all logits, add m to the targets, cos all, under no_grad (identity grad)."""
    cosine, norms, labels = _case(seed=2)
    s, m = 64.0, 0.5
    c, y = cosine.numpy(), labels.numpy()
    rows = np.arange(len(y))
    angles = np.arccos(c)
    angles[rows, y] += m
    logits = np.cos(angles)  # no clamp at pi in the reference
    ref_loss, dlogits = _softmax_ce(s * logits, y)
    loss, grad = _autograd(ArcFace(s, m, straight_through=True), cosine, norms, labels)
    assert loss == pytest.approx(ref_loss, rel=1e-9)
    np.testing.assert_allclose(grad, s * dlogits, rtol=1e-9, atol=1e-12)


class _RefAdaFace:
    """AdaFace head.py semantics in numpy float64, batch by batch."""

    def __init__(self, m=0.4, h=0.333, s=64.0, t_alpha=0.01):
        self.m, self.h, self.s, self.t_alpha, self.eps = m, h, s, t_alpha, 1e-3
        self.mean, self.std = 20.0, 100.0

    def __call__(self, cosine, norms, labels):
        c = np.clip(cosine, -1 + self.eps, 1 - self.eps)
        safe = np.clip(norms, 0.001, 100)
        self.mean = safe.mean() * self.t_alpha + (1 - self.t_alpha) * self.mean
        self.std = safe.std(ddof=1) * self.t_alpha + (1 - self.t_alpha) * self.std
        scaler = np.clip((safe - self.mean) / (self.std + self.eps) * self.h, -1, 1)
        rows = np.arange(len(labels))
        m_arc = np.zeros_like(c)
        m_arc[rows, labels] = -self.m * scaler
        theta = np.clip(np.arccos(c) + m_arc, self.eps, math.pi - self.eps)
        out = np.cos(theta)
        out[rows, labels] -= self.m + self.m * scaler
        return out * self.s


def test_adaface_matches_reference_over_batches():
    ref = _RefAdaFace(t_alpha=0.3)  # a large momentum makes the running statistics matter
    loss_fn = AdaFace(t_alpha=0.3)
    for seed in range(3):
        cosine, norms, labels = _case(seed=10 + seed)
        cosine[0, 0] = 0.9999  # inside the clamp region
        norms[1] = 250.0  # clipped to 100
        ref_logits = ref(cosine.numpy(), norms.numpy(), labels.numpy())
        ref_loss, _ = _softmax_ce(ref_logits, labels.numpy())
        loss = loss_fn(cosine, norms, labels)
        assert float(loss) == pytest.approx(ref_loss, rel=1e-6)
        assert float(loss_fn.batch_mean) == pytest.approx(ref.mean, rel=1e-6)
        assert float(loss_fn.batch_std) == pytest.approx(ref.std, rel=1e-6)


def test_adaface_stats_updated_before_margin_and_unbiased():
    cosine, norms, labels = _case(seed=4)
    loss_fn = AdaFace(t_alpha=1.0)  # buffers become exactly this batch's statistics
    logits = loss_fn.margin_logits(cosine, norms, labels)
    assert float(loss_fn.batch_mean) == pytest.approx(float(norms.mean()), rel=1e-6)
    assert float(loss_fn.batch_std) == pytest.approx(float(norms.std(unbiased=True)), rel=1e-6)
    # with these statistics, the scaler of row 0 is known exactly
    scaler = float(((norms[0] - norms.mean()) / (norms.std() + 1e-3) * 0.333).clamp(-1, 1))
    c = float(cosine[0, labels[0]].clamp(-1 + 1e-3, 1 - 1e-3))
    theta = min(max(math.acos(c) - 0.4 * scaler, 1e-3), math.pi - 1e-3)
    expected = 64.0 * (math.cos(theta) - (0.4 + 0.4 * scaler))
    assert float(logits[0, labels[0]]) == pytest.approx(expected, rel=1e-6)


def test_adaface_norms_detached_and_gradcheck():
    cosine, norms, labels = _case(seed=5)
    x = cosine.clone().requires_grad_(True)
    nn_ = norms.clone().requires_grad_(True)
    AdaFace(t_alpha=0.0)(x, nn_, labels).backward()
    assert nn_.grad is None or torch.all(nn_.grad == 0)
    loss_fn = AdaFace(t_alpha=0.0)  # frozen statistics make the function deterministic for gradcheck
    assert torch.autograd.gradcheck(lambda c: loss_fn(c, norms, labels), (cosine.clone().requires_grad_(True),))


def test_adaface_bf16_norms_do_not_break_buffers():
    """The seed's AdaFace failed under bf16 autocast (bf16 norms into a float buffer)."""
    cosine, norms, labels = _case(seed=6)
    loss_fn = AdaFace()
    loss = loss_fn(cosine.bfloat16(), norms.bfloat16(), labels)
    assert torch.isfinite(loss) and loss_fn.batch_mean.dtype == torch.float32


def test_labels_minus_one_rows_have_no_margin():
    cosine, norms, labels = _case(seed=7)
    labels = labels.clone()
    labels[2] = -1
    for loss_fn in (CosFace(), ArcFace(), AdaFace()):
        logits = loss_fn.margin_logits(cosine, norms, labels)
        clamp = 1e-3 if isinstance(loss_fn, AdaFace) else 0.0
        np.testing.assert_allclose(logits[2].numpy(), 64 * cosine[2].clamp(-1 + clamp, 1 - clamp).numpy(), rtol=1e-6)


def test_build_loss_defaults_and_overrides():
    assert build_loss("cosface").m == 0.4
    assert build_loss("arcface").m == 0.5
    ada = build_loss("adaface", t_alpha=0.5)
    assert (ada.m, ada.h, ada.s, ada.t_alpha) == (0.4, 0.333, 64.0, 0.5)
    assert build_loss("cosface", m=0.35, s=30).m == 0.35
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss("sphereface")
