"""Benchmarks and the ahead-of-time compile check: the multi-scale deformable attention of deform_attn_triton.py,
and the cost of a distillation step (`train.py --stage distill --kd-cost STEPS` calls kd_cost here).

Tooling only: deform_attn_triton.py (the file to copy into another codebase) does not need this one.

    python bench.py --bench            timings of every available backend vs grid_sample
    python bench.py --compile-check    builds both Triton kernels for sm_80 and sm_90 without a GPU: a table
                                       of configs, registers, spills (what a GPU run would launch)

    python bench.py --detectors retinanet_r50,retinanet_swin_t   training img/s and parameters of detectors,
                                       each against the first in the same run

    python bench.py --bench --sizes decoder --device cpu --runs 10 --threads 1
    python bench.py --compile-check --archs 90 --dtypes fp32,bf16 --sizes decoder
"""
import itertools
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
import warnings

import torch
from torch.utils import flop_counter

import deform_attn_triton as msda
import detectors
from utils import ArgumentParser, UserError, log

SIZE_NAMES = ("decoder", "encoder-128px", "encoder-512px")   # bench sizes on every device (GPU adds more)

_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
                torch.int64: "i64"}


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def main(argv=None):
    """Runs --compile-check and/or --bench; exit code 1 if a kernel build failed."""
    args = _parse_args(argv)
    sizes = [s for s in args.sizes.split(",") if s]
    failed = False
    if args.compile_check:
        by_name = {v: k for k, v in _DTYPE_NAMES.items()}
        rows = compile_check(archs=[int(a) for a in args.archs.split(",")],
                             dtypes=[by_name[d] for d in args.dtypes.split(",")],
                             sizes=sizes or SIZE_NAMES)
        _print_compile_table(rows)
        failed = any(r["error"] for r in rows)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.bench:
        _bench(max(args.runs, 10), sizes, args.device)
    if args.detectors:
        detector_speed(args.detectors.split(","), args.runs, args.batch_size, args.image_hw)
    return 1 if failed else 0


def _parse_args(argv):
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bench", action="store_true", help="time every backend vs grid_sample")
    parser.add_argument("--runs", type=int, default=10, help="timed runs per measurement (median, >= 10)")
    parser.add_argument("--sizes", default="", help="comma-separated subset of the bench sizes "
                        "(decoder, encoder-128px, encoder-512px, decoder-B4Q300 on GPU); default all")
    parser.add_argument("--device", default="all", choices=["all", "cpu", "cuda"], help="--bench devices")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (torch.set_num_threads); "
                        "0 keeps torch's default. On a machine busy with other work use 1: waiting for a "
                        "descheduled worker thread at every parallel op can cost more than the op")
    parser.add_argument("--compile-check", action="store_true",
                        help="compile both Triton kernels ahead of time (no GPU needed) for every target, dtype "
                             "and bench size; prints a table, exit code 1 if any build fails")
    parser.add_argument("--archs", default="80,90", help="--compile-check targets (compute capabilities)")
    parser.add_argument("--dtypes", default="fp32,fp16,bf16", help="--compile-check dtypes")
    parser.add_argument("--detectors", default="", help="comma-separated detector names: training step img/s "
                        "(forward, backward, SGD step; medians of --runs) and parameter counts, each against the first")
    parser.add_argument("--batch-size", type=int, default=8, help="--detectors: images per step")
    parser.add_argument("--image-hw", type=int, nargs=2, default=[128, 192], help="--detectors: image size H W "
                        "(default: the embedded data's)")
    args = parser.parse_args(argv)
    if not (args.bench or args.compile_check or args.detectors):
        parser.error("nothing to do: pass --bench, --compile-check and/or --detectors")
    return args


# ----------------------------------------------------------------------------------------------
# Benchmark: every backend against the grid_sample formulation, in the same run
# ----------------------------------------------------------------------------------------------

def _bench_sizes(device):
    """name -> (B, Q or None for Q = S, H, C, P, level shapes); levels at strides 8..64."""
    def levels(px):
        return [(math.ceil(px / s), math.ceil(px / s)) for s in (8, 16, 32, 64)]
    sizes = {
        "decoder": (2, 200, 8, 32, 4, [(100, 167), (50, 84), (25, 42), (13, 21)]),
        "encoder-128px": (8, None, 8, 32, 4, levels(128)),
        "encoder-512px": (2, None, 8, 32, 4, levels(512)),
    }
    if device.type == "cuda":   # the size published Triton MSDA kernels report (B=4, Q=300)
        sizes["decoder-B4Q300"] = (4, 300, 8, 32, 4, [(100, 167), (50, 84), (25, 42), (13, 21)])
    return sizes


