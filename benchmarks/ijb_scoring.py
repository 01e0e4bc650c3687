"""Time IJB-C-sized template pooling and pair scoring: timmface's vectorised torch code against the reference loops.

The reference (insightface ``recognition/arcface_torch/eval_ijbc.py``, AdaFace
``validation_mixed/insightface_ijb_helper/eval_helper.py``, timm-face ``test_ijb.py``) pools with a Python loop over
templates (``np.where`` per template, then per media) and scores pairs in chunks of 100,000 with numpy: gather the two
float64 template rows of each pair, multiply, sum. Both are re-implemented below with the same steps (own code) and
timed in the same run as :func:`timmface.evaluation.ijb.pool_templates` and
:func:`timmface.evaluation.ijb.score_pairs`, and their outputs compared.

Synthetic data shaped like IJB-C 1:1: 469,375 images, 23,124 templates, 15,658,489 pairs; the pairs join 3,531
first templates (the size of IJB-C's 1:N gallery G1+G2) to the other 19,593, as the released pair file does (its
first column has few distinct templates, and it is sorted by it). Media: each template holds a random number of
media, each a random number of images (a geometric mix of stills and video frames).

    python benchmarks/ijb_scoring.py                       # numpy scoring on 2M pairs, extrapolated (a few minutes)
    python benchmarks/ijb_scoring.py --baseline-pairs 0    # numpy scoring on all 15.7M pairs
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from timmface.evaluation.ijb import pick_scoring_method, pool_templates, roc_curve, score_pairs, tar_at_far


def make_structure(
    n_images: int, n_templates: int, n_first: int, n_pairs: int, layout: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Random template/media ids per image and template-id pairs (+ labels) in the IJB files' conventions."""
    # every template gets at least one image, the rest are spread unevenly (Zipf-like weights)
    weights = rng.pareto(1.5, n_templates) + 1
    extra = rng.multinomial(n_images - n_templates, weights / weights.sum())
    per_template = extra + 1
    template_ids = np.arange(1, n_templates + 1) * 7  # ids need not be contiguous
    templates = np.repeat(template_ids, per_template)
    # media: consecutive runs inside each template, run lengths geometric (mean ~3 frames)
    run_start = rng.random(n_images) < 0.35
    run_start[np.concatenate([[0], np.cumsum(per_template)[:-1]])] = True
    medias = np.cumsum(run_start) % 100_000 + 1  # media ids are reused across templates, as in IJB
    perm = rng.permutation(n_images)  # image order independent of templates
    templates, medias = templates[perm], medias[perm]

    if layout == "ijb":
        first = rng.choice(template_ids, n_first, replace=False)
        second = np.setdiff1d(template_ids, first)
        counts = rng.multinomial(n_pairs, np.full(n_first, 1 / n_first))
        counts = np.minimum(counts, len(second))
        counts[0] += n_pairs - counts.sum()
        p1 = np.repeat(np.sort(first), counts)
        p2 = np.concatenate([rng.choice(second, c, replace=False) for c in counts])
    else:  # uniformly random pairs: many distinct first templates, where the GEMM does not pay
        p1 = rng.choice(template_ids, n_pairs)
        p2 = rng.choice(template_ids, n_pairs)
    labels = rng.random(n_pairs) < 19_557 / 15_658_489
    return templates, medias, p1, p2, labels


