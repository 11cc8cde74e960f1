"""COCO evaluation of a trained detector, and the pictures of the paper's figures.

    python eval.py --ckpt runs/distill_fcos_r18/model.pth                  # embedded data; the model name is read
    python eval.py --model fcos_r18 --ckpt runs/distill_fcos_r18/student.pth  # a bare state dict needs --model
    python eval.py --ckpt model.pth --data-path /data/coco --visualize 8 --out vis/
    python eval.py --ckpt teacher/model.pth --sampling ake.pth --out vis/                   # Fig. 4
    python eval.py --ckpt teacher/model.pth --density fcos_r18=a.pth ... --out vis/         # Fig. 1
    python eval.py --model fcos_r18 --ckpt none.pth --compare fcos_r18=unikd.pth --out vis/  # with vs without

* `evaluate(model, loader, device)`: pycocotools COCOeval (bbox, plus segm for Mask R-CNN), gathered to rank 0
  under torch.distributed.
"""
import contextlib
import io
import math
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as nnf
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.io import write_png
from torchvision.ops import box_convert, clip_boxes_to_image
from torchvision.utils import draw_bounding_boxes

import detectors
import unikd
from data import (DATA_FLAGS, add_data_args, base_dataset, build_dataset, build_loader, categories_of,
                  category_difference, data_flag_defaults, targets_to)
from utils import (AKE_FILE_KIND, CHECKPOINT_KIND, ArgumentParser, UserError, atomic_write_json, canonical_model_name,
                   exit_on_user_error, explicit_flags, frozen_unikd, load_ake_file, load_user_file)

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
DATA_CHOICE = tuple(k for k in data_flag_defaults() if k not in ("min_size", "max_size"))  # flags naming the data


# ---------------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model, loader, device, verbose: bool = False) -> dict:
    """COCO AP of model on loader's images: {AP, AP50, AP75, APs, APm, APl} (+ segm_* when the model predicts
    masks). Under torch.distributed every rank predicts its shard; rank 0 gathers and scores, others get {}."""
    dataset = base_dataset(loader.dataset)
    was_training = model.training
    model.eval()
    boxes, segms = {}, {}
    for images, targets in loader:
        outputs = model([image.to(device) for image in images])
        for image, output, target in zip(images, outputs, targets):
            image_id = target["image_id"]
            boxes[image_id], segm = coco_results(output, target, tuple(image.shape[-2:]), dataset.label_to_cat)
            if segm is not None:
                segms[image_id] = segm
    model.train(was_training)

    if dist.is_available() and dist.is_initialized():
        # the samplers pad every rank's share with repeated images: keyed by image id, duplicates collapse
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (boxes, segms))
        if dist.get_rank() != 0:
            return {}
        for rank_boxes, rank_segms in gathered:
            boxes.update(rank_boxes)
            segms.update(rank_segms)

    image_ids = sorted(boxes)
    metrics = coco_metrics(dataset.coco, [d for i in image_ids for d in boxes[i]], image_ids, "bbox", verbose)
    if segms:
        segm = coco_metrics(dataset.coco, [d for i in image_ids for d in segms.get(i, [])], image_ids, "segm",
                            verbose)
        metrics.update({f"segm_{k}": v for k, v in segm.items()})
    return metrics


class AKEDetector(torch.nn.Module):
    """Teacher backbone+FPN -> content AKE -> DETR-style boxes, in torchvision's output format, for COCOeval."""

    def __init__(self, teacher, ake_model):
        super().__init__()
        self.teacher, self.unikd = teacher, ake_model

    def train(self, mode=True):  # evaluate() restores train mode afterwards: the frozen teacher stays in eval
        super().train(mode)
        self.teacher.eval()
        return self

    @torch.no_grad()
    def forward(self, images, targets=None):
        out = detectors.forward_features(self.teacher, images)
        z_logits, z_boxes = self.unikd.content_predictions(out.features)
        h, w = out.padded_hw
        sizes = [(h, w)] * len(images)
        dets = unikd.postprocess(z_logits, z_boxes, sizes)
        for det, (ih, iw), im in zip(dets, out.image_sizes, images):
            # boxes: pixels of the batched tensor -> clipped to the resized image -> the input image's pixels
            sx, sy = im.shape[-1] / iw, im.shape[-2] / ih
            det["boxes"] = clip_boxes_to_image(det["boxes"], (ih, iw)) * det["boxes"].new_tensor([sx, sy, sx, sy])
            det["labels"] = det["labels"] + 1  # AKE classes 0..K-1 -> dataset labels 1..K
        return dets


