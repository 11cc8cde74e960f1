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
