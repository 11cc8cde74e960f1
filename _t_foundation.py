"""Tests of detectors.py and eval.py (CPU, small images). Run: python -m pytest -q _t_foundation.py"""
import copy
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision.transforms import v2

import detectors
import eval as ev

torch.set_num_threads(1)  # robust on a shared 2-core box: OpenMP threads stall when a core is busy
torch.set_flush_denormal(True)  # untrained models in eval mode produce denormals: ~3x slower convs on CPU
HERE = os.path.dirname(os.path.abspath(__file__))
H, W = 128, 192  # both multiples of 64, as the embedded data
FAMILIES = ["retinanet", "fcos", "faster_rcnn", "mask_rcnn"]


def build(name, num_classes=5, **kwargs):
    torch.manual_seed(0)
    return detectors.build_detector(name, num_classes, min_size=H, max_size=W, **kwargs)


def images_and_targets(with_masks=False):
    """Two images of different sizes (so that resizing and padding both happen) with boxes in their pixels."""
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 100, 150, generator=g), torch.rand(3, 128, 160, generator=g)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 70.0], [80.0, 5.0, 140.0, 90.0]]),
                "labels": torch.tensor([1, 3])},
               {"boxes": torch.tensor([[30.0, 40.0, 50.0, 60.0]]), "labels": torch.tensor([2])}]
    if with_masks:
        for image, target in zip(images, targets):
            masks = torch.zeros(len(target["boxes"]), *image.shape[-2:], dtype=torch.uint8)
            for mask, (x1, y1, x2, y2) in zip(masks, target["boxes"].int().tolist()):
                mask[y1:y2, x1:x2] = 1
            target["masks"] = masks
    return images, targets


def expected_resize(h, w):
    """torchvision's rule, computed here independently: shorter side to H unless the longer exceeds W."""
    return min(H / min(h, w), W / max(h, w))


# --------------------------------------------------------------------------------------------- detectors