def _bench_inputs(size, device, dtype, seed=0):
    """[value, spatial_shapes, level_start_index, sampling_locations, attention_weights] of a bench size;
    a few locations fall just outside the maps."""
    B, Q, H, C, P, shapes = size
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    S = int(spatial_shapes.prod(1).sum())
    Q = S if Q is None else Q
    L = len(shapes)
    level_start_index = torch.cat([spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]])
    value = torch.randn(B, S, H, C, generator=gen)
    loc = torch.rand(B, Q, H, L, P, 2, generator=gen) * 1.1 - 0.05
    attn = torch.rand(B, Q, H, L, P, generator=gen).softmax(-1)
    return ([t.to(device, dtype) for t in (value,)] + [spatial_shapes.to(device), level_start_index.to(device)]
            + [t.to(device, dtype) for t in (loc, attn)])


def _median_ms(fn, device, runs, warmup=2):
    """Median wall time of fn() in ms over `runs` calls after `warmup` calls (GPU work included)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _bench_one(impl, inputs, device, runs):
    """(fwd ms, fwd+bwd ms, peak MiB or None) of impl(value, shapes, starts, loc, attn)."""
    value, shapes, starts, loc, attn = inputs
    leaves = [t.detach().clone().requires_grad_(True) for t in (value, loc, attn)]
    grad = None

    def fwd():
        with torch.no_grad():
            impl(value, shapes, starts, loc, attn)

    def fwd_bwd():
        nonlocal grad
        out = impl(leaves[0], shapes, starts, leaves[1], leaves[2])
        grad = torch.ones_like(out) if grad is None else grad
        torch.autograd.grad(out, leaves, grad)

    t_fwd = _median_ms(fwd, device, runs)
    peak = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fwd_bwd()
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    t_fb = _median_ms(fwd_bwd, device, runs)
    return t_fwd, t_fb, peak


def _bench_impls(device):
    """name -> impl; grid_sample first: it is the baseline every ratio divides; then the peer where it is installed:
    `torch-ms-deform-attn`, a standalone C++/OpenMP and CUDA build of Deformable DETR's op (for measuring only,
    never a dependency: pip install --no-build-isolation torch-ms-deform-attn)."""
    impls = {"grid_sample": msda.ms_deform_attn_grid_sample}
    try:
        import torch_ms_deform_attn
        impls["peer"] = torch_ms_deform_attn.ms_deform_attn
    except ImportError:
        pass
    impls["torch"] = lambda *a: msda.ms_deform_attn(*a, backend="torch")
    if device.type == "cuda" and msda.triton is not None:
        impls["triton"] = lambda *a: msda.ms_deform_attn(*a, backend="triton")
    return impls


def _print_bench_header(runs):
    print(f"torch {torch.__version__}, triton {getattr(msda.triton, '__version__', 'absent')}, "
          f"CPU threads {torch.get_num_threads()}"
          + (f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
    print("median ms over", runs, "runs after warm-up; x = grid_sample time / this time, x peer = the peer's time / "
          "this time (same run)")
    header = (f"{'device':6} {'dtype':8} {'size':16} {'impl':11} {'fwd ms':>9} {'x':>6} {'x peer':>6} "
              f"{'fwd+bwd ms':>11} {'x':>6} {'x peer':>6}")
    print(header + ("  peak MiB" if torch.cuda.is_available() else ""))


def _bench(runs, only=None, device="all"):
    """Prints one line per (device, dtype, size, backend): fwd and fwd+bwd medians and their ratios."""
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    devices = [d for d in devices if device in ("all", d.type)]
    _print_bench_header(runs)
    for device in devices:
        dtypes = [torch.float32] if device.type == "cpu" else [torch.float32, torch.bfloat16]
        for dtype in dtypes:
            for name, size in _bench_sizes(device).items():
                if only and name not in only:
                    continue
                inputs = _bench_inputs(size, device, dtype)
                base = peer = None
                for impl_name, impl in _bench_impls(device).items():
                    try:
                        f, fb, peak = _bench_one(impl, inputs, device, runs)
                    except RuntimeError as e:  # the peer's build may lack a dtype or device
                        print(f"{device.type:6} {str(dtype)[6:]:8} {name:16} {impl_name:11} failed: "
                              f"{str(e).splitlines()[0][:80]}", flush=True)
                        continue
                    base = base or (f, fb)
                    peer = (f, fb) if impl_name == "peer" else peer
                    vs_peer = [f"{p / t:6.2f}" if peer else f"{'':6}" for p, t in zip(peer or (0, 0), (f, fb))]
                    line = (f"{device.type:6} {str(dtype)[6:]:8} {name:16} {impl_name:11} {f:9.2f} "
                            f"{base[0] / f:6.2f} {vs_peer[0]} {fb:11.2f} {base[1] / fb:6.2f} {vs_peer[1]}")
                    print(line + (f"  {peak:8.1f}" if peak is not None else ""), flush=True)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile check: the kernels built for a GPU that is not there
# ----------------------------------------------------------------------------------------------

def compile_check(archs=(80, 90), dtypes=(torch.float32, torch.float16, torch.bfloat16), sizes=SIZE_NAMES):
    """Compiles the forward and backward kernels ahead of time (no GPU needed) for every target, dtype and
    bench size, at the configuration `msda.launch_config` picks there; identical compilations are done once.
    Returns rows of dicts (kernel, target, dtype, sizes, config, shared, regs, spill, ptx_lines, seconds,
    error); a failed compilation has its Triton message in "error"."""
    if msda.triton is None:
        raise RuntimeError("triton is not installed")
    if msda._TRITON_INTERPRETED:
        raise RuntimeError("unset TRITON_INTERPRET to compile the kernels ahead of time")
    msda.triton.knobs.compilation.always_compile = True      # time real builds, not cache hits
    rows = {}
    for arch in archs:
        for dtype in dtypes:
            for size in sizes:
                for kernel, cfg, args, meta in _aot_launches(_bench_sizes(torch.device("cpu"))[size], dtype, arch):
                    signature, constexprs, attrs = _aot_signature(kernel, args, meta)
                    key = (kernel.__name__, arch, dtype, repr(signature), repr(sorted(constexprs.items())),
                           cfg.num_warps, cfg.num_stages)
                    if key in rows:
                        rows[key]["sizes"].append(size)
                    else:
                        rows[key] = _compile_row(kernel, cfg, signature, constexprs, attrs, arch, dtype, size)
    return list(rows.values())


def _compile_row(kernel, cfg, signature, constexprs, attrs, arch, dtype, size):
    """The compile_check row of one build of `kernel` for compute capability `arch`."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    row = dict(kernel=kernel.__name__, target=f"sm_{arch}", dtype=_DTYPE_NAMES[dtype],
               sizes=[size], config=f"Q{cfg.block_q} C{cfg.block_c} w{cfg.num_warps} s{cfg.num_stages}",
               grid=cfg.grid, error=None)
    row.update(_compile_isolated(lambda: msda.triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", arch, 32),
        options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))))
    return row


