"""`--stage demo` and `--stage grid`: whole pipelines of train.py's stages (the paper's Table 2 in miniature).

Every step (a teacher's training, its AKE's pretraining, one student cell) is its own run in its own folder, with its
own checkpoint and result.json: a rerun skips finished steps and continues an interrupted one from its checkpoint.
train.py dispatches here and hands over its parser and stages (this file does not import train.py).

    python train.py --stage demo [--smoke]       # teacher -> AKE -> a heterogeneous student without KD and with UniKD
    python train.py --stage grid --teachers fcos_r34 --students fcos_r18,retinanet_r18_v2 --methods none,fitnet,unikd
"""
import concurrent.futures
import functools
import itertools
import json
import multiprocessing
import os
import statistics
import time

import torch

import detectors
from data import resolve_sizes
from utils import (UserError, atomic_write_json, atomic_write_text, canonical_model_name, cpu_has_bf16_units,
                   file_sha256, is_main, log)

# flags a demo or grid passes on to each of its steps (data, image size, loader, precision, smoke caps, MSDA backend;
# the device is set on each step directly)
PASSED_ON = ("data_path", "train_images", "train_ann", "val_images", "val_ann", "min_size", "max_size",
             "shapes_train", "shapes_val", "shapes_size", "shapes_seed", "workers", "batch_size", "amp", "max_iters",
             "print_freq", "num_queries", "warmup_iters", "offset_init", "msda_backend")
# flags the pipelines read themselves; any other flag would be silently ignored by every step, so it is refused
OWN_FLAGS = {"demo": ("teacher", "student", "seed", "smoke"),
             "grid": ("teachers", "students", "methods", "seeds", "report")}
SHARED_FLAGS = ("stage", "teacher_epochs", "pretrain_epochs", "student_epochs", "jobs", "output_dir", "device")
SMOKE_DEFAULTS = dict(teacher="fcos_r50", student="retinanet_r18_v2", shapes_train=32, shapes_val=16,
                      shapes_size=[64, 96], batch_size=4, teacher_epochs=1, pretrain_epochs=1, student_epochs=1,
                      warmup_iters=2, output_dir=os.path.join("runs", "smoke"))
# sized so that the teacher, most of the demo's time, learns enough to have something to distil: ATSS-R34 learns
# fastest from scratch of the families tried; one AKE epoch keeps the whole within ten minutes on a 2-core CPU with
# AMX (RESULTS.md, "The demo on the CPU")
DEMO_DEFAULTS = dict(teacher="atss_r34", student="retinanet_r18_v2", shapes_train=800, shapes_val=100,
                     teacher_epochs=8, pretrain_epochs=1, student_epochs=1, warmup_iters=40)
# below this teacher AP a demo has too little to distil for a student's gain to mean much
DEMO_MIN_TEACHER_AP = 0.25
# AKEs 15 epochs, as the paper pretrains them (sec. 4.1). Students 6: after 4 the R18 students alone end at
# 0.05-0.20 AP, after 8 ATSS-R18 alone reaches 0.91x its FCOS-R34 teacher (RESULTS.md, "The student schedule")
GRID_DEFAULTS = dict(shapes_train=1000, shapes_val=250, teacher_epochs=12, pretrain_epochs=15, student_epochs=6)
# --teachers random_<name>: that architecture untrained (0 epochs), its AKE pretrained the same way -- the control
# that shows whether a gain comes from what the teacher learned or from the AKE and the adapter alone
RANDOM_PREFIX = "random_"


def teacher_spec(text):
    """A --teachers entry -> its canonical name, random_ kept."""
    random = text.startswith(RANDOM_PREFIX)
    name = canonical_model_name(text[len(RANDOM_PREFIX):] if random else text, "--teachers")
    return RANDOM_PREFIX + name if random else name


def architecture(teacher):
    return teacher[len(RANDOM_PREFIX):] if teacher.startswith(RANDOM_PREFIX) else teacher