@pytest.mark.parametrize("backbone", ["r18", "r50"])
@pytest.mark.parametrize("family", FAMILIES)
def test_builds_and_hook_returns_four_levels_at_strides_8_to_64(family, backbone):
    model = build(f"{family}_{backbone}")
    assert model.unikd_name == f"{family}_{backbone}" and detectors.fpn_channels(model) == 256
    images, targets = images_and_targets(with_masks=family == "mask_rcnn")
    out = detectors.forward_with_features(model.train(), images, targets)
    loss_names = {"classification", "bbox_regression"} if family in ("retinanet", "fcos") \
        else {"loss_objectness", "loss_classifier", "loss_box_reg"}
    assert set(out.result) >= loss_names
    # both images resize to a longer side of 192 at most, shorter 128 at most -> padded to 128 x 192
    sizes = [(round(h * expected_resize(h, w)), round(w * expected_resize(h, w))) for h, w in [(100, 150), (128, 160)]]
    assert out.image_sizes == sizes
    h_pad = math.ceil(max(s[0] for s in sizes) / 64) * 64
    w_pad = math.ceil(max(s[1] for s in sizes) / 64) * 64
    assert out.batch_size_hw == (h_pad, w_pad) == (128, 192)
    assert len(out.features) == 4
    for stride, feature in zip((8, 16, 32, 64), out.features):
        assert feature.shape == (2, 256, h_pad // stride, w_pad // stride)
    assert out.features[0].requires_grad  # the student's features carry gradients to its backbone


@pytest.mark.parametrize("family", FAMILIES)
def test_hooked_forward_returns_exactly_the_plain_forward(family):
    model = build(f"{family}_r18", box_score_thresh=0.2) if "rcnn" in family else build(f"{family}_r18",
                                                                                          score_thresh=0.2)
    images, targets = images_and_targets(with_masks=family == "mask_rcnn")
    model.eval()
    with torch.no_grad():
        plain = model(images)
        hooked = detectors.forward_with_features(model, images).result
    assert len(plain) == len(hooked) == 2
    for p, h in zip(plain, hooked):
        assert p.keys() == h.keys()
        for key in p:
            assert torch.equal(p[key], h[key]), key
    model.train()
    torch.manual_seed(1)
    plain = model(images, targets)
    torch.manual_seed(1)  # R-CNN samplers draw random proposals
    hooked = detectors.forward_with_features(model, images, targets)
    assert plain.keys() == hooked.result.keys()
    for key in plain:
        assert torch.equal(plain[key], hooked.result[key]), key
    # transformed targets: the input boxes scaled by the resize factor
    for target, transformed, image in zip(targets, hooked.targets, images):
        scale = expected_resize(*image.shape[-2:])
        new_h, new_w = round(image.shape[1] * scale), round(image.shape[2] * scale)
        factor = torch.tensor([new_w / image.shape[2], new_h / image.shape[1]] * 2)
        torch.testing.assert_close(transformed["boxes"], target["boxes"] * factor)


def test_forward_features_matches_hooked_features_without_running_heads():
    model = build("retinanet_r18").eval()
    images, _ = images_and_targets()
    with torch.no_grad():
        full = detectors.forward_with_features(model, images)
        only = detectors.forward_features(model, images)
    assert only.result is None and only.batch_size_hw == full.batch_size_hw
    for a, b in zip(full.features, only.features):
        assert torch.equal(a, b)


def test_gt_box_lands_on_the_same_feature_cell_in_teacher_and_students():
    names = ["retinanet_r50", "fcos_r18", "faster_rcnn_r18"]
    models = [build(n).eval() for n in names]
    images, targets = images_and_targets()
    assert len({json.dumps(detectors.transform_config(m)) for m in models}) == 1
    batched = [m.transform(images)[0].tensors for m in models]
    assert all(torch.equal(batched[0], b) for b in batched[1:])  # the identical batched tensor

    # the second box of image 0, by hand: resize factor 192/150 = 1.28, no padding offset (top-left aligned)
    scale = expected_resize(100, 150)
    x1, y1, x2, y2 = (torch.tensor([80.0, 5.0, 140.0, 90.0]) * scale).tolist()
    cx_px, cy_px = (x1 + x2) / 2, (y1 + y2) / 2
    cells = []
    for model in models:
        with torch.no_grad():
            out = detectors.forward_features(model, images, copy.deepcopy(targets))
        h_pad, w_pad = out.batch_size_hw
        box = out.targets[0]["boxes"][1]
        cx, cy = ((box[0] + box[2]) / 2 / w_pad).item(), ((box[1] + box[3]) / 2 / h_pad).item()  # normalised
        model_cells = []
        for stride, feature in zip((8, 16, 32, 64), out.features):
            h_l, w_l = feature.shape[-2:]
            cell = (int(cy * h_l), int(cx * w_l))
            assert cell == (int(cy_px // stride), int(cx_px // stride))  # the cell whose pixels hold the centre
            model_cells.append(cell)
        cells.append(model_cells)
    assert cells[0] == cells[1] == cells[2]


def test_every_family_gets_the_same_transform():
    configs = {name: detectors.transform_config(build(name)) for name in
               ["retinanet_r18", "fcos_r18", "faster_rcnn_r18", "mask_rcnn_r18", "retinanet_r50_v2",
                "faster_rcnn_r50_v2", "mask_rcnn_r50_v2"]}
    assert len({json.dumps(c) for c in configs.values()}) == 1
    assert next(iter(configs.values()))["size_divisible"] == 64


def test_small_image_settings_and_torchvision_defaults_at_800():
    small, large = build("faster_rcnn_r18"), detectors.build_detector("faster_rcnn_r18", 5)
    assert large.rpn._pre_nms_top_n == {"training": 2000, "testing": 1000}
    assert large.roi_heads.fg_bg_sampler.batch_size_per_image == 512
    assert large.rpn.anchor_generator.sizes == ((32,), (64,), (128,), (256,), (512,))
    assert small.rpn._pre_nms_top_n == {"training": 500, "testing": 250}
    assert small.rpn.anchor_generator.sizes == ((16,), (32,), (64,), (128,), (256,))
    retina = detectors.build_detector("retinanet_r18", 5)
    assert retina.anchor_generator.sizes[0] == (32, 40, 50)  # torchvision's rounding at 800 px
    fcos = build("fcos_r18")
    # FCOS: sizes halved, radius doubled -> centre sampling radius stays 1.5 strides in pixels
    assert fcos.anchor_generator.sizes[0] == (4.0,) and fcos.center_sampling_radius * 4.0 == 1.5 * 8
    # user kwargs win over the small-image defaults
    assert build("faster_rcnn_r18", rpn_pre_nms_top_n_test=77).rpn._pre_nms_top_n["testing"] == 77


def test_names_and_weights_errors():
    assert detectors.canonical_name("fcos") == "fcos_r50"
    assert detectors.canonical_name("retinanet_v2") == "retinanet_r50_v2"
    with pytest.raises(ValueError, match="fcos_r18.*mask_rcnn_r50_v2"):
        detectors.canonical_name("yolo_r18")
    with pytest.raises(ValueError, match="no COCO weights for fcos_r18.*retinanet_r50"):
        detectors.build_detector("fcos_r18", 5, weights="DEFAULT")
    with pytest.raises(ValueError, match="DEFAULT, COCO_V1"):
        detectors.build_detector("fcos_r50", 5, weights="COCO_V7")
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        detectors.build_detector("fcos_r18", 5, weights_backbone="IMAGENET9K")


def test_checkpoint_round_trip_and_bad_checkpoints(tmp_path):
    model = build("fcos_r18")
    plain, wrapped = tmp_path / "student.pth", tmp_path / "checkpoint.pth"
    torch.save(model.state_dict(), plain)
    torch.save({"model": {"module." + k: v for k, v in model.state_dict().items()}, "epoch": 3}, wrapped)
    for path in (plain, str(wrapped)):
        torch.manual_seed(123)  # a different init, so equality proves the load
        loaded = detectors.build_detector("fcos_r18", 5, weights=path, min_size=H, max_size=W)
        for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
            assert torch.equal(a, b), k
    # trained from an ImageNet backbone: FrozenBatchNorm2d (no num_batches_tracked) -> loads into BatchNorm2d
    frozen = detectors._build_from_parts("fcos", "resnet18", 5, None, dict(detectors.TRANSFORM_DEFAULTS))
    frozen.backbone.body = torchvision.models.detection.backbone_utils.resnet_fpn_backbone(
        backbone_name="resnet18", weights=None, norm_layer=torchvision.ops.FrozenBatchNorm2d,
        returned_layers=[2, 3, 4], extra_blocks=torchvision.ops.feature_pyramid_network.LastLevelP6P7(256, 256)).body
    frozen.backbone.body.layer1[0].bn1.running_var.fill_(4.0)  # non-default statistics, to see them arrive
    torch.save(frozen.state_dict(), tmp_path / "frozen.pth")
    loaded = detectors.build_detector("fcos_r18", 5, weights=tmp_path / "frozen.pth", min_size=H, max_size=W)
    assert torch.equal(loaded.backbone.body.layer1[0].bn1.running_var, torch.full((64,), 4.0))
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    for bad, message in [(tmp_path / "missing.pth", "does not exist"), (tmp_path / "notes.pth", "not a readable"),
                         (plain, "does not fit")]:
        with pytest.raises(detectors.CheckpointError, match=message):
            detectors.build_detector("retinanet_r18" if bad == plain else "fcos_r18", 5, weights=bad)


@pytest.mark.parametrize("name", ["retinanet_r50", "fcos_r50", "mask_rcnn_r50"])
def test_coco_weights_with_other_class_count_replace_only_class_layers(name, monkeypatch):
    torch.manual_seed(7)
    coco_model = detectors.build_detector(name, detectors.COCO_NUM_CLASSES, min_size=H, max_size=W)
    enum = detectors.TORCHVISION_BUILDERS[name][1]
    # no download here: the "COCO weights" are a random 91-class model's
    monkeypatch.setattr(type(enum.DEFAULT), "get_state_dict", lambda self, *a, **k: coco_model.state_dict())
    model = detectors.build_detector(name, 9, weights="DEFAULT", min_size=H, max_size=W)
    fresh = [k for k, v in model.state_dict().items()
             if k not in coco_model.state_dict() or not torch.equal(v, coco_model.state_dict()[k])]
    expected = {"retinanet": ["head.classification_head.cls_logits.weight", "head.classification_head.cls_logits.bias"],
                "fcos": ["head.classification_head.cls_logits.weight", "head.classification_head.cls_logits.bias"],
                "mask": ["roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.cls_score.bias",
                         "roi_heads.box_predictor.bbox_pred.weight", "roi_heads.box_predictor.bbox_pred.bias",
                         "roi_heads.mask_predictor.conv5_mask.weight", "roi_heads.mask_predictor.conv5_mask.bias",
                         "roi_heads.mask_predictor.mask_fcn_logits.weight",
                         "roi_heads.mask_predictor.mask_fcn_logits.bias"]}[name.split("_")[0]]
    assert sorted(fresh) == sorted(expected)
    images, targets = images_and_targets(with_masks=name.startswith("mask"))
    targets[0]["labels"] = torch.tensor([8, 8])
    losses = model.train()(images, targets)  # the new head takes labels up to 8
    assert all(torch.isfinite(v) for v in losses.values())


# ------------------------------------------------------------------------------------------------ data

@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return ev.ensure_shapes_dataset(str(tmp_path_factory.mktemp("data") / "shapes"), num_train=12, num_val=6)


def shapes_split(shapes, split, **kwargs):
    return ev.CocoDetection(os.path.join(shapes, f"{split}2017"),
                            os.path.join(shapes, f"annotations/instances_{split}2017.json"), **kwargs)


def test_shapes_dataset_is_coco_deterministic_and_varied(shapes, tmp_path):
    again = ev.ensure_shapes_dataset(str(tmp_path / "again"), num_train=12, num_val=6)
    assert ev.ensure_shapes_dataset(shapes, num_train=12, num_val=6) == shapes  # second call: reused
    for rel in ["annotations/instances_train2017.json", "train2017/000000000003.jpg", "val2017/000000000006.jpg"]:
        assert open(os.path.join(shapes, rel), "rb").read() == open(os.path.join(again, rel), "rb").read()
    with pytest.raises(ev.UserError, match="delete it"):
        ev.ensure_shapes_dataset(shapes, num_train=13, num_val=6)
    assert not [p for p in os.listdir(os.path.dirname(shapes)) if ".tmp-" in p]  # no leftovers

    data = json.load(open(os.path.join(shapes, "annotations/instances_train2017.json")))
    assert len(data["categories"]) >= 6 and len(data["images"]) == 12
    per_image = np.bincount([a["image_id"] for a in data["annotations"]], minlength=13)[1:]
    assert per_image.min() >= 1 and per_image.max() <= 10
    for ann in data["annotations"]:
        mask = mask_utils.decode(ann["segmentation"])
        ys, xs = np.nonzero(mask)
        x, y, w, h = ann["bbox"]
        assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)  # tight on the mask
        assert ann["area"] == mask.sum() and ann["iscrowd"] == 0


def test_shapes_sizes_span_coco_small_medium_large():
    rng_objects = [ev.render_shapes_image(np.random.default_rng([5, i]), H, W)[1] for i in range(40)]
    areas = np.array([o["mask"].sum() for objects in rng_objects for o in objects])
    assert (areas < 32 ** 2).mean() > 0.2 and ((areas >= 32 ** 2) & (areas < 96 ** 2)).mean() > 0.2
    assert (areas >= 96 ** 2).mean() > 0.03


def colour_under(image_uint8, mask):
    """Mean colour of the mask's interior (one pixel eroded: JPEG and resizing blur the edges)."""
    m = mask.astype(bool)
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    pixels = image_uint8[1:-1, 1:-1][inner]
    return pixels.mean(0) if len(pixels) >= 4 else None


@pytest.mark.parametrize("min_size,max_size", [(128, 192), (64, 1000)])
def test_loader_boxes_and_masks_land_on_the_drawn_shapes_after_resize_and_flip(shapes, min_size, max_size):
    dataset = shapes_split(shapes, "train", train=True, min_size=min_size, max_size=max_size, with_masks=True)
    dataset.flip = v2.RandomHorizontalFlip(1.0)  # always flip, so the test knows
    loader = ev.build_loader(dataset, batch_size=4, train=False)
    scale = min_size / H
    checked, mismatched_unflipped = 0, 0
    for images, targets in loader:
        for image, target in zip(images, targets):
            anns = [a for a in dataset.coco.imgToAnns[target["image_id"]]]
            picture = (image.permute(1, 2, 0).numpy() * 255).round()
            assert image.shape[-2:] == (round(H * scale), round(W * scale))
            for box, label, mask, ann in zip(target["boxes"], target["labels"], target["masks"], anns):
                x, y, w, h = ann["bbox"]
                mirrored = torch.tensor([W - (x + w), y, W - x, y + h]) * scale  # by hand
                torch.testing.assert_close(box, mirrored)
                assert dataset.label_to_cat[int(label)] == ann["category_id"]
                # the mask, by hand: nearest-neighbour subsampling (pixel 2i at half size), then the mirror
                step = round(1 / scale)
                expected_mask = mask_utils.decode(ann["segmentation"])[::step, ::step][:, ::-1]
                assert np.array_equal(mask.numpy(), expected_mask)
                # the box holds the whole mask and is tight on it (exactly at full size; subsampling can miss a
                # thin tip of up to one source pixel stride)
                ys, xs = np.nonzero(mask.numpy())
                tol = 0 if step == 1 else step + 0.5
                assert box[0] - tol <= xs.min() and xs.max() + 1 <= box[2] + tol and xs.min() >= box[0] - 0.5
                assert box[1] - tol <= ys.min() and ys.max() + 1 <= box[3] + tol and ys.min() >= box[1] - 0.5
                assert xs.max() + 1 <= box[2] + 0.5 and ys.max() + 1 <= box[3] + 0.5
                inside = colour_under(picture, mask.numpy())
                if inside is None:
                    continue
                # the pixels under the mask are the shape's drawn colour (shading +-15, noise, JPEG)
                assert np.abs(inside - np.array(ann["color"])).max() < 30
                unflipped = colour_under(picture, mask.numpy()[:, ::-1])
                mismatched_unflipped += unflipped is None or np.abs(unflipped - np.array(ann["color"])).max() >= 30
                checked += 1
    assert checked > 20 and mismatched_unflipped > 0.7 * checked  # the colour check can tell a wrong flip


def test_unresized_val_image_is_the_file(shapes):
    dataset = shapes_split(shapes, "val", train=False, min_size=H, max_size=W)
    image, target = dataset[0]
    info = dataset.coco.imgs[target["image_id"]]
    raw = np.asarray(Image.open(os.path.join(shapes, "val2017", info["file_name"])).convert("RGB"))
    assert np.array_equal((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), raw)
    assert target["orig_size"] == (H, W) and "masks" not in target


def write_coco(path, images, annotations, categories):
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)


def test_category_mapping_crowd_degenerate_and_empty_images(tmp_path):
    image_dir = tmp_path / "img"
    image_dir.mkdir()
    for name in ["a.png", "b.png", "c.png"]:
        Image.fromarray(np.full((40, 60, 3), 100, np.uint8)).save(image_dir / name)
    images = [{"id": i, "file_name": n, "height": 40, "width": 60} for i, n in [(5, "a.png"), (9, "b.png"),
                                                                               (11, "c.png")]]
    anns = [{"id": 1, "image_id": 5, "category_id": 12, "bbox": [5, 5, 10, 10], "area": 100, "iscrowd": 0},
            {"id": 2, "image_id": 5, "category_id": 3, "bbox": [20, 5, 0, 10], "area": 0, "iscrowd": 0},  # w=0
            {"id": 3, "image_id": 5, "category_id": 7, "bbox": [1, 1, 30, 30], "area": 900, "iscrowd": 1},
            {"id": 4, "image_id": 9, "category_id": 3, "bbox": [70, 5, 10, 10], "area": 100, "iscrowd": 0}]  # off image
    cats = [{"id": c, "name": f"c{c}"} for c in (12, 3, 7)]
    write_coco(tmp_path / "ann.json", images, anns, cats)
    train = ev.CocoDetection(str(image_dir), str(tmp_path / "ann.json"), train=True, min_size=40, max_size=60)
    val = ev.CocoDetection(str(image_dir), str(tmp_path / "ann.json"), train=False, min_size=40, max_size=60)
    assert train.num_classes == 4 and train.cat_ids == [3, 7, 12]
    assert train.label_to_cat == {1: 3, 2: 7, 3: 12}
    assert train.ids == [5] and val.ids == [5, 9, 11]  # images without usable boxes: skipped for training only
    assert train.stats["degenerate_boxes_dropped"] == 2 and train.stats["crowd_boxes_ignored"] == 1
    _, target = val[0]
    assert target["labels"].tolist() == [3] and target["boxes"].tolist() == [[5, 5, 15, 15]]
    _, empty = val[2]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)


