"""torchvision detectors by name, and the FPN hook that exposes their features to UniKD.

Two things live here:

* `build_detector(name, num_classes, ...)`: RetinaNet, FCOS, ATSS (atss.py, on torchvision's FCOS), RepPoints
  (reppoints.py, on torchvision's RetinaNet), Faster R-CNN and Mask R-CNN on ResNet-18/34/50/101, ResNeXt-101 32x8d,
  ConvNeXt-T/S/B and Swin-T/S/B FPN backbones, built with torchvision's own classes and builders; Deformable DETR
  (deformable_detr.py) on the same backbones, its encoder output standing for the FPN. Size-dependent
  hyper-parameters (anchor sizes, FCOS scale ranges, RPN proposal counts, ROI samples) are scaled for small
  inputs, and every family gets the same image transform, so a teacher and a student see the same tensor.
* `forward_with_features(model, images, targets)`: runs torchvision's forward unchanged and, through forward
  hooks on the model's own `transform` and `backbone`, also returns the 4 FPN levels at strides 8/16/32/64 that
  AKE reads (README, "Design notes: Feature levels"), whatever levels the family itself uses.
"""
import math
import os
from collections import OrderedDict
from functools import partial
from typing import NamedTuple, Optional

import torch
import torchvision
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present
from torchvision.models.detection import (
    FasterRCNN, FCOS, MaskRCNN, RetinaNet,
    FasterRCNN_ResNet50_FPN_V2_Weights, FasterRCNN_ResNet50_FPN_Weights, FCOS_ResNet50_FPN_Weights,
    MaskRCNN_ResNet50_FPN_V2_Weights, MaskRCNN_ResNet50_FPN_Weights,
    RetinaNet_ResNet50_FPN_V2_Weights, RetinaNet_ResNet50_FPN_Weights,
)
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import misc as misc_nn_ops
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7

from atss import ANCHOR_OCTAVE_SCALE, ATSS
from deformable_detr import DeformableDETR, DeformableEncoder, set_loss_targets
from reppoints import RepPoints

FAMILIES = ("retinanet", "fcos", "atss", "reppoints", "faster_rcnn", "mask_rcnn", "deformable_detr")
ONE_STAGE = ("retinanet", "fcos", "atss", "reppoints")  # P3-P7 from C3-C5; the R-CNNs read P2-P6
BACKBONES = {"r18": "resnet18", "r34": "resnet34", "r50": "resnet50", "r101": "resnet101", "x101": "resnext101_32x8d",
             "convnext_t": "convnext_tiny", "convnext_s": "convnext_small", "convnext_b": "convnext_base",
             "swin_t": "swin_t", "swin_s": "swin_s", "swin_b": "swin_b"}
# ConvNeXt and Swin (the paper's Table 5): LayerNorm backbones, trained with AdamW (train.py picks it for them)
STAGE_BACKBONES = ("convnext_tiny", "convnext_small", "convnext_base", "swin_t", "swin_s", "swin_b")
# their `features` Sequential: stem / patch embedding, then stage 1 .. 4 at indices 1, 3, 5, 7 (strides 4 .. 32),
# each but the first behind a downsampling layer
STAGE_INDICES = {4: 1, 8: 3, 16: 5, 32: 7}
# torchvision's v2 recipes: RetinaNet v2 (GroupNorm head, GIoU box loss, P6 from C5) for every backbone here; the
# R-CNN v2s (R50 only) as torchvision builds them.
V2_NAMES = tuple(f"retinanet_{backbone}_v2" for backbone in BACKBONES) + ("faster_rcnn_r50_v2", "mask_rcnn_r50_v2")
# Deformable DETR's variants of its paper's Table 1: "+ iterative bounding box refinement" and "++ two-stage" (both)
DETR_VARIANTS = {"refine": dict(box_refine=True), "two_stage": dict(box_refine=True, two_stage=True)}
VARIANT_NAMES = V2_NAMES + tuple(f"deformable_detr_{backbone}_{variant}" for backbone in BACKBONES
                                 for variant in DETR_VARIANTS)
