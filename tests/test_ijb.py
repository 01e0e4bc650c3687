"""IJB-B/C 1:1 verification on a synthetic set written in the released layout, with TAR@FAR known in advance.

Each loose crop is an "aligned face" carrying a 7-bit code (black/white cells) warped into a bigger canvas by a random
similarity; its landmarks are the ArcFace reference points moved the same way, so alignment gives the code back. The
oracle ``embed_fn`` reads the code and returns a designed vector, so every template feature, pair score and ROC point
is known by construction.
"""

from __future__ import annotations

import io
import pickle
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from timmface.errors import DataError
from timmface.evaluation.align import ARCFACE_REF_112, warp_affine
from timmface.evaluation.ijb import (
    FARS,
    PROTOCOLS,
    IJBAlignedDataset,
    IJBProtocol,
    IJBResult,
    evaluate_ijb,
    image_features,
    load_ijb_meta,
    make_embed_fn,
    pool_templates,
    roc_curve,
    save_roc_png,
    score_pairs,
    tar_at_far,
    verify_templates,
)

# --------------------------------------------------------------------------------------------------
# Images that carry a code through alignment
# --------------------------------------------------------------------------------------------------

CELL_X = [12, 34, 56, 78]  # 2 x 4 cells of 22 px in the face centre; bits 0..6 carry the code, cell 7 stays black
CELL_Y = [40, 62]


