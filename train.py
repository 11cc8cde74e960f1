"""The stages of UniKD: flags, one training loop, and the stages that use it.

    python train.py --stage train    --model atss_r34               # a detector alone (teacher or baseline)
    python train.py --stage pretrain --teacher atss_r34             # stage 1: AKEs absorb the teacher (Eq. 6)
    python train.py --stage distill  --student fcos_r18             # stage 2: student mimics the AKEs' knowledge (Eq. 7)
    python train.py --stage distill  --student fcos_r18 --method fitnet|none
    python train.py --stage dump     --ake runs/pretrain_atss_r34/ake.pth   # offline KD: store the teacher's
    python train.py --stage distill  --student fcos_r18 --offline runs/dump_atss_r34  # knowledge once (sec. 3.3)
    python train.py --stage demo [--smoke] | --stage grid           # whole pipelines (grid.py)

Multi-GPU: `torchrun --nproc_per_node=8 train.py ...` (NCCL on GPUs, gloo on CPU). Without --data-path every
stage uses the embedded synthetic dataset (shapes.py). Ctrl-C or SIGTERM stops training after the current
iteration with a checkpoint, and prints the command that continues it.
"""
import argparse
import contextlib
import glob
import json
import math
import os
import shlex
import signal
import sys
import time
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import deform_attn_triton as msda
import detectors
import grid
import store
import unikd
from eval import AKEDetector, attention_in_image, evaluate
from utils import (AKE_FILE_KIND, CHECKPOINT_KIND, MODEL_KIND, ArgumentParser, UserError, atomic_save,
                   atomic_write_json, canonical_model_name, cpu_has_bf16_units, explicit_flags, file_sha256,
                   frozen_unikd, init_distributed, is_main, load_ake_file, load_user_file, log, report_user_error)


# ----------------------------------------------------------------------------------------------------------------------
# flags (torchvision's detection references where they overlap)

def get_args_parser():
    p = ArgumentParser(description="UniKD: train detectors, pretrain AKEs, distil students", add_help=True)
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
    # data: --data-path, --train-images/--train-ann/--val-images/--val-ann, --min-size, --max-size, --shapes-*
    data.add_data_args(p)
    p.add_argument("-j", "--workers", default=2, type=int)
    # schedule (the paper's 1x: 12 epochs, decay at 8 and 11)
    p.add_argument("--epochs", default=None, type=int,
                   help="default 12 (train, distill), 15 (pretrain), 50 for Deformable DETR on COCO-format data; "
                        "0 saves and evaluates the initial weights")
    p.add_argument("-b", "--batch-size", default=8, type=int, help="images per GPU/process")
    p.add_argument("--lr", default=None, type=float,
                   help="default: SGD 0.01 one-stage / 0.02 two-stage at batch 16, scaled linearly; AdamW 1e-4 for "
                        "ConvNeXt/Swin detectors, 2e-4 for pretrain and Deformable DETR (not scaled)")
    p.add_argument("--momentum", default=0.9, type=float)
    p.add_argument("--wd", "--weight-decay", default=None, type=float, dest="weight_decay",
                   help="default 1e-4; 0.05 for ConvNeXt/Swin detectors (AdamW)")
    p.add_argument("--lr-steps", default=None, nargs="+", type=int, help="epochs at which lr drops 10x")
    p.add_argument("--warmup-iters", default=None, type=int,
                   help="linear warm-up iterations; default 500 (the paper's 1x), 100 (the small-data recipe)")
    p.add_argument("--clip-grad", default=None, type=float,
                   help="max grad norm (default 0.1 for pretrain and Deformable DETR, off otherwise)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                   help="bf16 autocast (GPU; on a CPU only where it has bf16 matrix units: AMX or AVX512-BF16); "
                        "--stage demo turns it on where the CPU has them, --no-amp keeps fp32")
    p.add_argument("--max-iters", default=None, type=int, help="cap on iterations per epoch (smoke tests)")
    p.add_argument("--msda-backend", default="auto", choices=["auto", "triton", "torch"],
                   help="multi-scale deformable attention of the AKEs, phi and Deformable DETR: auto runs the Triton "
                        "kernels on a GPU and the PyTorch path elsewhere; torch forces the PyTorch path (to compare "
                        "the two on a GPU); triton needs a GPU (or TRITON_INTERPRET=1)")
    # UniKD (paper defaults)
    p.add_argument("--num-queries", default=200, type=int, help="N, queries per AKE")
    p.add_argument("--extractor-layers", default=1, type=int, choices=[1, 2, 3], help="decoder layers in f_e")
    p.add_argument("--adapter-layers", default=None, type=int, choices=[0, 1, 2, 3, 4],
                   help="deformable self-attention layers in phi (default: 2 for unikd, 1 for fitnet, as the paper)")
    p.add_argument("--offset-init", default="deformable_detr", choices=["deformable_detr", "scale_aware"],
                   help="--stage pretrain: the content AKE's sampling offsets at init; scale_aware draws the points in "
                        "on levels shorter than 2 x n_points pixels (MSDeformAttn.reset_offsets), where Deformable "
                        "DETR's reach outside the map (small images; no change at COCO size)")
    p.add_argument("--lambda-ct", default=10.0, type=float, help="lambda_1 of Eq. (7)")
    p.add_argument("--lambda-pos", default=10.0, type=float, help="lambda_2 of Eq. (7)")
    p.add_argument("--fitnet-weight", default=10.0, type=float,
                   help="weight of the FitNet feature loss; default 10, the best of 0.05, 0.2, 1, 3 and 10 on a "
                        "heterogeneous pair of the grid (RESULTS.md, 'FitNet's weight')")
    # offline KD (paper sec. 3.3)
    p.add_argument("--offline", default=None, metavar="STORE",
                   help="--stage distill: read the teacher's knowledge from a --stage dump store; no teacher is run")
    p.add_argument("--dump-dtype", default="fp16", choices=sorted(store.DUMP_DTYPES),
                   help="--stage dump: dtype of the stored embeddings (boxes and reference points stay fp32)")
    p.add_argument("--dump-flips", default=2, type=int, choices=[1, 2],
                   help="--stage dump: 2 stores both horizontal-flip states of every image (the student trains with "
                        "random flips), 1 only the unflipped one (the student then trains without flips)")
    p.add_argument("--dump-shard-images", default=256, type=int,
                   help="--stage dump: images per shard file (a killed dump resumes at the first unfinished shard)")
    p.add_argument("--kd-cost", default=0, type=int, metavar="STEPS",
                   help="--stage distill: instead of training, time STEPS online KD steps against teacher forward + "
                        "student step (no KD) on the same batches, print the medians and their ratio, and for UniKD "
                        "the parts of its overhead (teacher side, phi, student side; bench.py)")
    # demo and grid (the paper's Table 2 in miniature): schedules of their steps
    p.add_argument("--smoke", action="store_true",
                   help="--stage demo: its steps on a few tiny images for a few iterations")
    p.add_argument("--teachers", default="fcos_r34,atss_r34",
                   help="--stage grid: teacher detectors; random_<name> is that architecture untrained (the control)")
    p.add_argument("--students", default="fcos_r18,atss_r18", help="--stage grid: student detectors")
    p.add_argument("--methods", default="none,fitnet,unikd", help="--stage grid: distillation methods")
    p.add_argument("--seeds", default="0,1,2", help="--stage grid: student seeds (teacher and AKE: seed 0)")
    p.add_argument("--teacher-epochs", default=None, type=int, help="--stage demo/grid: teacher training epochs")
    p.add_argument("--pretrain-epochs", default=None, type=int, help="--stage demo/grid: AKE pretraining epochs")
    p.add_argument("--student-epochs", default=None, type=int, help="--stage demo/grid: student epochs")
    p.add_argument("--jobs", default=1, type=int,
                   help="--stage demo/grid: steps run at once, each in a worker process with its share of the CPU "
                        "threads or a GPU of its own (not under torchrun)")
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
# the training loop shared by every stage

