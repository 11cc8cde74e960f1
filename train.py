"""Every training stage of UniKD, in one flat file.

    python train.py --stage train    --model retinanet_r50          # plain detector (teacher or baseline)
    python train.py --stage pretrain --teacher retinanet_r50        # stage 1: AKEs absorb the teacher (Eq. 6)
    python train.py --stage distill  --student fcos_r18             # stage 2: student mimics the AKEs' knowledge (Eq. 7)
    python train.py --stage distill  --student fcos_r18 --method fitnet|none
    python train.py --stage dump     --ake runs/pretrain_retinanet_r50/ake.pth   # offline KD: store the teacher's
    python train.py --stage distill  --student fcos_r18 --offline runs/dump_retinanet_r50  # knowledge once (sec. 3.3)

Multi-GPU: `torchrun --nproc_per_node=8 train.py ...` (NCCL on GPUs, gloo on CPU). Without --data-path every
stage uses the embedded synthetic dataset (data/shapes/, generated on first use).
"""
import argparse
import glob
import hashlib
import itertools
import json
import math
import os
import statistics
import sys
import time
import zlib
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import detectors
import eval as evaluation  # our eval.py (the module name shadows the builtin only inside that module)
import unikd
from eval import UserError

AKE_FILE_KIND = "unikd_ake"
CHECKPOINT_KIND = "unikd_checkpoint"
STORE_KIND = "unikd_knowledge_store"
STORE_VERSION = 1
DUMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
COCO_TRAIN_IMAGES, COCO_SIZE = 118287, (800, 1333)  # train2017 at the paper's resize, for storage projections


# ----------------------------------------------------------------------------------------------------------------------
# flags (torchvision's detection references where they overlap)

def get_args_parser():
    p = evaluation.ArgumentParser(description="UniKD: train detectors, pretrain AKEs, distil students", add_help=True)
    p.add_argument("--stage", default="train", choices=["train", "pretrain", "dump", "distill", "demo", "grid"])
    # models
    p.add_argument("--model", default="retinanet_r50", help="--stage train: detector to train")
    p.add_argument("--teacher", default=None, help="--stage pretrain: teacher detector name")
    p.add_argument("--teacher-weights", default=None, help="teacher weights: a path or DEFAULT (torchvision COCO)")
    p.add_argument("--student", default="fcos_r18", help="--stage distill: student detector name")
    p.add_argument("--ake", default=None, help="--stage dump/distill: ake.pth (default: newest runs/pretrain_*/ake.pth; "
                   "with --offline, the AKE the store was dumped with)")
    p.add_argument("--method", default="unikd", choices=["unikd", "fitnet", "none"], help="distillation method")
    p.add_argument("--weights", default=None, help="initial weights of the trained detector (path or DEFAULT)")
    p.add_argument("--weights-backbone", default=None, help="ImageNet backbone weights, e.g. DEFAULT")
    # data: --data-path, --train-images/--train-ann/--val-images/--val-ann, --min-size, --max-size (eval.py)
    evaluation.add_data_args(p)
    p.add_argument("--shapes-train", default=2000, type=int, help="embedded dataset: training images")
    p.add_argument("--shapes-val", default=500, type=int, help="embedded dataset: validation images")
    p.add_argument("--shapes-size", default=list(evaluation.SHAPES_IMAGE_SIZE), type=int, nargs="+",
                   help="embedded dataset: image size, H W (or one number for square images)")
    p.add_argument("--shapes-seed", default=0, type=int, help="embedded dataset: generator seed")
    p.add_argument("-j", "--workers", default=2, type=int)
    # schedule (the paper's 1x: 12 epochs, decay at 8 and 11)
    p.add_argument("--epochs", default=None, type=int, help="default 12 (train, distill), 15 (pretrain)")
    p.add_argument("-b", "--batch-size", default=8, type=int, help="images per GPU/process")
    p.add_argument("--lr", default=None, type=float,
                   help="default: 0.01 one-stage / 0.02 two-stage at batch 16, scaled linearly; AdamW 2e-4 for pretrain")
    p.add_argument("--momentum", default=0.9, type=float)
    p.add_argument("--wd", "--weight-decay", default=None, type=float, dest="weight_decay",
                   help="default 1e-4 (SGD and AdamW)")
    p.add_argument("--lr-steps", default=None, nargs="+", type=int, help="epochs at which lr drops 10x")
    p.add_argument("--warmup-iters", default=500, type=int)
    p.add_argument("--clip-grad", default=None, type=float, help="max grad norm (default 0.1 for pretrain, off otherwise)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (GPU only)")
    p.add_argument("--max-iters", default=None, type=int, help="cap on iterations per epoch (smoke tests)")
    # UniKD (paper defaults)
    p.add_argument("--num-queries", default=200, type=int, help="N, queries per AKE")
    p.add_argument("--extractor-layers", default=1, type=int, choices=[1, 2, 3], help="decoder layers in f_e")
    p.add_argument("--adapter-layers", default=None, type=int, choices=[0, 1, 2, 3, 4],
                   help="deformable self-attention layers in phi (default: 2 for unikd, 1 for fitnet, as the paper)")
    p.add_argument("--lambda-ct", default=10.0, type=float, help="lambda_1 of Eq. (7)")
    p.add_argument("--lambda-pos", default=10.0, type=float, help="lambda_2 of Eq. (7)")
    p.add_argument("--fitnet-weight", default=1.0, type=float, help="weight of the FitNet feature loss")
    # offline KD (paper sec. 3.3)
    p.add_argument("--offline", default=None, metavar="STORE",
                   help="--stage distill: read the teacher's knowledge from a --stage dump store; no teacher is run")
    p.add_argument("--dump-dtype", default="fp16", choices=sorted(DUMP_DTYPES),
                   help="--stage dump: dtype of the stored embeddings (boxes and reference points stay fp32)")
    p.add_argument("--dump-flips", default=2, type=int, choices=[1, 2],
                   help="--stage dump: 2 stores both horizontal-flip states of every image (the student trains with "
                        "random flips), 1 only the unflipped one (the student then trains without flips)")
    p.add_argument("--dump-shard-images", default=256, type=int,
                   help="--stage dump: images per shard file (a killed dump resumes at the first unfinished shard)")
    p.add_argument("--kd-cost", default=0, type=int, metavar="STEPS",
                   help="--stage distill: instead of training, time STEPS online KD steps against teacher forward + "
                        "student step (no KD) on the same batches, print the medians and their ratio")
    # demo and grid (the paper's Table 2 in miniature): schedules of their steps
    p.add_argument("--teachers", default="fcos_r34,faster_rcnn_r50", help="--stage grid: teacher detectors")
    p.add_argument("--students", default="retinanet_r18_v2,fcos_r18", help="--stage grid: student detectors")
    p.add_argument("--methods", default="none,fitnet,unikd", help="--stage grid: distillation methods")
    p.add_argument("--seeds", default="0,1,2", help="--stage grid: student seeds (teacher and AKE: seed 0)")
    p.add_argument("--teacher-epochs", default=None, type=int, help="--stage demo/grid: teacher training epochs")
    p.add_argument("--pretrain-epochs", default=None, type=int, help="--stage demo/grid: AKE pretraining epochs")
    p.add_argument("--student-epochs", default=None, type=int, help="--stage demo/grid: student epochs")
    p.add_argument("--report", action="store_true",
                   help="--stage grid: write results.md from the steps finished so far (partial cells say how many "
                        "seeds they hold); train nothing")
    # bookkeeping
    p.add_argument("--output-dir", default=None, help="default runs/<stage>_<model>")
    p.add_argument("--resume", default=None, help="checkpoint.pth to continue from")
    p.add_argument("--eval-every", default=1, type=int, help="evaluate every N epochs (0: only at the end)")
    p.add_argument("--print-freq", default=20, type=int)
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--device", default=None, help="default cuda if available, else cpu")
    return p


# ----------------------------------------------------------------------------------------------------------------------
# distributed, logging, checkpoints