class Steps:
    """Runs train.py's stages as the steps of a pipeline, each in its own folder. make_parser: train.py's
    get_args_parser; stages: its {name: stage function}; args and device: the pipeline's own."""

    def __init__(self, args, device, make_parser, stages):
        self.args, self.device, self.make_parser, self.stages = args, device, make_parser, stages

    def passed_on_flags(self):
        """The command-line flags of PASSED_ON whose values differ from the parser's defaults."""
        defaults, flags = self.make_parser().parse_args([]), []
        for name in PASSED_ON:
            value = getattr(self.args, name)
            if value == getattr(defaults, name) or value is None:
                continue
            flag = "--" + name.replace("_", "-")
            flags += [flag] if value is True else [flag] + [str(v) for v in (value if isinstance(value, list)
                                                                            else [value])]
        return flags

    def run(self, out_dir, argv, record=None):
        """One stage as its own run in out_dir -> its result.json ({"metrics", "seconds", "command"}, and record's
        items). A step whose result.json exists is skipped; an interrupted one continues from its checkpoint."""
        args = self.args
        result_file = os.path.join(out_dir, "result.json")
        if os.path.isfile(result_file):
            with open(result_file) as f:
                return dict(json.load(f), skipped=True)
        if args.stage == "grid" and args.report:  # only what has finished
            return None
        argv = argv + self.passed_on_flags() + ["--output-dir", out_dir]
        step = self.make_parser().parse_args(argv)
        if os.path.isfile(os.path.join(out_dir, "checkpoint.pth")):
            step.resume = os.path.join(out_dir, "checkpoint.pth")
        step.distributed, step.rank, step.world_size, step.device = (args.distributed, args.rank, args.world_size,
                                                                     args.device)
        resolve_sizes(step)
        torch.manual_seed(step.seed + step.rank)
        t0 = time.time()
        log(args, f"== {' '.join(argv)}")
        metrics = self.stages[step.stage](step, self.device)
        result = {"metrics": metrics, "seconds": time.time() - t0, "command": "python train.py " + " ".join(argv),
                  "threads": torch.get_num_threads(), "device": str(self.device), **(record or {})}
        if is_main(args):
            atomic_write_json(result_file, result)
        return result

    def teacher_and_ake(self, root, teacher):
        """The teacher's training and its AKE's pretraining (seed 0), as steps of root -> (teacher result, AKE
        result, ake.pth)."""
        tdir, adir = os.path.join(root, f"teacher_{teacher}"), os.path.join(root, f"ake_{teacher}")
        epochs = 0 if teacher.startswith(RANDOM_PREFIX) else self.args.teacher_epochs
        t = self.run(tdir, ["--stage", "train", "--model", architecture(teacher), "--epochs", str(epochs),
                            "--eval-every", "0"])
        a = self.run(adir, ["--stage", "pretrain", "--teacher", architecture(teacher), "--teacher-weights",
                            os.path.join(tdir, "model.pth"), "--epochs", str(self.args.pretrain_epochs),
                            "--eval-every", "0"])
        return t, a, os.path.join(adir, "ake.pth")

    def student(self, out_dir, student, method, seed, ake):
        """One student cell in out_dir (cell_dir's). A cell with KD records which AKE file it learned from
        (ake_sha256): two trainings of one teacher command differ by as much as two methods can (RESULTS.md)."""
        digest = ake_sha256(ake) if method != "none" else None
        record = {"ake_sha256": digest} if digest else {}
        return self.run(out_dir, ["--stage", "distill", "--student", student, "--method", method, "--ake", ake,
                                  "--seed", str(seed), "--epochs", str(self.args.student_epochs), "--eval-every", "0"],
                        record)


def ake_sha256(path):
    """The SHA-256 of the AKE file at path (None if there is none), read once per version of the file: every cell of a
    teacher's rows asks for the same one."""
    if not os.path.isfile(path):
        return None
    stat = os.stat(path)
    return file_sha256_of_version(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=None)
def file_sha256_of_version(path, mtime_ns, size):
    return file_sha256(path)


