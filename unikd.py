"""UniKD: Universal Knowledge Distillation for mimicking homogeneous or heterogeneous object detectors (ICCV 2023).

The method in one file (paper sec. 3). Copy it together with `deform_attn_triton.py` into another codebase; it imports
only torch, torchvision.ops, scipy.optimize and that file.

    model = UniKD(num_classes=K)
    Stage 1, absorb (sec. 3.2.2): two Adaptive Knowledge Extractors (AKEs) read the frozen teacher's FPN levels and are
        trained with a DETR-style set loss, Eq. (6):  loss = sum(model.pretrain_loss(teacher_feats, targets).values())
    Stage 2, inject (sec. 3.2.3): model.freeze(); the student's adapted levels phi(F^S) must yield the same knowledge
        embeddings z as the teacher's, Eq. (7)-(8):
        loss = detection losses + sum(model.distill_loss(teacher_feats, Adapter(...)(student_feats), targets).values())

Conventions. A feature list is the 4 FPN levels at strides 8, 16, 32, 64, each [B, C, H_l, W_l], of one batched image
tensor shared by teacher and student. `targets` is a list (one per image) of dicts {"labels": [M] int64 in 0..K-1,
"boxes": [M, 4] cxcywh normalised to the batched tensor}. K counts foreground classes only (no background class:
classification is sigmoid focal, as in Deformable DETR).
"""
import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torchvision.ops import box_convert, box_iou, generalized_box_iou, generalized_box_iou_loss, sigmoid_focal_loss

from deform_attn_triton import MSDeformAttn, flatten_levels

# ----------------------------------------------------------------------------------------------------------------------
# Query boxes B^ of the positional AKE, Eq. (3)

MIN_BOX_SIZE = 1e-3     # normalised; every sampled box has both sides at least this long
IOU_MARGIN = 1e-4       # bounds hold with this margin, so a caller's own IoU (other rounding) agrees with ours
JITTER_TRIES = 16       # jittered candidates per GT; a GT whose candidates all fail keeps the GT box itself (IoU 1)
JITTER_SHIFT = 0.15     # centre shift, fraction of the GT's width/height
JITTER_LOG_SCALE = 0.2  # width/height scaled by exp(U(-s, s))
BACKGROUND_ROUNDS = 10  # batches of background candidates before the fallback grid
FALLBACK_GRID = 32      # fallback background: MIN_BOX_SIZE boxes on a FALLBACK_GRID^2 grid


def sample_query_boxes(gt_boxes, num_queries=200, alpha=0.6, beta=0.4, generator=None):
    """Eq. (3): N = num_queries boxes for the positional AKE -> (boxes [N, 4] cxcywh normalised float32, num_pos).

    Rows [0, num_pos) are one jittered box per GT, row i jittering gt_boxes[i], with IoU(row i, GT i) > alpha.
    Rows [num_pos, N) are random background boxes with max IoU over all GTs < beta. (IoUs are taken against the GTs
    clipped into the image with sides >= MIN_BOX_SIZE, i.e. against the GTs themselves when they are valid.)
    Every box lies inside [0, 1]^2 with both sides >= MIN_BOX_SIZE. With more GTs than N, the first N GTs are kept
    (row i <-> GT i stays the whole contract, so a caller that prefers other GTs reorders them first) and there is no
    background row.
    Randomness comes only from `generator` (the sampling runs on its device, the result moves to gt_boxes' device),
    so a seeded generator gives the same boxes. Vectorised: one pass for all jitters, a few batches for background.
    """
    device = generator.device if generator is not None else gt_boxes.device
    gt_xyxy = clip_xyxy(box_convert(gt_boxes.detach().to(device, torch.float32).reshape(-1, 4), "cxcywh", "xyxy"))
    num_pos = min(len(gt_xyxy), num_queries)
    positives = jittered_boxes(gt_xyxy[:num_pos], alpha, generator)                          # [N', 4] xyxy
    negatives = background_boxes(gt_xyxy, num_queries - num_pos, beta, generator, device)    # [N - N', 4] xyxy
    boxes = box_convert(torch.cat([positives, negatives]), "xyxy", "cxcywh")
    return boxes.to(gt_boxes.device), num_pos


def clip_xyxy(boxes):
    """Clip xyxy boxes into [0, 1]^2, keeping each side at least MIN_BOX_SIZE (so no box is ever degenerate)."""
    x1 = boxes[..., 0].clamp(0, 1 - MIN_BOX_SIZE)
    y1 = boxes[..., 1].clamp(0, 1 - MIN_BOX_SIZE)
    x2 = torch.maximum(boxes[..., 2].clamp(max=1), x1 + MIN_BOX_SIZE)
    y2 = torch.maximum(boxes[..., 3].clamp(max=1), y1 + MIN_BOX_SIZE)
    return torch.stack([x1, y1, x2, y2], -1)


def boxes_from_centres(cx, cy, w, h):
    return clip_xyxy(box_convert(torch.stack([cx, cy, w, h], -1), "cxcywh", "xyxy"))


def uniform(shape, low, high, generator, device):
    return low + (high - low) * torch.rand(shape, generator=generator, device=device)