class Interrupted(Exception):
    """SIGINT/SIGTERM during training: the loop stopped after an iteration and saved a checkpoint of it."""

    def __init__(self, checkpoint, epoch, iteration, iters_per_epoch):
        super().__init__(f"interrupted at epoch {epoch}, iteration {iteration}/{iters_per_epoch}")
        self.checkpoint = checkpoint


@contextlib.contextmanager
def stop_requests():
    """SIGINT and SIGTERM ask the loop to stop after the current iteration (a list that gets the signal); a second
    SIGINT stops at once."""
    requested = []

    def handler(signum, frame):
        if requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        requested.append(signum)
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def fit(args, device, module, loss_fn, params, optimizer, train_loader, evaluate_fn, save_fn, resume=None,
        generator=None):
    """Epoch loop: warm-up + step schedule, logging, per-epoch eval, atomic checkpoints, --resume (mid-epoch too).

    loss_fn(images, targets) -> dict of scalar losses (summed for the backward pass);
    evaluate_fn() -> dict of metrics (rank 0); save_fn(epoch, metrics) writes the stage's own artefacts;
    resume: the checkpoint prepare_run loaded; generator: the stage's own random generator, whose state the
    checkpoint keeps so that a resumed run draws what an uninterrupted one would.
    """
    iters_per_epoch = len(train_loader) if args.max_iters is None else min(len(train_loader), args.max_iters)
    if iters_per_epoch == 0:
        raise UserError(f"{len(train_loader.dataset)} training images make no full batch of {args.batch_size} per "
                        f"process; lower --batch-size or use more images")
    scheduler = build_scheduler(optimizer, args, iters_per_epoch)
    start_epoch, start_iter, metrics = 0, 0, {}
    if resume is not None:
        start_epoch, start_iter, metrics = restore(resume, module, optimizer, scheduler, generator, args,
                                                   iters_per_epoch)
        log(args, f"resumed from {args.resume} at epoch {start_epoch}, iteration {start_iter}")
    jsonl = start_run(args, fresh=resume is None)
    checkpoint = os.path.join(args.output_dir, "checkpoint.pth")

    def save_checkpoint(epoch, iteration):
        if is_main(args):
            atomic_save({"kind": CHECKPOINT_KIND, "stage": args.stage, "run": args.run_name,
                         "model": module.state_dict(), "optimizer": optimizer.state_dict(),
                         "lr_scheduler": scheduler.state_dict(), "epoch": epoch,
                         "iteration": iteration, "layout": data_layout(args, iters_per_epoch), "metrics": metrics,
                         "args": vars(args), "rng": torch.get_rng_state(),
                         "generator": generator.get_state() if generator is not None else None}, checkpoint)
        if args.distributed:  # no rank leaves before the checkpoint is on disk
            dist.barrier()

    if args.epochs == 0:  # the initial weights, evaluated and saved (e.g. the grid's random teacher)
        metrics = evaluate_fn()
        log(args, "0 epochs: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if is_main(args):
            save_fn(-1, metrics)
        return metrics
    total_iters = iters_per_epoch * args.epochs
    t_start, done_at_start = time.time(), start_epoch * iters_per_epoch + start_iter
    stopping = False  # any rank was asked to stop (agreed on in every iteration's all-reduce)
    with stop_requests() as requested:
        for epoch in range(start_epoch, args.epochs):
            first = start_iter if epoch == start_epoch else 0
            train_loader.sampler.set_epoch(epoch, start=first * args.batch_size)
            module.train()
            t_epoch, n_images = time.time(), 0
            for it, (images, targets) in enumerate(train_loader, start=first):
                if it >= iters_per_epoch:
                    break
                images, targets = to_device(images, targets, device)
                with autocast(args, device):
                    losses = loss_fn(images, targets)
                logged, stopping = reduce_losses(losses, args, stop=bool(requested))
                bad = [k for k, v in logged.items() if not math.isfinite(v)]
                if bad:  # every rank sees the same reduced values, so every rank stops here
                    raise UserError(f"--stage {args.stage}: {bad[0]} is {logged[bad[0]]} at epoch {epoch}, iteration "
                                    f"{it + 1}; nothing was saved from this state: lower --lr, or check the data")
                optimizer.zero_grad(set_to_none=True)
                sum(losses.values()).backward()
                grad_norm = (torch.nn.utils.clip_grad_norm_(params, args.clip_grad) if args.clip_grad else
                             torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
                if not math.isfinite(grad_norm):  # (DDP averaged the gradients: every rank stops here too)
                    raise UserError(f"--stage {args.stage}: the gradient of {first_nonfinite_grad(module)} is not "
                                    f"finite at epoch {epoch}, iteration {it + 1} (losses finite); nothing was saved "
                                    f"from this state: lower --lr or set --clip-grad, or check the data")
                optimizer.step()
                lr = optimizer.param_groups[0]["lr"]  # the lr this step used
                scheduler.step()
                n_images += len(images) * args.world_size
                if it % args.print_freq == 0 or it == iters_per_epoch - 1:
                    done = epoch * iters_per_epoch + it + 1
                    eta = (time.time() - t_start) / max(1, done - done_at_start) * (total_iters - done)
                    img_s = n_images / max(1e-9, time.time() - t_epoch)
                    terms = "  ".join(f"{k} {v:.4f}" for k, v in logged.items())
                    log(args, f"epoch {epoch} [{it + 1}/{iters_per_epoch}]  loss {sum(logged.values()):.4f}  "
                              f"{terms}  lr {lr:.2e}  {img_s:.1f} img/s  eta {timedelta(seconds=int(eta))}")
                    jsonl.write(epoch=epoch, iter=it + 1, loss=sum(logged.values()), lr=lr, img_s=img_s, **logged)
                if stopping and it + 1 < iters_per_epoch:
                    save_checkpoint(epoch, it + 1)
                    raise Interrupted(checkpoint, epoch, it + 1, iters_per_epoch)
            if epoch == args.epochs - 1 or (args.eval_every and (epoch + 1) % args.eval_every == 0):
                metrics = evaluate_fn()
                log(args, f"epoch {epoch} eval: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                jsonl.write(epoch=epoch, eval=metrics, epoch_time_s=time.time() - t_epoch)
            if is_main(args):
                save_fn(epoch, metrics)
            save_checkpoint(epoch, iters_per_epoch)
            if (stopping or (requested and not args.distributed)) and epoch < args.epochs - 1:
                raise Interrupted(checkpoint, epoch, iters_per_epoch, iters_per_epoch)
    return metrics


def first_nonfinite_grad(module):
    return next((name for name, p in module.named_parameters()
                 if p.grad is not None and not torch.isfinite(p.grad).all()), "a parameter")


def data_layout(args, iters_per_epoch):
    """What decides which batch an iteration is: a run resumed mid-epoch must have the same."""
    return {"world_size": args.world_size, "batch_size": args.batch_size, "iters_per_epoch": iters_per_epoch,
            "seed": args.seed}


def restore(ckpt, module, optimizer, scheduler, generator, args, iters_per_epoch):
    """Loads a checkpoint's states -> (epoch, iteration within it, metrics) to continue from; a UserError when the
    checkpoint does not fit this run (other model flags, or another data layout for a mid-epoch resume)."""
    layout = ckpt.get("layout", data_layout(args, iters_per_epoch))
    if ckpt.get("iteration", iters_per_epoch) < iters_per_epoch and layout != data_layout(args, iters_per_epoch):
        raise UserError(f"--resume {args.resume}: stopped mid-epoch with {layout}, this run has "
                        f"{data_layout(args, iters_per_epoch)}; resume with the processes, --batch-size, --max-iters "
                        f"and --seed of the interrupted run")
    try:
        module.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["lr_scheduler"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"--resume {args.resume}: does not fit this run ({str(e).splitlines()[0][:200]}); resume with "
                        f"the flags of its args.json") from None
    if not args.distributed:  # each rank's random state is its own; one checkpoint keeps rank 0's
        if ckpt.get("rng") is not None:
            torch.set_rng_state(ckpt["rng"])
        if generator is not None and ckpt.get("generator") is not None:
            generator.set_state(ckpt["generator"])
    epoch, iteration = ckpt["epoch"], ckpt.get("iteration", iters_per_epoch)
    if iteration >= iters_per_epoch:
        epoch, iteration = epoch + 1, 0
    return epoch, iteration, ckpt.get("metrics", {})


def reduce_losses(losses, args, stop=False):
    """Each loss averaged over ranks, for logging, and whether any rank was asked to stop (all stop together)."""
    names = sorted(losses)
    vals = torch.stack([losses[k].detach().float() for k in names] + [losses[names[0]].new_tensor(float(stop))])
    if args.distributed:
        dist.all_reduce(vals)
        vals[:-1] /= args.world_size
    return {k: v.item() for k, v in zip(names, vals)}, bool(vals[-1] > 0)


def to_device(images, targets, device):
    return [im.to(device, non_blocking=True) for im in images], data.targets_to(targets, device)


def autocast(args, device):
    """bf16 autocast with --amp, on a GPU or a CPU (MSDA itself computes in fp32 either way)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.amp)


# ----------------------------------------------------------------------------------------------------------------------
# run folders, checkpoints, logs

def prepare_run(args, default_name):
    """runs/<default_name> unless given; checks --resume (returns its checkpoint) and refuses to start over an
    earlier run's checkpoint. Writes nothing: the folder is made when training starts (start_run)."""
    args.run_name = default_name
    args.output_dir = args.output_dir or os.path.join("runs", default_name)
    ckpt = os.path.join(args.output_dir, "checkpoint.pth")
    resume = load_resume_checkpoint(args.resume, args) if args.resume else None
    if os.path.exists(ckpt) and not (args.resume and os.path.samefile(args.resume, ckpt)):
        raise UserError(f"{ckpt} exists from an earlier run; pass --resume {ckpt} to continue it "
                        f"or --output-dir to start a new one")
    return resume


def start_run(args, fresh):
    """Makes the run folder and its args.json; a fresh run moves an older run's log.jsonl aside (never appends to
    it) -> the run's JsonlLogger."""
    log_path = os.path.join(args.output_dir, "log.jsonl")
    if is_main(args):
        os.makedirs(args.output_dir, exist_ok=True)
        atomic_write_json(os.path.join(args.output_dir, "args.json"), vars(args))
        if fresh and os.path.exists(log_path):
            k = 1
            while os.path.exists(os.path.join(args.output_dir, f"log.previous-{k}.jsonl")):
                k += 1
            os.replace(log_path, os.path.join(args.output_dir, f"log.previous-{k}.jsonl"))
    return JsonlLogger(log_path if is_main(args) else None)


class JsonlLogger:
    """One JSON object per line in log.jsonl; rank 0 only."""

    def __init__(self, path):
        self.path = path

    def write(self, **record):
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def load_resume_checkpoint(path, args=None):
    """A resumable checkpoint (of this stage and model when args are given), or a UserError naming the problem."""
    ckpt = load_user_file(path, "--resume", "a checkpoint", "pass the checkpoint.pth of an earlier run")
    if not isinstance(ckpt, dict) or ckpt.get("kind") != CHECKPOINT_KIND:
        raise UserError(f"--resume {path}: not a train.py checkpoint (no optimizer/epoch state); "
                        f"pass the checkpoint.pth of an earlier run")
    if args is not None and (ckpt.get("stage"), ckpt.get("run")) != (args.stage, args.run_name):
        raise UserError(f"--resume {path}: checkpoint of `{ckpt.get('stage')} {ckpt.get('run')}`, not "
                        f"`{args.stage} {args.run_name}`; pass the checkpoint.pth of this stage and model")
    return ckpt


def save_model(args, path, model, name, dataset, epoch, metrics, **extra):
    """model.pth: the detector's weights with what eval.py and later stages read back (name, classes, flags)."""
    atomic_save({"kind": MODEL_KIND, "model": model.state_dict(), "model_name": name,
                 "num_classes": dataset.num_classes, "categories": data.categories_of(dataset), "epoch": epoch,
                 "metrics": metrics, "args": vars(args), **extra}, path)


# ----------------------------------------------------------------------------------------------------------------------
# data, models, optimisation

def build_data(args, with_masks):
    """Train/val datasets and loaders; the embedded dataset is generated on first use (rank 0 first)."""
    if data.uses_embedded_data(args):
        if is_main(args):
            data.data_root(args, verbose=True)
        if args.distributed:
            dist.barrier()
    train_ds = data.build_dataset(args, "train", with_masks=with_masks)
    val_ds = data.build_dataset(args, "val")
    log(args, f"train: {train_ds.summary()}\nval: {val_ds.summary()}")
    note = data.splits_note(train_ds, val_ds)
    if note:
        log(args, note)
    loader = dict(workers=args.workers, rank=args.rank, world_size=args.world_size, seed=args.seed)
    return (train_ds, data.build_loader(train_ds, args.batch_size, train=True, **loader),
            data.build_loader(val_ds, args.batch_size, train=False, **loader))


def build_model(name, num_classes, flag, **kwargs):
    """detectors.build_detector, with weight/checkpoint problems turned into one-line user errors."""
    try:
        return detectors.build_detector(name, num_classes, **kwargs)
    except (detectors.CheckpointError, ValueError) as e:
        raise UserError(f"{flag}: {e}") from None


def build_frozen_teacher(name, num_classes, weights, args, device):
    teacher = build_model(name, num_classes, "teacher weights", weights=weights, min_size=args.min_size,
                          max_size=args.max_size).to(device)
    teacher.eval().requires_grad_(False)
    return use_msda_backend(teacher, args)


def use_msda_backend(module, args):
    """--msda-backend on every MSDA of module (AKEs, phi, a Deformable DETR) -> module."""
    for m in module.modules():
        if isinstance(m, msda.MSDeformAttn):
            m.backend = args.msda_backend
    return module


def check_msda_backend(args, device):
    """--msda-backend triton where the kernels cannot run is refused before anything is built (the check every MSDA
    call makes, on an empty tensor of the device)."""
    try:
        msda._resolve_backend(args.msda_backend, torch.empty(0, device=device))
    except ValueError as e:
        raise UserError(f"--msda-backend {args.msda_backend}: {e}") from None


def wrap_ddp(module, args, device):
    if not args.distributed:
        return module
    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None)


def set_schedule_defaults(args, family, epochs, optimizer="sgd"):
    """The recipe where flags are not given (args.recipe and args.optimizer, in args.json, say which).
    optimizer: "sgd" (ResNet detectors), "adamw" (ConvNeXt/Swin detectors, as their detection papers train them),
    "detr" (Deformable DETR) or "pretrain" (the AKEs).
    "1x", the paper's for COCO-format data: SGD lr 0.01 one-stage / 0.02 two-stage at batch 16, scaled linearly with
        the total batch, weight decay 1e-4; AdamW lr 1e-4 at batch 16, scaled the same way, weight decay 0.05;
        warm-up 500, x0.1 at 8 and 11 of 12 epochs. Pretraining: AdamW 2e-4, weight decay 1e-4, x0.1 at 2/3.
        Deformable DETR: its paper's AdamW 2e-4 (at any batch; 0.1x for sampling offsets, reference points and a
        pretrained backbone: detector_optimizer), weight decay 1e-4, gradient clipping 0.1, 50 epochs, x0.1 at 40
        (on generated data the small recipe's epochs and decay, with this optimizer and clipping).
    "small", for generated data (the embedded default), where detectors train from scratch for a few thousand
        iterations: twice the per-image lr (SGD 0.01 one-stage / 0.02 two-stage, AdamW 1e-4, at batch 8), warm-up
        100, one x0.1 at 11/12 of the epochs (in the last, for runs of a few)."""
    args.recipe = "small" if data.generated_params(args) is not None else "1x"
    args.optimizer = optimizer if optimizer in ("sgd", "detr") else "adamw"
    small = args.recipe == "small"
    if optimizer == "detr":
        args.clip_grad = 0.1 if args.clip_grad is None else args.clip_grad
        epochs = epochs if small else 50
    args.epochs = epochs if args.epochs is None else args.epochs
    if args.weight_decay is None:
        args.weight_decay = 0.05 if optimizer == "adamw" else 1e-4
    args.warmup_iters = (100 if small else 500) if args.warmup_iters is None else args.warmup_iters
    if args.lr is None:
        base = {"sgd": 0.02 if family in ("faster_rcnn", "mask_rcnn") else 0.01, "adamw": 1e-4}.get(optimizer)
        args.lr = 2e-4 if base is None else base * args.batch_size * args.world_size / (8 if small else 16)
    if args.lr_steps is None:
        if optimizer == "pretrain":
            args.lr_steps = [round(args.epochs * 2 / 3)]
        elif optimizer == "detr" and not small:
            args.lr_steps = [round(args.epochs * 4 / 5)]
        elif small:  # one decay, at 11/12 but within the run (a run of a few epochs decays in its last)
            args.lr_steps = [min(args.epochs - 1, round(args.epochs * 11 / 12))] if args.epochs > 1 else []
        else:
            args.lr_steps = [round(args.epochs * 8 / 12), round(args.epochs * 11 / 12)]


def detector_optimizer(module, args):
    """SGD with momentum; (args.optimizer "adamw", ConvNeXt/Swin detectors) AdamW without weight decay on norms,
    biases, layer scales and Swin's relative position bias tables, as Swin's and ConvNeXt's detection recipes; or
    ("detr") Deformable DETR's AdamW: 0.1x lr for what places the deformable samples (sampling offsets, reference
    points) and for the backbone's body when it starts from trained weights (--weights-backbone or --weights; a body
    from scratch learns at the full lr), weight decay on everything."""
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if args.optimizer == "sgd":
        return torch.optim.SGD([p for _, p in params], lr=args.lr, momentum=args.momentum,
                               weight_decay=args.weight_decay)
    if args.optimizer == "detr":
        # the paper's 0.1x keeps ImageNet features; from scratch it only slows the body (RESULTS.md)
        pretrained = args.weights_backbone is not None or args.weights is not None
        slow_body = ("backbone.body.",) if pretrained else ()
        return torch.optim.AdamW(unikd.param_groups(module, args.lr, also_slow=slow_body), lr=args.lr,
                                 weight_decay=args.weight_decay)
    free = [p.ndim <= 1 or n.endswith("layer_scale") or "relative_position_bias_table" in n for n, p in params]
    decay = [p for (_, p), f in zip(params, free) if not f]
    no_decay = [p for (_, p), f in zip(params, free) if f]
    return torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr,
                             weight_decay=args.weight_decay)


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


# ----------------------------------------------------------------------------------------------------------------------
# --stage train: a plain detector

def stage_train(args, device):
    name = canonical_model_name(args.model, "--model")
    family = detectors.family_of(name)
    set_schedule_defaults(args, family, epochs=12, optimizer=detectors.optimizer_of(name))
    resume = prepare_run(args, f"train_{name}")
    train_ds, train_loader, val_loader = build_data(args, with_masks=family == "mask_rcnn")
    model = use_msda_backend(build_model(name, train_ds.num_classes, "--weights/--weights-backbone",
                                         weights=args.weights, weights_backbone=args.weights_backbone,
                                         min_size=args.min_size, max_size=args.max_size).to(device), args)
    log(args, f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
              f"{train_ds.num_classes - 1} classes, {len(train_ds)} training images")
    ddp_model = wrap_ddp(model, args, device)
    params = [p for p in model.parameters() if p.requires_grad]

    def save(epoch, metrics):
        save_model(args, os.path.join(args.output_dir, "model.pth"), model, name, train_ds, epoch, metrics)

    return fit(args, device, model, lambda im, tg: ddp_model(im, tg), params, detector_optimizer(model, args),
               train_loader,
               lambda: evaluate(model, val_loader, device), save, resume)


# ----------------------------------------------------------------------------------------------------------------------
# --stage pretrain: AKEs absorb the frozen teacher's knowledge (paper sec. 3.2.2, Eq. 6)

def default_teacher_weights(name):
    path = os.path.join("runs", f"train_{name}", "model.pth")
    if not os.path.isfile(path):
        raise UserError(f"no weights for teacher {name}: run `python train.py --stage train --model {name}` first, "
                        f"or pass --teacher-weights PATH|DEFAULT")
    return path


def stage_pretrain(args, device):
    if args.teacher is None:
        raise UserError("--stage pretrain needs --teacher NAME (e.g. --teacher retinanet_r50)")
    name = canonical_model_name(args.teacher, "--teacher")
    weights = args.teacher_weights or default_teacher_weights(name)
    if os.path.exists(weights):  # a path (not DEFAULT): absolute, so ake.pth works from any folder
        weights = os.path.abspath(weights)
    set_schedule_defaults(args, detectors.family_of(name), epochs=15, optimizer="pretrain")
    args.clip_grad = 0.1 if args.clip_grad is None else args.clip_grad
    resume = prepare_run(args, f"pretrain_{name}")
    train_ds, train_loader, val_loader = build_data(args, with_masks=False)
    teacher = build_frozen_teacher(name, train_ds.num_classes, weights, args, device)
    config = dict(num_classes=train_ds.num_classes - 1, num_queries=args.num_queries,
                  num_extractor_layers=args.extractor_layers, d_model=detectors.fpn_channels(teacher))
    model = unikd.UniKD(**config)
    if args.offset_init == "scale_aware":  # each level's shorter side at the training images' shorter side
        model.ake_ct.reset_offsets([math.ceil(args.min_size / s) for s in detectors.AKE_STRIDES])
    model = use_msda_backend(model.to(device), args)
    counts = unikd.count_parameters(model)
    log(args, f"teacher {name} ({weights}); AKE parameters: " +
        ", ".join(f"{k} {v / 1e6:.3f} M" for k, v in counts.items()))
    ddp_model = wrap_ddp(model, args, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(unikd.param_groups(model, args.lr), lr=args.lr, weight_decay=args.weight_decay)
    generator = torch.Generator().manual_seed(args.seed + 1000 * args.rank)

    def loss_fn(images, targets):
        with torch.no_grad():
            out = detectors.forward_features(teacher, images, targets)
        return ddp_model(out.features, detectors.normalized_targets(out), generator=generator)  # Eq. (6)

    def save(epoch, metrics):
        atomic_save({"kind": AKE_FILE_KIND, "version": 1, "config": config, "state_dict": model.state_dict(),
                     "teacher": name, "teacher_weights": weights, "num_classes": train_ds.num_classes,
                     "min_size": args.min_size, "max_size": args.max_size, "epoch": epoch, "metrics": metrics},
                    os.path.join(args.output_dir, "ake.pth"))

    return fit(args, device, model, loss_fn, params, optimizer, train_loader,
               lambda: {**evaluate(AKEDetector(teacher, model), val_loader, device),
                        **attention_in_image(teacher, model, val_loader, device)}, save, resume, generator)


# ----------------------------------------------------------------------------------------------------------------------
# --stage distill: the student mimics the frozen AKEs' knowledge embeddings (paper sec. 3.2.3, Eq. 7-8)

def newest_ake():
    found = sorted(glob.glob(os.path.join("runs", "pretrain_*", "ake.pth")), key=os.path.getmtime)
    if not found:
        raise UserError("no AKE found in runs/pretrain_*/ake.pth: run `python train.py --stage pretrain --teacher NAME` "
                        "first, or pass --ake PATH")
    return found[-1]


class Distiller(torch.nn.Module):
    """Student + adapter phi (+ frozen AKEs): one module for DDP, the optimizer and checkpoints.
    forward -> the student's detection losses + the KD loss of its method."""

    def __init__(self, student, method, akes=None, adapter_layers=2, lambdas=(10.0, 10.0), fitnet_weight=10.0):
        super().__init__()
        self.student, self.method, self.lambdas, self.fitnet_weight = student, method, lambdas, fitnet_weight
        channels = detectors.fpn_channels(student)
        self.adapter = unikd.Adapter(channels, num_layers=adapter_layers) if method != "none" else None
        self.unikd = akes.freeze() if akes is not None else None  # AKE frozen: eval mode, no grads (sec. 3.2.3)

    def forward(self, images, targets, teacher_features=None, generator=None, knowledge_store=None):
        """The teacher side comes from teacher_features (online) or from a KnowledgeStore (offline: the entries of
        these images and flips, rescaled to the student's batch)."""
        out = detectors.forward_with_features(self.student, images, targets)
        losses = dict(out.result)
        if self.method == "none":
            return losses
        student_feats = self.adapter(out.features)  # phi(F^S)
        if knowledge_store is not None:
            knowledge = knowledge_store.knowledge(targets, out.padded_hw, student_feats[0].device)
            losses.update(self.unikd.student_loss(knowledge, student_feats, *self.lambdas))
        elif self.method == "unikd":
            losses.update(self.unikd.distill_loss(teacher_features, student_feats, detectors.normalized_targets(out),
                                                  *self.lambdas, generator))
        else:
            losses["loss_fitnet"] = self.fitnet_weight * unikd.fitnet_loss(teacher_features, student_feats,
                                                                           detectors.normalized_targets(out))
        return losses


def stage_distill(args, device):
    student_name = canonical_model_name(args.student, "--student")
    family = detectors.family_of(student_name)
    set_schedule_defaults(args, family, epochs=12, optimizer=detectors.optimizer_of(student_name))
    knowledge_store = None
    if args.offline:
        if args.method != "unikd":
            raise UserError(f"--offline serves UniKD's stored knowledge; --method {args.method} needs the teacher "
                            f"online (drop --offline)")
        knowledge_store = store.KnowledgeStore(args.offline)
    ake_path = args.ake or (knowledge_store.manifest["ake"] if knowledge_store else newest_ake())
    suffix = ("" if args.method == "unikd" else f"_{args.method}") + ("_offline" if knowledge_store else "")
    resume = None if args.kd_cost else prepare_run(args, f"distill_{student_name}{suffix}")
    log(args, f"AKE: {ake_path}" + ("" if args.ake else " (the store's)" if knowledge_store else
                                    " (newest runs/pretrain_*/ake.pth; pass --ake to choose)"))
    train_ds, train_loader, val_loader = build_data(args, with_masks=family == "mask_rcnn")
    # with a store, its own check below names the teacher mismatch
    ake_file = load_ake_file(ake_path, "--ake", train_ds.num_classes, None if knowledge_store else args.teacher)
    if (ake_file["min_size"], ake_file["max_size"]) != (args.min_size, args.max_size):
        log(args, f"note: AKE pretrained at min/max size {ake_file['min_size']}/{ake_file['max_size']}, "
                  f"distilling at {args.min_size}/{args.max_size}")
    if knowledge_store is not None:
        if knowledge_store.manifest["flips"] == [0]:
            train_ds.flip_p = 0.0
            log(args, f"{args.offline} holds unflipped images only: the student trains without flips")
        knowledge_store.check(ake_file, file_sha256(ake_path), args.teacher, train_ds.ids,
                              knowledge_store.manifest["flips"])
        log(args, f"offline: {knowledge_store.manifest['num_images']} images x "
                  f"{len(knowledge_store.manifest['flips'])} flip states from {args.offline} "
                  f"({knowledge_store.manifest['dtype']}); the teacher is not built")
    teacher = None
    if args.method != "none" and (knowledge_store is None or args.kd_cost):
        # the no-KD baseline trains on the identical schedule without running the teacher; offline needs none
        # (--kd-cost builds it to time the online step beside the offline one)
        teacher = build_frozen_teacher(ake_file["teacher"], train_ds.num_classes, ake_file["teacher_weights"], args,
                                       device)
    student = build_model(student_name, train_ds.num_classes, "--weights/--weights-backbone", weights=args.weights,
                          weights_backbone=args.weights_backbone, min_size=args.min_size, max_size=args.max_size)
    if args.adapter_layers is None:  # sec. 4.1: two layers for UniKD; sec. 4.3 (b): one for the modified FitNet
        args.adapter_layers = 2 if args.method == "unikd" else 1
    model = Distiller(student, args.method, frozen_unikd(ake_file) if args.method == "unikd" else None,
                      args.adapter_layers, (args.lambda_ct, args.lambda_pos), args.fitnet_weight).to(device)
    use_msda_backend(model, args)
    log(args, f"distill {student_name} from {ake_file['teacher']} with {args.method}; "
              f"trainable {sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f} M parameters")
    ddp_model = wrap_ddp(model, args, device)
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(args.seed + 1000 * args.rank)

    def loss_fn(images, targets, offline=knowledge_store is not None):
        feats = None
        if teacher is not None and not offline:
            with torch.no_grad():
                feats = detectors.forward_features(teacher, images, targets).features
        return ddp_model(images, targets, feats, generator, knowledge_store if offline else None)

    if args.kd_cost:
        import bench  # tooling: only this flag needs it
        return bench.kd_cost(args, device, loss_fn, teacher, model, detector_optimizer(model, args), train_loader,
                             lambda: autocast(args, device), to_device, offline=knowledge_store is not None)

    def save(epoch, metrics):
        atomic_save(student.state_dict(), os.path.join(args.output_dir, "student.pth"))
        save_model(args, os.path.join(args.output_dir, "model.pth"), student, student_name, train_ds,
                   epoch, metrics, teacher=ake_file["teacher"], ake=ake_path, method=args.method)

    return fit(args, device, model, loss_fn, params, detector_optimizer(model, args), train_loader,
               lambda: evaluate(student, val_loader, device), save, resume, generator)


# ----------------------------------------------------------------------------------------------------------------------
# --stage dump: the teacher side of Eq. (7), computed once per image and flip state into a store (sec. 3.3)

def stage_dump(args, device):
    ake_path = args.ake or newest_ake()
    train_ds, _, _ = build_data(args, with_masks=False)
    ake_file = load_ake_file(ake_path, "--ake", train_ds.num_classes, teacher=args.teacher)
    flips = [0, 1][:args.dump_flips]
    ids = [int(i) for i in train_ds.ids]
    path = args.output_dir or os.path.join("runs", f"dump_{ake_file['teacher']}")
    writer = store.StoreWriter(path, store.dump_params(ake_file, ake_path, ids, flips, args.dump_dtype,
                                                       args.dump_shard_images, args.batch_size, args.seed,
                                                       args.min_size, args.max_size))
    resuming = writer.resuming()
    teacher = build_frozen_teacher(ake_file["teacher"], train_ds.num_classes, ake_file["teacher_weights"], args,
                                   device)
    model = use_msda_backend(frozen_unikd(ake_file).to(device), args)
    if resuming:
        log(args, f"resuming the unfinished dump in {writer.partial}")
    elif is_main(args):
        writer.start()  # only now: a dump refused on its inputs writes nothing
    if args.distributed:
        dist.barrier()
    element_bytes = store.DUMP_DTYPES[args.dump_dtype].itemsize
    shards = [list(range(k, min(k + args.dump_shard_images, len(ids))))
              for k in range(0, len(ids), args.dump_shard_images)]
    log(args, f"dump {len(ids)} images x {len(flips)} flip states of teacher {ake_file['teacher']} with {ake_path} "
              f"into {path}: {len(shards)} shards of {writer.layout.itemsize} B records ({args.dump_dtype})")
    t0, done = time.time(), 0
    for k in range(args.rank, len(shards), args.world_size):
        if writer.has_shard(k):
            continue
        records, fitnet_full, fitnet_fg = [], [], []
        for flip in flips:
            loader = torch.utils.data.DataLoader(store.FixedFlip(train_ds, shards[k], bool(flip)),
                                                 batch_size=args.batch_size, num_workers=args.workers,
                                                 collate_fn=data.collate_fn)
            for b, (images, targets) in enumerate(loader):
                images, targets = to_device(images, targets, device)
                # the random boxes B^ of each batch come from its own seed: a resumed dump draws the same ones
                generator = torch.Generator().manual_seed(args.seed * 1_000_003 + (k * 2 + flip) * 10_007 + b)
                with torch.no_grad(), autocast(args, device):
                    out = detectors.forward_features(teacher, images, targets)
                    ake_targets = detectors.normalized_targets(out)
                    knowledge = model.teacher_knowledge(out.features, ake_targets, generator)
                records.append(store.knowledge_to_records(knowledge, [t["image_id"] for t in targets], flip,
                                                          out.padded_hw, writer.layout, args.dump_dtype))
                full, fg = store.fitnet_bytes(out.features, ake_targets, element_bytes)
                fitnet_full += [full] * len(images)
                fitnet_fg += fg
        records = np.concatenate(records)
        writer.write_shard(k, records, fitnet_full, fitnet_fg)
        done += len(records)
        log(args, f"shard {k + 1}/{len(shards)}: {len(records)} records, "
                  f"{done / max(1e-9, time.time() - t0):.1f} records/s")
    if args.distributed:
        dist.barrier()
    if is_main(args):
        s = writer.finish(len(shards))["storage"]
        log(args, f"store {path}: {s['bytes_per_image']} B per image ({len(flips)} flip states); FitNet would need "
                  f"{s['fitnet_full_bytes_per_image']:.0f} B (full levels) / {s['fitnet_fg_bytes_per_image']:.0f} B "
                  f"(foreground) per image here, x{s['ratio_full']:.1f} / x{s['ratio_fg']:.1f}; at COCO train2017 "
                  f"({store.COCO_TRAIN_IMAGES} images, 800x1333): UniKD {s['coco_unikd_bytes'] / 1e9:.1f} GB, FitNet "
                  f"{s['coco_fitnet_full_bytes'] / 1e12:.2f} TB full (x{s['coco_ratio_full']:.1f}), "
                  f"{s['coco_fitnet_fg_bytes'] / 1e12:.2f} TB foreground")
    return path


# ----------------------------------------------------------------------------------------------------------------------

STAGES = {"train": stage_train, "pretrain": stage_pretrain, "dump": stage_dump, "distill": stage_distill}
PIPELINES = {"demo": grid.stage_demo, "grid": grid.stage_grid}


def resume_command(args, checkpoint):
    """The command that continues an interrupted run: a pipeline is rerun (it skips finished steps and resumes the
    interrupted one); a stage gets --resume."""
    if args.stage in PIPELINES:
        return args.command
    kept, i = [], 0
    while i < len(args.argv):
        a = args.argv[i]
        i += 2 if a == "--resume" else 1
        if not a.startswith("--resume"):
            kept.append(a)
    launcher = f"torchrun --nproc_per_node={args.world_size} train.py " if args.distributed else "python train.py "
    return launcher + shlex.join(kept + ["--resume", checkpoint])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = get_args_parser()
    args = parser.parse_args(argv)
    args.explicit = explicit_flags(get_args_parser(), argv)
    args.argv, args.command = argv, "python train.py " + shlex.join(argv)
    try:
        if args.data_path is not None and not os.path.isdir(args.data_path):
            raise UserError(f"--data-path {args.data_path}: no such directory; pass a COCO-layout root "
                            f"(train2017/, val2017/, annotations/) or omit it for the embedded dataset")
        device = init_distributed(args)
        check_msda_backend(args, device)
        torch.manual_seed(args.seed + args.rank)
        data.resolve_sizes(args)
        if args.amp and device.type == "cpu" and not cpu_has_bf16_units():
            log(args, "--amp: this CPU has no bf16 matrix units (AMX, AVX512-BF16); bf16 will be slower than fp32")
        if args.stage in PIPELINES:
            PIPELINES[args.stage](args, grid.Steps(args, device, get_args_parser, STAGES))
        else:
            STAGES[args.stage](args, device)
    except UserError as e:
        report_user_error(e)
    except Interrupted as e:
        log(args, f"{e}: checkpoint {e.checkpoint}\ncontinue with: {resume_command(args, e.checkpoint)}")
        sys.exit(130)
    except KeyboardInterrupt:
        checkpoint = os.path.join(getattr(args, "output_dir", None) or "", "checkpoint.pth")
        log(args, "interrupted; continue with: " + (resume_command(args, checkpoint)
                                                    if os.path.isfile(checkpoint) else args.command))
        sys.exit(130)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