MODEL_NAMES = [f"{family}_{backbone}" for family in FAMILIES for backbone in BACKBONES] + list(VARIANT_NAMES)
VARIANT_SUFFIXES = ("_v2",) + tuple("_" + variant for variant in DETR_VARIANTS)

# The R50 models torchvision ships a builder (and COCO weights) for; the others are assembled from the same parts.
TORCHVISION_BUILDERS = {
    "retinanet_r50": (torchvision.models.detection.retinanet_resnet50_fpn, RetinaNet_ResNet50_FPN_Weights),
    "retinanet_r50_v2": (torchvision.models.detection.retinanet_resnet50_fpn_v2, RetinaNet_ResNet50_FPN_V2_Weights),
    "fcos_r50": (torchvision.models.detection.fcos_resnet50_fpn, FCOS_ResNet50_FPN_Weights),
    "faster_rcnn_r50": (torchvision.models.detection.fasterrcnn_resnet50_fpn, FasterRCNN_ResNet50_FPN_Weights),
    "faster_rcnn_r50_v2": (torchvision.models.detection.fasterrcnn_resnet50_fpn_v2,
                           FasterRCNN_ResNet50_FPN_V2_Weights),
    "mask_rcnn_r50": (torchvision.models.detection.maskrcnn_resnet50_fpn, MaskRCNN_ResNet50_FPN_Weights),
    "mask_rcnn_r50_v2": (torchvision.models.detection.maskrcnn_resnet50_fpn_v2, MaskRCNN_ResNet50_FPN_V2_Weights),
}
COCO_NUM_CLASSES = 91  # torchvision's COCO heads: 90 category ids + background

# One image transform for every family (README, "Feature levels": teacher and student see the same batched tensor).
# size_divisible=64 (torchvision: 32) pads to a multiple of the coarsest level AKE reads, so every level used
# has exactly H_pad/stride cells and a normalised coordinate maps to the same cell in every detector.
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
TRANSFORM_DEFAULTS = dict(min_size=800, max_size=1333, size_divisible=64, image_mean=IMAGENET_MEAN,
                          image_std=IMAGENET_STD)
AKE_STRIDES = (8, 16, 32, 64)

# torchvision's size hyper-parameters are tuned for COCO at 800 px. Below that, anchor sizes (and FCOS's
# ranges) are scaled by min_size / 800 but not below 1/2: smaller anchors no longer overlap on their level's
# grid (anchor/stride would drop below 2; torchvision's is 4) and objects between two anchors match neither
# (the coverage counts behind the 1/2 are in RESULTS.md). Proposal counts only need to follow the image area, so
# they shrink further (floor 1/4).
REFERENCE_MIN_SIZE = 800
MIN_ANCHOR_SCALE = 0.5
MIN_PROPOSAL_SCALE = 0.25


class CheckpointError(ValueError):
    """A checkpoint path that does not exist, is not a detector checkpoint, or does not fit the model."""


class FPNOutput(NamedTuple):
    result: object  # losses dict (train mode) or list of detections (eval mode), as model(images, targets); or None
    features: list  # 4 tensors [B, 256, H_l, W_l] at strides 8, 16, 32, 64, in that order
    padded_hw: tuple  # (H_pad, W_pad) of the batched image tensor; normalised boxes are relative to it
    image_sizes: list  # (h, w) of each image after resize, before padding
    targets: Optional[list]  # transformed targets (boxes in pixels of the batched tensor), or None


def canonical_name(name: str) -> str:
    """'retinanet' -> 'retinanet_r50', 'retinanet_v2' -> 'retinanet_r50_v2', 'deformable_detr_two_stage' ->
    'deformable_detr_r50_two_stage'; unknown -> ValueError naming all."""
    key = str(name).strip().lower()
    suffix = next((s for s in VARIANT_SUFFIXES if key.endswith(s)), "")
    if key in FAMILIES:
        key += "_r50"
    elif suffix and key.removesuffix(suffix) in FAMILIES:
        key = key.removesuffix(suffix) + "_r50" + suffix
    if key not in MODEL_NAMES:
        raise ValueError(f"unknown model '{name}'; valid names: {', '.join(MODEL_NAMES)} "
                         f"(a bare family name means _r50)")
    return key