def reference_pooling(
    img_feats: np.ndarray, templates: np.ndarray, medias: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The reference ``image2template_feature`` algorithm: loop over templates, mean per media, sum, normalise."""
    unique_templates = np.unique(templates)
    out = np.zeros((len(unique_templates), img_feats.shape[1]))  # float64, as the reference
    for row, template in enumerate(unique_templates):
        (members,) = np.where(templates == template)
        feats, media_of = img_feats[members], medias[members]
        media_ids, media_counts = np.unique(media_of, return_counts=True)
        per_media = []
        for media, count in zip(media_ids, media_counts):
            (sel,) = np.where(media_of == media)
            per_media.append(feats[sel] if count == 1 else feats[sel].mean(0, keepdims=True))
        out[row] = np.sum(np.array(per_media), axis=0)
    norms = np.sqrt((out**2).sum(1, keepdims=True))
    return out / np.where(norms == 0, 1, norms), unique_templates


def reference_scoring(
    template_feats: np.ndarray, unique_templates: np.ndarray, p1: np.ndarray, p2: np.ndarray
) -> np.ndarray:
    """The reference ``verification`` algorithm: id lookup table, chunks of 100,000 pairs, gathered rows dotted."""
    lookup = np.zeros((unique_templates.max() + 1, 1), dtype=int)
    for row, template in enumerate(unique_templates):
        lookup[template] = row
    scores = np.zeros(len(p1))
    all_pairs = np.arange(len(p1))
    for chunk in (all_pairs[i : i + 100_000] for i in range(0, len(p1), 100_000)):
        feat1 = template_feats[lookup[p1[chunk]]]  # (chunk, 1, D)
        feat2 = template_feats[lookup[p2[chunk]]]
        scores[chunk] = np.sum(feat1 * feat2, -1).flatten()
    return scores


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=469_375)
    parser.add_argument("--templates", type=int, default=23_124)
    parser.add_argument("--first-templates", type=int, default=3_531, help="distinct templates in the pairs' column 1")
    parser.add_argument("--pairs", type=int, default=15_658_489)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layout", choices=["ijb", "random"], default="ijb")
    parser.add_argument(
        "--baseline-pairs", type=int, default=2_000_000, help="pairs the per-pair loops run on (0: all)"
    )
    parser.add_argument("--skip-pooling-baseline", action="store_true", help="do not run the numpy pooling loop")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timmface timings are the best of this many runs")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rng = np.random.default_rng(args.seed)

    t = time.perf_counter()
    templates, medias, p1, p2, labels = make_structure(
        args.images, args.templates, args.first_templates, args.pairs, args.layout, rng
    )
    img = rng.standard_normal((args.images, args.dim), dtype=np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)  # random unit vectors
    n_media = len(np.unique(templates * 1_000_003 + medias))
    print(
        f"data: {args.images:,} images, {args.templates:,} templates, {n_media:,} media, {args.pairs:,} pairs "
        f"({len(np.unique(p1)):,} x {len(np.unique(p2)):,} templates), dim {args.dim}, layout {args.layout}; "
        f"built in {time.perf_counter() - t:.1f} s"
    )
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"device: {device} ({where})")

    # --- pooling ---------------------------------------------------------------------------------------------------
    t_pool = float("inf")
    for _ in range(args.repeats):  # the first run also pays for faulting in fresh memory
        t = time.perf_counter()
        uniq, tfeats, _ = pool_templates(torch.from_numpy(img), templates, medias)
        t_pool = min(t_pool, time.perf_counter() - t)
    print(f"pooling  timmface torch  : {t_pool:8.2f} s  (best of {args.repeats})")
    t_ref_pool = None
    if not args.skip_pooling_baseline:
        t = time.perf_counter()
        ref_tfeats, ref_uniq = reference_pooling(img, templates, medias)
        t_ref_pool = time.perf_counter() - t
        assert np.array_equal(uniq, ref_uniq)
        err = float(np.abs(tfeats.numpy() - ref_tfeats).max())
        print(
            f"pooling  numpy loop      : {t_ref_pool:8.2f} s  ratio {t_ref_pool / t_pool:6.1f}x  max |diff| {err:.1e}"
        )
        assert err < 1e-5, f"template features differ from the reference loop by {err}"
    else:
        ref_tfeats, ref_uniq = tfeats.numpy().astype(np.float64), uniq

    # --- pair scoring ----------------------------------------------------------------------------------------------
    idx1, idx2 = np.searchsorted(uniq, p1), np.searchsorted(uniq, p2)
    for method in ("gemm", "gather"):  # warm-up: CUDA context, BLAS threads, allocator
        score_pairs(tfeats, idx1[:200_000], idx2[:200_000], device=device, method=method)
    n_base = len(p1) if args.baseline_pairs <= 0 else min(args.baseline_pairs, len(p1))
    scale = len(p1) / n_base  # the slow per-pair loops run on the first n_base pairs and are extrapolated
    picked = pick_scoring_method(idx1, idx2, len(tfeats))
    t_auto = float("inf")
    for _ in range(args.repeats):
        sync(device)
        t = time.perf_counter()
        scores = score_pairs(tfeats, idx1, idx2, device=device).numpy()
        sync(device)
        t_auto = min(t_auto, time.perf_counter() - t)
    print(f"scoring  timmface auto   : {t_auto:8.2f} s  (best of {args.repeats}; picked {picked})")

    # the method auto did not pick, for comparison: the GEMM's cost does not scale with the pairs, so it runs on all
    other = "gather" if picked == "gemm" else "gemm"
    n_other = n_base if other == "gather" else len(p1)
    sync(device)
    t = time.perf_counter()
    other_scores = score_pairs(tfeats, idx1[:n_other], idx2[:n_other], device=device, method=other).numpy()
    sync(device)
    t_other = (time.perf_counter() - t) * len(p1) / n_other
    assert np.abs(other_scores - scores[:n_other]).max() < 1e-5
    print(f"scoring  timmface {other:7s}: {t_other:8.2f} s")

    t = time.perf_counter()
    ref_scores = reference_scoring(ref_tfeats, ref_uniq, p1[:n_base], p2[:n_base])
    t_ref = time.perf_counter() - t
    t_ref_full = t_ref * scale
    err = float(np.abs(scores[:n_base] - ref_scores).max())
    print(f"scoring  numpy loop      : {t_ref_full:8.2f} s  ratio {t_ref_full / t_auto:6.1f}x  max |diff| {err:.1e}")
    if n_base < len(p1):
        print(
            f"         ({'gather and ' if other == 'gather' else ''}the numpy loop ran on the first {n_base:,} pairs, "
            f"x{scale:.2f} extrapolated; numpy measured {t_ref:.2f} s)"
        )
    assert err < 1e-5, f"scores differ from the reference loop by {err}"

    # --- ROC + TAR@FAR (no reference timing: the scripts call sklearn) -------------------------------------------
    t = time.perf_counter()
    fpr, tpr, _ = roc_curve(scores, labels, device=device)
    tar_at_far(fpr, tpr)
    print(f"ROC + TAR@FAR            : {time.perf_counter() - t:8.2f} s  ({len(fpr):,} ROC points)")

    if t_ref_pool is not None:
        ours, ref = t_pool + t_auto, t_ref_pool + t_ref_full
        print(f"pooling + scoring        : timmface {ours:.2f} s, numpy loops {ref:.2f} s, ratio {ref / ours:.1f}x")


if __name__ == "__main__":
    main()