def coco_results(output, target, input_hw, label_to_cat):
    """One image's detections as COCO result dicts in the file's pixel coordinates: (boxes, masks or None)."""
    h0, w0 = target["orig_size"]
    sy, sx = h0 / input_hw[0], w0 / input_hw[1]  # the model saw the resized image
    # label 0 is background: R-CNNs never predict it, but RetinaNet/FCOS keep a (never positive) logit for it
    keep = (output["labels"] > 0).cpu()
    boxes = output["boxes"].float().cpu()[keep] * torch.tensor([sx, sy, sx, sy])
    xywh = box_convert(boxes, "xyxy", "xywh").tolist()
    scores, labels = output["scores"].cpu()[keep].tolist(), output["labels"].cpu()[keep].tolist()
    box_results = [{"image_id": target["image_id"], "category_id": label_to_cat[label], "bbox": box,
                    "score": score} for box, label, score in zip(xywh, labels, scores)]
    if "masks" not in output:
        return box_results, None
    masks = output["masks"].float().cpu()[keep]  # [N, 1, h, w] probabilities
    if len(masks):
        masks = nnf.interpolate(masks, size=(h0, w0), mode="bilinear", align_corners=False)
    binary = (masks[:, 0] > 0.5).numpy().astype(np.uint8)  # [N, h0, w0]
    rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0))) if len(binary) else []
    segm_results = []
    for rle, label, score in zip(rles, labels, scores):
        rle["counts"] = rle["counts"].decode("ascii")  # JSON-serialisable, as COCO result files store it
        segm_results.append({"image_id": target["image_id"], "category_id": label_to_cat[label],
                             "segmentation": rle, "score": score})
    return box_results, segm_results


def coco_metrics(coco_gt: COCO, results: list, image_ids=None, iou_type: str = "bbox", verbose=False) -> dict:
    """COCOeval summary stats 0-5 as {AP, AP50, AP75, APs, APm, APl}; -1 where COCO has no GT of that size."""
    if not results:
        if verbose:
            print(f"IoU metric: {iou_type}: no detections, every metric is 0")
        return {k: 0.0 for k in METRIC_NAMES}
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        coco_dt = coco_gt.loadRes([dict(r) for r in results])  # loadRes mutates its input
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        if image_ids is not None:
            evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        if verbose:
            print(f"IoU metric: {iou_type}")
        evaluator.summarize()
    return {k: float(v) for k, v in zip(METRIC_NAMES, evaluator.stats[:6])}


# ------------------------------------------------------------------------------------------ visualisation

SCORE_THRESH = 0.3  # the detections --visualize and --compare draw unless --score-thresh says otherwise


def draw_predictions(picture, output, names, score_thresh, zoom=1):
    """uint8 [3, h, w] with a detector's boxes of score >= score_thresh in red, labelled "class score"; zoom: how
    much larger the picture is than the image the boxes are in."""
    keep = (output["scores"] >= score_thresh) & (output["labels"] > 0)
    labels = [f"{names[int(l)]} {s:.2f}" for l, s in zip(output["labels"][keep], output["scores"][keep])]
    return draw_bounding_boxes(picture, output["boxes"][keep].cpu() * zoom, labels=labels or None, colors="red",
                               width=2)


def to_uint8(image):
    return (image * 255).round().clamp(0, 255).to(torch.uint8)


PANEL_MIN_SIDE = 384  # pictures of small images are enlarged until boxes, labels and sampling points are legible


def enlarged(picture):
    """uint8 [3, h, w] -> (the picture enlarged by an integer factor (nearest neighbour) until its shorter side is
    at least PANEL_MIN_SIDE, the factor)."""
    zoom = max(1, math.ceil(PANEL_MIN_SIDE / min(picture.shape[-2:])))
    return picture.repeat_interleave(zoom, -2).repeat_interleave(zoom, -1), zoom


