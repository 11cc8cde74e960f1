"""Deformable DETR (Zhu et al., ICLR 2021) on a torchvision backbone and this project's deformable attention.

    model = DeformableDETR(DeformableEncoder(body, body_channels), num_classes)
    # (or detectors.build_detector("deformable_detr_r50", K + 1))
    losses = model(images, targets)   # train mode: {"loss_cls", "loss_l1", "loss_giou"}, their "_aux" sums (and
                                      # with two_stage the encoder's proposals' "_enc" terms)
    detections = model(images)        # eval mode: torchvision's list of {"boxes", "scores", "labels"}

The same interface as torchvision's detectors (a `transform`, a `backbone` with `out_channels`, labels 1..K with 0 the
background), so train.py, eval.py and the feature hook of detectors.py treat it like any other family. Its `backbone`
is everything up to the encoder's output -- ResNet C3-C5, a stride-2 conv on C5 for a fourth level, 256-channel
projections with GroupNorm, the deformable encoder -- because the paper's AKE reads Deformable DETR's "features after
the encoder" (sec. 4.1), and that hook reads a family's `backbone`. Every transformer part is unikd.py's (one
implementation shared with the AKE): EncoderLayer, DecoderLayer, HungarianMatcher, set_loss, postprocess.

Coordinates follow unikd.py: boxes are normalised to the padded batch tensor and no padding mask is used (valid ratio
1), where Deformable DETR normalises to each image and masks its padding. size_divisible=64 keeps the padding small.
Iterative box refinement is `box_refine=True`; two-stage Deformable DETR is `two_stage=True` (with or without it).
"""
import copy
import math
from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import box_convert, clip_boxes_to_image

from deform_attn_triton import flatten_levels
from unikd import (MLP, DecoderLayer, EncoderLayer, FeatureMemory, HungarianMatcher, boxes_from_reference,
                   num_boxes_across_ranks, postprocess, self_attend_levels, set_loss, xavier_init_linears)

NUM_LEVELS = 4  # strides 8, 16, 32, 64: C3-C5 and a stride-2 conv on C5


def sine_embedding(coordinate, num_feats, temperature=10000.0):
    """[...] coordinates in [0, 1] -> [..., num_feats]: interleaved sin/cos of 2 pi * coordinate /
    temperature^(2i / num_feats), DETR's sine embedding of one coordinate."""
    freq = temperature ** (2 * (torch.arange(num_feats, device=coordinate.device) // 2) / num_feats)
    angle = coordinate[..., None] * (2 * math.pi) / freq
    return torch.stack([angle[..., 0::2].sin(), angle[..., 1::2].cos()], -1).flatten(-2)


def sine_position_embedding(h, w, d_model, temperature=10000.0, device=None):
    """DETR's normalised sine embedding of an h x w map -> [h * w, d_model], row-major: the first half encodes y, the
    second x, each at its pixel centre / side."""
    half = d_model // 2
    y = sine_embedding((torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h, half, temperature)
    x = sine_embedding((torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w, half, temperature)
    return torch.cat([y[:, None].expand(h, w, half), x[None].expand(h, w, half)], -1).flatten(0, 1)


def proposal_anchors(spatial_shapes):
    """Two-stage Deformable DETR's per-pixel proposals before refinement: spatial_shapes [L, 2] -> (boxes [S, 4]
    cxcywh normalised: the pixel's centre, side 0.05 * 2^l on level l; valid [S] bool: every coordinate inside
    (0.01, 0.99), as the paper's code keeps them)."""
    boxes = []
    for level, (h, w) in enumerate(spatial_shapes.tolist()):
        y, x = torch.meshgrid((torch.arange(h, device=spatial_shapes.device) + 0.5) / h,
                              (torch.arange(w, device=spatial_shapes.device) + 0.5) / w, indexing="ij")
        side = torch.full_like(x, 0.05 * 2.0 ** level)
        boxes.append(torch.stack([x, y, side, side], -1).flatten(0, 1))
    boxes = torch.cat(boxes)
    return boxes, ((boxes > 0.01) & (boxes < 0.99)).all(-1)


class DeformableEncoder(nn.Module):
    """The detector's `backbone`: body (images -> dict of C3, C4, C5 [B, C_l, H/s, W/s]) -> 4 levels projected to
    d_model (1x1 conv + GroupNorm; the fourth a 3x3 stride-2 conv on C5) -> the deformable encoder (sine position +
    level embedding as the queries' positional embedding) -> OrderedDict '0'..'3' of [B, d_model, H/s, W/s],
    s = 8, 16, 32, 64."""

    def __init__(self, body, body_channels, d_model=256, num_layers=6, n_heads=8, n_points=4, dim_ffn=1024,
                 dropout=0.1):
        super().__init__()
        self.body, self.out_channels = body, d_model
        self.input_proj = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(c, d_model, 1), nn.GroupNorm(32, d_model)) for c in body_channels]
            + [nn.Sequential(nn.Conv2d(body_channels[-1], d_model, 3, stride=2, padding=1), nn.GroupNorm(32, d_model))])
        self.level_embed = nn.Parameter(torch.empty(NUM_LEVELS, d_model))
        self.layers = nn.ModuleList(EncoderLayer(d_model, n_heads, NUM_LEVELS, n_points, dim_ffn, dropout)
                                    for _ in range(num_layers))
        xavier_init_linears(self.layers)
        nn.init.normal_(self.level_embed)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight)
            nn.init.zeros_(proj[0].bias)

    def forward(self, images):
        c = list(self.body(images).values())                                                   # C3, C4, C5
        levels = [proj(x) for proj, x in zip(self.input_proj, c)] + [self.input_proj[-1](c[-1])]
        pos = [sine_position_embedding(*f.shape[-2:], f.shape[1], device=f.device) + e
               for f, e in zip(levels, self.level_embed)]
        return OrderedDict((str(i), f) for i, f in enumerate(self_attend_levels(self.layers, levels, pos)))