def jittered_boxes(gt_xyxy, alpha, generator):
    """One jitter(B_i) per GT with IoU > alpha (Eq. 3, first case) -> [M, 4] xyxy. First passing try of
    JITTER_TRIES random shift+scale candidates; the GT itself (IoU 1) where none passes."""
    M, device = len(gt_xyxy), gt_xyxy.device
    if M == 0:
        return gt_xyxy
    cx, cy, w, h = box_convert(gt_xyxy, "xyxy", "cxcywh")[:, None].unbind(-1)             # each [M, 1]
    shift = uniform((2, M, JITTER_TRIES), -JITTER_SHIFT, JITTER_SHIFT, generator, device)
    scale = uniform((2, M, JITTER_TRIES), -JITTER_LOG_SCALE, JITTER_LOG_SCALE, generator, device).exp()
    candidates = boxes_from_centres(cx + shift[0] * w, cy + shift[1] * h, w * scale[0], h * scale[1])  # [M, T, 4]
    iou = box_iou(candidates.reshape(-1, 4), gt_xyxy).reshape(M, JITTER_TRIES, M)
    own_iou = iou[torch.arange(M, device=device), :, torch.arange(M, device=device)]     # [M, T] vs its own GT
    ok = own_iou > alpha + IOU_MARGIN
    first_ok = ok.int().argmax(1)                                                         # first passing try
    chosen = candidates[torch.arange(M, device=device), first_ok]
    return torch.where(ok.any(1, keepdim=True), chosen, gt_xyxy)


def random_boxes(gt_xyxy, count, generator, device):
    """`count` candidate background boxes, xyxy: half around random GTs (shifted up to one box size, scaled 0.4-2.5x,
    the hard negatives the paper samples 'around the ground truths'), half anywhere (log-uniform size 1/64-1/2)."""
    around = count // 2 if len(gt_xyxy) else 0
    anywhere = count - around
    cx = uniform(anywhere, 0, 1, generator, device)
    cy = uniform(anywhere, 0, 1, generator, device)
    wh = uniform((2, anywhere), math.log(1 / 64), math.log(1 / 2), generator, device).exp()
    boxes = [boxes_from_centres(cx, cy, wh[0], wh[1])]
    if around:
        pick = (uniform(around, 0, 1, generator, device) * len(gt_xyxy)).long().clamp(max=len(gt_xyxy) - 1)
        gcx, gcy, gw, gh = box_convert(gt_xyxy[pick], "xyxy", "cxcywh").unbind(-1)
        shift = uniform((2, around), -1, 1, generator, device)
        scale = uniform((2, around), math.log(0.4), math.log(2.5), generator, device).exp()
        boxes.append(boxes_from_centres(gcx + shift[0] * gw, gcy + shift[1] * gh, gw * scale[0], gh * scale[1]))
    boxes = torch.cat(boxes)
    return boxes[torch.randperm(len(boxes), generator=generator, device=device)]  # mixed, so a prefix takes both kinds


def below_beta(boxes, gt_xyxy, beta):
    """[C] bool: max IoU with every GT < beta (Eq. 3, second case)."""
    if len(gt_xyxy) == 0:
        return torch.ones(len(boxes), dtype=torch.bool, device=boxes.device)
    return box_iou(boxes, gt_xyxy).amax(1) < beta - IOU_MARGIN


def background_boxes(gt_xyxy, count, beta, generator, device):
    """`count` background boxes (xyxy) with max IoU < beta: rejection sampling in batches of candidates, as the paper
    repeats 'until the number of background boxes meets N - N''. If a few batches run dry (GTs covering the image),
    tiny boxes on a grid that pass the same test are repeated, so the bound holds on every row."""
    kept, found = [], 0
    for _ in range(BACKGROUND_ROUNDS if count else 0):
        candidates = random_boxes(gt_xyxy, max(2 * count, 64), generator, device)
        candidates = candidates[below_beta(candidates, gt_xyxy, beta)]
        kept.append(candidates)
        found += len(candidates)
        if found >= count:
            return torch.cat(kept)[:count]
    centres = (torch.arange(FALLBACK_GRID, device=device, dtype=torch.float32) + 0.5) / FALLBACK_GRID
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")
    tiny = boxes_from_centres(cx.flatten(), cy.flatten(), torch.full_like(cx.flatten(), MIN_BOX_SIZE),
                              torch.full_like(cx.flatten(), MIN_BOX_SIZE))
    pool = torch.cat(kept + [tiny[below_beta(tiny, gt_xyxy, beta)]])
    if len(pool) == 0:
        raise ValueError(f"sample_query_boxes: no background box with IoU < {beta} exists for these "
                         f"{len(gt_xyxy)} GT boxes")
    return pool[torch.arange(count, device=device) % len(pool)]


# ----------------------------------------------------------------------------------------------------------------------
# Bipartite matching and the set loss of Eq. (6), as Deformable DETR

