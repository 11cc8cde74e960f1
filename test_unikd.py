"""The tests of the UniKD reference implementation (CPU; run: python -m pytest -q -x test_unikd.py).

Every numeric test checks against an independent computation (a per-sample loop, brute force, a closed form,
COCOeval of the ground truth, pixels of the drawn shapes), never against the code path under test.
The Triton kernels run on CPU tensors under TRITON_INTERPRET=1, set here before triton is imported.
"""
import os  # noqa: I001

os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse
import ast
import contextlib
import copy
import hashlib
import io
import inspect
import itertools
import json
import math
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
import types
import zlib

import pytest
import torch
import numpy as np
import torchvision
from PIL import Image
from pycocotools import mask as mask_utils
import torch.nn.functional as F
from torchvision.ops import box_convert, box_iou, generalized_box_iou, sigmoid_focal_loss

import atss
import bench
import reppoints
import deform_attn_triton as msda
import deformable_detr
from deform_attn_triton import MSDeformAttn, flatten_levels, ms_deform_attn
import detectors
import data
import eval as ev
import grid
import shapes as shapes_gen
import store as knowledge_store
import utils
import unikd

torch.set_num_threads(1)  # robust on a shared 2-core box (OpenMP threads stall when the other core is busy)
torch.set_flush_denormal(True)  # untrained models in eval mode produce denormals: ~3x slower convs on CPU


# ====================================================================================================================
# multi-scale deformable attention (deform_attn_triton.py)
# ====================================================================================================================

HERE = os.path.dirname(os.path.abspath(__file__))
BACKENDS = ["torch"] + (["triton"] if msda.triton is not None else [])


# ----------------------------------------------------------------------------------------------
# Independent oracle and input builders
# ----------------------------------------------------------------------------------------------

def oracle(value, spatial_shapes, level_start_index, loc, attn):
    """MSDA as an explicit loop over samples and their 4 neighbours, in float64, straight from the
    definition: weight of pixel (i, j) = (1 - |x - j|)(1 - |y - i|), pixel centres at (k + 0.5)/W."""
    value, loc, attn = value.double(), loc.double(), attn.double()
    B, S, H, C = value.shape
    Q, L, P = loc.shape[1], loc.shape[3], loc.shape[4]
    out = torch.zeros(B, Q, H, C, dtype=torch.float64)
    for b in range(B):
        for q in range(Q):
            for h in range(H):
                for l in range(L):
                    h_l, w_l = (int(v) for v in spatial_shapes[l])
                    start = int(level_start_index[l])
                    for p in range(P):
                        x = float(loc[b, q, h, l, p, 0]) * w_l - 0.5
                        y = float(loc[b, q, h, l, p, 1]) * h_l - 0.5
                        for i in (math.floor(y), math.floor(y) + 1):
                            for j in (math.floor(x), math.floor(x) + 1):
                                if 0 <= i < h_l and 0 <= j < w_l:
                                    weight = (1 - abs(x - j)) * (1 - abs(y - i)) * float(attn[b, q, h, l, p])
                                    out[b, q, h] += weight * value[b, start + i * w_l + j, h]
    return out.view(B, Q, H * C)


def level_index(shapes):
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    sizes = spatial_shapes.prod(1)
    return spatial_shapes, torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])


def random_case(B, Q, H, C, shapes, P, seed, lo=-0.25, hi=1.25, dtype=torch.float32):
    """Random inputs; locations in [lo, hi] so some samples are partly or fully outside the map."""
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes, level_start_index = level_index(shapes)
    S, L = int(spatial_shapes.prod(1).sum()), len(shapes)
    value = torch.randn(B, S, H, C, generator=gen, dtype=dtype)
    loc = lo + (hi - lo) * torch.rand(B, Q, H, L, P, 2, generator=gen, dtype=dtype)
    attn = torch.rand(B, Q, H, L, P, generator=gen, dtype=dtype)
    return value, spatial_shapes, level_start_index, loc, attn


def exact_points_case():
    """Samples exactly on pixel centres, on the map's edges (loc 0 and 1), at pixel coordinate -1
    and W (the corners inside get weight exactly 0), and outside. Level sizes are powers of two, so
    every such location is exact in binary."""
    shapes = [(4, 8), (1, 1), (2, 4)]
    spatial_shapes, level_start_index = level_index(shapes)
    gen = torch.Generator().manual_seed(3)
    S = int(spatial_shapes.prod(1).sum())
    B, Q, H, C, L, P = 1, 6, 2, 5, 3, 4
    value = torch.randn(B, S, H, C, generator=gen)
    size = spatial_shapes.flip(-1).float().view(1, 1, 1, L, 1, 2).expand(B, Q, H, L, P, 2)   # (W, H)
    centre = torch.floor(torch.rand(size.shape, generator=gen) * size)         # a pixel index
    # candidate pixel coordinates x = loc * W - 0.5
    candidates = torch.stack([centre, torch.full_like(size, -0.5), size - 0.5, torch.full_like(size, -1.0),
                              size, torch.full_like(size, -1.5), size + 2], dim=-1)
    choice = torch.randint(0, candidates.shape[-1], size.shape, generator=gen)
    choice[:, 0] = 0                                                             # query 0: all on centres
    x = candidates.gather(-1, choice.unsqueeze(-1)).squeeze(-1)
    loc = (x + 0.5) / size
    attn = torch.rand(B, Q, H, L, P, generator=gen)
    return value, spatial_shapes, level_start_index, loc, attn


CASES = {
    # name: builder -> (value, spatial_shapes, level_start_index, loc, attn)
    "mixed_with_1x1_level": lambda: random_case(2, 5, 2, 8, [(4, 6), (2, 3), (1, 1)], 2, seed=0),
    "C30": lambda: random_case(1, 3, 2, 30, [(3, 5), (2, 2)], 2, seed=1),
    "C71_H1_P1_L1": lambda: random_case(1, 4, 1, 71, [(3, 4)], 1, seed=2),
    "Q70_two_query_blocks": lambda: random_case(1, 70, 1, 4, [(5, 3)], 1, seed=10),
    "pixel_centres_edges_outside": exact_points_case,
}


# ----------------------------------------------------------------------------------------------
# Forward and backward against independent computations
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_matches_oracle(backend, case):
    value, spatial_shapes, level_start_index, loc, attn = CASES[case]()
    out = ms_deform_attn(value, spatial_shapes, level_start_index, loc, attn, backend=backend)
    expected = oracle(value, spatial_shapes, level_start_index, loc, attn)
    assert out.dtype == torch.float32 and out.shape == expected.shape
    # fp32 sums of <= 4*L*P products of O(1) numbers: rounding stays far below 2e-5
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=2e-5)


def test_grid_sample_baseline_matches_oracle():
    case = CASES["mixed_with_1x1_level"]()
    torch.testing.assert_close(msda.ms_deform_attn_grid_sample(*case).double(), oracle(*case),
                               rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_gradients_match_grid_sample_autograd(backend):
    """The fp32 kernels' gradients against autograd through the grid_sample formulation; Q = 70
    spans two Triton query blocks."""
    value, spatial_shapes, level_start_index, loc, attn = random_case(2, 70, 2, 7, [(4, 6), (2, 3)], 3, seed=4)
    grad_out = torch.randn(2, 70, 2 * 7, generator=torch.Generator().manual_seed(5))
    grads = {}
    for name, fn in (("ref", msda.ms_deform_attn_grid_sample),
                     ("ours", lambda *a: ms_deform_attn(*a, backend=backend))):
        leaves = [t.clone().requires_grad_(True) for t in (value, loc, attn)]
        out = fn(leaves[0], spatial_shapes, level_start_index, leaves[1], leaves[2])
        grads[name] = torch.autograd.grad(out, leaves, grad_out)
    for ours, ref in zip(grads["ours"], grads["ref"]):
        # location gradients carry a factor W_l or H_l (<= 6 here): scale atol accordingly
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def gradcheck_case():
    """Float64 inputs whose pixel coordinates keep >= 0.2 px from integer knots (where the location
    gradient is one-sided); the lower corners sweep every case of 0, 1 or 2 neighbours inside per axis."""
    shapes = [(3, 4), (2, 2)]
    spatial_shapes, level_start_index = level_index(shapes)
    gen = torch.Generator().manual_seed(7)
    B, Q, H, C, L, P = 1, 4, 2, 3, 2, 2
    S = int(spatial_shapes.prod(1).sum())
    value = torch.randn(B, S, H, C, generator=gen, dtype=torch.float64)
    wh = spatial_shapes.flip(-1).double().view(1, 1, 1, L, 1, 2).expand(B, Q, H, L, P, 2)
    knot = (torch.rand(B, Q, H, L, P, 2, generator=gen, dtype=torch.float64) * (wh + 3)).floor() - 2
    # on level 0 (W=4, H=3): sweep x0 = -2..W with y0 inside, then y0 = -2..H with x0 inside
    corners = [(x0, 1) for x0 in range(-2, 5)] + [(1, y0) for y0 in range(-2, 4)]
    level0 = knot[:, :, :, 0].permute(3, 0, 1, 2, 4).reshape(-1, 2)             # [P*B*Q*H, 2] copy
    level0[: len(corners)] = torch.tensor(corners, dtype=torch.float64)
    knot[:, :, :, 0] = level0.view(P, B, Q, H, 2).permute(1, 2, 3, 0, 4)
    frac = 0.2 + 0.6 * torch.rand(B, Q, H, L, P, 2, generator=gen, dtype=torch.float64)
    loc = (knot + frac + 0.5) / wh
    attn = torch.rand(B, Q, H, L, P, generator=gen, dtype=torch.float64)
    return value, spatial_shapes, level_start_index, loc, attn


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    value, spatial_shapes, level_start_index, loc, attn = gradcheck_case()

    def fn(v, l, a):
        return ms_deform_attn(v, spatial_shapes, level_start_index, l, a, backend=backend)

    inputs = tuple(t.clone().requires_grad_(True) for t in (value, loc, attn))
    # the interpreter makes each Triton call slow: check random directional derivatives there
    # (any wrong Jacobian entry shows up in them) and the full Jacobian for the PyTorch path
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=backend == "triton")


