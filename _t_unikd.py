"""Tests of unikd.py (CPU, fast). Run: python -m pytest -q _t_unikd.py"""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_convert, box_iou, generalized_box_iou, sigmoid_focal_loss

import unikd

torch.set_num_threads(1)


def random_gt(m, generator, min_side=0.02):
    """m valid GT boxes, cxcywh normalised, inside the image."""
    xy = torch.rand(m, 2, generator=generator)
    wh = min_side + torch.rand(m, 2, generator=generator) * (1 - min_side)
    x1y1 = xy * (1 - wh)
    return box_convert(torch.cat([x1y1, x1y1 + wh], 1), "xyxy", "cxcywh")


def random_targets(sizes, num_classes, generator):
    return [{"labels": torch.randint(0, num_classes, (m,), generator=generator),
             "boxes": random_gt(m, generator, 0.1)} for m in sizes]


def check_sample(gt, boxes, num_pos, n, alpha=0.6, beta=0.4):
    assert boxes.shape == (n, 4) and num_pos == min(len(gt), n)
    xyxy = box_convert(boxes, "cxcywh", "xyxy")
    gt_xyxy = box_convert(gt, "cxcywh", "xyxy")
    assert (xyxy >= -1e-6).all() and (xyxy <= 1 + 1e-6).all()
    assert (boxes[:, 2:] >= unikd.MIN_BOX_SIZE * (1 - 1e-3)).all()
    if num_pos:
        own = box_iou(xyxy[:num_pos], gt_xyxy[:num_pos]).diagonal()
        assert (own > alpha).all(), own.min()
    if len(gt) and num_pos < n:
        assert (box_iou(xyxy[num_pos:], gt_xyxy).amax(1) < beta).all()


# ----------------------------------------------------------------------------------------------------------------------
# sampler, Eq. (3)

def test_sampler_bounds_over_1000_draws():
    g = torch.Generator().manual_seed(0)
    for i in range(1000):
        m = int(torch.randint(0, 40, (1,), generator=g))
        gt = random_gt(m, g, min_side=0.005 if i % 2 else 0.05)
        n = 200 if i % 3 else 50
        boxes, num_pos = unikd.sample_query_boxes(gt, n, generator=g)
        check_sample(gt, boxes, num_pos, n)


def test_sampler_adversarial_gts_use_fallbacks_and_keep_bounds():
    g = torch.Generator().manual_seed(1)
    full = torch.tensor([[0.5, 0.5, 1.0, 1.0]])                            # one GT = the whole image
    tiles = torch.stack(torch.meshgrid(torch.arange(10) / 10 + 0.05, torch.arange(10) / 10 + 0.05, indexing="ij"), -1)
    tiles = torch.cat([tiles.reshape(-1, 2), torch.full((100, 2), 0.1)], 1)  # 10x10 GTs tiling the image
    tiny = torch.tensor([[0.3, 0.3, 0.002, 0.002], [0.7, 0.2, 0.0015, 0.003]])  # jitter of tiny GTs is hard
    for gt in (full, tiles, tiny, torch.cat([full, tiles[:20], tiny])):
        for _ in range(5):
            boxes, num_pos = unikd.sample_query_boxes(gt, 200, generator=g)
            check_sample(gt, boxes, num_pos, 200)


def test_sampler_fallbacks_keep_the_bounds(monkeypatch):
    g = torch.Generator().manual_seed(7)
    gt = random_gt(30, g, min_side=0.05)
    # alpha 0.97: most jitters fail and rows fall back to the GT box itself
    boxes, num_pos = unikd.sample_query_boxes(gt, 200, alpha=0.97, generator=g)
    check_sample(gt, boxes, num_pos, 200, alpha=0.97)
    assert (boxes[:num_pos] == gt).all(1).any()
    # no rejection rounds at all: every background row comes from the fallback grid of tiny boxes
    monkeypatch.setattr(unikd, "BACKGROUND_ROUNDS", 0)
    for gt in (gt, torch.tensor([[0.5, 0.5, 1.0, 1.0]]), torch.zeros(0, 4)):
        boxes, num_pos = unikd.sample_query_boxes(gt, 200, generator=g)
        check_sample(gt, boxes, num_pos, 200)
        assert torch.allclose(boxes[num_pos:, 2:], torch.tensor(unikd.MIN_BOX_SIZE), atol=1e-6)