def backbone_arch(name: str) -> str:
    """'retinanet_r18_v2' -> 'resnet18', 'mask_rcnn_swin_t' -> 'swin_t': the torchvision name of the backbone."""
    name = canonical_name(name)
    backbone = name[len(family_of(name)) + 1:]
    return BACKBONES[next((backbone.removesuffix(s) for s in VARIANT_SUFFIXES if backbone.endswith(s)), backbone)]


def variant_of(name: str) -> str:
    """'deformable_detr_r18_two_stage' -> 'two_stage', '' for a model without a Deformable DETR variant."""
    name = canonical_name(name)
    return next((v for v in DETR_VARIANTS if family_of(name) == "deformable_detr" and name.endswith("_" + v)), "")


def optimizer_of(name: str) -> str:
    """The optimizer of the detector's own recipe: "detr" (Deformable DETR's AdamW with its per-part lrs), "adamw"
    (ConvNeXt and Swin detectors, as their papers train them) or "sgd"."""
    if family_of(name) == "deformable_detr":
        return "detr"
    return "adamw" if backbone_arch(name) in STAGE_BACKBONES else "sgd"


def family_of(name: str) -> str:
    name = canonical_name(name)
    return next(f for f in FAMILIES if name.startswith(f + "_"))


def _eval_min_size(min_size):
    return min_size[-1] if isinstance(min_size, (tuple, list)) else min_size  # torchvision evaluates at [-1]


def anchor_scale(min_size) -> float:
    """Factor on torchvision's anchor sizes (and FCOS's size ranges): min_size / 800 clipped to [1/2, 1]."""
    return min(1.0, max(MIN_ANCHOR_SCALE, _eval_min_size(min_size) / REFERENCE_MIN_SIZE))


def proposal_scale(min_size) -> float:
    """Factor on R-CNN proposal counts and sampled ROIs: min_size / 800 clipped to [1/4, 1]."""
    return min(1.0, max(MIN_PROPOSAL_SCALE, _eval_min_size(min_size) / REFERENCE_MIN_SIZE))


def build_detector(name: str, num_classes: int, weights=None, weights_backbone=None, **kwargs) -> nn.Module:
    """A torchvision detector by name (see MODEL_NAMES). num_classes includes background (labels are 1..K).

    weights: None (random init), "DEFAULT"/"COCO_V1"/a torchvision weights name for torchvision's COCO weights
        (R50 models only), or the path of our own checkpoint (a state dict, or a dict holding one under "model").
        With COCO weights and num_classes != 91, the COCO model is loaded and its class-dependent layers
        (RetinaNet/FCOS cls_logits, R-CNN box predictor and mask predictor) are replaced by freshly initialised
        ones for num_classes, as a fine-tune would; everything else keeps the COCO weights.
    weights_backbone: ImageNet weights for the ResNet ("DEFAULT" or a torchvision enum name such as
        "IMAGENET1K_V1"); ignored when weights is given.
    kwargs: passed to torchvision's class (min_size, max_size, score_thresh, trainable_backbone_layers, ...).
        Defaults here: min_size 800, max_size 1333, size_divisible 64, ImageNet mean/std for every family; below
        800 px the anchor sizes and FCOS ranges (anchor_scale) and R-CNN proposal counts (proposal_scale) are
        scaled; explicit kwargs (anchor_generator, rpn_anchor_generator, rpn_*_top_n_*,
        box_batch_size_per_image, ...) win.
    A checkpoint trained with a frozen-BN (ImageNet) backbone loads too: its BN statistics fill BatchNorm2d
    layers, identical in eval mode.
    """
    name = canonical_name(name)
    family = family_of(name)
    checkpoint = weights if _is_checkpoint_path(weights) else None
    coco_weights = None if checkpoint is not None else _coco_weights(name, weights)
    backbone_weights = None if weights is not None else _backbone_weights(name, weights_backbone)

    kwargs = {**TRANSFORM_DEFAULTS, **kwargs}
    if family == "deformable_detr":
        kwargs = {**DETR_VARIANTS.get(variant_of(name), {}), **kwargs}
        model = _build_deformable_detr(backbone_arch(name), num_classes, backbone_weights, kwargs)
    else:
        model = _build_torchvision_family(name, family, num_classes, coco_weights, backbone_weights, kwargs)
    if family == "fcos" and weights is None and weights_backbone is None:
        _start_fcos_boxes_with_an_area(model)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    model.unikd_name = name
    return model