@torch.no_grad()
def visualize(model, dataset, device, count: int, out_dir: str, score_thresh=SCORE_THRESH):
    """Write count PNGs: ground truth boxes green, predictions with score >= score_thresh red."""

    os.makedirs(out_dir, exist_ok=True)
    model.eval()
    names = ["background"] + base_dataset(dataset).class_names
    paths = []
    for index in range(min(count, len(dataset))):
        image, target = dataset[index]
        output = model([image.to(device)])[0]
        picture, zoom = enlarged(to_uint8(image))
        picture = draw_bounding_boxes(picture, target["boxes"] * zoom, colors="lime", width=2)
        picture = draw_predictions(picture, output, names, score_thresh, zoom)
        path = os.path.join(out_dir, f"{target['image_id']:012d}.png")
        write_png(picture, path)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------ the paper's pictures (Fig. 1, 4)

RED, GREEN, LIME = (255, 40, 40), (40, 255, 40), "lime"


def blend(picture, heat, color):
    """uint8 [3, h, w] blended toward `color` in proportion to heat [h, w], scaled to the 99th percentile of its
    non-zero values (a few hot pixels would otherwise make the rest invisible)."""
    hot = heat[heat > 0]
    top = torch.quantile(hot, 0.99) if hot.numel() else heat.new_tensor(1.0)
    alpha = (heat / top.clamp(min=1e-12)).clamp(0, 1)[None]
    tint = torch.tensor(color, dtype=torch.float32)[:, None, None]
    return (picture.float() * (1 - alpha) + tint * alpha).round().to(torch.uint8)


def splat(points, weights, h, w):
    """Attention mass at normalised (x, y) points (relative to an h x w canvas) -> [h, w] map, nearest pixel;
    points outside the canvas land on its border (so mass read from outside the image stays visible)."""
    points, weights = points.detach().cpu(), weights.detach().float().cpu()  # the picture is drawn on the CPU
    x = (points[..., 0].flatten() * w).long().clamp(0, w - 1)
    y = (points[..., 1].flatten() * h).long().clamp(0, h - 1)
    return torch.zeros(h * w).index_add_(0, y * w + x, weights.flatten()).view(h, w)


def hstack(*pictures):
    return torch.cat(pictures, dim=-1)


@torch.no_grad()
def sampling_pictures(teacher, akes, dataset, device, count, out_dir, seed=0):
    """Fig. 4: where the AKE's knowledge extractor f_e looks on the teacher's levels -- the attention-weighted
    sampling locations of its last layer, content queries in red (left), positional queries in green (right),
    summed over heads, levels and points; ground-truth boxes in lime. One PNG [3, z*h, 2*z*w] per image (z: the
    enlargement)."""
    os.makedirs(out_dir, exist_ok=True)
    teacher.eval().to(device)
    akes.to(device)
    paths = []
    for index in range(min(count, len(dataset))):
        image, target = dataset[index]
        out = detectors.forward_features(teacher, [image.to(device)], targets_to([target], device))
        k = akes.teacher_knowledge(out.features, detectors.normalized_targets(out),
                                  torch.Generator().manual_seed(seed + index))
        h_pad, w_pad = out.padded_hw
        h, w = image.shape[-2:]
        # a dimmed grey image, so that the red and green of the attention stand out of any texture
        grey, zoom = enlarged(to_uint8(0.4 * image.mean(0, keepdim=True).expand(3, -1, -1)))
        picture = draw_bounding_boxes(grey, target["boxes"] * zoom, colors=LIME, width=2)
        halves = []
        for model, queries, color in ((akes.ake_ct, unikd.Queries(k.queries_ct, k.reference_ct), RED),
                                      (akes.ake_pos, unikd.Queries(k.queries_pos, k.boxes), GREEN)):
            _, samplings = model.extract(queries, out.features, return_sampling=True)
            locations, weights = samplings[-1]                   # [1, N, H, L, P, 2], [1, N, H, L, P]
            # splatted at the image's own resolution, then enlarged with it: a sample is a zoom x zoom block
            heat = splat(locations, weights, h_pad, w_pad)[:h, :w]
            heat = heat.repeat_interleave(zoom, 0).repeat_interleave(zoom, 1)
            halves.append(blend(picture, heat, color))
        path = os.path.join(out_dir, f"sampling_{target['image_id']:012d}.png")
        write_png(hstack(*halves), path)
        paths.append(path)
    return paths