class HungarianMatcher(nn.Module):
    """Optimal one-to-one assignment of predictions to GT boxes (DETR): cost = class * focal class cost
    + bbox * L1(cxcywh) + giou * (-GIoU); one batched cost matrix, then scipy's linear_sum_assignment per image."""

    def __init__(self, cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, focal_alpha=0.25, focal_gamma=2.0):
        super().__init__()
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    @torch.no_grad()
    def cost_matrix(self, pred_logits, pred_boxes, targets):
        """[B, N, sum_b M_b] float32: cost of each prediction against every GT of the batch."""
        B, N, _ = pred_logits.shape
        prob = pred_logits.flatten(0, 1).float().sigmoid()                                  # [B*N, K]
        boxes = pred_boxes.flatten(0, 1).float()                                            # [B*N, 4]
        tgt_labels = torch.cat([t["labels"] for t in targets])
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).float()
        # focal class cost: the focal loss of calling the GT class positive minus that of calling it negative
        a, g = self.focal_alpha, self.focal_gamma
        neg = (1 - a) * prob ** g * -(1 - prob + 1e-8).log()
        pos = a * (1 - prob) ** g * -(prob + 1e-8).log()
        cost_class = pos[:, tgt_labels] - neg[:, tgt_labels]
        cost_bbox = torch.cdist(boxes, tgt_boxes, p=1)
        cost_giou = -generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy"))
        cost = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        return cost.view(B, N, -1)

    @torch.no_grad()
    def forward(self, pred_logits, pred_boxes, targets):
        """-> list over images of (pred_idx [M_b], tgt_idx [M_b]) int64 CPU tensors (min(N, M_b) pairs)."""
        sizes = [len(t["boxes"]) for t in targets]
        empty = torch.empty(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [(empty, empty) for _ in targets]
        cost = self.cost_matrix(pred_logits, pred_boxes, targets).cpu()
        indices = []
        for b, c in enumerate(cost.split(sizes, -1)):
            rows, cols = linear_sum_assignment(c[b].numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices


def num_boxes_across_ranks(count, device):
    """GT boxes per rank, averaged over ranks and at least 1: the set loss' normaliser (Deformable DETR)."""
    n = torch.as_tensor(float(count), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(n)
        n = n / dist.get_world_size()
    return n.clamp(min=1).item()


def set_loss(pred_logits, pred_boxes, targets, indices, num_boxes, focal_alpha=0.25, focal_gamma=2.0,
             w_cls=2.0, w_l1=5.0, w_giou=2.0):
    """Eq. (6) with Deformable DETR's losses -> {"cls", "l1", "giou"} (weighted scalars).

    Sigmoid focal loss over all N queries (one-hot targets; an unmatched query's target is all zeros = 'no object'),
    L1 and GIoU on the matched pairs. All three are divided by num_boxes (GT count, averaged over ranks): Eq. (6)'s
    1/N' for the box terms; for the class term Deformable DETR's normaliser replaces the 1/N of Eq. (6), because a
    focal loss summed over queries is meant to be normalised by the positives.
    """
    batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)]).to(pred_logits.device)
    src_idx = torch.cat([src for src, _ in indices]).to(pred_logits.device)
    tgt_labels = torch.cat([t["labels"][j.to(t["labels"].device)] for t, (_, j) in zip(targets, indices)])
    tgt_boxes = torch.cat([t["boxes"][j.to(t["boxes"].device)] for t, (_, j) in zip(targets, indices)]).float()

    onehot = torch.zeros_like(pred_logits, dtype=torch.float32)                             # [B, N, K]
    onehot[batch_idx, src_idx, tgt_labels.to(pred_logits.device)] = 1
    loss_cls = sigmoid_focal_loss(pred_logits.float(), onehot, focal_alpha, focal_gamma, reduction="sum")

    src_boxes = pred_boxes[batch_idx, src_idx].float()                                      # [P, 4]
    loss_l1 = F.l1_loss(src_boxes, tgt_boxes.to(src_boxes.device), reduction="sum")
    loss_giou = generalized_box_iou_loss(box_convert(src_boxes, "cxcywh", "xyxy"),
                                         box_convert(tgt_boxes.to(src_boxes.device), "cxcywh", "xyxy"), reduction="sum")
    return {"cls": w_cls * loss_cls / num_boxes, "l1": w_l1 * loss_l1 / num_boxes,
            "giou": w_giou * loss_giou / num_boxes}


# ----------------------------------------------------------------------------------------------------------------------
# Transformer layers (Deformable DETR's, post-norm) on top of MSDA

class FeatureMemory(NamedTuple):
    """Flattened levels for MSDA: value [B, S, C] (level embedding added), spatial_shapes [L, 2],
    level_start_index [L]."""
    value: torch.Tensor
    spatial_shapes: torch.Tensor
    level_start_index: torch.Tensor


def feedforward(d_model, dim_ffn, dropout):
    return nn.Sequential(nn.Linear(d_model, dim_ffn), nn.ReLU(inplace=True), nn.Dropout(dropout),
                         nn.Linear(dim_ffn, d_model))