@pytest.mark.parametrize("taps_per_row", [0, 10 ** 9], ids=["transposed", "row_major"])
def test_both_value_gradient_scatters_pass_gradcheck_and_match_grid_sample(monkeypatch, taps_per_row):
    """The PyTorch path scatters the value gradient into a transposed table where taps far outnumber the table's rows
    (_CPU_TAPS_PER_ROW_TRANSPOSED) and row-major otherwise: each layout forced, fp64 gradcheck and the fp32 gradients
    of autograd through grid_sample."""
    monkeypatch.setattr(msda, "_CPU_TAPS_PER_ROW_TRANSPOSED", taps_per_row)
    value, spatial_shapes, level_start_index, loc, attn = gradcheck_case()
    inputs = tuple(t.clone().requires_grad_(True) for t in (value, loc, attn))
    assert torch.autograd.gradcheck(lambda v, l, a: ms_deform_attn(v, spatial_shapes, level_start_index, l, a,
                                                                   backend="torch"),
                                    inputs, eps=1e-6, atol=1e-6, rtol=1e-5)
    value, spatial_shapes, level_start_index, loc, attn = random_case(2, 70, 2, 7, [(4, 6), (2, 3)], 3, seed=4)
    grad_out = torch.randn(2, 70, 2 * 7, generator=torch.Generator().manual_seed(5))
    grads = []
    for fn in (msda.ms_deform_attn_grid_sample, lambda *a: ms_deform_attn(*a, backend="torch")):
        leaves = [t.clone().requires_grad_(True) for t in (value, loc, attn)]
        grads.append(torch.autograd.grad(fn(leaves[0], spatial_shapes, level_start_index, leaves[1], leaves[2]),
                                         leaves, grad_out))
    for ref, ours in zip(*grads):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Precision, empty inputs, strided inputs
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_forward(backend, dtype):
    """(a) value in fp16/bf16, locations and weights fp32 (the AMP case): the only errors are the
    rounding of value (<= eps/2 relative, and the attention weights of a head sum to 1) and of the
    output (<= eps relative). (b) every input in fp16/bf16 vs fp32 maths on the same rounded inputs:
    accumulation is fp32, so only the output rounding (<= 1 ulp <= eps relative) remains."""
    value, spatial_shapes, level_start_index, loc, attn = random_case(1, 6, 2, 16, [(5, 7), (3, 4)], 2, seed=8)
    attn = attn.view(1, 6, 2, -1).softmax(-1).view(attn.shape)
    eps = torch.finfo(dtype).eps
    ref = ms_deform_attn(value, spatial_shapes, level_start_index, loc, attn, backend=backend)
    out = ms_deform_attn(value.to(dtype), spatial_shapes, level_start_index, loc, attn, backend=backend)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=eps, atol=eps / 2 * value.abs().max().item())

    low = [t.to(dtype) for t in (value, loc, attn)]
    out = ms_deform_attn(low[0], spatial_shapes, level_start_index, low[1], low[2], backend=backend)
    ref = ms_deform_attn(low[0].float(), spatial_shapes, level_start_index, low[1].float(), low[2].float(),
                         backend=backend)
    torch.testing.assert_close(out.float(), ref, rtol=eps, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,Q", [(0, 3), (2, 0)])
def test_empty_batch_or_queries(backend, B, Q):
    value, spatial_shapes, level_start_index, loc, attn = random_case(max(B, 1), max(Q, 1), 2, 4, [(2, 3)], 2, 0)
    value, loc, attn = value[:B], loc[:B, :Q], attn[:B, :Q]
    leaves = [t.clone().requires_grad_(True) for t in (value, loc, attn)]
    out = ms_deform_attn(leaves[0], spatial_shapes, level_start_index, leaves[1], leaves[2], backend=backend)
    assert out.shape == (B, Q, 2 * 4)
    out.sum().backward()
    for leaf in leaves:
        assert leaf.grad.shape == leaf.shape and not leaf.grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs_match_contiguous(backend):
    value, spatial_shapes, level_start_index, loc, attn = random_case(2, 4, 2, 6, [(3, 4), (2, 2)], 2, seed=9)
    # same values, other memory layouts: value stored [B, H, S, C], loc stored (x, y)-major, attn sliced
    value_s = value.transpose(1, 2).contiguous().transpose(1, 2)
    loc_s = loc.movedim(-1, 0).contiguous().movedim(0, -1)
    attn_s = torch.cat([attn, attn], dim=-1)[..., : attn.shape[-1]]
    assert not (value_s.is_contiguous() or loc_s.is_contiguous() or attn_s.is_contiguous())
    grad_out = torch.randn(2, 4, 12).transpose(0, 1).contiguous().transpose(0, 1)
    results = []
    for v, l, a in ((value, loc, attn), (value_s, loc_s, attn_s)):
        leaves = [t.detach().requires_grad_(True) for t in (v, l, a)]
        out = ms_deform_attn(leaves[0], spatial_shapes, level_start_index, leaves[1], leaves[2], backend=backend)
        results.append((out, *torch.autograd.grad(out, leaves, grad_out)))
    for x, y in zip(*results):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


def test_torch_path_in_many_chunks_matches_oracle(monkeypatch):
    """Rows split over several chunks and scatter pieces (the bench sizes use them; small tests would
    otherwise run in one), forward and gradients vs the single-chunk path and the oracle."""
    case = random_case(2, 5, 3, 6, [(4, 6), (2, 3)], 2, seed=11)
    grad_out = torch.randn(2, 5, 3 * 6, generator=torch.Generator().manual_seed(12))
    results = []
    for rows, scatter in ((1 << 14, 512), (7, 3)):
        monkeypatch.setattr(msda, "_CPU_ROWS_PER_CHUNK", rows)
        monkeypatch.setattr(msda, "_CPU_ROWS_PER_SCATTER", scatter)
        leaves = [t.clone().requires_grad_(True) for t in (case[0], case[3], case[4])]
        out = ms_deform_attn(leaves[0], case[1], case[2], leaves[1], leaves[2], backend="torch")
        results.append((out, *torch.autograd.grad(out, leaves, grad_out)))
    torch.testing.assert_close(results[1][0].double(), oracle(*case), rtol=1e-5, atol=2e-5)
    for single, chunked in zip(*results):
        torch.testing.assert_close(chunked, single, rtol=1e-6, atol=1e-6)


def test_torch_backward_recomputing_its_taps_equals_the_one_reusing_the_forwards(monkeypatch):
    """On CPU the backward reuses the forward's taps; elsewhere (a GPU without Triton) it recomputes them."""
    monkeypatch.setattr(msda, "_CPU_ROWS_PER_CHUNK", 7)  # several chunks, so each chunk's own taps are used
    value, shapes, starts, loc, attn = random_case(2, 5, 3, 6, [(4, 6), (2, 3)], 2, seed=21)
    grad_out = torch.randn(2, 5, 3 * 6, generator=torch.Generator().manual_seed(22))
    leaves = [t.clone().requires_grad_(True) for t in (value, loc, attn)]
    out = ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2], backend="torch")
    reused = torch.autograd.grad(out, leaves, grad_out)
    recomputed = msda._torch_backward(value, shapes, starts, loc, attn, grad_out, (True, False, False, True, True))
    for a, b in zip(reused, recomputed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    leaves = [t.clone().requires_grad_(True) for t in (value, loc, attn)]   # and both against grid_sample's autograd
    out = msda.ms_deform_attn_grid_sample(leaves[0], shapes, starts, leaves[1], leaves[2])
    for a, b in zip(recomputed, torch.autograd.grad(out, leaves, grad_out)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_bench_prints_the_peer_beside_ours_when_it_is_installed(monkeypatch, capsys):
    pytest.importorskip("torch_ms_deform_attn")  # measuring only: pip install --no-build-isolation torch-ms-deform-attn
    monkeypatch.setattr(bench, "_bench_sizes", lambda device: {"tiny": (1, 4, 2, 4, 2, [(2, 3), (1, 2)])})
    bench._bench(2, device="cpu")
    rows = {line.split()[3]: line.split()[4:] for line in capsys.readouterr().out.splitlines()
            if line.startswith("cpu ")}
    assert set(rows) == {"grid_sample", "peer", "torch"} and len(rows["torch"]) == 6  # ms, x, x peer (fwd; fwd+bwd)


def test_bench_ratios_divide_the_baselines_and_the_peers_times_by_each_implementations(monkeypatch, capsys):
    """With a stand-in peer and fixed times per implementation: x = grid_sample's time / this one's, x peer = the
    peer's / this one's, for the forward and for forward + backward."""
    peer = types.SimpleNamespace(ms_deform_attn=lambda *a: None)
    monkeypatch.setitem(sys.modules, "torch_ms_deform_attn", peer)
    monkeypatch.setattr(bench, "_bench_sizes", lambda device: {"tiny": (1, 4, 2, 4, 2, [(2, 3), (1, 2)])})
    times = {msda.ms_deform_attn_grid_sample: (4.0, 8.0), peer.ms_deform_attn: (2.0, 4.0)}  # ms; ours: (1, 2)
    monkeypatch.setattr(bench, "_bench_one", lambda impl, inputs, device, runs: (*times.get(impl, (1.0, 2.0)), None))
    bench._bench(2, device="cpu")
    rows = {line.split()[3]: line.split()[4:] for line in capsys.readouterr().out.splitlines()
            if line.startswith("cpu ")}
    assert rows == {"grid_sample": ["4.00", "1.00", "8.00", "1.00"],  # no peer timed yet: no x peer
                    "peer": ["2.00", "2.00", "1.00", "4.00", "2.00", "1.00"],
                    "torch": ["1.00", "4.00", "2.00", "2.00", "4.00", "2.00"]}


def test_tap_gradient_variants_agree():
    """dL/dw by sampled_addmm (CPU) and by gather + bmm (other devices) vs an explicit dot product."""
    value, spatial_shapes, level_start_index, loc, attn = random_case(1, 3, 2, 5, [(3, 4)], 2, seed=13)
    B, S, H, C = value.shape
    geo = msda._LevelGeometry(spatial_shapes, level_start_index, B, S, H, 2, torch.float32)
    taps = msda._bilinear_taps(geo, loc.reshape(6, 2, 2), attn.reshape(6, 2), range(0, 6), 3 * H)
    table, grad_rows = value.reshape(-1, C), torch.randn(6, C)
    expected = (table[taps.idx] * grad_rows[:, None, :]).sum(-1)
    for sparse in (True, False):
        torch.testing.assert_close(msda._tap_grads(table, taps, grad_rows, sparse), expected)


def test_backend_auto_is_torch_on_cpu_and_unknown_backend_rejected(monkeypatch):
    case = CASES["C30"]()
    on_gpu = types.SimpleNamespace(is_cuda=True)
    assert msda._resolve_backend("auto", case[0]) == "torch" and msda._resolve_backend("auto", on_gpu) == "triton"
    monkeypatch.setattr(msda, "_triton_forward", lambda *a: pytest.fail("auto ran the Triton kernels on a CPU"))
    torch.testing.assert_close(ms_deform_attn(*case).double(), oracle(*case), rtol=1e-5, atol=2e-5)
    monkeypatch.setattr(msda, "triton", None)  # without triton, auto is torch on a GPU too
    assert msda._resolve_backend("auto", on_gpu) == "torch"
    with pytest.raises(ValueError, match="backend"):
        ms_deform_attn(*case, backend="cuda")


# ----------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------

# name: (argument, how to break it, what the error must say)
BAD_INPUTS = {
    "shapes_int32": ("spatial_shapes", lambda t: t.int(), r"spatial_shapes: expected an int64 tensor \[L, 2\]"),
    "shapes_1d": ("spatial_shapes", lambda t: t.view(-1), r"spatial_shapes: expected shape \[L, 2\]"),
    "S_mismatch": ("value", lambda t: t[:, :-1], r"value: expected S = sum_l H_l\*W_l = 16"),
    "value_3d": ("value", lambda t: t.flatten(2), r"value: expected shape \[B, S, H, C\]"),
    "value_int": ("value", lambda t: t.long(), r"value: expected a float16/bfloat16/float32/float64"),
    "starts_wrong": ("level_start_index", lambda t: t + 1, r"level_start_index: expected \[0, 12\]"),
    "starts_int32": ("level_start_index", lambda t: t.int(), r"level_start_index: expected an int64"),
    "locations_L": ("sampling_locations", lambda t: t[:, :, :, :1],
                    r"sampling_locations: expected shape \[B, Q, H, L, P, 2\]"),
    "locations_H": ("sampling_locations", lambda t: t[:, :, :1],
                    r"sampling_locations: expected shape .*= \[1, Q, 2, 2, P, 2\]"),
    "weights_P": ("attention_weights", lambda t: t[..., :1],
                  r"attention_weights: expected shape \[B, Q, H, L, P\] = \[1, 2, 2, 2, 2\]"),
    "weights_list": ("attention_weights", lambda t: t.tolist(), r"attention_weights: expected a torch.Tensor"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises_value_error_naming_argument(name):
    value, spatial_shapes, level_start_index, loc, attn = random_case(1, 2, 2, 4, [(3, 4), (2, 2)], 2, seed=0)
    args = dict(value=value, spatial_shapes=spatial_shapes, level_start_index=level_start_index,
                sampling_locations=loc, attention_weights=attn)
    key, corrupt, pattern = BAD_INPUTS[name]
    args[key] = corrupt(args[key])
    with pytest.raises(ValueError, match=pattern):
        ms_deform_attn(**args)


# ----------------------------------------------------------------------------------------------
# Module and helpers
# ----------------------------------------------------------------------------------------------

# head h of 8 points along angle 2*pi*h/8, scaled onto the unit square's border
DIRECTIONS_8 = torch.tensor([[1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1], [0, -1], [1, -1]], dtype=torch.float32)


def module_inputs(B=2, Q=3, D=32, shapes=((6, 8), (3, 4)), ref_dim=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    features = [torch.randn(B, D, h, w, generator=gen) for h, w in shapes]
    value_input, spatial_shapes, level_start_index = flatten_levels(features)
    query = torch.randn(B, Q, D, generator=gen)
    ref = torch.rand(B, Q, len(shapes), ref_dim, generator=gen) * 0.5 + 0.25
    return query, ref, value_input, spatial_shapes, level_start_index


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_msdeformattn_init_uniform_weights_and_direction_grid(ref_dim):
    L, H, P = 2, 8, 3
    module = MSDeformAttn(d_model=32, n_levels=L, n_heads=H, n_points=P)
    query, ref, value_input, spatial_shapes, level_start_index = module_inputs(ref_dim=ref_dim)
    out, locations, weights = module(query, ref, value_input, spatial_shapes, level_start_index,
                                     return_sampling=True)
    B, Q = query.shape[:2]
    assert out.shape == (B, Q, 32) and locations.shape == (B, Q, H, L, P, 2)
    torch.testing.assert_close(weights, torch.full((B, Q, H, L, P), 1.0 / (L * P)))
    # expected offset of point p of head h: direction_h * (p + 1), in pixels of each level (2-d
    # reference) or in units of half the box size / P (4-d reference box)
    offset = DIRECTIONS_8.view(H, 1, 1, 2) * torch.arange(1, P + 1.0).view(1, 1, P, 1)   # [H, 1, P, 2]
    if ref_dim == 2:
        wh = torch.tensor([[8.0, 6.0], [4.0, 3.0]]).view(1, L, 1, 2)
        expected = ref[:, :, None, :, None, :] + offset / wh
    else:
        expected = ref[:, :, None, :, None, :2] + offset / P * ref[:, :, None, :, None, 2:] * 0.5
    torch.testing.assert_close(locations, expected, rtol=1e-6, atol=1e-6)


def test_msdeformattn_scale_aware_offsets_keep_the_points_in_small_maps():
    """reset_offsets(level_sides): from a reference at the centre of each map, every initial sampling point lies inside
    it, the farthest at half the shorter side where that is under 2P pixels; levels of 2P pixels or more keep Deformable
    DETR's init. Deformable DETR's init leaves the smallest maps (the check that this test can fail)."""
    H, P = 8, 4
    shapes = [(16, 24), (8, 12), (4, 6), (2, 3)]                          # stride 8..64 of a 128 x 192 image
    module = MSDeformAttn(d_model=32, n_levels=4, n_heads=H, n_points=P)
    query = torch.randn(1, 1, 32)
    centre = torch.full((1, 1, 4, 2), 0.5)
    spatial_shapes = torch.tensor(shapes)
    detr_locations = module.sampling(query, centre, spatial_shapes)[0][0, 0]            # [H, L, P, 2]
    module.reset_offsets([h for h, w in shapes])
    locations = module.sampling(query, centre, spatial_shapes)[0][0, 0]
    wh = spatial_shapes.flip(-1).float().view(1, 4, 1, 2)
    assert ((locations >= 0) & (locations <= 1)).all()
    assert not ((detr_locations >= 0) & (detr_locations <= 1)).all()
    reach = ((locations - 0.5) * wh).abs().amax(dim=(0, 2, 3))                          # farthest, in pixels of a level
    torch.testing.assert_close(reach, torch.tensor([4.0, 4.0, 2.0, 1.0]))              # P, P, then half of 4 and 2
    torch.testing.assert_close(locations[:, :2], detr_locations[:, :2])
    with pytest.raises(ValueError, match="level_sides: expected 4 values"):
        module.reset_offsets([16, 8])


def test_msdeformattn_padding_mask_hides_padded_pixels():
    module = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=2)
    query, ref, value_input, spatial_shapes, level_start_index = module_inputs()
    mask = torch.zeros(value_input.shape[:2], dtype=torch.bool)
    mask[:, ::3] = True
    out = module(query, ref, value_input, spatial_shapes, level_start_index, padding_mask=mask)
    changed = value_input + 100.0 * mask.unsqueeze(-1)                     # only padded pixels differ
    out_changed = module(query, ref, changed, spatial_shapes, level_start_index, padding_mask=mask)
    torch.testing.assert_close(out, out_changed)
    assert not torch.allclose(out, module(query, ref, changed, spatial_shapes, level_start_index))


def test_msdeformattn_backends_agree_and_all_parameters_get_gradients():
    torch.manual_seed(0)
    module = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2)
    for p in module.parameters():                      # move off the init so every path matters
        p.data.add_(0.1 * torch.randn_like(p))
    query, ref, value_input, spatial_shapes, level_start_index = module_inputs(B=1, Q=2, D=16, ref_dim=4)
    with torch.no_grad():   # the module written out with the grid_sample formulation
        locations, weights = module.sampling(query, ref, spatial_shapes)
        value = module.value_proj(value_input).view(1, -1, 2, 8)
        want = module.output_proj(msda.ms_deform_attn_grid_sample(value, spatial_shapes, level_start_index,
                                                                  locations, weights))
    for backend in BACKENDS:
        module.backend = backend
        module.zero_grad()
        out = module(query, ref, value_input, spatial_shapes, level_start_index)
        out.square().sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(msda.triton is None, reason="triton not installed")
def test_unikd_both_stages_agree_across_msda_backends():
    """The whole module, which the kernel tests do not reach (queries generated from the teacher's levels, then the
    teacher's and the student's levels read with them): pretraining and distillation losses and gradients with every
    MSDA on the Triton kernels (interpreted here; CUDA where there is one) equal those of the PyTorch path."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(0)
    shapes = [(8, 12), (4, 6), (2, 3), (1, 2)]
    teacher = [torch.randn(2, 32, h, w, generator=g).to(device) for h, w in shapes]
    student = [torch.randn(2, 32, h, w, generator=g).to(device) for h, w in shapes]
    targets = [{k: v.to(device) for k, v in t.items()} for t in random_targets([3, 1], 5, g)]
    torch.manual_seed(0)
    model = unikd.UniKD(num_classes=5, d_model=32, n_heads=4, n_points=2, num_queries=12, dim_ffn=64).to(device)

    def run(backend, stage):
        for module in model.modules():
            if isinstance(module, MSDeformAttn):
                module.backend = backend
        model.zero_grad(set_to_none=True)
        s = [f.clone().requires_grad_(True) for f in student] if stage == "distill" else []
        if stage == "pretrain":
            losses = model.pretrain_loss(teacher, targets, generator=torch.Generator().manual_seed(1))
        else:
            losses = model.distill_loss(teacher, s, targets, generator=torch.Generator().manual_seed(2))
        sum(losses.values()).backward()
        return losses, [p.grad for p in model.parameters() if p.grad is not None] + [f.grad for f in s]

    for stage in ("pretrain", "distill"):
        if stage == "distill":
            model.freeze()
        (losses_torch, grads_torch), (losses_triton, grads_triton) = run("torch", stage), run("triton", stage)
        assert losses_torch.keys() == losses_triton.keys() and len(grads_torch) == len(grads_triton) > 0
        for k in losses_torch:
            torch.testing.assert_close(losses_triton[k], losses_torch[k], rtol=1e-5, atol=1e-6)
        for got, want in zip(grads_triton, grads_torch):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    # distill: the student levels get gradients, no AKE parameter does
    assert len(grads_torch) == len(student) and all(g is not None for g in grads_torch)


def test_msdeformattn_rejects_bad_shapes():
    module = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=2)
    query, ref, value_input, spatial_shapes, level_start_index = module_inputs()
    with pytest.raises(ValueError, match=r"reference_points: expected shape \[2, 3, 2, 2\]"):
        module(query, ref[..., :1], value_input, spatial_shapes, level_start_index)
    with pytest.raises(ValueError, match="padding_mask: expected a bool tensor"):
        module(query, ref, value_input, spatial_shapes, level_start_index,
               padding_mask=torch.zeros(value_input.shape[:2]))
    with pytest.raises(ValueError, match="d_model: expected a multiple of n_heads"):
        MSDeformAttn(d_model=30, n_heads=8)


def test_flatten_levels():
    features = [torch.randn(2, 3, 4, 5), torch.randn(2, 3, 2, 1)]
    value_input, spatial_shapes, level_start_index = flatten_levels(features)
    assert spatial_shapes.tolist() == [[4, 5], [2, 1]] and spatial_shapes.dtype == torch.int64
    assert level_start_index.tolist() == [0, 20] and level_start_index.dtype == torch.int64
    assert value_input.shape == (2, 22, 3)
    torch.testing.assert_close(value_input[1, 20 + 1 * 1 + 0], features[1][1, :, 1, 0])   # row-major
    torch.testing.assert_close(value_input[0, 2 * 5 + 3], features[0][0, :, 2, 3])


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile for a real GPU (no GPU needed)
# ----------------------------------------------------------------------------------------------

def run_compile_check(*flags):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), "--compile-check", *flags],
                          capture_output=True, text=True, env=env, timeout=300)


def compile_table(stdout):
    """Rows of the --compile-check table: kernel, target, dtype, config, then figures or FAILED."""
    return [line.split() for line in stdout.splitlines() if line.startswith("_msda_")]


@pytest.mark.skipif(msda.triton is None, reason="triton not installed")
def test_triton_kernels_compile_for_sm90_at_the_launchers_decoder_config():
    proc = run_compile_check("--archs", "90", "--dtypes", "fp32,bf16", "--sizes", "decoder")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = compile_table(proc.stdout)
    assert sorted((r[0], r[2]) for r in rows) == sorted(itertools.product(
        ["_msda_fwd_kernel", "_msda_bwd_kernel"], ["fp32", "bf16"]))
    # the decoder (B*H = 16 programs per query block, Q = 200) on 132 SMs: query blocks halve from 64 until
    # 16 * ceil(200 / block) >= 2 * 132 or the block is 16 -> 16; 16 x 32 tile elements -> 2 warps
    B, Q, H, C, P, shapes = bench._bench_sizes(torch.device("cpu"))["decoder"]
    for kernel, target, dtype, *config_and_figures in rows:
        assert target == "sm_90" and "FAILED" not in config_and_figures
        config, (_, regs, spill, ptx_lines, _), sizes = config_and_figures[:4], config_and_figures[4:9], \
            config_and_figures[9:]
        assert config == ["Q16", "C32", "w2", "s1"] and sizes == ["decoder"]
        assert int(regs) <= 255 and int(spill) == 0 and int(ptx_lines) > 100
        # what a real H100 launch of these sizes would use is exactly what was compiled
        cfg = msda.launch_config("fwd" if "fwd" in kernel else "bwd", B, Q, H, C, torch.float32, 90, 132)
        assert (cfg.block_q, cfg.block_c, cfg.num_warps, cfg.num_stages) == (16, 32, 2, 1)


@pytest.mark.skipif(msda.triton is None, reason="triton not installed")
def test_compile_check_names_kernel_target_dtype_and_message_of_a_failed_build():
    proc = run_compile_check("--archs", "20", "--dtypes", "fp32", "--sizes", "decoder")
    assert proc.returncode == 1
    failed = [line for line in proc.stdout.splitlines() if "FAILED" in line]
    assert {line.split()[0] for line in failed} == {"_msda_fwd_kernel", "_msda_bwd_kernel"}
    for line in failed:
        assert " sm_20 " in line and " fp32 " in line
        message = line.split("FAILED (decoder): ", 1)[1]
        assert "sm_20" in message or "LLVM ERROR" in message      # the compiler's own words, one line


def test_deform_attn_triton_is_a_copy_alone_file_without_tooling():
    """The file users copy into their codebases imports only what the op and the module need; the benchmark,
    the compile check and their CLI live in bench.py."""
    with open(os.path.join(HERE, "deform_attn_triton.py")) as f:
        source = f.read()
    tree = ast.parse(source)
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"contextlib", "math", "warnings", "typing", "torch", "triton"}, imported
    assert {"torch", "triton"} <= imported
    for word in ("argparse", "subprocess", "__main__"):
        assert word not in source, word


@pytest.mark.parametrize("Q,expected_block_q", [(200, 16), (600, 32), (2000, 64), (5, 16)])
def test_launch_config_grid_covers_the_problem_and_fills_the_sms(Q, expected_block_q):
    B, H, C = 2, 8, 32
    for kernel in ("fwd", "bwd"):
        cfg = msda.launch_config(kernel, B, Q, H, C, torch.bfloat16, 90, 132)
        assert cfg.block_q == expected_block_q
        assert cfg.grid[0] * cfg.block_q >= Q > (cfg.grid[0] - 1) * cfg.block_q and cfg.grid[1] == B * H
        if kernel == "fwd":
            assert cfg.grid[2] * cfg.block_c >= C
        # a smaller block would be needed only if this one left SMs idle
        assert cfg.block_q == 16 or B * H * math.ceil(Q / cfg.block_q) >= 2 * 132
        assert cfg.num_warps * 32 <= cfg.block_q * cfg.block_c           # no idle threads in a tile
    assert msda.launch_config("fwd", B, Q, H, 256, torch.float64, 90, 132).block_c == 32


@pytest.mark.skipif(msda.triton is None, reason="triton not installed")
def test_triton_launcher_uses_launch_config(monkeypatch):
    """The interpreted launch goes through launch_config (target (0, 1) on CPU); a config it returns changes
    the launch, and any config it may return gives the oracle's answer."""
    calls = []

    def spy(kernel, B, Q, H, C, dtype, arch, num_sms):
        calls.append((kernel, arch, num_sms))
        return msda.LaunchConfig(16, 8, 2, 1, (math.ceil(Q / 16), B * H) + ((math.ceil(C / 8),) if kernel == "fwd"
                                                                            else ()))
    monkeypatch.setattr(msda, "launch_config", spy)
    launched = []

    class Recorded:  # the kernel, recording the grid and block sizes each launch is given
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def launch(*args, **meta):
                launched.append((self.name, grid, meta["BLOCK_Q"], meta["BLOCK_C"], meta["num_warps"]))
                return self.kernel[grid](*args, **meta)
            return launch
    for name in ("fwd", "bwd"):
        kernel = f"_msda_{name}_kernel"
        monkeypatch.setattr(msda, kernel, Recorded(name, getattr(msda, kernel)))
    case = CASES["C30"]()
    leaves = [t.clone().requires_grad_(True) if t.is_floating_point() else t for t in case]
    out = ms_deform_attn(*leaves, backend="triton")
    out.sum().backward()
    assert calls == [("fwd", 0, 1), ("bwd", 0, 1)]
    (B, _, H, C), Q = case[0].shape, case[3].shape[1]
    assert launched == [("fwd", (math.ceil(Q / 16), B * H, math.ceil(C / 8)), 16, 8, 2),
                        ("bwd", (math.ceil(Q / 16), B * H), 16, 8, 2)]
    torch.testing.assert_close(out.double(), oracle(*case), rtol=1e-5, atol=2e-5)


# ====================================================================================================================
# detectors, data, COCO evaluation (detectors.py, eval.py)
# ====================================================================================================================

H, W = 128, 192  # both multiples of 64, as the embedded data
FAMILIES = ["retinanet", "fcos", "atss", "reppoints", "faster_rcnn", "mask_rcnn", "deformable_detr"]


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
    loss_names = {"reppoints": {"classification", "bbox_init", "bbox_refine"},
                  "deformable_detr": {"loss_cls", "loss_l1", "loss_giou", "loss_cls_aux", "loss_l1_aux",
                                      "loss_giou_aux"}}.get(family) or \
        ({"classification", "bbox_regression"} if family in detectors.ONE_STAGE
         else {"loss_objectness", "loss_classifier", "loss_box_reg"})
    assert set(out.result) >= loss_names
    # both images resize to a longer side of 192 at most, shorter 128 at most -> padded to 128 x 192
    sizes = [(round(h * expected_resize(h, w)), round(w * expected_resize(h, w))) for h, w in [(100, 150), (128, 160)]]
    assert out.image_sizes == sizes
    h_pad = math.ceil(max(s[0] for s in sizes) / 64) * 64
    w_pad = math.ceil(max(s[1] for s in sizes) / 64) * 64
    assert out.padded_hw == (h_pad, w_pad) == (128, 192)
    assert len(out.features) == 4
    for stride, feature in zip((8, 16, 32, 64), out.features):
        assert feature.shape == (2, 256, h_pad // stride, w_pad // stride)
    assert out.features[0].requires_grad  # the student's features carry gradients to its backbone


@pytest.mark.parametrize("family", FAMILIES)
def test_hooked_forward_returns_exactly_the_plain_forward(family):
    # score threshold 0: an untrained head's scores sit near its prior (~0.01), and empty outputs would compare equal
    model = build(f"{family}_r18", box_score_thresh=0.0, box_detections_per_img=10) if "rcnn" in family else \
        build(f"{family}_r18", score_thresh=0.0)
    images, targets = images_and_targets(with_masks=family == "mask_rcnn")
    model.eval()
    with torch.no_grad():
        plain = model(images)
        hooked = detectors.forward_with_features(model, images).result
    assert len(plain) == len(hooked) == 2
    assert all(len(p["boxes"]) > 0 for p in plain)
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
    heads = []
    model.head.register_forward_hook(lambda m, args, out: heads.append("run"))
    with torch.no_grad():
        full = detectors.forward_with_features(model, images)
        assert heads == ["run"]
        only = detectors.forward_features(model, images)
    assert heads == ["run"] and only.result is None and only.padded_hw == full.padded_hw
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
        h_pad, w_pad = out.padded_hw
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
               [f"{family}_r18" for family in FAMILIES] + ["retinanet_r18_v2", "retinanet_r50_v2",
                                                          "faster_rcnn_r50_v2", "mask_rcnn_r50_v2"]}
    assert len({json.dumps(c) for c in configs.values()}) == 1
    assert next(iter(configs.values()))["size_divisible"] == 64


def test_retinanet_v2_head_keeps_its_signal_at_init():
    """RetinaNet v2 (any backbone): GroupNorm towers, GIoU box loss, P6 from C5, like torchvision's R50 v2. The
    point of the GroupNorm: at init, v1's four std-0.01 convs shrink unit-scale FPN features ~70x (each layer
    x ~sqrt(2304 / 2) * 0.01 = 0.34, and ReLU), v2's towers end near unit scale."""
    torch.manual_seed(0)
    v1, v2 = build("retinanet_r18"), build("retinanet_r18_v2")
    ours, ref = v2.head, torchvision.models.detection.retinanet_resnet50_fpn_v2(num_classes=5).head
    assert [type(m) for m in ours.modules()] == [type(m) for m in ref.modules()]
    assert ours.regression_head._loss_type == "giou" and v1.head.regression_head._loss_type == "l1"
    assert v2.backbone.fpn.extra_blocks.p6.in_channels == 512 and v1.backbone.fpn.extra_blocks.p6.in_channels == 256
    x = torch.randn(2, 256, 8, 8)
    std = [m.head.classification_head.conv(x).std().item() for m in (v1, v2)]
    assert std[0] < 0.02 < 0.3 < std[1]


def test_heads_are_sized_for_the_anchor_generator_given():
    """A generator with 2 anchors per location (not torchvision's 9 / 3): our builders size the head for it (the
    losses need one prediction per anchor), torchvision's fixed-head builders refuse it in one line."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    two = lambda: AnchorGenerator(tuple((16 * 2 ** i,) for i in range(5)), ((0.5, 2.0),) * 5)  # noqa: E731
    images, targets = images_and_targets()
    for name, key in (("retinanet_r18_v2", "anchor_generator"), ("retinanet_r18", "anchor_generator"),
                      ("faster_rcnn_r18", "rpn_anchor_generator")):
        model = build(name, **{key: two()})
        logits = model.head.classification_head.cls_logits if "retinanet" in name else model.rpn.head.cls_logits
        assert logits.out_channels == 2 * (5 if "retinanet" in name else 1)
        model.train()
        assert all(torch.isfinite(v) for v in model(images, targets).values())
    with pytest.raises(ValueError, match="retinanet_r50_v2.*9 anchors per location.*has 2"):
        build("retinanet_r50_v2", anchor_generator=two())


@pytest.mark.parametrize("backbone", ["r18", "r34"])
def test_fcos_from_scratch_starts_with_boxes_that_have_an_area_and_a_gradient(backbone):
    """From scratch, FCOS's ReLU'd side distances leave most boxes at the positives degenerate (more than half the
    distances zero, GIoU loss ~0.9999); the positive regression bias gives every box an area, so the branch learns
    from step one."""
    images, targets = images_and_targets()

    def regression_loss_and_grad(model):
        torch.manual_seed(0)
        model.train()
        loss = model(images, targets)["bbox_regression"]
        loss.backward()
        return loss.item(), model.head.regression_head.bbox_reg.weight.grad.abs().sum().item()
    torch.manual_seed(0)
    model = build(f"fcos_{backbone}")
    assert torch.equal(model.head.regression_head.bbox_reg.bias, torch.ones(4))
    loss, grad = regression_loss_and_grad(model)
    assert loss < 0.999 and grad > 0
    # the same weights with torchvision's zero bias: every box at the positives has no area
    dead = copy.deepcopy(model)
    dead.zero_grad()
    torch.nn.init.zeros_(dead.head.regression_head.bbox_reg.bias)
    relu_out = []
    dead.head.regression_head.bbox_reg.register_forward_hook(lambda m, i, o: relu_out.append((o > 0).float().mean()))
    loss0, _ = regression_loss_and_grad(dead)
    assert loss0 > loss and float(torch.stack(relu_out).mean()) < 0.5

def atss_rule_by_loops(anchors, gts, counts, topk=9):
    """ATSS's Alg. 1 written out with Python loops and floats (independent of atss.py's tensor code)."""
    def iou(a, b):
        w, h = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
        inter = max(w, 0) * max(h, 0)
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    def centre(box):
        return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    positives = []
    for gt in gts:
        gx, gy = centre(gt)
        candidates, start = [], 0
        for n in counts:
            by_distance = sorted(range(start, start + n),
                                 key=lambda i: math.hypot(centre(anchors[i])[0] - gx, centre(anchors[i])[1] - gy))
            candidates += by_distance[:min(topk, n)]
            start += n
        ious = [iou(anchors[i], gt) for i in candidates]
        threshold = statistics.mean(ious) + statistics.stdev(ious)
        positives.append({i for i, v in zip(candidates, ious) if v >= threshold and
                          min(centre(anchors[i])[0] - gt[0], centre(anchors[i])[1] - gt[1],
                              gt[2] - centre(anchors[i])[0], gt[3] - centre(anchors[i])[1]) > 0.01})
    matched = []
    for i, anchor in enumerate(anchors):
        owners = [j for j, pos in enumerate(positives) if i in pos]
        matched.append(max(owners, key=lambda j: iou(anchor, gts[j])) if owners else -1)
    return matched, positives


def test_atss_assignment_equals_the_rule_written_as_loops():
    g = torch.Generator().manual_seed(5)
    anchors, counts = [], []
    for stride in (8, 16, 32, 64, 128):  # one square anchor of 4 strides per location of a 128 x 192 image
        ys, xs = torch.meshgrid(torch.arange(0, 128, stride) + stride / 2, torch.arange(0, 192, stride) + stride / 2,
                                indexing="ij")
        centres = torch.stack([xs.flatten(), ys.flatten()], 1).double()
        anchors.append(torch.cat([centres - 2 * stride, centres + 2 * stride], 1))
        counts.append(len(centres))
    anchors = torch.cat(anchors)
    xy = torch.rand(6, 2, generator=g, dtype=torch.float64) * torch.tensor([150.0, 90.0])
    wh = 12 + torch.rand(6, 2, generator=g, dtype=torch.float64) * 50
    gts = torch.cat([xy, xy + wh], 1)
    gts = torch.cat([gts, gts[:1] + torch.tensor([3.0, 2.0, 5.0, 1.0], dtype=torch.float64),  # overlaps GT 0
                     torch.tensor([[25.0, 25.0, 27.5, 27.5]], dtype=torch.float64)])  # no anchor centre inside it
    expected, positives = atss_rule_by_loops(anchors.tolist(), gts.tolist(), counts)
    assert atss.atss_assign(anchors, gts, counts).tolist() == expected
    assert positives[-1] == set() and all(positives[:-1])  # the tiny GT gets no anchor, every other one some
    assert positives[0] & positives[6]  # the overlapping pair competes for anchors: the larger IoU wins each
    assert atss.atss_assign(anchors, gts[:0], counts).tolist() == [-1] * len(anchors)


def overfit_one_image(name, terms, lr=2e-3, steps=150, lr_drop_at=None, **kwargs):
    """A detector from scratch on one 64 px image with two boxes, AdamW until each of `terms` (loss names) is below
    a tenth of its start and its detections in eval mode find both GT boxes with their classes (at most `steps`
    steps; a model whose losses fall first keeps training until it detects) -> (first losses, last losses). From
    step lr_drop_at on, the lr is 0.1x (as Deformable DETR's schedule drops it)."""
    torch.manual_seed(0)
    model = detectors.build_detector(name, 4, min_size=64, max_size=64, score_thresh=0.3, **kwargs)
    image = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))]
    target = [{"boxes": torch.tensor([[4.0, 6.0, 36.0, 40.0], [34.0, 20.0, 60.0, 58.0]]), "labels": torch.tensor([1, 3])}]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0)
    first = ious = found = None
    for step in range(steps):
        if step == lr_drop_at:
            for group in optimizer.param_groups:
                group["lr"] = lr / 10
        losses = model.train()(image, target)
        first = first or {k: v.item() for k, v in losses.items()}
        if all(losses[k] < first[k] / 10 for k in terms):
            with torch.no_grad():
                found = model.eval()(image)[0]
            ious = box_iou(target[0]["boxes"], found["boxes"])
            if ious.shape[1] and (ious.max(1).values >= 0.5).all():
                break
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    assert ious is not None, f"{name}: the losses {terms} never fell below a tenth of their start in {steps} steps"
    assert (ious.max(1).values >= 0.5).all()  # each GT found, with its class
    assert found["labels"][ious.argmax(1)].tolist() == [1, 3]
    return first, losses


