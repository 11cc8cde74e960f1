"""COCO-format data, the embedded synthetic dataset, and COCO evaluation.

    python eval.py --model fcos_r18 --ckpt runs/distill_fcos_r18/student.pth            # embedded data
    python eval.py --model retinanet_r50 --ckpt model.pth --data-path /data/coco --visualize 8 --out vis/
    python eval.py --model retinanet_r50 --ckpt teacher.pth --sampling ake.pth --out vis/          # Fig. 4
    python eval.py --model retinanet_r50 --ckpt teacher.pth --density fcos_r18=a.pth ... --out vis/  # Fig. 1
    python eval.py --model fcos_r18 --ckpt none.pth --compare fcos_r18=unikd.pth --out vis/      # with vs without

* `CocoDetection`: any COCO-format dataset (`--data-path DIR` with COCO's layout, or explicit `--train-images
  --train-ann --val-images --val-ann`); category ids map to contiguous labels 1..K (torchvision style, 0 is
  background) and back for COCOeval.
* `ensure_shapes_dataset()`: the synthetic default, generated once (deterministic in its seed) into data/shapes/
  in COCO layout, with instance masks; used whenever no data path is given.
* `evaluate(model, loader, device)`: pycocotools COCOeval (bbox, plus segm for Mask R-CNN), gathered to rank 0
  under torch.distributed.
* `UserError` / `exit_on_user_error`: every error a user can cause ends as one line "error: <problem>; <fix>"
  and exit code 2 (train.py reuses both).
"""
import argparse
import contextlib
import functools
import io
import json
import logging
import math
import os
import shutil
import sys
import tempfile

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as nnf
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision import tv_tensors
from torchvision.io import write_png
from torchvision.transforms.v2 import functional as F
from torchvision.utils import draw_bounding_boxes

import detectors
import unikd

log = logging.getLogger("unikd")

SHAPES_ROOT = "data/shapes"
SHAPES_IMAGE_SIZE = (128, 192)  # (H, W): both multiples of 64 (no padding waste, exact strides up to 64)
SHAPES_VERSION = 1  # bump when the generator changes, so an old data/shapes is not silently reused
SHAPE_CLASSES = ("disk", "ring", "rectangle", "triangle", "star", "cross", "crescent", "arrow")
COCO_SIZES = (800, 1333)  # torchvision's min_size / max_size for real COCO-like data
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


# ----------------------------------------------------------------------------------------------- user errors

class UserError(Exception):
    """An error the user caused and can fix; the message reads '<problem>; <fix>'."""


def user_error_line(error: BaseException) -> str:
    """The one-line message; a UserError re-raised by a DataLoader worker carries a traceback, keep its end."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(error).__name__
    return "error: " + last.split("UserError: ", 1)[-1].strip()


def exit_on_user_error(main):
    """Decorator for CLI entry points: UserError -> one line on stderr, exit code 2."""
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(user_error_line(e), file=sys.stderr, flush=True)
            sys.exit(2)
    wrapped.__name__ = getattr(main, "__name__", "main")
    wrapped.__doc__ = main.__doc__
    return wrapped


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's error format: one line, exit code 2 (argparse prints usage + error)."""

    def error(self, message):
        print(f"error: {message}; see {self.prog} --help", file=sys.stderr, flush=True)
        sys.exit(2)


# ---------------------------------------------------------------------------------------------- data paths

def add_data_args(parser):
    """The data flags shared by eval.py and train.py (torchvision references' names where they exist)."""
    parser.add_argument("--data-path", default=None,
                        help="COCO-layout folder (train2017/, val2017/, annotations/instances_*2017.json); "
                             "default: the embedded synthetic dataset in data/shapes/")
    parser.add_argument("--train-images", default=None, help="image folder of another COCO-format layout")
    parser.add_argument("--train-ann", default=None, help="annotation JSON of another COCO-format layout")
    parser.add_argument("--val-images", default=None)
    parser.add_argument("--val-ann", default=None)
    parser.add_argument("--min-size", type=int, default=None,
                        help="shorter image side; default 800 for COCO-format data, 128 for the shapes data")
    parser.add_argument("--max-size", type=int, default=None,
                        help="cap on the longer side; default 1333 for COCO-format data, 192 for the shapes data")


def uses_embedded_data(args) -> bool:
    return not any(getattr(args, k, None) for k in ("data_path", "train_images", "train_ann", "val_images",
                                                    "val_ann"))


def resolve_sizes(args):
    """Fill args.min_size / args.max_size when not given (the model must be built with the same values):
    the generated size for the embedded data (or a --data-path holding a generated shapes dataset), else
    torchvision's 800 / 1333."""
    if uses_embedded_data(args):
        defaults = SHAPES_IMAGE_SIZE
    else:
        shapes = _shapes_params(getattr(args, "data_path", None) or "")
        defaults = (min(shapes["height"], shapes["width"]), max(shapes["height"], shapes["width"])) \
            if shapes else COCO_SIZES
    if getattr(args, "min_size", None) is None:
        args.min_size = defaults[0]
    if getattr(args, "max_size", None) is None:  # keeps the default aspect cap when only min_size is given
        args.max_size = max(defaults[1], round(args.min_size * defaults[1] / defaults[0]))
    return args.min_size, args.max_size


