"""COCO-format detection data: the flags that name it, datasets, loaders and the sampler that makes an epoch
resumable mid-way.

* `CocoDetection`: any COCO-format dataset (`--data-path DIR` with COCO's layout, or explicit `--train-images
  --train-ann --val-images --val-ann`); category ids map to contiguous labels 1..K (torchvision style, 0 is
  background) and back for COCOeval. Without any of them, the embedded synthetic dataset (shapes.py).
* `build_loader`: an `EpochSampler` feeds it: the order (and flips) of epoch k depend only on (seed, k), and an epoch
  can start at any batch, so a run interrupted mid-epoch resumes with the same data.
"""
import argparse
import atexit
import contextlib
import io
import json
import logging
import math
import multiprocessing
import multiprocessing.util  # registers multiprocessing's exit handler before kill_workers_left_at_exit's
import os
import signal

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

import shapes
from utils import LocalUserError, UserError

log = logging.getLogger("unikd")

COCO_SIZES = (800, 1333)  # torchvision's min_size / max_size for real COCO-like data
DATA_FLAGS = ("data_path", "train_images", "train_ann", "val_images", "val_ann")


# ---------------------------------------------------------------------------------------------------- data flags

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
                        help="shorter image side; default 800 for COCO-format data, the generated size for the "
                             "embedded data")
    parser.add_argument("--max-size", type=int, default=None,
                        help="cap on the longer side; default 1333 for COCO-format data, the generated size for "
                             "the embedded data")
    d = shapes.SHAPES_DEFAULTS
    parser.add_argument("--shapes-train", default=d["num_train"], type=int, help="embedded dataset: training images")
    parser.add_argument("--shapes-val", default=d["num_val"], type=int, help="embedded dataset: validation images")
    parser.add_argument("--shapes-size", default=list(d["image_size"]), type=int, nargs="+",
                        help="embedded dataset: image size, H W (or one number for square images)")
    parser.add_argument("--shapes-seed", default=d["seed"], type=int, help="embedded dataset: generator seed")


def data_flag_defaults() -> dict:
    """dest -> default of every flag add_data_args defines."""
    parser = argparse.ArgumentParser()
    add_data_args(parser)
    return vars(parser.parse_args([]))


def uses_embedded_data(args) -> bool:
    return not any(getattr(args, k, None) for k in DATA_FLAGS)


def generated_params(args):
    """The generator parameters of the data the flags name, when it is a generated shapes set (the embedded default,
    or a --data-path holding one), else None."""
    if uses_embedded_data(args):
        spec = shapes_spec(args)
        return {"height": spec["image_size"][0], "width": spec["image_size"][1]}
    return shapes.shapes_params(getattr(args, "data_path", None) or "")


def shapes_spec(args) -> dict:
    """The embedded dataset the flags name: ensure_shapes_dataset's keyword arguments."""
    size = getattr(args, "shapes_size", None) or list(shapes.SHAPES_IMAGE_SIZE)
    if len(size) not in (1, 2):
        raise UserError(f"--shapes-size {' '.join(map(str, size))}: give H W, or one number for square images")
    size = tuple(size) * (2 if len(size) == 1 else 1)
    spec = dict(num_train=getattr(args, "shapes_train", shapes.SHAPES_DEFAULTS["num_train"]),
                num_val=getattr(args, "shapes_val", shapes.SHAPES_DEFAULTS["num_val"]), image_size=size,
                seed=getattr(args, "shapes_seed", shapes.SHAPES_DEFAULTS["seed"]))
    return dict(root=shapes.shapes_root(**spec), **spec)


def resolve_sizes(args):
    """Fill args.min_size / args.max_size when not given (the model must be built with the same values): the
    generated size for generated data (the embedded default, or a --data-path holding one), else torchvision's
    800 / 1333. The one place image-size defaults are decided."""
    generated = generated_params(args)
    defaults = sorted((generated["height"], generated["width"])) if generated else COCO_SIZES
    if getattr(args, "min_size", None) is None:
        args.min_size = defaults[0]
    if getattr(args, "max_size", None) is None:  # keeps the default aspect cap when only min_size is given
        args.max_size = max(defaults[1], round(args.min_size * defaults[1] / defaults[0]))
    return args.min_size, args.max_size


def data_root(args, verbose=False):
    """The folder of the data: --data-path, or the embedded dataset (generated on first use)."""
    if getattr(args, "data_path", None) is None and uses_embedded_data(args):
        return shapes.ensure_shapes_dataset(**shapes_spec(args), verbose=verbose)
    return getattr(args, "data_path", None)