def test_atss_overfits_one_image_from_scratch():
    # (centerness BCE has soft targets: its floor is their entropy, not 0)
    first, last = overfit_one_image("atss_r18", ["classification", "bbox_regression"])
    assert all(last[k] < first[k] / 10 for k in ["classification", "bbox_regression"]), (first, last)


def test_reppoints_pseudo_box_is_the_min_max_of_its_points():
    points = torch.tensor([[[1.0, 2.0, -3.0, 0.5, 4.0, -1.0] + [0.0, 0.0] * 6]])     # (y, x): (1, 2), (-3, .5), (4, -1), 0s
    assert reppoints.points_to_boxes(points).tolist() == [[[-1.0, -3.0, 2.0, 4.0]]]  # x1, y1, x2, y2
    anchors = torch.tensor([[8.0, 16.0, 24.0, 32.0]])                                 # centre (16, 24), stride 16
    decoded = reppoints.PointBoxCoder().decode_single(torch.tensor([[-1.0, -3.0, 2.0, 4.0]]), anchors)
    assert decoded.tolist() == [[16 - 16, 24 - 48, 16 + 32, 24 + 64]]


@pytest.mark.parametrize("deform_conv", [lambda x, offset, weight: torchvision.ops.deform_conv2d(x, offset, weight,
                                                                                               padding=1),
                                         reppoints.deform_conv3x3], ids=["torchvision", "grid_sample"])
def test_reppoints_deformable_taps_read_the_feature_at_their_points(deform_conv):
    """With offset = points - the kernel grid, tap k of deform_conv2d samples the feature at location + point k."""
    H, W = 7, 9
    feature = torch.arange(H * W, dtype=torch.float32).view(1, 1, H, W)   # the value says where it was read
    g = torch.Generator().manual_seed(0)
    points = torch.randint(-2, 3, (1, 2 * reppoints.NUM_POINTS, H, W), generator=g).float()  # whole pixels
    offset = points - reppoints.kernel_grid(3).view(1, -1, 1, 1)
    for k in range(reppoints.NUM_POINTS):
        weight = torch.zeros(1, 1, 3, 3)
        weight.view(-1)[k] = 1.0  # only tap k
        out = deform_conv(feature, offset, weight)[0, 0]
        for i in range(H):
            for j in range(W):
                y, x = i + int(points[0, 2 * k, i, j]), j + int(points[0, 2 * k + 1, i, j])
                expected = feature[0, 0, y, x] if 0 <= y < H and 0 <= x < W else 0.0  # zeros outside
                assert abs(out[i, j] - expected) < 1e-4, (k, i, j)  # grid_sample: fp32 round trip


@pytest.mark.parametrize("shape", [(2, 5, 7, 9), (1, 3, 1, 1), (2, 4, 1, 6)])
def test_reppoints_cpu_deformable_conv_equals_torchvisions_with_its_gradients(shape):
    """The CPU path (grid_sample + one product) against torchvision's deform_conv2d in fp64: values and the gradients
    of x, offsets and weight, offsets reaching up to ~6 pixels outside 1x1 and 1-row maps."""
    N, C, H, W = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, C, H, W, generator=g, dtype=torch.float64, requires_grad=True)
    offset = (2 * torch.randn(N, 18, H, W, generator=g, dtype=torch.float64)).requires_grad_()
    weight = torch.randn(4, C, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    ours = reppoints.deform_conv3x3(x, offset, weight)
    theirs = torchvision.ops.deform_conv2d(x, offset, weight, padding=1)
    torch.testing.assert_close(ours, theirs)
    for a, b in zip(torch.autograd.grad(ours.square().sum(), (x, offset, weight)),
                    torch.autograd.grad(theirs.square().sum(), (x, offset, weight))):
        torch.testing.assert_close(a, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # torchvision's CPU kernel has no bf16
        low = reppoints.deform_conv3x3(x.float(), offset.float(), weight.float())
    assert low.dtype == torch.bfloat16
    # sampling in fp32, then a bf16 product: both factors of every term rounded (unit roundoff 2^-9 each), the sum
    # rounded once more -- a bound sampling coordinates in bf16 would break
    with torch.no_grad():
        bound = (2 ** -8 * torchvision.ops.deform_conv2d(x.abs(), offset, weight.abs(), padding=1)
                 + 2 ** -9 * theirs.abs())
    assert ((low.double() - theirs.detach()).abs() <= bound).all()


def test_reppoints_overfits_one_image_from_scratch():
    first, last = overfit_one_image("reppoints_r18", ["classification", "bbox_init", "bbox_refine"])
    assert all(last[k] < first[k] / 10 for k in first), (first, last)


# --------------------------------------------------------------------------------------------- Deformable DETR

def test_deformable_detr_hook_reads_the_encoder_output():
    """The paper's AKE reads Deformable DETR's 'features after the encoder': the hooked levels are the last encoder
    layer's output [B, S, C], split back into the 4 maps."""
    model = build("deformable_detr_r18").eval()
    assert len(model.backbone.layers) == 6 and len(model.decoder) == 6 and model.query_embed.num_embeddings == 300
    seen = []
    model.backbone.layers[-1].register_forward_hook(lambda m, args, out: seen.append(out))
    images, _ = images_and_targets()
    with torch.no_grad():
        feats = detectors.forward_features(model, images).features
    flat = torch.cat([f.flatten(2).transpose(1, 2) for f in feats], 1)
    assert torch.equal(flat, seen[0])


def test_deformable_detr_sine_embedding_is_the_written_out_formula():
    h, w, d = 3, 5, 8
    got = deformable_detr.sine_position_embedding(h, w, d)
    for i, j in itertools.product(range(h), range(w)):
        expected = []
        for coordinate, side in ((i, h), (j, w)):
            v = (coordinate + 0.5) / side * 2 * math.pi
            for k in range(d // 2):
                angle = v / 10000 ** (2 * (k // 2) / (d // 2))
                expected.append(math.sin(angle) if k % 2 == 0 else math.cos(angle))
        assert got[i * w + j].tolist() == pytest.approx(expected, abs=1e-6)


def test_deformable_detr_losses_are_each_layers_brute_force_matched_set_loss():
    """loss_* = the last decoder layer's set loss, loss_*_aux = the sum over the earlier layers; each layer matched
    by brute force over all assignments with Deformable DETR's cost, its losses written out per pair."""
    torch.manual_seed(0)
    model = detectors.build_detector("deformable_detr_r18", 4, min_size=64, max_size=96, dropout=0.0,
                                     num_queries=5, num_encoder_layers=1, num_decoder_layers=3).train()
    images, targets = tiny_batch(4)
    targets[1] = {"boxes": targets[1]["boxes"][:1], "labels": targets[1]["labels"][:1]}
    losses = model(images, targets)
    image_list, transformed = model.transform(images, targets)  # (deterministic: no dropout, BN uses batch stats)
    logits, boxes, _ = model.decode(list(model.backbone(image_list.tensors).values()))
    h, w = image_list.tensors.shape[-2:]
    gts = [(t["labels"] - 1, box_convert(t["boxes"], "xyxy", "cxcywh") / torch.tensor([w, h, w, h])) for t in transformed]
    num_boxes = sum(len(labels) for labels, _ in gts)
    per_layer = []
    for layer_logits, layer_boxes in zip(logits.detach(), boxes.detach()):
        onehot, l1, giou = torch.zeros_like(layer_logits), 0.0, 0.0
        for b, (labels, gt) in enumerate(gts):
            n, m = layer_logits.shape[1], len(labels)
            cost = [[pair_cost(layer_logits[b, i].tolist(), layer_boxes[b, i].tolist(), int(labels[j]), gt[j].tolist())
                     for j in range(m)] for i in range(n)]
            best = min(itertools.permutations(range(n), m), key=lambda p: sum(cost[p[j]][j] for j in range(m)))
            for j, i in enumerate(best):
                onehot[b, i, labels[j]] = 1
                l1 += (layer_boxes[b, i] - gt[j]).abs().sum().item()
                giou += 1 - generalized_box_iou(box_convert(layer_boxes[b, i:i + 1], "cxcywh", "xyxy"),
                                                box_convert(gt[j:j + 1], "cxcywh", "xyxy")).item()
        focal = sigmoid_focal_loss(layer_logits, onehot, reduction="sum").item()
        per_layer.append({"cls": 2 * focal / num_boxes, "l1": 5 * l1 / num_boxes, "giou": 2 * giou / num_boxes})
    for k in ("cls", "l1", "giou"):
        assert losses[f"loss_{k}"].item() == pytest.approx(per_layer[-1][k], rel=1e-4)
        assert losses[f"loss_{k}_aux"].item() == pytest.approx(sum(p[k] for p in per_layer[:-1]), rel=1e-4)


def test_deformable_detr_box_refinement_reads_around_the_previous_layers_box():
    model = build("deformable_detr_r18", dropout=0.0, num_queries=7, num_decoder_layers=3, box_refine=True).eval()
    assert len({id(m) for m in model.bbox_embed}) == 3  # one box head per layer
    references = []
    for layer in model.decoder:
        layer.register_forward_pre_hook(lambda m, args: references.append(args[2]))
    with torch.no_grad():
        feats = detectors.forward_features(model, images_and_targets()[0]).features
        _, boxes, _ = model.decode(feats)
    assert references[0].shape[-1] == 2  # the queries' own reference points, then the previous layer's boxes
    assert torch.equal(references[1], boxes[0]) and torch.equal(references[2], boxes[1])


def test_deformable_detr_proposal_anchors_are_the_written_out_squares():
    boxes, valid = deformable_detr.proposal_anchors(torch.tensor([[2, 3], [1, 1], [1, 200]]))
    assert boxes.shape == (6 + 1 + 200, 4)
    assert boxes[5].tolist() == pytest.approx([2.5 / 3, 1.5 / 2, 0.05, 0.05])   # level 0, row 1, column 2
    assert boxes[6].tolist() == pytest.approx([0.5, 0.5, 0.1, 0.1])             # level 1: its only pixel
    assert boxes[7].tolist() == pytest.approx([0.5 / 200, 0.5, 0.2, 0.2])       # level 2, column 0: x < 0.01
    assert valid[:7].all() and not valid[7:9].any() and valid[9] and not valid[-1]   # x = 1.5/200 < 0.01 < 2.5/200


def test_deformable_detr_two_stage_queries_are_the_top_proposals_and_their_loss_is_matched_class_agnostically():
    """two_stage: the decoder's first references are the num_queries valid proposals of highest objectness (detached),
    its queries come from them; loss_*_enc is the proposals' set loss against class-agnostic GT, here with one GT per
    image so the optimal matching is the cheapest proposal, found by a loop; every two-stage part gets a gradient."""
    torch.manual_seed(0)
    model = detectors.build_detector("deformable_detr_r18", 4, min_size=64, max_size=96, dropout=0.0, num_queries=6,
                                     num_encoder_layers=1, num_decoder_layers=2, two_stage=True).train()
    assert not hasattr(model, "query_embed")
    images, targets = tiny_batch(4)
    targets = [{"boxes": t["boxes"][i:i + 1], "labels": t["labels"][i:i + 1]} for i, t in enumerate(targets)]
    references = []
    model.decoder[0].register_forward_pre_hook(lambda m, args: references.append(args[2]))
    losses = model(images, targets)
    image_list, transformed = model.transform(images, targets)
    levels = list(model.backbone(image_list.tensors).values())
    objectness, boxes = model.propose(deformable_detr.FeatureMemory(*flatten_levels(levels)))
    _, valid = deformable_detr.proposal_anchors(torch.tensor([list(f.shape[-2:]) for f in levels]))
    h, w = image_list.tensors.shape[-2:]
    focal = l1 = giou = 0.0
    for b, t in enumerate(transformed):
        ranked = sorted((i for i in range(len(valid)) if valid[i]), key=lambda i: -objectness[b, i, 0].item())
        assert torch.equal(references[0][b], boxes[b, ranked[:6]]) and not references[0].requires_grad
        gt = (box_convert(t["boxes"], "xyxy", "cxcywh") / torch.tensor([w, h, w, h]))[0].tolist()
        costs = [pair_cost(objectness[b, i].tolist(), boxes[b, i].tolist(), 0, gt) for i in range(boxes.shape[1])]
        best = min(range(len(costs)), key=costs.__getitem__)
        onehot = torch.zeros_like(objectness[b])
        onehot[best] = 1
        focal += sigmoid_focal_loss(objectness[b], onehot, reduction="sum").item()
        l1 += sum(abs(a - c) for a, c in zip(boxes[b, best].tolist(), gt))
        giou += 1 - generalized_box_iou(box_convert(boxes[b, best:best + 1], "cxcywh", "xyxy"),
                                        box_convert(torch.tensor([gt]), "cxcywh", "xyxy")).item()
    expected = {"cls": 2 * focal / 2, "l1": 5 * l1 / 2, "giou": 2 * giou / 2}   # two GT boxes in the batch
    for k, v in expected.items():
        assert losses[f"loss_{k}_enc"].item() == pytest.approx(v, rel=1e-4)
    sum(losses.values()).backward()
    for part in (model.enc_output, model.enc_class, model.enc_box, model.pos_trans):   # (enc_box's last layer starts
        grads = [p.grad for p in part.parameters()]                                    # at zero: only it moves first)
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_deformable_detr_trains_on_the_triton_kernels_as_on_the_pytorch_path():
    """Every MSDA of its encoder and decoder switched to the Triton kernels (run by the interpreter here, compiled on
    a GPU): the same losses and gradients as the PyTorch path; and a bf16 autocast step runs."""
    model = detectors.build_detector("deformable_detr_r18", 4, min_size=64, max_size=64, dropout=0.0, num_queries=10,
                                     num_encoder_layers=1, num_decoder_layers=1).train()
    images, targets = (x[:1] for x in tiny_batch(4, size=(64, 64)))
    attentions = [m for m in model.modules() if isinstance(m, MSDeformAttn)]
    assert len(attentions) == 2

    def step(backend):
        for m in attentions:
            m.backend = backend
        model.zero_grad()
        losses = model(images, targets)
        sum(losses.values()).backward()
        return losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    (torch_losses, torch_grads), (triton_losses, triton_grads) = step("torch"), step("triton")
    for k in torch_losses:
        torch.testing.assert_close(triton_losses[k], torch_losses[k], rtol=1e-5, atol=1e-6)
    for k in torch_grads:
        torch.testing.assert_close(triton_grads[k], torch_grads[k], rtol=1e-4, atol=1e-6)
    for m in attentions:
        m.backend = "auto"  # (the PyTorch path on a CPU)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("name,lr,lr_drop_at", [("deformable_detr_r18", 1e-3, None),
                                                 ("deformable_detr_r18_two_stage", 3e-4, 50)])
def test_deformable_detr_overfits_one_image_from_scratch(name, lr, lr_drop_at):
    # two-stage: its top-k proposals, hence its decoder's reference boxes, jump from step to step; at a constant lr
    # its box losses hover around 0.1-0.5 of their start (1e-3 or 3e-4 alike), after a 10x drop they settle
    first, last = overfit_one_image(name, ["loss_cls", "loss_l1", "loss_giou"], lr=lr, steps=300,
                                    lr_drop_at=lr_drop_at, dropout=0.0, num_queries=30)
    assert all(last[k] < first[k] / 10 for k in ["loss_cls", "loss_l1", "loss_giou"]), (first, last)


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


STAGE_SUFFIXES = ("convnext_t", "convnext_s", "convnext_b", "swin_t", "swin_s", "swin_b")


@pytest.mark.parametrize("family", ["retinanet", "mask_rcnn"])
@pytest.mark.parametrize("suffix", STAGE_SUFFIXES)
def test_convnext_and_swin_backbones_give_the_four_levels_and_the_plain_forward(suffix, family):
    name = f"{family}_{suffix}"
    model = build(name, box_score_thresh=0.0, box_detections_per_img=10) if family == "mask_rcnn" else \
        build(name, score_thresh=0.0)
    assert detectors.backbone_arch(name) == detectors.BACKBONES[suffix] and detectors.fpn_channels(model) == 256
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, torchvision.ops.FrozenBatchNorm2d)) for m in model.modules())
    images, targets = images_and_targets(with_masks=family == "mask_rcnn")
    model.eval()
    with torch.no_grad():
        plain = model(images)
        hooked = detectors.forward_with_features(model, images)
    assert all(len(p["boxes"]) > 0 for p in plain)  # threshold 0: something to compare
    assert all(torch.equal(p[k], h[k]) for p, h in zip(plain, hooked.result) for k in p)
    assert hooked.padded_hw == (128, 192)
    for stride, feature in zip((8, 16, 32, 64), hooked.features):
        assert feature.shape == (2, 256, 128 // stride, 192 // stride)
    if not suffix.endswith("_t"):  # the larger variants run the same code
        return
    # the levels come from the classifier's own stages: stage s of torchvision's model, normed, is the FPN's input
    body = model.backbone.body
    x = model.transform(images)[0].tensors
    reference = torchvision.models.get_model(detectors.BACKBONES[suffix]).features  # same modules, run by hand
    reference.load_state_dict(body.stages.state_dict())
    reference.eval()
    stages = {}
    for i, stage in enumerate(reference):
        x = stage(x)
        stages[i] = x if suffix.startswith("swin") else x.permute(0, 2, 3, 1)
    with torch.no_grad():
        out = body(model.transform(images)[0].tensors)
    first = 1 if family == "mask_rcnn" else 3  # R-CNNs also read stride 4
    for k, index in enumerate(range(first, 8, 2)):
        expected = torch.nn.functional.layer_norm(stages[index], stages[index].shape[-1:], body.norms[k].weight,
                                                  body.norms[k].bias, eps=1e-6).permute(0, 3, 1, 2)
        torch.testing.assert_close(out[str(k)], expected.detach())


@pytest.mark.parametrize("suffix, enum", [("convnext_t", "ConvNeXt_Tiny_Weights"), ("convnext_s", "ConvNeXt_Small_Weights"),
                                          ("convnext_b", "ConvNeXt_Base_Weights"), ("swin_t", "Swin_T_Weights"),
                                          ("swin_s", "Swin_S_Weights"), ("swin_b", "Swin_B_Weights")])
def test_convnext_and_swin_take_torchvisions_imagenet_weights(suffix, enum, monkeypatch):
    expected = getattr(torchvision.models, enum).IMAGENET1K_V1
    assert detectors._backbone_weights(f"fcos_{suffix}", "DEFAULT") is expected
    assert detectors._backbone_weights(f"faster_rcnn_{suffix}", "IMAGENET1K_V1") is expected
    if suffix not in ("convnext_t", "swin_t"):
        return
    torch.manual_seed(3)
    imagenet = torchvision.models.get_model(detectors.BACKBONES[suffix]).state_dict()  # no download: a stand-in
    monkeypatch.setattr(type(expected), "get_state_dict", lambda self, *a, **k: imagenet)
    model = detectors.build_detector(f"fcos_{suffix}", 5, weights_backbone="DEFAULT", min_size=H, max_size=W)
    loaded = model.backbone.body.stages.state_dict()
    assert loaded and all(torch.equal(v, imagenet[f"features.{k}"]) for k, v in loaded.items())


def assert_groups(model, optimizer, free, decayed):
    decayed_group, free_group = optimizer.param_groups
    params = dict(model.named_parameters())
    assert all(any(params[n] is p for p in free_group["params"]) for n in free)
    assert all(any(params[n] is p for p in decayed_group["params"]) for n in decayed)
    assert len(decayed_group["params"]) + len(free_group["params"]) == len(params)


def test_convnext_and_swin_detectors_train_with_adamw_without_decay_on_norms_and_biases():
    import train
    args = train.get_args_parser().parse_args(["--batch-size", "4", "--data-path", "/coco"])
    args.world_size = 2
    train.set_schedule_defaults(args, "retinanet", epochs=12, optimizer="adamw")
    assert (args.optimizer, args.lr, args.weight_decay, args.lr_steps) == ("adamw", 1e-4 * 8 / 16, 0.05, [8, 11])
    model = build("retinanet_swin_t")
    optimizer = train.detector_optimizer(model, args)
    assert isinstance(optimizer, torch.optim.AdamW)
    decayed, free = optimizer.param_groups
    assert decayed["weight_decay"] == 0.05 and free["weight_decay"] == 0.0
    stage = "backbone.body.stages.3.0."  # the first Swin block of stage 2
    expected_free = [stage + "attn.relative_position_bias_table", stage + "norm1.weight", stage + "attn.qkv.bias",
                     "backbone.body.norms.0.weight", "head.classification_head.conv.0.0.bias"]
    expected_decayed = [stage + "attn.qkv.weight", stage + "mlp.0.weight", "backbone.fpn.inner_blocks.0.0.weight"]
    assert_groups(model, optimizer, expected_free, expected_decayed)
    model = build("fcos_convnext_t")
    stage = "backbone.body.stages.3.0."  # the first ConvNeXt block of stage 2
    assert_groups(model, train.detector_optimizer(model, args), [stage + "layer_scale", stage + "block.2.weight"],
                  [stage + "block.0.weight", stage + "block.3.weight"])
    args = train.get_args_parser().parse_args(["--batch-size", "8"])
    args.world_size = 1
    train.set_schedule_defaults(args, "fcos", epochs=12, optimizer="sgd")
    assert args.optimizer == "sgd" and isinstance(train.detector_optimizer(build("fcos_r18"), args), torch.optim.SGD)


def test_lr_schedule_is_a_linear_warm_up_from_a_thousandth_then_a_tenth_at_each_step_epoch():
    import train
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.02)
    args = argparse.Namespace(warmup_iters=4, epochs=3, lr_steps=[1, 2])
    scheduler = train.build_scheduler(optimizer, args, iters_per_epoch=5)
    seen = []
    for _ in range(15):  # one optimizer step, then one scheduler step, per iteration (as the training loop does)
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    warm = [0.001, 0.001 * 0.75 + 0.25, 0.001 * 0.5 + 0.5, 0.001 * 0.25 + 0.75]
    expected = [0.02 * f for f in warm + [1.0] + [0.1] * 5 + [0.01] * 5]
    assert seen == pytest.approx(expected, rel=1e-9)


def test_deformable_detr_trains_with_its_papers_adamw_and_per_part_lrs():
    import train
    args = train.get_args_parser().parse_args(["--batch-size", "4", "--data-path", "/coco"])
    args.world_size = 2
    train.set_schedule_defaults(args, "deformable_detr", epochs=12, optimizer=detectors.optimizer_of("deformable_detr"))
    assert (args.optimizer, args.lr, args.weight_decay, args.epochs, args.lr_steps, args.clip_grad) == \
        ("detr", 2e-4, 1e-4, 50, [40], 0.1)
    model = build("deformable_detr_r18")
    for weights_backbone in ("DEFAULT", None):  # the body at 0.1x only when it starts from ImageNet weights
        args.weights_backbone = weights_backbone
        fast, slow = train.detector_optimizer(model, args).param_groups
        assert (fast["lr"], slow["lr"], fast["weight_decay"], slow["weight_decay"]) == (2e-4, 2e-4 * 0.1, 1e-4, 1e-4)
        slow_ids = {id(p) for p in slow["params"]}
        for name, p in model.named_parameters():  # Deformable DETR's lr_backbone and lr_linear_proj_names
            placing = "sampling_offsets" in name or "reference_points" in name
            body = name.startswith("backbone.body.") and weights_backbone is not None
            assert (id(p) in slow_ids) == (body or placing), name
        assert len(fast["params"]) + len(slow["params"]) == len(list(model.parameters()))