def _aot_launches(size, dtype, arch):
    """[(kernel, LaunchConfig, positional args, meta)] of the forward and backward launch for a bench
    size, as the launcher builds them on a GPU of compute capability `arch` -- on meta tensors."""
    value, shapes, starts, loc, attn = [t.to("meta") for t in _bench_inputs(size, torch.device("cpu"),
                                                                             torch.float32)]
    value, loc, attn = value.to(dtype), loc.to(dtype), attn.to(dtype)
    B, S, H, C = value.shape
    Q, L, P = loc.shape[1], loc.shape[3], loc.shape[4]
    acc = dict(dtype=msda._compute_dtype(value), device="meta")
    target = (arch, msda.AOT_TARGET_SMS.get(arch, msda.AOT_TARGET_SMS[90]))
    launches = []
    for kernel, build, args in (
            (msda._msda_fwd_kernel, msda._fwd_launch, (value.new_empty(B, Q, H, C),)),
            (msda._msda_bwd_kernel, msda._bwd_launch, (value.new_empty(B, Q, H, C), torch.empty(B, S, H, C, **acc),
                                                       torch.empty(B, Q, H, L, P, 2, **acc),
                                                       torch.empty(B, Q, H, L, P, **acc)))):
        cfg, call_args, meta = build(value, shapes, starts, loc, attn, *args, target=target)
        launches.append((kernel, cfg, call_args, meta))
    return launches