@torch.no_grad()
def attention_in_image(teacher, akes, loader, device, seed=0) -> dict:
    """How much of the extractors' attention reads the image: the share of the last f_e layer's attention weight (all
    queries, heads, levels, points) at sampling locations inside the image -- not outside the feature maps, where
    bilinear sampling reads zeros, and not in the padding -> {"attn_in_image_ct", "attn_in_image_pos"}."""
    inside, total, was_training = torch.zeros(2), torch.zeros(2), akes.training
    akes.eval()
    for b, (images, targets) in enumerate(loader):
        out = detectors.forward_features(teacher, [im.to(device) for im in images], targets_to(targets, device))
        knowledge = akes.teacher_knowledge(out.features, detectors.normalized_targets(out),
                                           torch.Generator().manual_seed(seed + b))
        h_pad, w_pad = out.padded_hw
        image_extent = torch.tensor([[w / w_pad, h / h_pad] for h, w in out.image_sizes])     # [B, 2] (x, y)
        for i, (mass_in, mass) in enumerate(attention_mass_in_image(akes, out.features, knowledge, image_extent)):
            inside[i] += mass_in
            total[i] += mass
    akes.train(was_training)
    if dist.is_available() and dist.is_initialized():  # every rank read its share of the images
        masses = torch.stack([inside, total]).to(device)
        dist.all_reduce(masses)
        inside, total = masses.cpu()
    share = (inside / total.clamp(min=1e-12)).tolist()
    return {"attn_in_image_ct": share[0], "attn_in_image_pos": share[1]}


def attention_mass_in_image(akes, feats, knowledge, image_extent):
    """For the content and the positional extractor: (attention weight at locations in [0, extent) of each image,
    all attention weight) of the last f_e layer; image_extent [B, 2] is the image's share of the padded tensor."""
    queries = (unikd.Queries(knowledge.queries_ct, knowledge.reference_ct),
               unikd.Queries(knowledge.queries_pos, knowledge.boxes))
    masses = []
    for model, q in zip((akes.ake_ct, akes.ake_pos), queries):
        _, samplings = model.extract(q, feats, return_sampling=True)
        locations, weights = samplings[-1]                               # [B, N, H, L, P, 2], [B, N, H, L, P]
        extent = image_extent.to(locations.device)[:, None, None, None, None]                # [B, 1, 1, 1, 1, 2]
        inside = ((locations >= 0) & (locations < extent)).all(-1)
        masses.append(((weights * inside).sum().item(), weights.sum().item()))
    return masses


@torch.no_grad()
def density_picture(models, dataset, device, count, out_path):
    """Fig. 1: the feature density (mean absolute activation over channels) of the FPN levels at strides 8..64 of
    each model (rows, in the order given) on the same images; each level's maps share one scale across models, so
    brighter means more activation. One PNG: rows = models x images, columns = 4 levels, each cell z*h x z*w."""
    images = [dataset[i][0] for i in range(min(count, len(dataset)))]
    maps = {}                                                        # (row, name, image) -> 4 maps [h, w]
    for row, (name, model) in enumerate(models):
        model.eval().to(device)
        for i, image in enumerate(images):
            out = detectors.forward_features(model, [image.to(device)])
            h, w = image.shape[-2:]
            zoom = enlarged(image)[1]
            maps[row, name, i] = [nnf.interpolate(f.abs().mean(1, keepdim=True).float(), scale_factor=s * zoom,
                                                  mode="nearest")[0, 0, :h * zoom, :w * zoom].cpu()
                                  for f, s in zip(out.features, detectors.AKE_STRIDES)]
    scale = [max(m[level].max() for m in maps.values()).clamp(min=1e-12) for level in range(4)]
    rows = []
    for (_, name, i), levels in maps.items():
        cells = [to_uint8((m / s).clamp(0, 1)).expand(3, -1, -1) for m, s in zip(levels, scale)]
        row = hstack(*cells)
        label = torch.tensor([[0.0, 0.0, 2.0, 2.0]])                   # a 2-px tag carrying the model's name
        rows.append(draw_bounding_boxes(row, label, labels=[f"{name} #{i}"], colors="yellow"))
    write_png(torch.cat(rows, dim=-2), out_path)
    return out_path


