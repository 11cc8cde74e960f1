"""Multi-scale deformable attention (MSDA, Deformable DETR, Zhu et al. 2021) in Triton and PyTorch.

One self-contained file (it imports only torch and, optionally, triton), so it can be copied into
another codebase as it is.

    out = ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                         attention_weights, backend="auto")

    value               [B, S, H, C]          S = sum_l H_l * W_l, levels flattened row-major
    spatial_shapes      [L, 2] int64          (H_l, W_l)
    level_start_index   [L] int64             offset of level l inside S
    sampling_locations  [B, Q, H, L, P, 2]    (x, y), normalised: 0 and 1 are the map's outer edges
    attention_weights   [B, Q, H, L, P]
    out                 [B, Q, H * C]

    out[b, q, h] = sum_{l, p} attention_weights[b, q, h, l, p] * bilinear(value_l[b, :, :, h], loc)
                   (the inner sum of Deformable DETR's Eq. 3, per head, value already projected)

Bilinear sampling puts pixel centres at (i + 0.5) / W and reads zeros outside the map, i.e. exactly
`F.grid_sample(align_corners=False, padding_mode="zeros")` -- the same op as Deformable DETR's CUDA
kernel, so the two can be swapped.

Backends
  "triton"  forward and backward Triton kernels (fp32 accumulation; fp32/fp16/bf16 inputs; 64-bit
            offsets; value gradient accumulated with atomics). Runs on CUDA tensors, and on CPU tensors
            when TRITON_INTERPRET=1 is set before triton is imported (that is how the tests run it).
  "torch"   exact PyTorch path for CPU (and any device): gathers the 4 bilinear corners straight from
            the flattened value map (no transposed per-level copy as in `ms_deform_attn_grid_sample`),
            with a hand-written backward (how it is made fast: see the PyTorch path section).
  "auto"    Triton for CUDA tensors when triton is importable, PyTorch otherwise.

Also here: `MSDeformAttn` (the Deformable DETR module, with its initialisation), `flatten_levels`, and the
`grid_sample` formulation `ms_deform_attn_grid_sample` (the speed baseline).
Benchmarks and the ahead-of-time compile check of the kernels are in bench.py (not needed to use this file).
"""
import contextlib
import math
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

try:  # optional: the PyTorch path works where triton is absent (macOS, Windows, CPU-only installs)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is not installed
    triton = None
    tl = None

__all__ = ["ms_deform_attn", "ms_deform_attn_grid_sample", "MSDeformAttn", "flatten_levels"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------
# Public op
# ----------------------------------------------------------------------------------------------

def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                   backend="auto"):
    """Multi-scale deformable attention (Deformable DETR's op, see the module docstring).

    value [B, S, H, C]; spatial_shapes [L, 2] int64 (H_l, W_l); level_start_index [L] int64;
    sampling_locations [B, Q, H, L, P, 2] (x, y) in [0, 1]; attention_weights [B, Q, H, L, P];
    backend "auto" | "triton" | "torch". Returns [B, Q, H*C] in value's dtype. Malformed inputs raise
    ValueError naming the argument and the expected shape; inputs may be non-contiguous and of mixed
    float dtypes (e.g. bf16 value with fp32 locations under AMP).
    """
    _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    backend = _resolve_backend(backend, value)
    spatial_shapes = spatial_shapes.to(value.device).contiguous()
    level_start_index = level_start_index.to(value.device).contiguous()
    return _MSDAFunction.apply(backend, value, spatial_shapes, level_start_index, sampling_locations,
                               attention_weights)


def _resolve_backend(backend, value):
    """Returns "triton" or "torch" for the requested backend and the tensors' device."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f'backend: expected "auto", "triton" or "torch", got {backend!r}')
    if backend == "auto":
        return "triton" if (value.is_cuda and triton is not None) else "torch"
    if backend == "triton" and triton is None:
        raise ValueError('backend: "triton" was requested but triton is not installed; use "torch"')
    if backend == "triton" and not value.is_cuda and not _TRITON_INTERPRETED:
        raise ValueError(f'backend: "triton" needs CUDA tensors (got {value.device}), or TRITON_INTERPRET=1 '
                         'set before triton is imported to run the kernels on CPU tensors; use "torch"')
    return backend


def _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Raises ValueError naming the argument and the expected shape/dtype for any malformed input."""
    args = dict(value=value, spatial_shapes=spatial_shapes, level_start_index=level_start_index,
                sampling_locations=sampling_locations, attention_weights=attention_weights)
    for name, t in args.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    for name in ("value", "sampling_locations", "attention_weights"):
        if args[name].dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name}: expected a float16/bfloat16/float32/float64 tensor, "
                             f"got {args[name].dtype}")
    if value.dim() != 4:
        raise ValueError(f"value: expected shape [B, S, H, C], got {list(value.shape)}")
    B, S, H, C = value.shape
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2 or spatial_shapes.shape[0] == 0:
        raise ValueError(f"spatial_shapes: expected shape [L, 2] (H_l, W_l) with L >= 1, "
                         f"got {list(spatial_shapes.shape)}")
    if spatial_shapes.dtype != torch.int64:
        raise ValueError(f"spatial_shapes: expected an int64 tensor [L, 2], got {spatial_shapes.dtype}")
    L = spatial_shapes.shape[0]
    if level_start_index.shape != (L,) or level_start_index.dtype != torch.int64:
        raise ValueError(f"level_start_index: expected an int64 tensor of shape [L] = [{L}], "
                         f"got {level_start_index.dtype} {list(level_start_index.shape)}")
    loc = sampling_locations
    if loc.dim() != 6 or loc.shape[0] != B or loc.shape[2] != H or loc.shape[3] != L or loc.shape[5] != 2:
        raise ValueError(f"sampling_locations: expected shape [B, Q, H, L, P, 2] = "
                         f"[{B}, Q, {H}, {L}, P, 2], got {list(loc.shape)}")
    Q, P = loc.shape[1], loc.shape[4]
    if tuple(attention_weights.shape) != (B, Q, H, L, P):
        raise ValueError(f"attention_weights: expected shape [B, Q, H, L, P] = [{B}, {Q}, {H}, {L}, {P}] "
                         f"(matching sampling_locations), got {list(attention_weights.shape)}")
    for name in ("sampling_locations", "attention_weights", "spatial_shapes", "level_start_index"):
        allowed = (value.device,) if name in ("sampling_locations", "attention_weights") else \
            (value.device, torch.device("cpu"))
        if args[name].device not in allowed:
            raise ValueError(f"{name}: expected a tensor on {value.device} (value's device), "
                             f"got {args[name].device}")
    # Checking the contents needs them on the host; on a GPU that would be a sync per call, so
    # shapes passed on the GPU (flatten_levels does, consistently by construction) are trusted.
    if spatial_shapes.device.type == "cpu":
        _check_level_contents(spatial_shapes, level_start_index, S)