def _build_torchvision_family(name, family, num_classes, coco_weights, backbone_weights, kwargs):
    """The anchor- and FPN-based families: torchvision's builder where it has one, else from parts; anchors and
    proposal counts scaled for small images; COCO weights' class layers swapped for num_classes."""
    scale = anchor_scale(kwargs["min_size"])
    anchor_generator = kwargs.pop("anchor_generator", None)  # RetinaNet/FCOS name
    anchor_generator = kwargs.pop("rpn_anchor_generator", None) or anchor_generator  # R-CNN name
    anchor_generator = anchor_generator or _scaled_anchor_generator(family, scale)
    kwargs = {**_small_image_kwargs(family, scale, proposal_scale(kwargs["min_size"])), **kwargs}

    if name in TORCHVISION_BUILDERS:
        builder = TORCHVISION_BUILDERS[name][0]
        model = builder(weights=coco_weights, weights_backbone=backbone_weights,
                        num_classes=None if coco_weights is not None else num_classes, **kwargs)
        _swap_anchor_generator(model, family, name, anchor_generator)
        if type(model.backbone.fpn.extra_blocks) is LastLevelP6P7:
            model.backbone.fpn.extra_blocks.__class__ = P6P7  # the same parameters; fp32 under CPU autocast
    else:
        model = _build_from_parts(family, backbone_arch(name), num_classes, backbone_weights, kwargs,
                                  anchor_generator, v2=name.endswith("_v2"))

    if coco_weights is not None and num_classes != COCO_NUM_CLASSES:
        _replace_class_layers(model, family, num_classes)
    return model


def _build_from_parts(family, arch, num_classes, backbone_weights, kwargs, anchor_generator, v2=False):
    """Same recipe as torchvision's *_resnet50_fpn builders (RetinaNet: *_v2 with v2), for the other ResNets;
    the heads are sized for anchor_generator's anchors per location."""
    kwargs = dict(kwargs)
    kwargs["anchor_generator" if family in ONE_STAGE else "rpn_anchor_generator"] = anchor_generator
    pretrained = backbone_weights is not None
    trainable = kwargs.pop("trainable_backbone_layers", None)
    trainable = (3 if pretrained else 5) if trainable is None else trainable
    # Frozen BN only makes sense with pretrained statistics; from scratch, BN must learn them.
    norm_layer = misc_nn_ops.FrozenBatchNorm2d if pretrained else nn.BatchNorm2d
    if arch in STAGE_BACKBONES:
        strides = (8, 16, 32) if family in ONE_STAGE else (4, 8, 16, 32)
        backbone = StageBackboneFPN(arch, backbone_weights, strides, one_stage_extra=family in ONE_STAGE,
                                    p6_from_c5=v2)
    elif family in ONE_STAGE:
        # C3-C5 -> P3-P5, P6/P7 from P5 (RetinaNet/FCOS papers skip P2: too many anchors); RetinaNet v2: from C5
        c5 = 512 if arch in ("resnet18", "resnet34") else 2048
        backbone = resnet_fpn_backbone(backbone_name=arch, weights=backbone_weights, norm_layer=norm_layer,
                                       trainable_layers=trainable, returned_layers=[2, 3, 4],
                                       extra_blocks=P6P7(c5 if v2 else 256, 256))
    else:
        # C2-C5 -> P2-P5, 'pool' = P6 by max-pooling P5 (LastLevelMaxPool)
        backbone = resnet_fpn_backbone(backbone_name=arch, weights=backbone_weights, norm_layer=norm_layer,
                                       trainable_layers=trainable)
    if v2:  # only RetinaNet reaches here with v2 (the R-CNN v2s are torchvision's R50 builders)
        # GroupNorm in the head's towers keeps their activations at unit scale: without it, four std-0.01 convs
        # shrink the FPN signal ~70x at init and a from-scratch head's loss stays at the focal-loss prior for
        # a long time (RESULTS.md); FCOS's head has GroupNorm too.
        head = RetinaNetHead(backbone.out_channels, anchor_generator.num_anchors_per_location()[0], num_classes,
                             norm_layer=partial(nn.GroupNorm, 32))
        head.regression_head._loss_type = "giou"
        kwargs["head"] = head
    cls = {"retinanet": RetinaNet, "fcos": FCOS, "atss": ATSS, "reppoints": RepPoints, "faster_rcnn": FasterRCNN,
           "mask_rcnn": MaskRCNN}[family]
    return cls(backbone, num_classes=num_classes, **kwargs)