def cell_dir(root, teacher, student, method, seed):
    """A student cell's folder. Without KD the student never sees its teacher (the AKE file is read for its class
    count only), so one run per (student, seed) serves every teacher's row."""
    return os.path.join(root, f"none__{student}__s{seed}" if method == "none" else
                        f"{teacher}__{student}__{method}__s{seed}")


class InProcess(concurrent.futures.Executor):
    """--jobs 1: each step runs when it is submitted, in this process (an error surfaces at once)."""

    def submit(self, fn, *args):
        future = concurrent.futures.Future()
        future.set_result(fn(*args))
        return future


def step_pool(args, device):
    """Where a pipeline's steps run: here (--jobs 1), or in --jobs worker processes at once, each with its share of
    the CPU threads or, on CUDA, a GPU of its own (worker i: cuda:i mod the GPU count; on one GPU they share it,
    which suits miniature steps too small to fill it)."""
    if args.jobs < 1:
        raise UserError(f"--jobs {args.jobs}: give the number of steps to run at once (1 or more)")
    if args.jobs == 1 or args.report:
        return InProcess()
    if args.distributed:
        raise UserError(f"--jobs {args.jobs}: steps run in worker processes of one launcher, but under torchrun every "
                        f"step already spans all ranks; leave --jobs at 1")
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked OpenMP or CUDA state
    slots = context.Queue()
    for i in range(args.jobs):
        slots.put(i)
    threads = max(1, torch.get_num_threads() // args.jobs)
    return concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context, initializer=start_worker,
                                                  initargs=(slots, threads, device))


WORKER_DEVICE = None  # a --jobs worker's own device; None in the launching process


def start_worker(slots, threads, device):
    """A --jobs worker: its CPU threads, and its own GPU when the pipeline runs on CUDA."""
    global WORKER_DEVICE
    torch.set_num_threads(threads)
    WORKER_DEVICE = torch.device("cuda", slots.get() % torch.cuda.device_count()) if device.type == "cuda" else device


def in_worker(steps, method, *args):
    """steps.<method>(*args), on this worker's device when it is a --jobs worker."""
    if WORKER_DEVICE is not None:
        steps.device, steps.args.device = WORKER_DEVICE, str(WORKER_DEVICE)
    return getattr(steps, method)(*args)


def refuse_unused_flags(args, parser):
    """One line (UserError) for a flag the pipeline neither reads nor passes on: its steps set their own schedule,
    recipe and method settings, so e.g. --lr or --fitnet-weight would change nothing."""
    used = set(PASSED_ON + SHARED_FLAGS + OWN_FLAGS[args.stage])
    unused = [dest for dest in args.explicit if dest not in used]
    if unused:
        flag = next(o for a in parser._actions if a.dest == unused[0] for o in a.option_strings if o.startswith("--"))
        raise UserError(f"{flag}: --stage {args.stage} does not pass it on to its steps; run the stage that uses it "
                        f"(--stage train, pretrain or distill) on its own, or leave it out")


def apply_defaults(args, defaults):
    """Fills the demo/grid schedule defaults into the flags the user did not give."""
    for name, value in defaults.items():
        if name not in args.explicit:
            setattr(args, name, value)
    args.min_size = args.min_size if "min_size" in args.explicit else None  # sizes follow the defaults' data
    args.max_size = args.max_size if "max_size" in args.explicit else None
    resolve_sizes(args)