def draw_code(code: int) -> np.ndarray:
    """uint8 (112, 112, 3) aligned face: grey, white block top-left / black top-right (flip marker), code cells."""
    img = np.full((112, 112, 3), 128, np.uint8)
    img[8:32, 12:40] = 255
    img[8:32, 72:100] = 0
    for bit in range(8):
        y, x = CELL_Y[bit // 4], CELL_X[bit % 4]
        img[y : y + 22, x : x + 22] = 255 if (code >> bit) & 1 else 0
    return img


def read_code(img: torch.Tensor) -> tuple[int, bool]:
    """(code, was_flipped) from an aligned uint8 (3, 112, 112) image."""
    grey = img.float().mean(0)
    flipped = bool(grey[12:28, 16:36].mean() < grey[12:28, 76:96].mean())
    if flipped:
        grey = grey.flip(-1)
    code = 0
    for bit in range(7):
        y, x = CELL_Y[bit // 4], CELL_X[bit % 4]
        if grey[y + 6 : y + 16, x + 6 : x + 16].mean() > 128:
            code |= 1 << bit
    return code, flipped


class Oracle:
    """embed_fn: image -> table[code]; counts calls and flipped inputs."""

    def __init__(self, table: np.ndarray) -> None:
        self.table = torch.from_numpy(table).float()
        self.n_images = 0
        self.n_flipped = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 112, 112)
        codes = []
        for img in images:
            code, flipped = read_code(img)
            codes.append(code)
            self.n_flipped += flipped
        self.n_images += len(images)
        return self.table[codes]


# --------------------------------------------------------------------------------------------------
# The designed set
# --------------------------------------------------------------------------------------------------

# Pairs sorted by descending score: P genuine, N impostor (20 P, 100 N). ROC corners (fps, tps): (0,5) (1,5) (1,10)
# (12,10) (12,14) (42,14) (42,17) (100,17) (100,20); the points between corners are dropped (sklearn's
# drop_intermediate). So:
#   FAR 1e-1: nearest kept FPR is 0.12 (not 0.10, which was dropped), largest TPR there 14/20 = 0.70
#             (without drop_intermediate: 0.50; with timm-face's smallest-TPR tie rule: 0.50)
#   FAR 1e-2: FPR 0.01, largest TPR 10/20 = 0.50
#   FAR <= 1e-3: FPR 0, largest TPR 5/20 = 0.25
RUNS = [("P", 5), ("N", 1), ("P", 5), ("N", 11), ("P", 4), ("N", 30), ("P", 3), ("N", 58), ("P", 3)]
EXPECTED_TAR = {1e-6: 0.25, 1e-5: 0.25, 1e-4: 0.25, 1e-3: 0.25, 1e-2: 0.5, 1e-1: 0.7}
N_PROBES, N_GALLERY = 4, 30
DIM = 72


@dataclass
class Design:
    root: Path
    table: np.ndarray  # (128, DIM) vector of each code
    pair_scores: dict[tuple[int, int], float]  # (template id 1, template id 2) -> designed score
    failed: list[str]


def build_ijb(root: Path, set_name: str = "IJBC", seed: int = 0) -> Design:
    rng = np.random.default_rng(seed)
    probes = [101 + i for i in range(N_PROBES)]
    gallery = [201 + j for j in range(N_GALLERY)]
    empty_template = 999

    # designed scores: sequence position k -> 0.45 - 0.9 k / 119 (gaps of 0.0076), dealt to random (probe, gallery)
    labels_seq = [lab for lab, n in RUNS for _ in range(n)]
    values = 0.45 - 0.9 * np.arange(len(labels_seq)) / (len(labels_seq) - 1)
    combos = [(i, j) for i in range(N_PROBES) for j in range(N_GALLERY)]
    deal = rng.permutation(len(combos))
    s = np.zeros((N_PROBES, N_GALLERY))
    label = np.zeros((N_PROBES, N_GALLERY), dtype=int)
    for k, c in enumerate(deal):
        i, j = combos[c]
        s[i, j], label[i, j] = values[k], labels_seq[k] == "P"

    # template vectors: probes e_i; gallery j = sum_i s_ij e_i + r_j e_{4+j} (unit, since sum_i s_ij^2 <= 0.81)
    templates = probes + gallery
    tvec = {}
    for i, t in enumerate(probes):
        tvec[t] = np.eye(DIM)[i]
    for j, t in enumerate(gallery):
        v = np.zeros(DIM)
        v[:N_PROBES] = s[:, j]
        v[N_PROBES + j] = np.sqrt(1 - (s[:, j] ** 2).sum())
        tvec[t] = v
    # code 3k: the template vector; 3k+1 / 3k+2: plus / minus a private noise direction. Media A holds two "plus"
    # images, media B one "minus": only per-media means summed over media give back exactly 2 * t.
    table = np.zeros((128, DIM))
    for k, t in enumerate(templates):
        noise = 0.5 * np.eye(DIM)[N_PROBES + N_GALLERY + k] if k < DIM - N_PROBES - N_GALLERY else 0
        table[3 * k], table[3 * k + 1], table[3 * k + 2] = tvec[t], tvec[t] + noise, tvec[t] - noise

    # images: (template, media, code or None for a broken file, missing?)
    images: list[tuple[int, int, int | None, bool]] = []
    for k, t in enumerate(templates):
        # the same two media ids in every template: media are grouped per template, not globally
        images += [(t, 5, 3 * k + 1, False), (t, 5, 3 * k + 1, False), (t, 6, 3 * k + 2, False)]
    images += [(gallery[0], 6, None, False)]  # an undecodable extra image: the template is pooled from the rest
    images += [(gallery[1], 7, None, True)]  # listed but not on disk: counted like a broken file
    images += [(empty_template, 1, None, False), (empty_template, 2, None, False)]  # loses every image
    order = rng.permutation(len(images))
    images = [images[i] for i in order]

    set_dir = root / set_name
    (set_dir / "loose_crop").mkdir(parents=True)
    (set_dir / "meta").mkdir()
    lmk_lines, tid_lines, failed = [], [], []
    for n, (t, media, code, missing) in enumerate(images, 1):
        name = f"{n}.jpg"
        score = 0.99
        if code is None:
            failed.append(name)
            lmk = ARCFACE_REF_112 + rng.uniform(20, 40, 2)
            if not missing:
                (set_dir / "loose_crop" / name).write_bytes(b"\xff\xd8 not really a jpeg")
        else:
            # aligned -> loose: scale 0.9..1.2, rotation +-20 deg, centred in a 200 x 200 canvas +-6 px
            a, th = rng.uniform(0.9, 1.2), rng.uniform(-0.35, 0.35)
            m = np.array([[a * np.cos(th), -a * np.sin(th), 0], [a * np.sin(th), a * np.cos(th), 0]])
            m[:, 2] = [100, 100] - m[:, :2] @ [56, 56] + rng.uniform(-6, 6, 2)
            loose = warp_affine(torch.from_numpy(draw_code(code)).permute(2, 0, 1).contiguous(), m, (200, 200))
            Image.fromarray(loose.permute(1, 2, 0).numpy()).save(set_dir / "loose_crop" / name, quality=92)
            lmk = ARCFACE_REF_112 @ m[:, :2].T + m[:, 2]
        coords = " ".join(f"{v:.3f}" for v in lmk.reshape(-1))
        lmk_lines.append(f"{name} {coords} {score:.3f}")
        tid_lines.append(f"{name} {t} {media}")

    pair_scores, pair_lines = {}, []
    for i, j in combos:
        pair_lines.append(f"{probes[i]} {gallery[j]} {label[i, j]}")
        pair_scores[(probes[i], gallery[j])] = s[i, j]
    pair_lines += [f"{probes[0]} {empty_template} 0", f"{probes[1]} {empty_template} 1"]  # excluded pairs
    pair_lines = [pair_lines[i] for i in rng.permutation(len(pair_lines))]  # unsorted: exercises the pair sort

    low = set_name.lower()
    (set_dir / "meta" / f"{low}_name_5pts_score.txt").write_text("\n".join(lmk_lines) + "\n")
    (set_dir / "meta" / f"{low}_face_tid_mid.txt").write_text("\n".join(tid_lines) + "\n")
    (set_dir / "meta" / f"{low}_template_pair_label.txt").write_text("\n".join(pair_lines) + "\n")
    return Design(root=root, table=table, pair_scores=pair_scores, failed=sorted(failed, key=lambda s: int(s[:-4])))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The images here are tiny: thread-pool hand-offs would dominate (badly so on a loaded 2-core CI machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ijb(tmp_path_factory: pytest.TempPathFactory) -> Design:
    return build_ijb(tmp_path_factory.mktemp("ijb"))


@pytest.fixture
def ijb_copy(ijb: Design, tmp_path: Path) -> Path:
    shutil.copytree(ijb.root, tmp_path / "ijb")
    return tmp_path / "ijb"


# --------------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("protocol", "workers"), [("insightface", 0), ("adaface", 2), ("timm-face", 0)])
def test_evaluate_ijb_gives_the_designed_tar(ijb: Design, protocol: str, workers: int) -> None:
    oracle = Oracle(ijb.table)
    res = evaluate_ijb(ijb.root, "IJBC", oracle, protocol=protocol, batch_size=16, num_workers=workers)

    assert res.tar_at_far == EXPECTED_TAR
    assert res.protocol == PROTOCOLS[protocol].describe("IJBC")
    assert (res.n_images, res.n_failed_images, res.failed_images) == (106, 4, ijb.failed)
    assert (res.n_templates, res.n_templates_empty) == (35, 1)
    assert (res.n_pairs, res.n_pairs_excluded, res.n_genuine, res.n_impostor) == (120, 2, 20, 100)
    # the oracle saw every decodable image once, and once mirrored with flip TTA
    assert oracle.n_images == 102 * (2 if PROTOCOLS[protocol].flip else 1)
    assert oracle.n_flipped == (102 if PROTOCOLS[protocol].flip else 0)

    # every pair score is the designed cosine (so media-then-template pooling happened), excluded pairs are NaN
    meta = load_ijb_meta(ijb.root, "IJBC")
    for t1, t2, score in zip(meta.pair_t1, meta.pair_t2, res.scores):
        if t2 == 999:
            assert np.isnan(score)
        else:
            assert score == pytest.approx(ijb.pair_scores[(t1, t2)], abs=1e-5)
    assert res.fpr[0] == 0 and res.tpr[-1] == 1 and 0.5 < res.auc < 1
    assert "IJBC 1:1" in res.summary() and "4 images failed" in res.summary()


def test_tar_changes_when_templates_are_scored_differently(ijb: Design) -> None:
    """Sanity check of the design: a pooling that ignores media (plain image mean) gives other scores."""
    meta = load_ijb_meta(ijb.root, "IJBC")
    ds = IJBAlignedDataset(meta.image_dir, meta.names, meta.landmarks)
    oracle = Oracle(ijb.table)
    feats = torch.zeros(len(ds), DIM)
    ok = torch.zeros(len(ds), dtype=torch.bool)
    for i in range(len(ds)):
        img, good, _ = ds[i]
        if good:
            feats[i], ok[i] = oracle(img[None])[0], True
    res = verify_templates(meta, feats, ok, "adaface")
    assert res.tar_at_far == EXPECTED_TAR
    # media ids made unique per image: each image becomes its own media, so the "plus" images outweigh the "minus"
    meta.medias = np.arange(len(meta.medias))
    other = verify_templates(meta, feats, ok, "adaface")
    assert not np.allclose(np.nan_to_num(other.scores), np.nan_to_num(res.scores), atol=1e-3)


def test_non_finite_embeddings_are_reported(ijb: Design) -> None:
    meta = load_ijb_meta(ijb.root, "IJBC")
    feats = torch.ones(len(meta.names), 8)
    feats[3, 2] = float("inf")
    with pytest.raises(ValueError, match=rf"1 image embeddings are not finite .* e.g. {meta.names[3]}"):
        verify_templates(meta, feats, None, "insightface")


# --------------------------------------------------------------------------------------------------
# Pooling by hand
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("norm_fusion", [False, True])
@pytest.mark.parametrize("detector", [False, True])
def test_pooling_matches_hand_computation(flip: bool, norm_fusion: bool, detector: bool) -> None:
    emb = torch.tensor([[3.0, 0, 0], [0, 4, 0], [0, 0, 1], [1, 1, 0], [5, 5, 5]])
    emb_flip = torch.tensor([[1.0, 0, 0], [0, 0, 0], [0, 0, 1], [1, -1, 0], [1, 1, 1]])
    faceness = np.array([1.0, 0.5, 2.0, 1.0, 1.0], dtype=np.float32)
    templates = np.array([10, 10, 10, 20, 30])
    medias = np.array([1, 1, 2, 1, 3])  # media 1 appears in templates 10 and 20: two different media
    valid = np.array([True, True, True, True, False])  # template 30 has no decodable image

    feats = emb + emb_flip if flip else emb
    img = image_features(feats, faceness if detector else None, norm_fusion=norm_fusion)
    uniq, tf, has = pool_templates(img, templates, medias, valid)

    # by hand: image features a, b (media 1), c (media 2) of template 10; d of template 20
    if flip:
        a, b, c, d = np.array([4.0, 0, 0]), np.array([0.0, 4, 0]), np.array([0.0, 0, 2]), np.array([2.0, 0, 0])
    else:
        a, b, c, d = np.array([3.0, 0, 0]), np.array([0.0, 4, 0]), np.array([0.0, 0, 1]), np.array([1.0, 1, 0])
    if not norm_fusion:
        a, b, c, d = (v / np.linalg.norm(v) for v in (a, b, c, d))
    if detector:
        a, b, c = 1.0 * a, 0.5 * b, 2.0 * c
    t10 = (a + b) / 2 + c  # mean within media 1, plus media 2
    t20 = d
    assert uniq.tolist() == [10, 20, 30]
    assert has.tolist() == [True, True, False]
    np.testing.assert_allclose(tf[0].numpy(), t10 / np.linalg.norm(t10), atol=1e-6)
    np.testing.assert_allclose(tf[1].numpy(), t20 / np.linalg.norm(t20), atol=1e-6)
    assert torch.equal(tf[2], torch.zeros(3))


def loop_pooling(feats: np.ndarray, templates: np.ndarray, medias: np.ndarray) -> np.ndarray:
    """The reference image2template_feature algorithm, written as a plain loop."""
    out = []
    for t in np.unique(templates):
        in_t = templates == t
        media_means = [feats[in_t & (medias == m)].mean(0) for m in np.unique(medias[in_t])]
        v = np.sum(media_means, 0)
        out.append(v / np.linalg.norm(v))
    return np.array(out)


def test_pooling_matches_reference_loop_on_random_structure() -> None:
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(400, 16)).astype(np.float32)
    templates, medias = rng.integers(0, 40, 400) * 3 + 1, rng.integers(0, 8, 400)
    _, tf, _ = pool_templates(torch.from_numpy(feats), templates, medias)
    np.testing.assert_allclose(tf.numpy(), loop_pooling(feats, templates, medias), atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Scoring, ROC and TAR@FAR
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["auto", "gemm", "gather"])
def test_score_pairs_methods_agree_with_direct_dot(method: str) -> None:
    g = torch.Generator().manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(300, 32, generator=g), dim=1)
    i1 = torch.randint(0, 40, (5000,), generator=g)  # few first templates, unsorted
    i2 = torch.randint(0, 300, (5000,), generator=g)
    out = score_pairs(feats, i1.numpy(), i2.numpy(), method=method, block_bytes=4096)  # many small blocks
    torch.testing.assert_close(out, (feats[i1] * feats[i2]).sum(1), atol=1e-6, rtol=0)
    sorted_i1, order = torch.sort(i1, stable=True)
    torch.testing.assert_close(score_pairs(feats, sorted_i1, i2[order], method=method), out[order])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_scoring_and_roc_on_cuda_match_cpu() -> None:
    g = torch.Generator().manual_seed(1)
    feats = torch.nn.functional.normalize(torch.randn(500, 64, generator=g), dim=1)
    i1, i2 = torch.randint(0, 50, (20_000,), generator=g), torch.randint(0, 500, (20_000,), generator=g)
    for method in ("gemm", "gather"):
        cpu = score_pairs(feats, i1, i2, device="cpu", method=method)
        gpu = score_pairs(feats, i1, i2, device="cuda", method=method)
        torch.testing.assert_close(gpu, cpu, atol=1e-6, rtol=0)
    labels = (i1 % 7 == i2 % 7).numpy()
    for a, b in zip(roc_curve(cpu, labels), roc_curve(cpu, labels, device="cuda")):
        np.testing.assert_array_equal(a, b)