def _build_deformable_detr(arch, num_classes, backbone_weights, kwargs):
    """Deformable DETR on C3-C5 of a torchvision classification backbone (channels read off its blocks or, for
    ConvNeXt/Swin, a forward pass, so every backbone here works). With ImageNet weights a ResNet's stem and first
    stage stay frozen and its BatchNorm is frozen, as DETR trains its ResNet; from scratch everything trains."""
    frozen_bn = backbone_weights is not None and arch not in STAGE_BACKBONES
    classifier = torchvision.models.get_model(arch, weights=backbone_weights,
                                              **({"norm_layer": misc_nn_ops.FrozenBatchNorm2d} if frozen_bn else {}))
    if arch in STAGE_BACKBONES:
        keep = [STAGE_INDICES[s] for s in (8, 16, 32)]
        channels_last = arch.startswith("swin")
        channels = StageBackboneFPN.stage_channels(classifier.features, keep, channels_last)
        body = StageFeatures(classifier.features, keep, channels, channels_last)
    else:
        body = torchvision.models._utils.IntermediateLayerGetter(classifier, {"layer2": "0", "layer3": "1",
                                                                                "layer4": "2"})
        channels = [getattr(classifier, f"layer{i}")[-1].conv1.in_channels for i in (2, 3, 4)]
        if backbone_weights is not None:
            for name, p in body.named_parameters():
                p.requires_grad_(name.startswith(("layer2", "layer3", "layer4")))
    layer = {k: kwargs[k] for k in ("dim_ffn", "dropout", "n_points") if k in kwargs}  # encoder's and decoder's
    encoder = DeformableEncoder(body, channels, num_layers=kwargs.pop("num_encoder_layers", 6), **layer)
    return DeformableDETR(encoder, num_classes, **kwargs)


class StageFeatures(nn.Module):
    """The stage outputs of a ConvNeXt or Swin `features` Sequential -> OrderedDict '0', '1', ... of [B, C, h, w]
    maps, each through its own LayerNorm over channels, as the Swin and ConvNeXt detection backbones add (the
    classifier's final norm sees only the last stage). Swin's stages are channels-last, ConvNeXt's channels-first."""

    def __init__(self, stages: nn.Sequential, keep, channels, channels_last: bool):
        super().__init__()
        self.stages = stages[:max(keep) + 1]
        self.keep, self.channels_last = tuple(keep), channels_last
        self.norms = nn.ModuleList(nn.LayerNorm(c, eps=1e-6) for c in channels)

    def forward(self, x):
        out = OrderedDict()
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.keep:
                k = len(out)
                nhwc = x if self.channels_last else x.permute(0, 2, 3, 1)
                out[str(k)] = self.norms[k](nhwc).permute(0, 3, 1, 2).contiguous()
        return out


class P6P7(LastLevelP6P7):
    """torchvision's P6/P7 (stride-2 3x3 convolutions), computed in fp32 under CPU autocast: oneDNN's bf16 weight
    gradient of a stride-2 convolution over a map one pixel wide is NaN/Inf, and P6 is such a map for images 64 px
    wide. These maps are the smallest of the pyramid, so fp32 is cheap there."""

    def forward(self, p, c, names):
        if not torch.is_autocast_enabled("cpu"):
            return super().forward(p, c, names)
        with torch.autocast("cpu", enabled=False):
            return super().forward([x.float() for x in p], [x.float() for x in c], names)