def stage_demo(args, steps):
    """Teacher -> AKE -> one heterogeneous student without KD and with UniKD; a table of APs and step times. With
    --smoke, the same on a few tiny images for a few iterations: it shows that every stage runs, not what it gains."""
    refuse_unused_flags(args, steps.make_parser())
    apply_defaults(args, SMOKE_DEFAULTS if args.smoke else DEMO_DEFAULTS)
    if not args.smoke and "amp" not in args.explicit and steps.device.type == "cpu" and cpu_has_bf16_units():
        args.amp = True  # bf16 is faster where the CPU multiplies it in hardware, AMX / AVX512-BF16 (RESULTS.md)
        log(args, "demo: bf16 autocast (--amp), this CPU multiplies bf16 in hardware; --no-amp keeps fp32")
    teacher = canonical_model_name(args.teacher, "--teacher")
    student = canonical_model_name(args.student, "--student")
    root = args.output_dir or os.path.join("runs", "demo")
    t, a, ake = steps.teacher_and_ake(root, teacher)
    rows = [("teacher", teacher, t), ("AKE (content queries)", f"AKE of {teacher}", a)]
    with step_pool(args, steps.device) as pool:  # the two students at once under --jobs 2
        students = [pool.submit(in_worker, steps, "student", cell_dir(root, teacher, student, method, args.seed),
                                student, method, args.seed, ake) for method in ("none", "unikd")]
        rows += [(f"student, {name}", student, s.result()) for name, s in zip(("no KD", "UniKD"), students)]
    lines = ["| step | model | AP | AP50 | wall time |", "| --- | --- | ---: | ---: | ---: |"]
    for step, model, r in rows:
        m = r["metrics"]
        lines.append(f"| {step} | {model} | {m.get('AP', float('nan')):.3f} | {m.get('AP50', float('nan')):.3f} | "
                     f"{r['seconds']:.0f} s{' (earlier run)' if r.get('skipped') else ''} |")
    teacher_ap, _, alone_ap, unikd_ap = (r["metrics"].get("AP", float("nan")) for _, _, r in rows)
    lines.append("\nsmoke test: every stage runs; on this handful of images the numbers mean nothing" if args.smoke
                 else "\n" + demo_verdict(teacher_ap, alone_ap, unikd_ap))
    log(args, "\n".join(["", f"demo ({root}), one seed:"] + lines))
    return {"rows": [(s, m, r["metrics"], r["seconds"]) for s, m, r in rows]}


def demo_verdict(teacher, alone, unikd):
    """What the demo's APs say, plainly: whether there was anything to distil, and whether UniKD beat the student
    alone (one seed: a difference within ~0.005 AP is not a gain)."""
    if teacher <= alone:
        return (f"The teacher (AP {teacher:.3f}) is not stronger than the student without KD (AP {alone:.3f}): there "
                f"is nothing to distil; give it more --teacher-epochs.")
    if teacher < DEMO_MIN_TEACHER_AP:
        return (f"The teacher is still weak (AP {teacher:.3f}): in this budget the demo shows that every stage runs, "
                f"not what UniKD gains (student AP {alone:.3f} alone, {unikd:.3f} with UniKD). For a teacher that has "
                f"learned, give more --teacher-epochs, or see --stage grid.")
    if unikd - alone > 0.005:
        return f"UniKD beat the student alone by {unikd - alone:+.3f} AP ({unikd:.3f} against {alone:.3f}), one seed."
    return (f"In this budget UniKD did not beat the student alone (AP {unikd:.3f} against {alone:.3f}); the grid's "
            f"longer schedule and seeds (--stage grid) are where a gain can show.")