def split_paths(args, split: str):
    """(image folder, annotation JSON) for split 'train' or 'val'; UserError naming what is missing."""
    images, ann = getattr(args, f"{split}_images", None), getattr(args, f"{split}_ann", None)
    data_path = getattr(args, "data_path", None)
    if images is None and ann is None and data_path is None and uses_embedded_data(args):
        data_path = ensure_shapes_dataset()
    if data_path is not None:
        if not os.path.isdir(data_path):
            raise UserError(f"data path {data_path} is not a folder; pass a COCO-layout folder "
                            f"(train2017/, val2017/, annotations/) or omit --data-path for the embedded dataset")
        images = images or os.path.join(data_path, f"{split}2017")
        ann = ann or os.path.join(data_path, "annotations", f"instances_{split}2017.json")
    if images is None or ann is None:
        raise UserError(f"no {split} data given; pass --data-path, or both --{split}-images and --{split}-ann")
    if not os.path.isfile(ann):
        raise UserError(f"annotation file {ann} not found; check --data-path / --{split}-ann")
    if not os.path.isdir(images):
        raise UserError(f"image folder {images} not found; check --data-path / --{split}-images")
    return images, ann


def build_dataset(args, split: str):
    """One split; sizes from args (filled by resolve_sizes). Masks only for training (COCOeval reads the JSON)."""
    min_size, max_size = resolve_sizes(args)
    images, ann = split_paths(args, split)
    train = split == "train"
    return CocoDetection(images, ann, train=train, min_size=min_size, max_size=max_size,
                         with_masks=train and bool(getattr(args, "with_masks", False)))


def build_datasets(args):
    """(train_ds, val_ds) from args.data_path or args.{train,val}_{images,ann}; the embedded data otherwise."""
    return build_dataset(args, "train"), build_dataset(args, "val")


# ------------------------------------------------------------------------------------------------- dataset

def load_coco(ann_file: str) -> COCO:
    """pycocotools COCO from a JSON file, with UserErrors for the ways such a file can be wrong."""
    try:
        with open(ann_file) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"annotation file {ann_file} is not valid JSON ({e}); "
                        f"point --data-path / --*-ann at a COCO instances_*.json") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list)
                                             for k in ("images", "annotations", "categories")):
        raise UserError(f"annotation file {ann_file} is not COCO format (needs lists 'images', 'annotations', "
                        f"'categories'); point --data-path / --*-ann at a COCO instances_*.json")
    if not data["categories"]:
        raise UserError(f"annotation file {ann_file} has no categories; a detection dataset needs at least one")
    coco = COCO()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco.dataset = data
            coco.createIndex()
    except (KeyError, TypeError) as e:
        raise UserError(f"annotation file {ann_file} has a malformed entry (missing {e}); "
                        f"fix the file or regenerate it") from None
    return coco