def _check_level_contents(spatial_shapes, level_start_index, S):
    """Raises ValueError unless the levels are non-empty, cover S rows and start where they should."""
    if bool((spatial_shapes <= 0).any()):
        raise ValueError(f"spatial_shapes: expected positive (H_l, W_l), got {spatial_shapes.tolist()}")
    sizes = spatial_shapes.prod(1)
    if int(sizes.sum()) != S:
        raise ValueError(f"value: expected S = sum_l H_l*W_l = {int(sizes.sum())} rows for "
                         f"spatial_shapes {spatial_shapes.tolist()}, got S = {S}")
    if level_start_index.device.type == "cpu":
        starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
        if not torch.equal(level_start_index, starts):
            raise ValueError(f"level_start_index: expected {starts.tolist()} (exclusive cumsum of "
                             f"H_l*W_l), got {level_start_index.tolist()}")


# ----------------------------------------------------------------------------------------------
# Baseline: the per-level grid_sample formulation (Deformable DETR's ms_deform_attn_core_pytorch)
# ----------------------------------------------------------------------------------------------

def ms_deform_attn_grid_sample(value, spatial_shapes, level_start_index, sampling_locations,
                               attention_weights):
    """The grid_sample formulation of MSDA: slow (it transposes every level to [B*H, C, H_l, W_l] and
    expands the samples to [B*H, C, Q, L*P]) but obviously right; bench.py measures against it."""
    B, S, H, C = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    grids = 2 * sampling_locations - 1                     # grid_sample wants [-1, 1]
    sampled = []
    for l, (value_l, (h_l, w_l)) in enumerate(zip(value.split(sizes, dim=1), spatial_shapes.tolist())):
        value_l = value_l.flatten(2).transpose(1, 2).reshape(B * H, C, h_l, w_l)
        grid_l = grids[:, :, :, l].transpose(1, 2).flatten(0, 1)               # [B*H, Q, P, 2]
        sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))                     # [B*H, C, Q, P]
    weights = attention_weights.transpose(1, 2).reshape(B * H, 1, Q, L * P)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)         # [B*H, C, Q]
    return out.view(B, H * C, Q).transpose(1, 2).contiguous()


# ----------------------------------------------------------------------------------------------
# PyTorch path
# ----------------------------------------------------------------------------------------------
#
# Every sample (b, q, h, l, p) reads 4 corner rows of the flattened value map viewed as a table
# V [B*S*H, C]; with the bilinear and attention weights folded into one weight per corner ("tap"),
# an output row r = (b, q, h) is a weighted sum of K = 4*L*P table rows:
#     out[r] = sum_k w[r, k] * V[idx[r, k]]        i.e. out = A @ V with A sparse [B*Q*H, B*S*H].
# Forward:  F.embedding_bag(idx, V, per_sample_weights=w, mode="sum"): a fused gather + weighted sum
#           that never materialises the gathered [R, K, C] tensor.
# Backward: dL/dV = A^T g: one index_add_ of w[r, k] * g[r] into rows idx[r, k];
#           dL/dw[r, k] = <g[r], V[idx[r, k]]>: a sampled dense-dense product (torch.sparse.sampled_addmm
#           on CPU -- again no gathered tensor --, gather + bmm on other devices);
#           dL/dattention, dL/dlocation: the chain rule from dL/dw through the separable bilinear
#           weights, a few elementwise ops on [n, 2, 2, L*P].
# The taps are recomputed in the backward (cheap) rather than saved, and rows are processed in
# chunks: temporaries stay small and are reused by the allocator instead of being page-faulted in
# fresh on every call.

_CPU_ROWS_PER_CHUNK = 16384     # output rows whose taps are built together (amortises per-op overhead)
_CPU_ROWS_PER_SCATTER = 512     # rows per index_add_ (its source of n*K*C values should stay cache-sized)
_CPU_TAPS_PER_ROW_TRANSPOSED = 16   # taps per value row from which the value gradient scatters transposed
_GPU_TAPS_PER_CHUNK = 1 << 20    # bounds the [n, K, C] gather/scatter scratch on GPU


class _LevelGeometry:
    """Per-level constants of the flattened value map, expanded over the P points of each level so
    that per-sample tensors [n, ..., L*P] broadcast against them along whole contiguous L*P rows
    (PyTorch's CPU loops pay a fixed cost per innermost run, so runs must be long, not of length 2).
    Indices are int64 throughout: 64-bit offsets, and index_add_ is slower with int32 indices.
    """

    def __init__(self, spatial_shapes, level_start_index, B, S, H, P, dtype):
        wh = spatial_shapes.flip(-1).repeat_interleave(P, dim=0).t().contiguous()   # [2, L*P] (W_l; H_l)
        self.size = wh.to(dtype)                                              # pixel scale of x; y
        self.hi = self.size + 1                                               # clamp bound W+1; H+1
        width = wh[0]                                                         # [L*P]
        self.start = level_start_index.repeat_interleave(P) * H               # first row of the level
        self.width_rows = width * H                                           # rows per image row
        # row offsets of the corners (y0,x0) (y0,x0+1) (y0+1,x0) (y0+1,x0+1) from the first one
        self.corner = torch.stack([torch.zeros_like(width), torch.ones_like(width), width, width + 1]) * H
        self.num_rows = B * S * H
        self.H, self.S = H, S


