"""RepPoints (Yang et al., "RepPoints: Point Set Representation for Object Detection", ICCV 2019) with its standard
choices, built on torchvision's RetinaNet (transform, backbone + FPN P3-P7, anchors as locations, inference: top-k per
level, score threshold, NMS) and torchvision.ops (deform_conv2d, focal loss, Matcher, box IoU):

* per location 9 points, first an initial set regressed from the localisation tower, then a refinement; both
  classification and refinement read their tower through a 3x3 deformable convolution sampled at the initial points
  (sec. 3.2, Fig. 2); the points' gradient through those offsets is scaled by 0.1;
* points -> pseudo-box by min-max (sec. 3.1, the "min-max function");
* the initial stage is assigned by the point assigner (each GT to the location nearest its centre on the level of
  its size), the refinement by max-IoU (0.5 / 0.4) between the initial pseudo-boxes and the GTs;
* focal loss for classification; smooth-L1 on both stages' pseudo-boxes, normalised by 4 x stride.

Points are (y, x) pairs in units of the level's stride, relative to their location: the layout deform_conv2d reads
its offsets in, once the 3x3 kernel grid is subtracted.
"""
import math

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models.detection import RetinaNet, _utils as det_utils
from torchvision.ops import box_iou, deform_conv2d, sigmoid_focal_loss

NUM_POINTS = 9  # a 3x3 deformable kernel: one point per tap
POINT_BASE_SCALE = 4  # a GT of side 4 x stride belongs to that stride's level; boxes are normalised by 4 x stride
GRADIENT_MUL = 0.1  # share of the deformable offsets' gradient that reaches the initial points
INIT_LOSS_WEIGHT, REFINE_LOSS_WEIGHT, SMOOTH_L1_BETA = 0.5, 1.0, 1 / 9
REFINE_POS_IOU, REFINE_NEG_IOU = 0.5, 0.4


def kernel_grid(kernel=3):
    """[2 * kernel^2] the (y, x) offsets of a kernel's taps from its centre, in deform_conv2d's tap order."""
    r = torch.arange(kernel, dtype=torch.float32) - (kernel - 1) / 2
    ys, xs = torch.meshgrid(r, r, indexing="ij")
    return torch.stack([ys.flatten(), xs.flatten()], 1).flatten()


TAPS_3X3 = kernel_grid(3)  # built once: the head's offsets and deform_conv3x3 (twice per level, every step) read it


def deform_conv3x3(x, offset, weight):
    """torchvision.ops.deform_conv2d(x, offset, weight, padding=1) for a 3x3 kernel, stride 1, one offset group:
    x [N, C, H, W], offset [N, 18, H, W] ((y, x) per tap), weight [O, C, 3, 3] -> [N, O, H, W].

    On a GPU, torchvision's op. On a CPU the same numbers as bilinear sampling (grid_sample, zeros outside the map,
    as deform_conv2d's corners) of every tap, then one matrix product: faster than torchvision's CPU kernel
    (RESULTS.md), which has no bf16 (this path samples in fp32 and leaves the product to autocast)."""
    if x.device.type != "cpu":
        return deform_conv2d(x, offset, weight, padding=1)
    N, C, H, W = x.shape
    dtype = torch.promote_types(x.dtype, torch.float32)  # bf16 sampling coordinates would be off by ~W/256 pixels
    taps = TAPS_3X3.to(x.device, dtype).view(1, -1, 2, 1, 1)                              # [1, 9, 2, 1, 1]
    rows = torch.arange(H, device=x.device, dtype=dtype).view(H, 1)
    cols = torch.arange(W, device=x.device, dtype=dtype).view(1, W)
    at = offset.to(dtype).view(N, -1, 2, H, W) + taps                                     # [N, 9, 2, H, W]
    y, x_ = at[:, :, 0] + rows, at[:, :, 1] + cols                # where each tap reads, in pixels: [N, 9, H, W]
    grid = torch.stack([(2 * x_ + 1) / W - 1, (2 * y + 1) / H - 1], -1)  # pixel centres (align_corners=False)
    sampled = F.grid_sample(x.to(dtype), grid.view(N, -1, W, 2), padding_mode="zeros", align_corners=False)
    columns = sampled.view(N, C * 9, H * W)                       # [N, C x 9 taps, H*W], weight's (c, tap) order
    return (weight.view(weight.shape[0], -1) @ columns).view(N, -1, H, W)


