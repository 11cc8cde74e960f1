"""ATSS (Zhang et al., "Bridging the Gap Between Anchor-based and Anchor-free Detection via Adaptive Training Sample
Selection", CVPR 2020) in its common RetinaNet-based form, built on torchvision's FCOS: the same backbone + FPN
(P3-P7), GroupNorm towers, focal loss, centerness branch and inference (top-k per level, score threshold, NMS);
what differs is written here:

* one square anchor per location of side 8 x stride (the octave scale 8), regressed as RetinaNet's box deltas;
* the adaptive training sample selection (sec. 3.2, Alg. 1) in place of FCOS's centre sampling and size ranges;
* the GIoU box loss weighted by each positive's centerness target (as the reference implementation), and a
  learnable scale per level on the regression output.

`detectors.build_detector("atss_r50", ...)` builds it like every other family.
"""
import torch
from torch import nn
from torchvision.models.detection import FCOS, _utils as det_utils
from torchvision.models.detection.fcos import FCOSHead, FCOSRegressionHead
from torchvision.ops import box_iou, generalized_box_iou_loss, sigmoid_focal_loss

ANCHOR_OCTAVE_SCALE = 8  # anchor side = 8 x the level's stride (sec. 3.2: one square anchor per location)
TOPK_PER_LEVEL = 9  # candidates per level and GT: the k anchors whose centres are closest to its centre
GIOU_LOSS_WEIGHT = 2.0  # the reference configuration's weight on the box loss
DELTA_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # RetinaNet's box coder: deltas divided by std (0.1, 0.1, 0.2, 0.2)
MIN_INSIDE = 0.01  # a candidate's centre must lie this far inside its GT (pixels)


def atss_assign(anchors, gt_boxes, num_anchors_per_level, topk=TOPK_PER_LEVEL):
    """Alg. 1 for one image -> [A] index of the GT each anchor is assigned to, -1 for background.

    anchors [A, 4] and gt_boxes [M, 4] xyxy pixels; anchors ordered level by level (num_anchors_per_level).
    Per GT: on every level the topk anchors closest (centre to centre, L2) are its candidates; their IoUs' mean +
    std is its threshold; a candidate whose IoU reaches it and whose centre lies inside the GT is positive. An
    anchor positive for several GTs goes to the one it overlaps most.
    """
    A, M = len(anchors), len(gt_boxes)
    if M == 0:
        return torch.full((A,), -1, dtype=torch.int64, device=anchors.device)
    ious = box_iou(anchors, gt_boxes)                                                      # [A, M]
    anchor_centres = (anchors[:, :2] + anchors[:, 2:]) / 2                                # [A, 2]
    gt_centres = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2                                  # [M, 2]
    distances = torch.cdist(anchor_centres, gt_centres)                                   # [A, M]
    candidates, start = [], 0
    for n in num_anchors_per_level:
        k = min(topk, n)
        candidates.append(distances[start:start + n].topk(k, dim=0, largest=False).indices + start)  # [k, M]
        start += n
    candidates = torch.cat(candidates)                                                     # [K, M]
    candidate_ious = ious.gather(0, candidates)                                            # [K, M]
    threshold = candidate_ious.mean(0) + candidate_ious.std(0)                             # [M]
    centres = anchor_centres[candidates]                                                   # [K, M, 2]
    inside = torch.stack([centres[..., 0] - gt_boxes[:, 0], centres[..., 1] - gt_boxes[:, 1],
                          gt_boxes[:, 2] - centres[..., 0], gt_boxes[:, 3] - centres[..., 1]]).amin(0) > MIN_INSIDE
    positive = (candidate_ious >= threshold) & inside                                     # [K, M]
    gt_index = torch.arange(M, device=anchors.device).expand_as(candidates)
    overlap = torch.full_like(ious, -1.0)
    overlap[candidates[positive], gt_index[positive]] = ious[candidates[positive], gt_index[positive]]
    best, matched = overlap.max(dim=1)                                                     # [A]
    matched[best < 0] = -1
    return matched


class DeltaCoder:
    """RetinaNet's box deltas (torchvision's BoxCoder) behind the decode signature of BoxLinearCoder, which FCOS's
    inference calls: [..., 4] deltas against anchors of the same shape."""

    def __init__(self, weights=DELTA_WEIGHTS):
        self.coder = det_utils.BoxCoder(weights)

    def decode(self, deltas, anchors):
        return self.coder.decode_single(deltas.reshape(-1, 4), anchors.reshape(-1, 4)).reshape(anchors.shape)