class DecoderLayer(nn.Module):
    """Deformable DETR's decoder layer (post-norm): self-attention among the queries, deformable cross-attention into
    the feature levels, FFN."""

    def __init__(self, d_model=256, n_heads=8, n_levels=4, n_points=4, dim_ffn=1024, dropout=0.0):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout)   # sequence-first: self_attention
        self.norm_self = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm_cross = nn.LayerNorm(d_model)
        self.ffn = feedforward(d_model, dim_ffn, dropout)
        self.norm_ffn = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt, query_pos, reference, memory, return_sampling=False):
        """tgt [B, N, C]; query_pos [B, N, C] or None; reference [B, N, 2|4] normalised; memory a FeatureMemory
        -> tgt [B, N, C]. With return_sampling, (tgt, (sampling locations [B, N, H, L, P, 2], attention weights
        [B, N, H, L, P])): where the queries read the levels."""
        q = tgt if query_pos is None else tgt + query_pos
        tgt = self.norm_self(tgt + self.dropout(self.self_attention(q, tgt)))
        query = tgt if query_pos is None else tgt + query_pos
        # one normalised reference for every level, no padding masks (valid ratio 1): coordinates are relative to the
        # padded batch tensor
        ref = reference[:, :, None].expand(-1, -1, memory.spatial_shapes.shape[0], -1)   # [B, N, L, 2|4]
        out, locations, weights = self.cross_attn(query, ref, memory.value, memory.spatial_shapes,
                                                  memory.level_start_index, return_sampling=True)
        tgt = self.norm_cross(tgt + self.dropout(out))
        tgt = self.norm_ffn(tgt + self.dropout(self.ffn(tgt)))
        return (tgt, (locations, weights)) if return_sampling else tgt

    def self_attention(self, q, v):
        """Attention among the queries of each image: queries = keys q, values v, both [B, N, C] -> [B, N, C].
        nn.MultiheadAttention runs sequence-first on contiguous copies: handed batch-first tensors, it projects
        transposed views, which a CPU under bf16 autocast multiplies as N batched products over N copies of the
        weight (RESULTS.md, "KD cost per step")."""
        q_seq = q.transpose(0, 1).contiguous()                                        # [N, B, C]
        v_seq = q_seq if v is q else v.transpose(0, 1).contiguous()  # v is q: one packed in-projection
        return self.self_attn(q_seq, q_seq, v_seq, need_weights=False)[0].transpose(0, 1)


class EncoderLayer(nn.Module):
    """Deformable self-attention over all levels (each pixel attends around its own centre on every level), then an
    FFN unless dim_ffn=0 (the adapter's default: the paper's phi is FC + deformable self-attention layers)."""

    def __init__(self, d_model=256, n_heads=8, n_levels=4, n_points=4, dim_ffn=1024, dropout=0.0):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm_attn = nn.LayerNorm(d_model)
        self.ffn = feedforward(d_model, dim_ffn, dropout) if dim_ffn else None
        self.norm_ffn = nn.LayerNorm(d_model) if dim_ffn else None
        self.dropout = nn.Dropout(dropout)

    def forward(self, src, pos, reference, spatial_shapes, level_start_index):
        """src [B, S, C], pos [B or 1, S, C]; reference [B, S, L, 2]."""
        out = self.self_attn(src + pos, reference, src, spatial_shapes, level_start_index)
        src = self.norm_attn(src + self.dropout(out))
        if self.ffn is None:
            return src
        return self.norm_ffn(src + self.dropout(self.ffn(src)))


class MLP(nn.Module):
    """Linear-ReLU stack (DETR's box head)."""

    def __init__(self, in_dim, hidden_dim, out_dim, num_layers):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


def inverse_sigmoid(x, eps=1e-5):
    """Deformable DETR's inverse_sigmoid: log(x / (1 - x)) with x kept within [eps, 1 - eps]."""
    return torch.logit(x, eps=eps)


def xavier_init_linears(module):
    """Deformable DETR initialises its transformer's linear layers with Xavier; MSDA modules keep their own init
    (sampling offsets on a ring around the reference, uniform attention)."""
    for child in module.children():
        if isinstance(child, nn.Linear):
            nn.init.xavier_uniform_(child.weight)
            nn.init.zeros_(child.bias)
        elif not isinstance(child, MSDeformAttn):
            xavier_init_linears(child)


# ----------------------------------------------------------------------------------------------------------------------
# Adaptive Knowledge Extractor, Eq. (2), (4), (5)

class Queries(NamedTuple):
    """Queries generated from the teacher's features (Eq. 4), plain tensors so an offline dump can store them."""
    tgt: torch.Tensor        # [B, N, C]  q_ct or q_pos
    reference: torch.Tensor  # [B, N, 2] content: (x, y) predicted by the query | [B, N, 4] positional: B^ (cxcywh)