def box_xyxy_in_image(bbox, height, width):
    """COCO [x, y, w, h] -> [x1, y1, x2, y2] clipped to the image; None when it has no area."""
    x, y, w, h = bbox
    x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
    return [x1, y1, x2, y2] if x2 > x1 and y2 > y1 else None


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format detection dataset yielding (image [3,h,w] float 0..1, target) after resize (+ flip).

    target: boxes [M,4] xyxy pixels of the resized image, labels [M] int64 in 1..K, image_id int,
    orig_size (h0, w0) of the file, and masks [M,h,w] uint8 when with_masks.
    Crowd and degenerate boxes are dropped (counted in .stats); for training, images left without a box are
    skipped, as torchvision's references do; for evaluation every image is kept.
    """

    def __init__(self, image_dir, ann_file, train: bool, min_size: int, max_size: int, with_masks=False):
        self.image_dir, self.ann_file = image_dir, ann_file
        self.train, self.min_size, self.max_size, self.with_masks = train, min_size, max_size, with_masks
        self.coco = load_coco(ann_file)
        self.cat_ids = sorted(self.coco.getCatIds())
        self.label_to_cat = {label: cat for label, cat in enumerate(self.cat_ids, start=1)}
        self.cat_to_label = {cat: label for label, cat in self.label_to_cat.items()}
        self.num_classes = len(self.cat_ids) + 1  # + background, for every family (torchvision convention)
        self.class_names = [self.coco.cats[c].get("name", str(c)) for c in self.cat_ids]
        self.flip_p = 0.5 if train else 0.0  # horizontal flip probability (the only training augmentation)
        self.ids, self.stats = self._usable_ids()
        log.info("%s: %s", ann_file, self.summary())

    def _usable_ids(self):
        ids, degenerate, crowd, empty = [], 0, 0, 0
        for image_id in sorted(self.coco.imgs):
            info = self.coco.imgs[image_id]
            usable = 0
            for ann in self.coco.imgToAnns.get(image_id, []):
                try:
                    box = box_xyxy_in_image(ann["bbox"], info["height"], info["width"])
                    known = ann["category_id"] in self.cat_to_label
                except (KeyError, TypeError, ValueError) as e:
                    raise UserError(f"annotation {ann.get('id')} of image {image_id} in {self.ann_file} is malformed "
                                    f"({type(e).__name__}: {e}); fix the file or regenerate it") from None
                if not known:
                    raise UserError(f"annotation {ann.get('id')} in {self.ann_file} has category_id "
                                    f"{ann['category_id']}, which 'categories' does not list; fix the file")
                if ann.get("iscrowd", 0):
                    crowd += 1
                elif box is None:
                    degenerate += 1
                else:
                    usable += 1
            if usable == 0:
                empty += 1
                if self.train:
                    continue
            ids.append(image_id)
        return ids, {"images": len(ids), "degenerate_boxes_dropped": degenerate, "crowd_boxes_ignored": crowd,
                     "images_without_boxes": empty, "images_skipped": empty if self.train else 0}

    def summary(self) -> str:
        s = self.stats
        return (f"{s['images']} images, {self.num_classes - 1} classes; dropped {s['degenerate_boxes_dropped']} "
                f"degenerate boxes, ignored {s['crowd_boxes_ignored']} crowd boxes, "
                f"{s['images_without_boxes']} images without boxes "
                f"({'skipped' if self.train else 'kept for evaluation'})")

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        return self.load(index, flip=bool(torch.rand(()) < self.flip_p))

    def load(self, index, flip: bool):
        """Item `index` with the horizontal flip decided by the caller; target["flipped"] records it, so an
        offline knowledge store can serve the entry that matches the student's augmentation."""
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        image = self._read_image(info)  # tv_tensors.Image uint8 [3, h0, w0]
        h0, w0 = image.shape[-2:]
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        boxes, labels, keep = [], [], []
        for ann in anns:
            box = box_xyxy_in_image(ann["bbox"], h0, w0)
            if box is not None:
                boxes.append(box)
                labels.append(self.cat_to_label[ann["category_id"]])
                keep.append(ann)
        target = {"boxes": tv_tensors.BoundingBoxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                                                    format="XYXY", canvas_size=(h0, w0)),
                  "labels": torch.tensor(labels, dtype=torch.int64)}
        if self.with_masks:
            masks = np.stack([self.coco.annToMask(a) for a in keep]) if keep else np.zeros((0, h0, w0), np.uint8)
            target["masks"] = tv_tensors.Mask(torch.from_numpy(masks))

        size = resized_hw(h0, w0, self.min_size, self.max_size)
        image, target = F.resize(image, size), {k: F.resize(v, size) if k != "labels" else v
                                                for k, v in target.items()}
        if flip:
            image, target = F.horizontal_flip(image), {k: F.horizontal_flip(v) if k != "labels" else v
                                                       for k, v in target.items()}
        image = F.to_dtype(image, torch.float32, scale=True)

        out = {k: v.as_subclass(torch.Tensor) for k, v in target.items()}  # plain tensors for models / DDP
        out["image_id"] = int(image_id)
        out["orig_size"] = (int(h0), int(w0))
        out["flipped"] = bool(flip)
        return image.as_subclass(torch.Tensor), out

    def _read_image(self, info):
        path = os.path.join(self.image_dir, info["file_name"])
        try:
            with Image.open(path) as im:
                array = np.asarray(im.convert("RGB"))
        except FileNotFoundError:
            raise UserError(f"image file {path} is missing; check the image folder (--data-path / --*-images) "
                            f"matches the annotation file") from None
        except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError, truncated files
            raise UserError(f"image file {path} is corrupt or not an image ({type(e).__name__}); "
                            f"replace the file or remove it from the annotation file") from None
        return tv_tensors.Image(torch.from_numpy(array.copy()).permute(2, 0, 1))


def resized_hw(height, width, min_size, max_size):
    """Shorter side to min_size unless the longer would exceed max_size: torchvision's detection transform rule,
    rounded so that the model's own GeneralizedRCNNTransform then computes scale 1 and leaves the image as is."""
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return [int(round(height * scale)), int(round(width * scale))]


def collate_fn(batch):
    images, targets = zip(*batch)
    return list(images), list(targets)


def targets_to(targets, device):
    return [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]


def build_loader(dataset, batch_size: int, train: bool, workers: int = 0, distributed: bool = False, seed: int = 0):
    """Shuffled (train) or sequential loader; with distributed, a DistributedSampler (call
    loader.sampler.set_epoch(epoch) each epoch). Shuffling and worker seeds derive from seed."""
    generator = torch.Generator().manual_seed(seed)
    if distributed:
        sampler = torch.utils.data.DistributedSampler(dataset, shuffle=train, seed=seed, drop_last=train)
    elif train:
        sampler = torch.utils.data.RandomSampler(dataset, generator=generator)
    else:
        sampler = torch.utils.data.SequentialSampler(dataset)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                       collate_fn=collate_fn, drop_last=train and len(dataset) > batch_size,
                                       generator=generator, persistent_workers=workers > 0)


# ---------------------------------------------------------------------------------------------- evaluation

def base_dataset(dataset):
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return dataset


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
        # DistributedSampler pads with repeated images: keyed by image id, duplicates collapse.
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


