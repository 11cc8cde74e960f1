"""Tests of deform_attn_triton.py: both backends against an independent per-sample loop, float64
gradcheck, low precision, empty inputs, MSDeformAttn's initialisation, input validation, and an
ahead-of-time sm_90 compile of the Triton kernels.

The Triton kernels run on CPU tensors through the interpreter, which must be switched on before
triton is imported -- hence the environment variable before every import.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import deform_attn_triton as msda  # noqa: E402
from deform_attn_triton import MSDeformAttn, flatten_levels, ms_deform_attn  # noqa: E402

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


def test_backend_auto_is_torch_on_cpu_and_unknown_backend_rejected():
    case = CASES["C30"]()
    torch.testing.assert_close(ms_deform_attn(*case), ms_deform_attn(*case, backend="torch"))
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
    outs = {}
    for backend in BACKENDS:
        module.backend = backend
        module.zero_grad()
        outs[backend] = module(query, ref, value_input, spatial_shapes, level_start_index)
        outs[backend].square().sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    torch.testing.assert_close(outs["torch"], outs[BACKENDS[-1]], rtol=1e-5, atol=1e-5)


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

@pytest.mark.skipif(msda.triton is None, reason="triton not installed")
def test_triton_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "deform_attn_triton.py"), "--compile-check"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for kernel in ("_msda_fwd_kernel", "_msda_bwd_kernel"):
        for dtype in ("fp32", "bf16"):
            assert f"{kernel} {dtype}: sm_90 PTX" in proc.stdout