class StageBackboneFPN(nn.Module):
    """torchvision's ConvNeXt / Swin classification model (ImageNet weights optional), its stages at `strides`, and
    torchvision's FeaturePyramidNetwork on top with the family's extra levels: P6/P7 for one-stage families (from P5,
    or from C5 with p6_from_c5 as RetinaNet v2), P6 by max-pooling for the R-CNNs. The interface of torchvision's
    BackboneWithFPN (body, fpn, out_channels). Swin pads each stage to whole windows itself, and size_divisible=64
    makes every stage's map exactly H/stride x W/stride, so any input size works."""

    def __init__(self, arch, weights, strides, one_stage_extra: bool, p6_from_c5=False, out_channels=256):
        super().__init__()
        classifier = torchvision.models.get_model(arch, weights=weights)
        keep = [STAGE_INDICES[s] for s in strides]
        channels_last = arch.startswith("swin")
        channels = self.stage_channels(classifier.features, keep, channels_last)
        if one_stage_extra:
            extra = P6P7(channels[-1] if p6_from_c5 else out_channels, out_channels)
        else:
            extra = LastLevelMaxPool()
        self.body = StageFeatures(classifier.features, keep, channels, channels_last)
        self.fpn = FeaturePyramidNetwork(channels, out_channels, extra_blocks=extra)
        self.out_channels = out_channels

    @staticmethod
    @torch.no_grad()
    def stage_channels(stages, keep, channels_last):
        """The channel count of each kept stage, read off one small forward pass."""
        x, channels = torch.zeros(1, 3, 64, 64), []
        was_training = stages.training
        stages.eval()
        for i, stage in enumerate(stages[:max(keep) + 1]):
            x = stage(x)
            if i in keep:
                channels.append(x.shape[-1] if channels_last else x.shape[1])
        stages.train(was_training)
        return channels

    def forward(self, x):
        return self.fpn(self.body(x))


def _start_fcos_boxes_with_an_area(model):
    """FCOS predicts each box as ReLU'd distances to its four sides. From scratch (no pretrained backbone) the head's
    random features put most of those outputs below zero, so at most positives both distances of a side pair are 0:
    the box has no area, it lies inside its GT, and the GIoU loss has zero gradient there -- the regression branch
    never starts (its loss stays at exactly 1). A bias of 1 starts every box one anchor size away from its
    location on each side, where GIoU has a gradient."""
    nn.init.constant_(model.head.regression_head.bbox_reg.bias, 1.0)


def _small_image_kwargs(family, scale, proposals):
    """Size-dependent settings for the family's constructor; torchvision's defaults at scale 1."""
    if family == "fcos":
        # FCOS derives both its per-level size ranges ([4, 8] x anchor size) and its centre-sampling radius
        # (radius x anchor size) from the anchor sizes. The anchors are scaled to move objects to finer levels;
        # the radius is divided by the same factor so that it stays 1.5 strides in pixels.
        return {"center_sampling_radius": 1.5 / scale}
    if family == "reppoints":
        return {"anchor_scale": scale}  # the point assigner's level choice follows the other families' anchors
    if family in ("faster_rcnn", "mask_rcnn"):
        # Fewer proposals and sampled ROIs: a 128 px image has ~6k anchors and <= 10 objects, and the ROI
        # head's cost is linear in the sampled ROIs.
        return {"rpn_pre_nms_top_n_train": round(2000 * proposals),
                "rpn_post_nms_top_n_train": round(2000 * proposals),
                "rpn_pre_nms_top_n_test": round(1000 * proposals), "rpn_post_nms_top_n_test": round(1000 * proposals),
                "box_batch_size_per_image": round(512 * proposals)}
    return {}


def _swap_anchor_generator(model, family, name, anchor_generator):
    """Put anchor_generator in place of the one torchvision's builder made (the _v2 builders take none). The
    builder's head is sized for its own anchor count per location: another count -> ValueError."""
    one_stage = family in ONE_STAGE
    expected = model.head.classification_head.num_anchors if one_stage else model.rpn.head.cls_logits.out_channels
    given = anchor_generator.num_anchors_per_location()[0]
    if given != expected:
        raise ValueError(f"{name}: torchvision's builder sizes the head for {expected} anchors per location, the "
                         f"anchor generator has {given}; keep {expected} (sizes x aspect ratios per level)")
    if one_stage:
        model.anchor_generator = anchor_generator
    else:
        model.rpn.anchor_generator = anchor_generator