def _aot_signature(kernel, args, meta):
    """(signature, constexprs, attrs) of `triton.compile`, specialised as the JIT does for these args:
    pointers and integers divisible by 16 get the divisibility hint, an integer equal to 1 becomes a constant."""
    signature, constexprs, attrs = {}, {k: v for k, v in meta.items() if k not in ("num_warps", "num_stages")}, {}
    for i, (name, arg) in enumerate(zip(kernel.arg_names, args)):
        if isinstance(arg, torch.Tensor):
            signature[name] = "*" + _DTYPE_NAMES[arg.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]           # torch allocations are 16-byte aligned
        elif arg == 1:
            constexprs[name] = 1
        else:
            signature[name] = "i32" if abs(arg) < 2 ** 31 else "i64"
            if arg % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    for name in constexprs:
        signature[name] = "constexpr"
    return signature, constexprs, attrs


def _compile_isolated(build):
    """Runs build() -> CompiledKernel in a forked child, so that a compiler that aborts the process (LLVM
    does, on an instruction the target lacks) fails one table row, not the check. Returns {shared, regs,
    spill, ptx_lines, seconds} or {error, seconds}."""
    read_fd, write_fd = os.pipe()
    with tempfile.TemporaryFile() as log:
        t0 = time.perf_counter()
        with warnings.catch_warnings():  # the child runs no torch ops: it compiles, reports and exits
            warnings.filterwarnings("ignore", message=".*multi-threaded.*fork", category=DeprecationWarning)
            pid = os.fork()
        if pid == 0:
            _compile_in_child(build, read_fd, write_fd, log)
        os.close(write_fd)
        with os.fdopen(read_fd) as pipe:
            payload = pipe.read()
        _, status = os.waitpid(pid, 0)
        seconds = time.perf_counter() - t0
        if payload:
            return dict(json.loads(payload), seconds=seconds)
        log.seek(0)
        text = log.read().decode(errors="replace")
        return dict(error=f"compiler died ({os.waitstatus_to_exitcode(status)}): {_first_error_line(text)}",
                    seconds=seconds)


def _compile_in_child(build, read_fd, write_fd, log):
    """The forked child of _compile_isolated: compiles, writes its report as JSON to write_fd, exits."""
    os.close(read_fd)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    try:
        compiled = build()
        res = _cubin_resources(compiled.asm["cubin"])
        out = dict(shared=compiled.metadata.shared, regs=res.get("REG"),
                   spill=(res["STACK"] + res["LOCAL"]) if "LOCAL" in res else None,
                   ptx_lines=compiled.asm["ptx"].count("\n"))
    except BaseException as e:  # noqa: B036 - reported as the row's error
        out = dict(error=f"{type(e).__name__}: {_first_error_line(str(e))}")
    os.write(write_fd, json.dumps(out).encode())
    os._exit(0)


