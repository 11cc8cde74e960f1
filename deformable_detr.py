"""Deformable DETR (Zhu et al., ICLR 2021) on a torchvision backbone and this project's deformable attention.

    model = DeformableDETR(body, body_channels, num_classes)   # detectors.build_detector("deformable_detr_r50", K + 1)
    losses = model(images, targets)   # train mode: {"loss_cls", "loss_l1", "loss_giou", and their "_aux" sums}
    detections = model(images)        # eval mode: torchvision's list of {"boxes", "scores", "labels"}

The same interface as torchvision's detectors (a `transform`, a `backbone` with `out_channels`, labels 1..K with 0 the
background), so train.py, eval.py and the feature hook of detectors.py treat it like any other family. Its `backbone`
is everything up to the encoder's output -- ResNet C3-C5, a stride-2 conv on C5 for a fourth level, 256-channel
projections with GroupNorm, the deformable encoder -- because the paper's AKE reads Deformable DETR's "features after
the encoder" (sec. 4.1), and that hook reads a family's `backbone`. Every transformer part is unikd.py's (one
implementation shared with the AKE): EncoderLayer, DecoderLayer, HungarianMatcher, set_loss, postprocess.

Coordinates follow unikd.py: boxes are normalised to the padded batch tensor and no padding mask is used (valid ratio
1), where Deformable DETR normalises to each image and masks its padding. size_divisible=64 keeps the padding small.
Two-stage Deformable DETR is not built; iterative box refinement is `box_refine=True`.
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


def sine_position_embedding(h, w, d_model, temperature=10000.0, device=None):
    """DETR's normalised sine embedding of an h x w map -> [h * w, d_model], row-major: the first half encodes y, the
    second x, each as interleaved sin/cos of 2 pi * (pixel centre / side) / temperature^(2i / (d_model / 2))."""
    half = d_model // 2
    freq = temperature ** (2 * (torch.arange(half, device=device) // 2) / half)                 # [d/2]
    y = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h * 2 * math.pi
    x = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w * 2 * math.pi

    def embed(coordinate):                                                                      # [n] -> [n, d/2]
        angle = coordinate[:, None] / freq
        return torch.stack([angle[:, 0::2].sin(), angle[:, 1::2].cos()], -1).flatten(1)
    return torch.cat([embed(y)[:, None].expand(h, w, half), embed(x)[None].expand(h, w, half)], -1).flatten(0, 1)


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
    """Deformable DETR (single scale of boxes per query, two-stage off): `num_queries` learned queries, each a
    positional embedding (from which its reference point) and a content embedding, through `num_decoder_layers`
    decoder layers; a class and a box head after every layer (shared, or one per layer with box_refine), every
    layer's predictions matched and penalised (auxiliary losses). num_classes includes the background, as
    torchvision's detectors count it."""

    def __init__(self, backbone, num_classes, num_queries=300, num_decoder_layers=6, box_refine=False, n_heads=8,
                 n_points=4, dim_ffn=1024, dropout=0.1, detections_per_img=100, score_thresh=0.0,
                 min_size=800, max_size=1333, image_mean=None, image_std=None, size_divisible=64):
        super().__init__()
        d_model = backbone.out_channels
        self.transform = GeneralizedRCNNTransform(min_size, max_size, image_mean, image_std,
                                                  size_divisible=size_divisible)
        self.backbone = backbone
        self.query_embed = nn.Embedding(num_queries, 2 * d_model)                      # [query_pos | tgt]
        self.reference_points = nn.Linear(d_model, 2)
        self.decoder = nn.ModuleList(DecoderLayer(d_model, n_heads, NUM_LEVELS, n_points, dim_ffn, dropout)
                                     for _ in range(num_decoder_layers))
        xavier_init_linears(self.decoder)
        class_head, box_head = nn.Linear(d_model, num_classes - 1), MLP(d_model, d_model, 4, 3)
        nn.init.constant_(class_head.bias, -math.log((1 - 0.01) / 0.01))               # focal prior p = 0.01
        nn.init.zeros_(box_head.layers[-1].weight)
        nn.init.zeros_(box_head.layers[-1].bias)
        nn.init.constant_(box_head.layers[-1].bias[2:], -2.0)                           # boxes start small
        nn.init.xavier_uniform_(self.reference_points.weight)
        nn.init.zeros_(self.reference_points.bias)
        # without refinement one head serves every layer; with it each layer refines the previous layer's box
        def per_layer(head):
            return nn.ModuleList(copy.deepcopy(head) if box_refine else head for _ in self.decoder)
        self.class_embed, self.bbox_embed = per_layer(class_head), per_layer(box_head)
        self.box_refine, self.d_model = box_refine, d_model
        self.matcher = HungarianMatcher()
        self.detections_per_img, self.score_thresh = detections_per_img, score_thresh

    def forward(self, images, targets=None):
        """As torchvision's detectors: train mode -> loss dict, eval mode -> detections in original pixels."""
        if self.training and targets is None:
            raise ValueError("targets should not be None in training mode")
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        image_list, targets = self.transform(images, targets)
        padded_hw = tuple(image_list.tensors.shape[-2:])
        logits, boxes = self.decode(list(self.backbone(image_list.tensors).values()))
        if self.training:
            return self.set_losses(logits, boxes, set_targets(targets, padded_hw))
        detections = postprocess(logits[-1], boxes[-1], [padded_hw] * len(images), self.detections_per_img)
        for d, size in zip(detections, image_list.image_sizes):
            keep = d["scores"] >= self.score_thresh
            d.update(boxes=clip_boxes_to_image(d["boxes"][keep], size), scores=d["scores"][keep],
                     labels=d["labels"][keep] + 1)
        return self.transform.postprocess(detections, image_list.image_sizes, original_sizes)

    def decode(self, levels):
        """Encoder levels -> (logits [D, B, N, K], boxes [D, B, N, 4] cxcywh normalised) after each of D layers."""
        memory = FeatureMemory(*flatten_levels(levels))
        B = levels[0].shape[0]
        query_pos, tgt = self.query_embed.weight[None].expand(B, -1, -1).split(self.d_model, -1)
        reference = self.reference_points(query_pos).float().sigmoid()                          # [B, N, 2]
        logits, boxes = [], []
        for layer, class_embed, bbox_embed in zip(self.decoder, self.class_embed, self.bbox_embed):
            tgt = layer(tgt, query_pos, reference, memory)
            logits.append(class_embed(tgt))
            boxes.append(boxes_from_reference(bbox_embed(tgt), reference))
            if self.box_refine:  # the next layer samples around this layer's box (gradient stops, as the paper)
                reference = boxes[-1].detach()
        return torch.stack(logits), torch.stack(boxes)

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


def set_targets(targets, padded_hw):
    """torchvision targets after the transform (xyxy pixels of the batched tensor, labels 1..K) -> unikd.py's
    (labels 0..K-1, boxes cxcywh normalised to the batched tensor, clipped into it)."""
    h, w = padded_hw
    out = []
    for t in targets:
        scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=t["boxes"].device)
        boxes = box_convert(t["boxes"].float(), "xyxy", "cxcywh") / scale
        out.append({"labels": t["labels"] - 1, "boxes": boxes.clamp(0, 1)})
    return out