def test_roc_curve_with_ties_by_hand() -> None:
    # sorted: 0.9 P | 0.8 N, 0.8 P (tie: one diagonal step) | 0.7 N | 0.6 P
    scores = np.array([0.8, 0.6, 0.9, 0.7, 0.8])
    labels = np.array([0, 1, 1, 0, 1])
    fpr, tpr, thr = roc_curve(scores, labels)
    np.testing.assert_array_equal(fpr, [0, 0, 0.5, 1, 1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 2 / 3, 2 / 3, 1])
    np.testing.assert_array_equal(thr, [np.inf, 0.9, 0.8, 0.7, 0.6])


def test_roc_curve_drops_points_inside_straight_runs() -> None:
    scores = -np.arange(7.0)  # P P P N N N P in descending order
    labels = np.array([1, 1, 1, 0, 0, 0, 1])
    fpr, tpr, _ = roc_curve(scores, labels)
    np.testing.assert_array_equal(fpr, [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(tpr, [0, 0.25, 0.75, 0.75, 1])
    fpr_all, _, _ = roc_curve(scores, labels, drop_intermediate=False)
    assert len(fpr_all) == 8


def test_tar_at_far_takes_nearest_fpr_and_largest_tpr_on_ties() -> None:
    fpr = np.array([0, 0, 0.25, 0.25, 0.75, 1])
    tpr = np.array([0, 0.1, 0.2, 0.6, 0.8, 1])
    tars = tar_at_far(fpr, tpr, [1e-3, 0.2, 0.5, 0.9])
    # 1e-3 -> FPR 0 (TPR 0.1, the larger); 0.2 -> FPR 0.25 (0.6); 0.5 equidistant from 0.25 and 0.75 -> the later
    # point (the reference's first minimum in the flipped arrays); 0.9 -> FPR 1
    assert tars == {1e-3: 0.1, 0.2: 0.6, 0.5: 0.8, 0.9: 1.0}
    assert tuple(tar_at_far(fpr, tpr)) == FARS


# --------------------------------------------------------------------------------------------------
# Layout variants and bad input
# --------------------------------------------------------------------------------------------------


def test_layout_variants_are_accepted(ijb_copy: Path) -> None:
    meta_dir = ijb_copy / "IJBC" / "meta"
    for f in meta_dir.iterdir():  # upper-case prefixes
        f.rename(meta_dir / f.name.replace("ijbc_", "IJBC_"))
    a = load_ijb_meta(ijb_copy, "IJBC")
    b = load_ijb_meta(ijb_copy / "IJBC", "ijbc")  # the set folder itself
    assert a.names == b.names and len(a.names) == 106 and a.landmarks.shape == (106, 5, 2)
    # a separate "updated meta" folder (<meta_dir>/IJBC_meta/ijbc_*.txt) takes precedence
    shutil.copytree(meta_dir, ijb_copy / "newmeta" / "IJBC_meta")
    (meta_dir / "IJBC_template_pair_label.txt").unlink()
    assert len(load_ijb_meta(ijb_copy, "IJBC", meta_dir=ijb_copy / "newmeta").labels) == 122

    # template/media rows in another order than the landmark rows are matched by image name
    tid = meta_dir / "IJBC_face_tid_mid.txt"
    tid.write_text("\n".join(reversed(tid.read_text().splitlines())) + "\n")
    shutil.copy(tid, ijb_copy / "newmeta" / "IJBC_meta" / tid.name)
    c = load_ijb_meta(ijb_copy, "IJBC", meta_dir=ijb_copy / "newmeta")
    np.testing.assert_array_equal(c.templates, a.templates)


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda d: (d / "meta" / "ijbc_template_pair_label.txt").unlink(), "ijbc_template_pair_label.txt: missing"),
        (lambda d: shutil.rmtree(d / "loose_crop"), "no IJBC/loose_crop"),
        (
            lambda d: _edit(d / "meta" / "ijbc_name_5pts_score.txt", lambda ls: ls[:-1]),
            r"ijbc_name_5pts_score.txt: 105 landmark rows, but ijbc_face_tid_mid.txt lists 106",
        ),
        (
            lambda d: _edit(d / "meta" / "ijbc_name_5pts_score.txt", lambda ls: [ls[0].rsplit(" ", 1)[0]] + ls[1:]),
            r"ijbc_name_5pts_score.txt:1: expected 12 fields",
        ),
        (
            lambda d: _edit(d / "meta" / "ijbc_face_tid_mid.txt", lambda ls: [ls[0].replace(".jpg", ".png")] + ls[1:]),
            r"ijbc_face_tid_mid.txt: has no row for 1.jpg",
        ),
        (
            lambda d: _edit(d / "meta" / "ijbc_template_pair_label.txt", lambda ls: [*ls, "101 4242 1"]),
            r"ijbc_template_pair_label.txt: template 4242 has no image",
        ),
        (
            lambda d: _edit(d / "meta" / "ijbc_template_pair_label.txt", lambda ls: [*ls, "101 201 2"]),
            r"ijbc_template_pair_label.txt:123: label must be 0 or 1",
        ),
        (
            lambda d: _edit(d / "meta" / "ijbc_template_pair_label.txt", lambda ls: [*ls, "101 201"]),
            r"ijbc_template_pair_label.txt: .*column",
        ),
    ],
)
def test_bad_metadata_raises_data_error_naming_the_file(ijb_copy: Path, damage, match: str) -> None:
    damage(ijb_copy / "IJBC")
    with pytest.raises(DataError, match=match) as info:
        load_ijb_meta(ijb_copy, "IJBC")
    assert "\n" not in str(info.value)