class ATSSRegressionHead(FCOSRegressionHead):
    """FCOS's regression tower and centerness branch; box deltas are signed (no ReLU) and each level's get a
    learnable scale, as ATSS's head."""

    def __init__(self, in_channels, num_anchors, num_convs=4, num_levels=5):
        super().__init__(in_channels, num_anchors, num_convs)
        self.scales = nn.Parameter(torch.ones(num_levels))

    def forward(self, x):
        regression, centerness = [], []
        for level, features in enumerate(x):
            tower = self.conv(features)
            deltas = self.bbox_reg(tower) * self.scales[level]                       # [N, 4A, H, W]
            ctrness = self.bbox_ctrness(tower)                                      # [N, A, H, W]
            N, _, H, W = deltas.shape
            regression.append(deltas.view(N, -1, 4, H, W).permute(0, 3, 4, 1, 2).reshape(N, -1, 4))
            centerness.append(ctrness.view(N, -1, 1, H, W).permute(0, 3, 4, 1, 2).reshape(N, -1, 1))
        return torch.cat(regression, dim=1), torch.cat(centerness, dim=1)


class ATSSHead(FCOSHead):
    """FCOS's head with ATSS's regression head, box coder and losses."""

    def __init__(self, in_channels, num_anchors, num_classes, num_convs=4):
        super().__init__(in_channels, num_anchors, num_classes, num_convs)
        self.box_coder = DeltaCoder()
        self.regression_head = ATSSRegressionHead(in_channels, num_anchors, num_convs)

    def compute_loss(self, targets, head_outputs, anchors, matched_idxs):
        """Focal loss over all anchors and centerness BCE over positives, each / #positives; GIoU over positives
        weighted by their centerness targets, / the targets' sum."""
        cls_logits = head_outputs["cls_logits"]                                              # [N, A, K]
        deltas = head_outputs["bbox_regression"]                                             # [N, A, 4]
        ctrness = head_outputs["bbox_ctrness"].squeeze(-1)                                   # [N, A]
        anchors = torch.stack(anchors)                                                       # [N, A, 4]
        matched = torch.stack(matched_idxs)                                                  # [N, A]
        foreground = matched >= 0
        gt_boxes = torch.stack([t["boxes"][m.clamp(min=0)] if len(t["boxes"]) else
                                t["boxes"].new_zeros(len(m), 4) for t, m in zip(targets, matched_idxs)])
        gt_labels = torch.stack([t["labels"][m.clamp(min=0)] if len(t["labels"]) else
                                 t["labels"].new_zeros(len(m)) for t, m in zip(targets, matched_idxs)])
        num_foreground = max(1, int(foreground.sum()))

        cls_targets = torch.zeros_like(cls_logits)
        cls_targets[foreground, gt_labels[foreground]] = 1.0
        loss_cls = sigmoid_focal_loss(cls_logits, cls_targets, reduction="sum") / num_foreground

        boxes, anchors_fg = gt_boxes[foreground], anchors[foreground]                        # [P, 4]
        centres = (anchors_fg[:, :2] + anchors_fg[:, 2:]) / 2
        left_right = torch.stack([centres[:, 0] - boxes[:, 0], boxes[:, 2] - centres[:, 0]], -1)
        top_bottom = torch.stack([centres[:, 1] - boxes[:, 1], boxes[:, 3] - centres[:, 1]], -1)
        ctr_targets = torch.sqrt((left_right.amin(-1) / left_right.amax(-1)) *
                                 (top_bottom.amin(-1) / top_bottom.amax(-1)))               # [P]
        predicted = self.box_coder.decode(deltas[foreground].float(), anchors_fg)
        giou = generalized_box_iou_loss(predicted, boxes, reduction="none")                  # [P]
        loss_box = GIOU_LOSS_WEIGHT * (giou * ctr_targets).sum() / ctr_targets.sum().clamp(min=1e-6)
        loss_ctr = nn.functional.binary_cross_entropy_with_logits(ctrness[foreground], ctr_targets,
                                                                  reduction="sum") / num_foreground
        return {"classification": loss_cls, "bbox_regression": loss_box, "bbox_ctrness": loss_ctr}


class ATSS(FCOS):
    """torchvision's FCOS with ATSS's head, box coder and sample selection; anchor_generator: one square anchor of
    side ANCHOR_OCTAVE_SCALE x stride per location (detectors.py scales it for small images)."""

    def __init__(self, backbone, num_classes, anchor_generator, head=None, **kwargs):
        head = head or ATSSHead(backbone.out_channels, anchor_generator.num_anchors_per_location()[0], num_classes)
        super().__init__(backbone, num_classes, anchor_generator=anchor_generator, head=head, **kwargs)
        self.box_coder = head.box_coder  # inference decodes with the model's coder

    def compute_loss(self, targets, head_outputs, anchors, num_anchors_per_level):
        matched = [atss_assign(a, t["boxes"], num_anchors_per_level) for a, t in zip(anchors, targets)]
        return self.head.compute_loss(targets, head_outputs, anchors, matched)