def points_to_boxes(points):
    """[..., 2P] (y, x) points -> [..., 4] their min-max box (x1, y1, x2, y2), in the points' units."""
    ys, xs = points[..., 0::2], points[..., 1::2]
    return torch.stack([xs.amin(-1), ys.amin(-1), xs.amax(-1), ys.amax(-1)], -1)


def tower(channels, num_convs):
    layers = []
    for _ in range(num_convs):
        layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(32, channels), nn.ReLU()]
    return nn.Sequential(*layers)


def flatten_locations(x):
    """[N, C, H, W] -> [N, H*W, C] (torchvision's location order: row-major)."""
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])


class RepPointsHead(nn.Module):
    """Outputs, per location of every level: cls_logits [N, A, K], points_init and points_refine [N, A, 2P], and
    bbox_regression [N, A, 4] -- the refined points' pseudo-box in stride units, which RetinaNet's inference
    decodes with PointBoxCoder."""

    def __init__(self, in_channels, num_classes, num_convs=3, feat_channels=256, prior_probability=0.01):
        super().__init__()
        self.cls_tower, self.reg_tower = tower(in_channels, num_convs), tower(in_channels, num_convs)
        self.pts_init_conv = nn.Conv2d(in_channels, feat_channels, 3, padding=1)
        self.pts_init_out = nn.Conv2d(feat_channels, 2 * NUM_POINTS, 1)
        self.cls_dcn_weight = nn.Parameter(torch.empty(feat_channels, in_channels, 3, 3))
        self.refine_dcn_weight = nn.Parameter(torch.empty(feat_channels, in_channels, 3, 3))
        self.cls_out = nn.Conv2d(feat_channels, num_classes, 1)
        self.pts_refine_out = nn.Conv2d(feat_channels, 2 * NUM_POINTS, 1)
        self.register_buffer("grid", TAPS_3X3.view(1, -1, 1, 1).clone(), persistent=False)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.cls_dcn_weight, std=0.01)
        nn.init.normal_(self.refine_dcn_weight, std=0.01)
        nn.init.constant_(self.cls_out.bias, -math.log((1 - prior_probability) / prior_probability))

    def forward(self, x):
        out = {"cls_logits": [], "points_init": [], "points_refine": []}
        for features in x:
            cls_feat, pts_feat = self.cls_tower(features), self.reg_tower(features)
            points_init = self.pts_init_out(torch.relu(self.pts_init_conv(pts_feat)))       # [N, 2P, H, W]
            scaled = (1 - GRADIENT_MUL) * points_init.detach() + GRADIENT_MUL * points_init
            offset = scaled - self.grid                       # each tap samples at its point: tap + offset = point
            cls = self.cls_out(torch.relu(deform_conv3x3(cls_feat, offset, self.cls_dcn_weight)))
            refine = self.pts_refine_out(torch.relu(deform_conv3x3(pts_feat, offset, self.refine_dcn_weight)))
            out["cls_logits"].append(flatten_locations(cls))
            out["points_init"].append(flatten_locations(points_init))
            out["points_refine"].append(flatten_locations(refine + points_init.detach()))
        out = {k: torch.cat(v, dim=1) for k, v in out.items()}
        out["bbox_regression"] = points_to_boxes(out["points_refine"])
        return out


class PointBoxCoder:
    """Pseudo-boxes in stride units relative to a location -> pixels, for RetinaNet's inference (decode_single);
    a location's 'anchor' is the stride-sized box around it (detectors.py builds them)."""

    def decode_single(self, boxes, anchors):
        centres = (anchors[:, :2] + anchors[:, 2:]) / 2
        strides = (anchors[:, 2] - anchors[:, 0])[:, None]
        return centres.repeat(1, 2) + boxes * strides


def point_assign(centres, strides, gt_boxes, base_scale):
    """The initial stage's assignment for one image -> [A] GT index per location, -1 for background.

    Each GT goes to its level, floor(mean(log2(w / base_scale), log2(h / base_scale))) clamped to the levels
    present (a GT of side base_scale x stride lands on that stride), and there to the one location nearest its centre
    (distance in units of the GT's size); a location claimed by two GTs keeps the nearer."""
    matched = torch.full((len(centres),), -1, dtype=torch.int64, device=centres.device)
    if len(gt_boxes) == 0:
        return matched
    level_of_location = torch.log2(strides).round()
    wh = (gt_boxes[:, 2:] - gt_boxes[:, :2]).clamp(min=1e-6)
    gt_level = (torch.log2(wh / base_scale).sum(1) / 2).floor()                           # [M]
    gt_level = gt_level.clamp(level_of_location.min(), level_of_location.max())
    gt_centres = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    best_distance = torch.full((len(centres),), float("inf"), device=centres.device)
    for j in range(len(gt_boxes)):
        on_level = torch.nonzero(level_of_location == gt_level[j]).squeeze(1)
        distance = ((centres[on_level] - gt_centres[j]) / wh[j]).norm(dim=1)
        nearest = distance.argmin()
        location = on_level[nearest]
        if distance[nearest] < best_distance[location]:
            best_distance[location], matched[location] = distance[nearest], j
    return matched