def init_distributed(args):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; a plain `python train.py` runs as a world of one."""
    args.distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    args.rank, args.world_size, local_rank = 0, 1, 0
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.distributed:
        args.rank, args.world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if args.device.startswith("cuda"):
            torch.cuda.set_device(local_rank)
            args.device = f"cuda:{local_rank}"
        backend = "nccl" if args.device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    return torch.device(args.device)


def is_main(args):
    return args.rank == 0


def log(args, *msg):
    if is_main(args):
        print(*msg, flush=True)


def atomic_save(obj, path):
    """Write to a temp name and rename, so a kill never leaves a torn file."""
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, args=None):
    """A resumable checkpoint (of this stage and model when args are given), or a UserError naming the problem."""
    if not os.path.isfile(path):
        raise UserError(f"--resume {path}: no such file; pass the checkpoint.pth of an earlier run")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # pickle/zip errors: not a torch file at all
        raise UserError(f"--resume {path}: not a checkpoint ({type(e).__name__}); pass the checkpoint.pth of an earlier run")
    if not isinstance(ckpt, dict) or ckpt.get("kind") != CHECKPOINT_KIND:
        raise UserError(f"--resume {path}: not a train.py checkpoint (no optimizer/epoch state); "
                        f"pass the checkpoint.pth of an earlier run")
    if args is not None and (ckpt.get("stage"), ckpt.get("run")) != (args.stage, args.run_name):
        raise UserError(f"--resume {path}: checkpoint of `{ckpt.get('stage')} {ckpt.get('run')}`, not "
                        f"`{args.stage} {args.run_name}`; pass the checkpoint.pth of this stage and model")
    return ckpt


class JsonlLogger:
    """One JSON object per line in log.jsonl; rank 0 only."""

    def __init__(self, args):
        self.path = os.path.join(args.output_dir, "log.jsonl") if is_main(args) else None

    def write(self, **record):
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------------------------------------------------
# data

def build_data(args, with_masks):
    """Train/val datasets and loaders; the embedded dataset is generated on first use (rank 0 first)."""
    if args.embedded:
        if is_main(args):
            evaluation.ensure_shapes_dataset(**shapes_kwargs(args))
        if args.distributed:
            dist.barrier()
        args.data_path = evaluation.ensure_shapes_dataset(**shapes_kwargs(args))
    args.with_masks = with_masks
    train_ds, val_ds = evaluation.build_datasets(args)
    train_loader = evaluation.build_loader(train_ds, args.batch_size, train=True, workers=args.workers,
                                           distributed=args.distributed, seed=args.seed)
    val_loader = evaluation.build_loader(val_ds, args.batch_size, train=False, workers=args.workers,
                                         distributed=args.distributed, seed=args.seed)
    return train_ds, train_loader, val_loader


def shapes_kwargs(args):
    """data/shapes for the defaults; another folder per size/count/seed, so no generated set is ever replaced."""
    size = tuple(args.shapes_size) * (2 if len(args.shapes_size) == 1 else 1)
    default = (args.shapes_train, args.shapes_val, size, args.shapes_seed) == \
        (2000, 500, evaluation.SHAPES_IMAGE_SIZE, 0)
    root = evaluation.SHAPES_ROOT if default else \
        f"{evaluation.SHAPES_ROOT}_{args.shapes_train}x{args.shapes_val}_{size[0]}x{size[1]}_s{args.shapes_seed}"
    return dict(root=root, num_train=args.shapes_train, num_val=args.shapes_val, image_size=size, seed=args.shapes_seed)


def set_size_defaults(args):
    """COCO-format data: 800/1333 (the paper); the embedded dataset: its own image size, so nothing is rescaled."""
    args.embedded = evaluation.uses_embedded_data(args)
    if args.embedded:
        size = shapes_kwargs(args)["image_size"]
        args.min_size = args.min_size or min(size)
        args.max_size = args.max_size or max(max(size), args.min_size)
    evaluation.resolve_sizes(args)


def to_device(images, targets, device):
    return [im.to(device, non_blocking=True) for im in images], evaluation.targets_to(targets, device)


# ----------------------------------------------------------------------------------------------------------------------
# optimisation

def default_lr(args, family):
    """The paper's 1x: 0.01 one-stage, 0.02 two-stage at batch 16, scaled linearly with the total batch."""
    base = 0.02 if family in ("faster_rcnn", "mask_rcnn") else 0.01
    return base * args.batch_size * args.world_size / 16


def build_scheduler(optimizer, args, iters_per_epoch):
    """Linear warm-up over the first iterations, then x0.1 at each of --lr-steps (epochs); stepped every iteration."""
    warmup = min(args.warmup_iters, max(1, iters_per_epoch * args.epochs - 1))

    def factor(it):
        epoch = it // max(1, iters_per_epoch)
        decay = 0.1 ** sum(epoch >= s for s in args.lr_steps)
        if it < warmup:
            alpha = it / warmup
            return decay * (0.001 * (1 - alpha) + alpha)
        return decay

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast(args, device):
    """bf16 autocast on GPU; on CPU it is off (and said so once at start-up)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.amp and device.type == "cuda")


def reduce_dict(losses, args):
    """Mean of each loss over ranks, for logging."""
    names = sorted(losses)
    vals = torch.stack([losses[k].detach().float() for k in names])
    if args.distributed:
        dist.all_reduce(vals)
        vals /= args.world_size
    return {k: v.item() for k, v in zip(names, vals)}


# ----------------------------------------------------------------------------------------------------------------------
# the training loop shared by every stage

def fit(args, device, module, loss_fn, params, optimizer, train_loader, evaluate_fn, save_fn, resume=None):
    """Epoch loop: warm-up + step schedule, logging, per-epoch eval, atomic checkpoints, --resume.

    loss_fn(images, targets) -> dict of scalar losses (summed for the backward pass);
    evaluate_fn() -> dict of metrics (rank 0) ; save_fn(epoch, metrics) writes the stage's own artefacts;
    resume: the checkpoint dict prepare_output_dir loaded for --resume.
    """
    iters_per_epoch = len(train_loader) if args.max_iters is None else min(len(train_loader), args.max_iters)
    if iters_per_epoch == 0:
        raise UserError(f"{len(train_loader.dataset)} training images make no full batch of {args.batch_size} per "
                        f"process; lower --batch-size or use more images")
    scheduler = build_scheduler(optimizer, args, iters_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=False)  # bf16 needs no loss scaling; kept for the ckpt format
    start_epoch, metrics = 0, {}
    if resume is not None:
        ckpt = resume
        module.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["lr_scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, metrics = ckpt["epoch"] + 1, ckpt.get("metrics", {})
        log(args, f"resumed from {args.resume} at epoch {start_epoch}")
    jsonl = JsonlLogger(args)
    total_iters = iters_per_epoch * args.epochs
    t_start = time.time()
    for epoch in range(start_epoch, args.epochs):
        if args.distributed:
            train_loader.sampler.set_epoch(epoch)
        elif getattr(train_loader.sampler, "generator", None) is not None:
            train_loader.sampler.generator.manual_seed(args.seed + epoch)  # epoch k's order is the same after --resume
        module.train()
        t_epoch, n_images = time.time(), 0
        for it, (images, targets) in enumerate(train_loader):
            if it >= iters_per_epoch:
                break
            images, targets = to_device(images, targets, device)
            with autocast(args, device):
                losses = loss_fn(images, targets)
            loss = sum(losses.values())
            logged = reduce_dict(losses, args)
            if not math.isfinite(sum(logged.values())):
                raise RuntimeError(f"loss is {sum(logged.values())} at epoch {epoch} iter {it}: {logged}; "
                                   f"lower --lr or check the data")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip_grad:
                torch.nn.utils.clip_grad_norm_(params, args.clip_grad)
            optimizer.step()
            lr = optimizer.param_groups[0]["lr"]  # the lr this step used
            scheduler.step()
            n_images += len(images) * args.world_size
            if it % args.print_freq == 0 or it == iters_per_epoch - 1:
                done = epoch * iters_per_epoch + it + 1 - start_epoch * iters_per_epoch
                left = total_iters - (epoch * iters_per_epoch + it + 1)
                eta = (time.time() - t_start) / max(1, done) * left
                img_s = n_images / max(1e-9, time.time() - t_epoch)
                terms = "  ".join(f"{k} {v:.4f}" for k, v in logged.items())
                log(args, f"epoch {epoch} [{it + 1}/{iters_per_epoch}]  loss {sum(logged.values()):.4f}  {terms}  "
                          f"lr {lr:.2e}  {img_s:.1f} img/s  eta {timedelta(seconds=int(eta))}")
                jsonl.write(epoch=epoch, iter=it + 1, loss=sum(logged.values()), lr=lr, img_s=img_s, **logged)
        last = epoch == args.epochs - 1
        if last or (args.eval_every and (epoch + 1) % args.eval_every == 0):
            metrics = evaluate_fn()
            log(args, f"epoch {epoch} eval: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            jsonl.write(epoch=epoch, eval=metrics, epoch_time_s=time.time() - t_epoch)
        if is_main(args):
            save_fn(epoch, metrics)
            atomic_save({"kind": CHECKPOINT_KIND, "stage": args.stage, "run": args.run_name,
                         "model": module.state_dict(), "optimizer": optimizer.state_dict(),
                         "lr_scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                         "metrics": metrics, "args": vars(args)}, os.path.join(args.output_dir, "checkpoint.pth"))
    return metrics


def prepare_output_dir(args, default_name):
    """runs/<default_name> unless given; checks --resume (returns its checkpoint) before anything is written, and
    refuses to start over an earlier run's checkpoint."""
    args.run_name = default_name
    args.output_dir = args.output_dir or os.path.join("runs", default_name)
    ckpt = os.path.join(args.output_dir, "checkpoint.pth")
    resume = load_checkpoint(args.resume, args) if args.resume else None
    if os.path.exists(ckpt) and not (args.resume and os.path.samefile(args.resume, ckpt)):
        raise UserError(f"{ckpt} exists from an earlier run; pass --resume {ckpt} to continue it "
                        f"or --output-dir to start a new one")
    if is_main(args):
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=1)
    return resume