# ------------------------------------------------------------------------------------------ evaluation

class Oracle(torch.nn.Module):
    """Returns the loader's own targets as detections (score 1), optionally shifted by a fraction of the width."""

    def __init__(self, loader, shift=0.0, with_masks=False):
        super().__init__()
        self.queue = [t for _, targets in loader for t in targets]
        self.shift, self.with_masks = shift, with_masks

    def forward(self, images):
        out = []
        for _ in images:
            t = self.queue.pop(0)
            boxes = t["boxes"].clone()
            boxes[:, [0, 2]] += self.shift * (boxes[:, 2] - boxes[:, 0])[:, None]
            det = {"boxes": boxes, "labels": t["labels"], "scores": torch.ones(len(boxes))}
            if self.with_masks:
                det["masks"] = t["masks"][:, None].float()
            out.append(det)
        return out


def val_loader(shapes, min_size, max_size, with_masks=False):
    dataset = shapes_split(shapes, "val", train=False, min_size=min_size, max_size=max_size, with_masks=with_masks)
    return ev.build_loader(dataset, batch_size=4, train=False)


def test_coco_eval_of_ground_truth_is_one_and_shifted_boxes_less(shapes):
    loader = val_loader(shapes, 64, 96)  # predictions are mapped back from the half-size input
    perfect = ev.evaluate(Oracle(loader), loader, "cpu")
    assert set(perfect) == set(ev.METRIC_NAMES)
    assert perfect["AP"] == pytest.approx(1.0) and perfect["AP50"] == pytest.approx(1.0)
    for key in ("APs", "APm", "APl"):
        assert perfect[key] in (pytest.approx(1.0), -1.0)
    shifted = ev.evaluate(Oracle(loader, shift=0.2), loader, "cpu")
    assert shifted["AP"] < 0.9 and shifted["AP50"] == pytest.approx(1.0)  # IoU 0.67 passes 0.5, not 0.75+
    assert ev.evaluate(Oracle(loader, shift=0.6), loader, "cpu")["AP"] < shifted["AP"]