class DeformableDETR(nn.Module):
    """Deformable DETR: `num_queries` learned queries, each a positional embedding (from which its reference point)
    and a content embedding, through `num_decoder_layers` decoder layers; a class and a box head after every layer
    (shared, or one per layer with box_refine), every layer's predictions matched and penalised (auxiliary losses).
    With two_stage, every encoder pixel first proposes a box (an objectness logit and a box refined from a square
    around it), and the top `num_queries` proposals replace the learned queries: their boxes are the decoder's
    reference boxes and, embedded, its queries; the proposals get a class-agnostic set loss of their own.
    num_classes includes the background, as torchvision's detectors count it."""

    def __init__(self, backbone, num_classes, num_queries=300, num_decoder_layers=6, box_refine=False,
                 two_stage=False, n_heads=8, n_points=4, dim_ffn=1024, dropout=0.1, detections_per_img=100,
                 score_thresh=0.0, min_size=800, max_size=1333, image_mean=None, image_std=None, size_divisible=64):
        super().__init__()
        d_model = backbone.out_channels
        self.transform = GeneralizedRCNNTransform(min_size, max_size, image_mean, image_std,
                                                  size_divisible=size_divisible)
        self.backbone = backbone
        if two_stage:
            self.enc_output = nn.Sequential(nn.Linear(d_model, d_model), nn.LayerNorm(d_model))
            self.enc_class = nn.Linear(d_model, 1)                                      # objectness
            self.enc_box = MLP(d_model, d_model, 4, 3)
            self.pos_trans = nn.Sequential(nn.Linear(2 * d_model, 2 * d_model), nn.LayerNorm(2 * d_model))
            nn.init.constant_(self.enc_class.bias, -math.log((1 - 0.01) / 0.01))
            nn.init.zeros_(self.enc_box.layers[-1].weight)                              # proposals start at
            nn.init.zeros_(self.enc_box.layers[-1].bias)                                # their anchors
        else:
            self.query_embed = nn.Embedding(num_queries, 2 * d_model)                  # [query_pos | tgt]
            self.reference_points = nn.Linear(d_model, 2)
            nn.init.xavier_uniform_(self.reference_points.weight)
            nn.init.zeros_(self.reference_points.bias)
        self.decoder = nn.ModuleList(DecoderLayer(d_model, n_heads, NUM_LEVELS, n_points, dim_ffn, dropout)
                                     for _ in range(num_decoder_layers))
        xavier_init_linears(self.decoder)
        class_head, box_head = nn.Linear(d_model, num_classes - 1), MLP(d_model, d_model, 4, 3)
        nn.init.constant_(class_head.bias, -math.log((1 - 0.01) / 0.01))               # focal prior p = 0.01
        nn.init.zeros_(box_head.layers[-1].weight)
        nn.init.zeros_(box_head.layers[-1].bias)
        nn.init.constant_(box_head.layers[-1].bias[2:], -2.0)                           # boxes start small
        # without refinement one head serves every layer; with it each layer refines the previous layer's box
        def per_layer(head):
            return nn.ModuleList(copy.deepcopy(head) if box_refine else head for _ in self.decoder)
        self.class_embed, self.bbox_embed = per_layer(class_head), per_layer(box_head)
        self.box_refine, self.two_stage, self.d_model, self.num_queries = box_refine, two_stage, d_model, num_queries
        self.matcher = HungarianMatcher()
        self.detections_per_img, self.score_thresh = detections_per_img, score_thresh

    def forward(self, images, targets=None):
        """As torchvision's detectors: train mode -> loss dict, eval mode -> detections in original pixels."""
        if self.training and targets is None:
            raise ValueError("targets should not be None in training mode")
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        image_list, targets = self.transform(images, targets)
        padded_hw = tuple(image_list.tensors.shape[-2:])
        logits, boxes, proposals = self.decode(list(self.backbone(image_list.tensors).values()))
        if self.training:
            targets = set_loss_targets(targets, padded_hw)
            losses = self.set_losses(logits, boxes, targets)
            if proposals is not None:
                losses.update(self.proposal_losses(*proposals, targets))
            return losses
        detections = postprocess(logits[-1], boxes[-1], [padded_hw] * len(images), self.detections_per_img)
        for d, size in zip(detections, image_list.image_sizes):
            keep = d["scores"] >= self.score_thresh
            d.update(boxes=clip_boxes_to_image(d["boxes"][keep], size), scores=d["scores"][keep],
                     labels=d["labels"][keep] + 1)
        return self.transform.postprocess(detections, image_list.image_sizes, original_sizes)

    def decode(self, levels):
        """Encoder levels -> (logits [D, B, N, K], boxes [D, B, N, 4] cxcywh normalised after each of D layers,
        proposals: None, or with two_stage every pixel's (objectness logit [B, S, 1], box [B, S, 4]))."""
        memory = FeatureMemory(*flatten_levels(levels))
        B, proposals = levels[0].shape[0], None
        if self.two_stage:
            proposals = self.propose(memory)
            query_pos, tgt, reference = self.proposal_queries(*proposals, memory.spatial_shapes)
        else:
            query_pos, tgt = self.query_embed.weight[None].expand(B, -1, -1).split(self.d_model, -1)
            reference = self.reference_points(query_pos).float().sigmoid()                      # [B, N, 2]
        logits, boxes = [], []
        for layer, class_embed, bbox_embed in zip(self.decoder, self.class_embed, self.bbox_embed):
            tgt = layer(tgt, query_pos, reference, memory)
            logits.append(class_embed(tgt))
            boxes.append(boxes_from_reference(bbox_embed(tgt), reference))
            if self.box_refine:  # the next layer samples around this layer's box (gradient stops, as the paper)
                reference = boxes[-1].detach()
        return torch.stack(logits), torch.stack(boxes), proposals

    def propose(self, memory):
        """Two-stage: every encoder pixel's (objectness logit [B, S, 1], box [B, S, 4]), the box refined from its
        proposal anchor; pixels whose anchor is not valid read zeros."""
        anchors, valid = proposal_anchors(memory.spatial_shapes)
        hidden = self.enc_output(memory.value.masked_fill(~valid[None, :, None], 0.0))
        return self.enc_class(hidden), boxes_from_reference(self.enc_box(hidden), anchors.expand_as(hidden[..., :4]))

    def proposal_queries(self, objectness, boxes, spatial_shapes):
        """The top num_queries valid proposals -> (query_pos, tgt [B, N, C]: the two halves of pos_trans(the sine
        embedding of the box's 4 coordinates), reference boxes [B, N, 4], detached as in the paper)."""
        _, valid = proposal_anchors(spatial_shapes)
        scores = objectness[..., 0].masked_fill(~valid, float("-inf"))
        top = scores.topk(min(self.num_queries, scores.shape[1]), dim=1).indices                # [B, N]
        reference = boxes.gather(1, top[..., None].expand(-1, -1, 4)).detach()
        embedded = sine_embedding(reference, self.d_model // 2).flatten(-2)                   # [B, N, 2C]
        query_pos, tgt = self.pos_trans(embedded).split(self.d_model, -1)
        return query_pos, tgt, reference

    def set_losses(self, logits, boxes, targets):
        """Matching and set loss per decoder layer: the last layer's terms as loss_{cls,l1,giou}, the sums of the
        earlier layers' as loss_{cls,l1,giou}_aux (one normaliser, the GT count averaged over ranks)."""
        num_boxes = num_boxes_across_ranks(sum(len(t["boxes"]) for t in targets), logits.device)
        losses = {}
        for i, (layer_logits, layer_boxes) in enumerate(zip(logits, boxes)):
            indices = self.matcher(layer_logits, layer_boxes, targets)
            suffix = "" if i == len(logits) - 1 else "_aux"
            for k, v in set_loss(layer_logits, layer_boxes, targets, indices, num_boxes).items():
                losses[f"loss_{k}{suffix}"] = losses.get(f"loss_{k}{suffix}", 0) + v
        return losses


    def proposal_losses(self, objectness, boxes, targets):
        """Two-stage: the proposals' set loss against class-agnostic targets -> loss_{cls,l1,giou}_enc."""
        agnostic = [dict(t, labels=torch.zeros_like(t["labels"])) for t in targets]
        num_boxes = num_boxes_across_ranks(sum(len(t["boxes"]) for t in targets), objectness.device)
        indices = self.matcher(objectness, boxes, agnostic)
        return {f"loss_{k}_enc": v for k, v in set_loss(objectness, boxes, agnostic, indices, num_boxes).items()}


def set_loss_targets(targets, padded_hw):
    """torchvision targets after the transform (xyxy pixels of the batched tensor, labels 1..K) -> unikd.py's
    (labels 0..K-1, boxes cxcywh normalised to the batched tensor, clipped into it)."""
    h, w = padded_hw
    out = []
    for t in targets:
        scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=t["boxes"].device)
        boxes = box_convert(t["boxes"].float(), "xyxy", "cxcywh") / scale
        out.append({"labels": t["labels"] - 1, "boxes": boxes.clamp(0, 1)})
    return out