@torch.no_grad()
def compare_pictures(model_a, model_b, dataset, device, count, out_dir, score_thresh=SCORE_THRESH):
    """Ground truth | predictions of model A | predictions of model B, on the same images (e.g. a student
    trained without and with UniKD). One PNG [3, z*h, 3*z*w] per image (z: the enlargement); predictions with score
    >= score_thresh."""
    os.makedirs(out_dir, exist_ok=True)
    names = ["background"] + base_dataset(dataset).class_names
    paths = []
    for index in range(min(count, len(dataset))):
        image, target = dataset[index]
        picture, zoom = enlarged(to_uint8(image))
        panels = [draw_bounding_boxes(picture, target["boxes"] * zoom, colors=LIME, width=2)]
        for model in (model_a, model_b):
            output = model.eval().to(device)([image.to(device)])[0]
            panels.append(draw_predictions(picture, output, names, score_thresh, zoom))
        path = os.path.join(out_dir, f"compare_{target['image_id']:012d}.png")
        write_png(hstack(*panels), path)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------------- CLI

def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = ArgumentParser(description="COCO evaluation of a trained detector (bbox AP; segm AP for mask_rcnn)")
    parser.add_argument("--ckpt", required=True, help="checkpoint written by train.py (model.pth, student.pth)")
    parser.add_argument("--model", default=None, help="detector name, e.g. fcos_r18; default: the name model.pth "
                        "records (a bare student.pth records none)")
    add_data_args(parser)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--visualize", type=int, default=0, metavar="N", help="write N PNGs with GT and predictions")
    parser.add_argument("--out", default=None, help="folder for --visualize and picture PNGs")
    pictures = parser.add_argument_group("pictures of the paper's figures (instead of the evaluation)")
    pictures.add_argument("--sampling", default=None, metavar="AKE",
                          help="Fig. 4: sampling locations of this ake.pth's extractor on --ckpt (its teacher)")
    pictures.add_argument("--density", nargs="+", default=None, metavar="NAME=CKPT",
                          help="Fig. 1: FPN feature density of --ckpt's model and of these models, one row each")
    pictures.add_argument("--compare", default=None, metavar="NAME=CKPT",
                          help="ground truth | predictions of --ckpt's model | predictions of this model")
    pictures.add_argument("--pictures", type=int, default=4, metavar="N", help="images per picture flag")
    pictures.add_argument("--score-thresh", type=float, default=SCORE_THRESH, metavar="S",
                          help="--visualize and --compare draw the detections of score >= S")
    args = parser.parse_args(argv)
    wants_out = [flag for flag in ("visualize", "sampling", "density", "compare") if getattr(args, flag)]
    if wants_out and not args.out:
        parser.error(f"--{wants_out[0]} needs --out DIR")
    for spec in (args.density or []) + ([args.compare] if args.compare else []):
        if "=" not in spec:
            parser.error(f"{spec}: expected NAME=CKPT, e.g. fcos_r18=runs/distill_fcos_r18/student.pth")
    args.explicit = explicit_flags(parser, argv)
    return args


def checkpoint_info(path, flag="--ckpt") -> dict:
    """What a checkpoint of train.py says about itself: {"model_name" (or None for a bare state dict), "args",
    "categories" (or None)};
    a UserError for files that are not a detector's weights (resumable training state, ake.pth, garbage)."""
    fix = "pass a model.pth / student.pth written by train.py"
    obj = load_user_file(path, flag, "a readable checkpoint", fix)
    if not isinstance(obj, dict):
        raise UserError(f"{flag} {path}: holds no model state dict; {fix}")
    if obj.get("kind") == CHECKPOINT_KIND:
        sibling = os.path.join(os.path.dirname(path), "model.pth")
        raise UserError(f"{flag} {path}: the resumable training state of `{obj.get('stage')} {obj.get('run')}`, "
                        f"not a detector's weights; evaluate {sibling} instead")
    if obj.get("kind") == AKE_FILE_KIND:
        raise UserError(f"{flag} {path}: an AKE file; evaluate its teacher's model.pth, or pass this file to "
                        f"--sampling with --ckpt the teacher's model.pth")
    train_args = obj.get("args") if isinstance(obj.get("args"), dict) else {}
    return {"model_name": obj.get("model_name"), "args": train_args, "categories": obj.get("categories")}


def model_name_of(args, info):
    """--model, checked against the name the checkpoint records; the recorded name when --model is not given."""
    recorded = info["model_name"]
    if args.model is None:
        if recorded is None:
            raise UserError(f"--ckpt {args.ckpt} is a bare state dict that records no model name; pass --model NAME "
                            f"(the model.pth next to it records it)")
        return recorded
    name = canonical_model_name(args.model, "--model")
    if recorded is not None and recorded != name:
        raise UserError(f"--model {args.model}, but {args.ckpt} holds a {recorded}; drop --model or pass "
                        f"--model {recorded}")
    return name