def test_sampler_no_gt_and_more_gt_than_queries():
    g = torch.Generator().manual_seed(2)
    boxes, num_pos = unikd.sample_query_boxes(torch.zeros(0, 4), 200, generator=g)
    assert num_pos == 0
    check_sample(torch.zeros(0, 4), boxes, num_pos, 200)
    gt = random_gt(250, g)
    boxes, num_pos = unikd.sample_query_boxes(gt, 200, generator=g)
    assert num_pos == 200                                                   # the first 200 GTs, row i <-> GT i
    check_sample(gt, boxes, num_pos, 200)


def test_sampler_is_deterministic_under_a_generator():
    gt = random_gt(7, torch.Generator().manual_seed(3))
    a = unikd.sample_query_boxes(gt, 200, generator=torch.Generator().manual_seed(5))
    b = unikd.sample_query_boxes(gt, 200, generator=torch.Generator().manual_seed(5))
    c = unikd.sample_query_boxes(gt, 200, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert not torch.equal(a[0], c[0])


# ----------------------------------------------------------------------------------------------------------------------
# matcher and set loss

def pair_cost(logit, box, label, gt_box, alpha=0.25, gamma=2.0, wc=2.0, wb=5.0, wg=2.0):
    """Deformable DETR's matching cost of one prediction and one GT, written out by hand."""
    p = 1 / (1 + math.exp(-logit[label]))
    cls = alpha * (1 - p) ** gamma * -math.log(p + 1e-8) - (1 - alpha) * p ** gamma * -math.log(1 - p + 1e-8)
    l1 = sum(abs(a - b) for a, b in zip(box, gt_box))
    giou = generalized_box_iou(box_convert(torch.tensor([box]), "cxcywh", "xyxy"),
                               box_convert(torch.tensor([gt_box]), "cxcywh", "xyxy")).item()
    return wc * cls + wb * l1 - wg * giou


def test_matcher_total_cost_equals_brute_force_minimum():
    g = torch.Generator().manual_seed(4)
    matcher = unikd.HungarianMatcher()
    for trial in range(10):
        n, k = 5, 3
        sizes = [int(s) for s in torch.randint(0, n + 1, (3,), generator=g)]
        targets = random_targets(sizes, k, g)
        logits = torch.randn(3, n, k, generator=g) * 2
        boxes = random_gt(3 * n, g).view(3, n, 4)
        indices = matcher(logits, boxes, targets)
        for b, (t, (src, tgt)) in enumerate(zip(targets, indices)):
            m = len(t["boxes"])
            cost = [[pair_cost(logits[b, i].tolist(), boxes[b, i].tolist(), int(t["labels"][j]), t["boxes"][j].tolist())
                     for j in range(m)] for i in range(n)]
            assert len(src) == m and len(set(src.tolist())) == m and sorted(tgt.tolist()) == list(range(m))
            got = sum(cost[i][j] for i, j in zip(src.tolist(), tgt.tolist()))
            best = min((sum(cost[perm[j]][j] for j in range(m)) for perm in itertools.permutations(range(n), m)),
                       default=0.0)
            assert got == pytest.approx(best, abs=1e-4)


def test_set_loss_equals_explicit_formula():
    g = torch.Generator().manual_seed(5)
    targets = random_targets([2, 0, 3], 4, g)
    logits, boxes = torch.randn(3, 6, 4, generator=g), random_gt(18, g).view(3, 6, 4)
    indices = [(torch.tensor([4, 1]), torch.tensor([1, 0])), (torch.tensor([], dtype=torch.int64),) * 2,
               (torch.tensor([0, 2, 5]), torch.tensor([2, 0, 1]))]
    got = unikd.set_loss(logits, boxes, targets, indices, num_boxes=5.0)
    onehot, l1, giou = torch.zeros(3, 6, 4), 0.0, 0.0
    for b, (src, tgt) in enumerate(indices):
        for i, j in zip(src.tolist(), tgt.tolist()):
            onehot[b, i, targets[b]["labels"][j]] = 1
            l1 += (boxes[b, i] - targets[b]["boxes"][j]).abs().sum()
            giou += 1 - generalized_box_iou(box_convert(boxes[b, i:i + 1], "cxcywh", "xyxy"),
                                            box_convert(targets[b]["boxes"][j:j + 1], "cxcywh", "xyxy"))[0, 0]
    focal = sigmoid_focal_loss(logits, onehot, reduction="sum").item()
    assert got["cls"].item() == pytest.approx(2 * focal / 5, rel=1e-5)
    assert got["l1"].item() == pytest.approx(5 * l1.item() / 5, rel=1e-5)
    assert got["giou"].item() == pytest.approx(2 * giou.item() / 5, rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# losses of the distillation stage

def test_decoupled_mse_equals_loop():
    g = torch.Generator().manual_seed(6)
    zs, zt = torch.randn(3, 7, 5, generator=g), torch.randn(3, 7, 5, generator=g)
    mask = torch.rand(3, 7, generator=g) < 0.3
    pos, neg = [], []
    for b in range(3):
        for i in range(7):
            mse = sum((zs[b, i, c] - zt[b, i, c]).item() ** 2 for c in range(5)) / 5
            (pos if mask[b, i] else neg).append(mse)
    expect = sum(pos) / len(pos) + sum(neg) / len(neg)
    assert unikd.decoupled_mse(zs, zt, mask).item() == pytest.approx(expect, rel=1e-5)
    all_neg = sum(sum((zs[b, i] - zt[b, i]).pow(2).mean().item() for i in range(7)) for b in range(3)) / 21
    assert unikd.decoupled_mse(zs, zt, torch.zeros(3, 7, dtype=torch.bool)).item() == pytest.approx(all_neg, rel=1e-5)


def test_fitnet_loss_equals_loop():
    g = torch.Generator().manual_seed(7)
    shapes = [(8, 10), (4, 5), (2, 3), (1, 2)]
    ft = [torch.randn(2, 3, h, w, generator=g) for h, w in shapes]
    fs = [torch.randn(2, 3, h, w, generator=g) for h, w in shapes]
    targets = random_targets([2, 1], 3, g)
    total, count = 0.0, 0
    for t, s in zip(ft, fs):
        _, c, h, w = t.shape
        for b in range(2):
            boxes = box_convert(targets[b]["boxes"], "cxcywh", "xyxy").tolist()
            for i in range(h):
                for j in range(w):
                    x, y = (j + 0.5) / w, (i + 0.5) / h
                    if any(x1 <= x <= x2 and y1 <= y <= y2 for x1, y1, x2, y2 in boxes):
                        total += (s[b, :, i, j] - t[b, :, i, j]).pow(2).sum().item()
                        count += c
    assert count > 0
    assert unikd.fitnet_loss(ft, fs, targets).item() == pytest.approx(total / count, rel=1e-5)
    assert unikd.fitnet_loss(ft, fs, random_targets([0, 0], 3, g)).item() == 0


# ----------------------------------------------------------------------------------------------------------------------
# AKE, UniKD, adapter

SMALL = dict(d_model=32, n_heads=4, num_queries=20, dim_ffn=64)
SHAPES = [(8, 8), (4, 4), (2, 2), (1, 1)]


def feats(batch, generator, channels=32):
    return [torch.randn(batch, channels, h, w, generator=generator) for h, w in SHAPES]


def test_ake_shapes_and_sampling():
    g = torch.Generator().manual_seed(8)
    model = unikd.UniKD(num_classes=3, **SMALL)
    f = feats(2, g)
    boxes, pos_mask = model.sample_boxes(random_targets([3, 1], 3, g), "cpu", g)
    for ake, b in ((model.ake_ct, None), (model.ake_pos, boxes)):
        q = ake.generate_queries(f, b)
        assert q.tgt.shape == (2, 20, 32) and q.reference.shape == (2, 20, 2 if b is None else 4)
        z, sampling = ake.extract(q, f, return_sampling=True)
        assert z.shape == (2, 20, 32) and len(sampling) == 1 and sampling[0][0].shape == (2, 20, 4, 4, 4, 2)
        logits, pred = ake.head(z, q)
        assert logits.shape == (2, 20, 3) and pred.shape == (2, 20, 4) and ((pred >= 0) & (pred <= 1)).all()
    assert pos_mask.sum(1).tolist() == [3, 1]


def test_ake_pretraining_overfits_one_batch():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(9)
    model = unikd.UniKD(num_classes=3, **SMALL)
    f, targets = feats(2, g), random_targets([3, 2], 3, g)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = None
    for step in range(150):
        # a fixed B^ (same seed every step): overfitting is about the AKE, not about fresh jitters
        loss = sum(model.pretrain_loss(f, targets, torch.Generator().manual_seed(0)).values())
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 10, (first, loss.item())


def frozen_unikd():
    # untrained weights suffice: the distill path must be correct for any AKE
    return unikd.UniKD(num_classes=3, **SMALL).freeze()


def test_distill_step_updates_only_student_and_adapter():
    g = torch.Generator().manual_seed(10)
    model = frozen_unikd()
    model.train()
    assert not model.training and not model.ake_ct.training                  # frozen AKE stays in eval mode
    adapter = unikd.Adapter(16, d_model=32, num_layers=2, n_heads=4, dim_ffn=64)
    student = torch.nn.Conv2d(16, 16, 3, padding=1)
    ake_before = {k: v.clone() for k, v in model.state_dict().items()}
    phi_before = {k: v.clone() for k, v in adapter.state_dict().items()}
    student_before = student.weight.clone()
    opt = torch.optim.SGD(list(adapter.parameters()) + list(student.parameters()), lr=0.1)
    teacher_feats, student_in, targets = feats(2, g), feats(2, g, 16), random_targets([2, 1], 3, g)
    # two steps: MSDA starts with zero offset/attention projections (Deformable DETR's init), so the gradient into
    # the adapter's queries (and its level embedding) is exactly zero in the first step
    for _ in range(2):
        losses = model.distill_loss(teacher_feats, adapter([student(x) for x in student_in]), targets)
        assert set(losses) == {"loss_kd_ct", "loss_kd_pos"} and all(v.item() > 0 for v in losses.values())
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, ake_before[k]) for k, v in model.state_dict().items())
    assert all(not torch.equal(v, phi_before[k]) for k, v in adapter.state_dict().items())
    assert not torch.equal(student.weight, student_before)


