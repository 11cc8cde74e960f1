"""The embedded synthetic dataset: COCO-format images of shapes, generated once into data/shapes/.

Every stage uses it when no --data-path is given, so each command works on a fresh machine with no download.
Deterministic in its parameters (one random generator per image), written to a temporary sibling folder and renamed,
and versioned: a folder generated with other parameters or an older generator is never silently reused.

    root = ensure_shapes_dataset("data/shapes", num_train=2000, num_val=500, image_size=(128, 192), seed=0)
"""
import functools
import json
import math
import os
import shutil
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from scipy.ndimage import binary_dilation

from utils import UserError

SHAPES_ROOT = "data/shapes"
SHAPES_IMAGE_SIZE = (128, 192)  # (H, W): both multiples of 64 (no padding waste, exact strides up to 64)
SHAPES_DEFAULTS = dict(num_train=2000, num_val=500, image_size=SHAPES_IMAGE_SIZE, seed=0)
SHAPES_VERSION = 2  # bump when the generator changes, so an old data/shapes is not silently reused
SHAPE_CLASSES = ("disk", "ring", "rectangle", "triangle", "star", "cross", "crescent", "arrow")


def shapes_root(num_train, num_val, image_size, seed):
    """data/shapes for the defaults; another folder per size/count/seed, so no generated set is ever replaced."""
    if (num_train, num_val, tuple(image_size), seed) == tuple(SHAPES_DEFAULTS.values()):
        return SHAPES_ROOT
    return f"{SHAPES_ROOT}_{num_train}x{num_val}_{image_size[0]}x{image_size[1]}_s{seed}"

def ensure_shapes_dataset(root=SHAPES_ROOT, num_train=2000, num_val=500, image_size=SHAPES_IMAGE_SIZE, seed=0,
                          verbose=False):
    """Generate the synthetic shapes dataset into root (COCO layout) unless it is already there; returns root.

    Deterministic in its parameters; written to a temporary sibling folder and renamed, so a killed run never
    leaves half a dataset, and concurrent callers (DDP ranks) agree on one copy. image_size: (H, W) or an int
    for square images. A root generated with other parameters is a UserError (it is never overwritten).
    verbose: say what is generated, and its progress with the time left.
    """
    height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    params = {"version": SHAPES_VERSION, "num_train": num_train, "num_val": num_val, "height": height,
              "width": width, "seed": seed}
    existing = shapes_params(root)
    if existing == params:
        return root
    if existing is not None or os.path.exists(root):
        raise UserError(f"{root} exists but was not generated with {params}; delete it to regenerate it, or pass "
                        f"--data-path for data of your own")
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(root) + ".tmp-", dir=parent)
    progress = Progress(num_train + num_val, f"generating the embedded dataset ({num_train} train + {num_val} val "
                                             f"images, {height}x{width}) into {root}, once", verbose)
    try:
        for split_index, (split, count) in enumerate((("train", num_train), ("val", num_val))):
            write_shapes_split(tmp, split, count, height, width, seed, split_index, progress)
        with open(os.path.join(tmp, "params.json"), "w") as f:
            json.dump(params, f)
        try:
            os.rename(tmp, root)
        except OSError:  # another process finished first; its copy is identical
            if shapes_params(root) != params:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def shapes_params(root):
    """The generator parameters recorded in a shapes dataset folder, or None when it is not one."""
    try:
        with open(os.path.join(root, "params.json")) as f:
            params = json.load(f)
    except (OSError, ValueError):
        return None
    return params if isinstance(params, dict) and {"version", "height", "width"} <= set(params) else None


class Progress:
    """Prints what is generated, then done/total with the time left about every 10 s (silent unless verbose)."""

    def __init__(self, total, what, verbose):
        self.total, self.done, self.verbose, self.t0, self.last = total, 0, verbose, time.time(), time.time()
        if verbose:
            print(f"{what} ...", flush=True)

    def step(self):
        self.done += 1
        now = time.time()
        if self.verbose and (now - self.last > 10 or self.done == self.total):
            left = (now - self.t0) / self.done * (self.total - self.done)
            print(f"  {self.done}/{self.total} images, {left:.0f} s left", flush=True)
            self.last = now


def write_shapes_split(root, split, count, height, width, seed, split_index, progress=None):
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
        if progress is not None:
            progress.step()
    categories = [{"id": i, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPE_CLASSES, 1)]
    with open(os.path.join(root, "annotations", f"instances_{split}2017.json"), "w") as f:
        json.dump({"info": {"description": "UniKD synthetic shapes"}, "images": images,
                   "annotations": annotations, "categories": categories}, f)


