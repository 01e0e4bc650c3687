"""Five-point alignment: similarity estimation, OpenCV-convention warping, and the full align_face round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from timmface.evaluation.align import ARCFACE_REF_112, align_face, estimate_similarity, warp_affine


def similarity(scale: float, angle: float, tx: float, ty: float) -> np.ndarray:
    c, s = scale * np.cos(angle), scale * np.sin(angle)
    return np.array([[c, -s, tx], [s, c, ty]])


def apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ m[:, :2].T + m[:, 2]


def smooth_image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """uint8 (3, h, w) with slowly varying colours, so double resampling loses little."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    rng = np.random.default_rng(seed)
    chans = []
    for _ in range(3):
        fx, fy, ph = rng.uniform(0.02, 0.08, 2).tolist() + [rng.uniform(0, 6)]
        chans.append(127.5 + 100 * np.sin(fx * xs + ph) * np.cos(fy * ys))
    return torch.from_numpy(np.stack(chans).round().astype(np.uint8))


def numpy_warp(img: np.ndarray, m: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Slow reference: for each output pixel centre, bilinear sample at M^-1 (x, y) with zero outside (OpenCV)."""
    c, h, w = img.shape
    inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))[:2]
    out = np.zeros((c, *out_hw))
    for y in range(out_hw[0]):
        for x in range(out_hw[1]):
            sx, sy = inv @ [x, y, 1.0]
            x0, y0 = int(np.floor(sx)), int(np.floor(sy))
            ax, ay = sx - x0, sy - y0
            for yy, wy in ((y0, 1 - ay), (y0 + 1, ay)):
                for xx, wx in ((x0, 1 - ax), (x0 + 1, ax)):
                    if 0 <= yy < h and 0 <= xx < w:
                        out[:, y, x] += wy * wx * img[:, yy, xx]
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def test_reference_points_are_insightface_arcface_src() -> None:
    # the IJB scripts write them as the 96x112 template shifted by 8 px in x
    template_96 = np.array([[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366], [33.5493, 92.3655]])
    np.testing.assert_allclose(ARCFACE_REF_112[:4, 0], template_96[:, 0] + 8.0, atol=1e-4)
    np.testing.assert_allclose(ARCFACE_REF_112[:4, 1], template_96[:, 1], atol=1e-4)
    np.testing.assert_allclose(ARCFACE_REF_112[4], [70.7299, 92.2041], atol=1e-4)


@pytest.mark.parametrize("seed", range(5))
def test_estimate_similarity_recovers_known_transform(seed: int) -> None:
    rng = np.random.default_rng(seed)
    m_true = similarity(rng.uniform(0.3, 3.0), rng.uniform(-np.pi, np.pi), *rng.uniform(-80, 80, 2))
    src = ARCFACE_REF_112.astype(np.float64) * rng.uniform(0.5, 2) + rng.uniform(0, 100, 2)
    np.testing.assert_allclose(estimate_similarity(src, apply(m_true, src)), m_true, atol=1e-9)

    # with landmark noise: still close to the truth, and equal to the closed-form linear least squares of
    # x' = a x - b y + tx, y' = b x + a y + ty (what skimage's SimilarityTransform.estimate solves when no
    # reflection is involved)
    dst = apply(m_true, src) + rng.normal(0, 0.5, src.shape)
    m = estimate_similarity(src, dst)
    rows = []
    for x, y in src:
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]
    a, b, tx, ty = np.linalg.lstsq(np.array(rows), dst.reshape(-1), rcond=None)[0]
    np.testing.assert_allclose(m, [[a, -b, tx], [b, a, ty]], atol=1e-9)
    assert np.abs(apply(m, src) - apply(m_true, src)).max() < 1.5  # within the 0.5 px landmark noise


def test_estimate_similarity_never_reflects() -> None:
    src = ARCFACE_REF_112.astype(np.float64)
    mirrored = src * [-1, 1] + [112, 0]  # a left-right mirror: the best orthogonal fit would be a reflection
    m = estimate_similarity(src, mirrored)
    assert np.linalg.det(m[:, :2]) > 0
    assert np.isnan(estimate_similarity(np.ones((5, 2)), src)).all()  # degenerate input, as skimage


def test_warp_integer_translation_is_exact() -> None:
    img = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    out = warp_affine(img, np.array([[1.0, 0, 7], [0, 1, -4]]), out_size=(40, 50))
    expected = torch.zeros_like(img)
    expected[:, :36, 7:] = img[:, 4:, :43]  # dst(x, y) = src(x - 7, y + 4); zero where that falls outside
    assert torch.equal(out, expected)
    far_away = warp_affine(img, np.array([[1.0, 0, 500], [0, 1, 0]]), out_size=(20, 20), mode="bicubic")
    assert far_away.shape == (3, 20, 20) and not far_away.any()


def test_warp_quarter_turn_is_exact() -> None:
    h, w = 30, 44
    img = torch.randint(0, 256, (3, h, w), dtype=torch.uint8)
    # torch.rot90 (counter-clockwise): out[i, j] = in[j, w-1-i]  <=>  x' = y, y' = w-1-x
    m = np.array([[0.0, 1, 0], [-1, 0, w - 1]])
    assert torch.equal(warp_affine(img, m, out_size=(w, h)), torch.rot90(img, 1, dims=(1, 2)))


@pytest.mark.parametrize("seed", range(3))
def test_warp_generic_matches_numpy_bilinear_and_batches(seed: int) -> None:
    img = torch.randint(0, 256, (3, 37, 41), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    m = similarity(1.37, 0.61, 9.3, -14.2)
    out = warp_affine(img, m, out_size=(33, 29))
    ref = numpy_warp(img.numpy().astype(np.float64), m, (33, 29))
    diff = np.abs(out.numpy().astype(int) - ref.astype(int))
    assert diff.max() <= 1  # only float32 rounding of exact .5 cases
    assert (diff > 0).mean() < 0.01

    m2 = similarity(0.8, -0.3, 3, 4)
    # a batch crops the input to the union of the samples' reach: float32 grid rounding may move a value across .5
    batch = warp_affine(torch.stack([img, img.flip(-1)]), np.stack([m, m2]), out_size=(33, 29))
    for got, want in ((batch[0], out), (batch[1], warp_affine(img.flip(-1), m2, out_size=(33, 29)))):
        assert (got.int() - want.int()).abs().max() <= 1 and (got != want).float().mean() < 0.01


@pytest.mark.parametrize(("seed", "mode"), [(0, "bilinear"), (1, "bilinear"), (2, "bicubic")])
def test_align_face_undoes_a_known_transform(seed: int, mode: str) -> None:
    rng = np.random.default_rng(seed)
    aligned = smooth_image(112, 112, seed)
    # a loose crop: the aligned face scaled, rotated and shifted into a bigger canvas
    to_loose = similarity(rng.uniform(1.0, 1.6), rng.uniform(-0.5, 0.5), 0, 0)
    to_loose[:, 2] = [100, 100] - to_loose[:, :2] @ [56, 56] + rng.uniform(-10, 10, 2)
    loose = warp_affine(aligned, to_loose, out_size=(200, 200))
    landmarks = apply(to_loose, ARCFACE_REF_112.astype(np.float64))

    back = align_face(loose, landmarks.astype(np.float32), mode=mode)
    assert back.shape == (3, 112, 112) and back.dtype == torch.uint8
    err = (back.int() - aligned.int()).abs()[:, 4:-4, 4:-4].float()
    assert err.mean() < 1.5 and err.max() <= 12


def test_align_face_rejects_degenerate_landmarks() -> None:
    with pytest.raises(ValueError, match="degenerate"):
        align_face(torch.zeros(3, 50, 50, dtype=torch.uint8), np.full((5, 2), 20.0))