def test_identical_features_with_identity_adapter_give_zero_kd_loss():
    g = torch.Generator().manual_seed(11)
    model = frozen_unikd()
    adapter = unikd.Adapter(32, d_model=32, num_layers=0)
    with torch.no_grad():
        adapter.proj.weight.copy_(torch.eye(32)[:, :, None, None])
        adapter.proj.bias.zero_()
    f = feats(2, g)
    losses = model.distill_loss(f, adapter(f), random_targets([3, 0], 3, g))
    assert all(v.item() == 0 for v in losses.values())


def test_offline_knowledge_per_image_round_trip_equals_online():
    g = torch.Generator().manual_seed(12)
    model = frozen_unikd()
    tf, sf, targets = feats(2, g), feats(2, g), random_targets([2, 3], 3, g)
    online = model.distill_loss(tf, sf, targets, generator=torch.Generator().manual_seed(1))
    knowledge = model.teacher_knowledge(tf, targets, torch.Generator().manual_seed(1))
    rows = [{k: v[i].clone() for k, v in knowledge._asdict().items()} for i in range(2)]  # what a dump stores
    restored = unikd.Knowledge(*(torch.stack([r[k] for r in rows]) for k in unikd.Knowledge._fields))
    offline = model.student_loss(restored, sf)
    assert all(torch.equal(online[k], offline[k]) for k in online)
    assert knowledge.pos_mask_pos.sum(1).tolist() == [2, 3] and knowledge.pos_mask_ct.sum(1).tolist() == [2, 3]