def test_names_and_weights_errors():
    assert detectors.canonical_name("fcos") == "fcos_r50"
    assert detectors.canonical_name("retinanet_v2") == "retinanet_r50_v2"
    assert detectors.backbone_arch("retinanet_r18_v2") == "resnet18"
    assert detectors.backbone_arch("faster_rcnn_v2") == detectors.backbone_arch("mask_rcnn_r50") == "resnet50"
    # Deformable DETR's Table 1 variants: + refinement, ++ two-stage (both)
    assert detectors.canonical_name("deformable_detr_two_stage") == "deformable_detr_r50_two_stage"
    assert detectors.backbone_arch("deformable_detr_swin_t_refine") == "swin_t"
    for name, refine, two_stage in (("deformable_detr_r18", False, False), ("deformable_detr_r18_refine", True, False),
                                    ("deformable_detr_r18_two_stage", True, True)):
        model = build(name, num_encoder_layers=1, num_decoder_layers=2)
        assert (model.box_refine, model.two_stage, model.unikd_name) == (refine, two_stage, name)
    with pytest.raises(ValueError, match="unknown model 'fcos_r18_refine'"):
        detectors.canonical_name("fcos_r18_refine")
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
    frozen = detectors._build_from_parts("fcos", "resnet18", 5, None, dict(detectors.TRANSFORM_DEFAULTS),
                                         detectors._scaled_anchor_generator("fcos", 1.0))
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
    return shapes_gen.ensure_shapes_dataset(str(tmp_path_factory.mktemp("data") / "shapes"), num_train=12, num_val=6)


def shapes_split(shapes, split, **kwargs):
    return data.CocoDetection(os.path.join(shapes, f"{split}2017"),
                            os.path.join(shapes, f"annotations/instances_{split}2017.json"), **kwargs)


def test_shapes_dataset_is_coco_deterministic_and_varied(shapes, tmp_path):
    again = shapes_gen.ensure_shapes_dataset(str(tmp_path / "again"), num_train=12, num_val=6)
    assert shapes_gen.ensure_shapes_dataset(shapes, num_train=12, num_val=6) == shapes  # second call: reused
    for rel in ["annotations/instances_train2017.json", "train2017/000000000003.jpg", "val2017/000000000006.jpg"]:
        assert open(os.path.join(shapes, rel), "rb").read() == open(os.path.join(again, rel), "rb").read()
    with pytest.raises(utils.UserError, match="delete it"):
        shapes_gen.ensure_shapes_dataset(shapes, num_train=13, num_val=6)
    assert not [p for p in os.listdir(os.path.dirname(shapes)) if ".tmp-" in p]  # no leftovers

    data = json.load(open(os.path.join(shapes, "annotations/instances_train2017.json")))
    assert len(data["categories"]) >= 6 and len(data["images"]) == 12
    per_image = np.bincount([a["image_id"] for a in data["annotations"]], minlength=13)[1:]
    assert per_image.min() >= 1 and per_image.max() <= 6
    masks = {}
    for ann in data["annotations"]:
        mask = mask_utils.decode(ann["segmentation"])
        ys, xs = np.nonzero(mask)
        x, y, w, h = ann["bbox"]
        assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)  # tight on the mask
        assert ann["area"] == mask.sum() and ann["iscrowd"] == 0
        masks.setdefault(ann["image_id"], []).append(mask.astype(bool))
    for image_masks in masks.values():  # no occlusion: every two shapes more than 2 px apart (city-block)
        for a, b in itertools.combinations(image_masks, 2):
            ya, xa = np.nonzero(a)
            yb, xb = np.nonzero(b)
            assert (np.abs(ya[:, None] - yb[None]) + np.abs(xa[:, None] - xb[None])).min() > 2


def test_an_embedded_dataset_of_another_generator_version_is_never_reused(tmp_path):
    root = tmp_path / "old_shapes"
    root.mkdir()
    (root / "params.json").write_text(json.dumps({"version": shapes_gen.SHAPES_VERSION - 1, "num_train": 12,
                                                  "num_val": 6, "height": H, "width": W, "seed": 0}))
    with pytest.raises(utils.UserError, match="delete it"):
        shapes_gen.ensure_shapes_dataset(str(root), num_train=12, num_val=6)
    assert os.listdir(root) == ["params.json"]


def test_shapes_sizes_span_coco_small_and_medium_and_none_is_tiny():
    rng_objects = [shapes_gen.render_shapes_image(np.random.default_rng([5, i]), H, W)[1] for i in range(40)]
    areas = np.array([o["mask"].sum() for objects in rng_objects for o in objects])
    assert 0.25 < (areas < 32 ** 2).mean() < 0.7 and ((areas >= 32 ** 2) & (areas < 96 ** 2)).mean() > 0.25
    low, high = shapes_gen.ROOT_AREA_RANGE
    # at least 70% of a shape is in the frame, and rasterising a polygon loses at most a pixel row around it
    assert np.sqrt(areas).min() >= 0.8 * low * np.sqrt(0.7) and np.sqrt(areas).max() <= 1.1 * high


def colour_under(image_uint8, mask):
    """Mean colour of the mask's interior (one pixel eroded: JPEG and resizing blur the edges)."""
    m = mask.astype(bool)
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    pixels = image_uint8[1:-1, 1:-1][inner]
    return pixels.mean(0) if len(pixels) >= 4 else None


@pytest.mark.parametrize("min_size,max_size", [(128, 192), (64, 1000)])
def test_loader_boxes_and_masks_land_on_the_drawn_shapes_after_resize_and_flip(shapes, min_size, max_size):
    dataset = shapes_split(shapes, "train", train=True, min_size=min_size, max_size=max_size, with_masks=True)
    dataset.flip_p = 1.0  # always flip, so the test knows
    loader = data.build_loader(dataset, batch_size=4, train=False)
    scale = min_size / H
    checked, mismatched_unflipped = 0, 0
    for images, targets in loader:
        for image, target in zip(images, targets):
            assert target["flipped"] is True
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
    train = data.CocoDetection(str(image_dir), str(tmp_path / "ann.json"), train=True, min_size=40, max_size=60)
    val = data.CocoDetection(str(image_dir), str(tmp_path / "ann.json"), train=False, min_size=40, max_size=60)
    assert train.num_classes == 4 and train.cat_ids == [3, 7, 12]
    assert train.label_to_cat == {1: 3, 2: 7, 3: 12}
    assert train.ids == [5] and val.ids == [5, 9, 11]  # images without usable boxes: skipped for training only
    assert train.stats["degenerate_boxes_dropped"] == 2 and train.stats["crowd_boxes_ignored"] == 1
    _, target = val[0]
    assert target["labels"].tolist() == [3] and target["boxes"].tolist() == [[5, 5, 15, 15]]
    _, empty = val[2]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)


def odd_coco(root, images=None, annotations=None, categories=None, files=None):
    """A tiny COCO-format split in root: files {name: uint8 array or PIL image}; every image 40x60 unless given."""
    files = files if files is not None else {"a.png": np.full((40, 60, 3), 90, np.uint8),
                                             "b.png": np.full((40, 60, 3), 160, np.uint8)}
    for name, picture in files.items():
        (root / os.path.dirname(name)).mkdir(parents=True, exist_ok=True)
        (picture if isinstance(picture, Image.Image) else Image.fromarray(picture)).save(root / name)
    images = images if images is not None else [{"id": i + 1, "file_name": n, "height": 40, "width": 60}
                                                for i, n in enumerate(files)]
    annotations = annotations if annotations is not None else [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 20], "area": 400, "iscrowd": 0},
        {"id": 2, "image_id": 2, "category_id": 2, "bbox": [30, 10, 20, 20], "area": 400, "iscrowd": 0}]
    categories = categories if categories is not None else [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}]
    write_coco(root / "ann.json", images, annotations, categories)
    return str(root), str(root / "ann.json")


def odd_split(root, train=True, **kwargs):
    images, ann = odd_coco(root, **kwargs)
    return data.CocoDetection(images, ann, train=train, min_size=40, max_size=60)


def box(i, image_id, bbox, category=1):
    return {"id": i, "image_id": image_id, "category_id": category, "bbox": bbox, "area": 1, "iscrowd": 0}


@pytest.mark.parametrize("case, kwargs, message", [
    ("no annotations", dict(annotations=[]), "none of its 2 images has a usable box"),
    ("only boxes without area", dict(annotations=[box(1, 1, [5, 5, 0, 9]), box(2, 2, [70, 5, 9, 9])]),
     "none of its 2 images has a usable box (2 annotations, 2 without area"),
    ("unknown category", dict(annotations=[box(1, 1, [5, 5, 9, 9], category=7)]), "category_id 7, which"),
    ("no categories", dict(categories=[]), "has no categories"),
    ("duplicate image ids", dict(images=[{"id": 1, "file_name": n, "height": 40, "width": 60}
                                         for n in ("a.png", "b.png")]), "lists images id 1 more than once"),
    ("duplicate annotation ids", dict(annotations=[box(3, 1, [5, 5, 9, 9]), box(3, 2, [5, 5, 9, 9])]),
     "lists annotations id 3 more than once"),
    ("duplicate category ids", dict(categories=[{"id": 1, "name": "one"}, {"id": 1, "name": "uno"}]),
     "lists categories id 1 more than once"),
])
@pytest.mark.parametrize("train", [True, False])
def test_odd_coco_inputs_that_are_refused_in_one_line(tmp_path, case, kwargs, message, train):
    with pytest.raises(utils.UserError) as error:
        odd_split(tmp_path, train=train, **kwargs)
    assert message in str(error.value) and "\n" not in str(error.value) and ";" in str(error.value), case


def test_odd_boxes_are_clipped_or_dropped_and_counted(tmp_path):
    anns = [box(1, 1, [5, 5, 10, 10]),             # inside
            box(2, 1, [50, 30, 20, 20]),           # partly outside: clipped to [50, 30, 60, 40]
            box(3, 1, [-5, -5, 10, 10]),           # partly outside: clipped to [0, 0, 5, 5]
            box(4, 1, [5, 5, -3, 10]),             # negative width: dropped
            box(5, 1, [5, 5, 10, 0]),              # zero height: dropped
            box(6, 2, [61, 5, 5, 5]),              # wholly outside: dropped, image 2 left without a box
            box(7, 1, [1, 1, 30, 30]) | {"iscrowd": 1}]
    train = odd_split(tmp_path, annotations=anns)
    assert train.stats == {"images": 1, "degenerate_boxes_dropped": 3, "boxes_clipped": 2, "crowd_boxes_ignored": 1,
                           "images_without_boxes": 1, "images_skipped": 1}
    assert "dropped 3 degenerate boxes, clipped 2 to the image" in train.summary()
    _, target = train.load(0, flip=False)
    assert target["boxes"].tolist() == [[5, 5, 15, 15], [50, 30, 60, 40], [0, 0, 5, 5]]