def wrap_ddp(module, args, device):
    if not args.distributed:
        return module
    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None)


def sgd(params, args):
    return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)


def set_schedule_defaults(args, family, epochs, optimizer="sgd"):
    args.epochs = args.epochs or epochs
    args.weight_decay = 1e-4 if args.weight_decay is None else args.weight_decay
    if args.lr is None:
        args.lr = default_lr(args, family) if optimizer == "sgd" else 2e-4
    if args.lr_steps is None:  # 1x: 8 and 11 of 12; scaled for other lengths
        args.lr_steps = [round(args.epochs * 8 / 12), round(args.epochs * 11 / 12)] if optimizer == "sgd" \
            else [round(args.epochs * 2 / 3)]


def model_name(name, flag):
    """The canonical detector name, or a UserError listing the valid ones."""
    try:
        return detectors.canonical_name(name)
    except ValueError as e:
        raise UserError(f"{flag} {name}: {e}")


def build_model(name, num_classes, flag, **kwargs):
    """detectors.build_detector, with weight/checkpoint problems turned into one-line user errors."""
    try:
        return detectors.build_detector(name, num_classes, **kwargs)
    except (detectors.CheckpointError, ValueError) as e:
        raise UserError(f"{flag}: {e}")


# ----------------------------------------------------------------------------------------------------------------------
# --stage train: a plain detector

def stage_train(args, device):
    name = model_name(args.model, "--model")
    family = detectors.family_of(name)
    set_schedule_defaults(args, family, epochs=12)
    resume = prepare_output_dir(args, f"train_{name}")
    train_ds, train_loader, val_loader = build_data(args, with_masks=family == "mask_rcnn")
    model = build_model(name, train_ds.num_classes, "--weights/--weights-backbone", weights=args.weights,
                        weights_backbone=args.weights_backbone, min_size=args.min_size,
                        max_size=args.max_size).to(device)
    log(args, f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
              f"{train_ds.num_classes - 1} classes, {len(train_ds)} training images")
    ddp_model = wrap_ddp(model, args, device)
    params = [p for p in model.parameters() if p.requires_grad]

    def save(epoch, metrics):
        atomic_save({"model": model.state_dict(), "model_name": name, "num_classes": train_ds.num_classes,
                     "epoch": epoch, "metrics": metrics, "args": vars(args)},
                    os.path.join(args.output_dir, "model.pth"))

    return fit(args, device, model, lambda im, tg: ddp_model(im, tg), params, sgd(params, args), train_loader,
               lambda: evaluation.evaluate(model, val_loader, device), save, resume)


# ----------------------------------------------------------------------------------------------------------------------
# --stage pretrain: AKEs absorb the frozen teacher's knowledge (paper sec. 3.2.2, Eq. 6)

def default_teacher_weights(name):
    path = os.path.join("runs", f"train_{name}", "model.pth")
    if not os.path.isfile(path):
        raise UserError(f"no weights for teacher {name}: run `python train.py --stage train --model {name}` first, "
                        f"or pass --teacher-weights PATH|DEFAULT")
    return path


def build_frozen_teacher(name, num_classes, weights, args, device):
    teacher = build_model(name, num_classes, "teacher weights", weights=weights, min_size=args.min_size,
                          max_size=args.max_size).to(device)
    teacher.eval().requires_grad_(False)
    return teacher


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
        h, w = out.batch_size_hw
        sizes = [(h, w)] * len(images)
        dets = unikd.postprocess(z_logits, z_boxes, sizes)
        for det, (ih, iw), im in zip(dets, out.image_sizes, images):
            # boxes: pixels of the batched tensor -> clipped to the resized image -> the input image's pixels
            det["boxes"][:, 0::2] = det["boxes"][:, 0::2].clamp(0, iw) * (im.shape[-1] / iw)
            det["boxes"][:, 1::2] = det["boxes"][:, 1::2].clamp(0, ih) * (im.shape[-2] / ih)
            det["labels"] = det["labels"] + 1  # AKE classes 0..K-1 -> dataset labels 1..K
        return dets


def stage_pretrain(args, device):
    if args.teacher is None:
        raise UserError("--stage pretrain needs --teacher NAME (e.g. --teacher retinanet_r50)")
    name = model_name(args.teacher, "--teacher")
    weights = args.teacher_weights or default_teacher_weights(name)
    if os.path.exists(weights):  # a path (not DEFAULT): absolute, so ake.pth works from any folder
        weights = os.path.abspath(weights)
    set_schedule_defaults(args, detectors.family_of(name), epochs=15, optimizer="adamw")
    args.clip_grad = 0.1 if args.clip_grad is None else args.clip_grad
    resume = prepare_output_dir(args, f"pretrain_{name}")
    train_ds, train_loader, val_loader = build_data(args, with_masks=False)
    teacher = build_frozen_teacher(name, train_ds.num_classes, weights, args, device)
    config = dict(num_classes=train_ds.num_classes - 1, num_queries=args.num_queries,
                  num_extractor_layers=args.extractor_layers, d_model=detectors.fpn_channels(teacher))
    ake = unikd.UniKD(**config).to(device)
    counts = unikd.count_parameters(ake)
    log(args, f"teacher {name} ({weights}); AKE parameters: " +
        ", ".join(f"{k} {v / 1e6:.3f} M" for k, v in counts.items()))
    ddp_ake = wrap_ddp(ake, args, device)
    params = [p for p in ake.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    generator = torch.Generator().manual_seed(args.seed + 1000 * args.rank)

    def loss_fn(images, targets):
        with torch.no_grad():
            out = detectors.forward_features(teacher, images, targets)
        return ddp_ake(out.features, detectors.normalized_targets(out), generator=generator, mode="pretrain")

    def save(epoch, metrics):
        atomic_save({"kind": AKE_FILE_KIND, "version": 1, "config": config, "state_dict": ake.state_dict(),
                     "teacher": name, "teacher_weights": weights, "num_classes": train_ds.num_classes,
                     "min_size": args.min_size, "max_size": args.max_size, "epoch": epoch, "metrics": metrics},
                    os.path.join(args.output_dir, "ake.pth"))

    return fit(args, device, ake, loss_fn, params, optimizer, train_loader,
               lambda: evaluation.evaluate(AKEDetector(teacher, ake), val_loader, device), save, resume)


# ----------------------------------------------------------------------------------------------------------------------
# --stage distill: the student mimics the frozen AKEs' knowledge embeddings (paper sec. 3.2.3, Eq. 7-8)

def newest_ake():
    found = sorted(glob.glob(os.path.join("runs", "pretrain_*", "ake.pth")), key=os.path.getmtime)
    if not found:
        raise UserError("no AKE found in runs/pretrain_*/ake.pth: run `python train.py --stage pretrain --teacher NAME` "
                        "first, or pass --ake PATH")
    return found[-1]


def load_ake(path, num_classes, teacher=None):
    """ake.pth -> its dict, checked against the dataset's class count and the teacher the user named."""
    if not os.path.isfile(path):
        raise UserError(f"--ake {path}: no such file; pass the ake.pth written by --stage pretrain")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"--ake {path}: not an AKE file ({type(e).__name__}); pass the ake.pth written by --stage pretrain")
    if not isinstance(blob, dict) or blob.get("kind") != AKE_FILE_KIND:
        raise UserError(f"--ake {path}: not an AKE file (no UniKD AKE state in it); "
                        f"pass the ake.pth written by --stage pretrain")
    if blob["num_classes"] != num_classes:
        raise UserError(f"--ake {path}: trained for {blob['num_classes'] - 1} classes, the dataset has "
                        f"{num_classes - 1}; pretrain an AKE on this dataset")
    if teacher is not None and model_name(teacher, "--teacher") != blob["teacher"]:
        raise UserError(f"--ake {path} was pretrained on teacher {blob['teacher']}, not {teacher}; "
                        f"pass the matching --teacher or the AKE of {teacher}")
    return blob