def test_adapter_shapes():
    g = torch.Generator().manual_seed(13)
    out = unikd.Adapter(16, d_model=32, num_layers=2, n_heads=4, dim_ffn=64)(feats(2, g, 16))
    assert [tuple(o.shape) for o in out] == [(2, 32, h, w) for h, w in SHAPES]


def test_postprocess_topk_over_queries_and_classes():
    g = torch.Generator().manual_seed(14)
    logits, boxes = torch.randn(2, 5, 3, generator=g), random_gt(10, g).view(2, 5, 4)
    out = unikd.postprocess(logits, boxes, [(100, 200), (50, 60)], topk=4)
    for b, (h, w) in enumerate([(100, 200), (50, 60)]):
        pairs = sorted(((logits[b, i, c].sigmoid().item(), i, c) for i in range(5) for c in range(3)), reverse=True)[:4]
        assert out[b]["scores"].tolist() == pytest.approx([p[0] for p in pairs])
        assert out[b]["labels"].tolist() == [p[2] for p in pairs]
        expect = box_convert(boxes[b, [p[1] for p in pairs]], "cxcywh", "xyxy") * torch.tensor([w, h, w, h])
        assert torch.allclose(out[b]["boxes"], expect)


def layer_params(c, ffn, levels=4, heads=8, points=4, self_attn=True):
    """Closed-form parameter count of one Deformable DETR layer."""
    samples = heads * levels * points
    msda = (c * samples * 2 + samples * 2) + (c * samples + samples) + 2 * (c * c + c)
    mha = 4 * c * c + 4 * c if self_attn else 0
    return msda + mha + (c * ffn + ffn + ffn * c + c) + (3 if self_attn else 2) * 2 * c