def _edit(path: Path, fn) -> None:
    path.write_text("\n".join(fn(path.read_text().splitlines())) + "\n")


def test_no_decodable_image_raises(ijb_copy: Path) -> None:
    for f in (ijb_copy / "IJBC" / "loose_crop").iterdir():
        f.write_bytes(b"broken")
    with pytest.raises(DataError, match="none of the 106 images"):
        evaluate_ijb(ijb_copy, "IJBC", Oracle(np.zeros((128, 4))), num_workers=0)


def test_missing_root_and_unknown_protocol(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_ijb_meta(tmp_path / "nope", "IJBB")
    with pytest.raises(ValueError, match="unknown IJB protocol"):
        evaluate_ijb(tmp_path, "IJBB", Oracle(np.zeros((128, 4))), protocol="nope")


# --------------------------------------------------------------------------------------------------
# Helpers: embed_fn from a module, dataset pickling, protocols, plot
# --------------------------------------------------------------------------------------------------


class ChannelMean(nn.Module):
    def __init__(self, pair: bool = False) -> None:
        super().__init__()
        self.pair = pair
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        out = x.mean((2, 3))
        if self.pair:  # AdaFace style: (unit vector, norm)
            norm = out.norm(dim=1, keepdim=True)
            return out / norm, norm
        return out


@pytest.mark.parametrize("pair", [False, True])
def test_make_embed_fn_converts_and_batches(pair: bool) -> None:
    model = ChannelMean(pair)
    fn = make_embed_fn(model, device="cpu", batch_size=3)
    images = torch.zeros(7, 3, 112, 112, dtype=torch.uint8)
    images[:, 0] = 255  # red -> 1.0, others 0 -> -1.0
    out = fn(images)
    assert model.calls == 3 and out.dtype == torch.float32 and out.device.type == "cpu"
    torch.testing.assert_close(out, torch.tensor([[1.0, -1.0, -1.0]]).expand(7, 3))
    out_bf16 = make_embed_fn(ChannelMean(pair), device="cpu", dtype=torch.bfloat16)(images)
    torch.testing.assert_close(out_bf16, out, atol=1e-2, rtol=1e-2)


def test_evaluate_ijb_wraps_a_module(ijb: Design) -> None:
    model = ChannelMean()
    res = evaluate_ijb(ijb.root, "IJBC", model, protocol="adaface", device="cpu", batch_size=32, num_workers=0)
    assert model.calls == 2 * 4  # 102 decodable images in 4 batches of up to 32, each with its mirror
    assert (res.n_pairs, res.n_failed_images) == (120, 4) and set(res.tar_at_far) == set(FARS)


def test_dataset_pickles_and_aligns(ijb: Design) -> None:
    meta = load_ijb_meta(ijb.root, "IJBC")
    ds = pickle.loads(pickle.dumps(IJBAlignedDataset(meta.image_dir, meta.names, meta.landmarks)))
    good = next(i for i, n in enumerate(meta.names) if n not in ijb.failed)
    img, ok, idx = ds[good]
    assert ok and idx == good and img.shape == (3, 112, 112) and img.dtype == torch.uint8
    assert np.allclose(ijb.table[read_code(img)[0]], ijb.table[read_code(img.flip(-1))[0]])
    bad = meta.names.index(ijb.failed[0])
    img, ok, _ = ds[bad]
    assert not ok and img.sum() == 0


def test_protocol_presets_follow_the_reference_defaults() -> None:
    assert PROTOCOLS["insightface"] == IJBProtocol(flip=True, norm_fusion=True, detector_score=True)
    assert PROTOCOLS["adaface"] == IJBProtocol(flip=True, norm_fusion=True, detector_score=False)
    assert PROTOCOLS["timm-face"] == IJBProtocol(
        flip=False, norm_fusion=False, detector_score=False, interpolation="bicubic"
    )
    assert PROTOCOLS["adaface"].describe("IJBB") == "IJBB 1:1, flip TTA, norm fusion, no detector score"
    assert (
        PROTOCOLS["timm-face"]
        .describe("IJBC")
        .endswith("no flip, L2-normalised images, no detector score, bicubic alignment")
    )


def _result() -> IJBResult:
    fpr, tpr, thr = roc_curve(np.linspace(1, 0, 50), np.arange(50) % 3 == 0)
    return IJBResult("IJBC", "IJBC 1:1, no flip", tar_at_far(fpr, tpr), fpr, tpr, thr, 0.5, 50, 0, 5, 0, 50, 0, 17, 33)


def test_save_roc_png(tmp_path: Path) -> None:
    save_roc_png([_result(), _result()], tmp_path / "roc.png")
    data = (tmp_path / "roc.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(io.BytesIO(data)).size[0] > 100


def test_save_roc_png_names_the_extra_when_matplotlib_is_missing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(ImportError, match=r"pip install timmface\[plot\]"):
        save_roc_png(_result(), tmp_path / "roc.png")