class Distiller(torch.nn.Module):
    """Student + adapter phi (+ frozen AKEs): one module for DDP, the optimizer and checkpoints."""

    def __init__(self, student, method, ake=None, adapter_layers=2):
        super().__init__()
        self.student, self.method = student, method
        channels = detectors.fpn_channels(student)
        self.adapter = unikd.Adapter(channels, num_layers=adapter_layers) if method != "none" else None
        self.ake = ake
        if ake is not None:
            ake.freeze()  # AKE frozen: eval mode, no grads (sec. 3.2.3)

    def forward(self, images, targets, teacher_features=None, generator=None, lambdas=(10.0, 10.0),
                fitnet_weight=1.0, store=None):
        """Detection losses + the KD loss; the teacher side comes from teacher_features (online) or from a
        KnowledgeStore (offline: the entries of these images and flips, rescaled to the student's batch)."""
        out = detectors.forward_with_features(self.student, images, targets)
        losses = dict(out.result)
        if self.method == "none":
            return losses
        student_feats = self.adapter(out.features)
        if store is not None:
            knowledge = store.knowledge(targets, out.batch_size_hw, student_feats[0].device)
            losses.update(self.ake.student_loss(knowledge, student_feats, *lambdas))
        elif self.method == "unikd":
            losses.update(self.ake(teacher_features, detectors.normalized_targets(out), student_features=student_feats,
                                   generator=generator, mode="distill", lambda_ct=lambdas[0], lambda_pos=lambdas[1]))
        else:
            losses["loss_fitnet"] = fitnet_weight * unikd.fitnet_loss(teacher_features, student_feats,
                                                                      detectors.normalized_targets(out))
        return losses


def stage_distill(args, device):
    student_name = model_name(args.student, "--student")
    family = detectors.family_of(student_name)
    set_schedule_defaults(args, family, epochs=12)
    store = None
    if args.offline:
        if args.method != "unikd":
            raise UserError(f"--offline serves UniKD's stored knowledge; --method {args.method} needs the teacher "
                            f"online (drop --offline)")
        store = KnowledgeStore(args.offline)
    ake_path = args.ake or (store.manifest["ake"] if store else newest_ake())
    suffix = ("" if args.method == "unikd" else f"_{args.method}") + ("_offline" if store else "")
    resume = None if args.kd_cost else prepare_output_dir(args, f"distill_{student_name}{suffix}")
    log(args, f"AKE: {ake_path}" + ("" if args.ake else " (the store's)" if store else
                                    " (newest runs/pretrain_*/ake.pth; pass --ake to choose)"))
    train_ds, train_loader, val_loader = build_data(args, with_masks=family == "mask_rcnn")
    blob = load_ake(ake_path, train_ds.num_classes, teacher=None if store else args.teacher)  # store: checked below
    if (blob["min_size"], blob["max_size"]) != (args.min_size, args.max_size):
        log(args, f"note: AKE pretrained at min/max size {blob['min_size']}/{blob['max_size']}, "
                  f"distilling at {args.min_size}/{args.max_size}")
    if store is not None:
        if store.manifest["flips"] == [0]:
            train_ds.flip_p = 0.0
            log(args, f"{args.offline} holds unflipped images only: the student trains without flips")
        store.check(blob, file_sha256(ake_path), args.teacher, train_ds.ids, store.manifest["flips"])
        log(args, f"offline: {store.manifest['num_images']} images x {len(store.manifest['flips'])} flip states "
                  f"from {args.offline} ({store.manifest['dtype']}); the teacher is not built")
    teacher = None
    if args.method != "none" and (store is None or args.kd_cost):
        # the no-KD baseline trains on the identical schedule without running the teacher; offline needs none
        # (--kd-cost builds it to time the online step beside the offline one)
        teacher = build_frozen_teacher(blob["teacher"], train_ds.num_classes, blob["teacher_weights"], args, device)
    ake = None
    if args.method == "unikd":
        ake = unikd.UniKD(**blob["config"])
        ake.load_state_dict(blob["state_dict"])
    student = build_model(student_name, train_ds.num_classes, "--weights/--weights-backbone", weights=args.weights,
                          weights_backbone=args.weights_backbone, min_size=args.min_size, max_size=args.max_size)
    if args.adapter_layers is None:  # sec. 4.1: two layers for UniKD; sec. 4.3 (b): one for the modified FitNet
        args.adapter_layers = 2 if args.method == "unikd" else 1
    model = Distiller(student, args.method, ake, args.adapter_layers).to(device)
    log(args, f"distill {student_name} from {blob['teacher']} with {args.method}; "
              f"trainable {sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f} M parameters")
    ddp_model = wrap_ddp(model, args, device)
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(args.seed + 1000 * args.rank)

    def loss_fn(images, targets, offline=store is not None):
        feats = None
        if teacher is not None and not offline:
            with torch.no_grad():
                feats = detectors.forward_features(teacher, images, targets).features
        return ddp_model(images, targets, feats, generator, (args.lambda_ct, args.lambda_pos), args.fitnet_weight,
                         store if offline else None)

    if args.kd_cost:
        return benchmark_kd_cost(args, device, loss_fn, teacher, student, params, train_loader, store is not None)

    def save(epoch, metrics):
        atomic_save(student.state_dict(), os.path.join(args.output_dir, "student.pth"))
        atomic_save({"model": student.state_dict(), "model_name": student_name, "num_classes": train_ds.num_classes,
                     "teacher": blob["teacher"], "ake": ake_path, "method": args.method, "epoch": epoch,
                     "metrics": metrics, "args": vars(args)}, os.path.join(args.output_dir, "model.pth"))

    return fit(args, device, model, loss_fn, params, sgd(params, args), train_loader,
               lambda: evaluation.evaluate(student, val_loader, device), save, resume)


# ----------------------------------------------------------------------------------------------------------------------
# offline KD (paper sec. 3.3): --stage dump stores the teacher side of Eq. (7) once; --offline reads it back
#
# A store is a folder: shard_<k>.bin files of fixed-size records (one per image and flip state, a numpy structured
# dtype, so a shard is memory-mapped as an array of records; under torchrun rank r writes the shards k = r mod world),
# shard_<k>.json (its image ids, flips and record CRCs; written after the .bin, so it marks the shard complete),
# index.json (image id -> flip -> shard, slot, CRC) and manifest.json. The dump writes into <store>.partial/ and renames it when complete; a killed dump
# resumes at its first unfinished shard, whose batches and random boxes are the same as in an uninterrupted run.

