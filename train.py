"""Every training stage of UniKD, in one flat file.

    python train.py --stage train    --model retinanet_r50          # plain detector (teacher or baseline)
    python train.py --stage pretrain --teacher retinanet_r50        # stage 1: AKEs absorb the teacher (Eq. 6)
    python train.py --stage distill  --student fcos_r18             # stage 2: student mimics the AKEs' knowledge (Eq. 7)
    python train.py --stage distill  --student fcos_r18 --method fitnet|none

Multi-GPU: `torchrun --nproc_per_node=8 train.py ...` (NCCL on GPUs, gloo on CPU). Without --data-path every
stage uses the embedded synthetic dataset (data/shapes/, generated on first use).
"""
import argparse
import glob
import itertools
import json
import math
import os
import statistics
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision.ops import box_convert

import detectors
import eval as evaluation  # our eval.py (the module name shadows the builtin only inside that module)
import unikd
from eval import UserError

AKE_FILE_KIND = "unikd_ake"
CHECKPOINT_KIND = "unikd_checkpoint"


# ----------------------------------------------------------------------------------------------------------------------
# flags (torchvision's detection references where they overlap)

def get_args_parser():
    p = evaluation.ArgumentParser(description="UniKD: train detectors, pretrain AKEs, distil students", add_help=True)
    p.add_argument("--stage", default="train", choices=["train", "pretrain", "distill"])
    # models
    p.add_argument("--model", default="retinanet_r50", help="--stage train: detector to train")
    p.add_argument("--teacher", default=None, help="--stage pretrain: teacher detector name")
    p.add_argument("--teacher-weights", default=None, help="teacher weights: a path or DEFAULT (torchvision COCO)")
    p.add_argument("--student", default="fcos_r18", help="--stage distill: student detector name")
    p.add_argument("--ake", default=None, help="--stage distill: ake.pth (default: newest runs/pretrain_*/ake.pth)")
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
    p.add_argument("--kd-cost", default=0, type=int, metavar="STEPS",
                   help="--stage distill: instead of training, time STEPS online KD steps against teacher forward + "
                        "student step (no KD) on the same batches, print the medians and their ratio")
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


def normalized_targets(fpn_out):
    """Transformed targets -> AKE targets: contiguous labels 0..K-1, boxes cxcywh / batched tensor size."""
    h, w = fpn_out.batch_size_hw
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    out = []
    for t in fpn_out.targets:
        boxes = box_convert(t["boxes"].float(), "xyxy", "cxcywh") / scale.to(t["boxes"].device)
        out.append({"labels": t["labels"] - 1, "boxes": boxes.clamp(0, 1)})
    return out


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


def family_of(name):
    return detectors.canonical_name(name).rsplit("_r", 1)[0].rsplit("_x", 1)[0]


# ----------------------------------------------------------------------------------------------------------------------
# --stage train: a plain detector

def stage_train(args, device):
    name = model_name(args.model, "--model")
    family = family_of(name)
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
    set_schedule_defaults(args, family_of(name), epochs=15, optimizer="adamw")
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
        return ddp_ake(out.features, normalized_targets(out), generator=generator, mode="pretrain")

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
                fitnet_weight=1.0):
        out = detectors.forward_with_features(self.student, images, targets)
        losses = dict(out.result)
        if self.method == "none":
            return losses
        student_feats = self.adapter(out.features)
        if self.method == "unikd":
            losses.update(self.ake(teacher_features, normalized_targets(out), student_features=student_feats,
                                   generator=generator, mode="distill", lambda_ct=lambdas[0], lambda_pos=lambdas[1]))
        else:
            losses["loss_fitnet"] = fitnet_weight * unikd.fitnet_loss(teacher_features, student_feats,
                                                                      normalized_targets(out))
        return losses


def stage_distill(args, device):
    student_name = model_name(args.student, "--student")
    set_schedule_defaults(args, family_of(student_name), epochs=12)
    ake_path = args.ake or newest_ake()
    suffix = "" if args.method == "unikd" else f"_{args.method}"
    resume = None if args.kd_cost else prepare_output_dir(args, f"distill_{student_name}{suffix}")
    log(args, f"AKE: {ake_path}" + ("" if args.ake else " (newest runs/pretrain_*/ake.pth; pass --ake to choose)"))
    train_ds, train_loader, val_loader = build_data(args, with_masks=family_of(student_name) == "mask_rcnn")
    blob = load_ake(ake_path, train_ds.num_classes, teacher=args.teacher)
    if (blob["min_size"], blob["max_size"]) != (args.min_size, args.max_size):
        log(args, f"note: AKE pretrained at min/max size {blob['min_size']}/{blob['max_size']}, "
                  f"distilling at {args.min_size}/{args.max_size}")
    teacher = None
    if args.method != "none":  # the no-KD baseline trains on the identical schedule without running the teacher
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

    def loss_fn(images, targets):
        feats = None
        if teacher is not None:
            with torch.no_grad():
                feats = detectors.forward_features(teacher, images, targets).features
        return ddp_model(images, targets, feats, generator, (args.lambda_ct, args.lambda_pos), args.fitnet_weight)

    if args.kd_cost:
        return benchmark_kd_cost(args, device, loss_fn, teacher, student, params, train_loader)

    def save(epoch, metrics):
        atomic_save(student.state_dict(), os.path.join(args.output_dir, "student.pth"))
        atomic_save({"model": student.state_dict(), "model_name": student_name, "num_classes": train_ds.num_classes,
                     "teacher": blob["teacher"], "ake": ake_path, "method": args.method, "epoch": epoch,
                     "metrics": metrics, "args": vars(args)}, os.path.join(args.output_dir, "model.pth"))

    return fit(args, device, model, loss_fn, params, sgd(params, args), train_loader,
               lambda: evaluation.evaluate(student, val_loader, device), save, resume)


def benchmark_kd_cost(args, device, kd_loss_fn, teacher, student, params, train_loader):
    """Median step time of online distillation vs the same step without KD (teacher forward + student train step),
    alternating the two on the same batches after 2 warm-up steps each; prints both and their ratio."""
    if teacher is None:
        raise UserError("--kd-cost times the KD overhead; it needs --method unikd or fitnet")
    optimizer = sgd(params, args)

    def plain_loss_fn(images, targets):
        with torch.no_grad():
            detectors.forward_features(teacher, images, targets)
        return student(images, targets)

    def step_seconds(loss_fn, images, targets):
        t0 = time.perf_counter()
        with autocast(args, device):
            loss = sum(loss_fn(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    times = {"plain": [], "kd": []}
    for i, batch in enumerate(itertools.islice(itertools.cycle(train_loader), args.kd_cost + 2)):
        images, targets = to_device(*batch, device)
        plain, kd = step_seconds(plain_loss_fn, images, targets), step_seconds(kd_loss_fn, images, targets)
        if i >= 2:
            times["plain"].append(plain)
            times["kd"].append(kd)
    plain, kd = statistics.median(times["plain"]), statistics.median(times["kd"])
    log(args, f"kd cost over {args.kd_cost} steps of batch {args.batch_size} at {args.min_size}/{args.max_size}: "
              f"teacher forward + student step {plain * 1e3:.0f} ms, online {args.method} step {kd * 1e3:.0f} ms "
              f"(median), ratio {kd / plain:.3f}")
    return {"plain_s": plain, "kd_s": kd, "ratio": kd / plain}


# ----------------------------------------------------------------------------------------------------------------------

STAGES = {"train": stage_train, "pretrain": stage_pretrain, "distill": stage_distill}


def main(argv=None):
    args = get_args_parser().parse_args(argv)
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