def coco_results(output, target, input_hw, label_to_cat):
    """One image's detections as COCO result dicts in the file's pixel coordinates: (boxes, masks or None)."""
    h0, w0 = target["orig_size"]
    sy, sx = h0 / input_hw[0], w0 / input_hw[1]  # the model saw the resized image
    # label 0 is background: R-CNNs never predict it, but RetinaNet/FCOS keep a (never positive) logit for it
    keep = (output["labels"] > 0).cpu()
    boxes = output["boxes"].float().cpu()[keep] * torch.tensor([sx, sy, sx, sy])
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
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


# ---------------------------------------------------------------------------------- the embedded dataset

def ensure_shapes_dataset(root=SHAPES_ROOT, num_train=2000, num_val=500, image_size=SHAPES_IMAGE_SIZE, seed=0):
    """Generate the synthetic shapes dataset into root (COCO layout) unless it is already there; returns root.

    Deterministic in its parameters; written to a temporary sibling folder and renamed, so a killed run never
    leaves half a dataset, and concurrent callers (DDP ranks) agree on one copy. image_size: (H, W) or an int
    for square images. A root generated with other parameters is a UserError (it is never overwritten).
    """
    height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    params = {"version": SHAPES_VERSION, "num_train": num_train, "num_val": num_val, "height": height,
              "width": width, "seed": seed}
    existing = _shapes_params(root)
    if existing == params:
        return root
    if existing is not None or os.path.exists(root):
        raise UserError(f"{root} exists but was not generated with {params}; delete it to regenerate, or "
                        f"pass another root / --data-path")
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(root) + ".tmp-", dir=parent)
    try:
        for split_index, (split, count) in enumerate((("train", num_train), ("val", num_val))):
            write_shapes_split(tmp, split, count, height, width, seed, split_index)
        with open(os.path.join(tmp, "params.json"), "w") as f:
            json.dump(params, f)
        try:
            os.rename(tmp, root)
        except OSError:  # another process finished first; its copy is identical
            if _shapes_params(root) != params:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _shapes_params(root):
    """The generator parameters recorded in a shapes dataset folder, or None when it is not one."""
    try:
        with open(os.path.join(root, "params.json")) as f:
            params = json.load(f)
    except (OSError, ValueError):
        return None
    return params if isinstance(params, dict) and {"version", "height", "width"} <= set(params) else None


def write_shapes_split(root, split, count, height, width, seed, split_index):
    image_dir = os.path.join(root, f"{split}2017")
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        # one generator per image: any image can be regenerated alone, independent of the others
        rng = np.random.default_rng([seed, split_index, index])
        pixels, objects = render_shapes_image(rng, height, width)
        image_id = index + 1
        file_name = f"{image_id:012d}.jpg"
        Image.fromarray(pixels).save(os.path.join(image_dir, file_name), quality=92)
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        for obj in objects:
            rle = mask_utils.encode(np.asfortranarray(obj["mask"]))
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": obj["label"],
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],  # tight on the visible mask
                "area": float(mask_utils.area(rle)), "iscrowd": 0,
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                "color": obj["color"]})  # extra field: lets tests check that a mask lands on its drawn shape
    categories = [{"id": i, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPE_CLASSES, 1)]
    with open(os.path.join(root, "annotations", f"instances_{split}2017.json"), "w") as f:
        json.dump({"info": {"description": "UniKD synthetic shapes"}, "images": images,
                   "annotations": annotations, "categories": categories}, f)


def render_shapes_image(rng, height, width, min_visible=0.5, max_tries=20):
    """One image: textured, cluttered background, then 1-10 shapes painted largest first.

    Occlusion: each new shape is rejected (and re-placed) if it would leave any shape, itself included, with
    less than min_visible of its area in view (frame truncation counts too) or below its size bucket's floor,
    so every painted shape is annotated, from its visible pixels.
    Returns (uint8 [H, W, 3], [{label, mask: visible uint8 [H, W], color: [r, g, b]}, ...]).
    """
    canvas = background(rng, height, width)
    owner = np.full((height, width), -1, np.int64)  # index of the shape that shows at each pixel
    floors, labels, colors = [], [], []  # floors: least visible area each placed shape must keep
    for label, size, bucket_floor in sample_objects(rng, int(rng.integers(1, 11)), min(height, width)):
        for attempt in range(max_tries):
            if attempt == max_tries // 2:
                size, bucket_floor = size * 0.7, 0.0  # too big to place without hiding others: try it smaller
            mask, full_area = shape_mask(rng, SHAPE_CLASSES[label - 1], size, height, width)
            new_owner = np.where(mask, len(floors), owner)
            visible = np.bincount(new_owner.ravel() + 1, minlength=len(floors) + 2)[1:]
            floor = max(min_visible * full_area, bucket_floor if full_area > bucket_floor else 0.0, 12)
            if (visible >= np.array(floors + [floor])).all():
                break
        else:
            continue  # no placement keeps everything visible: leave this shape out
        color = object_color(rng, canvas[mask])
        canvas[mask] = shaded(rng, color, mask)
        owner = new_owner
        floors.append(floor)
        labels.append(label)
        colors.append(color)
    canvas += rng.normal(0, rng.uniform(3, 8), canvas.shape)  # sensor noise over everything
    pixels = np.clip(canvas, 0, 255).astype(np.uint8)
    objects = [{"label": label, "mask": (owner == k).astype(np.uint8), "color": [int(c) for c in colors[k]]}
               for k, label in enumerate(labels)]
    return pixels, objects


