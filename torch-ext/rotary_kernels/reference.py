"""The pure-PyTorch reference that defines what every kernel computes.

Conventions (the same for every entry point of the package):

* ``x`` has head dim ``D`` last; ``cos``/``sin`` have a last dim ``R`` (the rotary dim,
  ``R`` even, ``R <= D``; an odd ``R == D`` is accepted too and computed exactly as
  transformers' ``apply_rotary_pos_emb`` does, by the reference) laid out like ``x``'s first ``R`` dims: for the half-split
  (``rotate_half``, Llama/NeoX) layout element ``j`` pairs with ``j + R/2``; for the
  interleaved (GPT-J ``rotate_every_two``) layout element ``2i`` pairs with ``2i + 1``.
  Dims ``R..D`` pass through unchanged (partial rotary).
* ``cos.unsqueeze(unsqueeze_dim)`` must broadcast against ``x`` (transformers' rule).
* Math runs in float32 (float64 for float64 inputs) and is rounded once to ``x.dtype``.

For ``R == D``, half-split, and cos/sin of ``x``'s dtype this is exactly transformers'
``apply_rotary_pos_emb`` up to that single rounding (eager rounds three times).

Two options of the public functions map onto these conventions:

* ``pair_tables=True``: cos/sin hold one entry per rotary pair (last dim ``R/2``; the tables of
  gpt-oss, flash-attn and vLLM): ``full_width_tables`` gives the layout above.
* ``conj=True``: the transpose of the rotation, ``x * cos - rotate(x * sin)``: the backward
  of the rotation and, for RoPE tables (both elements of a pair share their angle), the
  rotation by ``-theta``, ``x * cos - rotate(x) * sin`` (nanochat's ``apply_rotary_pos_emb``).
* ``swap_layout`` (internal: ``Plan``, the ops' trailing bool): the pairs are read in one layout
  and written in the other (``interleaved`` names the read one): x is rotated as above, then its
  first R dims are moved to the other layout (``swap_pair_layout``). DeepSeek-V3's MLA rope
  (transformers' ``apply_rotary_pos_emb_interleave``) is ``interleaved`` + ``swap_layout``: pairs
  read at ``(2i, 2i + 1)``, written at ``(i, i + R/2)``; its transpose (the backward) reads
  half-split and writes interleaved, with ``conj``. The kernels take it with per-pair tables only
  (pair ``i`` reads entry ``i`` whatever the layout; here, the full-width expansion in the read
  layout). Out of place only.

Separate tables for k (``cos_k``/``sin_k``, flash-attn's ``apply_rotary_emb_qkv_`` and
TransformerEngine's fused QKV rope): q rotates with (cos, sin) and k with (cos_k, sin_k), each
exactly as ``rotary_reference`` (or ``rotary_reference_indexed``) rotates it alone; every other
option applies to both pairs of tables alike.
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """transformers' rotate_half: [x1, x2] -> [-x2, x1], x1 the first ``n // 2`` elements (for
    an odd width n, x2 is one longer: transformers' result, which is no rotation)."""
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """GPT-J's rotate_every_two: (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((-x_odd, x_even), dim=-1).flatten(-2)


def full_width_tables(t: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Per-pair cos or sin ``[..., R/2]`` as the full-width table ``[..., R]``: pair ``i`` is
    elements ``(i, i + R/2)`` (half-split) or ``(2i, 2i + 1)`` (interleaved)."""
    return t.repeat_interleave(2, dim=-1) if interleaved else torch.cat((t, t), dim=-1)


def cat_like(parts, like: torch.Tensor) -> torch.Tensor:
    """``torch.cat(parts, -1)`` laid out in memory as ``like`` is (cat alone returns a contiguous
    tensor: a partial rotation of transformers' transposed q would come back in another layout
    than the kernels' outputs): the parts permuted into like's memory order, joined there, and
    permuted back. Views only, so autograd and torch.func see a plain cat."""
    perm = sorted(range(like.dim()), key=lambda d: (-like.stride(d), d))  # outer to inner
    inv = [perm.index(d) for d in range(like.dim())]
    return torch.cat([p.permute(perm) for p in parts], dim=perm.index(like.dim() - 1)).permute(inv)