def split_paths(args, split: str):
    """(image folder, annotation JSON) for split 'train' or 'val'; UserError naming what is missing."""
    images, ann = getattr(args, f"{split}_images", None), getattr(args, f"{split}_ann", None)
    data_path = data_root(args) if images is None and ann is None else getattr(args, "data_path", None)
    if data_path is not None:
        if not os.path.isdir(data_path):
            raise UserError(f"--data-path {data_path}: no such directory; pass a COCO-layout folder "
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


def build_dataset(args, split: str, with_masks=False):
    """One split; sizes from args (resolve_sizes). Masks only for training (COCOeval reads the JSON)."""
    min_size, max_size = resolve_sizes(args)
    images, ann = split_paths(args, split)
    train = split == "train"
    return CocoDetection(images, ann, train=train, min_size=min_size, max_size=max_size,
                         with_masks=train and with_masks)


# ------------------------------------------------------------------------------------------------------ dataset

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
    for key in ("images", "annotations", "categories"):  # pycocotools' index would keep only the last of each id
        repeated = first_repeated_id(data[key])
        if repeated is not None:
            raise UserError(f"annotation file {ann_file} lists {key} id {repeated} more than once; ids must be "
                            f"unique, fix the file")
    coco = COCO()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco.dataset = data
            coco.createIndex()
    except (KeyError, TypeError) as e:
        raise UserError(f"annotation file {ann_file} has a malformed entry (missing {e}); "
                        f"fix the file or regenerate it") from None
    return coco


def first_repeated_id(entries):
    seen = set()
    for entry in entries:
        key = entry.get("id") if isinstance(entry, dict) else None
        if key is None:  # malformed: createIndex names it
            continue
        if key in seen:
            return key
        seen.add(key)
    return None


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
        """The images to serve (for training, those with a usable box) and what was dropped on the way:
        crowd boxes ignored; boxes partly outside the image clipped to it; boxes without area inside it (zero or
        negative size, wholly outside) dropped. A UserError when nothing usable is left."""
        ids, degenerate, clipped, crowd, empty = [], 0, 0, 0, 0
        self.boxes_per_label = dict.fromkeys(self.label_to_cat, 0)
        for image_id in sorted(self.coco.imgs):
            info = self.coco.imgs[image_id]
            usable = 0
            for ann in self.coco.imgToAnns.get(image_id, []):
                try:
                    box = box_xyxy_in_image(ann["bbox"], info["height"], info["width"])
                    known = ann["category_id"] in self.cat_to_label
                    x, y, w, h = ann["bbox"]
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
                    clipped += box != [x, y, x + w, y + h]
                    self.boxes_per_label[self.cat_to_label[ann["category_id"]]] += 1
            if usable == 0:
                empty += 1
                if self.train:
                    continue
            ids.append(image_id)
        if sum(self.boxes_per_label.values()) == 0:
            what = "training needs annotated images" if self.train else "evaluation needs ground truth to compare with"
            raise UserError(f"annotation file {self.ann_file}: none of its {len(self.coco.imgs)} images has a usable "
                            f"box ({len(self.coco.anns)} annotations, {degenerate} without area, {crowd} crowd); "
                            f"{what}, point --*-ann at an annotated split")
        return ids, {"images": len(ids), "degenerate_boxes_dropped": degenerate, "boxes_clipped": clipped,
                     "crowd_boxes_ignored": crowd, "images_without_boxes": empty,
                     "images_skipped": empty if self.train else 0}

    def summary(self) -> str:
        s = self.stats
        return (f"{s['images']} images, {self.num_classes - 1} classes; dropped {s['degenerate_boxes_dropped']} "
                f"degenerate boxes, clipped {s['boxes_clipped']} to the image, ignored {s['crowd_boxes_ignored']} "
                f"crowd boxes, {s['images_without_boxes']} images without boxes "
                f"({'skipped' if self.train else 'kept for evaluation'})")

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, item):
        """item: an index (flipped with probability flip_p), or (index, flip) from an EpochSampler."""
        index, flip = item if isinstance(item, tuple) else (item, bool(torch.rand(()) < self.flip_p))
        return self.load(index, flip)

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
        path = os.path.join(self.image_dir, info["file_name"])  # file_name may name a sub-folder
        try:
            with Image.open(path) as im:
                array = rgb_uint8(im, path)
        except FileNotFoundError:
            raise LocalUserError(f"image file {path} is missing; check the image folder (--data-path / --*-images) "
                            f"matches the annotation file") from None
        except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError, truncated files
            raise LocalUserError(f"image file {path} is corrupt or not an image ({type(e).__name__}); "
                            f"replace the file or remove it from the annotation file") from None
        if array.shape[:2] != (info["height"], info["width"]):  # the boxes would be in another image's pixels
            raise LocalUserError(f"image file {path} is {array.shape[1]}x{array.shape[0]} but {self.ann_file} says "
                                 f"{info['width']}x{info['height']}; fix its width/height (and boxes) in the file")
        return tv_tensors.Image(torch.from_numpy(array.copy()).permute(2, 0, 1))