def refine_assign(gt_boxes, boxes, matcher):
    """The refinement's max-IoU assignment for one image -> [A] GT index, -1 background, -2 ignored: IoU >= 0.5
    positive, < 0.4 negative; and every GT keeps its best-overlapping boxes (each to the GT it overlaps most), as
    torchvision's low-quality matches -- but only where that overlap is above 0: from scratch the initial pseudo-boxes
    are points, and a best IoU of 0 would make every location positive."""
    if len(gt_boxes) == 0:
        return torch.full((len(boxes),), -1, dtype=torch.int64, device=boxes.device)
    ious = box_iou(gt_boxes, boxes)                                                          # [M, A]
    matched = matcher(ious)
    best = ious.amax(dim=1, keepdim=True)                                                    # [M, 1]
    low_quality = ((ious == best) & (best > 0)).any(dim=0)                                  # [A]
    matched[low_quality] = ious[:, low_quality].argmax(dim=0)
    return matched


class RepPoints(RetinaNet):
    """torchvision's RetinaNet with RepPoints' head, assignment and losses; anchor_generator: one stride-sized box
    per location (its centre and stride). anchor_scale: the factor detectors.py puts on anchor sizes for small images,
    applied here to the point assigner's base scale."""

    def __init__(self, backbone, num_classes, anchor_generator, head=None, anchor_scale=1.0, **kwargs):
        head = head or RepPointsHead(backbone.out_channels, num_classes)
        super().__init__(backbone, num_classes, anchor_generator=anchor_generator, head=head, **kwargs)
        self.box_coder = PointBoxCoder()
        self.refine_matcher = det_utils.Matcher(REFINE_POS_IOU, REFINE_NEG_IOU)
        self.base_scale = POINT_BASE_SCALE * anchor_scale

    def compute_loss(self, targets, head_outputs, anchors):
        """Focal loss over the refinement's positives and negatives, / #positives; smooth-L1 on the initial and the
        refined pseudo-boxes against their GTs, both / (4 x stride), each / its stage's #positives."""
        loss_cls, loss_init, loss_refine, num_init, num_refine = 0.0, 0.0, 0.0, 0, 0
        for i, (t, a) in enumerate(zip(targets, anchors)):
            gt_boxes, centres = t["boxes"], (a[:, :2] + a[:, 2:]) / 2
            strides = a[:, 2] - a[:, 0]                                                        # [A]
            init_boxes = self.box_coder.decode_single(points_to_boxes(head_outputs["points_init"][i]), a)
            refine_boxes = self.box_coder.decode_single(head_outputs["bbox_regression"][i], a)
            normaliser = (POINT_BASE_SCALE * strides)[:, None]

            matched = point_assign(centres, strides, gt_boxes, self.base_scale)
            positive = matched >= 0
            loss_init = loss_init + self.box_loss(init_boxes[positive], gt_boxes[matched[positive]],
                                                  normaliser[positive])
            num_init += int(positive.sum())

            matched = refine_assign(gt_boxes, init_boxes.detach(), self.refine_matcher)
            positive, valid = matched >= 0, matched != -2
            cls_targets = torch.zeros_like(head_outputs["cls_logits"][i])
            cls_targets[positive, t["labels"][matched[positive]]] = 1.0
            loss_cls = loss_cls + sigmoid_focal_loss(head_outputs["cls_logits"][i][valid], cls_targets[valid],
                                                     reduction="sum")
            loss_refine = loss_refine + self.box_loss(refine_boxes[positive], gt_boxes[matched[positive]],
                                                      normaliser[positive])
            num_refine += int(positive.sum())
        return {"classification": loss_cls / max(1, num_refine),
                "bbox_init": INIT_LOSS_WEIGHT * loss_init / max(1, num_init),
                "bbox_refine": REFINE_LOSS_WEIGHT * loss_refine / max(1, num_refine)}

    @staticmethod
    def box_loss(predicted, target, normaliser):
        return nn.functional.smooth_l1_loss(predicted / normaliser, target / normaliser, beta=SMOOTH_L1_BETA,
                                            reduction="sum")