# Target sqrt(mask area) ranges in px: COCO's small / medium / large split at 32 and 96 px. Shares of the
# non-large shapes; an image holds at most one large shape (two would not fit at 128x192 without hiding each
# other), present with probability LARGE_SHARE.
SIZE_BUCKETS = ((6.0, 32.0), (32.0, 96.0), (96.0, 140.0))
SMALL_SHARE, LARGE_SHARE = 0.5, 0.6


def sample_objects(rng, count, short_side):
    """count (class label, nominal diameter, area floor) triples, largest first (painted first, so small shapes
    occlude large ones). The diameter makes the shape's mask area fall in a COCO size bucket; occlusion may
    not push the visible area below the floor (the bucket's lower bound), so the bucket mix survives."""
    labels = rng.integers(1, len(SHAPE_CLASSES) + 1, count)
    bucket = (rng.random(count) >= SMALL_SHARE).astype(int)  # 0 small, 1 medium
    if rng.random() < LARGE_SHARE and 0.95 * short_side > SIZE_BUCKETS[2][0]:
        bucket[0] = 2
    low = np.array([b[0] for b in SIZE_BUCKETS])[bucket]
    high = np.minimum(np.array([b[1] for b in SIZE_BUCKETS])[bucket], 0.95 * short_side)
    root_area = np.exp(rng.uniform(np.log(low), np.log(np.maximum(high, low))))
    # area = unit_area * (d/2)^2 for a shape drawn in a [-d/2, d/2] box (stretching keeps the area)
    diameters = [min(max(2 * r / math.sqrt(unit_area(SHAPE_CLASSES[l - 1])), 8.0), 1.4 * short_side)
                 for r, l in zip(root_area, labels)]
    order = np.argsort(diameters)[::-1]
    return [(int(labels[i]), float(diameters[i]), float(low[i]) ** 2) for i in order]


@functools.lru_cache(maxsize=None)
def unit_area(kind, resolution=400):
    """Area of the shape in its [-1, 1] box (4 for a full square), by rasterising it once."""
    image = Image.new("L", (resolution, resolution), 0)
    draw = ImageDraw.Draw(image)
    for poly, fill in shape_outline(kind):
        draw.polygon([tuple(p) for p in (poly + 1) * resolution / 2], fill=fill)
    return float(np.asarray(image, dtype=bool).mean() * 4)


def shape_outline(kind):
    """Polygons of a shape in unit coordinates ([-1, 1] box): [(polygon [N, 2], fill 1 or hole 0), ...]."""
    def circle(r, cx=0.0, n=40):
        t = np.linspace(0, 2 * np.pi, n, endpoint=False)
        return np.stack([cx + r * np.cos(t), r * np.sin(t)], 1)

    def star_polygon(radii, n):
        t = np.pi / 2 + np.arange(n) * 2 * np.pi / n
        r = np.resize(radii, n)
        return np.stack([r * np.cos(t), r * np.sin(t)], 1)

    if kind == "disk":
        return [(circle(1.0), 1)]
    if kind == "ring":
        return [(circle(1.0), 1), (circle(0.55), 0)]
    if kind == "rectangle":
        return [(np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float), 1)]
    if kind == "triangle":
        return [(star_polygon([1.0], 3), 1)]
    if kind == "star":
        return [(star_polygon([1.0, 0.42], 10), 1)]
    if kind == "cross":
        a = 0.33
        return [(np.array([[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1], [-a, a],
                           [-1, a], [-1, -a], [-a, -a]], float), 1)]
    if kind == "crescent":
        return [(circle(1.0), 1), (circle(0.85, cx=0.5), 0)]
    if kind == "arrow":
        return [(np.array([[-1, -0.28], [0.15, -0.28], [0.15, -0.75], [1, 0], [0.15, 0.75], [0.15, 0.28],
                           [-1, 0.28]], float), 1)]
    raise ValueError(kind)


def shape_mask(rng, kind, size, height, width):
    """A randomly stretched, rotated and placed shape: (bool mask [H, W] of its in-frame pixels, full area)."""
    aspect = rng.uniform(0.75, 1.33)
    half = np.array([size / 2 * math.sqrt(aspect), size / 2 / math.sqrt(aspect)])
    angle = rng.uniform(0, 2 * np.pi)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    polygons = [(poly * half @ rotation.T, fill) for poly, fill in shape_outline(kind)]
    extent = np.abs(np.concatenate([p for p, _ in polygons])).max(0)  # half-extent of the rotated shape
    # centre such that at most ~30% of the extent leaves the frame (truncated objects, as in COCO)
    centre = np.array([rng.uniform(0.4 * extent[0], width - 0.4 * extent[0]),
                       rng.uniform(0.4 * extent[1], height - 0.4 * extent[1])])
    # draw on a local canvas that holds the whole shape, so the full area is known even when truncated
    origin = np.floor(centre - extent).astype(int) - 1
    local_w, local_h = (np.ceil(2 * extent).astype(int) + 3)
    local = Image.new("L", (int(local_w), int(local_h)), 0)
    draw = ImageDraw.Draw(local)
    for poly, fill in polygons:
        draw.polygon([tuple(p) for p in (poly + centre - origin)], fill=fill)
    local = np.asarray(local, dtype=bool)
    mask = np.zeros((height, width), bool)
    y0, x0 = max(origin[1], 0), max(origin[0], 0)
    y1, x1 = min(origin[1] + local.shape[0], height), min(origin[0] + local.shape[1], width)
    if y1 > y0 and x1 > x0:
        mask[y0:y1, x0:x1] = local[y0 - origin[1]:y1 - origin[1], x0 - origin[0]:x1 - origin[0]]
    return mask, int(local.sum())