EMBEDDING_FIELDS = ("queries_ct", "queries_pos", "z_ct", "z_pos")


def record_layout(num_queries, d_model, dtype_name):
    """numpy dtype of one stored entry: the Knowledge of one (image, flip) plus the batched tensor size it refers to
    (canvas). Embeddings in the dump dtype (bf16 as its raw 16 bits: numpy has no bf16), boxes/points in fp32."""
    N, C = num_queries, d_model
    emb = {"fp16": "<f2", "bf16": "<u2", "fp32": "<f4"}[dtype_name]
    return np.dtype([(name, emb, (N, C)) for name in EMBEDDING_FIELDS] +
                    [("reference_ct", "<f4", (N, 2)), ("boxes", "<f4", (N, 4)), ("image_id", "<i8"),
                     ("canvas", "<i4", (2,)), ("pos_mask_ct", "u1", (N,)), ("pos_mask_pos", "u1", (N,)),
                     ("flip", "u1")])  # packed: no padding bytes, whose content numpy leaves undefined


def knowledge_to_records(knowledge, image_ids, flip, canvas_hw, layout, dtype_name):
    """Knowledge of a batch (unikd.Knowledge, [B, ...]) -> numpy records [B] of `layout`."""
    records = np.zeros(len(image_ids), layout)
    for name in EMBEDDING_FIELDS:
        value = getattr(knowledge, name).detach().to("cpu", DUMP_DTYPES[dtype_name])
        records[name] = (value.view(torch.uint16) if dtype_name == "bf16" else value).numpy()
    records["reference_ct"] = knowledge.reference_ct.detach().float().cpu().numpy()
    records["boxes"] = knowledge.boxes.detach().float().cpu().numpy()
    records["pos_mask_ct"] = knowledge.pos_mask_ct.cpu().numpy()
    records["pos_mask_pos"] = knowledge.pos_mask_pos.cpu().numpy()
    records["image_id"], records["flip"], records["canvas"] = image_ids, int(flip), canvas_hw
    return records


def records_to_knowledge(records, dtype_name, canvas_hw, device):
    """numpy records [B] -> (unikd.Knowledge on device, embeddings in fp32). Points and boxes are rescaled from the
    batched tensor the teacher saw (each record's canvas) to the student's (canvas_hw), so a normalised coordinate
    names the same pixel in both (README, "Feature levels"); the embeddings are exact only where the two canvases
    are equal."""
    def field(name):  # a fresh C-ordered copy: fields of packed records have strides torch cannot take
        return torch.from_numpy(records[name].copy(order="C"))

    def emb(name):
        t = field(name)
        return (t.view(torch.bfloat16) if dtype_name == "bf16" else t).to(device, torch.float32)
    scale = field("canvas").float() / torch.tensor(canvas_hw, dtype=torch.float32)
    sx, sy = scale[:, 1, None, None], scale[:, 0, None, None]                         # [B, 1, 1]
    reference = field("reference_ct") * torch.cat([sx, sy], -1)
    boxes = field("boxes") * torch.cat([sx, sy, sx, sy], -1)
    return unikd.Knowledge(emb("queries_ct"), reference.to(device), emb("queries_pos"), boxes.to(device),
                           emb("z_ct"), emb("z_pos"), field("pos_mask_ct").to(device, torch.bool),
                           field("pos_mask_pos").to(device, torch.bool))


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_id(weights):
    """What identifies teacher weights in a manifest: the file's sha256, or the torchvision weights name."""
    return file_sha256(weights) if os.path.isfile(str(weights)) else str(weights)


class KnowledgeStore:
    """Reader of a --stage dump store: manifest and index in memory, shards memory-mapped on first use, every record
    checked against its CRC. Problems are one-line UserErrors naming the store and the fix."""

    def __init__(self, path):
        self.path = path
        manifest = os.path.join(path, "manifest.json")
        if not os.path.isfile(manifest):
            hint = (" (an unfinished dump: rerun the same --stage dump to complete it)"
                    if os.path.isdir(path + ".partial") or path.endswith(".partial") else "")
            raise UserError(f"--offline {path}: not a knowledge store (no manifest.json){hint}; pass the folder "
                            f"written by --stage dump")
        try:
            with open(manifest) as f:
                self.manifest = json.load(f)
            with open(os.path.join(path, "index.json")) as f:
                self.index = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"--offline {path}: unreadable manifest/index ({type(e).__name__}); dump it again")
        m = self.manifest
        if m.get("kind") != STORE_KIND or m.get("version") != STORE_VERSION:
            raise UserError(f"--offline {path}: not a version-{STORE_VERSION} knowledge store; dump it again")
        self.dtype = m["dtype"]
        self.layout = record_layout(m["num_queries"], m["d_model"], self.dtype)
        self.shards = {}

    def check(self, ake_blob, ake_sha256, teacher, image_ids, flips):
        """Refuses, before any training, a store that does not belong to this AKE, teacher and dataset, or whose
        shards are truncated."""
        m, cfg = self.manifest, ake_blob["config"]
        if (m["num_queries"], m["d_model"]) != (cfg["num_queries"], cfg["d_model"]):
            raise UserError(f"--offline {self.path}: stored N={m['num_queries']}, C={m['d_model']}, but the AKE has "
                            f"N={cfg['num_queries']}, C={cfg['d_model']}; dump the store with this AKE")
        if m["ake_sha256"] != ake_sha256:
            raise UserError(f"--offline {self.path} was dumped with another AKE ({m['ake']}) than the one given; "
                            f"pass that --ake or dump the store with yours")
        if teacher is not None and model_name(teacher, "--teacher") != m["teacher"]:
            raise UserError(f"--offline {self.path} holds the knowledge of teacher {m['teacher']}, not {teacher}; "
                            f"pass the matching --teacher or dump a store of {teacher}")
        for shard in m["shards"]:
            file = os.path.join(self.path, shard["file"])
            size = os.path.getsize(file) if os.path.isfile(file) else -1
            if size != shard["records"] * self.layout.itemsize:
                raise UserError(f"--offline {self.path}: shard {shard['file']} is truncated or missing ({size} bytes, "
                                f"expected {shard['records'] * self.layout.itemsize}); dump the store again")
        missing = [(i, f) for i in image_ids for f in flips if str(f) not in self.index.get(str(i), {})]
        if missing:
            raise UserError(f"--offline {self.path}: image id {missing[0][0]} (flip {missing[0][1]}) and "
                            f"{len(missing) - 1} more entries are not in the store; dump this dataset first")

    def records(self, image_ids, flips):
        out = np.empty(len(image_ids), self.layout)
        for row, (image_id, flip) in enumerate(zip(image_ids, flips)):
            entry = self.index.get(str(image_id), {}).get(str(int(flip)))
            if entry is None:
                raise UserError(f"--offline {self.path}: image id {image_id} (flip {int(flip)}) is not in the store; "
                                f"dump this dataset first")
            shard, slot, crc = entry
            record = self.shard(shard)[slot]
            if zlib.crc32(record.tobytes()) != crc:
                raise UserError(f"--offline {self.path}: shard {self.manifest['shards'][shard]['file']} is corrupt "
                                f"(record of image {image_id} fails its CRC); dump the store again")
            out[row] = record
        return out

    def shard(self, k):
        if k not in self.shards:
            self.shards[k] = np.memmap(os.path.join(self.path, self.manifest["shards"][k]["file"]), dtype=self.layout,
                                       mode="r")
        return self.shards[k]

    def knowledge(self, targets, canvas_hw, device):
        """The stored Knowledge of a batch, picked by each target's image_id and flip state."""
        records = self.records([t["image_id"] for t in targets], [t.get("flipped", False) for t in targets])
        return records_to_knowledge(records, self.dtype, canvas_hw, device)