class AKE(nn.Module):
    """Adaptive Knowledge Extractor: query generator f_ct / f_pos (one decoder layer on the teacher's levels, Eq. 4),
    knowledge extractor f_e (decoder layer(s) on F* = F^T or phi(F^S), Eq. 5) and an FFN head used in pretraining.

    kind="content":    E = learned [N, C] decoder input; a second learned [N, C] embedding is the queries' positional
                       embedding, from which each query predicts its own 2-d reference point (Deformable DETR with
                       two-stage off). Both are image-independent, so only q and the reference need storing.
    kind="positional": E' = FC(B^) (4 -> C) from the sampled boxes of Eq. (3); B^ is the 4-d reference box.
    """

    def __init__(self, kind, num_classes, d_model=256, n_heads=8, n_levels=4, n_points=4, num_queries=200,
                 num_extractor_layers=1, dim_ffn=1024, dropout=0.0):
        super().__init__()
        if kind not in ("content", "positional"):
            raise ValueError(f"AKE kind must be 'content' or 'positional', got {kind!r}")
        self.kind, self.d_model, self.n_levels = kind, d_model, n_levels
        layer = dict(d_model=d_model, n_heads=n_heads, n_levels=n_levels, n_points=n_points, dim_ffn=dim_ffn,
                     dropout=dropout)
        if kind == "content":
            self.query_embed = nn.Embedding(num_queries, 2 * d_model)     # [query_pos | E]
            self.reference_points = nn.Linear(d_model, 2)
        else:
            self.box_embed = nn.Linear(4, d_model)                        # E' = FC(B^)
        self.level_embed = nn.Parameter(torch.empty(n_levels, d_model))
        self.query_generator = DecoderLayer(**layer)                                       # f_ct / f_pos
        self.extractor = nn.ModuleList(DecoderLayer(**layer) for _ in range(num_extractor_layers))  # f_e
        self.class_head = nn.Linear(d_model, num_classes)
        self.box_head = MLP(d_model, d_model, 4, 3)
        self.reset_parameters()

    def reset_parameters(self):
        xavier_init_linears(self)
        nn.init.normal_(self.level_embed)
        nn.init.constant_(self.class_head.bias, -math.log((1 - 0.01) / 0.01))  # focal-loss prior: p(object) = 0.01
        nn.init.zeros_(self.box_head.layers[-1].weight)                        # boxes start at the reference
        nn.init.zeros_(self.box_head.layers[-1].bias)

    def reset_offsets(self, level_sides):
        """Scale-aware sampling offsets in every MSDA of this AKE (MSDeformAttn.reset_offsets): level_sides [L] are
        the shorter sides, in pixels, of the levels' maps it will read. Only the content AKE's offsets are in pixels
        of each level (2-d references); the positional AKE's scale with the boxes and need none."""
        for module in self.modules():
            if isinstance(module, MSDeformAttn):
                module.reset_offsets(level_sides)

    def memory(self, feats):
        """Level list -> FeatureMemory, each level with its learned level embedding added (the value input of MSDA)."""
        if len(feats) != self.n_levels:
            raise ValueError(f"AKE expects {self.n_levels} feature levels, got {len(feats)}")
        feats = [f + e[None, :, None, None].to(f.dtype) for f, e in zip(feats, self.level_embed)]
        return FeatureMemory(*flatten_levels(feats))

    def query_pos(self, batch_size):
        """[B, N, C] learned positional embedding of the content queries; None for positional queries."""
        if self.kind != "content":
            return None
        return self.query_embed.weight[:, :self.d_model][None].expand(batch_size, -1, -1)

    def generate_queries(self, teacher_feats, boxes=None):
        """Eq. (4): q = f(E or E', F^T) -> Queries. `boxes` [B, N, 4] (B^, cxcywh) is required for kind='positional'."""
        memory = self.memory(teacher_feats)
        B = memory.value.shape[0]
        if self.kind == "content":
            pos = self.query_pos(B)
            tgt = self.query_embed.weight[None, :, self.d_model:].expand(B, -1, -1)     # E      [B, N, C]
            reference = self.reference_points(pos).float().sigmoid()                     #        [B, N, 2]
        else:
            if boxes is None:
                raise ValueError("the positional AKE needs the sampled boxes B^ [B, N, 4] (see sample_query_boxes)")
            reference = boxes.float()  # float32 even under autocast: bf16 would move a box by up to 1/256
            pos, tgt = None, self.box_embed(reference)                                   # E' = FC(B^) [B, N, C]
        return Queries(self.query_generator(tgt, pos, reference, memory), reference)

    def extract(self, queries, feats, return_sampling=False):
        """Eq. (5): z = f_e(q, F*) -> [B, N, C]. With return_sampling, (z, the list over f_e's layers of
        (sampling_locations [B, N, H, L, P, 2], attention_weights [B, N, H, L, P]): where the queries look, Fig. 4)."""
        memory = self.memory(feats)
        pos = self.query_pos(queries.tgt.shape[0])
        z, samplings = queries.tgt, []
        for layer in self.extractor:
            z, sampling = layer(z, pos, queries.reference, memory, return_sampling=True)
            samplings.append(sampling)
        return (z, samplings) if return_sampling else z

    def head(self, z, queries):
        """FFN(z) -> (logits [B, N, K], boxes [B, N, 4] cxcywh in [0, 1]), boxes refined from the query's reference."""
        return self.class_head(z), boxes_from_reference(self.box_head(z), queries.reference)


def boxes_from_reference(delta, reference):
    """Deformable DETR's box decoding: delta [..., 4] from the box head, refined in inverse-sigmoid space from the
    reference [..., 2] (a point: its centre) or [..., 4] (a box) -> boxes [..., 4] cxcywh in [0, 1], float32."""
    delta, ref = delta.float(), inverse_sigmoid(reference.float())
    if ref.shape[-1] == 4:
        return (delta + ref).sigmoid()
    return torch.cat([delta[..., :2] + ref, delta[..., 2:]], -1).sigmoid()


# ----------------------------------------------------------------------------------------------------------------------
# Distillation: decoupled MSE (Eq. 8), the two AKEs together (Eq. 6, 7), the adapter phi, FitNet baseline

def decoupled_mse(z_s, z_t, pos_mask):
    """Eq. (8): mean over positive queries of MSE(z_i^S, z_i^T) (mean over channels) + the same mean over negatives,
    pooled over the batch (z [B, N, C], pos_mask [B, N] bool). A set with no query contributes 0."""
    per_query = (z_s.float() - z_t.detach().float()).pow(2).mean(-1)                     # [B, N]
    pos_mask = pos_mask.to(per_query.device, torch.bool)
    pos, neg = pos_mask.float(), (~pos_mask).float()
    return (per_query * pos).sum() / pos.sum().clamp(min=1) + (per_query * neg).sum() / neg.sum().clamp(min=1)