def render_shapes_image(rng, height, width, max_objects=6, min_visible=0.7, margin=2, max_tries=20):
    """One image: a lightly cluttered background, then 1..max_objects shapes, largest first, none touching another.

    No occlusion: a shape is re-placed while it would come within `margin` pixels of one already painted, or leave
    less than min_visible of its area inside the frame (truncated objects, as in COCO); after max_tries it is left
    out, so every painted shape is annotated whole.
    Returns (uint8 [H, W, 3], [{label, mask: uint8 [H, W], color: [r, g, b]}, ...]).
    """
    canvas = background(rng, height, width)
    taken = np.zeros((height, width), bool)  # painted pixels, grown by the margin
    objects = []
    for label, size in sample_objects(rng, int(rng.integers(1, max_objects + 1)), min(height, width)):
        for _ in range(max_tries):
            mask, full_area = shape_mask(rng, SHAPE_CLASSES[label - 1], size, height, width)
            if mask.sum() >= max(min_visible * full_area, 12) and not (mask & taken).any():
                break
        else:
            continue
        color = object_color(rng, canvas[mask])
        canvas[mask] = shaded(rng, color, mask)
        taken |= binary_dilation(mask, iterations=margin)
        objects.append({"label": label, "mask": mask.astype(np.uint8), "color": [int(c) for c in color]})
    canvas += rng.normal(0, rng.uniform(2, 5), canvas.shape)  # sensor noise over everything
    return np.clip(canvas, 0, 255).astype(np.uint8), objects


# sqrt(mask area) in px, log-uniform: COCO's small (< 32) and medium (32-96) objects, none below 16 px, where a
# ring, a disk and a crescent stop being different shapes at this resolution
ROOT_AREA_RANGE = (16.0, 80.0)


def sample_objects(rng, count, short_side):
    """count (class label, nominal diameter) pairs, largest first (placed first: the small ones fit around them).
    The diameter gives the shape a mask area whose square root is log-uniform in ROOT_AREA_RANGE."""
    labels = rng.integers(1, len(SHAPE_CLASSES) + 1, count)
    low, high = ROOT_AREA_RANGE[0], min(ROOT_AREA_RANGE[1], 0.6 * short_side)
    root_area = np.exp(rng.uniform(math.log(low), math.log(max(high, low)), count))
    # area = unit_area * (d/2)^2 for a shape drawn in a [-d/2, d/2] box (stretching keeps the area)
    diameters = [2 * r / math.sqrt(unit_area(SHAPE_CLASSES[l - 1])) for r, l in zip(root_area, labels)]
    order = np.argsort(diameters)[::-1]
    return [(int(labels[i]), float(diameters[i])) for i in order]


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
    """Float [H, W, 3] background: a colour gradient, soft blotches, maybe a faint distractor patch and thin lines
    (light clutter: nothing with a class's outline)."""
    y, x = np.mgrid[0:height, 0:width]
    c0, c1 = rng.uniform(30, 225, 3), rng.uniform(30, 225, 3)
    direction = rng.normal(size=2)
    t = (x * direction[0] + y * direction[1]) / (np.abs(direction).sum() * max(height, width))
    t = (t - t.min()) / max(np.ptp(t), 1e-6)
    canvas = c0 + (c1 - c0) * t[..., None]
    canvas += rng.uniform(5, 15) * smooth_noise(rng, height, width, fields=3).transpose(1, 2, 0)
    if rng.random() < 0.5:  # an amorphous patch: many waves, so no class shape
        patch = smooth_noise(rng, height, width, waves=10, max_freq=6.0)[0] > rng.uniform(0.5, 0.9)
        canvas[patch] = 0.75 * canvas[patch] + 0.25 * rng.uniform(0, 255, 3)
    lines = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(lines)
    for _ in range(int(rng.integers(0, 3))):  # thin random-walk polylines
        steps = rng.normal(0, 12, (int(rng.integers(2, 6)), 2)).cumsum(0) + rng.uniform(0, [width, height])
        draw.line([tuple(p) for p in steps], fill=1, width=1)
    line_mask = np.asarray(lines, dtype=bool)
    canvas[line_mask] = 0.5 * canvas[line_mask] + 0.5 * rng.uniform(0, 255, 3)
    return canvas


def object_color(rng, pixels_below, min_distance=100.0, tries=20):
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