class FixedFlip(torch.utils.data.Dataset):
    """A training set's images with the flip fixed (the dump visits every image in each stored flip state)."""

    def __init__(self, dataset, indices, flip):
        self.dataset, self.indices, self.flip = dataset, indices, flip

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.dataset.load(self.indices[i], self.flip)


def fitnet_bytes(features, targets, element_bytes):
    """What FitNet would store for these images: the teacher's 4 levels, whole and at foreground cells only."""
    full = sum(f[0].numel() for f in features) * element_bytes
    fg = [sum(int(unikd.foreground_mask([t], f.shape[-2], f.shape[-1], f.device).sum()) * f.shape[1]
              for f in features) * element_bytes for t in targets]
    return full, fg


def coco_fitnet_bytes(d_model, element_bytes, fg_fraction):
    """FitNet's per-image bytes projected to COCO at 800x1333 (padded to 64 as detectors.py does)."""
    h, w = (math.ceil(s / 64) * 64 for s in COCO_SIZE)
    cells = sum(math.ceil(h / s) * math.ceil(w / s) for s in (8, 16, 32, 64))
    return cells * d_model * element_bytes, cells * d_model * element_bytes * fg_fraction


def dump_params(args, blob, ake_path, ids, flips):
    """What makes two dumps the same dump (a resumed one must match it)."""
    return {"teacher": blob["teacher"], "teacher_weights": str(blob["teacher_weights"]),
            "teacher_weights_id": weights_id(blob["teacher_weights"]), "ake": os.path.abspath(ake_path),
            "ake_sha256": file_sha256(ake_path), "num_queries": blob["config"]["num_queries"],
            "d_model": blob["config"]["d_model"], "dtype": args.dump_dtype, "flips": flips,
            "shard_images": args.dump_shard_images, "batch_size": args.batch_size, "seed": args.seed,
            "min_size": args.min_size, "max_size": args.max_size,
            "image_ids_sha256": hashlib.sha256(json.dumps(ids).encode()).hexdigest()}


def stage_dump(args, device):
    ake_path = args.ake or newest_ake()
    train_ds, _, _ = build_data(args, with_masks=False)
    blob = load_ake(ake_path, train_ds.num_classes, teacher=args.teacher)
    flips = [0, 1][:args.dump_flips]
    ids = [int(i) for i in train_ds.ids]
    store = args.output_dir or os.path.join("runs", f"dump_{blob['teacher']}")
    partial = store + ".partial"
    if os.path.exists(store):
        raise UserError(f"{store} exists" + (" (a finished store)" if os.path.isfile(os.path.join(store, "manifest.json"))
                                             else "") + "; pass --output-dir to dump another one")
    params = dump_params(args, blob, ake_path, ids, flips)
    params_file = os.path.join(partial, "params.json")
    if os.path.isfile(params_file):
        with open(params_file) as f:
            if json.load(f) != params:
                raise UserError(f"{partial} is an unfinished dump with other settings (AKE, teacher, dtype, flips, "
                                f"shards, batch, seed, sizes or images); delete it or pass another --output-dir")
        log(args, f"resuming the unfinished dump in {partial}")
    elif is_main(args):
        os.makedirs(partial, exist_ok=True)
        with open(params_file, "w") as f:
            json.dump(params, f, indent=1)
    if args.distributed:
        dist.barrier()

    teacher = build_frozen_teacher(blob["teacher"], train_ds.num_classes, blob["teacher_weights"], args, device)
    ake = unikd.UniKD(**blob["config"])
    ake.load_state_dict(blob["state_dict"])
    ake.to(device).freeze()
    layout = record_layout(blob["config"]["num_queries"], blob["config"]["d_model"], args.dump_dtype)
    element_bytes = DUMP_DTYPES[args.dump_dtype].itemsize
    shards = [list(range(k, min(k + args.dump_shard_images, len(ids))))
              for k in range(0, len(ids), args.dump_shard_images)]
    mine = [k for k in range(len(shards)) if k % args.world_size == args.rank]
    log(args, f"dump {len(ids)} images x {len(flips)} flip states of teacher {blob['teacher']} with {ake_path} into "
              f"{store}: {len(shards)} shards of {layout.itemsize} B records ({args.dump_dtype})")
    t0, done = time.time(), 0
    for k in mine:
        name = f"shard_{k:05d}"
        if os.path.isfile(os.path.join(partial, name + ".json")):
            continue
        records, fitnet_full, fitnet_fg = [], [], []
        for flip in flips:
            loader = torch.utils.data.DataLoader(FixedFlip(train_ds, shards[k], bool(flip)), batch_size=args.batch_size,
                                                 num_workers=args.workers, collate_fn=evaluation.collate_fn)
            for b, (images, targets) in enumerate(loader):
                images, targets = to_device(images, targets, device)
                # the random boxes B^ of each batch come from its own seed: a resumed dump draws the same ones
                generator = torch.Generator().manual_seed(args.seed * 1_000_003 + (k * 2 + flip) * 10_007 + b)
                with torch.no_grad(), autocast(args, device):
                    out = detectors.forward_features(teacher, images, targets)
                    ake_targets = detectors.normalized_targets(out)
                    knowledge = ake.teacher_knowledge(out.features, ake_targets, generator)
                records.append(knowledge_to_records(knowledge, [t["image_id"] for t in targets], flip,
                                                    out.batch_size_hw, layout, args.dump_dtype))
                full, fg = fitnet_bytes(out.features, ake_targets, element_bytes)
                fitnet_full += [full] * len(images)
                fitnet_fg += fg
        records = np.concatenate(records)
        records.tofile(os.path.join(partial, name + ".bin.tmp"))
        os.replace(os.path.join(partial, name + ".bin.tmp"), os.path.join(partial, name + ".bin"))
        entries = [[int(r["image_id"]), int(r["flip"]), zlib.crc32(r.tobytes())] for r in records]
        with open(os.path.join(partial, name + ".json.tmp"), "w") as f:
            json.dump({"entries": entries, "fitnet_full_bytes": sum(fitnet_full),
                       "fitnet_fg_bytes": sum(fitnet_fg), "entries_measured": len(fitnet_full)}, f)
        os.replace(os.path.join(partial, name + ".json.tmp"), os.path.join(partial, name + ".json"))
        done += len(records)
        log(args, f"shard {k + 1}/{len(shards)}: {len(records)} records, "
                  f"{done / max(1e-9, time.time() - t0):.1f} records/s")
    if args.distributed:
        dist.barrier()
    if is_main(args):
        manifest = write_store_index(partial, params, shards, layout, element_bytes)
        os.replace(partial, store)
        s = manifest["storage"]
        log(args, f"store {store}: {s['bytes_per_image']} B per image ({len(flips)} flip states); FitNet would need "
                  f"{s['fitnet_full_bytes_per_image']:.0f} B (full levels) / {s['fitnet_fg_bytes_per_image']:.0f} B "
                  f"(foreground) per image here, x{s['ratio_full']:.1f} / x{s['ratio_fg']:.1f}; at COCO train2017 "
                  f"({COCO_TRAIN_IMAGES} images, 800x1333): UniKD {s['coco_unikd_bytes'] / 1e9:.1f} GB, FitNet "
                  f"{s['coco_fitnet_full_bytes'] / 1e12:.2f} TB full (x{s['coco_ratio_full']:.1f}), "
                  f"{s['coco_fitnet_fg_bytes'] / 1e12:.2f} TB foreground")
    return store