def test_parameter_counts_at_defaults():
    counts = unikd.count_parameters(unikd.UniKD(num_classes=80))
    c, n, k = 256, 200, 80
    common = 2 * layer_params(c, 1024) + 4 * c + (c * k + k) + 2 * (c * c + c) + (c * 4 + 4)
    assert counts["ake_ct"] == common + n * 2 * c + (2 * c + 2)
    assert counts["ake_pos"] == common + (4 * c + c)
    assert counts["total"] == counts["ake_ct"] + counts["ake_pos"]
    print(counts)


# ----------------------------------------------------------------------------------------------------------------------
# the README's copy-paste snippet, run verbatim against a toy teacher/student of "another codebase"

README_SNIPPET = '''
import torch, unikd
# Yours: teacher_fpn(images) and student(images, targets) -> (detection loss, FPN levels), levels = 4 tensors
# [B, C, H/8 .. H/64]; targets as unikd wants them: [{"labels": [M] in 0..K-1, "boxes": [M, 4] cxcywh / (W, H)}].
ake = unikd.UniKD(num_classes=K)                      # stage 1: the AKEs absorb the frozen teacher (Eq. 6)
opt = torch.optim.AdamW(ake.parameters(), lr=2e-4, weight_decay=1e-4)
for images, targets in loader:
    with torch.no_grad():
        teacher_feats = teacher_fpn(images)
    loss = sum(ake.pretrain_loss(teacher_feats, targets).values())
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(ake.parameters(), 0.1); opt.step()
ake.freeze()                                          # stage 2: the student absorbs the AKEs' knowledge (Eq. 7)
phi = unikd.Adapter(in_channels=256)                  # the student's FPN channels -> 256
opt = torch.optim.SGD([*student.parameters(), *phi.parameters()], lr=0.01, momentum=0.9, weight_decay=1e-4)
for images, targets in loader:
    with torch.no_grad():
        teacher_feats = teacher_fpn(images)
    det_loss, student_feats = student(images, targets)
    kd = ake.distill_loss(teacher_feats, phi(student_feats), targets)   # lambda_ct = lambda_pos = 10
    loss = det_loss + sum(kd.values())
    opt.zero_grad(); loss.backward(); opt.step()
'''


class ToyFPN(torch.nn.Module):
    """4 levels at strides 8, 16, 32, 64 with 256 channels, and a stand-in detection loss."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 256, 8, stride=8)

    def levels(self, images):
        x = self.stem(images)
        return [x, F.avg_pool2d(x, 2), F.avg_pool2d(x, 4), F.avg_pool2d(x, 8)]

    def forward(self, images, targets):
        feats = self.levels(images)
        return feats[-1].pow(2).mean(), feats


def test_readme_snippet_runs_verbatim():
    g = torch.Generator().manual_seed(15)
    teacher, student = ToyFPN().eval(), ToyFPN()
    loader = [(torch.rand(2, 3, 64, 64, generator=g), random_targets([2, 1], 3, g)) for _ in range(2)]
    namespace = dict(K=3, loader=loader, teacher_fpn=teacher.levels, student=student)
    exec(README_SNIPPET, namespace)
    assert len(README_SNIPPET.strip().splitlines()) <= 20
    assert math.isfinite(namespace["loss"].item()) and all(p.grad is None for p in namespace["ake"].parameters())