def rgb_uint8(im, path):
    """A PIL image of any common mode -> uint8 [h, w, 3]: greyscale and palette expanded, alpha dropped, 16-bit
    greyscale scaled to 8 bits (PIL's own conversion would clip it at 255)."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        grey = np.clip(np.asarray(im, dtype=np.float64) / 257.0, 0, 255).round().astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if im.mode == "F":
        raise LocalUserError(f"image file {path} holds 32-bit floats; convert it to 8- or 16-bit")
    return np.asarray(im.convert("RGB"))


def categories_of(dataset) -> list:
    """[[category id, name], ...] in label order: what a model trained on the dataset predicts."""
    return [[cat, name] for cat, name in zip(dataset.cat_ids, dataset.class_names)]


def category_difference(a, b):
    """How two categories_of lists differ, in a few words (None when they are the same)."""
    if a == b:
        return None
    only_a, only_b = sorted({c for c, _ in a} - {c for c, _ in b}), sorted({c for c, _ in b} - {c for c, _ in a})
    if only_a or only_b:
        return f"category ids {only_a[:5]} only in the first, {only_b[:5]} only in the second"
    renamed = next((x, y) for x, y in zip(a, b) if x != y)
    return f"category {renamed[0][0]} is '{renamed[0][1]}' in the first, '{renamed[1][1]}' in the second"


def splits_note(train, val) -> str:
    """A UserError when the validation split's categories are not the training split's (its labels would mean other
    classes); otherwise a note naming classes with validation boxes but no training box ('' when none)."""
    difference = category_difference(categories_of(train), categories_of(val))
    if difference:
        raise UserError(f"{train.ann_file} and {val.ann_file} list different categories ({difference}); give both "
                        f"splits the same 'categories' list")
    unseen = [name for label, name in enumerate(train.class_names, start=1)
              if train.boxes_per_label[label] == 0 and val.boxes_per_label[label] > 0]
    return (f"note: {len(unseen)} classes have validation boxes but no training box ({', '.join(unseen)}); their AP "
            f"will be about 0" if unseen else "")


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


def build_loader(dataset, batch_size: int, train: bool, workers: int = 0, rank: int = 0, world_size: int = 1,
                 seed: int = 0):
    """Shuffled, flipping (train) or sequential loader over this rank's share of dataset (see EpochSampler; call
    loader.sampler.set_epoch(epoch) before each epoch)."""
    sampler = EpochSampler(dataset, shuffle=train, seed=seed, rank=rank, world_size=world_size)
    # the loader's own generator seeds its workers, so that iterating it leaves the global random state alone
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                       collate_fn=collate_fn, drop_last=train and len(sampler) > batch_size,
                                       generator=torch.Generator().manual_seed(seed), persistent_workers=workers > 0,
                                       worker_init_fn=leave_stop_signals_to_main)


def leave_stop_signals_to_main(worker_id):
    """Ctrl-C (SIGINT) reaches every process of the terminal's group, and schedulers (Slurm, kill -- -pgid) send
    SIGTERM to all of a job's processes: workers ignore both, so that the main process can finish its iteration
    and checkpoint (a worker that died of one would fail the batch in flight). Workers still end: the loader's
    shutdown asks them to, kill_workers_left_at_exit kills any left when the main process exits, and a worker
    whose main process is gone exits on its own."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def kill_workers_left_at_exit():
    """multiprocessing's own exit handler terminates (SIGTERM) its children and then waits for them: a loader worker,
    which ignores SIGTERM, would keep the process from ever exiting (e.g. after a user error raised mid-epoch).
    Registered after it, this handler runs first (atexit is last in, first out) and kills them."""
    for process in multiprocessing.active_children():
        process.kill()
        process.join()


atexit.register(kill_workers_left_at_exit)


class EpochSampler(torch.utils.data.Sampler):
    """The items of one epoch as (index, flip) pairs: the order (shuffled or not) and the horizontal flips (with the
    dataset's flip_p) depend only on (seed, epoch), never on a process's random state, so an interrupted epoch
    resumes with the same data. Under torchrun rank r takes every world_size-th item, the order padded by repeating
    its start so that every rank gets as many (DistributedSampler's split); evaluation collapses the repeats by
    image id. set_epoch(epoch, start) skips this rank's first `start` items (an epoch resumed mid-way)."""

    def __init__(self, dataset, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.dataset, self.shuffle, self.seed, self.rank, self.world_size = dataset, shuffle, seed, rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0):
        self.epoch, self.start = epoch, start

    def per_rank(self):
        return math.ceil(len(self.dataset) / self.world_size)

    def __len__(self):
        return self.per_rank() - self.start

    def __iter__(self):
        n = len(self.dataset)
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        flips = torch.rand(n, generator=generator) < getattr(self.dataset, "flip_p", 0.0)
        total = self.per_rank() * self.world_size
        order = order.repeat(math.ceil(total / max(n, 1)))[:total]
        mine = order[self.rank::self.world_size][self.start:]
        return iter([(int(i), bool(flips[i])) for i in mine])


def base_dataset(dataset):
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return dataset