def swap_pair_layout(x: torch.Tensor, r: int, interleaved: bool) -> torch.Tensor:
    """x's first ``r`` dims moved from one pair layout to the other: interleaved ``(2i, 2i + 1)``
    to half-split ``(i, i + r/2)`` when ``interleaved``, else back."""
    x_rot, x_pass = x[..., :r], x[..., r:]
    if interleaved:
        y = torch.cat((x_rot[..., 0::2], x_rot[..., 1::2]), dim=-1)
    else:
        y = torch.stack((x_rot[..., : r // 2], x_rot[..., r // 2 :]), dim=-1).flatten(-2)
    return cat_like((y, x_pass), x) if x_pass.shape[-1] else y


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def rotary_reference(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    unsqueeze_dim: int = 1,
    interleaved: bool = False,
    conj: bool = False,
    swap_layout: bool = False,
) -> torch.Tensor:
    """Rotate one tensor: ``x * cos + rotate(x) * sin`` on the first R dims; with ``conj`` the
    transpose of that rotation, ``x * cos - rotate(x * sin)`` (``rotate`` is antisymmetric);
    with ``swap_layout`` the result's pairs moved to the other layout (``swap_pair_layout``)."""
    r = cos.shape[-1]
    acc = compute_dtype(x.dtype)
    cos = cos.unsqueeze(unsqueeze_dim).to(acc)
    sin = sin.unsqueeze(unsqueeze_dim).to(acc)
    x_rot, x_pass = x[..., :r].to(acc), x[..., r:]
    rotate = rotate_every_two if interleaved else rotate_half
    out = (x_rot * cos - rotate(x_rot * sin) if conj else x_rot * cos + rotate(x_rot) * sin).to(x.dtype)
    if swap_layout:
        out = swap_pair_layout(out, r, interleaved)
    return cat_like((out, x_pass), x) if x_pass.shape[-1] else out


def apply_rotary_transformers_reference(q, k, cos, sin, unsqueeze_dim=1, interleaved=False, cos_k=None, sin_k=None):
    """Reference for ``apply_rotary_transformers``: q rotated with (cos, sin), k with
    (cos_k, sin_k) when given, else with (cos, sin) too."""
    if cos_k is None:
        cos_k, sin_k = cos, sin
    return (
        rotary_reference(q, cos, sin, unsqueeze_dim, interleaved),
        rotary_reference(k, cos_k, sin_k, unsqueeze_dim, interleaved),
    )


def apply_rotary_reference(x1, x2, cos, sin, conj=False):
    """Reference for flash-attn's elementwise ``apply_rotary``: returns (out1, out2)."""
    acc = compute_dtype(x1.dtype)
    c, s = cos.to(acc), sin.to(acc)
    if conj:
        s = -s
    a, b = x1.to(acc), x2.to(acc)
    return (a * c - b * s).to(x1.dtype), (a * s + b * c).to(x2.dtype)


# --------------------------------------------------------------------------------------------
# Token positions: cos/sin caches indexed by position, variable-length batches, offsets, mrope
# --------------------------------------------------------------------------------------------
#
# "Cache mode" (any of ``positions``, ``cu_seqlens``, ``seqlen_offsets`` given): cos and sin
# are ``[max_pos, R]`` tables and each token reads row ``position(token)``:
#
#   position = (positions[token] if positions is given else the token's index in its
#               sequence: s for x [B, H, S, D]/[B, S, H, D]; t - cu_seqlens[b] for packed
#               x [T, H, D] with cu_seqlens)
#              + seqlen_offsets[b]   (an int, or an int tensor with one entry per sequence b)
#
# The tokens are x's leading dims without the head axis (``unsqueeze_dim``): [B, S] or [T];
# ``positions`` has that shape (or broadcasts to it, like cos would).
#
# Multimodal RoPE (``mrope_section=(t, h, w)``, t + h + w = R/2): rotary pair i (frequency i)
# takes its cos/sin from axis ``mrope_axis(i)`` in {0, 1, 2} (temporal, height, width):
# sectioned (Qwen2-VL / Qwen2.5-VL): the first t pairs from axis 0, the next h from axis 1,
# the last w from axis 2; interleaved (``mrope_interleaved=True``, Qwen3-VL): pair i from
# axis 1 if i % 3 == 1 and i < 3 h, from axis 2 if i % 3 == 2 and i < 3 w, else axis 0.
# In cache mode the axes are positions: ``positions`` is [3, *tokens]; otherwise cos/sin are
# [3, *tokens, R] (transformers' per-axis cos/sin before its section merge).


def mrope_axes(half: int, mrope_section, mrope_interleaved: bool) -> list[int]:
    """The axis (0, 1, 2) each of the ``half`` rotary pairs reads."""
    t, h, w = mrope_section
    if mrope_interleaved:
        return [1 if i % 3 == 1 and i < 3 * h else 2 if i % 3 == 2 and i < 3 * w else 0 for i in range(half)]
    return [0 if i < t else 1 if i < t + h else 2 for i in range(half)]


def token_shape(x: torch.Tensor, unsqueeze_dim: int) -> list[int]:
    """x's leading dims without the head axis: the shape of one position per token."""
    head = unsqueeze_dim % x.dim()
    return [n for i, n in enumerate(x.shape[:-1]) if i != head]


def token_positions(x, unsqueeze_dim, positions=None, cu_seqlens=None, seqlen_offsets=None):
    """int64 positions of x's tokens (shape ``token_shape``, or [3, ...] for mrope positions)."""
    lead = token_shape(x, unsqueeze_dim)
    t = torch.arange(lead[-1], device=x.device)
    batch = None
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=x.device, dtype=torch.int64).contiguous()
        batch = torch.searchsorted(cu[1:], t, right=True)  # the sequence of packed token t
    if positions is not None:
        pos = positions.to(torch.int64)
    elif cu_seqlens is not None:
        pos = t - cu[batch]
    else:
        pos = t.expand(lead)
    if seqlen_offsets is not None:
        if isinstance(seqlen_offsets, torch.Tensor):
            off = seqlen_offsets.to(torch.int64)
            if cu_seqlens is not None:
                off = off[batch]  # per packed token
            elif len(lead) == 2:
                off = off[:, None]  # per batch row
            pos = pos + off
        else:
            pos = pos + int(seqlen_offsets)
    return pos


def check_positions(pos: torch.Tensor, rows: int) -> None:
    """Every position must index a row of the cache (a clear error rather than a wild read)."""
    if torch.compiler.is_compiling():  # (values are unknown while tracing: an assert in the graph)
        torch._assert_async(((pos >= 0) & (pos < rows)).all(), "positions out of range for the cos/sin cache")
        return
    if pos.numel() and pos.device.type != "meta":  # (meta tensors: shapes only)
        lo, hi = torch.aminmax(pos)
        check_span(int(lo), int(hi), rows)


def check_cu_seqlens(cu_seqlens: torch.Tensor, tokens: int) -> None:
    """cu_seqlens must rise from 0 to the number of packed tokens (else tokens would be given the
    wrong sequence's positions, or none)."""
    if torch.compiler.is_compiling():  # (as check_positions)
        cu = cu_seqlens.to(torch.int64)
        ok = (cu[0] == 0) & (cu[-1] == tokens) & (cu[1:] >= cu[:-1]).all()
        torch._assert_async(ok, f"cu_seqlens must rise from 0 to the number of tokens {tokens}")
        return
    if cu_seqlens.device.type == "meta":
        return
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or cu[-1] != tokens or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(
            f"cu_seqlens must rise from 0 to the number of tokens {tokens}, got {cu[:8]}{'...' if len(cu) > 8 else ''}"
        )


def check_span(lo: int, hi: int, rows: int) -> None:
    """Positions lo..hi must index rows of the cache (check_positions' error)."""
    if lo < 0 or hi >= rows:
        raise IndexError(f"positions span [{lo}, {hi}], out of range for the cos/sin cache of {rows} rows")


def select_mrope(tables: list[torch.Tensor], axes: list[int], interleaved: bool) -> torch.Tensor:
    """Per rotary dim j, the entry of tables[axis of j's pair] (differentiable)."""
    r = tables[0].shape[-1]
    pair = [j // 2 if interleaved else j % (r // 2) for j in range(r)]
    idx = torch.tensor([axes[p] for p in pair], device=tables[0].device)
    out = tables[0]
    for a in (1, 2):
        out = torch.where(idx == a, tables[a], out)
    return out


def materialize_cos_sin(x, cos, sin, unsqueeze_dim=1, interleaved=False, positions=None, cu_seqlens=None,
                        seqlen_offsets=None, mrope_section=None, mrope_interleaved=False):
    """Per-token cos/sin (shape ``token_shape + [R]``) that the plain rule applies to."""
    cached = positions is not None or cu_seqlens is not None or seqlen_offsets is not None
    mrope = mrope_section is not None
    if cached:
        if cu_seqlens is not None:
            check_cu_seqlens(cu_seqlens, token_shape(x, unsqueeze_dim)[-1])
        pos = token_positions(x, unsqueeze_dim, positions, cu_seqlens, seqlen_offsets)
        check_positions(pos, cos.shape[0])
        axes_pos = list(pos) if (mrope and positions is not None) else [pos] * (3 if mrope else 1)
        cs = [(cos[p], sin[p]) for p in axes_pos]
    else:
        cs = list(zip(cos, sin)) if mrope else [(cos, sin)]
    if not mrope:
        return cs[0]
    axes = mrope_axes(cos.shape[-1] // 2, mrope_section, mrope_interleaved)
    return (select_mrope([c for c, _ in cs], axes, interleaved), select_mrope([s for _, s in cs], axes, interleaved))


def rotary_reference_indexed(x, cos, sin, unsqueeze_dim=1, interleaved=False, conj=False, swap_layout=False,
                             **index):
    """``rotary_reference`` with the token-position options above (``index``: positions,
    cu_seqlens, seqlen_offsets, mrope_section, mrope_interleaved)."""
    if not any(v is not None and v is not False for v in index.values()):
        return rotary_reference(x, cos, sin, unsqueeze_dim, interleaved, conj, swap_layout)
    c, s = materialize_cos_sin(x, cos, sin, unsqueeze_dim, interleaved, **index)
    return rotary_reference(x, c, s, unsqueeze_dim, interleaved, conj, swap_layout)