class Knowledge(NamedTuple):
    """The teacher side of Eq. (7) for one batch. Plain tensors, batch dimension first: an offline dump stores image i
    as row = {k: v[i] for k, v in knowledge._asdict().items()} and restores a batch of rows as
    Knowledge(**{k: torch.stack([row[k] for row in rows]) for k in Knowledge._fields})."""
    queries_ct: torch.Tensor    # [B, N, C]  q_ct (Eq. 4)
    reference_ct: torch.Tensor  # [B, N, 2]
    queries_pos: torch.Tensor   # [B, N, C]  q_pos
    boxes: torch.Tensor         # [B, N, 4]  B^ (Eq. 3), the positional queries' reference boxes
    z_ct: torch.Tensor          # [B, N, C]  z_ct^T = f_e(q_ct, F^T)
    z_pos: torch.Tensor         # [B, N, C]  z_pos^T
    pos_mask_ct: torch.Tensor   # [B, N] bool: content queries matched to a GT from the teacher's own FFN(z_ct^T)
    pos_mask_pos: torch.Tensor  # [B, N] bool: positional queries i < N'


class UniKD(nn.Module):
    """Both AKEs (unshared weights) with the losses of both stages.

    Stage 1: loss = sum(model.pretrain_loss(teacher_feats, targets).values())  (or model(teacher_feats, targets))
    Stage 2: model.freeze(); loss = sum(model.distill_loss(teacher_feats, adapter(student_feats), targets).values())
             = student_loss(teacher_knowledge(teacher_feats, targets), adapter(student_feats)); the knowledge can be
             computed once and stored (offline KD, sec. 3.3).
    """

    def __init__(self, num_classes, d_model=256, n_heads=8, n_levels=4, n_points=4, num_queries=200,
                 num_extractor_layers=1, dim_ffn=1024, dropout=0.0, alpha=0.6, beta=0.4,
                 cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, focal_alpha=0.25, focal_gamma=2.0):
        super().__init__()
        ake = dict(num_classes=num_classes, d_model=d_model, n_heads=n_heads, n_levels=n_levels, n_points=n_points,
                   num_queries=num_queries, num_extractor_layers=num_extractor_layers, dim_ffn=dim_ffn, dropout=dropout)
        self.ake_ct = AKE("content", **ake)
        self.ake_pos = AKE("positional", **ake)
        self.matcher = HungarianMatcher(cost_class, cost_bbox, cost_giou, focal_alpha, focal_gamma)
        self.num_queries, self.alpha, self.beta = num_queries, alpha, beta
        # Deformable DETR's loss weights equal its matching costs (2, 5, 2)
        self.loss_weights = dict(focal_alpha=focal_alpha, focal_gamma=focal_gamma, w_cls=cost_class, w_l1=cost_bbox,
                                 w_giou=cost_giou)
        self.frozen = False

    def forward(self, teacher_feats, targets, generator=None):
        """= pretrain_loss: stage 1 is the only stage that trains the AKEs, so it is the call a DDP wrapper runs."""
        return self.pretrain_loss(teacher_feats, targets, generator)

    def sample_boxes(self, targets, device, generator=None):
        """B^ for every image (Eq. 3) -> (boxes [B, N, 4], pos_mask [B, N] bool: rows < N' of each image)."""
        boxes, num_pos = zip(*(sample_query_boxes(t["boxes"], self.num_queries, self.alpha, self.beta, generator)
                               for t in targets))
        boxes = torch.stack(boxes).to(device)
        pos_mask = torch.arange(self.num_queries, device=device)[None] < torch.tensor(num_pos, device=device)[:, None]
        return boxes, pos_mask

    def pretrain_loss(self, teacher_feats, targets, generator=None):
        """Eq. (6) for both AKEs on the (frozen, detached) teacher levels -> dict of weighted loss terms."""
        device = teacher_feats[0].device
        boxes, _ = self.sample_boxes(targets, device, generator)
        num_boxes = num_boxes_across_ranks(sum(len(t["boxes"]) for t in targets), device)
        losses = {}

        # content: assignment by bipartite matching
        q_ct = self.ake_ct.generate_queries(teacher_feats)
        logits, pred = self.ake_ct.head(self.ake_ct.extract(q_ct, teacher_feats), q_ct)
        indices = self.matcher(logits, pred, targets)
        for k, v in set_loss(logits, pred, targets, indices, num_boxes, **self.loss_weights).items():
            losses[f"loss_ct_{k}"] = v

        # positional: assignment by construction, sigma(i) = i for i < N'
        q_pos = self.ake_pos.generate_queries(teacher_feats, boxes)
        logits, pred = self.ake_pos.head(self.ake_pos.extract(q_pos, teacher_feats), q_pos)
        num_pos = [min(len(t["boxes"]), self.num_queries) for t in targets]  # = pos_mask.sum(1), without a sync
        indices = [(torch.arange(n), torch.arange(n)) for n in num_pos]
        num_pos_boxes = num_boxes_across_ranks(sum(num_pos), device)
        for k, v in set_loss(logits, pred, targets, indices, num_pos_boxes, **self.loss_weights).items():
            losses[f"loss_pos_{k}"] = v
        return losses

    def content_predictions(self, teacher_feats):
        """FFN(z_ct^T) -> (logits [B, N, K], boxes [B, N, 4] cxcywh): the content AKE as a detector (its COCO AP)."""
        q = self.ake_ct.generate_queries(teacher_feats)
        return self.ake_ct.head(self.ake_ct.extract(q, teacher_feats), q)

    @torch.no_grad()
    def teacher_knowledge(self, teacher_feats, targets, generator=None):
        """The teacher side of Eq. (7) -> Knowledge: the queries generated from F^T (Eq. 3-4), z^T = f_e(q, F^T)
        (Eq. 5) and which queries are positive for Eq. (8)."""
        device = teacher_feats[0].device
        boxes, pos_mask_pos = self.sample_boxes(targets, device, generator)
        q_ct = self.ake_ct.generate_queries(teacher_feats)
        q_pos = self.ake_pos.generate_queries(teacher_feats, boxes)
        z_ct = self.ake_ct.extract(q_ct, teacher_feats)
        z_pos = self.ake_pos.extract(q_pos, teacher_feats)
        # content positives: the queries the teacher's own predictions FFN(z_ct^T) match to a GT
        logits, pred = self.ake_ct.head(z_ct, q_ct)
        pos_mask_ct = torch.zeros_like(pos_mask_pos)
        for b, (src, _) in enumerate(self.matcher(logits, pred, targets)):
            pos_mask_ct[b, src.to(device)] = True
        return Knowledge(q_ct.tgt, q_ct.reference, q_pos.tgt, q_pos.reference, z_ct, z_pos, pos_mask_ct, pos_mask_pos)

    def student_loss(self, knowledge, student_feats, lambda_ct=10.0, lambda_pos=10.0):
        """The student side of Eq. (7) -> {"loss_kd_ct", "loss_kd_pos"}: the frozen extractors read the adapted student
        levels phi(F^S) with the teacher's queries, and Eq. (8) compares the result with z^T. Gradients reach only
        student_feats (and through them phi and the student)."""
        k = knowledge
        z_ct = self.ake_ct.extract(Queries(k.queries_ct, k.reference_ct), student_feats)  # f_e(q_ct, phi(F^S))
        z_pos = self.ake_pos.extract(Queries(k.queries_pos, k.boxes), student_feats)    # f_e(q_pos, phi(F^S))
        return {"loss_kd_ct": lambda_ct * decoupled_mse(z_ct, k.z_ct, k.pos_mask_ct),
                "loss_kd_pos": lambda_pos * decoupled_mse(z_pos, k.z_pos, k.pos_mask_pos)}

    def distill_loss(self, teacher_feats, student_feats, targets, lambda_ct=10.0, lambda_pos=10.0, generator=None):
        """Online Eq. (7): student_loss(teacher_knowledge(...), ...). student_feats are the adapted phi(F^S)."""
        return self.student_loss(self.teacher_knowledge(teacher_feats, targets, generator), student_feats,
                                 lambda_ct, lambda_pos)

    def freeze(self):
        """Stage 2: AKE weights fixed (sec. 3.2.3): no gradients (stale stage-1 ones dropped), eval mode, and train()
        keeps it in eval mode."""
        self.requires_grad_(False)
        for p in self.parameters():
            p.grad = None
        self.frozen = True
        return self.eval()

    def train(self, mode=True):
        return super().train(mode and not self.frozen)


