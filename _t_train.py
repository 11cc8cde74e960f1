import json
import os
import subprocess
import sys
import time

import pytest
import torch

REPO = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(REPO, "train.py")
# a handful of 64 px images, one process per core: the smallest setting that runs every code path
TINY = ["--shapes-train", "8", "--shapes-val", "4", "--shapes-size", "64", "--batch-size", "2", "--workers", "0",
        "--print-freq", "1", "--warmup-iters", "2"]


def run(args, cwd, torchrun=None, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    cmd = [sys.executable, TRAIN] if torchrun is None else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}", TRAIN]
    return subprocess.run(cmd + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def assert_user_error(res, *words):
    """One line on stderr naming the problem, exit code 2, no traceback."""
    assert res.returncode == 2, res.stdout + res.stderr
    lines = [l for l in res.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny fcos_r18 trained for 1 epoch under torchrun with 2 gloo processes."""
    cwd = tmp_path_factory.mktemp("train")
    res = run(["--stage", "train", "--model", "fcos_r18", "--epochs", "1"] + TINY, cwd, torchrun=2)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return cwd, res


def test_torchrun_train_writes_checkpoint(trained):
    cwd, res = trained
    out = cwd / "runs" / "train_fcos_r18"
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 0 and {"model", "optimizer", "lr_scheduler", "scaler", "args"} <= set(ckpt)
    assert ckpt["args"]["world_size"] == 2
    model = torch.load(out / "model.pth", map_location="cpu", weights_only=False)
    assert model["model_name"] == "fcos_r18"
    records = [json.loads(l) for l in open(out / "log.jsonl")]
    assert any("eval" in r for r in records) and any("img_s" in r for r in records)
    # rank 0 only prints: each iteration's line appears once
    assert res.stdout.count("epoch 0 [1/") == 1


def test_killed_run_resumes_to_the_same_epoch_count(tmp_path):
    args = ["--stage", "train", "--model", "fcos_r18", "--epochs", "3"] + TINY
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, TRAIN] + args, cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt_path = tmp_path / "runs" / "train_fcos_r18" / "checkpoint.pth"
    deadline = time.time() + 300
    while not ckpt_path.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    first = torch.load(ckpt_path, map_location="cpu", weights_only=False)["epoch"]
    assert first < 2, "the run finished before it could be killed; the test proves nothing"
    # without --resume the earlier run is not overwritten
    res = run(args, tmp_path)
    assert_user_error(res, "--resume")
    res = run(args + ["--resume", str(ckpt_path)], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from {ckpt_path} at epoch {first + 1}" in res.stdout
    assert torch.load(ckpt_path, map_location="cpu", weights_only=False)["epoch"] == 2
    assert not list(ckpt_path.parent.glob("*.tmp"))


def test_bad_input_is_one_clear_line(tmp_path):
    res = run(["--stage", "train", "--data-path", str(tmp_path / "nowhere")] + TINY, tmp_path)
    assert_user_error(res, "--data-path")
    res = run(["--stage", "train", "--model", "yolo_r50"] + TINY, tmp_path)
    assert_user_error(res, "yolo_r50", "retinanet_r50")
    # --resume of a file that is not a checkpoint: refused, and the file is untouched
    bogus = tmp_path / "notes.pth"
    bogus.write_text("not a checkpoint")
    res = run(["--stage", "train", "--model", "fcos_r18", "--resume", str(bogus)] + TINY, tmp_path)
    assert_user_error(res, "not a checkpoint")
    assert bogus.read_text() == "not a checkpoint"
    plain = tmp_path / "plain.pth"
    torch.save({"weights": torch.zeros(1)}, plain)
    res = run(["--stage", "train", "--model", "fcos_r18", "--resume", str(plain), "--output-dir",
               str(tmp_path / "o2")] + TINY, tmp_path)
    assert_user_error(res, "not a train.py checkpoint")


def test_bad_annotations_and_images(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    malformed = tmp_path / "bad.json"
    malformed.write_text("{ this is not json")
    flags = ["--stage", "train", "--model", "fcos_r18", "--epochs", "1", "--workers", "0", "--batch-size", "2",
             "--min-size", "64", "--max-size", "64"]
    res = run(flags + ["--train-images", str(imgs), "--train-ann", str(malformed), "--val-images", str(imgs),
                       "--val-ann", str(malformed)], tmp_path)
    assert_user_error(res, "bad.json")
    res = run(flags + ["--train-images", str(imgs), "--train-ann", str(tmp_path / "missing.json"),
                       "--val-images", str(imgs), "--val-ann", str(tmp_path / "missing.json")], tmp_path)
    assert_user_error(res, "missing.json")
    # a corrupt image file named in a valid annotation file
    (imgs / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    ann = {"images": [{"id": 1, "file_name": "broken.jpg", "width": 64, "height": 64}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [4, 4, 20, 20], "area": 400,
                            "iscrowd": 0}],
           "categories": [{"id": 3, "name": "thing"}]}
    good = tmp_path / "ann.json"
    good.write_text(json.dumps(ann))
    res = run(flags + ["--train-images", str(imgs), "--train-ann", str(good), "--val-images", str(imgs),
                       "--val-ann", str(good)], tmp_path)
    assert_user_error(res, "broken.jpg")


# ---------------------------------------------------------------------------------------------------------------------
# distillation steps with real torchvision detectors (train.Distiller, as --stage distill runs it)

def tiny_batch(num_classes, size=(64, 96), seed=0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, *size, generator=g) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 10.0, 90.0, 60.0]]),
                "labels": torch.tensor([1, num_classes - 1])} for _ in range(2)]
    return images, targets


def distill_step(teacher_name, student_name, method):
    import detectors
    import train
    import unikd
    torch.manual_seed(0)
    num_classes = 4  # 3 foreground classes + background
    kw = dict(min_size=64, max_size=96)
    teacher = detectors.build_detector(teacher_name, num_classes, **kw).eval().requires_grad_(False)
    student = detectors.build_detector(student_name, num_classes, **kw)
    ake = unikd.UniKD(num_classes=num_classes - 1, num_queries=20) if method == "unikd" else None
    model = train.Distiller(student, method, ake, adapter_layers=1 if method == "fitnet" else 2)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    frozen = {**{f"t.{k}": v.clone() for k, v in teacher.state_dict().items()},
              **({f"a.{k}": v.clone() for k, v in ake.state_dict().items()} if ake else {})}
    before = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    images, targets = tiny_batch(num_classes)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        feats = detectors.forward_features(teacher, images, targets).features
    losses = model(images, targets, feats, gen)
    opt.zero_grad()
    sum(losses.values()).backward()
    opt.step()
    after = {**{f"t.{k}": v for k, v in teacher.state_dict().items()},
             **({f"a.{k}": v for k, v in ake.state_dict().items()} if ake else {})}
    assert all(torch.equal(frozen[k], after[k]) for k in frozen), "teacher or AKE changed"
    assert all(p.grad is None for p in teacher.parameters())
    if ake is not None:
        assert all(p.grad is None and not p.requires_grad for p in ake.parameters())
    changed = {k for k, v in model.named_parameters() if v.requires_grad and not torch.equal(before[k], v)}
    assert any(k.startswith("student.backbone.body") for k in changed), "the student backbone did not learn"
    assert any(k.startswith("adapter.") for k in changed), "phi did not learn"
    return losses


@pytest.mark.parametrize("teacher,student", [("retinanet_r50", "fcos_r18"), ("faster_rcnn_r50", "retinanet_r18"),
                                             ("fcos_r50", "faster_rcnn_r18")])
def test_unikd_distill_step_between_detector_families(teacher, student):
    losses = distill_step(teacher, student, "unikd")
    assert {"loss_kd_ct", "loss_kd_pos"} <= set(losses) and all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_kd_ct"] > 0 and losses["loss_kd_pos"] > 0


def test_fitnet_distill_step():
    losses = distill_step("retinanet_r50", "fcos_r18", "fitnet")
    assert losses["loss_fitnet"] > 0


# ---------------------------------------------------------------------------------------------------------------------
# --stage pretrain / distill from the command line: used-by commands and bad input

@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """teacher (tiny fcos_r18 run) -> --stage pretrain -> ake.pth, in one scratch folder."""
    cwd = tmp_path_factory.mktemp("pretrain")
    one = ["--epochs", "1", "--num-queries", "20"] + TINY
    res = run(["--stage", "train", "--model", "fcos_r18", "--max-iters", "1"] + one, cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    res = run(["--stage", "pretrain", "--teacher", "fcos_r18"] + one, cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "AP " in res.stdout and "ake_ct" in res.stdout  # the AKE's own COCO AP and parameter counts
    blob = torch.load(cwd / "runs" / "pretrain_fcos_r18" / "ake.pth", map_location="cpu", weights_only=False)
    assert blob["teacher"] == "fcos_r18" and blob["num_classes"] == 9
    return cwd, one


def test_distill_uses_newest_ake_and_writes_student(pretrained):
    import detectors
    cwd, one = pretrained
    res = run(["--stage", "distill", "--student", "retinanet_r18"] + one, cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "runs/pretrain_fcos_r18/ake.pth" in res.stdout.splitlines()[0]
    state = torch.load(cwd / "runs" / "distill_retinanet_r18" / "student.pth", map_location="cpu")
    student = detectors.build_detector("retinanet_r18", 9, min_size=64, max_size=64)
    student.load_state_dict(state)  # the student alone, loadable by the matching builder


def test_pretrain_and_distill_bad_input(pretrained, tmp_path):
    cwd, one = pretrained
    # no teacher weights anywhere
    res = run(["--stage", "pretrain", "--teacher", "retinanet_r18"] + one, tmp_path)
    assert_user_error(res, "--stage train --model retinanet_r18")
    # no AKE anywhere
    res = run(["--stage", "distill", "--student", "fcos_r18"] + one, tmp_path)
    assert_user_error(res, "--stage pretrain")
    # --ake pointing at a file that is not an AKE
    not_ake = cwd / "runs" / "train_fcos_r18" / "model.pth"
    res = run(["--stage", "distill", "--student", "fcos_r18", "--ake", str(not_ake), "--output-dir",
               str(tmp_path / "a")] + one, cwd)
    assert_user_error(res, "not an AKE")
    ake = cwd / "runs" / "pretrain_fcos_r18" / "ake.pth"
    # an AKE of another teacher than --teacher says
    res = run(["--stage", "distill", "--student", "fcos_r18", "--ake", str(ake), "--teacher", "retinanet_r50",
               "--output-dir", str(tmp_path / "b")] + one, cwd)
    assert_user_error(res, "fcos_r18", "retinanet_r50")
    # an AKE trained for another class count
    blob = torch.load(ake, map_location="cpu", weights_only=False)
    blob["num_classes"] = 81
    other = tmp_path / "ake_coco.pth"
    torch.save(blob, other)
    res = run(["--stage", "distill", "--student", "fcos_r18", "--ake", str(other), "--output-dir",
               str(tmp_path / "c")] + one, cwd)
    assert_user_error(res, "80 classes")