def smooth_noise(rng, height, width, fields=1, waves=4, max_freq=3.0):
    """fields maps [fields, H, W] of low-frequency noise in about [-1, 1], each a sum of random plane waves.

    sin(a x + b y + p) = sin(b y) cos(a x + p) + cos(b y) sin(a x + p): separable, so each map is two small
    matrix products of 1-D tables instead of a sine per pixel and wave.
    """
    scale = 2 * np.pi / max(height, width)
    freq = rng.uniform(-max_freq, max_freq, (fields, waves, 2)) * scale
    phase = rng.uniform(0, 2 * np.pi, (fields, waves, 1))
    ax = freq[..., :1] * np.arange(width) + phase  # [fields, waves, W]
    by = freq[..., 1:] * np.arange(height)  # [fields, waves, H]
    maps = (np.einsum("nkh,nkw->nhw", np.sin(by), np.cos(ax)) + np.einsum("nkh,nkw->nhw", np.cos(by), np.sin(ax)))
    return maps / math.sqrt(waves)


def background(rng, height, width):
    """Float [H, W, 3] background: colour gradient + blotchy noise, maybe stripes, distractor blobs and lines."""
    y, x = np.mgrid[0:height, 0:width]
    c0, c1 = rng.uniform(30, 225, 3), rng.uniform(30, 225, 3)
    direction = rng.normal(size=2)
    t = (x * direction[0] + y * direction[1]) / (np.abs(direction).sum() * max(height, width))
    t = (t - t.min()) / max(np.ptp(t), 1e-6)
    canvas = c0 + (c1 - c0) * t[..., None]
    canvas += rng.uniform(10, 35) * smooth_noise(rng, height, width, fields=3).transpose(1, 2, 0)
    if rng.random() < 0.5:  # stripes
        period, angle = rng.uniform(5, 20), rng.uniform(0, np.pi)
        wave = np.sin(2 * np.pi * (x * math.cos(angle) + y * math.sin(angle)) / period)
        canvas += rng.uniform(10, 40) * wave[..., None] * rng.choice([-1, 1], 3)
    for _ in range(int(rng.integers(0, 3))):  # amorphous distractor patches: many waves, so no class shape
        patch = smooth_noise(rng, height, width, waves=10, max_freq=6.0)[0] > rng.uniform(0.3, 0.8)
        canvas[patch] = 0.6 * canvas[patch] + 0.4 * rng.uniform(0, 255, 3)
    lines = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(lines)
    for _ in range(int(rng.integers(0, 4))):  # clutter: thin random-walk polylines
        steps = rng.normal(0, 12, (int(rng.integers(2, 7)), 2)).cumsum(0) + rng.uniform(0, [width, height])
        draw.line([tuple(p) for p in steps], fill=1, width=int(rng.integers(1, 3)))
    line_mask = np.asarray(lines, dtype=bool)
    canvas[line_mask] = rng.uniform(0, 255, 3)
    return canvas


def object_color(rng, pixels_below, min_distance=80.0, tries=10):
    """A random colour that stands out from what the shape covers (colour never identifies the class)."""
    below = pixels_below.mean(0) if len(pixels_below) else np.full(3, 128.0)
    for _ in range(tries):
        color = rng.uniform(0, 255, 3)
        if np.linalg.norm(color - below) >= min_distance:
            break
    return np.round(color)


def shaded(rng, color, mask):
    """The shape's pixels: its colour with a gentle linear shading (objects are not flat stickers)."""
    ys, xs = np.nonzero(mask)
    gradient = rng.uniform(-0.6, 0.6, 2)
    shade = (xs - xs.mean()) * gradient[0] + (ys - ys.mean()) * gradient[1]
    return color[None, :] + np.clip(shade, -15, 15)[:, None]


# ------------------------------------------------------------------------------------------ visualisation

def draw_predictions(picture, output, names, score_thresh):
    """uint8 [3, h, w] with a detector's boxes of score >= score_thresh in red, labelled "class score"."""
    keep = (output["scores"] >= score_thresh) & (output["labels"] > 0)
    labels = [f"{names[int(l)]} {s:.2f}" for l, s in zip(output["labels"][keep], output["scores"][keep])]
    return draw_bounding_boxes(picture, output["boxes"][keep].cpu(), labels=labels or None, colors="red", width=1)