def write_store_index(partial, params, shards, layout, element_bytes):
    """Merges the shards' own JSON into index.json and writes manifest.json (deterministic: no clocks)."""
    index, shard_list, full, fg, measured = {}, [], 0, 0, 0
    for k in range(len(shards)):
        with open(os.path.join(partial, f"shard_{k:05d}.json")) as f:
            part = json.load(f)
        for slot, (image_id, flip, crc) in enumerate(part["entries"]):
            index.setdefault(str(image_id), {})[str(flip)] = [k, slot, crc]
        shard_list.append({"file": f"shard_{k:05d}.bin", "records": len(part["entries"])})
        full, fg, measured = full + part["fitnet_full_bytes"], fg + part["fitnet_fg_bytes"], \
            measured + part["entries_measured"]
    flips = len(params["flips"])
    per_image = layout.itemsize * flips
    full_pi, fg_pi = full / measured * flips, fg / measured * flips
    coco_full, coco_fg = coco_fitnet_bytes(params["d_model"], element_bytes, fg / max(full, 1))
    storage = {"record_bytes": layout.itemsize, "bytes_per_image": per_image,
               "fitnet_full_bytes_per_image": full_pi, "fitnet_fg_bytes_per_image": fg_pi,
               "ratio_full": full_pi / per_image, "ratio_fg": fg_pi / per_image,
               "coco_unikd_bytes": per_image * COCO_TRAIN_IMAGES,
               "coco_fitnet_full_bytes": coco_full * flips * COCO_TRAIN_IMAGES,
               "coco_fitnet_fg_bytes": coco_fg * flips * COCO_TRAIN_IMAGES,
               "coco_ratio_full": coco_full / layout.itemsize, "coco_fg_fraction_assumed": fg / max(full, 1)}
    manifest = dict(params, kind=STORE_KIND, version=STORE_VERSION, num_images=len(index),
                    image_ids=sorted(int(i) for i in index), layout=[[n, str(layout[n])] for n in layout.names],
                    shards=shard_list, storage=storage)
    with open(os.path.join(partial, "index.json"), "w") as f:
        json.dump(index, f)
    with open(os.path.join(partial, "manifest.json.tmp"), "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(os.path.join(partial, "manifest.json.tmp"), os.path.join(partial, "manifest.json"))
    return manifest


# ----------------------------------------------------------------------------------------------------------------------
# --stage demo and --stage grid: whole pipelines of the stages above, each step its own run that a rerun skips

# flags a demo or grid passes on to each of its steps (data, image size, loader, device, precision, smoke caps)
PASSED_ON = ("data_path", "train_images", "train_ann", "val_images", "val_ann", "min_size", "max_size",
             "shapes_train", "shapes_val", "shapes_size", "shapes_seed", "workers", "batch_size", "amp", "max_iters",
             "print_freq", "num_queries", "warmup_iters")  # (and the device, set on each step directly)
DEMO_DEFAULTS = dict(teacher="fcos_r50", student="retinanet_r18_v2", shapes_train=256, shapes_val=64,
                     teacher_epochs=3, pretrain_epochs=2, student_epochs=2, warmup_iters=40)
GRID_DEFAULTS = dict(shapes_train=1000, shapes_val=250, teacher_epochs=12, pretrain_epochs=6, student_epochs=4,
                     warmup_iters=200)


def passed_on_flags(args):
    """args -> the command-line flags of PASSED_ON whose values differ from the parser's defaults."""
    defaults, flags = get_args_parser().parse_args([]), []
    for name in PASSED_ON:
        value = getattr(args, name)
        if value == getattr(defaults, name) or value is None:
            continue
        flag = "--" + name.replace("_", "-")
        flags += [flag] if value is True else [flag] + [str(v) for v in (value if isinstance(value, list) else [value])]
    return flags


def run_step(args, device, out_dir, argv):
    """One stage as its own run in out_dir -> its result.json ({"metrics", "seconds", "command"}). A step whose
    result.json exists is skipped; one interrupted after an epoch continues from its checkpoint."""
    result_file = os.path.join(out_dir, "result.json")
    if os.path.isfile(result_file):
        with open(result_file) as f:
            return dict(json.load(f), skipped=True)
    if args.stage == "grid" and args.report:  # only what has finished
        return None
    argv = argv + passed_on_flags(args) + ["--output-dir", out_dir]
    step = get_args_parser().parse_args(argv)
    if os.path.isfile(os.path.join(out_dir, "checkpoint.pth")):
        step.resume = os.path.join(out_dir, "checkpoint.pth")
    step.distributed, step.rank, step.world_size, step.device = args.distributed, args.rank, args.world_size, args.device
    set_size_defaults(step)
    torch.manual_seed(step.seed + step.rank)
    t0 = time.time()
    log(args, f"== {' '.join(argv)}")
    metrics = STAGES[step.stage](step, device)
    result = {"metrics": metrics, "seconds": time.time() - t0, "command": "python train.py " + " ".join(argv)}
    if is_main(args):
        with open(result_file + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(result_file + ".tmp", result_file)
    return result


def explicit_flags(argv):
    """The dests of the flags given on the command line (not left at their defaults), sorted."""
    parser, unset = get_args_parser(), object()
    parser.set_defaults(**{a.dest: unset for a in parser._actions if a.dest != "help"})
    return sorted(k for k, v in vars(parser.parse_args(argv)).items() if v is not unset)


def apply_defaults(args, defaults):
    """Fills the demo/grid schedule defaults into the flags the user did not give."""
    for name, value in defaults.items():
        if name not in args.explicit:
            setattr(args, name, value)
    set_size_defaults(args)


def teacher_and_ake(args, device, root, teacher):
    """The teacher's training and its AKE's pretraining (seed 0), as steps of root -> (teacher result, AKE result,
    ake.pth)."""
    tdir, adir = os.path.join(root, f"teacher_{teacher}"), os.path.join(root, f"ake_{teacher}")
    t = run_step(args, device, tdir, ["--stage", "train", "--model", teacher, "--epochs", str(args.teacher_epochs),
                                      "--eval-every", "0"])
    a = run_step(args, device, adir, ["--stage", "pretrain", "--teacher", teacher, "--teacher-weights",
                                      os.path.join(tdir, "model.pth"), "--epochs", str(args.pretrain_epochs),
                                      "--eval-every", "0"])
    return t, a, os.path.join(adir, "ake.pth")


def student_step(args, device, root, teacher, student, method, seed, ake):
    return run_step(args, device, os.path.join(root, f"{teacher}__{student}__{method}__s{seed}"),
                    ["--stage", "distill", "--student", student, "--method", method, "--ake", ake, "--seed", str(seed),
                     "--epochs", str(args.student_epochs), "--eval-every", "0"])


def stage_demo(args, device):
    """Teacher -> AKE -> one heterogeneous student without KD and with UniKD; a table of APs and step times."""
    apply_defaults(args, DEMO_DEFAULTS)
    teacher, student = model_name(args.teacher, "--teacher"), model_name(args.student, "--student")
    root = args.output_dir or os.path.join("runs", "demo")
    t, a, ake = teacher_and_ake(args, device, root, teacher)
    rows = [("teacher", teacher, t), ("AKE (content queries)", f"AKE of {teacher}", a)]
    for method in ("none", "unikd"):
        rows.append((f"student, {'no KD' if method == 'none' else 'UniKD'}", student,
                     student_step(args, device, root, teacher, student, method, args.seed, ake)))
    lines = ["| step | model | AP | AP50 | wall time |", "| --- | --- | ---: | ---: | ---: |"]
    for step, model, r in rows:
        m = r["metrics"]
        lines.append(f"| {step} | {model} | {m.get('AP', float('nan')):.3f} | {m.get('AP50', float('nan')):.3f} | "
                     f"{r['seconds']:.0f} s{' (earlier run)' if r.get('skipped') else ''} |")
    ap = [r["metrics"].get("AP", float("nan")) for _, _, r in rows]
    if ap[0] <= ap[2]:
        lines.append(f"\nThe teacher (AP {ap[0]:.3f}) is not stronger than the student without KD (AP {ap[2]:.3f}): "
                     f"there is nothing to distil; give it more --teacher-epochs.")
    log(args, "\n".join(["", f"demo ({root}): the pipeline on a small set and a short schedule, not the paper's "
                             f"gains"] + lines))
    return {"rows": [(s, m, r["metrics"], r["seconds"]) for s, m, r in rows]}


def stage_grid(args, device):
    """The paper's Table 2 in miniature: every (teacher, student, method, seed) cell trains and evaluates on its
    own and writes its result.json; a rerun skips finished cells; results.md gathers mean +- std AP per cell."""
    apply_defaults(args, GRID_DEFAULTS)
    split = lambda text: [x for x in text.split(",") if x]  # noqa: E731
    teachers = [model_name(x, "--teachers") for x in split(args.teachers)]
    students = [model_name(x, "--students") for x in split(args.students)]
    methods, seeds = split(args.methods), [int(x) for x in split(args.seeds)]
    bad = [m for m in methods if m not in ("none", "fitnet", "unikd")]
    if bad:
        raise UserError(f"--methods {args.methods}: unknown method {bad[0]}; choose from none, fitnet, unikd")
    root = args.output_dir or os.path.join("runs", "grid")
    cells, prerequisites = {}, {}
    for teacher in teachers:
        t, a, ake = teacher_and_ake(args, device, root, teacher)
        prerequisites[teacher] = (t, a)
        for student, method, seed in itertools.product(students, methods, seeds):
            cells[teacher, student, method, seed] = student_step(args, device, root, teacher, student, method, seed,
                                                                 ake)
    if is_main(args):
        path = os.path.join(root, "results.md")
        tmp = f"{path}.{os.getpid()}.tmp"  # grids over disjoint cells may share a root and finish together
        with open(tmp, "w") as f:
            f.write(grid_table(args, root, prerequisites, cells, teachers, students, methods, seeds))
        os.replace(tmp, path)
        log(args, f"wrote {path}")
    return {"cells": len(cells)}


def grid_table(args, root, prerequisites, cells, teachers, students, methods, seeds):
    """results.md: teacher and AKE AP, then per (teacher, student) the mean +- std AP over seeds of each method
    and its gain over `none`, and the commands that reproduce every number."""
    def ap(result):
        return result["metrics"].get("AP", float("nan"))

    def cell(values):  # "mean ± std" (one seed has no std), with the seed count where some have not finished
        if not values:
            return "—"
        text = (f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1
                else f"{values[0]:.3f}")
        return text if len(values) == len(seeds) else f"{text} ({len(values)}/{len(seeds)} seeds)"
    out = [f"# UniKD grid ({root})", "", f"Seeds {seeds}; AP = COCO box AP on the validation set, mean ± std over "
           f"seeds; gain = mean AP − mean AP of `none`.", "", "| teacher | teacher AP | AKE AP |", "| --- | ---: | ---: |"]
    for teacher in teachers:
        t, a = prerequisites[teacher]
        out.append(f"| {teacher} | " + " | ".join("—" if r is None else f"{ap(r):.3f}" for r in (t, a)) + " |")
    columns = methods + [f"gain {m}" for m in methods if m != "none"]
    out += ["", "| teacher → student | " + " | ".join(columns) + " |",
            "| --- | " + " | ".join("---:" for _ in columns) + " |"]
    weaker = []
    for teacher, student in itertools.product(teachers, students):
        values = {m: [ap(r) for r in (cells[teacher, student, m, s] for s in seeds) if r is not None]
                  for m in methods}
        row = [cell(values[m]) for m in methods]
        gains = [f"{statistics.mean(values[m]) - statistics.mean(values['none']):+.3f}"
                 if values.get("none") and values[m] else "n/a" for m in methods if m != "none"]
        kind = "homogeneous" if detectors.family_of(teacher) == detectors.family_of(student) else "heterogeneous"
        out.append(f"| {teacher} → {student} ({kind}) | " + " | ".join(row + gains) + " |")
        t = prerequisites[teacher][0]
        if t is not None and values.get("none") and ap(t) <= statistics.mean(values["none"]):
            weaker.append(f"{teacher} (AP {ap(t):.3f}) is not stronger than {student} without KD (AP "
                          f"{statistics.mean(values['none']):.3f}): nothing to distil; give it more --teacher-epochs.")
    out += ([""] + [f"Note: {line}" for line in weaker]) if weaker else []
    out += ["", "Commands (each cell's own `result.json` holds its command and wall time):", "", "```",
            "python train.py --stage grid " + " ".join(
                ["--teachers", ",".join(teachers), "--students", ",".join(students), "--methods", ",".join(methods),
                 "--seeds", ",".join(map(str, seeds)), "--teacher-epochs", str(args.teacher_epochs),
                 "--pretrain-epochs", str(args.pretrain_epochs), "--student-epochs", str(args.student_epochs)]
                + passed_on_flags(args) + (["--output-dir", root] if args.output_dir else []))]
    for teacher in teachers:  # in the order they ran
        out += [r["command"] for r in prerequisites[teacher] if r is not None]
        out += [r["command"] for (t, *_), r in cells.items() if t == teacher and r is not None]
    out += ["```", ""]
    return "\n".join(out)


def benchmark_kd_cost(args, device, kd_loss_fn, teacher, student, params, train_loader, offline=False):
    """Median step times, alternating on the same batches after 2 warm-up steps each: online distillation vs the
    same step without KD (teacher forward + student train step); with offline, also the offline step (stored
    knowledge, no teacher) and the teacher forward alone, to project offline/online for a costlier teacher."""
    if teacher is None:
        raise UserError("--kd-cost times the KD overhead; it needs --method unikd or fitnet")
    optimizer = sgd(params, args)

    def teacher_forward(images, targets):
        with torch.no_grad():
            detectors.forward_features(teacher, images, targets)
        return {}

    def plain_loss_fn(images, targets):
        teacher_forward(images, targets)
        return student(images, targets)

    def step_seconds(loss_fn, images, targets):
        t0 = time.perf_counter()
        with autocast(args, device):
            losses = loss_fn(images, targets)
        if losses:
            optimizer.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    fns = {"plain": plain_loss_fn, "online": lambda im, tg: kd_loss_fn(im, tg, offline=False)}
    if offline:
        fns.update(offline=lambda im, tg: kd_loss_fn(im, tg, offline=True), teacher=teacher_forward)
    times = {k: [] for k in fns}
    for i, batch in enumerate(itertools.islice(itertools.cycle(train_loader), args.kd_cost + 2)):
        images, targets = to_device(*batch, device)
        for k, fn in fns.items():
            t = step_seconds(fn, images, targets)
            if i >= 2:
                times[k].append(t)
    t = {k: statistics.median(v) for k, v in times.items()}
    log(args, f"kd cost over {args.kd_cost} steps of batch {args.batch_size} at {args.min_size}/{args.max_size}: "
              f"teacher forward + student step {t['plain'] * 1e3:.0f} ms, online {args.method} step "
              f"{t['online'] * 1e3:.0f} ms (median), ratio {t['online'] / t['plain']:.3f}")
    result = {"plain_s": t["plain"], "kd_s": t["online"], "ratio": t["online"] / t["plain"]}
    if offline:
        # a teacher 10x costlier than this one adds 9 more teacher forwards to the online step only
        projected = t["offline"] / (t["online"] + 9 * t["teacher"])
        log(args, f"offline step {t['offline'] * 1e3:.0f} ms vs online {t['online'] * 1e3:.0f} ms: ratio "
                  f"{t['offline'] / t['online']:.3f}; teacher forward {t['teacher'] * 1e3:.0f} ms; projected ratio for "
                  f"a teacher 10x costlier: {projected:.3f}")
        result.update(offline_s=t["offline"], teacher_s=t["teacher"], offline_ratio=t["offline"] / t["online"],
                      offline_ratio_10x_teacher=projected)
    return result


# ----------------------------------------------------------------------------------------------------------------------

STAGES = {"train": stage_train, "pretrain": stage_pretrain, "dump": stage_dump, "distill": stage_distill,
          "demo": stage_demo, "grid": stage_grid}


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    args.explicit = explicit_flags(sys.argv[1:] if argv is None else argv)
    try:
        if args.data_path is not None and not os.path.isdir(args.data_path):
            raise UserError(f"--data-path {args.data_path}: no such directory; pass a COCO-layout root "
                            f"(train2017/, val2017/, annotations/) or omit it for the embedded dataset")
        device = init_distributed(args)
        torch.manual_seed(args.seed + args.rank)
        set_size_defaults(args)
        if args.amp and device.type != "cuda":
            log(args, "--amp: bf16 autocast is GPU-only; training in fp32 on CPU")
        STAGES[args.stage](args, device)
    except UserError as e:
        print(evaluation.user_error_line(e), file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
