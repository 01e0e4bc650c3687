"""AdaDistill, EKD, the teacher memory and logit KD against independent float64 computations and hand-worked
cases; float32 KD math under autocast."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from timmface.distill import (
    EKD_ANCHORS,
    EvaluationOrientedDistillation,
    FeatureDistillation,
    HeadDistillation,
    RelationDistillation,
    TeacherMemory,
    adadistill_update_,
    ekd_loss,
    logit_kl,
    occurrence_index,
)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# --------------------------------------------------------------------------------------------------
# AdaDistill
# --------------------------------------------------------------------------------------------------


def _adadistill_reference(w: np.ndarray, s: np.ndarray, t: np.ndarray, labels: list[int]) -> tuple[np.ndarray, list]:
    """The reference formula in float64, one sample at a time in batch order."""
    w = w.copy()
    alphas = []
    for i, y in enumerate(labels):
        su, tu = _unit(s[i]), _unit(t[i])
        cos_st = float(np.clip(su @ tu, -1, 1))
        lam = float(np.clip(w[y] @ tu / np.linalg.norm(w[y]), 1e-6, 1))
        a = float(np.clip(cos_st * lam, 1e-6, 1))
        w[y] = a * w[y] + (1 - a) * tu
        alphas.append(a)
    return w, alphas


def test_occurrence_index():
    labels = torch.tensor([3, 1, 3, 3, 0, 1, 7])
    assert occurrence_index(labels).tolist() == [0, 0, 1, 2, 0, 1, 0]
    assert occurrence_index(torch.zeros(0, dtype=torch.long)).numel() == 0


def test_adadistill_update_equals_the_reference_formula_with_duplicates_in_batch_order():
    g = np.random.default_rng(0)
    C, D = 6, 8
    labels = [2, 0, 2, 4, 2, 1, 0, 5, 2]  # class 2 four times, class 0 twice
    t = g.normal(size=(len(labels), D)) * g.uniform(0.5, 3, size=(len(labels), 1))  # not normalised
    s = t + 0.6 * g.normal(size=t.shape)  # student close to the teacher: alpha between the clamps
    s[7] = -t[7]  # cos(s, t) < 0: alpha clamped to 1e-6
    w = 0.3 * _unit(t[[1, 5, 0, 7, 3, 7]] + 0.5 * g.normal(size=(C, D))) * g.uniform(0.5, 2, size=(C, 1))
    w[5] = -w[5]  # cos(w, t) < 0: lambda clamped to 1e-6
    want_w, want_alpha = _adadistill_reference(w, s, t, labels)

    centres = torch.tensor(w, dtype=torch.float32)
    before = centres.clone()
    alpha = adadistill_update_(centres, torch.tensor(s), torch.tensor(t, dtype=torch.float32), torch.tensor(labels))
    np.testing.assert_allclose(alpha.numpy(), want_alpha, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(centres.numpy(), want_w, rtol=1e-5, atol=1e-6)
    assert alpha[7].item() == pytest.approx(1e-6, rel=1e-5)  # both clamps at their floor
    assert sum(1e-6 < a < 1 for a in want_alpha) >= 6  # mostly between the clamps
    # sequential, not all at once from the old row (which is what a vectorised assignment would do)
    parallel = w.copy()
    for i, y in enumerate(labels):
        tu = _unit(t[i])
        a = np.clip(np.clip(_unit(s[i]) @ tu, -1, 1) * np.clip(w[y] @ tu / np.linalg.norm(w[y]), 1e-6, 1), 1e-6, 1)
        parallel[y] = a * w[y] + (1 - a) * tu  # the last of the duplicates wins
    assert np.abs(parallel[2] - want_w[2]).max() > 5e-2
    untouched = [c for c in range(C) if c not in labels]
    assert torch.equal(centres[untouched], before[untouched])


def test_adadistill_update_runs_in_float32_under_autocast_and_keeps_the_centre_dtype():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 16, generator=g).bfloat16(), torch.randn(5, 16, generator=g)
    s = s + 0 * t.bfloat16()
    labels = torch.tensor([1, 1, 0, 3, 1])
    w0 = torch.randn(4, 16, generator=g) * 0.01
    plain, amp = w0.clone(), w0.clone()
    a1 = adadistill_update_(plain, s, t, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a2 = adadistill_update_(amp, s, t, labels)
    assert torch.equal(plain, amp) and torch.equal(a1, a2) and amp.dtype == torch.float32
    param = torch.nn.Parameter(w0.clone())  # a head's weight: updated in place, still a trainable leaf
    adadistill_update_(param, s, t, labels)
    assert torch.equal(param.detach(), plain) and param.requires_grad and param.grad is None


# --------------------------------------------------------------------------------------------------
# EKD
# --------------------------------------------------------------------------------------------------


def test_ekd_loss_hand_worked_case():
    """Thresholds read at rank L // a of each model's own negatives; soft ranks against its own thresholds.

    Negatives (student, teacher): (0.9, 0.0), (0.5, 0.6), (0.3, 0.8), (0.1, 0.2). anchors=(2,): rank 4 // 2 = 2
    of the sorted similarities: student 0.3, teacher 0.2 (momentum 1: the running thresholds become these).
    Positive (0.3, 0.7): student rank sigmoid(0) = 0.5, teacher sigmoid(50) ~ 1 -> (0.5 - 1)^2 = 0.25.
    Hard negatives (student's top 2): (0.9, 0.0) -> ranks 1 vs sigmoid(-20) ~ 0; (0.5, 0.6) -> sigmoid(20) ~ 1
    vs 1 -> MSE ((1 - 0)^2 + 0^2) / 2 = 0.5. Loss = 0.02 * 0.25 + 0.01 * 0.5 = 0.01.
    """
    sim_s = torch.tensor([0.9, 0.3, 0.5, 0.3, 0.1], requires_grad=True)
    sim_t = torch.tensor([0.0, 0.7, 0.6, 0.8, 0.2])
    positive = torch.tensor([False, True, False, False, False])
    sa, ta = torch.zeros(1), torch.zeros(1)
    loss = ekd_loss(sim_s, sim_t, positive, sa, ta, temperature=0.01, topk=2, momentum=1.0, anchors=(2,))
    assert sa.item() == pytest.approx(0.3) and ta.item() == pytest.approx(0.2)
    assert loss.item() == pytest.approx(0.02 * 0.25 + 0.01 * 0.5, abs=1e-8)
    loss.backward()
    assert sim_s.grad[3] == 0 and sim_s.grad[4] == 0  # the easy negatives are not critical pairs
    assert sim_s.grad[1] < 0  # the positive's rank rises towards the teacher's: its similarity is pushed up

    # the default running thresholds start at zero and move by 1% of the new value per step (TFace)
    sa, ta = torch.zeros(len(EKD_ANCHORS)), torch.zeros(len(EKD_ANCHORS))
    ekd_loss(sim_s.detach(), sim_t, positive, sa, ta)
    torch.testing.assert_close(sa, torch.full((6,), 0.01 * 0.9))  # 4 negatives: every rank L // a is 0
    ekd_loss(sim_s.detach() - 0.5, sim_t, positive, sa, ta)
    torch.testing.assert_close(sa, torch.full((6,), 0.01 * 0.4 + 0.99 * 0.009))
    # no positive pair: that part is zero, not NaN
    value = ekd_loss(sim_s, sim_t, torch.zeros(5, dtype=torch.bool), torch.zeros(6), torch.zeros(6))
    assert torch.isfinite(value)


def _tface_ekd_numpy(s: np.ndarray, t: np.ndarray, labels: np.ndarray, s_anchor, t_anchor, topk: int):
    """TFace's EKD.forward in float64 numpy (upper-triangle pairs of the batch)."""
    s, t = _unit(s), _unit(t)
    n = len(labels)
    iu = np.triu_indices(n, 1)
    same = (labels[:, None] == labels[None, :])[iu]
    ss, tt = (s @ s.T)[iu], (t @ t.T)[iu]
    pos_s, pos_t, neg_s, neg_t = ss[same], tt[same], ss[~same], tt[~same]
    order = np.argsort(-neg_s, kind="stable")
    idx = [len(neg_s) // a for a in (10, 100, 1000, 10000, 100000, 1000000)]
    s_anchor = 0.01 * neg_s[order][idx] + 0.99 * s_anchor
    t_anchor = 0.01 * np.sort(neg_t)[::-1][idx] + 0.99 * t_anchor

    def rel(a, b):
        ra = (1 / (1 + np.exp(np.clip(-(a[:, None] - s_anchor[None]) / 0.01, -50, 50)))).sum(1)
        rb = (1 / (1 + np.exp(np.clip(-(b[:, None] - t_anchor[None]) / 0.01, -50, 50)))).sum(1)
        return np.mean((ra - rb) ** 2)

    sel = order[:topk]
    return 0.02 * rel(pos_s, pos_t) + 0.01 * rel(neg_s[sel], neg_t[sel]), s_anchor, t_anchor


def test_ekd_term_equals_tface_in_float64():
    g = torch.Generator().manual_seed(3)
    n, d = 48, 16
    labels = torch.randint(0, 12, (n,), generator=g)
    centres = torch.randn(12, d, generator=g)
    t = centres[labels] + 0.8 * torch.randn(n, d, generator=g)
    s = t + 0.9 * torch.randn(n, d, generator=g)
    term = EvaluationOrientedDistillation(weight=2.0, topk=200)
    sa, ta = np.zeros(6), np.zeros(6)
    for step in range(3):  # the running thresholds carry over between steps
        s_step = s + 0.1 * step
        value, weighted = term(s_step, labels, {"teacher": t})
        want, sa, ta = _tface_ekd_numpy(s_step.double().numpy(), t.double().numpy(), labels.numpy(), sa, ta, 200)
        assert value.item() == pytest.approx(want, rel=1e-4)
        assert weighted.item() == pytest.approx(2 * want, rel=1e-4)
        np.testing.assert_allclose(term.s_anchor.numpy(), sa, rtol=1e-5)
        np.testing.assert_allclose(term.t_anchor.numpy(), ta, rtol=1e-5)
    assert set(term.state_dict()) == {"s_anchor", "t_anchor"}  # saved with the run


# --------------------------------------------------------------------------------------------------
# Teacher memory and the relation terms over it
# --------------------------------------------------------------------------------------------------


def test_teacher_memory_fifo_and_state():
    mem = TeacherMemory(5, 2)
    slots = mem.push(torch.tensor([[3.0, 4.0], [0.0, 2.0]]), torch.tensor([7, 8]))
    assert slots.tolist() == [0, 1] and mem.count == 2
    torch.testing.assert_close(mem.view()[0], torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    mem.push(torch.ones(2, 2), torch.tensor([1, 2]))
    slots = mem.push(torch.tensor([[1.0, 0.0], [0.0, -1.0]]), torch.tensor([3, 4]))
    assert slots.tolist() == [4, 0] and mem.count == 5  # the oldest row (label 7) was overwritten
    assert mem.view()[1].tolist() == [4, 8, 1, 2, 3]
    other = TeacherMemory(5, 2)
    assert other.load_state_dict(mem.state_dict())
    assert torch.equal(other.emb, mem.emb) and torch.equal(other.labels, mem.labels)
    assert (other.ptr, other.count) == (mem.ptr, mem.count)
    assert (
        other.push(torch.ones(1, 2), torch.tensor([9])).tolist()
        == mem.push(torch.ones(1, 2), torch.tensor([9])).tolist()
    )
    assert not TeacherMemory(6, 2).load_state_dict(mem.state_dict())  # another size: start empty


def _memory_targets(t: torch.Tensor, labels: torch.Tensor, old: torch.Tensor, old_labels: torch.Tensor):
    mem = TeacherMemory(32, t.shape[1])
    mem.push(old, old_labels)
    slots = mem.push(t, labels)
    emb, mlabels = mem.view()
    return {"teacher": t, "memory_emb": emb, "memory_labels": mlabels, "memory_slots": slots}


def test_relation_terms_over_the_memory_against_float64():
    g = torch.Generator().manual_seed(5)
    n, k, d = 6, 10, 8
    labels, old_labels = torch.randint(0, 4, (n,), generator=g), torch.randint(0, 4, (k,), generator=g)
    s, t, old = (torch.randn(m, d, generator=g) for m in (n, n, k))
    targets = _memory_targets(t, labels, old, old_labels)
    m = np.concatenate([_unit(old.double().numpy()), _unit(t.double().numpy())])  # slots 0..9 old, 10..15 batch
    su, tu = _unit(s.double().numpy()), _unit(t.double().numpy())
    ss, st = su @ m.T, tu @ m.T
    keep = np.ones_like(ss, dtype=bool)
    keep[np.arange(n), k + np.arange(n)] = False  # each row's own teacher embedding
    value, _ = RelationDistillation("mse", memory=True, student_dim=d, teacher_dim=d)(s, labels, targets)
    assert value.item() == pytest.approx(((ss - st) ** 2)[keep].mean(), rel=1e-5)
    temp = 0.2
    value, _ = RelationDistillation("kl", temperature=temp, memory=True, student_dim=d, teacher_dim=d)(
        s, labels, targets
    )
    kl = []
    for i in range(n):
        a, b = ss[i][keep[i]] / temp, st[i][keep[i]] / temp
        ps, pt = np.exp(a - a.max()) / np.exp(a - a.max()).sum(), np.exp(b - b.max()) / np.exp(b - b.max()).sum()
        kl.append((pt * np.log(pt / ps)).sum())
    assert value.item() == pytest.approx(np.mean(kl) * temp**2, rel=1e-4)
    # the student in another size goes through a learned map into the teacher's space
    term = RelationDistillation("mse", memory=True, student_dim=5, teacher_dim=d)
    s5 = torch.randn(n, 5, generator=g)
    value, _ = term(s5, labels, targets)
    p = _unit((s5 @ term.proj.weight.T).detach().double().numpy())
    assert value.item() == pytest.approx(((p @ m.T - st) ** 2)[keep].mean(), rel=1e-4)
    # EKD over the memory: positives are pairs with memory rows of the same identity
    ekd = EvaluationOrientedDistillation(memory=True, student_dim=d, teacher_dim=d, topk=20)
    value, _ = ekd(s, labels, targets)
    mlabels = np.concatenate([old_labels.numpy(), labels.numpy()])
    same = (labels.numpy()[:, None] == mlabels[None])[keep]
    sims, simt = ss[keep], st[keep]
    neg_s, neg_t = sims[~same], simt[~same]
    L = len(neg_s)
    sa = 0.01 * np.sort(neg_s)[::-1][[L // a for a in EKD_ANCHORS]]
    ta = 0.01 * np.sort(neg_t)[::-1][[L // a for a in EKD_ANCHORS]]

    def rank(x, a):
        return (1 / (1 + np.exp(-np.clip((x[:, None] - a[None]) / 0.01, -50, 50)))).sum(1)

    hard = np.argsort(-neg_s, kind="stable")[:20]
    want = 0.02 * np.mean((rank(sims[same], sa) - rank(simt[same], ta)) ** 2)
    want += 0.01 * np.mean((rank(neg_s[hard], sa) - rank(neg_t[hard], ta)) ** 2)
    assert value.item() == pytest.approx(want, rel=1e-4)


# --------------------------------------------------------------------------------------------------
# Logit KD
# --------------------------------------------------------------------------------------------------


def test_logit_kl_value_and_gradient_against_float64():
    g = torch.Generator().manual_seed(7)
    cs = (torch.rand(5, 9, generator=g) * 2 - 1).requires_grad_(True)
    ct = torch.rand(5, 9, generator=g) * 2 - 1
    temp = 0.1
    value = logit_kl(cs, ct, temp)
    ref_s = cs.detach().double().requires_grad_(True)
    log_ps, log_pt = F.log_softmax(ref_s / temp, 1), F.log_softmax(ct.double() / temp, 1)
    ref = (log_pt.exp() * (log_pt - log_ps)).sum(1).mean() * temp**2
    ref.backward()
    value.backward()
    assert value.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(cs.grad.double(), ref_s.grad, rtol=1e-4, atol=1e-7)
    same = torch.rand(3, 4)
    assert logit_kl(same, same, 0.5).item() == pytest.approx(0.0, abs=1e-7)


def test_head_distillation_logit_loss_uses_the_sampled_teacher_centres():
    g = torch.Generator().manual_seed(8)
    tc = F.normalize(torch.randn(10, 6, generator=g), dim=1)
    hook = HeadDistillation(logit_weight=3.0, logit_temperature=4.0, logit_scale=30.0, teacher_centres=tc)
    teacher = torch.randn(4, 6, generator=g)
    index = torch.tensor([1, 4, 5, 8])
    cosine = torch.rand(4, 4, generator=g)
    out = hook.logit_loss(cosine, teacher, index)
    # Hinton's KD on the head's logits without margin, s * cos, at T = 4
    want = logit_kl(30 * cosine, 30 * F.normalize(teacher, dim=1) @ tc[index].T, 4.0)
    assert out["kd_logit"].item() == pytest.approx(want.item(), rel=1e-6)
    assert hook.weighted(out).item() == pytest.approx(3 * want.item(), rel=1e-6)
    assert "teacher_centres" not in hook.state_dict()  # not checkpointed: the run folder keeps it once


# --------------------------------------------------------------------------------------------------
# Precision: KD math in float32 under autocast
# --------------------------------------------------------------------------------------------------


def test_kd_terms_run_in_float32_under_bf16_autocast():
    g = torch.Generator().manual_seed(9)
    n, d = 32, 64
    labels = torch.randint(0, 6, (n,), generator=g)
    t = torch.randn(n, d, generator=g)
    s = t + 0.05 * torch.randn(n, d, generator=g)  # a student near its teacher: small KD values, where bf16 hurts
    targets = _memory_targets(t, labels, torch.randn(20, d, generator=g), torch.randint(0, 6, (20,), generator=g))
    terms = {
        "feature": FeatureDistillation(d, d),
        "relation_kl": RelationDistillation("kl", temperature=0.1),
        "relation_mse": RelationDistillation("mse"),
        "memory_kl": RelationDistillation("kl", temperature=0.1, memory=True, student_dim=d, teacher_dim=d),
        "ekd": EvaluationOrientedDistillation(topk=50),
    }
    for name, term in terms.items():
        state = {k: v.clone() for k, v in term.state_dict().items()}
        plain = term(s, labels, targets)[0]
        term.load_state_dict(state)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            amp = term(s, labels, targets)[0]
        assert amp.dtype == torch.float32, name
        assert amp.item() == pytest.approx(plain.item(), rel=1e-6, abs=1e-9), name
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cos_s, cos_t = F.normalize(s, dim=1) @ F.normalize(t, dim=1).T, F.normalize(t, dim=1) @ F.normalize(t, dim=1).T
        amp = logit_kl(cos_s, cos_t, 0.1)
    assert amp.item() == pytest.approx(logit_kl(cos_s.float(), cos_t.float(), 0.1).item(), rel=1e-6)
    # what the guard prevents: the same KL with autocast left on (bf16 similarities and softmax) is far off
    from timmface.distill import similarity_kl

    su, tu, exclude = F.normalize(s, dim=1), F.normalize(t, dim=1), torch.eye(n, dtype=torch.bool)
    exact = similarity_kl(su @ su.T, tu @ tu.T, 0.1, exclude)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rough = similarity_kl(su @ su.T, tu @ tu.T, 0.1, exclude)
    assert abs(rough.item() / exact.item() - 1) > 0.05


# --------------------------------------------------------------------------------------------------
# In the margin heads: AdaDistill before the logits (CosFace, ArcFace, AdaFace, Partial FC), logit KD
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_name", ["cosface", "arcface", "adaface"])
@pytest.mark.parametrize("partial_fc", [0.0, 0.5])
def test_adadistill_updates_the_centres_before_the_logits(loss_name: str, partial_fc: float):
    from timmface.losses import build_loss
    from timmface.model import MarginHead

    g = torch.Generator().manual_seed(11)
    C, D = 12, 8
    labels = torch.tensor([3, 7, 3, 0, 9, 7])
    t = torch.randn(len(labels), D, generator=g)
    emb = (t + 0.5 * torch.randn(len(labels), D, generator=g)) * 10
    head = MarginHead(C, D, build_loss(loss_name), partial_fc=partial_fc).train()
    head.distill = HeadDistillation(adadistill=True)
    w0 = head.weight.detach().clone()
    torch.manual_seed(5)  # the Partial FC sample
    out = head(emb.clone().requires_grad_(), labels, t)

    updated = w0.clone()
    alpha = adadistill_update_(updated, emb, t, labels)
    torch.testing.assert_close(head.weight.detach(), updated, rtol=0, atol=0)
    assert out["distill/alpha"].item() == pytest.approx(alpha.mean().item())
    # the margin loss of this very step used the updated centres (same sample, fresh loss statistics)
    plain = MarginHead(C, D, build_loss(loss_name), partial_fc=partial_fc).train()
    with torch.no_grad():
        plain.weight.copy_(updated)
    torch.manual_seed(5)
    assert plain(emb, labels)["margin"].item() == pytest.approx(out["margin"].item(), rel=1e-6)
    # and the centres stay trainable: the loss has a gradient on the (updated) rows
    out["margin"].backward()
    assert head.weight.grad is not None and head.weight.grad[labels].abs().sum() > 0


def test_logit_kd_in_the_head_over_the_sampled_classes():
    from timmface.losses import CosFace
    from timmface.model import MarginHead

    g = torch.Generator().manual_seed(12)
    C, D = 20, 8
    labels = torch.tensor([1, 4, 4, 17])
    tc = F.normalize(torch.randn(C, 6, generator=g), dim=1)  # the teacher's centres, another size
    t = torch.randn(len(labels), 6, generator=g)
    emb = torch.randn(len(labels), D, generator=g)
    head = MarginHead(C, D, CosFace(s=32.0), partial_fc=0.25).train()
    head.distill = HeadDistillation(logit_weight=2.0, logit_temperature=4.0, logit_scale=32.0, teacher_centres=tc)
    torch.manual_seed(3)
    out = head(emb, labels, t)
    torch.manual_seed(3)
    from timmface.model import partial_fc_sample

    index = partial_fc_sample(labels, C, 5)
    cos_s = F.normalize(emb, dim=1) @ F.normalize(head.weight.detach()[index], dim=1).T
    cos_t = F.normalize(t, dim=1) @ tc[index].T
    want = logit_kl(32 * cos_s, 32 * cos_t, 4.0)
    assert out["kd_logit"].item() == pytest.approx(want.item(), rel=1e-5)
    assert head.distill.weighted(out).item() == pytest.approx(2 * want.item(), rel=1e-5)


# --------------------------------------------------------------------------------------------------
# The trainer: every method online and from the cache, resume, config
# --------------------------------------------------------------------------------------------------

METHODS = {
    "feature": ["distill.feature_weight=5"],
    "relation": ["distill.feature_weight=0", "distill.relation_weight=2", "distill.relation_loss=kl"],
    "memory": ["distill.feature_weight=0", "distill.relation_weight=2", "distill.memory_size=24"],
    "ekd": ["distill.feature_weight=0", "distill.ekd_weight=50", "distill.memory_size=24", "distill.ekd_topk=50"],
    "adadistill": ["distill.feature_weight=0", "distill.centres=adadistill"],
    "logit": ["distill.feature_weight=0", "distill.logit_weight=1", "distill.logit_temperature=4"],
}
ALL_TERMS = [
    "distill.feature_weight=5", "distill.relation_weight=2", "distill.relation_loss=kl", "distill.memory_size=24",
    "distill.ekd_weight=50", "distill.ekd_topk=50", "distill.centres=adadistill", "distill.logit_weight=1",
]  # fmt: skip


@pytest.fixture(scope="module")
def teacher_run(toy_data, tmp_path_factory):
    """A tiny 32-d model trained on the toy data: the teacher (a timmface run directory)."""
    from tests.conftest import tiny_run_args
    from timmface.cli import main

    run = tmp_path_factory.mktemp("teacher") / "run"
    assert main(["train", *tiny_run_args(toy_data, run, "total_steps=4", "eval_every=0")]) == 0
    return run


@pytest.fixture(scope="module")
def teacher_cache(teacher_run, toy_data, tmp_path_factory):
    from timmface.cli import main

    out = tmp_path_factory.mktemp("cache") / "t.tfemb"
    args = ["embed", "--model", str(teacher_run), "--data", str(toy_data), "--out", str(out), "--cache"]
    assert main([*args, "--image-size", "32"]) == 0
    return out


def _args(data, out, teacher, *extra: str) -> list[str]:
    from tests.conftest import tiny_run_args

    return [
        *tiny_run_args(data, out, "eval_every=3", "save_every=3", "total_steps=6"),
        f"distill.teacher={teacher}",
        "distill.teacher_dtype=float32",
        *extra,
    ]


def _records(run) -> list[dict]:
    import json

    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("source", ["online", "cached"])
@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_trains_online_and_from_the_cache(method, source, toy_data, teacher_run, teacher_cache, tmp_path):
    from timmface.cli import main

    extra = [*METHODS[method], *([f"distill.cache={teacher_cache}"] if source == "cached" else [])]
    short = ["total_steps=4", "eval_every=2", "save_every=0"]
    assert main(["distill", *_args(toy_data, tmp_path / "r", teacher_run, *short, *extra)]) == 0
    records = _records(tmp_path / "r")
    train = [r for r in records if "loss" in r]
    assert len(train) == 4
    term = {"feature": "kd_feature", "relation": "kd_relation", "memory": "kd_relation", "ekd": "kd_ekd",
            "adadistill": "distill/alpha", "logit": "kd_logit"}[method]  # fmt: skip
    assert all(term in r and np.isfinite(r[term]) for r in train), term
    assert all(-1 <= r["distill/cos_st"] <= 1 for r in train)
    weighted = {"kd_feature": 5, "kd_relation": 2, "kd_ekd": 50, "kd_logit": 1}
    for r in train:  # the logged total is the margin loss plus the weighted terms
        total = r["margin"] + sum(w * r[k] for k, w in weighted.items() if k in r)
        assert r["loss"] == pytest.approx(total, rel=1e-4)
    evals = [r for r in records if "acc/toy_val" in r]
    teacher = [r for r in records if "teacher_acc/toy_val" in r]
    assert [r["step"] for r in evals] == [r["step"] for r in teacher] == [2, 4]
    assert teacher[0]["teacher_acc/toy_val"] == teacher[1]["teacher_acc/toy_val"]  # computed once
    assert (tmp_path / "r" / "teacher_eval.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("source", ["online", "cached"])
def test_every_new_term_resumes_exactly(source, toy_data, teacher_run, teacher_cache, tmp_path):
    from tests.conftest import assert_same_weights, whole_and_resumed
    from timmface.config import load_config
    from timmface.distill import DistillTrainer

    extra = [*ALL_TERMS, *([f"distill.cache={teacher_cache}"] if source == "cached" else []), "head.partial_fc=0.5"]

    def make(out, more):
        return DistillTrainer(load_config(None, _args(toy_data, out, teacher_run, *extra, *more)))

    whole, second = whole_and_resumed(make, tmp_path / "a", tmp_path / "b", until=3)

    def losses(run):
        return [
            (r["step"], r["loss"], r["kd_ekd"], r["kd_logit"], r["distill/alpha"]) for r in _records(run) if "loss" in r
        ]

    assert losses(tmp_path / "b") == losses(tmp_path / "a")
    assert_same_weights(whole.model, second.model)  # backbone, centres, projection, EKD thresholds
    assert torch.equal(whole.memory.emb, second.memory.emb) and torch.equal(whole.memory.labels, second.memory.labels)
    assert (whole.memory.ptr, whole.memory.count) == (second.memory.ptr, second.memory.count)
    assert whole.memory.count == 24  # 6 steps x 8 rows through a memory of 24: it wrapped around


def test_print_config_shows_the_new_keys_with_their_defaults(capsys):
    import yaml

    from timmface.cli import main

    assert main(["distill", "--print-config"]) == 0
    distill = yaml.safe_load(capsys.readouterr().out)["distill"]
    want = {
        "centres": "off", "centres_init": "random", "memory_size": 0, "ekd_weight": 0.0, "ekd_temperature": 0.01,
        "ekd_topk": 2000, "logit_weight": 0.0, "logit_temperature": 4.0,
    }  # fmt: skip
    assert {k: distill[k] for k in want} == want


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["distill.memory_size=24"], "memory_size feeds the relation terms"),
        (["distill.memory_size=4", "distill.relation_weight=1"], "at least one global batch"),
        (["distill.memory_size=24", "distill.relation_weight=1", "distill.relation_gather=true"], "relation_gather"),
        (["distill.centres_init=teacher"], "centres_init=teacher"),
        (["distill.logit_temperature=0"], "logit_temperature"),
        (["distill.ekd_temperature=-1"], "ekd_temperature"),
        (["distill.ekd_topk=0"], "ekd_topk"),
        (["distill.centres=adadistill"], None),  # fine
    ],
)
def test_bad_combinations_are_one_line_config_errors(extra, message, toy_data, tmp_path):
    from timmface.config import load_config
    from timmface.errors import ConfigError

    args = ["batch_size=8", *extra]
    if message is None:
        load_config(None, args)
        return
    with pytest.raises(ConfigError, match=message) as e:
        load_config(None, args)
    assert "\n" not in str(e.value)


def test_runtime_combinations_need_matching_sizes(toy_data, teacher_run, tmp_path):
    from timmface.config import load_config
    from timmface.distill import DistillTrainer
    from timmface.errors import ConfigError

    for extra, message in [
        (["distill.centres=adadistill"], "distill.centres=adadistill"),
        (
            [
                "distill.memory_size=24",
                "distill.relation_weight=1",
                "distill.allow_projection=false",
                "distill.feature_weight=0",
            ],
            "memory_size",
        ),  # fmt: skip
    ]:
        with pytest.raises(ConfigError, match=message) as e:
            DistillTrainer(
                load_config(None, _args(toy_data, tmp_path / "x", teacher_run, "model.embed_dim=16", *extra))
            )
        assert "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------------
# DDP (gloo, 2 ranks)
# --------------------------------------------------------------------------------------------------

SHARD_C, SHARD_D = 11, 8
SHARD_LABELS = torch.tensor([4, 9, 4, 0, 9, 10, 4])  # rank 0: 4 rows, rank 1: 3; class 4 on both ranks' rows
SHARD_SPLIT = (4, 3)


def _shard_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(21)
    t = torch.randn(len(SHARD_LABELS), SHARD_D, generator=g)
    s = (t + 0.4 * torch.randn(t.shape, generator=g)) * 3
    tc = F.normalize(torch.randn(SHARD_C, SHARD_D, generator=g), dim=1)
    return s, t, tc


def _sharded_hook(rank: int, world: int) -> dict:
    from timmface.losses import CosFace
    from timmface.partial_fc import ShardedMarginHead

    s, t, tc = _shard_case()
    lo, n = sum(SHARD_SPLIT[:rank]), SHARD_SPLIT[rank]
    head = ShardedMarginHead(SHARD_C, SHARD_D, CosFace(), seed=3)
    start, stop = head.local_range
    head.distill = HeadDistillation(
        adadistill=True, logit_weight=1.0, logit_temperature=4.0, teacher_centres=tc[start:stop]
    )
    x = s[lo : lo + n].clone().requires_grad_()
    out = head(x, SHARD_LABELS[lo : lo + n], t[lo : lo + n])
    (out["margin"] + head.distill.weighted(out)).backward()
    return {
        "weight": head.full_weight(), "alpha": out["distill/alpha"], "kd_logit": out["kd_logit"].detach(),
        "margin": out["margin"].detach(), "emb_grad": x.grad, "range": [start, stop],
    }  # fmt: skip


@pytest.mark.multiprocess
def test_sharded_head_adadistill_and_logit_kd_equal_one_rank(tmp_path):
    """Each rank updates the rows it owns from the all-gathered batch in global order: same centres as 1 rank."""
    from tests.test_distributed import spawn
    from timmface.losses import CosFace
    from timmface.partial_fc import ShardedMarginHead

    r0, r1 = spawn(_sharded_hook, 2, tmp=tmp_path)
    s, t, tc = _shard_case()
    head = ShardedMarginHead(SHARD_C, SHARD_D, CosFace(), seed=3)  # one rank: all the rows
    w0 = head.weight.detach().clone()
    head.distill = HeadDistillation(adadistill=True, logit_weight=1.0, logit_temperature=4.0, teacher_centres=tc)
    x = s.clone().requires_grad_()
    out = head(x, SHARD_LABELS, t)
    (out["margin"] + head.distill.weighted(out)).backward()
    assert r0["range"] == [0, 6] and r1["range"] == [6, 11]
    for r in (r0, r1):
        torch.testing.assert_close(r["weight"], head.weight.detach(), rtol=0, atol=0)
        assert r["alpha"].item() == pytest.approx(out["distill/alpha"].item(), rel=1e-6)
        assert r["kd_logit"].item() == pytest.approx(out["kd_logit"].item(), rel=1e-5)
        assert r["margin"].item() == pytest.approx(out["margin"].item(), rel=1e-5)
    # and those centres are the reference update in global batch order (class 4's three rows in sequence)
    want = w0.clone()
    adadistill_update_(want, s, t, SHARD_LABELS)
    torch.testing.assert_close(head.weight.detach(), want, rtol=0, atol=0)
    grads = torch.cat([r0["emb_grad"], r1["emb_grad"]])
    torch.testing.assert_close(grads, x.grad, rtol=1e-4, atol=1e-6)


def _ddp_distill(rank: int, world: int, args: list[str]) -> dict:
    from timmface.config import load_config
    from timmface.distill import DistillTrainer

    trainer = DistillTrainer(load_config(None, args))
    trainer.fit()
    head = trainer.margin_head
    weight = head.full_weight() if trainer.sharded_head is not None else head.weight.detach().clone()
    out = {
        "weight": weight,
        "backbone": {k: v.clone() for k, v in trainer.model.backbone.state_dict().items()},
        "terms": {k: v.clone() for k, v in trainer.model.terms.state_dict().items()},
        "memory": trainer.memory.emb.clone() if trainer.memory is not None else torch.zeros(0),
        "memory_labels": trainer.memory.labels.clone() if trainer.memory is not None else torch.zeros(0),
    }
    return out


@pytest.mark.multiprocess
@pytest.mark.slow
def test_ddp_sharded_adadistill_run_ends_with_the_centres_of_one_rank(toy_data, teacher_run, tmp_path):
    from tests.test_distributed import spawn
    from timmface.config import load_config
    from timmface.distill import DistillTrainer

    sgd = ["optim.name=sgd", "optim.lr=0.1", "optim.momentum=0.9", "optim.warmup=0", "optim.weight_decay=0"]
    extra = [
        "eval_every=0", "save_every=0", "log.progress=off", "total_steps=4", "head.sharded=true", *sgd,
        "distill.centres=adadistill", "distill.logit_weight=1", "distill.relation_weight=2", "distill.memory_size=24",
        "distill.relation_loss=kl",
    ]  # fmt: skip
    r0, r1 = spawn(_ddp_distill, 2, _args(toy_data, tmp_path / "ddp", teacher_run, *extra), tmp=tmp_path)
    one = DistillTrainer(load_config(None, _args(toy_data, tmp_path / "one", teacher_run, *extra)))
    one.fit()
    torch.testing.assert_close(r0["weight"], r1["weight"], rtol=0, atol=0)
    torch.testing.assert_close(r0["weight"], one.sharded_head.full_weight(), rtol=1e-4, atol=1e-5)
    for k, v in one.model.backbone.state_dict().items():
        torch.testing.assert_close(r0["backbone"][k], v, rtol=1e-4, atol=1e-5)
        assert torch.equal(r0["backbone"][k], r1["backbone"][k])
    # the memory holds every rank's teacher embeddings in global batch order, the same on each rank
    assert torch.equal(r0["memory"], r1["memory"]) and torch.equal(r0["memory_labels"], r1["memory_labels"])
    assert torch.equal(r0["memory_labels"], one.memory.labels)
    torch.testing.assert_close(r0["memory"], one.memory.emb, rtol=1e-5, atol=1e-6)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_ddp_recipe_frozen_teacher_centres_on_a_sharded_partial_fc_head(toy_data, teacher_run, teacher_cache, tmp_path):
    """The shipped recipe's method (configs/demo_distill.yaml, the real-scale distill_*.yaml): teacher centres,
    frozen, + feature KD, on a sharded Partial FC head over 2 gloo ranks: every rank's rows are the teacher's
    per-identity means before and after training, and the student equals a 1-rank run."""
    from tests.test_distributed import spawn
    from timmface.config import load_config
    from timmface.data.recordio import RecordIODataset
    from timmface.distill import DistillTrainer, compute_teacher_centres
    from timmface.embedding.cache import EmbeddingCache

    sgd = ["optim.name=sgd", "optim.lr=0.1", "optim.momentum=0.9", "optim.warmup=0", "optim.weight_decay=0"]
    extra = [
        "eval_every=0", "save_every=0", "log.progress=off", "total_steps=4", "head.sharded=true",
        "head.partial_fc=0.5", f"distill.cache={teacher_cache}", "distill.centres=frozen", "distill.feature_weight=10",
        *sgd,
    ]  # fmt: skip
    r0, r1 = spawn(_ddp_distill, 2, _args(toy_data, tmp_path / "ddp", teacher_run, *extra), tmp=tmp_path)
    one = DistillTrainer(load_config(None, _args(toy_data, tmp_path / "one", teacher_run, *extra)))
    one.fit()
    ds = RecordIODataset(toy_data)
    centres = compute_teacher_centres(ds, ds.num_classes, cache=EmbeddingCache.open(teacher_cache))
    for w in (r0["weight"], r1["weight"], one.sharded_head.full_weight()):
        torch.testing.assert_close(w, centres, rtol=1e-5, atol=1e-6)  # frozen: never moved
    for k, v in one.model.backbone.state_dict().items():
        torch.testing.assert_close(r0["backbone"][k], v, rtol=1e-4, atol=1e-5)
        assert torch.equal(r0["backbone"][k], r1["backbone"][k])


@pytest.mark.multiprocess
@pytest.mark.slow
def test_ddp_ekd_memory_and_replicated_adadistill_keep_the_ranks_identical(
    toy_data, teacher_run, teacher_cache, tmp_path
):
    from tests.test_distributed import spawn

    extra = [
        "eval_every=0", "save_every=0", "log.progress=off", "total_steps=4", f"distill.cache={teacher_cache}",
        "distill.centres=adadistill", "distill.ekd_weight=50", "distill.memory_size=24", "distill.ekd_topk=50",
        "distill.feature_weight=5",
    ]  # fmt: skip
    r0, r1 = spawn(_ddp_distill, 2, _args(toy_data, tmp_path / "ddp", teacher_run, *extra), tmp=tmp_path)
    assert torch.equal(r0["weight"], r1["weight"])  # the replicated head's centres: every rank applied the global batch
    for k in r0["terms"]:  # the EKD thresholds (averaged over ranks) and the projection
        assert torch.equal(r0["terms"][k], r1["terms"][k]), k
    assert r0["terms"]["kd_ekd.s_anchor"].abs().sum() > 0
    for k in r0["backbone"]:
        assert torch.equal(r0["backbone"][k], r1["backbone"][k]), k
    assert torch.equal(r0["memory"], r1["memory"])


def test_report_shows_the_transfer_and_the_teacher_beside_the_student(tmp_path):
    from timmface.report import loss_terms, plot_metrics, summarise_run

    records = [
        {"step": 1, "loss": 9.0, "margin": 8.0, "kd_feature": 0.5, "distill/cos_st": 0.21, "distill/alpha": 0.1},
        {"step": 2, "loss": 7.0, "margin": 6.5, "kd_feature": 0.3, "distill/cos_st": 0.43, "distill/alpha": 0.2},
        {"step": 2, "acc/toy_val": 0.80, "acc_std/toy_val": 0.02},
        {"step": 2, "teacher_acc/toy_val": 0.95, "teacher_acc_std/toy_val": 0.01},
    ]
    assert loss_terms(records) == ["loss", "margin", "kd_feature"]  # diagnostics are not loss terms
    text = summarise_run(records, {"eval_flip": True})
    assert "student-teacher cosine (step 2): 0.4300" in text
    header, row = [line for line in text.splitlines() if "toy_val" in line or "teacher" in line][-2:]
    assert header.split()[-1] == "teacher" and row.split()[-3:] == ["95.00", "±", "1.00"]
    assert "80.00" in row
    pytest.importorskip("matplotlib")
    assert plot_metrics(records, tmp_path / "r.png").stat().st_size > 0


@pytest.mark.slow
def test_all_terms_together_under_bf16_autocast(toy_data, teacher_run, tmp_path):
    from timmface.config import load_config
    from timmface.distill import DistillTrainer

    args = _args(toy_data, tmp_path / "r", teacher_run, *ALL_TERMS, "amp=bfloat16", "total_steps=3", "eval_every=0")
    trainer = DistillTrainer(load_config(None, [*args, "save_every=0"]))
    assert trainer.amp_dtype is torch.bfloat16
    trainer.fit()
    train = [r for r in _records(tmp_path / "r") if "loss" in r]
    keys = ["kd_feature", "kd_relation", "kd_ekd", "kd_logit", "distill/alpha", "distill/cos_st"]
    assert len(train) == 3 and all(np.isfinite(r[k]) for r in train for k in keys)
    assert trainer.model.head.weight.dtype == torch.float32 and trainer.memory.emb.dtype == torch.float32