def _scaled_anchor_generator(family, scale):
    """torchvision's anchor generator for the family with every anchor size multiplied by scale."""
    if family == "fcos":
        # one anchor point per location; its 'size' is the level's stride at scale 1
        sizes = tuple((8 * 2 ** i * scale,) for i in range(5))
        return AnchorGenerator(sizes, ((1.0,),) * 5)
    if family == "reppoints":
        # a location's stride-sized box: its centre and stride (the point assigner takes the scale instead)
        return AnchorGenerator(tuple((8 * 2 ** i,) for i in range(5)), ((1.0,),) * 5)
    if family == "atss":
        # one square anchor per location, 8 x the level's stride at scale 1
        sizes = tuple((ANCHOR_OCTAVE_SCALE * 8 * 2 ** i * scale,) for i in range(5))
        return AnchorGenerator(sizes, ((1.0,),) * 5)
    if family == "retinanet":
        # 3 octave scales 2^{0, 1/3, 2/3} of 32..512 on P3..P7, rounded as torchvision rounds them
        sizes = tuple(tuple(int(base * 2 ** (k / 3)) * scale for k in range(3)) for base in (32, 64, 128, 256, 512))
        return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5)
    # RPN: one size per level, 32..512 on P2..P6
    sizes = tuple((base * scale,) for base in (32, 64, 128, 256, 512))
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5)


def _replace_class_layers(model, family, num_classes):
    """Swap the layers whose shape depends on the class count for fresh ones (fine-tuning COCO weights)."""
    if family in ONE_STAGE:
        head = model.head.classification_head
        old = head.cls_logits
        new = nn.Conv2d(old.in_channels, head.num_anchors * num_classes, kernel_size=3, padding=1)
        # same init as torchvision's heads: focal-loss prior p = 0.01 so early training is not swamped by
        # background (RetinaNet paper Sec. 4.1)
        nn.init.normal_(new.weight, std=0.01)
        nn.init.constant_(new.bias, -math.log((1 - 0.01) / 0.01))
        head.cls_logits = new
        head.num_classes = num_classes
        return
    box_predictor = model.roi_heads.box_predictor
    model.roi_heads.box_predictor = FastRCNNPredictor(box_predictor.cls_score.in_features, num_classes)
    if family == "mask_rcnn":
        mask_predictor = model.roi_heads.mask_predictor
        model.roi_heads.mask_predictor = MaskRCNNPredictor(mask_predictor.conv5_mask.in_channels,
                                                           mask_predictor.conv5_mask.out_channels, num_classes)


def _is_checkpoint_path(weights) -> bool:
    if weights is None:
        return False
    if isinstance(weights, os.PathLike):
        return True
    text = str(weights)
    return os.path.exists(text) or os.sep in text or text.endswith((".pth", ".pt", ".ckpt", ".bin"))


def _coco_weights(name, weights):
    if weights is None:
        return None
    if name not in TORCHVISION_BUILDERS:
        raise ValueError(f"torchvision has no COCO weights for {name}; weights='DEFAULT' works for "
                         f"{', '.join(TORCHVISION_BUILDERS)}, other models take a checkpoint path")
    enum = TORCHVISION_BUILDERS[name][1]
    try:
        return enum.verify(weights)
    except (KeyError, ValueError, TypeError):
        valid = ", ".join(["DEFAULT"] + [w.name for w in enum])
        raise ValueError(f"unknown weights '{weights}' for {name}; use one of {valid} or a checkpoint path") from None


def _backbone_weights(name, weights_backbone):
    if weights_backbone is None:
        return None
    arch = backbone_arch(name)
    enum = torchvision.models.get_model_weights(arch)
    try:
        return enum.verify(weights_backbone)
    except (KeyError, ValueError, TypeError):
        valid = ", ".join(["DEFAULT"] + [w.name for w in enum])
        raise ValueError(f"unknown backbone weights '{weights_backbone}' for {arch}; use one of {valid}") from None