def adopt_training_data(args, train_args):
    """Evaluate on the data and at the image size the model was trained with (its checkpoint records the flags),
    flag by flag: a flag given on the command line wins; COCO-format flags given take the place of all of them."""
    given_data = any(k in args.explicit for k in DATA_FLAGS)
    for k in DATA_CHOICE + ("min_size", "max_size"):
        if k in train_args and k not in args.explicit and not (given_data and k in DATA_CHOICE):
            setattr(args, k, train_args[k])


def result_path(ckpt: str) -> str:
    """Where the metrics go: next to the checkpoint, never the checkpoint itself."""
    return os.path.splitext(ckpt)[0] + "_eval.json"


def load_model(name, ckpt, dataset, args):
    """A detector from one of our checkpoints, or a UserError naming the mismatch."""
    try:
        return detectors.build_detector(name, dataset.num_classes, weights=ckpt, min_size=args.min_size,
                                        max_size=args.max_size)
    except detectors.CheckpointError as e:
        raise UserError(f"{e}; pass the --model and data it was trained with, and a checkpoint from train.py") \
            from None


def named_model(spec, dataset, args):
    """NAME=CKPT -> (label, detector); the label is the canonical name, plus the distillation method where the
    checkpoint is a train.py model.pth of --stage distill (so students of one family stay apart in a picture)."""
    name, ckpt = spec.split("=", 1)
    name = canonical_model_name(name, spec)
    trained_with = checkpoint_info(ckpt, spec)["args"]
    label = f"{name} {trained_with['method']}" if trained_with.get("stage") == "distill" else name
    return label, load_model(name, ckpt, dataset, args)


def write_pictures(args, name, model, dataset):
    """The picture flags' PNGs (no evaluation) -> their paths."""
    paths = []
    if args.sampling:
        akes = frozen_unikd(load_ake_file(args.sampling, "--sampling", dataset.num_classes, teacher=name))
        paths += sampling_pictures(model, akes, dataset, args.device, args.pictures, args.out)
    if args.density:
        os.makedirs(args.out, exist_ok=True)
        models = [(name, model)] + [named_model(spec, dataset, args) for spec in args.density]
        paths.append(density_picture(models, dataset, args.device, args.pictures,
                                     os.path.join(args.out, "density.png")))
    if args.compare:
        paths += compare_pictures(model, named_model(args.compare, dataset, args)[1], dataset, args.device,
                                  args.pictures, args.out, args.score_thresh)
    print(f"wrote {len(paths)} pictures to {args.out}")
    return {"pictures": paths}


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    torch.set_flush_denormal(True)  # CPU: denormal activations of weak or untrained models slow convolutions down
    info = checkpoint_info(args.ckpt)
    name = model_name_of(args, info)
    adopt_training_data(args, info["args"])
    dataset = build_dataset(args, "val")
    difference = info["categories"] and category_difference(info["categories"], categories_of(dataset))
    if difference:  # (a model.pth without 'categories' is not checked)
        raise UserError(f"--ckpt {args.ckpt} was trained on other categories than {dataset.ann_file} lists "
                        f"({difference}); evaluate on data with its training set's 'categories' list")
    model = load_model(name, args.ckpt, dataset, args).to(args.device)
    print(f"{name} from {args.ckpt}: {dataset.summary()}", flush=True)
    if args.sampling or args.density or args.compare:
        return write_pictures(args, name, model, dataset)
    loader = build_loader(dataset, args.batch_size, train=False, workers=args.workers)
    metrics = evaluate(model, loader, args.device, verbose=True)
    out = result_path(args.ckpt)
    atomic_write_json(out, {"model": name, "ckpt": os.path.abspath(args.ckpt), "ann_file": dataset.ann_file,
                            "min_size": args.min_size, "max_size": args.max_size, "images": len(dataset),
                            "metrics": metrics})
    print(f"wrote {out}")
    if args.visualize:
        paths = visualize(model, dataset, args.device, args.visualize, args.out, args.score_thresh)
        print(f"wrote {len(paths)} pictures to {args.out}")
    return metrics


if __name__ == "__main__":
    main()