def _cubin_resources(cubin):
    """{"REG": .., "STACK": .., "LOCAL": ..} from `cuobjdump -res-usage` (shipped with triton's NVIDIA
    backend); {} where it is missing. LOCAL/STACK > 0 means registers spilled to local memory."""
    tool = os.path.join(os.path.dirname(msda.triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    tool = tool if os.path.exists(tool) else shutil.which("cuobjdump")
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", out)}


def _first_error_line(text):
    """The line of a compiler's output that says what went wrong (ptxas/LLVM put it among pages of IR)."""
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    for pattern in (r"fatal|LLVM ERROR|out of resources", r"error"):
        hits = [l for l in lines if re.search(pattern, l, re.IGNORECASE) and "reproducer" not in l]
        if hits:
            return hits[0]
    return lines[-1] if lines else "no message"


def _print_compile_table(rows):
    """One line per build: kernel, target, dtype, config, then its figures or `FAILED (sizes): message`."""
    na = lambda v: "n/a" if v is None else v
    targets = ", ".join(f"sm_{a}: {n}" for a, n in msda.AOT_TARGET_SMS.items())
    print(f"triton {msda.triton.__version__}; configs from launch_config at the SM count of each target "
          f"({targets}); regs/spill from cuobjdump -res-usage")
    print(f"{'kernel':17} {'target':6} {'dtype':5} {'config':17} {'smem B':>6} {'regs':>4} {'spill B':>7} "
          f"{'PTX lines':>9} {'s':>5}  sizes")
    for r in rows:
        head = f"{r['kernel']:17} {r['target']:6} {r['dtype']:5} {r['config']:17}"
        if r["error"]:
            print(f"{head} FAILED ({', '.join(r['sizes'])}): {r['error']}", flush=True)
        else:
            print(f"{head} {r['shared']:>6} {na(r['regs']):>4} {na(r['spill']):>7} {r['ptx_lines']:>9} "
                  f"{r['seconds']:5.1f}  {', '.join(r['sizes'])}", flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# training step speed of whole detectors (--detectors) and the distillation step's cost (train.py --kd-cost STEPS)

def detector_speed(names, runs, batch_size, image_hw, num_classes=9):
    """Prints, per detector: parameters (M) and the median training step on CPU (random images of image_hw with two
    boxes each, at the image size as min/max size), as img/s and as a ratio to the first detector's."""
    g = torch.Generator().manual_seed(0)
    h, w = image_hw
    images = [torch.rand(3, h, w, generator=g) for _ in range(batch_size)]
    targets = [{"boxes": torch.tensor([[0.1 * w, 0.1 * h, 0.4 * w, 0.5 * h], [0.5 * w, 0.3 * h, 0.9 * w, 0.9 * h]]),
                "labels": torch.tensor([1, 2]), "masks": torch.zeros(2, h, w, dtype=torch.uint8)} for _ in images]
    for t in targets:
        for mask, (x1, y1, x2, y2) in zip(t["masks"], t["boxes"].int().tolist()):
            mask[y1:y2, x1:x2] = 1
    print(f"training step, batch {batch_size} of {h}x{w}, {torch.get_num_threads()} threads, median of {runs}")
    print(f"| detector | parameters (M) | ms / step | img/s | x first |\n| --- | ---: | ---: | ---: | ---: |")
    first = None
    for name in names:
        torch.manual_seed(0)
        model = detectors.build_detector(name, num_classes, min_size=min(h, w), max_size=max(h, w)).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

        def step():
            optimizer.zero_grad(set_to_none=True)
            sum(model(images, targets).values()).backward()
            optimizer.step()
        ms = _median_ms(step, torch.device("cpu"), runs)
        first = first or ms
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"| {name} | {params:.1f} | {ms:.0f} | {batch_size * 1e3 / ms:.2f} | {first / ms:.2f} |", flush=True)


def kd_cost(args, device, kd_loss_fn, teacher, distiller, optimizer, train_loader, step_context, to_device,
            offline=False):
    """Median step times, alternating on the same batches after 2 warm-up steps each: online distillation vs the
    same step without KD (teacher forward + student train step); with offline, also the offline step (stored
    knowledge, no teacher) and the teacher forward alone, to project offline/online for a costlier teacher; for
    UniKD, then the parts of its overhead timed one by one on the same batches (unikd_parts)."""
    student = distiller.student
    if teacher is None:
        raise UserError("--kd-cost times the KD overhead; it needs --method unikd or fitnet")

    def teacher_forward(images, targets):
        with torch.no_grad():
            detectors.forward_features(teacher, images, targets)
        return {}

    def plain_loss_fn(images, targets):
        teacher_forward(images, targets)
        return student(images, targets)

    def step_seconds(loss_fn, images, targets):
        t0 = time.perf_counter()
        with step_context():
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
    if args.method == "unikd":
        batches = [to_device(*b, device) for b in itertools.islice(itertools.cycle(train_loader), args.kd_cost + 2)]
        parts = unikd_parts(distiller, teacher, batches, step_context, device)
        ms = {k: f"{v * 1e3:.0f}" for k, v in parts.items()}
        log(args, f"UniKD's overhead by part (median over the same batches): teacher side {ms['teacher_side_s']} ms, "
                  f"phi forward + backward {ms['phi_s']} ms, student side forward + backward {ms['student_side_s']} "
                  f"ms; sum {sum(parts.values()) * 1e3:.0f} ms against online - plain "
                  f"{(t['online'] - t['plain']) * 1e3:.0f} ms")
        result.update(parts)
        result.update(overhead_floor(args, distiller, teacher, batches[0], parts, step_context, device))
    return result


UNIKD_PARTS = ("teacher_side", "phi", "student_side")   # the parts of its online overhead, in order


def overhead_floor(args, distiller, teacher, batch, parts, step_context, device):
    """Logs the dense products of each part of UniKD's overhead (GFLOP, and the rate its measured time implies) and
    the floor they set: their time at the rate of one matrix product of the decoders' FFN shape ([B*N, C] x [C, 4C])
    measured now in the same precision -> {part_gflop, matmul_gflop_per_s, floor_s}."""
    flops = unikd_part_flops(distiller, teacher, batch, step_context)
    ake = distiller.unikd.ake_ct
    rate = matmul_flops_per_s(args.batch_size * distiller.unikd.num_queries, ake.d_model,
                              ake.extractor[0].ffn[0].out_features, device, step_context)
    floor_s = sum(flops.values()) / rate
    each = ", ".join(f"{part.replace('_', ' ')} {flops[part] / 1e9:.1f} GFLOP "
                     f"({flops[part] / parts[part + '_s'] / 1e9:.0f} GFLOP/s)" for part in UNIKD_PARTS)
    log(args, f"their dense products: {each}; a matrix product of the decoders' FFN shape runs at {rate / 1e9:.0f} "
              f"GFLOP/s here, so the products alone take {floor_s * 1e3:.0f} ms at best: the overhead's floor with "
              f"the method's sizes and this precision")
    return {**{f"{part}_gflop": flops[part] / 1e9 for part in UNIKD_PARTS}, "matmul_gflop_per_s": rate / 1e9,
            "floor_s": floor_s}


def unikd_parts(distiller, teacher, batches, step_context, device, warmup=2):
    """Median seconds of the three parts of UniKD's online overhead (unikd_part_results), each timed alone on each
    batch's features, the warm-up batches left out."""
    def timed(fn):
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0, out

    times = {f"{part}_s": [] for part in UNIKD_PARTS}
    for i, batch in enumerate(batches):
        took = unikd_part_results(distiller, teacher, batch, step_context, timed)
        if i >= warmup:
            for part, t in took.items():
                times[f"{part}_s"].append(t)
    return {k: statistics.median(v) for k, v in times.items()}


def unikd_part_flops(distiller, teacher, batch, step_context):
    """{part: FLOPs} of the parts' dense products (matrix products, convolutions, attention among the queries) on one
    batch, as torch.utils.flop_counter counts them: what no rearrangement of the same computation can do without.
    MSDA's sampling (a gather of 4 L P taps per query and head) is not a dense product and is not counted."""
    def counted(fn):
        with flop_counter.FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
            out = fn()
        return counter.get_total_flops(), out
    return unikd_part_results(distiller, teacher, batch, step_context, counted)


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_flop_count(query, key, value)


def _cpu_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


# the CPU kernels of scaled_dot_product_attention, which flop_counter does not count (its GPU ones it does)
CPU_ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
                       torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
                           _cpu_attention_backward_flops}


def unikd_part_results(distiller, teacher, batch, step_context, measure):
    """The three parts of UniKD's online overhead run in order on one (images, targets) batch, each through
    measure(fn) -> (result, fn's output): the teacher side (both AKEs' queries and z^T from F^T, no gradient),
    phi(F^S) forward + backward, and the student side (the frozen extractors on phi(F^S) and Eq. 8, forward + backward
    into phi(F^S)). Each part's output is the next one's input, so nothing is computed twice -> {part: result}."""
    images, targets = batch
    with torch.no_grad(), step_context():
        teacher_feats = detectors.forward_features(teacher, images, targets).features
        out = detectors.forward_with_features(distiller.student, images, targets)
    student_feats = [f.detach().requires_grad_() for f in out.features]
    targets = detectors.normalized_targets(out)

    def teacher_side():
        with torch.no_grad(), step_context():
            return distiller.unikd.teacher_knowledge(teacher_feats, targets)

    def phi():
        with step_context():
            adapted = distiller.adapter(student_feats)
        sum(f.float().sum() for f in adapted).backward()
        return [f.detach().requires_grad_() for f in adapted]

    results = {}
    results["teacher_side"], knowledge = measure(teacher_side)
    results["phi"], adapted = measure(phi)

    def student_side():
        with step_context():
            sum(distiller.unikd.student_loss(knowledge, adapted).values()).backward()

    results["student_side"], _ = measure(student_side)
    distiller.zero_grad(set_to_none=True)
    return results


def matmul_flops_per_s(rows, inner, cols, device, step_context, runs=10):
    """FLOP/s of one [rows, inner] x [inner, cols] matrix product in step_context (its precision), the median of runs:
    the rate the dense products of a KD step could reach at best on this device."""
    a = torch.randn(rows, inner, device=device)
    b = torch.randn(inner, cols, device=device)

    def product():
        with step_context():
            a @ b
    return 2 * rows * inner * cols / (_median_ms(product, device, runs) / 1e3)


if __name__ == "__main__":
    raise SystemExit(main())