def to_uint8(image):
    return (image * 255).round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def visualize(model, dataset, device, count: int, out_dir: str, score_thresh=0.3):
    """Write count PNGs: ground truth boxes green, predictions with score >= score_thresh red."""

    os.makedirs(out_dir, exist_ok=True)
    model.eval()
    names = ["background"] + base_dataset(dataset).class_names
    paths = []
    for index in range(min(count, len(dataset))):
        image, target = dataset[index]
        output = model([image.to(device)])[0]
        picture = draw_bounding_boxes(to_uint8(image), target["boxes"], colors="lime", width=1)
        picture = draw_predictions(picture, output, names, score_thresh)
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


def load_ake_model(path, teacher_name, num_classes):
    """ake.pth written by train.py --stage pretrain -> frozen unikd.UniKD, checked against --model and the data."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"--sampling {path}: not an AKE file ({type(e).__name__}); pass an ake.pth of --stage pretrain")
    if not isinstance(blob, dict) or "config" not in blob or "state_dict" not in blob:
        raise UserError(f"--sampling {path}: not an AKE file; pass an ake.pth written by --stage pretrain")
    if blob.get("teacher") != teacher_name or blob.get("num_classes") != num_classes:
        raise UserError(f"--sampling {path}: an AKE of {blob.get('teacher')} ({blob.get('num_classes', 1) - 1} classes),"
                        f" not of --model {teacher_name} on this data; pass its teacher as --model/--ckpt")
    ake = unikd.UniKD(**blob["config"])
    ake.load_state_dict(blob["state_dict"])
    return ake.freeze()


@torch.no_grad()
def sampling_pictures(teacher, ake, dataset, device, count, out_dir, seed=0):
    """Fig. 4: where the AKE's knowledge extractor f_e looks on the teacher's levels -- the attention-weighted
    sampling locations of its last layer, content queries in red (left), positional queries in green (right),
    summed over heads, levels and points; ground-truth boxes in lime. One PNG [3, h, 2w] per image."""
    os.makedirs(out_dir, exist_ok=True)
    teacher.eval().to(device)
    ake.to(device)
    paths = []
    for index in range(min(count, len(dataset))):
        image, target = dataset[index]
        out = detectors.forward_features(teacher, [image.to(device)], targets_to([target], device))
        k = ake.teacher_knowledge(out.features, detectors.normalized_targets(out),
                                  torch.Generator().manual_seed(seed + index))
        h_pad, w_pad = out.batch_size_hw
        h, w = image.shape[-2:]
        # a dimmed grey image, so that the red and green of the attention stand out of any texture
        grey = to_uint8(0.4 * image.mean(0, keepdim=True).expand(3, -1, -1))
        picture = draw_bounding_boxes(grey, target["boxes"], colors=LIME, width=1)
        halves = []
        for model, queries, color in ((ake.ake_ct, unikd.Queries(k.queries_ct, k.reference_ct), RED),
                                      (ake.ake_pos, unikd.Queries(k.queries_pos, k.boxes), GREEN)):
            _, samplings = model.extract(queries, out.features, return_sampling=True)
            locations, weights = samplings[-1]                   # [1, N, H, L, P, 2], [1, N, H, L, P]
            heat = splat(locations, weights, h_pad, w_pad)[:h, :w]
            halves.append(blend(picture, heat, color))
        path = os.path.join(out_dir, f"sampling_{target['image_id']:012d}.png")
        write_png(hstack(*halves), path)
        paths.append(path)
    return paths


@torch.no_grad()
def density_picture(models, dataset, device, count, out_path):
    """Fig. 1: the feature density (mean absolute activation over channels) of the FPN levels at strides 8..64 of
    each model (rows, in the order given) on the same images; each level's maps share one scale across models, so
    brighter means more activation. One PNG: rows = models x images, columns = 4 levels, each cell h x w."""
    images = [dataset[i][0] for i in range(min(count, len(dataset)))]
    maps = {}                                                        # (row, name, image) -> 4 maps [h, w]
    for row, (name, model) in enumerate(models):
        model.eval().to(device)
        for i, image in enumerate(images):
            out = detectors.forward_features(model, [image.to(device)])
            h, w = image.shape[-2:]
            maps[row, name, i] = [nnf.interpolate(f.abs().mean(1, keepdim=True).float(), scale_factor=s, mode="nearest")
                             [0, 0, :h, :w].cpu() for f, s in zip(out.features, detectors.AKE_STRIDES)]
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
def compare_pictures(model_a, model_b, dataset, device, count, out_dir, score_thresh=0.3):
    """Ground truth | predictions of model A | predictions of model B, on the same images (e.g. a student
    trained without and with UniKD). One PNG [3, h, 3w] per image; predictions with score >= score_thresh."""
    os.makedirs(out_dir, exist_ok=True)
    names = ["background"] + base_dataset(dataset).class_names
    paths = []
    for index in range(min(count, len(dataset))):
        image, target = dataset[index]
        panels = [draw_bounding_boxes(to_uint8(image), target["boxes"], colors=LIME, width=1)]
        for model in (model_a, model_b):
            output = model.eval().to(device)([image.to(device)])[0]
            panels.append(draw_predictions(to_uint8(image), output, names, score_thresh))
        path = os.path.join(out_dir, f"compare_{target['image_id']:012d}.png")
        write_png(hstack(*panels), path)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------------- CLI

def parse_args(argv=None):
    parser = ArgumentParser(description="COCO evaluation of a trained detector (bbox AP; segm AP for mask_rcnn)")
    parser.add_argument("--model", required=True, help="detector name, e.g. fcos_r18 (see detectors.MODEL_NAMES)")
    parser.add_argument("--ckpt", required=True, help="checkpoint written by train.py (model.pth, student.pth)")
    add_data_args(parser)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--visualize", type=int, default=0, metavar="N", help="write N PNGs with GT and predictions")
    parser.add_argument("--out", default=None, help="folder for --visualize and picture PNGs")
    pictures = parser.add_argument_group("pictures of the paper's figures (instead of the evaluation)")
    pictures.add_argument("--sampling", default=None, metavar="AKE",
                          help="Fig. 4: sampling locations of this ake.pth's extractor on --model/--ckpt (its teacher)")
    pictures.add_argument("--density", nargs="+", default=None, metavar="NAME=CKPT",
                          help="Fig. 1: FPN feature density of --model/--ckpt and of these models, one row each")
    pictures.add_argument("--compare", default=None, metavar="NAME=CKPT",
                          help="ground truth | predictions of --model/--ckpt | predictions of this model")
    pictures.add_argument("--pictures", type=int, default=4, metavar="N", help="images per picture flag")
    args = parser.parse_args(argv)
    wants_out = [flag for flag in ("visualize", "sampling", "density", "compare") if getattr(args, flag)]
    if wants_out and not args.out:
        parser.error(f"--{wants_out[0]} needs --out DIR")
    for spec in (args.density or []) + ([args.compare] if args.compare else []):
        if "=" not in spec:
            parser.error(f"{spec}: expected NAME=CKPT, e.g. fcos_r18=runs/distill_fcos_r18/student.pth")
    return args


def checkpoint_train_args(path) -> dict:
    """The "args" dict train.py stores in its checkpoints ({} for a bare state dict or unreadable file)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return {}
    return obj.get("args", {}) if isinstance(obj, dict) and isinstance(obj.get("args"), dict) else {}