def load_checkpoint(model: nn.Module, path) -> None:
    """Load our own checkpoint into model: a state dict, or a dict with the state dict under "model".

    Raises CheckpointError (a ValueError) naming the file when it is missing, unreadable or does not fit.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        # weights_only: never unpickle arbitrary objects from a file a user points us at
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for garbage / non-weights pickles
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__})") from None
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{path} holds no model state dict")
    state = dict(state)
    consume_prefix_in_state_dict_if_present(state, "module.")  # saved from DDP
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = " ".join(line.strip() for line in first[1:3]) if len(first) > 1 else first[0]
        raise CheckpointError(f"{path} does not fit this model ({detail[:300]})") from None


def fpn_channels(model: nn.Module) -> int:
    return _unwrap(model).backbone.out_channels


def transform_config(model: nn.Module) -> dict:
    """Everything that decides the batched image tensor; equal dicts mean equal tensors for equal inputs."""
    t = _unwrap(model).transform
    return {"min_size": tuple(t.min_size), "max_size": t.max_size, "size_divisible": t.size_divisible,
            "image_mean": list(t.image_mean), "image_std": list(t.image_std), "fixed_size": t.fixed_size}


def forward_with_features(model: nn.Module, images, targets=None) -> FPNOutput:
    """model(images, targets), unchanged, plus the FPN levels at strides 8/16/32/64 read via forward hooks.

    model may be wrapped in DistributedDataParallel: the hooks go on the wrapped model's modules and the call
    goes through the wrapper, so gradient synchronisation is untouched.
    """
    net = _unwrap(model)
    seen = {}
    hooks = [net.transform.register_forward_hook(lambda m, args, out: seen.__setitem__("transform", out)),
             net.backbone.register_forward_hook(lambda m, args, out: seen.__setitem__("backbone", out))]
    try:
        result = model(images, targets)
    finally:
        for hook in hooks:
            hook.remove()
    image_list, transformed_targets = seen["transform"]
    return _fpn_output(result, image_list, seen["backbone"], transformed_targets)


def forward_features(model: nn.Module, images, targets=None) -> FPNOutput:
    """Transform + backbone/FPN only (no heads, no losses): for frozen teachers. result is None."""
    net = _unwrap(model)
    image_list, transformed_targets = net.transform(images, targets)
    features = net.backbone(image_list.tensors)
    return _fpn_output(None, image_list, features, transformed_targets)


def _fpn_output(result, image_list, features: dict, targets) -> FPNOutput:
    h_pad, w_pad = image_list.tensors.shape[-2:]
    return FPNOutput(result, levels_by_stride(features, (h_pad, w_pad)), (int(h_pad), int(w_pad)),
                     [tuple(int(v) for v in s) for s in image_list.image_sizes], targets)


def levels_by_stride(features: dict, padded_hw, strides=AKE_STRIDES) -> list:
    """Pick from the FPN's OrderedDict the levels whose stride (batched size / feature size) is in strides.

    RetinaNet/FCOS/ATSS/RepPoints name their levels '0'-'2','p6','p7' for P3-P7, R-CNNs '0'-'3','pool' for P2-P6,
    Deformable DETR '0'-'3' for its encoder's strides 8-64: only the stride
    identifies a level across families. With padding to a multiple of 64 the ratio is exact; otherwise the
    coarsest levels round up (e.g. 160 px -> 3 cells at stride 64) and log2 is rounded. The first level with a
    given stride wins (a tiny input can make P6 and P7 both 1 cell).
    """
    h_pad, w_pad = padded_hw
    by_stride = {}
    for feature in features.values():
        h, w = feature.shape[-2:]
        stride = 2 ** round(math.log2(math.sqrt(h_pad * w_pad / (h * w))))
        by_stride.setdefault(stride, feature)
    missing = [s for s in strides if s not in by_stride]
    if missing:
        raise ValueError(f"FPN has no level at stride(s) {missing} for a {h_pad}x{w_pad} batch "
                         f"(levels: {sorted(by_stride)})")
    return [by_stride[s] for s in strides]


def _unwrap(model):
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def normalized_targets(fpn_out):
    """Transformed targets -> AKE targets: contiguous labels 0..K-1, boxes cxcywh / batched tensor size."""
    return set_loss_targets(fpn_out.targets, fpn_out.padded_hw)
