"""Helpers shared by the command-line files: one-line user errors, atomic writes, the distributed world, and the
self-describing `ake.pth` of `--stage pretrain`.

Every error a user can cause ends as one line "error: <problem>; <fix>" on stderr and exit code 2; under torchrun
only rank 0 prints it (every rank hits the same check), except errors local to one rank (an image only that rank
reads), which that rank prints.
"""
import argparse
import functools
import hashlib
import json
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

import detectors
import unikd

AKE_FILE_KIND = "unikd_ake"
CHECKPOINT_KIND = "unikd_checkpoint"  # resumable training state (checkpoint.pth)
MODEL_KIND = "unikd_model"  # a trained detector with its name and training flags (model.pth)


# ---------------------------------------------------------------------------------------------------- user errors

RANK_0_REPORTS_FIRST_S = 5.0


class UserError(Exception):
    """An error the user caused and can fix; the message reads '<problem>; <fix>'."""


class LocalUserError(UserError):
    """A UserError only this rank sees (e.g. a corrupt image in its shard of the data): every rank prints its own."""


def user_error_line(error: BaseException) -> str:
    """The one-line message; a UserError re-raised by a DataLoader worker carries a traceback, keep its end."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(error).__name__
    return "error: " + last.split("UserError: ", 1)[-1].strip()


def report_user_error(error: UserError):
    """Print the one line (rank 0 only, unless the error is local to this rank) and exit 2.

    Under torchrun the first worker to exit stops the others; an error every rank sees is printed by rank 0, so the
    other ranks give it a few seconds to print and exit first (torchrun then names rank 0's exit code 2 as the cause).
    """
    rank = int(os.environ.get("RANK", 0))
    if rank == 0 or isinstance(error, LocalUserError):
        prefix = f"[rank {rank}] " if rank and isinstance(error, LocalUserError) else ""
        print(prefix + user_error_line(error), file=sys.stderr, flush=True)
        sys.exit(2)
    exit_2_after_rank_0()


def exit_2_after_rank_0():
    """Exit 2 on a rank other than 0 once rank 0 has had the time to print the error line and exit first."""
    time.sleep(RANK_0_REPORTS_FIRST_S)
    sys.exit(2)


def exit_on_user_error(main):
    """Decorator for CLI entry points: UserError -> one line on stderr, exit code 2."""
    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            report_user_error(e)
    return wrapped


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's error format: one line, exit code 2 (argparse prints usage + error)."""

    def error(self, message):
        if int(os.environ.get("RANK", 0)) != 0:
            exit_2_after_rank_0()
        print(f"error: {message}; see {self.prog} --help", file=sys.stderr, flush=True)
        sys.exit(2)


def canonical_model_name(name, flag):
    """The canonical detector name, or a UserError listing the valid ones."""
    try:
        return detectors.canonical_name(name)
    except ValueError as e:
        raise UserError(f"{flag} {name}: {e}") from None



def explicit_flags(parser, argv):
    """The dests of the flags given on the command line (not left at their defaults), sorted."""
    unset = object()
    parser.set_defaults(**{a.dest: unset for a in parser._actions if a.dest != "help"})
    return sorted(k for k, v in vars(parser.parse_args(argv)).items() if v is not unset)

# ---------------------------------------------------------------------------------------------- atomic writes

def atomic_write(path, write):
    """write(tmp_path) into a temp name next to path, then rename: a kill never leaves a torn file, and
    processes writing the same path never interleave."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_save(obj, path):
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def atomic_write_json(path, data, indent=1):
    atomic_write_text(path, json.dumps(data, indent=indent))


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -------------------------------------------------------------------------------------------- distributed world

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


# ------------------------------------------------------------------------------------------------------ ake.pth

def load_user_file(path, flag, what, fix, weights_only=True):
    """torch.load of a file the user named, or a UserError "<flag> <path>: no such file | not <what>; <fix>"."""
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: no such file; {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:  # torch and pickle raise many types for a file that is not theirs
        raise UserError(f"{flag} {path}: not {what} ({type(e).__name__}); {fix}") from None


def load_ake_file(path, flag="--ake", num_classes=None, teacher=None):
    """ake.pth -> its dict {kind, config, state_dict, teacher, teacher_weights, num_classes, min_size, max_size, ...},
    checked against the dataset's class count and the teacher the user named, or a UserError naming the problem."""
    hint = "pass the ake.pth written by --stage pretrain"
    ake_file = load_user_file(path, flag, "an AKE file", hint)
    if not isinstance(ake_file, dict) or ake_file.get("kind") != AKE_FILE_KIND:
        raise UserError(f"{flag} {path}: not an AKE file (no UniKD AKE state in it); {hint}")
    if num_classes is not None and ake_file["num_classes"] != num_classes:
        raise UserError(f"{flag} {path}: trained for {ake_file['num_classes'] - 1} classes, the dataset has "
                        f"{num_classes - 1}; pretrain an AKE on this dataset")
    if teacher is not None and canonical_model_name(teacher, "--teacher") != ake_file["teacher"]:
        raise UserError(f"{flag} {path} was pretrained on teacher {ake_file['teacher']}, not {teacher}; "
                        f"pass the matching --teacher or the AKE of {teacher}")
    return ake_file


def frozen_unikd(ake_file):
    """The UniKD (both AKEs) of a loaded ake.pth, frozen for distillation (sec. 3.2.3)."""
    model = unikd.UniKD(**ake_file["config"])
    model.load_state_dict(ake_file["state_dict"])
    return model.freeze()


def cpu_has_bf16_units():
    """Whether this CPU multiplies bf16 matrices in hardware (AMX tiles or AVX512-BF16); without them oneDNN emulates
    bf16 and --amp is slower than fp32."""
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