def test_coco_eval_segm_of_ground_truth_masks_is_one(shapes):
    loader = val_loader(shapes, H, W, with_masks=True)
    metrics = ev.evaluate(Oracle(loader, with_masks=True), loader, "cpu")
    assert metrics["AP"] == pytest.approx(1.0) and metrics["segm_AP"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def cli_setup(shapes, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    ckpt = root / "student.pth"
    model = build("fcos_r18", num_classes=9)
    torch.nn.init.zeros_(model.head.classification_head.cls_logits.bias)  # scores ~0.5: detections to score
    torch.save(model.state_dict(), ckpt)
    return root, ckpt


def run_main(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ev.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return exit_info.value.code, err


def copy_layout(shapes, dest):
    shutil.copytree(shapes, dest)
    return dest


def test_cli_bad_inputs_exit_2_with_one_line_and_write_nothing(shapes, cli_setup, tmp_path, capsys):
    root, ckpt = cli_setup
    ckpt_bytes = ckpt.read_bytes()
    broken_json = copy_layout(shapes, tmp_path / "broken_json")
    (broken_json / "annotations/instances_val2017.json").write_text('{"images": [')
    no_ann = copy_layout(shapes, tmp_path / "no_ann")
    os.remove(no_ann / "annotations/instances_val2017.json")
    not_coco = copy_layout(shapes, tmp_path / "not_coco")
    (not_coco / "annotations/instances_val2017.json").write_text('{"images": 3}')
    missing_image = copy_layout(shapes, tmp_path / "missing_image")
    os.remove(missing_image / "val2017/000000000002.jpg")
    not_ckpt = tmp_path / "notes.pth"
    not_ckpt.write_text("hello")
    cases = [
        (["--data-path", str(tmp_path / "nowhere")], "nowhere is not a folder"),
        (["--data-path", str(no_ann)], "instances_val2017.json not found"),
        (["--data-path", str(broken_json)], "is not valid JSON"),
        (["--data-path", str(not_coco)], "is not COCO format"),
        (["--data-path", str(missing_image)], "000000000002.jpg is missing"),
        (["--data-path", shapes, "--model", "yolo"], "unknown model 'yolo'"),
        (["--data-path", shapes, "--ckpt", str(not_ckpt)], "notes.pth is not a readable checkpoint"),
        (["--data-path", shapes, "--ckpt", str(tmp_path / "none.pth")], "none.pth not found"),
        (["--data-path", shapes, "--model", "retinanet_r18"], "does not fit this model"),
        (["--data-path", shapes, "--visualize", "2"], "--visualize needs --out"),
    ]
    for extra, message in cases:
        argv = ["--model", "fcos_r18", "--ckpt", str(ckpt), "--workers", "0", "--batch-size", "6"] + extra
        code, err = run_main(argv, capsys)
        assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], (extra, err)
        assert ";" in err[0]  # problem; fix
    assert ckpt.read_bytes() == ckpt_bytes and not_ckpt.read_text() == "hello"
    assert not [p for p in os.listdir(root) if p.endswith(".json")]


def test_cli_corrupt_image_in_a_worker_process_is_one_line(shapes, cli_setup, tmp_path):
    _, ckpt = cli_setup
    corrupt = copy_layout(shapes, tmp_path / "corrupt")
    (corrupt / "val2017/000000000003.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "eval.py"), "--model", "fcos_r18", "--ckpt", str(ckpt),
                           "--data-path", str(corrupt), "--workers", "1", "--batch-size", "2", "--device", "cpu"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr
    assert err[0].startswith("error: image file") and "000000000003.jpg is corrupt" in err[0]
    assert not os.path.exists(os.path.splitext(ckpt)[0] + "_eval.json")


def test_cli_evaluates_writes_json_next_to_checkpoint_and_pictures(shapes, cli_setup, tmp_path, capsys):
    root, ckpt = cli_setup
    before = ckpt.read_bytes()
    metrics = ev.main(["--model", "fcos_r18", "--ckpt", str(ckpt), "--data-path", shapes, "--workers", "0",
                       "--visualize", "2", "--out", str(tmp_path / "vis")])
    out = capsys.readouterr().out
    assert sum(line.startswith(" Average P") or line.startswith(" Average R") for line in out.splitlines()) == 12
    written = json.load(open(root / "student_eval.json"))
    assert written["metrics"] == metrics and set(ev.METRIC_NAMES) <= set(metrics)
    assert ckpt.read_bytes() == before
    assert sorted(os.listdir(tmp_path / "vis")) == ["000000000001.png", "000000000002.png"]
    os.remove(root / "student_eval.json")


# ------------------------------------------------------------------------------------------ distributed

def _ddp_worker(rank, world_size, init_file, shapes, results_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        dataset = shapes_split(shapes, "val", train=False, min_size=64, max_size=96)
        loader = ev.build_loader(dataset, batch_size=2, train=False, distributed=True)
        metrics = ev.evaluate(Oracle(loader), loader, "cpu")
        # the hook through a DDP wrapper: features come back and gradients still synchronise
        model = torch.nn.parallel.DistributedDataParallel(build("fcos_r18"))
        images, targets = images_and_targets()
        images = [image * (0.5 + 0.5 * rank) for image in images]  # per-rank data: gradients differ until synced
        out = detectors.forward_with_features(model, images, targets)
        (sum(out.result.values()) + 0 * sum(f.sum() for f in out.features)).backward()
        grad = model.module.head.classification_head.cls_logits.weight.grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.MAX)
        same_grad = torch.equal(grad, model.module.head.classification_head.cls_logits.weight.grad)
        with open(os.path.join(results_dir, f"{rank}.json"), "w") as f:
            json.dump({"metrics": metrics, "shard": len(loader.sampler), "levels": len(out.features),
                       "same_grad": same_grad}, f)
    finally:
        dist.destroy_process_group()


def test_distributed_evaluate_gathers_to_rank_0_and_hook_works_under_ddp(shapes, tmp_path):
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), shapes, str(tmp_path)), nprocs=2)
    rank0, rank1 = (json.load(open(tmp_path / f"{r}.json")) for r in (0, 1))
    assert rank0["shard"] == rank1["shard"] == 3  # 6 val images split over 2 ranks
    assert rank0["metrics"]["AP"] == pytest.approx(1.0) and rank1["metrics"] == {}
    assert rank0["levels"] == rank1["levels"] == 4 and rank0["same_grad"] and rank1["same_grad"]