def count_parameters(model):
    """UniKD -> {"ake_ct", "ake_pos", "total", "total_without_heads"}: parameter counts. The FFN heads (class + box)
    serve only pretraining (and the AKE's own AP); distillation uses the query generators and extractors."""
    def n(m):
        return sum(p.numel() for p in m.parameters())
    heads = sum(n(a.class_head) + n(a.box_head) for a in (model.ake_ct, model.ake_pos))
    total = n(model.ake_ct) + n(model.ake_pos)
    return {"ake_ct": n(model.ake_ct), "ake_pos": n(model.ake_pos), "total": total,
            "total_without_heads": total - heads}


def param_groups(model, lr, linear_proj_mult=0.1, also_slow=()):
    """Optimizer groups as Deformable DETR trains its transformer: the layers that place the samples (MSDA sampling
    offsets, the content queries' reference points) at linear_proj_mult x lr, so they move slower than what the
    samples are read with, and so do parameters whose names contain a string of also_slow (Deformable DETR: its
    backbone); everything else at lr. Frozen parameters are left out."""
    slow, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            placing = any(s in name for s in ("sampling_offsets", "reference_points") + tuple(also_slow))
            (slow if placing else rest).append(p)
    return [{"params": rest, "lr": lr}, {"params": slow, "lr": lr * linear_proj_mult}]