def stage_grid(args, steps):
    """The paper's Table 2 in miniature: every (teacher, student, method, seed) cell trains and evaluates on its
    own and writes its result.json; a rerun skips finished cells; results.md gathers mean +- std AP per cell."""
    refuse_unused_flags(args, steps.make_parser())
    apply_defaults(args, GRID_DEFAULTS)
    split = lambda text: [x for x in text.split(",") if x]  # noqa: E731
    teachers = [teacher_spec(x) for x in split(args.teachers)]
    students = [canonical_model_name(x, "--students") for x in split(args.students)]
    methods, seeds = split(args.methods), [int(x) for x in split(args.seeds)]
    bad = [m for m in methods if m not in ("none", "fitnet", "unikd")]
    if bad:
        raise UserError(f"--methods {args.methods}: unknown method {bad[0]}; choose from none, fitnet, unikd")
    root = args.output_dir or os.path.join("runs", "grid")
    cells, prerequisites, runs = {}, {}, {}
    with step_pool(args, steps.device) as pool:  # every teacher's chain at once, then its cells as workers free up
        chains = {teacher: pool.submit(in_worker, steps, "teacher_and_ake", root, teacher) for teacher in teachers}
        for teacher in teachers:
            t, a, ake = chains[teacher].result()
            prerequisites[teacher] = (t, a, ake)
            for student, method, seed in itertools.product(students, methods, seeds):
                out_dir = cell_dir(root, teacher, student, method, seed)
                if out_dir not in runs:  # a cell without KD serves every teacher's row
                    runs[out_dir] = pool.submit(in_worker, steps, "student", out_dir, student, method, seed, ake)
                cells[teacher, student, method, seed] = out_dir
        cells = {key: runs[out_dir].result() for key, out_dir in cells.items()}
    if is_main(args):
        path = os.path.join(root, "results.md")  # grids over disjoint cells may share a root and finish together
        atomic_write_text(path, grid_table(args, root, prerequisites, cells, teachers, students, methods, seeds,
                                           steps.passed_on_flags()))
        log(args, f"wrote {path}")
    return {"cells": len(cells)}


def grid_table(args, root, prerequisites, cells, teachers, students, methods, seeds, passed_on=()):
    """results.md: teacher and AKE AP, then per (teacher, student) the mean +- std AP over seeds of each method
    and its gain over `none`, notes on cells that cannot be compared, and the commands that reproduce every number.
    prerequisites: {teacher: (teacher result, AKE result, ake.pth)}."""
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
        t, a, _ = prerequisites[teacher]
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
        same = detectors.family_of(architecture(teacher)) == detectors.family_of(student)
        kind = "homogeneous" if same else "heterogeneous"
        out.append(f"| {teacher} → {student} ({kind}) | " + " | ".join(row + gains) + " |")
        t = prerequisites[teacher][0]
        if t is not None and values.get("none") and ap(t) <= statistics.mean(values["none"]) and \
                not teacher.startswith(RANDOM_PREFIX):  # the control is meant to know nothing
            weaker.append(f"{teacher} (AP {ap(t):.3f}) is not stronger than {student} without KD (AP "
                          f"{statistics.mean(values['none']):.3f}): nothing to distil; give it more --teacher-epochs.")
    shown = {key: r for key, r in cells.items() if key[1] in students and key[2] in methods and key[3] in seeds}
    notes = weaker + [line for teacher in teachers
                      for line in other_ake_trainings(teacher, prerequisites[teacher][2], shown)]
    out += ([""] + [f"Note: {line}" for line in notes]) if notes else []
    out += ["", "Commands (each cell's own `result.json` holds its command and wall time):", "", "```",
            "python train.py --stage grid " + " ".join(
                ["--teachers", ",".join(teachers), "--students", ",".join(students), "--methods", ",".join(methods),
                 "--seeds", ",".join(map(str, seeds)), "--teacher-epochs", str(args.teacher_epochs),
                 "--pretrain-epochs", str(args.pretrain_epochs), "--student-epochs", str(args.student_epochs)]
                + list(passed_on) + (["--output-dir", root] if args.output_dir else []))]
    for teacher in teachers:  # in the order they ran
        out += [r["command"] for r in prerequisites[teacher][:2] if r is not None]
        out += [r["command"] for (t, *_), r in cells.items() if t == teacher and r is not None]
    out += ["```", ""]
    return "\n".join(out)


def other_ake_trainings(teacher, ake, cells):
    """A note for the KD cells of teacher's rows that learned from another file than the AKE now at ake (the teacher
    and its AKE trained again in this root): their APs and those of the cells beside them are not comparable."""
    now = ake_sha256(ake)
    other = [f"{student} {method} seed {seed}" for (t, student, method, seed), r in cells.items()
             if t == teacher and r is not None and r.get("ake_sha256", now) != now]
    return [f"{teacher} → {', '.join(other)} learned from another training of {teacher} and its AKE than {ake}: "
            f"compare methods only between cells of one training."] if other else []