class _Taps(NamedTuple):
    """Bilinear taps of a chunk of n output rows; K = 4*L*P taps per row, ordered (corner y, x; l, p)."""
    idx: torch.Tensor        # [n, K] rows of the value table (clamped into range)
    w: torch.Tensor          # [n, K] attention * bilinear weight, zero for corners outside the map
    tent: torch.Tensor       # [n, 2 (axis x, y), 2 (lower, upper neighbour), L*P] bilinear weights
    inside: torch.Tensor     # same shape, 1.0 where the neighbour lies inside the map, else 0.0


def _bilinear_taps(geo, loc, attn, rows, QH):
    """Taps of the samples of `rows` (a range of flattened (b, q, h)); loc [n, L*P, 2], attn [n, L*P]."""
    n = loc.shape[0]
    # pixel coordinates [n, 2 (x, y), L*P]; points far outside are clamped to where all 4 corners are
    # outside, which keeps value and gradient exactly zero there and the indices small
    xy = torch.addcmul(geo.size.new_full((), -0.5), loc.transpose(1, 2).contiguous(), geo.size)
    xy = torch.minimum(xy.clamp_(min=-2.0), geo.hi)
    xy0 = xy.floor()
    frac = xy.sub_(xy0)
    # neighbour k = x0 (lower) or x0 + 1 (upper) is inside iff 0 <= k <= W-1: for integral k that is
    # clamp(k+1, 0, 1) * clamp(W-k, 0, 1) -- float arithmetic, cheaper than building bool masks
    neighbour = xy0.unsqueeze(2) + geo.size.new_tensor([[0.0], [1.0]])       # [n, 2, 2, L*P]
    inside = (neighbour + 1).clamp_(0, 1).mul_((geo.size.unsqueeze(1) - neighbour).clamp_(0, 1))
    tent = torch.stack([1 - frac, frac], dim=2).mul_(inside)
    wx, wy = tent[:, 0], tent[:, 1]                                            # [n, 2, L*P]
    w = (wy * attn.unsqueeze(1)).unsqueeze(2) * wx.unsqueeze(1)                # [n, 2 (y), 2 (x), L*P]
    r = torch.arange(rows.start, rows.stop, device=loc.device)
    row_base = (r // QH) * (geo.S * geo.H) + r % geo.H                         # (b*S)*H + h
    i0 = xy0.long()
    first = (i0[:, 1] * geo.width_rows).add_(i0[:, 0] * geo.H).add_(geo.start).add_(row_base.unsqueeze(1))
    idx = (first.unsqueeze(1) + geo.corner).clamp_(0, geo.num_rows - 1)       # [n, 4, L*P]
    return _Taps(idx.view(n, -1), w.view(n, -1), tent, inside)


def _row_chunks(R, K, device):
    """Ranges of output rows processed together (bounded temporaries; on CPU also cache-sized)."""
    step = _CPU_ROWS_PER_CHUNK if device.type == "cpu" else max(1, _GPU_TAPS_PER_CHUNK // K)
    return [range(r, min(r + step, R)) for r in range(0, R, step)]


def _compute_dtype(*tensors):
    """float64 if any input is float64, else float32: the PyTorch path always accumulates in fp32+."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _torch_forward(value, spatial_shapes, level_start_index, loc, attn, keep_taps=None):
    """out [B, Q, H*C] (compute dtype) of the PyTorch path. keep_taps: a list that receives each chunk's _Taps, for
    the backward to reuse instead of recomputing them."""
    B, S, H, C = value.shape
    Q, L, P = loc.shape[1], loc.shape[3], loc.shape[4]
    dtype = _compute_dtype(value, loc, attn)
    R, K = B * Q * H, 4 * L * P
    geo = _LevelGeometry(spatial_shapes, level_start_index, B, S, H, P, dtype)
    table = value.to(dtype).reshape(B * S * H, C)                              # rows (b, s, h)
    loc = loc.to(dtype).reshape(R, L * P, 2)
    attn = attn.to(dtype).reshape(R, L * P)
    chunks = _row_chunks(R, K, value.device)
    out = None if len(chunks) == 1 else table.new_empty(R, C)
    for rows in chunks:
        taps = _bilinear_taps(geo, loc[rows.start:rows.stop], attn[rows.start:rows.stop], rows, Q * H)
        if keep_taps is not None:
            keep_taps.append(taps)
        part = F.embedding_bag(taps.idx, table, per_sample_weights=taps.w, mode="sum")   # [n, C]
        if out is None:
            out = part
        else:
            out[rows.start:rows.stop] = part
    return out.view(B, Q, H * C)


def _tap_grads(table, taps, grad_rows, sparse):
    """dL/dw[r, k] = <grad_rows[r], table[idx[r, k]]>  ->  [n, K]."""
    n, K = taps.idx.shape
    if sparse:
        # sampled dense-dense product: the dot products without materialising the [n, K, C] gather
        # (the pattern's values are ignored with beta=0; w merely lends its storage)
        crow = torch.arange(0, n * K + 1, K, device=table.device)
        pattern = torch.sparse_csr_tensor(crow, taps.idx.reshape(-1), taps.w.reshape(-1),
                                          size=(n, table.shape[0]), check_invariants=False)
        return torch.sparse.sampled_addmm(pattern, grad_rows, table.t(), beta=0.0).values().view(n, K)
    return torch.bmm(table[taps.idx.reshape(-1)].view(n, K, -1), grad_rows.unsqueeze(-1)).view(n, K)


def _scatter_value_grad(grad_table, taps, grad_rows, source, transposed):
    """grad_table[idx[r, k]] += w[r, k] * grad_rows[r]  (dL/dV = A^T g), in cache-sized pieces. transposed: grad_table
    is held as [C, rows] -- PyTorch's CPU scatter splits its work over the dimension it does not scatter along, so
    along the table's rows each thread streams whole channels (contiguous source, one channel's row in cache), where
    along dim 0 of [rows, C] it strides across the channels of every tap."""
    n, K = taps.idx.shape
    C = grad_rows.shape[1]
    step = source.numel() // (C * K)
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        if transposed:
            src = torch.mul(grad_rows.t()[:, lo:hi, None], taps.w[None, lo:hi],
                            out=source[:C * (hi - lo) * K].view(C, hi - lo, K))
            grad_table.index_add_(1, taps.idx[lo:hi].reshape(-1), src.view(C, -1))
        else:
            src = torch.mul(taps.w[lo:hi, :, None], grad_rows[lo:hi, None],
                            out=source[:C * (hi - lo) * K].view(hi - lo, K, C))
            grad_table.index_add_(0, taps.idx[lo:hi].reshape(-1), src.view(-1, C))


def _torch_backward(value, spatial_shapes, level_start_index, loc, attn, grad_out, needs, kept_taps=None):
    """(grad value, grad loc, grad attn) of the PyTorch path, None where not needed; kept_taps: the forward's, per
    chunk, or None to recompute them."""
    B, S, H, C = value.shape
    Q, L, P = loc.shape[1], loc.shape[3], loc.shape[4]
    dtype = _compute_dtype(value, loc, attn)
    R, K, LP = B * Q * H, 4 * L * P, L * P
    geo = _LevelGeometry(spatial_shapes, level_start_index, B, S, H, P, dtype)
    table = value.to(dtype).reshape(B * S * H, C)
    loc_r = loc.to(dtype).reshape(R, LP, 2)
    attn_r = attn.to(dtype).reshape(R, LP)
    grad_rows = grad_out.to(dtype).reshape(R, C)
    need_value, need_taps = needs[0], needs[3] or needs[4]
    # transposed pays where the taps far outnumber the table's rows (self-attention: K taps per value row); where a few
    # queries read large maps (a decoder) a channel's row no longer stays in cache and the final transpose copies the
    # whole table for few taps
    transposed = value.device.type == "cpu" and R * K >= _CPU_TAPS_PER_ROW_TRANSPOSED * table.shape[0]
    grad_table = None
    if need_value:
        grad_table = table.new_zeros(C, table.shape[0]) if transposed else torch.zeros_like(table)
    grad_loc = loc_r.new_empty(R, LP, 2) if need_taps else None
    grad_attn = attn_r.new_empty(R, LP) if need_taps else None
    chunks = _row_chunks(R, K, value.device)
    scatter_rows = _CPU_ROWS_PER_SCATTER if value.device.type == "cpu" else len(chunks[0])
    source = table.new_empty(min(scatter_rows, R) * K * C) if need_value else None   # reused scratch
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support is in beta.*")
        for i, rows in enumerate(chunks):
            lo, hi = rows.start, rows.stop
            taps = kept_taps[i] if kept_taps else _bilinear_taps(geo, loc_r[lo:hi], attn_r[lo:hi], rows, Q * H)
            g = grad_rows[lo:hi]                                               # [n, C]
            if need_value:
                _scatter_value_grad(grad_table, taps, g, source, transposed)
            if need_taps:
                # w = a * wy * wx per corner (y, x): chain rule through the separable bilinear weights
                gw = _tap_grads(table, taps, g, sparse=value.device.type == "cpu")
                gw = gw.view(-1, 2, 2, LP)                                     # [n, 2 (y), 2 (x), L*P]
                wx, wy = taps.tent[:, 0], taps.tent[:, 1]                      # [n, 2, L*P]
                per_y = torch.addcmul(gw[:, :, 0] * wx[:, 0:1], gw[:, :, 1], wx[:, 1:2])   # [n, 2 (y), L*P]
                per_x = torch.addcmul(gw[:, 0] * wy[:, 0:1], gw[:, 1], wy[:, 1:2])         # [n, 2 (x), L*P]
                grad_attn[lo:hi] = torch.addcmul(per_y[:, 0] * wy[:, 0], per_y[:, 1], wy[:, 1])
                # d tent / d frac is -inside for the lower and +inside for the upper neighbour
                inside = taps.inside
                g_frac = torch.stack([per_x[:, 1] * inside[:, 0, 1] - per_x[:, 0] * inside[:, 0, 0],
                                      per_y[:, 1] * inside[:, 1, 1] - per_y[:, 0] * inside[:, 1, 0]], 1)
                g_loc = g_frac.mul_(attn_r[lo:hi].unsqueeze(1)).mul_(geo.size)  # d frac / d loc = W; H
                grad_loc[lo:hi] = g_loc.transpose(1, 2)
    if transposed and need_value:
        grad_table = grad_table.t()
    return (grad_table.reshape(B, S, H, C).to(value.dtype) if need_value else None,
            grad_loc.view(loc.shape).to(loc.dtype) if need_taps else None,
            grad_attn.view(attn.shape).to(attn.dtype) if need_taps else None)


# ----------------------------------------------------------------------------------------------
# Triton path
# ----------------------------------------------------------------------------------------------
#
# One program handles BLOCK_Q queries of one (batch, head) and a block of channels: it walks the
# L*P samples of those queries, computes the 4 corners of each, and gathers/accumulates [BLOCK_Q,
# BLOCK_C] tiles whose channel axis is contiguous in memory (coalesced rows). Arithmetic is fp32 (fp64
# for fp64 inputs, so gradcheck can run);
# every offset is formed in int64 (so tensors past 2^31 elements are fine); inputs are addressed
# through their strides (no .contiguous() copies). The backward owns its queries' location/attention
# gradients (all channels are summed inside one program, no atomics) and scatters the value gradient
# with fp32 atomics into a zeroed buffer; neither kernel is autotuned (re-running an atomic kernel
# for timing would double-count), launch parameters come from `launch_config`.

if triton is not None:

    @triton.jit
    def _msda_sample(loc_ptrs, attn_ptrs, l_sxy, q_ok, h_l, w_l, start, ACC: tl.constexpr):
        """Loads one sample (l, p) of BLOCK_Q queries; returns its attention weight a, fractions
        (fx, fy), and the spatial rows (int64, into S) and in-map masks of its corners (y0,x0)
        (y0,x0+1) (y0+1,x0) (y0+1,x0+1)."""
        x = tl.load(loc_ptrs, mask=q_ok, other=0.0).to(ACC) * w_l.to(ACC) - 0.5
        y = tl.load(loc_ptrs + l_sxy, mask=q_ok, other=0.0).to(ACC) * h_l.to(ACC) - 0.5
        a = tl.load(attn_ptrs, mask=q_ok, other=0.0).to(ACC)
        # clamp far-away points to where all corners are outside (-2, not -1: at -1 the corner at 0
        # would still get a slope); keeps the int32 casts in range
        x = tl.minimum(tl.maximum(x, -2.0), w_l.to(ACC) + 1.0)
        y = tl.minimum(tl.maximum(y, -2.0), h_l.to(ACC) + 1.0)
        x0f = tl.floor(x)
        y0f = tl.floor(y)
        x0 = x0f.to(tl.int32)
        y0 = y0f.to(tl.int32)
        okx0 = (x0 >= 0) & (x0 < w_l)
        okx1 = (x0 >= -1) & (x0 < w_l - 1)
        oky0 = q_ok & (y0 >= 0) & (y0 < h_l)
        oky1 = q_ok & (y0 >= -1) & (y0 < h_l - 1)
        row00 = start + y0.to(tl.int64) * w_l + x0
        return (a, x - x0f, y - y0f, row00, row00 + 1, row00 + w_l, row00 + w_l + 1,
                oky0 & okx0, oky0 & okx1, oky1 & okx0, oky1 & okx1)

    @triton.jit
    def _msda_fwd_kernel(
        value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, out_ptr,
        Q, H, C,
        v_sb, v_ss, v_sh, v_sc,
        l_sb, l_sq, l_sh, l_sl, l_sp, l_sxy,
        a_sb, a_sq, a_sh, a_sl, a_sp,
        o_sb, o_sq, o_sh,
        L: tl.constexpr, P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr,
        ACC: tl.constexpr,
    ):
        pid_q = tl.program_id(0)
        pid_bh = tl.program_id(1)
        pid_c = tl.program_id(2)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        q_ok = q < Q
        c_ok = c < C
        q64 = q.to(tl.int64)
        value_head = value_ptr + b * v_sb + h * v_sh + c.to(tl.int64)[None, :] * v_sc   # [1, BLOCK_C]
        loc_q = loc_ptr + b * l_sb + h * l_sh + q64 * l_sq                                # [BLOCK_Q]
        attn_q = attn_ptr + b * a_sb + h * a_sh + q64 * a_sq
        acc = tl.zeros([BLOCK_Q, BLOCK_C], dtype=ACC)
        for l in range(L):
            h_l = tl.load(shapes_ptr + 2 * l)
            w_l = tl.load(shapes_ptr + 2 * l + 1)
            start = tl.load(starts_ptr + l)
            for p in tl.static_range(P):
                a, fx, fy, r00, r01, r10, r11, m00, m01, m10, m11 = _msda_sample(
                    loc_q + l * l_sl + p * l_sp, attn_q + l * a_sl + p * a_sp, l_sxy, q_ok, h_l, w_l, start, ACC)
                v00 = tl.load(value_head + r00[:, None] * v_ss, mask=m00[:, None] & c_ok[None, :], other=0.0)
                v01 = tl.load(value_head + r01[:, None] * v_ss, mask=m01[:, None] & c_ok[None, :], other=0.0)
                v10 = tl.load(value_head + r10[:, None] * v_ss, mask=m10[:, None] & c_ok[None, :], other=0.0)
                v11 = tl.load(value_head + r11[:, None] * v_ss, mask=m11[:, None] & c_ok[None, :], other=0.0)
                top = v00.to(ACC) * (1.0 - fx)[:, None] + v01.to(ACC) * fx[:, None]
                bottom = v10.to(ACC) * (1.0 - fx)[:, None] + v11.to(ACC) * fx[:, None]
                acc += (top * (1.0 - fy)[:, None] + bottom * fy[:, None]) * a[:, None]
        out = out_ptr + b * o_sb + h * o_sh + q64[:, None] * o_sq + c[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=q_ok[:, None] & c_ok[None, :])

    @triton.jit
    def _msda_bwd_corner(value_head, grad_head, v_ss, g_ss, row, ok, c_ok, g, weight):
        """Scatters weight*g into the value gradient at one corner; returns <g, value corner> per query."""
        mask = ok[:, None] & c_ok[None, :]
        v = tl.load(value_head + row[:, None] * v_ss, mask=mask, other=0.0).to(g.dtype)
        tl.atomic_add(grad_head + row[:, None] * g_ss, g * weight[:, None], mask=mask, sem="relaxed")
        return tl.sum(v * g, axis=1)

    @triton.jit
    def _msda_bwd_kernel(
        value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, grad_out_ptr,
        grad_value_ptr, grad_loc_ptr, grad_attn_ptr,
        Q, H, C,
        v_sb, v_ss, v_sh, v_sc,
        l_sb, l_sq, l_sh, l_sl, l_sp, l_sxy,
        a_sb, a_sq, a_sh, a_sl, a_sp,
        go_sb, go_sq, go_sh, go_sc,
        gv_sb, gv_ss, gv_sh,
        L: tl.constexpr, P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr,
        NUM_C_BLOCKS: tl.constexpr, ACC: tl.constexpr,
    ):
        pid_q = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        q_ok = q < Q
        q64 = q.to(tl.int64)
        loc_q = loc_ptr + b * l_sb + h * l_sh + q64 * l_sq
        attn_q = attn_ptr + b * a_sb + h * a_sh + q64 * a_sq
        go_q = grad_out_ptr + b * go_sb + h * go_sh + q64 * go_sq                  # [BLOCK_Q]
        # location/attention gradients are written contiguously as [B, Q, H, L, P, (2)]
        sample_q = ((b * Q + q64) * H + h) * (L * P)
        for l in range(L):
            h_l = tl.load(shapes_ptr + 2 * l)
            w_l = tl.load(shapes_ptr + 2 * l + 1)
            start = tl.load(starts_ptr + l)
            for p in tl.static_range(P):
                a, fx, fy, r00, r01, r10, r11, m00, m01, m10, m11 = _msda_sample(
                    loc_q + l * l_sl + p * l_sp, attn_q + l * a_sl + p * a_sp, l_sxy, q_ok, h_l, w_l, start, ACC)
                w00 = a * (1.0 - fy) * (1.0 - fx)
                w01 = a * (1.0 - fy) * fx
                w10 = a * fy * (1.0 - fx)
                w11 = a * fy * fx
                # <grad_out, corner value>: the gradient of the output w.r.t. each folded tap weight
                d00 = tl.zeros([BLOCK_Q], dtype=ACC)
                d01 = tl.zeros([BLOCK_Q], dtype=ACC)
                d10 = tl.zeros([BLOCK_Q], dtype=ACC)
                d11 = tl.zeros([BLOCK_Q], dtype=ACC)
                for cb in tl.static_range(NUM_C_BLOCKS):
                    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
                    c_ok = c < C
                    c64 = c.to(tl.int64)[None, :]
                    g = tl.load(go_q[:, None] + c64 * go_sc, mask=q_ok[:, None] & c_ok[None, :],
                                other=0.0).to(ACC)
                    value_head = value_ptr + b * v_sb + h * v_sh + c64 * v_sc
                    grad_head = grad_value_ptr + b * gv_sb + h * gv_sh + c64
                    d00 += _msda_bwd_corner(value_head, grad_head, v_ss, gv_ss, r00, m00, c_ok, g, w00)
                    d01 += _msda_bwd_corner(value_head, grad_head, v_ss, gv_ss, r01, m01, c_ok, g, w01)
                    d10 += _msda_bwd_corner(value_head, grad_head, v_ss, gv_ss, r10, m10, c_ok, g, w10)
                    d11 += _msda_bwd_corner(value_head, grad_head, v_ss, gv_ss, r11, m11, c_ok, g, w11)
                # out = a * sum_corners bilinear * v; masked (outside) corners contributed d = 0
                g_attn = (1.0 - fy) * ((1.0 - fx) * d00 + fx * d01) + fy * ((1.0 - fx) * d10 + fx * d11)
                g_fx = a * ((1.0 - fy) * (d01 - d00) + fy * (d11 - d10))
                g_fy = a * ((1.0 - fx) * (d10 - d00) + fx * (d11 - d01))
                sample = sample_q + (l * P + p)
                tl.store(grad_attn_ptr + sample, g_attn, mask=q_ok)
                tl.store(grad_loc_ptr + 2 * sample, g_fx * w_l.to(ACC), mask=q_ok)
                tl.store(grad_loc_ptr + 2 * sample + 1, g_fy * h_l.to(ACC), mask=q_ok)


# under TRITON_INTERPRET=1 triton.jit returns interpreted functions, which run on CPU tensors
_TRITON_INTERPRETED = triton is not None and type(_msda_fwd_kernel).__name__ == "InterpretedFunction"


class LaunchConfig(NamedTuple):
    """Everything a launch of one MSDA kernel fixes besides its arguments."""
    block_q: int
    block_c: int
    num_warps: int
    num_stages: int
    grid: tuple


# SM counts of the reference GPU of each compute capability, for ahead-of-time checks (A100, H100);
# a real launch reads its own device's count.
AOT_TARGET_SMS = {80: 108, 90: 132}


def launch_config(kernel, B, Q, H, C, dtype, arch, num_sms):
    """The launch configuration of kernel "fwd" or "bwd" -- a pure function of the problem sizes, the
    value dtype and the target (compute capability `arch`, e.g. 90, and its SM count; arch 0 and one
    SM for the CPU interpreter). The launcher and bench.py's compile check both call it, so what is
    compiled ahead of time is what a GPU run launches.

    Channel tiles are up to 64 wide (32 for fp64, whose fp64 accumulators double the registers);
    query tiles shrink from 64 until the grid has at least ~2 programs per SM (the decoder's Q=200,
    B*H=16 would otherwise fill 64 programs of 132 SMs). Warps: one per 512 tile elements in the
    forward, one per 256 in the backward, which holds four corner tiles and the gradient tile at
    once and needs the extra threads' registers not to spill. The kernels gather rows through
    pointers, which Triton does not software-pipeline, so one stage: more would buy no overlap, only
    shared memory."""
    block_c = min(32 if dtype == torch.float64 else 64, triton.next_power_of_2(max(C, 1)))
    block_q = 64
    while block_q > 16 and B * H * triton.cdiv(Q, block_q) < 2 * num_sms:
        block_q //= 2
    num_warps = max(2, min(8, block_q * block_c // (512 if kernel == "fwd" else 256)))
    grid = (triton.cdiv(Q, block_q), B * H) + ((triton.cdiv(C, block_c),) if kernel == "fwd" else ())
    return LaunchConfig(block_q, block_c, num_warps, 1, grid)


def _device_target(device):
    """(arch, num_sms) of the device a launch runs on; (0, 1) for the CPU interpreter."""
    if device.type != "cuda":
        return 0, 1
    props = torch.cuda.get_device_properties(device)
    return props.major * 10 + props.minor, props.multi_processor_count


def _triton_acc(*tensors):
    """Accumulation type of the kernels: fp32, or fp64 when an input is fp64 (so gradcheck can run)."""
    return tl.float64 if _compute_dtype(*tensors) == torch.float64 else tl.float32


def _device_guard(device):
    """Launches must happen on the tensors' own GPU (else the kernel silently writes zeros)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _fwd_launch(value, spatial_shapes, level_start_index, loc, attn, out, target=None):
    """(LaunchConfig, positional args, meta-parameters) of one forward launch; out is [B, Q, H, C];
    target (arch, num_sms) defaults to the value's device."""
    B, S, H, C = value.shape
    Q, L, P = loc.shape[1], loc.shape[3], loc.shape[4]
    cfg = launch_config("fwd", B, Q, H, C, value.dtype, *(target or _device_target(value.device)))
    args = (value, spatial_shapes, level_start_index, loc, attn, out,
            Q, H, C, *value.stride(), *loc.stride(), *attn.stride(), *out.stride()[:3])
    return cfg, args, dict(L=L, P=P, BLOCK_Q=cfg.block_q, BLOCK_C=cfg.block_c,
                           ACC=_triton_acc(value, loc, attn), num_warps=cfg.num_warps,
                           num_stages=cfg.num_stages)


def _triton_forward(value, spatial_shapes, level_start_index, loc, attn):
    B, S, H, C = value.shape
    out = value.new_empty(B, loc.shape[1], H, C)
    cfg, args, meta = _fwd_launch(value, spatial_shapes, level_start_index, loc, attn, out)
    with _device_guard(value.device):
        _msda_fwd_kernel[cfg.grid](*args, **meta)
    return out.view(B, loc.shape[1], H * C)


def _bwd_launch(value, spatial_shapes, level_start_index, loc, attn, grad_out, grad_value, grad_loc,
                grad_attn, target=None):
    """(LaunchConfig, positional args, meta-parameters) of one backward launch (target: as _fwd_launch)."""
    B, S, H, C = value.shape
    Q, L, P = loc.shape[1], loc.shape[3], loc.shape[4]
    cfg = launch_config("bwd", B, Q, H, C, value.dtype, *(target or _device_target(value.device)))
    args = (value, spatial_shapes, level_start_index, loc, attn, grad_out, grad_value, grad_loc, grad_attn,
            Q, H, C, *value.stride(), *loc.stride(), *attn.stride(), *grad_out.stride(),
            *grad_value.stride()[:3])
    return cfg, args, dict(L=L, P=P, BLOCK_Q=cfg.block_q, BLOCK_C=cfg.block_c,
                           NUM_C_BLOCKS=triton.cdiv(C, cfg.block_c), ACC=_triton_acc(value, loc, attn),
                           num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _triton_backward(value, spatial_shapes, level_start_index, loc, attn, grad_out):
    B, S, H, C = value.shape
    Q, L, P = loc.shape[1], loc.shape[3], loc.shape[4]
    grad_out = grad_out.reshape(B, Q, H, C)        # may stay strided: addressed by strides
    # fp32 (fp64 for fp64 inputs) buffers: atomics need a zeroed target, fp16/bf16 atomics lose mass
    acc = _compute_dtype(value, loc, attn)
    grad_value = torch.zeros(B, S, H, C, dtype=acc, device=value.device)
    grad_loc = torch.empty(B, Q, H, L, P, 2, dtype=acc, device=value.device)
    grad_attn = torch.empty(B, Q, H, L, P, dtype=acc, device=value.device)
    cfg, args, meta = _bwd_launch(value, spatial_shapes, level_start_index, loc, attn, grad_out,
                                  grad_value, grad_loc, grad_attn)
    with _device_guard(value.device):
        _msda_bwd_kernel[cfg.grid](*args, **meta)
    return grad_value.to(value.dtype), grad_loc.to(loc.dtype), grad_attn.to(attn.dtype)


class _MSDAFunction(torch.autograd.Function):
    """Autograd wrapper of both paths, first order only (the backward is hand-written)."""

    @staticmethod
    def forward(ctx, backend, value, spatial_shapes, level_start_index, loc, attn):
        ctx.backend = backend
        ctx.save_for_backward(value, spatial_shapes, level_start_index, loc, attn)
        B, Q, H, C = value.shape[0], loc.shape[1], value.shape[2], value.shape[3]
        if B * Q * H * C == 0:
            return value.new_zeros(B, Q, H * C)
        if backend == "triton":
            return _triton_forward(value, spatial_shapes, level_start_index, loc, attn)
        # on CPU the backward reuses the forward's taps rather than recomputing them; on a GPU, where the PyTorch
        # path serves only without Triton, they are recomputed rather than held ([B*Q*H, 4*L*P] indices and weights)
        keep = value.device.type == "cpu" and any(ctx.needs_input_grad)
        ctx.taps = [] if keep else None
        with torch.autocast(value.device.type, enabled=False):   # fp32 maths even inside autocast
            return _torch_forward(value, spatial_shapes, level_start_index, loc, attn, ctx.taps).to(value.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        value, spatial_shapes, level_start_index, loc, attn = ctx.saved_tensors
        if grad_out.numel() == 0:
            gv, gl, ga = torch.zeros_like(value), torch.zeros_like(loc), torch.zeros_like(attn)
        elif ctx.backend == "triton":
            gv, gl, ga = _triton_backward(value, spatial_shapes, level_start_index, loc, attn, grad_out)
        else:
            with torch.autocast(value.device.type, enabled=False):
                gv, gl, ga = _torch_backward(value, spatial_shapes, level_start_index, loc, attn, grad_out,
                                             ctx.needs_input_grad[1:], ctx.taps)
            ctx.taps = None
        return None, gv, None, None, gl, ga


# ----------------------------------------------------------------------------------------------
# Module
# ----------------------------------------------------------------------------------------------

def flatten_levels(features):
    """List of L feature maps [B, C, H_l, W_l] -> (value_input [B, S, C], spatial_shapes [L, 2] int64,
    level_start_index [L] int64), levels concatenated row-major in the given order; the index tensors
    live on the features' device (as the Triton kernels read them there)."""
    if not features:
        raise ValueError("features: expected a non-empty list of [B, C, H_l, W_l] tensors")
    for i, f in enumerate(features):
        if f.dim() != 4 or f.shape[:2] != features[0].shape[:2]:
            raise ValueError(f"features[{i}]: expected shape [B, C, H_l, W_l] = "
                             f"[{features[0].shape[0]}, {features[0].shape[1]}, H_l, W_l], got {list(f.shape)}")
    device = features[0].device
    value_input = torch.cat([f.flatten(2).transpose(1, 2) for f in features], dim=1)   # [B, S, C]
    spatial_shapes = torch.tensor([list(f.shape[-2:]) for f in features], dtype=torch.int64, device=device)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    return value_input, spatial_shapes, level_start_index


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module of Deformable DETR (Zhu et al. 2021, Eq. 3).

    Each query predicts, per head/level/point, a sampling offset (relative to its reference point or
    box) and an attention weight (softmax over the L*P samples of a head); the output is the
    projected sum of the sampled, projected values. `backend` ("auto" | "triton" | "torch") is a
    plain attribute passed to `ms_deform_attn`.
    """

    def __init__(self, d_model=256, n_levels=4, n_heads=8, n_points=4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model: expected a multiple of n_heads={n_heads}, got {d_model}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.backend = "auto"
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self):
        """Deformable DETR's initialisation: zero offset weights with a bias that points head h in
        direction 2*pi*h/n_heads (scaled onto the unit square's border) and point p at distance p+1
        pixels on every level; zero attention projection (so uniform weights 1/(L*P) at init);
        xavier-uniform value/output projections with zero biases."""
        nn.init.zeros_(self.sampling_offsets.weight)
        self.reset_offsets()
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def reset_offsets(self, level_sides=None):
        """The sampling offsets' bias: head h points in direction 2*pi*h/n_heads (scaled onto the unit square's
        border), point p at distance p+1 pixels of each level (Deformable DETR). level_sides: the shorter side, in
        pixels, of each level's map as the images will give it, or None. With it the init is scale-aware: on a level
        shorter than 2*n_points pixels the points are drawn in towards the reference so that the farthest sits at half
        the shorter side, where Deformable DETR's would leave the map (P pixels on a map of 2 x 3 at stride 64 of a
        128-pixel image); levels of 2*n_points pixels or more keep Deformable DETR's init. For references given as
        points (x, y); with boxes the offsets scale with the box, not the level."""
        H, L, P = self.n_heads, self.n_levels, self.n_points
        theta = torch.arange(H, dtype=torch.float32) * (2.0 * math.pi / H)
        direction = torch.stack([theta.cos(), theta.sin()], -1)                # [H, 2]
        direction = direction / direction.abs().max(-1, keepdim=True).values    # on the square's border
        distance = torch.arange(1, P + 1, dtype=torch.float32).view(1, 1, P, 1)
        if level_sides is not None:
            if len(level_sides) != L:
                raise ValueError(f"level_sides: expected {L} values (one per level), got {len(level_sides)}")
            shrink = torch.tensor([min(1.0, side / (2.0 * P)) for side in level_sides]).view(1, L, 1, 1)
            distance = distance * shrink                                          # [1, L, P, 1]
        grid = direction.view(H, 1, 1, 2) * distance                              # [H, 1 or L, P, 2]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.expand(H, L, P, 2).reshape(-1))

    def forward(self, query, reference_points, value_input, spatial_shapes, level_start_index,
                padding_mask=None, return_sampling=False):
        """query [B, Q, D]; reference_points [B, Q, L, 2] (x, y) or [B, Q, L, 4] (cx, cy, w, h),
        normalised to [0, 1]; value_input [B, S, D]; padding_mask [B, S] bool (True = padding) or None.
        Returns out [B, Q, D], plus (sampling_locations [B, Q, H, L, P, 2], attention_weights
        [B, Q, H, L, P]) when return_sampling=True."""
        L, D = self.n_levels, self.d_model
        if query.dim() != 3 or query.shape[-1] != D:
            raise ValueError(f"query: expected shape [B, Q, {D}], got {list(query.shape)}")
        B, Q = query.shape[:2]
        if value_input.dim() != 3 or value_input.shape[0] != B or value_input.shape[-1] != D:
            raise ValueError(f"value_input: expected shape [{B}, S, {D}], got {list(value_input.shape)}")
        S = value_input.shape[1]
        if reference_points.shape[:3] != (B, Q, L) or reference_points.shape[-1] not in (2, 4) \
                or reference_points.dim() != 4:
            raise ValueError(f"reference_points: expected shape [{B}, {Q}, {L}, 2] or [{B}, {Q}, {L}, 4], "
                             f"got {list(reference_points.shape)}")
        if spatial_shapes.shape != (L, 2):
            raise ValueError(f"spatial_shapes: expected shape [n_levels, 2] = [{L}, 2], "
                             f"got {list(spatial_shapes.shape)}")
        if padding_mask is not None and (padding_mask.shape != (B, S) or padding_mask.dtype != torch.bool):
            raise ValueError(f"padding_mask: expected a bool tensor [{B}, {S}], "
                             f"got {padding_mask.dtype} {list(padding_mask.shape)}")

        locations, weights = self.sampling(query, reference_points, spatial_shapes)
        out = self.read(value_input, spatial_shapes, level_start_index, locations, weights, padding_mask)
        return (out, locations, weights) if return_sampling else out

    def sampling(self, query, reference_points, spatial_shapes):
        """(sampling_locations [B, Q, H, L, P, 2], attention_weights [B, Q, H, L, P]) of `forward`: where each
        query reads and with what weight (they depend on the queries alone; `read` samples a value map with them)."""
        H, L, P = self.n_heads, self.n_levels, self.n_points
        B, Q = query.shape[:2]
        offsets = self.sampling_offsets(query).view(B, Q, H, L, P, 2)
        weights = self.attention_weights(query).view(B, Q, H, L * P).softmax(-1).view(B, Q, H, L, P)
        ref = reference_points[:, :, None, :, None, :]                            # [B, Q, 1, L, 1, 2|4]
        # one fused pass over the [B, Q, H, L, P, 2] offsets (addcmul): a chain of broadcast operations would make one
        # pass each, and these tensors are as large as the sampled values
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: normalise by (W_l, H_l)
            wh = spatial_shapes.flip(-1).to(device=offsets.device, dtype=offsets.dtype)   # [L, 2]
            return torch.addcmul(ref, offsets, 1.0 / wh[None, None, None, :, None, :]), weights
        # offsets are relative to the box: P points spread over half its width/height
        return torch.addcmul(ref[..., :2], offsets, ref[..., 2:] * (0.5 / P)), weights

    def read(self, value_input, spatial_shapes, level_start_index, locations, weights, padding_mask=None):
        """out [B, Q, D] of `forward` from `sampling`'s locations and weights: the projected sum of the sampled,
        projected values of value_input [B, S, D]."""
        B, S = value_input.shape[:2]
        value = self.value_proj(value_input)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)               # padded pixels read 0
        value = value.view(B, S, self.n_heads, self.d_model // self.n_heads)
        out = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights, self.backend)
        return self.output_proj(out)