class Adapter(nn.Module):
    """phi (sec. 3.2.3): a linear projection of the student's channels to d_model (1x1 conv, shared by the levels),
    then num_layers deformable self-attention layers over the 4 levels (paper: 2; Tab. 6g: 0-4).
    forward(list of 4 [B, C_s, H_l, W_l]) -> list of 4 [B, d_model, H_l, W_l].

    The paper calls phi "fully connected layers and deformable self-attention layers": by default the layers are
    MSDA self-attention + residual + LayerNorm without the encoder's FFN (dim_ffn=0), which would run on every pixel
    of the 4 levels; dim_ffn=1024 gives Deformable DETR's full encoder layer."""

    def __init__(self, in_channels, d_model=256, num_layers=2, n_heads=8, n_levels=4, n_points=4, dim_ffn=0,
                 dropout=0.0):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, d_model, 1)
        # the encoder's queries carry only a level embedding: positions enter through the reference points, so the
        # layer stays translation-equivariant like the convolutions it follows
        self.layers = nn.ModuleList(EncoderLayer(d_model, n_heads, n_levels, n_points, dim_ffn, dropout)
                                    for _ in range(num_layers))
        xavier_init_linears(self.layers)
        # only with layers: an unused parameter would stall DDP (no gradient to reduce)
        self.level_embed = nn.Parameter(torch.randn(n_levels, d_model)) if num_layers else None

    def forward(self, feats):
        feats = [self.proj(f) for f in feats]
        if len(self.layers) == 0:
            return feats
        pos = [e.expand(f.shape[-2] * f.shape[-1], -1) for e, f in zip(self.level_embed, feats)]
        return self_attend_levels(self.layers, feats, pos)


def self_attend_levels(layers, feats, pos):
    """EncoderLayers over a level list, each pixel's reference its own centre on every level (as Deformable DETR's
    encoder, valid ratio 1): feats list of L [B, C, H_l, W_l], pos list of L [H_l * W_l, C] (the queries' positional
    embedding, shared by the batch) -> list of L [B, C, H_l, W_l]."""
    B, C = feats[0].shape[:2]
    hw = [tuple(f.shape[-2:]) for f in feats]
    src, spatial_shapes, level_start_index = flatten_levels(feats)                       # [B, S, C]
    pos = torch.cat(pos).to(src.dtype)[None]                                              # [1, S, C]
    reference = pixel_centres(hw, src.device)[None, :, None].expand(B, -1, len(hw), -1)  # [B, S, L, 2]
    for layer in layers:
        src = layer(src, pos, reference, spatial_shapes, level_start_index)
    return [s.transpose(1, 2).reshape(B, C, h, w) for s, (h, w) in zip(src.split([h * w for h, w in hw], 1), hw)]


def pixel_centres(hw, device, dtype=torch.float32):
    """[S, 2] normalised (x, y) of every pixel centre, levels concatenated in flatten order (row-major)."""
    points = []
    for h, w in hw:
        y, x = torch.meshgrid((torch.arange(h, device=device, dtype=dtype) + 0.5) / h,
                              (torch.arange(w, device=device, dtype=dtype) + 0.5) / w, indexing="ij")
        points.append(torch.stack([x.flatten(), y.flatten()], -1))
    return torch.cat(points)


def foreground_mask(targets, h, w, device):
    """[B, h, w] bool: pixel centre inside any GT box (boxes normalised cxcywh)."""
    centres = pixel_centres([(h, w)], device)                                             # [h*w, 2]
    masks = []
    for t in targets:
        box = box_convert(t["boxes"].float().to(device), "cxcywh", "xyxy")                # [M, 4]
        x, y = centres[:, None, 0], centres[:, None, 1]
        inside = (x >= box[:, 0]) & (x <= box[:, 2]) & (y >= box[:, 1]) & (y <= box[:, 3])  # [h*w, M]
        masks.append(inside.any(1).view(h, w))
    return torch.stack(masks)


def fitnet_loss(teacher_feats, student_feats, targets):
    """FitNet as the paper modifies it (sec. 4.3, Tab. 8): MSE between phi(F^S) and F^T on all 4 levels, at foreground
    locations only (pixel centre inside a GT box); squared error summed over those locations and channels of all
    levels, divided by (their number x channels). 0 when no location is foreground."""
    total, count = 0.0, 0.0
    for ft, fs in zip(teacher_feats, student_feats):
        B, C, H, W = ft.shape
        fg = foreground_mask(targets, H, W, ft.device)                                    # [B, H, W]
        err = (fs.float() - ft.detach().float()).pow(2).sum(1)                            # [B, H, W]
        total = total + (err * fg).sum()
        count = count + fg.sum() * C
    return total / torch.as_tensor(count).clamp(min=1)


@torch.no_grad()
def postprocess(logits, boxes, image_sizes_hw, topk=100):
    """DETR-style decoding of the AKE's FFN (Deformable DETR's PostProcess): sigmoid scores, top-k over all N x K
    (query, class) pairs, boxes cxcywh normalised -> xyxy pixels of the given (h, w) per image.
    -> list of {"boxes" [k, 4], "scores" [k], "labels" [k] in 0..K-1}."""
    B, N, K = logits.shape
    prob = logits.float().sigmoid().flatten(1)                                            # [B, N*K]
    scores, idx = prob.topk(min(topk, N * K), dim=1)
    labels, query = idx % K, idx // K
    picked = torch.gather(boxes.float(), 1, query[..., None].expand(-1, -1, 4))           # [B, k, 4]
    hw = torch.as_tensor(image_sizes_hw, dtype=torch.float32, device=boxes.device).reshape(B, 2)
    scale = torch.stack([hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]], -1)[:, None]            # [B, 1, 4] (w, h, w, h)
    xyxy = box_convert(picked, "cxcywh", "xyxy") * scale
    return [{"boxes": b, "scores": s, "labels": l} for b, s, l in zip(xyxy, scores, labels)]