def result_path(ckpt: str) -> str:
    """Where the metrics go: next to the checkpoint, never the checkpoint itself."""
    return os.path.splitext(ckpt)[0] + "_eval.json"


def write_json_atomic(path, data):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def load_model(name, ckpt, dataset, args):
    """A detector from one of our checkpoints, or a UserError naming the mismatch."""
    if not os.path.isfile(ckpt):
        raise UserError(f"checkpoint {ckpt} not found; pass a model.pth / student.pth written by train.py")
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
    try:
        name = detectors.canonical_name(name)
    except ValueError as e:
        raise UserError(f"{spec}: {e}") from None
    trained_with = checkpoint_train_args(ckpt)
    label = f"{name} {trained_with['method']}" if trained_with.get("stage") == "distill" else name
    return label, load_model(name, ckpt, dataset, args)


def write_pictures(args, name, model, dataset):
    """The picture flags' PNGs (no evaluation) -> their paths."""
    paths = []
    if args.sampling:
        ake = load_ake_model(args.sampling, name, dataset.num_classes)
        paths += sampling_pictures(model, ake, dataset, args.device, args.pictures, args.out)
    if args.density:
        os.makedirs(args.out, exist_ok=True)
        models = [(name, model)] + [named_model(spec, dataset, args) for spec in args.density]
        paths.append(density_picture(models, dataset, args.device, args.pictures,
                                     os.path.join(args.out, "density.png")))
    if args.compare:
        paths += compare_pictures(model, named_model(args.compare, dataset, args)[1], dataset, args.device,
                                  args.pictures, args.out)
    print(f"wrote {len(paths)} pictures to {args.out}")
    return {"pictures": paths}


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    torch.set_flush_denormal(True)  # CPU: denormal activations (weak or untrained models) make convs ~3x slower
    try:
        name = detectors.canonical_name(args.model)
    except ValueError as e:
        raise UserError(f"{e}; pass one of them to --model") from None
    trained_with = checkpoint_train_args(args.ckpt)
    if args.min_size is None and trained_with.get("min_size"):
        args.min_size = trained_with["min_size"]
    if args.max_size is None and trained_with.get("max_size"):
        args.max_size = trained_with["max_size"]
    dataset = build_dataset(args, "val")
    model = load_model(name, args.ckpt, dataset, args).to(args.device)
    print(f"{name} from {args.ckpt}: {dataset.summary()}", flush=True)
    if args.sampling or args.density or args.compare:
        return write_pictures(args, name, model, dataset)
    loader = build_loader(dataset, args.batch_size, train=False, workers=args.workers)
    metrics = evaluate(model, loader, args.device, verbose=True)
    out = result_path(args.ckpt)
    write_json_atomic(out, {"model": name, "ckpt": os.path.abspath(args.ckpt), "ann_file": dataset.ann_file,
                            "min_size": args.min_size, "max_size": args.max_size, "images": len(dataset),
                            "metrics": metrics})
    print(f"wrote {out}")
    if args.visualize:
        paths = visualize(model, dataset, args.device, args.visualize, args.out)
        print(f"wrote {len(paths)} pictures to {args.out}")
    return metrics


if __name__ == "__main__":
    main()