def test_greyscale_rgba_palette_and_16_bit_images_load_as_rgb_with_their_values(tmp_path):
    grey16 = (np.arange(40 * 60).reshape(40, 60) * 27).astype(np.uint16)  # up to 63,693: PIL's RGB would clip
    rgba = np.zeros((40, 60, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 17
    palette = Image.fromarray(np.full((40, 60), 3, np.uint8), mode="P")
    palette.putpalette([0, 0, 0] * 3 + [10, 20, 30] + [0, 0, 0] * 252)
    files = {"grey.png": np.full((40, 60), 77, np.uint8), "sub/dir/rgba.png": rgba, "palette.png": palette,
             "grey16.png": grey16}
    anns = [box(i + 1, i + 1, [5, 5, 10, 10]) for i in range(4)]
    dataset = odd_split(tmp_path, train=False, files=files, annotations=anns)
    pixels = [(dataset.load(i, flip=False)[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
              for i in range(4)]
    assert all(p.shape == (40, 60, 3) for p in pixels)
    assert (pixels[0] == 77).all()
    assert (pixels[1] == [200, 0, 0]).all()                         # alpha dropped, colour kept
    assert (pixels[2] == [10, 20, 30]).all()                        # the palette's colour, not its index
    expected = np.floor(grey16 / 257 + 0.5).astype(np.uint8)         # 16 bits scaled to 8, rounded
    assert all(np.array_equal(pixels[3][..., c], expected) for c in range(3)) and pixels[3].max() > 240


def test_an_image_whose_size_disagrees_with_its_json_is_refused_when_read(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "height": 50, "width": 80},
              {"id": 2, "file_name": "b.png", "height": 40, "width": 60}]
    dataset = odd_split(tmp_path, images=images)
    with pytest.raises(utils.LocalUserError, match="a.png is 60x40 but .* says 80x50; fix its width/height"):
        dataset.load(0, flip=False)


def test_validation_categories_must_be_the_training_ones_and_unseen_classes_are_named(tmp_path):
    train = odd_split(tmp_path / "train", categories=[{"id": 1, "name": "one"}, {"id": 2, "name": "two"},
                                                      {"id": 3, "name": "three"}])
    val = odd_split(tmp_path / "val", train=False,
                    annotations=[box(1, 1, [5, 5, 9, 9], category=3), box(2, 2, [5, 5, 9, 9], category=1)],
                    categories=[{"id": 1, "name": "one"}, {"id": 2, "name": "two"}, {"id": 3, "name": "three"}])
    assert data.splits_note(train, val).startswith("note: 1 classes have validation boxes but no training box "
                                                    "(three)")
    assert data.splits_note(train, train) == ""
    other = odd_split(tmp_path / "other", train=False, categories=[{"id": 1, "name": "one"}, {"id": 2, "name": "two"},
                                                                   {"id": 4, "name": "four"}])
    with pytest.raises(utils.UserError, match=r"ids \[3\] only in the first, \[4\] only in the second"):
        data.splits_note(train, other)
    renamed = odd_split(tmp_path / "renamed", train=False, categories=[{"id": 1, "name": "one"},
                                                                       {"id": 2, "name": "deux"},
                                                                       {"id": 3, "name": "three"}])
    with pytest.raises(utils.UserError, match="category 2 is 'two' in the first, 'deux' in the second"):
        data.splits_note(train, renamed)


def test_training_on_odd_but_usable_data_logs_what_was_dropped_and_a_refusal_changes_nothing(tmp_path):
    """Through the CLI: odd images and boxes train and are counted; a refused split exits 2 in one line and leaves
    the run folder of an earlier run as it was."""
    rgba = np.zeros((40, 60, 4), np.uint8)
    rgba[..., 1] = 180
    files = {"sub/a.png": np.full((40, 60), 120, np.uint8), "b.png": rgba}
    anns = [box(1, 1, [5, 5, 20, 20]), box(2, 2, [45, 25, 30, 30], category=2), box(3, 2, [5, 5, 0, 5])]
    images, ann = odd_coco(tmp_path / "odd", files=files, annotations=anns)
    flags = ["--stage", "train", "--model", "fcos_r18", "--epochs", "1", "--eval-every", "0", "--batch-size", "2",
             "--workers", "0", "--warmup-iters", "1", "--train-images", images, "--train-ann", ann,
             "--val-images", images, "--val-ann", ann, "--min-size", "64", "--max-size", "96"]
    res = run(flags, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "train: 2 images, 2 classes; dropped 1 degenerate boxes, clipped 1 to the image" in res.stdout
    out = tmp_path / "runs" / "train_fcos_r18"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    write_coco(tmp_path / "odd" / "ann.json", [{"id": 1, "file_name": "b.png", "height": 40, "width": 60}] * 2, anns,
               [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}])
    resumed = flags + ["--epochs", "2", "--resume", str(out / "checkpoint.pth")]
    assert_user_error(run_here(resumed, tmp_path), "lists images id 1 more than once")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


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
    return data.build_loader(dataset, batch_size=4, train=False)


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


def copy_layout(shapes, dest):
    shutil.copytree(shapes, dest)
    return dest


def test_cli_bad_inputs_exit_2_with_one_line_and_write_nothing(shapes, cli_setup, tmp_path):
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
        (["--data-path", str(tmp_path / "nowhere")], "nowhere: no such directory"),
        (["--data-path", str(no_ann)], "instances_val2017.json not found"),
        (["--data-path", str(broken_json)], "is not valid JSON"),
        (["--data-path", str(not_coco)], "is not COCO format"),
        (["--data-path", str(missing_image)], "000000000002.jpg is missing"),
        (["--data-path", shapes, "--model", "yolo"], "unknown model 'yolo'"),
        (["--data-path", shapes, "--ckpt", str(not_ckpt)], "notes.pth: not a readable checkpoint"),
        (["--data-path", shapes, "--ckpt", str(tmp_path / "none.pth")], "none.pth: no such file"),
        (["--data-path", shapes, "--model", "retinanet_r18"], "does not fit this model"),
        (["--data-path", shapes, "--visualize", "2"], "--visualize needs --out"),
    ]
    for extra, message in cases:
        argv = ["--model", "fcos_r18", "--ckpt", str(ckpt), "--workers", "0", "--batch-size", "6"] + extra
        res = run_here(argv, os.getcwd(), main=ev.main)
        assert_user_error(res, message, ";")  # problem; fix
    assert ckpt.read_bytes() == ckpt_bytes and not_ckpt.read_text() == "hello"
    assert not [p for p in os.listdir(root) if p.endswith(".json")]


def test_cli_reads_the_model_name_from_model_pth_and_refuses_other_files(shapes, cli_setup, tmp_path, capsys):
    """model.pth records its model: --model may be left out, and a --model that disagrees is one line; a bare
    state dict needs --model; a resumable checkpoint.pth and an ake.pth are named as what they are."""
    _, ckpt = cli_setup
    state = torch.load(ckpt, weights_only=True)
    model_pth, resumable, ake_pth = tmp_path / "model.pth", tmp_path / "checkpoint.pth", tmp_path / "ake.pth"
    torch.save({"kind": utils.MODEL_KIND, "model": state, "model_name": "fcos_r18", "num_classes": 9,
                "args": {"min_size": 128, "max_size": 192}}, model_pth)
    torch.save({"kind": utils.CHECKPOINT_KIND, "stage": "distill", "run": "distill_fcos_r18",
                "model": {f"student.{k}": v for k, v in state.items()}}, resumable)
    torch.save({"kind": utils.AKE_FILE_KIND, "config": {}, "state_dict": {}}, ake_pth)
    common = ["--data-path", shapes, "--workers", "0", "--batch-size", "6"]
    metrics = ev.main(["--ckpt", str(model_pth)] + common)
    assert capsys.readouterr().out.startswith("fcos_r18 from") and set(ev.METRIC_NAMES) <= set(metrics)
    cases = [(["--ckpt", str(model_pth), "--model", "retinanet_r18"], "holds a fcos_r18; drop --model"),
             (["--ckpt", str(ckpt)], "bare state dict that records no model name; pass --model"),
             (["--ckpt", str(resumable)], "resumable training state of `distill distill_fcos_r18`"),
             (["--ckpt", str(ake_pth), "--model", "fcos_r18"], "an AKE file")]
    for argv, message in cases:
        assert_user_error(run_here(argv + common, os.getcwd(), main=ev.main), message)
    # a model.pth records its training categories: other data is refused, the same data evaluated
    categories = data.categories_of(shapes_split(shapes, "val", train=False, min_size=64, max_size=96))
    renamed = torch.load(model_pth, weights_only=True)
    for recorded, refused in ((categories, False), ([[1, "dog"]] + categories[1:], True)):
        torch.save(dict(renamed, categories=recorded), model_pth)
        if refused:
            assert_user_error(run_here(["--ckpt", str(model_pth)] + common, os.getcwd(), main=ev.main),
                              "category 1 is 'dog' in the first")
        else:
            assert set(ev.METRIC_NAMES) <= set(ev.main(["--ckpt", str(model_pth)] + common))
    torch.save(renamed, model_pth)
    # no data flag: the data and image size the checkpoint records, flag by flag (a flag given wins)
    recorded = torch.load(model_pth, weights_only=True)
    recorded["args"].update(data_path=shapes, min_size=64, max_size=96)
    torch.save(recorded, model_pth)
    ev.main(["--ckpt", str(model_pth), "--workers", "0", "--batch-size", "6"])
    written = json.loads((tmp_path / "model_eval.json").read_text())
    assert written["ann_file"] == os.path.join(shapes, "annotations", "instances_val2017.json")
    assert (written["min_size"], written["max_size"]) == (64, 96)
    args = ev.parse_args(["--ckpt", str(model_pth), "--max-size", "120"])
    ev.adopt_training_data(args, recorded["args"])
    assert (args.data_path, args.min_size, args.max_size) == (shapes, 64, 120)


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
    from torchvision.io import decode_png, read_file
    assert decode_png(read_file(str(tmp_path / "vis" / "000000000001.png"))).shape == (3, 3 * H, 3 * W)  # >= 384 px
    os.remove(root / "student_eval.json")


# ------------------------------------------------------------------------------------------ distributed

def _ddp_worker(rank, world_size, init_file, shapes, results_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        dataset = shapes_split(shapes, "val", train=False, min_size=64, max_size=96)
        loader = data.build_loader(dataset, batch_size=2, train=False, rank=rank, world_size=world_size)
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


# ====================================================================================================================
# the method (unikd.py)
# ====================================================================================================================


def random_gt(m, generator, min_side=0.02):
    """m valid GT boxes, cxcywh normalised, inside the image."""
    xy = torch.rand(m, 2, generator=generator)
    wh = min_side + torch.rand(m, 2, generator=generator) * (1 - min_side)
    x1y1 = xy * (1 - wh)
    return box_convert(torch.cat([x1y1, x1y1 + wh], 1), "xyxy", "cxcywh")


def random_targets(sizes, num_classes, generator):
    return [{"labels": torch.randint(0, num_classes, (m,), generator=generator),
             "boxes": random_gt(m, generator, 0.1)} for m in sizes]


def check_sample(gt, boxes, num_pos, n, alpha=0.6, beta=0.4):
    assert boxes.shape == (n, 4) and num_pos == min(len(gt), n)
    xyxy = box_convert(boxes, "cxcywh", "xyxy")
    gt_xyxy = box_convert(gt, "cxcywh", "xyxy")
    assert (xyxy >= -1e-6).all() and (xyxy <= 1 + 1e-6).all()
    assert (boxes[:, 2:] >= unikd.MIN_BOX_SIZE * (1 - 1e-3)).all()
    if num_pos:
        own = box_iou(xyxy[:num_pos], gt_xyxy[:num_pos]).diagonal()
        assert (own > alpha).all(), own.min()
    if len(gt) and num_pos < n:
        assert (box_iou(xyxy[num_pos:], gt_xyxy).amax(1) < beta).all()


# ----------------------------------------------------------------------------------------------------------------------
# sampler, Eq. (3)

def test_sampler_bounds_over_1000_draws():
    g = torch.Generator().manual_seed(0)
    for i in range(1000):
        m = int(torch.randint(0, 40, (1,), generator=g))
        gt = random_gt(m, g, min_side=0.005 if i % 2 else 0.05)
        n = 200 if i % 3 else 50
        boxes, num_pos = unikd.sample_query_boxes(gt, n, generator=g)
        check_sample(gt, boxes, num_pos, n)


def test_sampler_keeps_its_bounds_for_adversarial_gts():
    """A GT covering the image, GTs tiling it, GTs below the minimum box size, and all of them together (the
    fallbacks themselves: test_sampler_fallbacks_keep_the_bounds)."""
    g = torch.Generator().manual_seed(1)
    full = torch.tensor([[0.5, 0.5, 1.0, 1.0]])                            # one GT = the whole image
    tiles = torch.stack(torch.meshgrid(torch.arange(10) / 10 + 0.05, torch.arange(10) / 10 + 0.05, indexing="ij"), -1)
    tiles = torch.cat([tiles.reshape(-1, 2), torch.full((100, 2), 0.1)], 1)  # 10x10 GTs tiling the image
    tiny = torch.tensor([[0.3, 0.3, 0.002, 0.002], [0.7, 0.2, 0.0015, 0.003]])  # jitter of tiny GTs is hard
    for gt in (full, tiles, tiny, torch.cat([full, tiles[:20], tiny])):
        for _ in range(5):
            boxes, num_pos = unikd.sample_query_boxes(gt, 200, generator=g)
            check_sample(gt, boxes, num_pos, 200)


def test_sampler_fallbacks_keep_the_bounds(monkeypatch):
    g = torch.Generator().manual_seed(7)
    gt = random_gt(30, g, min_side=0.05)
    # alpha 0.97: most jitters fail and rows fall back to the GT box itself
    boxes, num_pos = unikd.sample_query_boxes(gt, 200, alpha=0.97, generator=g)
    check_sample(gt, boxes, num_pos, 200, alpha=0.97)
    assert (boxes[:num_pos] == gt).all(1).any()
    # no rejection rounds at all: every background row comes from the fallback grid of tiny boxes
    monkeypatch.setattr(unikd, "BACKGROUND_ROUNDS", 0)
    for gt in (gt, torch.tensor([[0.5, 0.5, 1.0, 1.0]]), torch.zeros(0, 4)):
        boxes, num_pos = unikd.sample_query_boxes(gt, 200, generator=g)
        check_sample(gt, boxes, num_pos, 200)
        assert torch.allclose(boxes[num_pos:, 2:], torch.tensor(unikd.MIN_BOX_SIZE), atol=1e-6)


def test_sampler_no_gt_and_more_gt_than_queries():
    g = torch.Generator().manual_seed(2)
    boxes, num_pos = unikd.sample_query_boxes(torch.zeros(0, 4), 200, generator=g)
    assert num_pos == 0
    check_sample(torch.zeros(0, 4), boxes, num_pos, 200)
    gt = random_gt(250, g)
    boxes, num_pos = unikd.sample_query_boxes(gt, 200, generator=g)
    assert num_pos == 200                                                   # the first 200 GTs, row i <-> GT i
    check_sample(gt, boxes, num_pos, 200)


def test_sampler_is_deterministic_under_a_generator():
    gt = random_gt(7, torch.Generator().manual_seed(3))
    a = unikd.sample_query_boxes(gt, 200, generator=torch.Generator().manual_seed(5))
    b = unikd.sample_query_boxes(gt, 200, generator=torch.Generator().manual_seed(5))
    c = unikd.sample_query_boxes(gt, 200, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert not torch.equal(a[0], c[0])


# ----------------------------------------------------------------------------------------------------------------------
# matcher and set loss

def pair_cost(logit, box, label, gt_box, alpha=0.25, gamma=2.0, wc=2.0, wb=5.0, wg=2.0):
    """Deformable DETR's matching cost of one prediction and one GT, written out by hand."""
    p = 1 / (1 + math.exp(-logit[label]))
    cls = alpha * (1 - p) ** gamma * -math.log(p + 1e-8) - (1 - alpha) * p ** gamma * -math.log(1 - p + 1e-8)
    l1 = sum(abs(a - b) for a, b in zip(box, gt_box))
    giou = generalized_box_iou(box_convert(torch.tensor([box]), "cxcywh", "xyxy"),
                               box_convert(torch.tensor([gt_box]), "cxcywh", "xyxy")).item()
    return wc * cls + wb * l1 - wg * giou


def test_matcher_total_cost_equals_brute_force_minimum():
    g = torch.Generator().manual_seed(4)
    matcher = unikd.HungarianMatcher()
    for trial in range(10):
        n, k = 5, 3
        sizes = [int(s) for s in torch.randint(0, n + 1, (3,), generator=g)]
        targets = random_targets(sizes, k, g)
        logits = torch.randn(3, n, k, generator=g) * 2
        boxes = random_gt(3 * n, g).view(3, n, 4)
        indices = matcher(logits, boxes, targets)
        for b, (t, (src, tgt)) in enumerate(zip(targets, indices)):
            m = len(t["boxes"])
            cost = [[pair_cost(logits[b, i].tolist(), boxes[b, i].tolist(), int(t["labels"][j]), t["boxes"][j].tolist())
                     for j in range(m)] for i in range(n)]
            assert len(src) == m and len(set(src.tolist())) == m and sorted(tgt.tolist()) == list(range(m))
            got = sum(cost[i][j] for i, j in zip(src.tolist(), tgt.tolist()))
            best = min((sum(cost[perm[j]][j] for j in range(m)) for perm in itertools.permutations(range(n), m)),
                       default=0.0)
            assert got == pytest.approx(best, abs=1e-4)


def test_set_loss_equals_explicit_formula():
    g = torch.Generator().manual_seed(5)
    targets = random_targets([2, 0, 3], 4, g)
    logits, boxes = torch.randn(3, 6, 4, generator=g), random_gt(18, g).view(3, 6, 4)
    indices = [(torch.tensor([4, 1]), torch.tensor([1, 0])), (torch.tensor([], dtype=torch.int64),) * 2,
               (torch.tensor([0, 2, 5]), torch.tensor([2, 0, 1]))]
    got = unikd.set_loss(logits, boxes, targets, indices, num_boxes=5.0)
    onehot, l1, giou = torch.zeros(3, 6, 4), 0.0, 0.0
    for b, (src, tgt) in enumerate(indices):
        for i, j in zip(src.tolist(), tgt.tolist()):
            onehot[b, i, targets[b]["labels"][j]] = 1
            l1 += (boxes[b, i] - targets[b]["boxes"][j]).abs().sum()
            giou += 1 - generalized_box_iou(box_convert(boxes[b, i:i + 1], "cxcywh", "xyxy"),
                                            box_convert(targets[b]["boxes"][j:j + 1], "cxcywh", "xyxy"))[0, 0]
    focal = sigmoid_focal_loss(logits, onehot, reduction="sum").item()
    assert got["cls"].item() == pytest.approx(2 * focal / 5, rel=1e-5)
    assert got["l1"].item() == pytest.approx(5 * l1.item() / 5, rel=1e-5)
    assert got["giou"].item() == pytest.approx(2 * giou.item() / 5, rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# losses of the distillation stage

def test_decoupled_mse_equals_loop():
    g = torch.Generator().manual_seed(6)
    zs, zt = torch.randn(3, 7, 5, generator=g), torch.randn(3, 7, 5, generator=g)
    mask = torch.rand(3, 7, generator=g) < 0.3
    pos, neg = [], []
    for b in range(3):
        for i in range(7):
            mse = sum((zs[b, i, c] - zt[b, i, c]).item() ** 2 for c in range(5)) / 5
            (pos if mask[b, i] else neg).append(mse)
    expect = sum(pos) / len(pos) + sum(neg) / len(neg)
    assert unikd.decoupled_mse(zs, zt, mask).item() == pytest.approx(expect, rel=1e-5)
    all_neg = sum(sum((zs[b, i] - zt[b, i]).pow(2).mean().item() for i in range(7)) for b in range(3)) / 21
    assert unikd.decoupled_mse(zs, zt, torch.zeros(3, 7, dtype=torch.bool)).item() == pytest.approx(all_neg, rel=1e-5)


def test_fitnet_loss_equals_loop():
    g = torch.Generator().manual_seed(7)
    shapes = [(8, 10), (4, 5), (2, 3), (1, 2)]
    ft = [torch.randn(2, 3, h, w, generator=g) for h, w in shapes]
    fs = [torch.randn(2, 3, h, w, generator=g) for h, w in shapes]
    targets = random_targets([2, 1], 3, g)
    total, count = 0.0, 0
    for t, s in zip(ft, fs):
        _, c, h, w = t.shape
        for b in range(2):
            boxes = box_convert(targets[b]["boxes"], "cxcywh", "xyxy").tolist()
            for i in range(h):
                for j in range(w):
                    x, y = (j + 0.5) / w, (i + 0.5) / h
                    if any(x1 <= x <= x2 and y1 <= y <= y2 for x1, y1, x2, y2 in boxes):
                        total += (s[b, :, i, j] - t[b, :, i, j]).pow(2).sum().item()
                        count += c
    assert count > 0
    assert unikd.fitnet_loss(ft, fs, targets).item() == pytest.approx(total / count, rel=1e-5)
    assert unikd.fitnet_loss(ft, fs, random_targets([0, 0], 3, g)).item() == 0


# ----------------------------------------------------------------------------------------------------------------------
# AKE, UniKD, adapter

SMALL = dict(d_model=32, n_heads=4, num_queries=20, dim_ffn=64)
SHAPES = [(8, 8), (4, 4), (2, 2), (1, 1)]


def feats(batch, generator, channels=32):
    return [torch.randn(batch, channels, h, w, generator=generator) for h, w in SHAPES]


def test_ake_shapes_and_sampling():
    g = torch.Generator().manual_seed(8)
    model = unikd.UniKD(num_classes=3, **SMALL)
    f = feats(2, g)
    boxes, pos_mask = model.sample_boxes(random_targets([3, 1], 3, g), "cpu", g)
    logit = lambda p: torch.log(p / (1 - p))  # noqa: E731  (the inverse of the sigmoid, written out)
    for ake, b in ((model.ake_ct, None), (model.ake_pos, boxes)):
        q = ake.generate_queries(f, b)
        assert q.tgt.shape == (2, 20, 32) and q.reference.shape == (2, 20, 2 if b is None else 4)
        # references: the sampled boxes B^ themselves; for content queries sigmoid(Linear(query_pos)), per image alike
        want = b if b is not None else F.linear(ake.query_embed.weight[:, :32], ake.reference_points.weight,
                                                ake.reference_points.bias).sigmoid().expand(2, -1, -1)
        torch.testing.assert_close(q.reference, want)
        z, sampling = ake.extract(q, f, return_sampling=True)
        assert z.shape == (2, 20, 32) and len(sampling) == 1 and sampling[0][0].shape == (2, 20, 4, 4, 4, 2)
        logits, pred = ake.head(z, q)
        assert logits.shape == (2, 20, 3) and pred.shape == (2, 20, 4)
        # the box head's last layer starts at zero: a box reference is the box, a point one has w = h = sigmoid(0)
        start = q.reference if b is not None else torch.cat([q.reference, torch.full_like(q.reference, 0.5)], -1)
        torch.testing.assert_close(pred, start)
        d = torch.tensor([0.3, -0.2, 0.1, 0.4])  # a refinement: added in inverse-sigmoid space to the reference
        with torch.no_grad():
            ake.box_head.layers[-1].bias.copy_(d)
        want = (logit(q.reference) + d).sigmoid() if b is not None else \
            torch.cat([(logit(q.reference) + d[:2]).sigmoid(), d[2:].sigmoid().expand(2, 20, 2)], -1)
        torch.testing.assert_close(ake.head(z, q)[1], want)
    assert pos_mask.sum(1).tolist() == [3, 1]


def plain_self_attention(mha, q, v):
    """softmax(Q K^T / sqrt(d)) V per head and image, written out from nn.MultiheadAttention's weights: q (= keys), v
    [B, N, C] -> [B, N, C]."""
    B, N, C = q.shape
    H = mha.num_heads
    (wq, wk, wv), (bq, bk, bv) = mha.in_proj_weight.chunk(3), mha.in_proj_bias.chunk(3)
    heads = lambda x: x.reshape(B, N, H, C // H).transpose(1, 2)  # noqa: E731  [B, H, N, C/H]
    Q, K, V = heads(F.linear(q, wq, bq)), heads(F.linear(q, wk, bk)), heads(F.linear(v, wv, bv))
    A = (Q @ K.transpose(-1, -2) / math.sqrt(C // H)).softmax(-1)                 # [B, H, N, N]
    return F.linear((A @ V).transpose(1, 2).reshape(B, N, C), mha.out_proj.weight, mha.out_proj.bias)


def test_decoder_self_attention_is_per_image_attention_in_fp32_and_under_cpu_bf16_autocast():
    """DecoderLayer.self_attention (nn.MultiheadAttention, sequence-first inside) against attention written out per
    image: queries that differ per image and queries shared by the images (expanded, as the content AKE's); values
    that are the queries (one packed projection) or not; under bf16 autocast within bf16's precision."""
    g = torch.Generator().manual_seed(31)
    torch.manual_seed(31)
    layer = unikd.DecoderLayer(d_model=32, n_heads=4, dim_ffn=64).eval()
    for shared in (True, False):
        q = torch.randn(1 if shared else 3, 7, 32, generator=g).expand(3, -1, -1)
        for v in (q, torch.randn(3, 7, 32, generator=g)):
            with torch.no_grad():
                want = plain_self_attention(layer.self_attn, q, v)
                torch.testing.assert_close(layer.self_attention(q, v), want, rtol=1e-5, atol=1e-5)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    got = layer.self_attention(q, v)
                assert got.dtype == torch.bfloat16
                # bf16 keeps 8 significant bits: a few roundings of ~0.4% each along the chain of products
                torch.testing.assert_close(got.float(), want, rtol=0, atol=0.02 * want.abs().max().item())


def plain_decoder_layer(layer, tgt, pos, reference, feats):
    """Deformable DETR's decoder layer written out op by op, with grid_sample doing the sampling."""
    B, N, C = tgt.shape
    H, L, P = layer.cross_attn.n_heads, layer.cross_attn.n_levels, layer.cross_attn.n_points
    value_in, shapes, starts = flatten_levels(feats)
    x = layer.norm_self(tgt + plain_self_attention(layer.self_attn, tgt + pos, tgt))
    query = x + pos
    offsets = F.linear(query, layer.cross_attn.sampling_offsets.weight, layer.cross_attn.sampling_offsets.bias)
    offsets = offsets.view(B, N, H, L, P, 2)
    weights = F.softmax(F.linear(query, layer.cross_attn.attention_weights.weight,
                                 layer.cross_attn.attention_weights.bias).view(B, N, H, L * P), -1)
    if reference.shape[-1] == 2:   # pixels of each level
        loc = reference.view(B, N, 1, 1, 1, 2) + offsets / torch.tensor([[w, h] for h, w in SHAPES[:L]]).view(L, 1, 2)
    else:                          # fractions of half the box
        loc = reference[..., :2].view(B, N, 1, 1, 1, 2) + offsets / P * reference[..., 2:].view(B, N, 1, 1, 1, 2) / 2
    value = F.linear(value_in, layer.cross_attn.value_proj.weight, layer.cross_attn.value_proj.bias)
    out = msda.ms_deform_attn_grid_sample(value.view(B, -1, H, C // H), shapes, starts, loc,
                                          weights.view(B, N, H, L, P))
    x = layer.norm_cross(x + F.linear(out, layer.cross_attn.output_proj.weight, layer.cross_attn.output_proj.bias))
    return layer.norm_ffn(x + layer.ffn(x))


def test_decoder_layer_matches_a_plain_layer():
    """forward (self-attention -> MSDA cross-attention -> FFN) against the op-by-op layer, on two sets of levels read
    with the same queries (teacher and student, as Eq. 7 reads them), for point and box references, with queries that
    differ per image and queries shared by the images (the content AKE's); return_sampling changes nothing else."""
    g = torch.Generator().manual_seed(30)
    torch.manual_seed(30)
    layer = unikd.DecoderLayer(d_model=32, n_heads=4, dim_ffn=64).eval()
    for p in layer.cross_attn.parameters():   # away from the zero offset/attention init
        torch.nn.init.normal_(p, std=0.3)
    teacher, student = feats(2, g), feats(2, g)
    memory = lambda f: unikd.FeatureMemory(*flatten_levels(f))  # noqa: E731
    for ref_dim, shared in itertools.product((2, 4), (True, False)):
        n = 1 if shared else 2
        tgt, pos = torch.randn(n, 5, 32, generator=g), torch.randn(n, 5, 32, generator=g)
        reference = torch.rand(n, 5, ref_dim, generator=g) * 0.5 + 0.25
        batch = [t.expand(2, -1, -1) for t in (tgt, pos, reference)]
        with torch.no_grad():
            for f in (teacher, student):
                want = plain_decoder_layer(layer, *batch, f)
                torch.testing.assert_close(layer(*batch, memory(f)), want, rtol=1e-4, atol=1e-5)
                out, (locations, weights) = layer(*batch, memory(f), return_sampling=True)
                torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
                assert locations.shape == (2, 5, 4, 4, 4, 2) and weights.shape == (2, 5, 4, 4, 4)
                torch.testing.assert_close(weights.sum((-2, -1)), torch.ones(2, 5, 4))


def brute_force_matching(cost, n):
    """cost [n, m] of one image -> (query indices, GT indices) of the cheapest one-to-one pairing of min(n, m) pairs,
    found by trying every pairing."""
    m = cost.shape[1]
    pairings = ([(range(n), gts) for gts in itertools.permutations(range(m), n)] if m >= n else
                [(queries, range(m)) for queries in itertools.permutations(range(n), m)])
    best = min(pairings, key=lambda qg: sum(cost[q, j].item() for q, j in zip(*qg)))
    return tuple(torch.tensor(list(x)) for x in best)


def test_pretrain_loss_is_eq6_with_optimal_matching_for_content_and_row_i_for_positional():
    """Eq. (6) for both AKEs assembled here: the content AKE's set loss on the assignment a brute force over all
    one-to-one pairings finds, normalised by the GT count; the positional AKE's on row i <-> GT i for the first
    min(M, N) GTs, normalised by that count (an image with more GTs than queries makes the two differ)."""
    g = torch.Generator().manual_seed(14)
    n = 3
    model = unikd.UniKD(num_classes=3, **dict(SMALL, num_queries=n))
    tf, targets = feats(2, g), random_targets([4, 2], 3, g)
    with torch.no_grad():
        losses = model.pretrain_loss(tf, targets, torch.Generator().manual_seed(3))
        gen = torch.Generator().manual_seed(3)
        boxes = torch.stack([unikd.sample_query_boxes(t["boxes"], n, generator=gen)[0] for t in targets])
        q_ct, q_pos = model.ake_ct.generate_queries(tf), model.ake_pos.generate_queries(tf, boxes)
        out_ct = model.ake_ct.head(model.ake_ct.extract(q_ct, tf), q_ct)
        out_pos = model.ake_pos.head(model.ake_pos.extract(q_pos, tf), q_pos)
        cost = model.matcher.cost_matrix(*out_ct, targets)                                 # [B, N, sum M]
    matched = [brute_force_matching(c[b], n) for b, c in enumerate(cost.split([4, 2], -1))]
    row_i = [(torch.arange(k), torch.arange(k)) for k in (3, 2)]
    expected = {**{f"loss_ct_{k}": v for k, v in unikd.set_loss(*out_ct, targets, matched, 6).items()},
                **{f"loss_pos_{k}": v for k, v in unikd.set_loss(*out_pos, targets, row_i, 5).items()}}
    assert losses.keys() == expected.keys()
    for k in expected:
        assert losses[k].item() == pytest.approx(expected[k].item(), rel=1e-5), k


def test_ake_pretraining_overfits_one_batch():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(9)
    model = unikd.UniKD(num_classes=3, **SMALL)
    f, targets = feats(2, g), random_targets([3, 2], 3, g)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = None
    for step in range(150):
        # a fixed B^ (same seed every step): overfitting is about the AKE, not about fresh jitters
        loss = sum(model.pretrain_loss(f, targets, torch.Generator().manual_seed(0)).values())
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 10, (first, loss.item())


def frozen_unikd():
    # untrained weights suffice: the distill path must be correct for any AKE
    return unikd.UniKD(num_classes=3, **SMALL).freeze()


def test_distill_step_updates_only_student_and_adapter():
    g = torch.Generator().manual_seed(10)
    model = frozen_unikd()
    model.train()
    assert not model.training and not model.ake_ct.training                  # frozen AKE stays in eval mode
    adapter = unikd.Adapter(16, d_model=32, num_layers=2, n_heads=4, dim_ffn=64)
    student = torch.nn.Conv2d(16, 16, 3, padding=1)
    ake_before = {k: v.clone() for k, v in model.state_dict().items()}
    phi_before = {k: v.clone() for k, v in adapter.state_dict().items()}
    student_before = student.weight.clone()
    opt = torch.optim.SGD(list(adapter.parameters()) + list(student.parameters()), lr=0.1)
    teacher_feats, student_in, targets = feats(2, g), feats(2, g, 16), random_targets([2, 1], 3, g)
    # two steps: MSDA starts with zero offset/attention projections (Deformable DETR's init), so the gradient into
    # the adapter's queries (and its level embedding) is exactly zero in the first step
    for _ in range(2):
        losses = model.distill_loss(teacher_feats, adapter([student(x) for x in student_in]), targets)
        assert set(losses) == {"loss_kd_ct", "loss_kd_pos"} and all(v.item() > 0 for v in losses.values())
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, ake_before[k]) for k, v in model.state_dict().items())
    assert all(not torch.equal(v, phi_before[k]) for k, v in adapter.state_dict().items())
    assert not torch.equal(student.weight, student_before)


def test_identical_features_with_identity_adapter_give_zero_kd_loss():
    g = torch.Generator().manual_seed(11)
    model = frozen_unikd()
    adapter = unikd.Adapter(32, d_model=32, num_layers=0)
    with torch.no_grad():
        adapter.proj.weight.copy_(torch.eye(32)[:, :, None, None])
        adapter.proj.bias.zero_()
    f = feats(2, g)
    losses = model.distill_loss(f, adapter(f), random_targets([3, 0], 3, g))
    assert all(v.item() == 0 for v in losses.values())


def test_each_images_knowledge_computed_alone_is_its_row_of_the_batchs():
    """What makes a per-image store valid: the teacher side of Eq. (7) for one image alone (the same generator, drawn
    in the same image order) equals that image's row of the batch's, and the rows stacked back give the batch's loss."""
    g = torch.Generator().manual_seed(12)
    model = frozen_unikd()
    tf, sf, targets = feats(2, g), feats(2, g), random_targets([2, 3], 3, g)
    batch = model.teacher_knowledge(tf, targets, torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(1)
    alone = [model.teacher_knowledge([f[i:i + 1] for f in tf], targets[i:i + 1], generator) for i in range(2)]
    for k in unikd.Knowledge._fields:
        for i in range(2):
            torch.testing.assert_close(getattr(alone[i], k)[0], getattr(batch, k)[i], rtol=1e-5, atol=1e-6)
    stacked = unikd.Knowledge(*(torch.cat([getattr(a, k) for a in alone]) for k in unikd.Knowledge._fields))
    online = model.distill_loss(tf, sf, targets, generator=torch.Generator().manual_seed(1))
    offline = model.student_loss(stacked, sf)
    for k in online:
        torch.testing.assert_close(offline[k], online[k], rtol=1e-5, atol=1e-6)
    assert batch.pos_mask_pos.sum(1).tolist() == [2, 3] and batch.pos_mask_ct.sum(1).tolist() == [2, 3]


def test_kd_loss_is_eq7_with_each_akes_positives_and_weight():
    """Eq. (7)-(8) assembled here from their parts: both sides read with the queries and references generated from
    F^T (Eq. 3-4), each AKE's Eq. (8) written as a loop over its own positives -- content: the queries that a
    brute-force assignment of the teacher's predictions FFN(z_ct^T) to the GTs picks; positional: the rows i < N' of
    B^ -- and each term weighted by its own lambda."""
    g = torch.Generator().manual_seed(13)
    model = frozen_unikd()
    tf, sf, targets = feats(2, g), feats(2, g), random_targets([2, 1], 3, g)
    with torch.no_grad():
        losses = model.student_loss(model.teacher_knowledge(tf, targets, torch.Generator().manual_seed(2)), sf,
                                    lambda_ct=3.0, lambda_pos=7.0)
        gen = torch.Generator().manual_seed(2)
        sampled = [unikd.sample_query_boxes(t["boxes"], SMALL["num_queries"], generator=gen) for t in targets]
        q_ct = model.ake_ct.generate_queries(tf)
        q_pos = model.ake_pos.generate_queries(tf, torch.stack([b for b, _ in sampled]))
        z_ct_t, z_pos_t = model.ake_ct.extract(q_ct, tf), model.ake_pos.extract(q_pos, tf)
        z_ct_s, z_pos_s = model.ake_ct.extract(q_ct, sf), model.ake_pos.extract(q_pos, sf)
        cost = model.matcher.cost_matrix(*model.ake_ct.head(z_ct_t, q_ct), targets)     # [B, N, sum M]
    n = SMALL["num_queries"]
    pos_ct, pos_pos = torch.zeros(2, n, dtype=torch.bool), torch.zeros(2, n, dtype=torch.bool)
    for b, c in enumerate(cost.split([2, 1], -1)):
        pos_ct[b, brute_force_matching(c[b], n)[0]] = True
        pos_pos[b, :sampled[b][1]] = True

    def eq8(z_s, z_t, positive):
        per_query = {True: [], False: []}
        for b in range(z_s.shape[0]):
            for i in range(z_s.shape[1]):
                per_query[bool(positive[b, i])].append(((z_s[b, i] - z_t[b, i]) ** 2).mean().item())
        return sum(sum(v) / len(v) for v in per_query.values() if v)

    assert pos_ct.sum().item() == 3 and pos_pos.sum().item() == 3
    assert losses["loss_kd_ct"].item() == pytest.approx(3.0 * eq8(z_ct_s, z_ct_t, pos_ct), rel=1e-5)
    assert losses["loss_kd_pos"].item() == pytest.approx(7.0 * eq8(z_pos_s, z_pos_t, pos_pos), rel=1e-5)


def test_attention_in_image_share_in_closed_forms():
    """Zero sampling offsets put every sample on its query's reference: the in-image share is then the share of
    references inside the image; offsets far beyond the maps leave none inside."""
    g = torch.Generator().manual_seed(3)
    akes = unikd.UniKD(num_classes=3, num_queries=12, d_model=32, n_heads=4, dim_ffn=64).eval()
    levels, targets = feats(2, g), random_targets([2, 3], 3, g)

    def set_offsets(value):
        for m in akes.modules():
            if isinstance(m, MSDeformAttn):
                torch.nn.init.zeros_(m.sampling_offsets.weight)
                torch.nn.init.constant_(m.sampling_offsets.bias, value)
        knowledge = akes.teacher_knowledge(levels, targets, torch.Generator().manual_seed(0))
        return knowledge, lambda extent: [a / b for a, b in ev.attention_mass_in_image(akes, levels, knowledge, extent)]
    knowledge, share = set_offsets(0.0)
    assert share(torch.ones(2, 2)) == pytest.approx([1.0, 1.0])
    left_half = torch.tensor([[0.5, 1.0], [0.5, 1.0]])  # the image fills the left half of the padded tensor
    expected = [(knowledge.reference_ct[..., 0] < 0.5).float().mean().item(),
                (knowledge.boxes[..., 0] < 0.5).float().mean().item()]
    assert 0 < expected[0] < 1 and share(left_half) == pytest.approx(expected)
    _, share = set_offsets(1e3)
    assert share(torch.ones(2, 2)) == [0.0, 0.0]

def plain_adapter(adapter, levels):
    """phi written out: the 1x1 projection, then per layer every pixel of every level queries MSDA (grid_sample doing
    the sampling) with its own centre ((j + 0.5) / W_l, (i + 0.5) / H_l) as reference on all levels and its level's
    embedding as position; residual and LayerNorm, then the FFN where the layer has one."""
    x = [F.conv2d(f, adapter.proj.weight, adapter.proj.bias) for f in levels]
    B, C = x[0].shape[:2]
    hw = [tuple(f.shape[-2:]) for f in x]
    src = torch.cat([f.flatten(2).transpose(1, 2) for f in x], 1)                        # [B, S, C]
    S = src.shape[1]
    pos = torch.cat([e.expand(h * w, C) for e, (h, w) in zip(adapter.level_embed, hw)])
    ref = torch.tensor([[(j + 0.5) / w, (i + 0.5) / h] for h, w in hw for i in range(h) for j in range(w)])
    shapes = torch.tensor(hw)
    starts = torch.tensor([0] + list(itertools.accumulate(h * w for h, w in hw))[:-1])
    for layer in adapter.layers:
        a = layer.self_attn
        H, L, P = a.n_heads, a.n_levels, a.n_points
        q = src + pos
        offsets = F.linear(q, a.sampling_offsets.weight, a.sampling_offsets.bias).view(B, S, H, L, P, 2)
        weights = F.softmax(F.linear(q, a.attention_weights.weight, a.attention_weights.bias).view(B, S, H, L * P), -1)
        pixels = torch.tensor([[w, h] for h, w in hw], dtype=torch.float32).view(1, 1, 1, L, 1, 2)
        loc = ref.view(1, S, 1, 1, 1, 2) + offsets / pixels
        value = F.linear(src, a.value_proj.weight, a.value_proj.bias).view(B, S, H, C // H)
        sampled = msda.ms_deform_attn_grid_sample(value, shapes, starts, loc, weights.view(B, S, H, L, P))
        src = layer.norm_attn(src + F.linear(sampled, a.output_proj.weight, a.output_proj.bias))
        if layer.ffn is not None:
            src = layer.norm_ffn(src + layer.ffn(src))
    return [s.transpose(1, 2).reshape(B, C, h, w) for s, (h, w) in zip(src.split([h * w for h, w in hw], 1), hw)]


@pytest.mark.parametrize("dim_ffn", [0, 64])   # phi's default (no FFN) and Deformable DETR's encoder layer
def test_adapter_equals_phi_written_out(dim_ffn):
    g = torch.Generator().manual_seed(13)
    torch.manual_seed(13)
    adapter = unikd.Adapter(16, d_model=32, num_layers=2, n_heads=4, dim_ffn=dim_ffn)
    for layer in adapter.layers:   # away from the zero offset/attention init, so where each pixel reads matters
        for p in layer.self_attn.parameters():
            torch.nn.init.normal_(p, std=0.3)
    shapes = [(6, 8), (3, 4), (2, 2), (1, 2)]   # not square: x and y must not be swapped
    levels = [torch.randn(2, 16, h, w, generator=g) for h, w in shapes]
    with torch.no_grad():
        out, want = adapter(levels), plain_adapter(adapter, levels)
    assert [tuple(o.shape) for o in out] == [(2, 32, h, w) for h, w in shapes]
    for o, w in zip(out, want):
        torch.testing.assert_close(o, w, rtol=1e-4, atol=1e-5)


def test_postprocess_topk_over_queries_and_classes():
    g = torch.Generator().manual_seed(14)
    logits, boxes = torch.randn(2, 5, 3, generator=g), random_gt(10, g).view(2, 5, 4)
    out = unikd.postprocess(logits, boxes, [(100, 200), (50, 60)], topk=4)
    for b, (h, w) in enumerate([(100, 200), (50, 60)]):
        pairs = sorted(((logits[b, i, c].sigmoid().item(), i, c) for i in range(5) for c in range(3)), reverse=True)[:4]
        assert out[b]["scores"].tolist() == pytest.approx([p[0] for p in pairs])
        assert out[b]["labels"].tolist() == [p[2] for p in pairs]
        expect = box_convert(boxes[b, [p[1] for p in pairs]], "cxcywh", "xyxy") * torch.tensor([w, h, w, h])
        assert torch.allclose(out[b]["boxes"], expect)


def layer_params(c, ffn, levels=4, heads=8, points=4, self_attn=True):
    """Closed-form parameter count of one Deformable DETR layer."""
    samples = heads * levels * points
    msda = (c * samples * 2 + samples * 2) + (c * samples + samples) + 2 * (c * c + c)
    mha = 4 * c * c + 4 * c if self_attn else 0
    return msda + mha + (c * ffn + ffn + ffn * c + c) + (3 if self_attn else 2) * 2 * c


def test_parameter_counts_at_defaults():
    counts = unikd.count_parameters(unikd.UniKD(num_classes=80))
    c, n, k = 256, 200, 80
    common = 2 * layer_params(c, 1024) + 4 * c + (c * k + k) + 2 * (c * c + c) + (c * 4 + 4)
    assert counts["ake_ct"] == common + n * 2 * c + (2 * c + 2)
    assert counts["ake_pos"] == common + (4 * c + c)
    heads = (c * k + k) + 2 * (c * c + c) + (c * 4 + 4)   # class head + box MLP, per AKE: pretraining only
    assert counts["total_without_heads"] == counts["ake_ct"] + counts["ake_pos"] - 2 * heads


# ----------------------------------------------------------------------------------------------------------------------
# the README's copy-paste snippet, run verbatim against a toy teacher/student of "another codebase"

def readme_snippet():
    """The python block that follows '<!-- snippet: two-stages -->' in README.md."""
    text = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")).read()
    block = text.split("<!-- snippet: two-stages -->", 1)[1]
    return block.split("```python\n", 1)[1].split("```", 1)[0]


class ToyFPN(torch.nn.Module):
    """4 levels at strides 8, 16, 32, 64 with 256 channels, and a stand-in detection loss."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 256, 8, stride=8)

    def levels(self, images):
        x = self.stem(images)
        return [x, F.avg_pool2d(x, 2), F.avg_pool2d(x, 4), F.avg_pool2d(x, 8)]

    def forward(self, images, targets):
        feats = self.levels(images)
        return feats[-1].pow(2).mean(), feats


def test_readme_snippet_runs_verbatim():
    g = torch.Generator().manual_seed(15)
    teacher, student = ToyFPN().eval(), ToyFPN()
    loader = [(torch.rand(2, 3, 64, 64, generator=g), random_targets([2, 1], 3, g)) for _ in range(2)]
    namespace = dict(K=3, loader=loader, teacher_fpn=teacher.levels, student=student)
    snippet = readme_snippet()
    assert len(snippet.strip().splitlines()) <= 20
    exec(snippet, namespace)
    assert math.isfinite(namespace["loss"].item()) and all(p.grad is None for p in namespace["ake"].parameters())


def test_unikd_and_its_kernel_file_copied_alone_run_both_stages(tmp_path):
    """The promise of the two copy-me files: unikd.py + deform_attn_triton.py alone in a folder import (nothing else of
    this repository is importable there) and run README's snippet, both stages."""
    for name in ("unikd.py", "deform_attn_triton.py"):
        shutil.copy(os.path.join(HERE, name), tmp_path / name)
    script = "\n".join([
        "import importlib.util, math, torch", "import torch.nn.functional as F",
        "from torchvision.ops import box_convert",
        "assert all(importlib.util.find_spec(m) is None for m in ('detectors', 'train', 'data', 'utils'))",
        inspect.getsource(random_gt), inspect.getsource(random_targets), inspect.getsource(ToyFPN),
        "g = torch.Generator().manual_seed(15)", "teacher, student = ToyFPN().eval(), ToyFPN()",
        "loader = [(torch.rand(2, 3, 64, 64, generator=g), random_targets([2, 1], 3, g)) for _ in range(2)]",
        "K, teacher_fpn = 3, teacher.levels", readme_snippet(),
        "assert math.isfinite(loss.item()) and all(p.grad is None for p in ake.parameters())", "print('both stages ran')"])
    (tmp_path / "use_unikd.py").write_text(script)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    proc = subprocess.run([sys.executable, "-E", "-s", "use_unikd.py"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "both stages ran" in proc.stdout, proc.stderr[-3000:]


# ====================================================================================================================
# the stages (train.py)
# ====================================================================================================================

REPO = HERE
TRAIN = os.path.join(REPO, "train.py")
# a handful of 64 px images, one process per core: the smallest setting that runs every code path
TINY = ["--shapes-train", "8", "--shapes-val", "4", "--shapes-size", "64", "--batch-size", "2", "--workers", "0",
        "--print-freq", "1", "--warmup-iters", "2"]


def run(args, cwd, torchrun=None, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    cmd = [sys.executable, TRAIN] if torchrun is None else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}", TRAIN]
    return subprocess.run(cmd + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def run_here(args, cwd, main=None):
    """What run() returns, from train.py's main (or the main given) in this process: without an interpreter's
    start-up (~4 s), for commands refused before anything trains and for short ones that write files. Each test of
    refusals keeps one through run(), the real exit path."""
    import train
    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            (main or train.main)(args)
            code = 0
        except SystemExit as e:
            code = e.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


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
    assert ckpt["epoch"] == 0 and {"model", "optimizer", "lr_scheduler", "args"} <= set(ckpt)
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
    res = run_here(args, tmp_path)
    assert_user_error(res, "--resume")
    res = run(args + ["--resume", str(ckpt_path)], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from {ckpt_path} at epoch {first + 1}" in res.stdout
    assert torch.load(ckpt_path, map_location="cpu", weights_only=False)["epoch"] == 2
    assert not list(ckpt_path.parent.glob("*.tmp"))


def test_sigint_mid_epoch_checkpoints_and_resume_equals_an_uninterrupted_run(tmp_path):
    """Ctrl-C: the run stops after the current iteration with a checkpoint of it and prints the exact command that
    continues it; resumed mid-epoch (same data order), it ends with the parameters of a run never interrupted. A
    fresh run never appends to an older run's log."""
    args = ["--stage", "train", "--model", "fcos_r18", "--epochs", "2", "--eval-every", "0"] + TINY + \
        ["--shapes-train", "16", "--workers", "2"]  # 8 iterations per epoch; workers, as a user runs it
    reference_dir, cut_dir = tmp_path / "reference", tmp_path / "cut"
    out = reference_dir / "runs" / "train_fcos_r18"
    out.mkdir(parents=True)
    (out / "log.jsonl").write_text('{"older": 1}\n')  # a run killed before its first checkpoint left its log
    res = run(args, reference_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "log.previous-1.jsonl").read_text() == '{"older": 1}\n'
    assert "older" not in (out / "log.jsonl").read_text()
    reference = torch.load(out / "model.pth", map_location="cpu", weights_only=True)["model"]

    cut_dir.mkdir()
    proc = subprocess.Popen([sys.executable, TRAIN] + args, cwd=cut_dir, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO),
                            start_new_session=True)
    for line in proc.stdout:
        if line.startswith("epoch 0 [2/8]"):
            os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: every process, the loader's workers too
            break
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "Traceback" not in stderr, stdout[-2000:] + stderr[-3000:]
    ckpt = torch.load(cut_dir / "runs" / "train_fcos_r18" / "checkpoint.pth", map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 0 and 2 <= ckpt["iteration"] < 8  # mid-epoch, after the iteration it was in
    command = stdout.split("continue with: ", 1)[1].strip()
    assert command == "python train.py " + shlex.join(args + ["--resume", "runs/train_fcos_r18/checkpoint.pth"])
    res = run(shlex.split(command)[2:], cut_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"at epoch 0, iteration {ckpt['iteration']}" in res.stdout
    resumed = torch.load(cut_dir / "runs" / "train_fcos_r18" / "model.pth", map_location="cpu", weights_only=True)
    assert resumed["model"].keys() == reference.keys()
    for k, v in reference.items():
        assert torch.equal(resumed["model"][k], v), k


def test_sigterm_to_the_whole_process_group_checkpoints_like_ctrl_c(tmp_path):
    """A scheduler's SIGTERM reaches the loader's workers too: the run still stops after its iteration with a
    checkpoint and the resume command, not with a dead worker's traceback."""
    args = ["--stage", "train", "--model", "fcos_r18", "--epochs", "1", "--eval-every", "0"] + TINY + \
        ["--shapes-train", "16", "--workers", "2"]
    proc = subprocess.Popen([sys.executable, TRAIN] + args, cwd=tmp_path, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO),
                            start_new_session=True)
    for line in proc.stdout:
        if line.startswith("epoch 0 [2/8]"):
            os.killpg(proc.pid, signal.SIGTERM)
            break
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "Traceback" not in stderr, stdout[-2000:] + stderr[-3000:]
    ckpt = torch.load(tmp_path / "runs" / "train_fcos_r18" / "checkpoint.pth", map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 0 and 2 <= ckpt["iteration"] < 8
    assert "continue with: python train.py" in stdout
    time.sleep(1)  # the workers leave with their main process
    alive = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert not alive, alive


POISON = """
import os, runpy, sys
import torch
from torchvision.models.detection import fcos
AT, TERM, WHERE, RANK = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(os.environ.get("RANK", 0))
original, calls = fcos.FCOSHead.compute_loss, [0]

def poisoned(self, *args, **kwargs):  # FCOS's losses, one of them poisoned at training call AT (on rank RANK 1 only
    losses = original(self, *args, **kwargs)  # under torchrun)
    calls[0] += 1
    if calls[0] == AT and (RANK == 1 or "WORLD_SIZE" not in os.environ):
        if WHERE == "loss":
            losses[TERM] = losses[TERM] * float("nan")
        else:  # a finite loss whose gradient is not
            losses[TERM].register_hook(lambda grad: grad * float("inf"))
    return losses

fcos.FCOSHead.compute_loss = poisoned
sys.argv = [sys.argv[4]] + sys.argv[5:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("name,min_cosine", [("fcos_r18", 0.8),          # built from parts
                                             ("retinanet_r50_v2", 0.0),  # by torchvision's builder
                                             ("reppoints_r18", 0.0)])  # its deformable convs had no CPU bf16
def test_amp_on_a_cpu_is_bf16_autocast_and_p6_p7_keep_the_fp32_gradients_of_one_pixel_wide_maps(name, min_cosine):
    """--amp on a CPU autocasts to bf16. oneDNN's bf16 weight gradient of a stride-2 convolution over a map one pixel
    wide is NaN/Inf, which P6/P7 meet on 64 px images: they run in fp32 there, so their gradients stay finite (and for
    FCOS-R18 close to a fp32 step's; at RetinaNet-R50 v2's initialisation the bf16 heads pass back gradients that
    agree with fp32's at cosine ~0.3 only; FCOS-R18's at 0.90 on an AVX512-BF16 CPU)."""
    import train
    with train.autocast(argparse.Namespace(amp=True), torch.device("cpu")):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    torch.manual_seed(0)
    model = detectors.build_detector(name, 9, min_size=64, max_size=64).train()
    images = [torch.rand(3, 64, 64) for _ in range(4)]
    targets = [{"boxes": torch.tensor([[5., 6, 40, 50]]), "labels": torch.tensor([1])} for _ in range(4)]
    assert model.backbone(torch.stack(images))["p6"].shape[-2:] == (1, 1)
    grads, extra, dtypes = [], model.backbone.fpn.extra_blocks, []
    for conv in (extra.p6, extra.p7):  # what P6/P7 receive and return, whatever the autocast around them
        conv.register_forward_hook(lambda m, args, out: dtypes.append((args[0].dtype, out.dtype)))
    for amp in (False, True):
        model.zero_grad()
        dtypes.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = sum(model(images, targets).values())
        assert dtypes and all(d == (torch.float32, torch.float32) for d in dtypes), dtypes
        loss.backward()
        grads.append(torch.cat([extra.p6.weight.grad.flatten(), extra.p7.weight.grad.flatten()]))
    assert torch.isfinite(grads[1]).all() and grads[1].abs().sum() > 0
    assert F.cosine_similarity(grads[0].double(), grads[1].double(), 0) > min_cosine


@pytest.mark.parametrize("where, term, extra", [("loss", "classification", []),
                                                ("gradient", "bbox_regression", ["--amp"])])
def test_a_non_finite_loss_or_gradient_stops_at_once_and_leaves_the_last_checkpoint(tmp_path, where, term, extra):
    """A NaN loss term, or an Inf gradient behind finite losses (with --amp too): exit 2 with one line naming the
    stage, epoch, iteration and term; the checkpoint and model.pth of the last good epoch stay byte-identical."""
    args = ["--stage", "train", "--model", "fcos_r18", "--eval-every", "0"] + TINY + extra  # 4 iterations an epoch
    res = run(args + ["--epochs", "1"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "runs" / "train_fcos_r18"
    before = {name: (out / name).read_bytes() for name in ("checkpoint.pth", "model.pth")}
    (tmp_path / "poison.py").write_text(POISON)
    res = subprocess.run([sys.executable, "poison.py", "2", term, where, TRAIN] + args +
                         ["--epochs", "2", "--resume", str(out / "checkpoint.pth")], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO))
    named = f"{term} is nan" if where == "loss" else "the gradient of"
    assert_user_error(res, "--stage train", named, "at epoch 1, iteration 2", "nothing was saved")
    assert {name: (out / name).read_bytes() for name in before} == before


def test_a_non_finite_loss_on_one_rank_stops_every_rank(tmp_path):
    (tmp_path / "poison.py").write_text(POISON)
    args = ["--stage", "train", "--model", "fcos_r18", "--epochs", "1", "--eval-every", "0"] + TINY
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "poison.py", "2", "classification", "loss", TRAIN] + args, cwd=tmp_path, capture_output=True,
                         text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO))
    errors = [l for l in (res.stdout + res.stderr).splitlines() if l.startswith("error: ")]
    assert len(errors) == 1 and "classification is nan at epoch 0, iteration 2" in errors[0], res.stderr[-3000:]
    # both ranks stop at that iteration and exit 2; a rank still exiting when torchrun's agent sees the other one's
    # exit is terminated by the agent (SIGTERM, -15) -- which of the two depends on timing
    codes = re.findall(r"exitcode\s+: (-?\d+)", res.stderr)
    assert len(codes) == 2 and "2" in codes and set(codes) <= {"2", "-15"}, res.stderr[-3000:]
    assert not (tmp_path / "runs" / "train_fcos_r18" / "checkpoint.pth").exists()


def test_torchrun_user_error_is_one_line_from_rank_0_which_exits_2_first(tmp_path):
    res = run(["--stage", "train", "--model", "yolo_r50"] + TINY, tmp_path, torchrun=2)
    errors = [l for l in (res.stdout + res.stderr).splitlines() if "error: " in l and "yolo_r50" in l]
    assert len(errors) == 1 and errors[0].startswith("error: --model yolo_r50"), res.stderr[-3000:]
    # rank 0 prints and exits 2 first; torchrun then stops the waiting rank 1 (SIGTERM, -15) or it exits 2 itself
    root_cause = res.stderr.split("Root Cause", 1)[-1]
    assert re.search(r"rank\s+: 0 \(local_rank: 0\)\s+exitcode\s+: 2 ", root_cause), res.stderr[-3000:]
    assert set(re.findall(r"exitcode\s+: (-?\d+)", res.stderr)) <= {"2", "-15"}, res.stderr[-3000:]
    assert f'File "{TRAIN}"' not in res.stderr  # torchrun's own summary follows, but no worker traceback
    assert not (tmp_path / "runs").exists()  # refused before anything is written


def test_embedded_data_gets_the_small_data_recipe_and_coco_format_data_the_papers_1x():
    import train

    def schedule(argv, family="fcos"):
        args = train.get_args_parser().parse_args(argv)
        args.world_size = 1
        train.set_schedule_defaults(args, family, epochs=12)
        return args.recipe, args.lr, args.warmup_iters, args.lr_steps
    assert schedule(["--batch-size", "8"]) == ("small", 0.01, 100, [11])
    assert schedule(["--batch-size", "4"], "faster_rcnn") == ("small", 0.01, 100, [11])
    assert schedule(["--batch-size", "2", "--data-path", "/coco"]) == ("1x", 0.01 * 2 / 16, 500, [8, 11])
    assert schedule(["--batch-size", "16", "--data-path", "/coco"], "mask_rcnn") == ("1x", 0.02, 500, [8, 11])
    assert schedule(["--data-path", "/coco", "--warmup-iters", "7", "--lr", "0.3", "--lr-steps", "5"])[1:] == \
        (0.3, 7, [5])

def test_bad_input_is_one_clear_line(tmp_path):
    res = run(["--stage", "train", "--data-path", str(tmp_path / "nowhere")] + TINY, tmp_path)
    assert_user_error(res, "--data-path")
    res = run_here(["--stage", "train", "--model", "yolo_r50"] + TINY, tmp_path)
    assert_user_error(res, "yolo_r50", "retinanet_r50")
    res = run_here(["--stage", "train", "--model", "deformable_detr_r152"] + TINY, tmp_path)  # a backbone it has not
    assert_user_error(res, "deformable_detr_r152", "deformable_detr_r50")
    other_family = tmp_path / "fcos.pth"
    torch.save(detectors.build_detector("fcos_r18", 9).state_dict(), other_family)
    res = run_here(["--stage", "train", "--model", "deformable_detr_r18", "--weights", str(other_family)] + TINY,
                   tmp_path)
    assert_user_error(res, "fcos.pth", "does not fit this model")
    # --resume of a file that is not a checkpoint: refused, and the file is untouched
    bogus = tmp_path / "notes.pth"
    bogus.write_text("not a checkpoint")
    res = run_here(["--stage", "train", "--model", "fcos_r18", "--resume", str(bogus)] + TINY, tmp_path)
    assert_user_error(res, "not a checkpoint")
    assert bogus.read_text() == "not a checkpoint"
    plain = tmp_path / "plain.pth"
    torch.save({"weights": torch.zeros(1)}, plain)
    res = run_here(["--stage", "train", "--model", "fcos_r18", "--resume", str(plain), "--output-dir",
                    str(tmp_path / "o2")] + TINY, tmp_path)
    assert_user_error(res, "not a train.py checkpoint")
    # --resume of a missing file or another run's checkpoint: refused before anything in the output dir changes
    out = tmp_path / "o3"
    out.mkdir()
    (out / "args.json").write_text("earlier")
    res = run_here(["--stage", "train", "--model", "fcos_r18", "--resume", str(tmp_path / "none.pth"), "--output-dir",
                    str(out)] + TINY, tmp_path)
    assert_user_error(res, "no such file")
    other = tmp_path / "other.pth"
    torch.save({"kind": "unikd_checkpoint", "stage": "pretrain", "run": "pretrain_fcos_r18", "model": {}}, other)
    res = run_here(["--stage", "train", "--model", "fcos_r18", "--resume", str(other), "--output-dir", str(out)]
                   + TINY, tmp_path)
    assert_user_error(res, "pretrain_fcos_r18", "train_fcos_r18")
    assert (out / "args.json").read_text() == "earlier"


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
    res = run_here(flags + ["--train-images", str(imgs), "--train-ann", str(tmp_path / "missing.json"),
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
    res = run_here(flags + ["--train-images", str(imgs), "--train-ann", str(good), "--val-images", str(imgs),
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


def test_adapter_without_layers_has_only_used_parameters():
    """DDP (no find_unused_parameters) stalls on a parameter that never gets a gradient: --adapter-layers 0."""
    phi = unikd.Adapter(256, num_layers=0)
    feats = [torch.randn(1, 256, s, s) for s in (8, 4, 2, 1)]
    sum(f.sum() for f in phi(feats)).backward()
    assert all(p.grad is not None for p in phi.parameters())


def test_ake_evaluation_keeps_the_frozen_teacher_in_eval_mode():
    teacher = detectors.build_detector("fcos_r18", 3, min_size=64, max_size=64).eval()
    wrapper = ev.AKEDetector(teacher, unikd.UniKD(num_classes=2, num_queries=10))
    wrapper.train()  # what evaluate() does afterwards to a module that was in train mode
    assert wrapper.unikd.training and not any(m.training for m in teacher.modules())


@pytest.mark.parametrize("teacher,student", [("retinanet_swin_t", "fcos_r18"), ("faster_rcnn_r50", "retinanet_convnext_t")])
def test_unikd_distill_step_across_backbone_architectures(teacher, student):
    losses = distill_step(teacher, student, "unikd")
    assert losses["loss_kd_ct"] > 0 and losses["loss_kd_pos"] > 0


@pytest.mark.parametrize("teacher,student", [("atss_r50", "reppoints_r18"), ("reppoints_r50", "retinanet_r18"),
                                             ("fcos_r50", "atss_r18")])
def test_unikd_distill_step_to_and_from_atss_and_reppoints(teacher, student):
    losses = distill_step(teacher, student, "unikd")
    assert losses["loss_kd_ct"] > 0 and losses["loss_kd_pos"] > 0


@pytest.mark.parametrize("teacher,student", [("deformable_detr_r18", "fcos_r18"), ("fcos_r18", "deformable_detr_r18")])
def test_unikd_distill_step_to_and_from_deformable_detr(teacher, student):
    losses = distill_step(teacher, student, "unikd")
    assert losses["loss_kd_ct"] > 0 and losses["loss_kd_pos"] > 0
    assert ("loss_giou" in losses) == (student == "deformable_detr_r18")  # the student's own set loss


def test_fitnet_distill_step_from_deformable_detr():
    assert distill_step("deformable_detr_r18", "retinanet_r18", "fitnet")["loss_fitnet"] > 0


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


def test_pretrain_offset_init_scale_aware_sets_the_content_akes_offsets(pretrained, tmp_path):
    """--offset-init scale_aware (with --epochs 0: the initial AKE saved): every MSDA of the content AKE starts with
    reset_offsets at the levels' shorter sides of the training images; the positional AKE keeps Deformable DETR's."""
    cwd, one = pretrained
    teacher = cwd / "runs" / "train_fcos_r18" / "model.pth"
    res = run_here(["--stage", "pretrain", "--teacher", "fcos_r18", "--teacher-weights", str(teacher),
                    "--offset-init", "scale_aware", "--output-dir", str(tmp_path / "ake")] + one + ["--epochs", "0"],
                   tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    blob = torch.load(tmp_path / "ake" / "ake.pth", map_location="cpu", weights_only=False)
    sides = [math.ceil(blob["min_size"] / s) for s in (8, 16, 32, 64)]
    P = 4
    distance = torch.tensor([[min(1.0, side / (2 * P)) * (p + 1) for p in range(P)] for side in sides])   # [L, P]
    scaled = (DIRECTIONS_8.view(8, 1, 1, 2) * distance.view(1, 4, P, 1)).flatten()
    detr = (DIRECTIONS_8.view(8, 1, 1, 2) * torch.arange(1, P + 1.0).view(1, 1, P, 1)).expand(8, 4, P, 2).flatten()
    biases = {k: v for k, v in blob["state_dict"].items() if k.endswith("sampling_offsets.bias")}
    assert len(biases) == 4 and sides[-1] < 2 * P
    for key, bias in biases.items():
        torch.testing.assert_close(bias, scaled if key.startswith("ake_ct.") else detr)


def test_distill_uses_newest_ake_and_writes_student(pretrained):
    import detectors
    cwd, one = pretrained
    # a second AKE whose name sorts after the real one's but that is older: the newest by time is the one used
    older = cwd / "runs" / "pretrain_zz_older" / "ake.pth"
    older.parent.mkdir()
    shutil.copy(cwd / "runs" / "pretrain_fcos_r18" / "ake.pth", older)
    newest = os.path.getmtime(cwd / "runs" / "pretrain_fcos_r18" / "ake.pth")
    os.utime(older, (newest - 60, newest - 60))
    try:
        res = run(["--stage", "distill", "--student", "retinanet_r18"] + one, cwd)
    finally:
        shutil.rmtree(older.parent)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "runs/pretrain_fcos_r18/ake.pth" in res.stdout.splitlines()[0]
    state = torch.load(cwd / "runs" / "distill_retinanet_r18" / "student.pth", map_location="cpu")
    student = detectors.build_detector("retinanet_r18", 9, min_size=64, max_size=64)
    student.load_state_dict(state)  # the student alone, loadable by the matching builder


def test_kd_cost_times_the_step_and_the_parts_of_unikds_overhead_and_writes_no_run(pretrained):
    cwd, one = pretrained
    before = sorted(os.listdir(cwd / "runs"))
    for method in ("unikd", "fitnet"):
        res = run(["--stage", "distill", "--student", "retinanet_r18", "--method", method, "--kd-cost", "1"] + one, cwd)
        assert res.returncode == 0, res.stderr[-3000:]
        assert re.search(rf"teacher forward \+ student step \d+ ms, online {method} step \d+ ms", res.stdout)
        parts = re.search(r"teacher side (\d+) ms, phi forward \+ backward (\d+) ms, student side forward \+ "
                          r"backward (\d+) ms; sum (\d+) ms", res.stdout)
        assert (parts is not None) == (method == "unikd"), res.stdout
        if parts:
            assert min(map(int, parts.groups())) > 0
            floor = re.search(r"teacher side ([\d.]+) GFLOP .* so the products alone take (\d+) ms at best", res.stdout)
            assert floor is not None and float(floor.group(1)) > 0 and int(floor.group(2)) >= 0, res.stdout
    assert sorted(os.listdir(cwd / "runs")) == before  # timing only: no run folder


def test_unikd_parts_times_each_part_around_its_own_call_and_takes_the_median_after_warmup(monkeypatch):
    """A fake clock that only the three parts move: each part's time is what its own call took, batch by batch;
    the warm-up batches are left out and the median taken over the rest."""
    clock = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    took = {"teacher": [9, 9, 3, 4, 30], "phi": [9, 9, 5, 50, 6], "student": [9, 9, 70, 7, 8]}  # ms per batch

    def spend(part, batch):
        clock[0] += took[part][batch] / 1e3

    feature = lambda: types.SimpleNamespace(features=[torch.ones(1, 2, 3, 3)])  # noqa: E731
    monkeypatch.setattr(bench.detectors, "forward_features", lambda model, images, targets: feature())
    monkeypatch.setattr(bench.detectors, "forward_with_features", lambda model, images, targets: feature())
    monkeypatch.setattr(bench.detectors, "normalized_targets", lambda out: out)
    batch = [0]

    class Distiller(torch.nn.Module):
        student = None

        def __init__(self):
            super().__init__()
            self.unikd = types.SimpleNamespace(teacher_knowledge=self.teacher_knowledge, student_loss=self.student_loss)

        def teacher_knowledge(self, feats, targets):
            spend("teacher", batch[0])
            return "z_t"

        def adapter(self, feats):
            spend("phi", batch[0])
            return [2 * f for f in feats]

        def student_loss(self, knowledge, adapted):
            assert knowledge == "z_t" and all(f.requires_grad for f in adapted)
            spend("student", batch[0])
            batch[0] += 1
            return {"kd": adapted[0].sum()}

    parts = bench.unikd_parts(Distiller(), None, [(None, None)] * 5, contextlib.nullcontext, torch.device("cpu"))
    assert parts == pytest.approx({"teacher_side_s": 4e-3, "phi_s": 6e-3, "student_side_s": 8e-3}) and batch == [5]


def test_unikd_part_flops_count_every_dense_product_of_the_three_parts(monkeypatch):
    """The FLOPs --kd-cost reports per part against a count by hand of the products in unikd.py's layers: 2 FLOPs per
    multiply-add; attention among the queries included; phi's backward forms input and weight gradients, the frozen
    student side's only the input gradients that lead to phi(F^S)."""
    B, N, C, H, L, P, F, K, C_in = 2, 6, 16, 2, 4, 2, 32, 3, 8
    hw = [(4, 6), (2, 3), (1, 2), (1, 1)]
    torch.manual_seed(0)
    distiller = torch.nn.Module()
    distiller.student = None
    distiller.unikd = unikd.UniKD(num_classes=K, d_model=C, n_heads=H, n_levels=L, n_points=P, num_queries=N,
                                  dim_ffn=F).freeze()
    distiller.adapter = unikd.Adapter(C_in, C, num_layers=2, n_heads=H, n_levels=L, n_points=P)
    teacher_feats = [torch.randn(B, C, h, w) for h, w in hw]
    student_feats = [torch.randn(B, C_in, h, w) for h, w in hw]
    targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3]]), "labels": torch.tensor([1])} for _ in range(B)]
    monkeypatch.setattr(bench.detectors, "forward_features",
                        lambda model, images, targets: types.SimpleNamespace(features=teacher_feats))
    monkeypatch.setattr(bench.detectors, "forward_with_features",
                        lambda model, images, targets: types.SimpleNamespace(features=student_feats))
    monkeypatch.setattr(bench.detectors, "normalized_targets", lambda out: targets)

    def linear(rows, fan_in, fan_out):
        return 2 * rows * fan_in * fan_out

    BN, BS, HLP = B * N, B * sum(h * w for h, w in hw), H * L * P
    decoder_layer = (linear(BN, C, 3 * C) + 2 * 2 * B * N * N * C + linear(BN, C, C)  # self-attn: in, QK^T, AV, out
                     + linear(BS, C, C) + linear(BN, C, 3 * HLP) + linear(BN, C, C)     # MSDA: value, offsets+w, out
                     + 2 * linear(BN, C, F))                                            # FFN
    teacher_side = (4 * decoder_layer + linear(BN, C, 2) + linear(BN, 4, C)            # reference points, FC(B^)
                    + linear(BN, C, K) + 2 * linear(BN, C, C) + linear(BN, C, 4))        # content head (matching)
    # each AKE's extractor layer, then the input gradients back from z: FFN, MSDA output and value projections
    student_side = 2 * (decoder_layer + 2 * linear(BN, C, F) + linear(BN, C, C) + linear(BS, C, C))
    # the 1x1 projection and 2 layers' value, output, offsets + weights projections: forward, input and weight grads
    phi = 3 * linear(BS, C_in, C) + 2 * 3 * (2 * linear(BS, C, C) + linear(BS, C, 3 * HLP))
    flops = bench.unikd_part_flops(distiller, None, (None, None), contextlib.nullcontext)
    assert flops == {"teacher_side": teacher_side, "phi": phi, "student_side": student_side}


def test_msda_backend_reaches_every_msda_of_a_stage_and_triton_without_its_device_is_refused(pretrained, monkeypatch,
                                                                                            tmp_path):
    cwd, one = pretrained
    backends = []
    real = msda.ms_deform_attn

    def spy(value, shapes, starts, locations, weights, backend="auto"):
        backends.append(backend)
        return real(value, shapes, starts, locations, weights, backend)
    monkeypatch.setattr(msda, "ms_deform_attn", spy)
    res = run_here(["--stage", "distill", "--student", "fcos_r18", "--kd-cost", "1", "--msda-backend", "torch"] + one,
                   cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    # every MSDA of the AKEs (teacher and student sides) and of phi, in every step --kd-cost runs
    assert set(backends) == {"torch"} and len(backends) >= 4 + 2 + 2, backends
    monkeypatch.setattr(msda, "_TRITON_INTERPRETED", False)   # as without TRITON_INTERPRET=1 on a CPU
    res = run_here(["--stage", "distill", "--student", "fcos_r18", "--msda-backend", "triton", "--output-dir",
                    str(tmp_path / "d")] + one, cwd)
    assert_user_error(res, "--msda-backend triton", "CUDA")
    assert not (tmp_path / "d").exists()


def test_pretrain_and_distill_bad_input(pretrained, tmp_path):
    cwd, one = pretrained
    # no teacher weights anywhere
    res = run(["--stage", "pretrain", "--teacher", "retinanet_r18"] + one, tmp_path)
    assert_user_error(res, "--stage train --model retinanet_r18")
    # no AKE anywhere
    res = run_here(["--stage", "distill", "--student", "fcos_r18"] + one, tmp_path)
    assert_user_error(res, "--stage pretrain")
    # --ake pointing at a file that is not an AKE
    not_ake = cwd / "runs" / "train_fcos_r18" / "model.pth"
    res = run_here(["--stage", "distill", "--student", "fcos_r18", "--ake", str(not_ake), "--output-dir",
                    str(tmp_path / "a")] + one, cwd)
    assert_user_error(res, "not an AKE")
    ake = cwd / "runs" / "pretrain_fcos_r18" / "ake.pth"
    # an AKE of another teacher than --teacher says
    res = run_here(["--stage", "distill", "--student", "fcos_r18", "--ake", str(ake), "--teacher", "retinanet_r50",
                    "--output-dir", str(tmp_path / "b")] + one, cwd)
    assert_user_error(res, "fcos_r18", "retinanet_r50")
    # an AKE trained for another class count
    blob = torch.load(ake, map_location="cpu", weights_only=False)
    blob["num_classes"] = 81
    other = tmp_path / "ake_coco.pth"
    torch.save(blob, other)
    res = run_here(["--stage", "distill", "--student", "fcos_r18", "--ake", str(other), "--output-dir",
                    str(tmp_path / "c")] + one, cwd)
    assert_user_error(res, "80 classes")


# ====================================================================================================================
# offline KD: --stage dump and --stage distill --offline (train.py)
# ====================================================================================================================

def write_store(path, batches, layout_args=(20, 256, "fp16")):
    """A knowledge store written with train.py's own writer pieces: batches = [(knowledge, image_ids, flip, hw)]."""
    layout = knowledge_store.record_layout(*layout_args)
    partial = str(path) + ".partial"
    os.makedirs(partial)
    records = np.concatenate([knowledge_store.knowledge_to_records(k, ids, flip, hw, layout, layout_args[2])
                              for k, ids, flip, hw in batches])
    records.tofile(os.path.join(partial, "shard_00000.bin"))
    with open(os.path.join(partial, "shard_00000.json"), "w") as f:
        json.dump({"entries": [[int(r["image_id"]), int(r["flip"]), zlib.crc32(r.tobytes())]
                               for r in records], "fitnet_full_bytes": 1, "fitnet_fg_bytes": 1,
                   "entries_measured": 1}, f)
    params = {"num_queries": layout_args[0], "d_model": layout_args[1], "dtype": layout_args[2], "flips": [0, 1],
              "ake": "x", "ake_sha256": "x", "teacher": "fcos_r18"}
    knowledge_store.write_store_index(partial, params, 1, layout, 2)
    os.replace(partial, path)
    return knowledge_store.KnowledgeStore(str(path))


def test_offline_step_equals_online_step_within_fp16(tmp_path):
    """The same images, random boxes and flip: the loss from the store equals the online one within fp16
    rounding, and one SGD step moves the student and phi the same way."""
    import train
    torch.manual_seed(0)
    teacher = build("fcos_r18", num_classes=9).eval().requires_grad_(False)
    ake = unikd.UniKD(num_classes=8, num_queries=20)
    distiller = train.Distiller(build("retinanet_r18", num_classes=9), "unikd", ake, adapter_layers=1)
    images, targets = images_and_targets()
    for i, t in enumerate(targets):
        t.update(image_id=100 + i, flipped=bool(i % 2))
    # online: teacher features -> knowledge with a seeded generator inside the step
    with torch.no_grad():
        out = detectors.forward_features(teacher, images, targets)
        knowledge = ake.teacher_knowledge(out.features, detectors.normalized_targets(out), torch.Generator().manual_seed(5))
    store = write_store(tmp_path / "store", [(knowledge, [100, 101], 0, out.padded_hw)], (20, 256, "fp16"))
    # the store keeps what was written: one flip state per image here (image 101 stored as flip 0)
    for t in targets:
        t["flipped"] = False
    steps = {}
    for mode in ("online", "offline"):
        model = copy.deepcopy(distiller)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
        if mode == "online":
            losses = model(images, targets, out.features, torch.Generator().manual_seed(5))
        else:
            losses = model(images, targets, knowledge_store=store)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        steps[mode] = (losses, {n: p.detach() - before[n] for n, p in model.named_parameters() if p.requires_grad})
    (on, d_on), (off, d_off) = steps["online"], steps["offline"]
    assert set(on) == set(off) and {"loss_kd_ct", "loss_kd_pos"} <= set(on)
    for k in on:  # fp16 embeddings: relative rounding 2^-11, amplified a little by one decoder layer
        torch.testing.assert_close(off[k], on[k], rtol=5e-3, atol=1e-5)
    changed = 0
    for n in d_on:
        scale = d_on[n].abs().max().item()
        if scale > 0:
            changed += 1
            assert (d_off[n] - d_on[n]).abs().max().item() <= 2e-2 * scale + 1e-7, n
    assert changed > 0.9 * len(d_on)
    # and the stored embeddings are the online ones rounded to fp16
    restored = store.knowledge(targets, out.padded_hw, torch.device("cpu"))
    torch.testing.assert_close(restored.z_ct, knowledge.z_ct.half().float(), rtol=0, atol=0)
    assert torch.equal(restored.pos_mask_ct, knowledge.pos_mask_ct) and torch.equal(restored.boxes, knowledge.boxes)


def test_store_rescales_points_to_the_students_batch(tmp_path):
    """A record dumped on a 64x96 padded batch read into a 128x96 student batch: the same pixels, in new normalised units."""
    N, C = 3, 8
    k = unikd.Knowledge(torch.zeros(1, N, C), torch.tensor([[[0.5, 0.5], [0.25, 1.0], [1.0, 0.0]]]),
                        torch.zeros(1, N, C), torch.tensor([[[0.5, 0.5, 0.2, 0.4]] * N]), torch.zeros(1, N, C),
                        torch.zeros(1, N, C), torch.zeros(1, N, dtype=torch.bool), torch.ones(1, N, dtype=torch.bool))
    store = write_store(tmp_path / "s", [(k, [7], 0, (64, 96))], (N, C, "bf16"))
    got = store.knowledge([{"image_id": 7, "flipped": False}], (128, 96), torch.device("cpu"))
    # pixel (x, y) = (0.5 * 96, 0.5 * 64) = (48, 32) -> (48 / 96, 32 / 128)
    assert got.reference_ct[0].tolist() == [[0.5, 0.25], [0.25, 0.5], [1.0, 0.0]]
    torch.testing.assert_close(got.boxes[0, 0], torch.tensor([0.5, 0.25, 0.2, 0.2]))


@pytest.fixture(scope="module")
def dumped(pretrained):
    """--stage dump of the pretrained AKE's teacher over the tiny set, 3 shards of 3 images, both flips."""
    cwd, one = pretrained
    res = run(["--stage", "dump", "--dump-shard-images", "3", "--output-dir", "runs/store"] + one, cwd)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return cwd, one, cwd / "runs" / "store", res


def test_dump_round_trip_and_storage_report(dumped):
    cwd, one, store_dir, res = dumped
    store = knowledge_store.KnowledgeStore(str(store_dir))
    m = store.manifest
    assert m["teacher"] == "fcos_r18" and m["num_queries"] == 20 and m["d_model"] == 256 and m["dtype"] == "fp16"
    assert m["flips"] == [0, 1] and len(m["shards"]) == 3 and not os.path.exists(str(store_dir) + ".partial")
    ake = cwd / "runs" / "pretrain_fcos_r18" / "ake.pth"
    assert m["ake_sha256"] == utils.file_sha256(ake)
    ds = data.CocoDetection(str(cwd / "data" / "shapes_8x4_64x64_s0" / "train2017"),
                          str(cwd / "data" / "shapes_8x4_64x64_s0" / "annotations" / "instances_train2017.json"),
                          train=True, min_size=64, max_size=64)
    assert m["image_ids"] == sorted(ds.ids)
    annotations = json.load(open(cwd / "data" / "shapes_8x4_64x64_s0" / "annotations" / "instances_train2017.json"))
    for image_id in ds.ids:
        # each entry is this image's, in this flip state: Eq. (3)'s row i jitters GT i (IoU > alpha = 0.6), the GTs
        # read from the JSON (64 x 64 images: no resize) and mirrored by hand for flip 1
        gt = torch.tensor([[x, y, x + w, y + h] for a in annotations["annotations"] if a["image_id"] == image_id
                           for x, y, w, h in [a["bbox"]]])
        for flip in (False, True):
            k = store.knowledge([{"image_id": image_id, "flipped": flip}], (64, 64), torch.device("cpu"))
            assert k.z_ct.shape == (1, 20, 256) and k.z_ct.dtype == torch.float32
            assert k.reference_ct.shape == (1, 20, 2) and k.boxes.shape == (1, 20, 4) and k.pos_mask_ct.dtype == torch.bool
            assert torch.isfinite(k.z_pos).all()
            want = torch.stack([64 - gt[:, 2], gt[:, 1], 64 - gt[:, 0], gt[:, 3]], 1) if flip else gt
            n = int(k.pos_mask_pos.sum())
            assert n == len(gt) and k.pos_mask_pos[0, :n].all()
            rows = box_convert(k.boxes[0, :n], "cxcywh", "xyxy") * 64
            assert (box_iou(rows, want).diagonal() > 0.6).all(), (image_id, flip)
    rec = store.records([ds.ids[0]], [1])[0]
    assert rec["z_ct"].dtype == np.float16 and rec["flip"] == 1 and tuple(rec["padded_hw"]) == (64, 64)
    # storage: bytes per image by hand (4 fp16 [N, C] tensors, fp32 points and boxes, masks, id/padded_hw/flip)
    s = m["storage"]
    assert 2 * (4 * 20 * 256 * 2 + 20 * 6 * 4 + 2 * 20) <= s["bytes_per_image"] <= 2 * (4 * 20 * 256 * 2 + 20 * 6 * 4 + 2 * 20 + 64)
    # FitNet at 64 px: levels 8x8 + 4x4 + 2x2 + 1x1 of 256 fp16 channels, both flips
    assert s["fitnet_full_bytes_per_image"] == 2 * (64 + 16 + 4 + 1) * 256 * 2
    # COCO 800x1333 padded to 832x1344: (104*168 + 52*84 + 26*42 + 13*21) cells
    assert s["coco_fitnet_full_bytes"] == 118287 * 2 * (104 * 168 + 52 * 84 + 26 * 42 + 13 * 21) * 256 * 2
    assert "B per image" in res.stdout and "FitNet would need" in res.stdout


def test_killed_dump_resumes_to_the_same_manifest(dumped, tmp_path):
    cwd, one, store_dir, _ = dumped
    args = ["--stage", "dump", "--dump-shard-images", "3", "--output-dir", str(tmp_path / "store")] + one
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    proc = subprocess.Popen([sys.executable, TRAIN] + args, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    first = tmp_path / "store.partial" / "shard_00000.json"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    assert first.exists() and not (tmp_path / "store").exists(), "the dump was not interrupted halfway"
    (tmp_path / "store.partial" / "shard_00001.bin.tmp").write_bytes(b"torn")  # what a kill mid-write leaves
    res = run(args, cwd)
    assert res.returncode == 0 and "resuming" in res.stdout, res.stderr[-3000:]
    with open(tmp_path / "store" / "manifest.json") as f, open(store_dir / "manifest.json") as g:
        assert json.load(f) == json.load(g)
    for k in range(3):
        name = f"shard_{k:05d}.bin"
        assert (tmp_path / "store" / name).read_bytes() == (store_dir / name).read_bytes()


def test_torchrun_dump_writes_each_ranks_shards_into_the_same_store(dumped, tmp_path):
    cwd, one, store_dir, _ = dumped
    res = run(["--stage", "dump", "--dump-shard-images", "3", "--output-dir", str(tmp_path / "store")] + one, cwd,
              torchrun=2)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    with open(tmp_path / "store" / "manifest.json") as f, open(store_dir / "manifest.json") as g:
        assert json.load(f) == json.load(g)
    # and the entries themselves: every image and flip state as the one-process dump stored it -- the sampled boxes
    # (per-batch seeds) and both positive sets exactly; a rank runs with its own thread count, so the fp32 points
    # within fp32 rounding and the fp16 embeddings within two fp16 steps
    two, one_process = (knowledge_store.KnowledgeStore(str(p)) for p in (tmp_path / "store", store_dir))
    for image_id in one_process.manifest["image_ids"]:
        for flip in (False, True):
            got, want = (s.knowledge([{"image_id": image_id, "flipped": flip}], (64, 64), torch.device("cpu"))
                         for s in (two, one_process))
            for k in ("boxes", "pos_mask_ct", "pos_mask_pos"):
                assert torch.equal(getattr(got, k), getattr(want, k)), k
            torch.testing.assert_close(got.reference_ct, want.reference_ct, rtol=1e-5, atol=1e-6)
            for k in knowledge_store.EMBEDDING_FIELDS:
                torch.testing.assert_close(getattr(got, k), getattr(want, k), rtol=2e-3, atol=2e-3)


def test_offline_distill_trains_without_a_teacher(dumped):
    cwd, one, store_dir, _ = dumped
    # the teacher's weights are gone: an offline run must not need them
    weights = cwd / "runs" / "train_fcos_r18" / "model.pth"
    hidden = weights.with_suffix(".hidden")
    os.replace(weights, hidden)
    try:
        res = run(["--stage", "distill", "--student", "retinanet_r18", "--offline", str(store_dir)] + one, cwd)
    finally:
        os.replace(hidden, weights)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "the teacher is not built" in res.stdout
    kd = [float(v) for v in re.findall(r"loss_kd_ct (\S+)", res.stdout)]
    assert kd and all(math.isfinite(v) and v > 0 for v in kd)  # the stored knowledge reached the loss
    assert (cwd / "runs" / "distill_retinanet_r18_offline" / "student.pth").exists()


def test_one_flip_store_trains_the_student_without_flips(dumped, tmp_path):
    cwd, one, _, _ = dumped
    store = tmp_path / "unflipped"
    res = run(["--stage", "dump", "--dump-flips", "1", "--dump-dtype", "bf16", "--output-dir", str(store)] + one, cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    m = knowledge_store.KnowledgeStore(str(store)).manifest
    assert m["flips"] == [0] and m["dtype"] == "bf16" and all(set(v) == {"0"} for v in
                                                             json.loads((store / "index.json").read_text()).values())
    res = run(["--stage", "distill", "--student", "retinanet_r18", "--offline", str(store), "--output-dir",
               str(tmp_path / "student")] + one, cwd)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "unflipped images only" in res.stdout     # every batch found its entries: no flipped image was drawn


def test_offline_bad_input_is_one_clear_line(dumped, tmp_path):
    cwd, one, store_dir, _ = dumped
    distill = ["--stage", "distill", "--student", "retinanet_r18"] + one

    def copy_store(name):
        dst = tmp_path / name
        shutil.copytree(store_dir, dst)
        return dst

    def offline(store, *extra, check=run_here):
        return check(distill + ["--offline", str(store), "--output-dir", str(tmp_path / ("out_" + store.name))]
                     + list(extra), cwd)

    ake = cwd / "runs" / "pretrain_fcos_r18" / "ake.pth"
    blob = torch.load(ake, map_location="cpu", weights_only=False)
    blob["state_dict"]["ake_ct.level_embed"] += 1.0
    other_ake = tmp_path / "other_ake.pth"
    torch.save(blob, other_ake)
    assert_user_error(offline(store_dir, "--ake", str(other_ake), check=run), "another AKE")
    assert_user_error(offline(store_dir, "--teacher", "retinanet_r50"), "teacher fcos_r18", "retinanet_r50")
    missing = copy_store("missing")
    index = json.loads((missing / "index.json").read_text())
    gone = sorted(index)[0]
    del index[gone]
    (missing / "index.json").write_text(json.dumps(index))
    assert_user_error(offline(missing), f"image id {gone}", "not in the store")
    truncated = copy_store("truncated")
    shard = truncated / "shard_00001.bin"
    shard.write_bytes(shard.read_bytes()[:-100])
    assert_user_error(offline(truncated), "shard_00001.bin", "truncated")
    corrupt = copy_store("corrupt")
    for shard in corrupt.glob("shard_*.bin"):
        data = bytearray(shard.read_bytes())
        record = len(data) // json.loads((corrupt / (shard.stem + ".json")).read_text())["entries"].__len__()
        for start in range(0, len(data), record):
            data[start + 10] ^= 0xFF                               # one byte of every record's z
        shard.write_bytes(bytes(data))
    assert_user_error(offline(corrupt), "corrupt", "CRC")
    other_n = copy_store("other_n")
    manifest = json.loads((other_n / "manifest.json").read_text())
    manifest["num_queries"] = 30
    (other_n / "manifest.json").write_text(json.dumps(manifest))
    assert_user_error(offline(other_n), "N=30", "N=20")
    assert_user_error(offline(tmp_path / "nowhere"), "not a knowledge store")
    # nothing was written by any of these runs
    assert not any(p.name.startswith("out_") and any(p.rglob("*.pth")) for p in tmp_path.iterdir())


# ====================================================================================================================
# --stage demo and --stage grid (train.py)
# ====================================================================================================================

TINY_PIPELINE = TINY + ["--num-queries", "20", "--max-iters", "1", "--teacher-epochs", "1", "--pretrain-epochs", "1",
                        "--student-epochs", "1"]


def test_demo_runs_end_to_end_and_a_rerun_skips_its_steps(tmp_path):
    demo = ["--stage", "demo", "--teacher", "fcos_r18", "--student", "retinanet_r18"] + TINY_PIPELINE
    res = run(demo, tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    table = [l for l in res.stdout.splitlines() if l.startswith("| ")]
    assert [l.split(" | ")[0] for l in table[2:]] == ["| teacher", "| AKE (content queries)", "| student, no KD",
                                                      "| student, UniKD"]
    for step in ("teacher_fcos_r18", "ake_fcos_r18", "none__retinanet_r18__s0", "fcos_r18__retinanet_r18__unikd__s0"):
        result = json.loads((tmp_path / "runs" / "demo" / step / "result.json").read_text())
        assert "AP" in result["metrics"] and result["command"].startswith("python train.py --stage ")
        recorded = json.loads((tmp_path / "runs" / "demo" / step / "args.json").read_text())
        assert recorded["recipe"] == "small"  # the embedded default's recipe, said in args.json
        assert recorded["amp"] == utils.cpu_has_bf16_units()  # bf16 where this CPU multiplies it in hardware
    again = run(demo, tmp_path)
    assert again.returncode == 0 and again.stdout.count("(earlier run)") == 4 and "== " not in again.stdout


def run_grid(tmp_path, teachers, students, methods, seeds, extra=()):
    """A finished tiny grid -> (its command line, its root folder)."""
    grid = ["--stage", "grid", "--teachers", teachers, "--students", students, "--methods", methods,
            "--seeds", seeds] + TINY_PIPELINE + list(extra)
    res = run(grid, tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return grid, tmp_path / "runs" / "grid"


@pytest.fixture(scope="module")
def tiny_grid(tmp_path_factory):
    """A finished tiny grid fcos_r18 -> retinanet_r18_v2, none and unikd, seeds 0 and 1 -> (its folder, its command
    line, its root)."""
    cwd = tmp_path_factory.mktemp("grid")
    return (cwd, *run_grid(cwd, "fcos_r18", "retinanet_r18_v2", "none,unikd", "0,1"))


def test_grid_writes_results_md_from_its_cells_and_a_rerun_skips_them(tiny_grid):
    tmp_path, grid, root = tiny_grid
    aps = {(m, s): json.loads((root / (f"none__retinanet_r18_v2__s{s}" if m == "none" else
                                       f"fcos_r18__retinanet_r18_v2__{m}__s{s}") / "result.json").read_text())
           ["metrics"]["AP"] for m in ("none", "unikd") for s in (0, 1)}
    md = (root / "results.md").read_text()
    row = next(l for l in md.splitlines() if l.startswith("| fcos_r18 → retinanet_r18_v2"))
    cols = [c.strip() for c in row.strip("|").split("|")]
    for col, m in zip(cols[1:3], ("none", "unikd")):
        values = np.array([aps[m, 0], aps[m, 1]])
        assert col == f"{values.mean():.3f} ± {values.std(ddof=1):.3f}"
    assert cols[3] == f"{np.mean([aps['unikd', 0], aps['unikd', 1]]) - np.mean([aps['none', 0], aps['none', 1]]):+.3f}"
    assert "heterogeneous" in row and "python train.py --stage grid" in md
    ake = hashlib.sha256((root / "ake_fcos_r18" / "ake.pth").read_bytes()).hexdigest()
    for s in (0, 1):  # each KD cell records the AKE file it learned from; a cell without KD learns from none
        assert json.loads((root / f"fcos_r18__retinanet_r18_v2__unikd__s{s}" / "result.json").read_text())[
            "ake_sha256"] == ake
        assert "ake_sha256" not in json.loads((root / f"none__retinanet_r18_v2__s{s}" / "result.json").read_text())
    teacher_ap = json.loads((root / "teacher_fcos_r18" / "result.json").read_text())["metrics"]["AP"]
    weaker = teacher_ap <= np.mean([aps["none", 0], aps["none", 1]])
    assert ("Note: fcos_r18 (AP" in md and "not stronger than retinanet_r18_v2" in md) == weaker
    # a cell removed: --report trains nothing and shows the seeds that remain; a rerun runs only that cell
    shutil.rmtree(root / "fcos_r18__retinanet_r18_v2__unikd__s1")
    report = run(grid + ["--report"], tmp_path)
    assert report.returncode == 0 and "== " not in report.stdout, report.stderr[-3000:]
    assert not (root / "fcos_r18__retinanet_r18_v2__unikd__s1").exists()
    row = next(l for l in (root / "results.md").read_text().splitlines()
               if l.startswith("| fcos_r18 → retinanet_r18_v2"))
    cols = [c.strip() for c in row.strip("|").split("|")]
    assert cols[2] == f"{aps['unikd', 0]:.3f} (1/2 seeds)"
    assert cols[3] == f"{aps['unikd', 0] - np.mean([aps['none', 0], aps['none', 1]]):+.3f}"
    again = run(grid, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    ran = [l for l in again.stdout.splitlines() if l.startswith("== ")]
    assert len(ran) == 1 and "--method unikd" in ran[0] and "--seed 1" in ran[0]
    bad_method = grid[:-len(TINY_PIPELINE)] + ["--methods", "none,distil"] + TINY_PIPELINE
    assert_user_error(run_here(bad_method, tmp_path), "--methods", "distil")


def test_grid_random_teacher_control_is_the_untrained_architecture_with_its_own_ake(tmp_path):
    _, root = run_grid(tmp_path, "random_fcos_r18", "fcos_r18", "unikd", "0")
    command = json.loads((root / "teacher_random_fcos_r18" / "result.json").read_text())["command"]
    assert "--model fcos_r18 --epochs 0" in command
    saved = torch.load(root / "teacher_random_fcos_r18" / "model.pth", map_location="cpu", weights_only=True)
    torch.manual_seed(0)  # what train.py seeds before building the model: the teacher is its initial weights
    fresh = detectors.build_detector("fcos_r18", 9, min_size=64, max_size=64).state_dict()
    assert saved["model"].keys() == fresh.keys() and all(torch.equal(saved["model"][k], v) for k, v in fresh.items())
    ake = torch.load(root / "ake_random_fcos_r18" / "ake.pth", map_location="cpu", weights_only=False)
    assert ake["teacher"] == "fcos_r18" and ake["teacher_weights"].endswith("teacher_random_fcos_r18/model.pth")
    assert "| random_fcos_r18 → fcos_r18 (homogeneous) |" in (root / "results.md").read_text()

def test_grid_runs_a_student_without_kd_once_for_every_teacher(tmp_path):
    """A `none` cell does not depend on the teacher: every teacher's row reads the same run; KD cells stay apart."""
    import train
    args = train.get_args_parser().parse_args(["--stage", "grid", "--teachers", "fcos_r34,random_atss_r34",
                                               "--students", "fcos_r18", "--methods", "none,unikd", "--seeds", "1",
                                               "--output-dir", str(tmp_path)])
    args.explicit, args.rank, args.distributed = set(), 0, False
    ran, result = [], lambda ap: {"metrics": {"AP": ap}, "command": "python train.py ..."}  # noqa: E731

    class Recorded(grid.Steps):
        def teacher_and_ake(self, root, teacher):
            return result(0.5), result(0.2), f"ake_{teacher}"

        def student(self, out_dir, *cell):
            ran.append((os.path.relpath(out_dir, tmp_path),) + cell)
            return result(0.1)

    grid.stage_grid(args, Recorded(args, torch.device("cpu"), train.get_args_parser, None))
    assert ran == [("none__fcos_r18__s1", "fcos_r18", "none", 1, "ake_fcos_r34"),
                   ("fcos_r34__fcos_r18__unikd__s1", "fcos_r18", "unikd", 1, "ake_fcos_r34"),
                   ("random_atss_r34__fcos_r18__unikd__s1", "fcos_r18", "unikd", 1, "ake_random_atss_r34")]
    rows = [l for l in (tmp_path / "results.md").read_text().splitlines() if "→ fcos_r18" in l]
    assert len(rows) == 2 and all(l.split(" | ")[1] == "0.100" for l in rows)  # both rows read the one none cell


def test_grid_jobs_run_steps_in_worker_processes_with_the_results_of_one_process(tiny_grid, tmp_path):
    """--jobs 2: the steps run in two spawned workers (one thread each here), and every step's metrics equal those
    of the same steps run one after another in the launcher at the same thread count (tiny_grid's, --jobs 1)."""
    _, root = run_grid(tmp_path, "fcos_r18", "retinanet_r18_v2", "none,unikd", "0", ["--jobs", "2"])
    results = {p.parent.name: json.loads(p.read_text()) for p in root.glob("*/result.json")}
    assert sorted(results) == ["ake_fcos_r18", "fcos_r18__retinanet_r18_v2__unikd__s0", "none__retinanet_r18_v2__s0",
                               "teacher_fcos_r18"]
    for step, result in results.items():
        one_process = json.loads((tiny_grid[2] / step / "result.json").read_text())
        assert result["metrics"] == one_process["metrics"], step
        assert result["threads"] == one_process["threads"] == 1 and result["device"] == "cpu"
    assert_user_error(run_here(["--stage", "grid", "--jobs", "0"] + TINY_PIPELINE, tmp_path), "--jobs 0")


def test_demo_and_grid_refuse_a_flag_that_no_step_would_see(tmp_path):
    """A pipeline's steps set their own schedule and method settings: a flag it neither reads nor passes on is one
    line, exit 2, not silently ignored; what it passes on or reads is accepted."""
    import train

    def check(argv):
        args = train.get_args_parser().parse_args(argv)
        args.explicit = utils.explicit_flags(train.get_args_parser(), argv)
        grid.refuse_unused_flags(args, train.get_args_parser())

    for stage, flag, value in (("grid", "--lr", "0.1"), ("demo", "--fitnet-weight", "3"), ("grid", "--seed", "1"),
                               ("demo", "--epochs", "2"), ("grid", "--weights-backbone", "DEFAULT")):
        with pytest.raises(utils.UserError, match=f"^{flag}: --stage {stage} does not pass it on"):
            check(["--stage", stage, flag, value])
    check(["--stage", "grid", "--teachers", "fcos_r34", "--seeds", "0", "--jobs", "2", "--no-amp"] + TINY_PIPELINE)
    check(["--stage", "demo", "--teacher", "fcos_r34", "--seed", "1", "--smoke", "--amp", "--device", "cpu"])
    assert_user_error(run_here(["--stage", "grid", "--lambda-ct", "30"], tmp_path), "--lambda-ct: --stage grid")


def test_demo_says_plainly_whether_unikd_beat_the_student_alone():
    assert "nothing to distil" in grid.demo_verdict(0.20, 0.25, 0.30)
    assert grid.demo_verdict(0.04, 0.01, 0.02).startswith("The teacher is still weak (AP 0.040)")
    assert "not what UniKD gains" in grid.demo_verdict(0.24, 0.01, 0.20)
    assert grid.demo_verdict(0.40, 0.25, 0.30).startswith("UniKD beat the student alone by +0.050 AP")
    assert "did not beat the student alone (AP 0.252 against 0.250)" in grid.demo_verdict(0.40, 0.25, 0.252)

def test_grid_table_flags_a_weaker_teacher_partial_cells_and_cells_of_another_ake(tmp_path):
    import train
    args = train.get_args_parser().parse_args(["--teacher-epochs", "1", "--pretrain-epochs", "1",
                                               "--student-epochs", "1"])
    result = lambda ap, **kw: {"metrics": {"AP": ap}, "command": "python train.py ...", **kw}  # noqa: E731
    ake = tmp_path / "ake.pth"
    ake.write_bytes(b"the AKE of the second training")
    earlier = hashlib.sha256(b"the AKE of the first training").hexdigest()
    prerequisites = {"fcos_r50": (result(0.05), result(0.01), str(ake)),
                     "retinanet_r50": (result(0.01), None, str(tmp_path / "ake_retinanet_r50" / "ake.pth"))}
    cells = {("fcos_r50", "fcos_r18", "none", 0): result(0.02), ("fcos_r50", "fcos_r18", "none", 1): result(0.04),
             ("fcos_r50", "fcos_r18", "unikd", 0): result(0.05, ake_sha256=earlier),
             ("fcos_r50", "fcos_r18", "unikd", 1): None,
             ("retinanet_r50", "fcos_r18", "none", 0): result(0.02), ("retinanet_r50", "fcos_r18", "none", 1): None,
             ("retinanet_r50", "fcos_r18", "unikd", 0): None, ("retinanet_r50", "fcos_r18", "unikd", 1): None}
    md = grid.grid_table(args, "runs/grid", prerequisites, cells, ["fcos_r50", "retinanet_r50"], ["fcos_r18"],
                          ["none", "unikd"], [0, 1])
    rows = {l.split(" |")[0]: [c.strip() for c in l.strip("|").split("|")] for l in md.splitlines() if "→" in l}
    assert rows["| fcos_r50 → fcos_r18 (homogeneous)"][1:] == [
        f"0.030 ± {np.std([0.02, 0.04], ddof=1):.3f}", "0.050 (1/2 seeds)", "+0.020"]
    assert rows["| retinanet_r50 → fcos_r18 (heterogeneous)"][1:] == ["0.020 (1/2 seeds)", "—", "n/a"]
    header = next(l for l in md.splitlines() if l.startswith("| teacher → student"))
    assert header == "| teacher → student | none | unikd | gain unikd |"
    only_none = grid.grid_table(args, "runs/grid", prerequisites, cells, ["fcos_r50"], ["fcos_r18"], ["none"], [0])
    table = [l for l in only_none.splitlines() if "→" in l or l == "| --- | ---: |"]
    assert table == ["| teacher → student | none |", "| --- | ---: |", "| fcos_r50 → fcos_r18 (homogeneous) | 0.020 |"]
    assert "| retinanet_r50 | 0.010 | — |" in md
    notes = [l for l in md.splitlines() if l.startswith("Note:")]
    assert len(notes) == 2 and notes[0].startswith("Note: retinanet_r50 (AP 0.010) is not stronger than fcos_r18")
    assert notes[1].startswith("Note: fcos_r50 → fcos_r18 unikd seed 0 learned from another training of fcos_r50")
    # the same cell from the AKE file now in the root: nothing to flag
    cells["fcos_r50", "fcos_r18", "unikd", 0]["ake_sha256"] = hashlib.sha256(ake.read_bytes()).hexdigest()
    md = grid.grid_table(args, "runs/grid", prerequisites, cells, ["fcos_r50"], ["fcos_r18"], ["none", "unikd"], [0, 1])
    assert "Note:" not in md



def test_grid_reads_each_version_of_an_ake_file_once(tmp_path, monkeypatch):
    reads = []
    monkeypatch.setattr(grid, "file_sha256", lambda path: reads.append(path) or utils.file_sha256(path))
    ake = tmp_path / "ake.pth"
    assert grid.ake_sha256(str(ake)) is None and reads == []
    ake.write_bytes(b"the AKE of the first training")
    digests = [grid.ake_sha256(str(ake)) for _ in range(3)]  # every cell of a teacher's rows asks
    assert digests == [hashlib.sha256(b"the AKE of the first training").hexdigest()] * 3 and len(reads) == 1
    ake.write_bytes(b"the AKE of a second training")  # the teacher and its AKE trained again: read anew
    assert grid.ake_sha256(str(ake)) == hashlib.sha256(b"the AKE of a second training").hexdigest()
    assert len(reads) == 2

def test_picture_flags_write_pngs_of_the_expected_size(pretrained, tmp_path, monkeypatch):
    from torchvision.io import decode_png, read_file
    cwd, one = pretrained
    teacher = str(cwd / "runs" / "train_fcos_r18" / "model.pth")
    base = [sys.executable, os.path.join(REPO, "eval.py"), "--model", "fcos_r18", "--ckpt", teacher, "--data-path",
            str(cwd / "data" / "shapes_8x4_64x64_s0"), "--workers", "0", "--device", "cpu", "--pictures", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)

    def pictures(*flags):
        out = tmp_path / flags[0].strip("-")
        res = run_here(base[2:] + list(flags) + ["--out", str(out)], cwd, main=ev.main)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        files = sorted(out.glob("*.png"))
        return [decode_png(read_file(str(f))) for f in files], res

    sampling, _ = pictures("--sampling", str(cwd / "runs" / "pretrain_fcos_r18" / "ake.pth"))
    # 64 px images are enlarged 6x, so a panel's shorter side is at least 384 px
    assert len(sampling) == 2 and all(p.shape == (3, 384, 768) for p in sampling)
    left, right = sampling[0][:, :, :384].int(), sampling[0][:, :, 384:].int()
    assert (left[0] - left[1]).max() > 100 and (right[1] - right[0]).max() > 100   # red | green attention
    density, _ = pictures("--density", f"fcos_r18={teacher}")
    assert len(density) == 1 and density[0].shape == (3, 2 * 2 * 384, 4 * 384)
    # students of one family stay apart in the picture: a distilled model.pth is labelled with its method
    blob = torch.load(teacher, map_location="cpu", weights_only=False)
    blob["args"] = dict(blob["args"], stage="distill", method="fitnet")
    torch.save(blob, tmp_path / "student_model.pth")
    args = argparse.Namespace(min_size=64, max_size=64)
    dataset = argparse.Namespace(num_classes=9)
    assert ev.named_model(f"fcos_r18={teacher}", dataset, args)[0] == "fcos_r18"
    assert ev.named_model(f"fcos_r18={tmp_path / 'student_model.pth'}", dataset, args)[0] == "fcos_r18 fitnet"
    compare, _ = pictures("--compare", f"fcos_r18={teacher}")
    assert len(compare) == 2 and all(p.shape == (3, 384, 3 * 384) for p in compare)
    # --score-thresh reaches the drawing of both prediction panels (which boxes it keeps: the test below)
    thresholds, real_draw = [], ev.draw_predictions
    monkeypatch.setattr(ev, "draw_predictions", lambda *a: thresholds.append(a[3]) or real_draw(*a))
    pictures("--compare", f"fcos_r18={teacher}", "--score-thresh", "0.75")
    assert thresholds == [0.75] * 4
    res = subprocess.run(base + ["--sampling", teacher, "--out", str(tmp_path / "x")], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=600)
    assert_user_error(res, "not an AKE file")


def test_draw_predictions_draws_the_boxes_at_or_above_the_score_threshold():
    picture = torch.zeros(3, 48, 48, dtype=torch.uint8)
    output = {"boxes": torch.tensor([[4., 30., 14., 40.], [24., 24., 44., 44.]]), "scores": torch.tensor([0.2, 0.6]),
              "labels": torch.tensor([1, 1])}
    drawn = lambda thresh: (ev.draw_predictions(picture, output, ["background", "a"], thresh) > 0).any(0)  # noqa: E731
    low_edge, high_edge = (slice(34, 37), 4), (slice(28, 41), 44)  # left edge of the 0.2 box, right of the 0.6 box
    assert drawn(0.5)[high_edge].all() and not drawn(0.5)[low_edge].any()
    assert drawn(0.2)[high_edge].all() and drawn(0.2)[low_edge].all()
    assert not drawn(0.7).any()
