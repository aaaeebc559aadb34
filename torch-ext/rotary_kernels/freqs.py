"""RoPE frequencies and cos/sin caches: default, linear, dynamic-NTK, YaRN, LongRoPE, Llama-3
and proportional scaling: every type of transformers' ``ROPE_INIT_FUNCTIONS``.

``rope_inv_freq`` returns ``(inv_freq, attention_scaling)`` numerically equal to transformers'
``ROPE_INIT_FUNCTIONS[rope_type](config)`` (tested against them); ``rope_inv_freq_from_config``
reads the parameters from a transformers config; ``rope_cos_sin_cache`` builds the ``[P, R]``
tables that the ``positions`` / ``cu_seqlens`` / ``seqlen_offsets`` options index::

    inv_freq, scale = rk.freqs.rope_inv_freq(128, 500000.0, "llama3", factor=8.0,
                                             original_max_position_embeddings=8192)
    cos, sin = rk.freqs.rope_cos_sin_cache(inv_freq, 131072, scale)          # [131072, 128] fp32
    q, k = rk.apply_rotary_transformers(q, k, cos, sin, positions=position_ids)

Scalings (``dim`` = rotary dim R, ``theta_i = base^(-2i/dim)``):

* ``linear``: ``theta_i / factor``.
* ``dynamic`` (NTK-aware): ``base *= (factor * L / L0 - (factor - 1)) ** (dim / (dim - 2))``
  with ``L = max(seq_len, L0)``, ``L0 = max_position_embeddings``.
* ``yarn``: interpolation ``theta_i / factor`` and extrapolation ``theta_i`` blended by a linear
  ramp over the dims whose wavelengths lie between ``beta_fast`` and ``beta_slow`` rotations in
  the original context; ``attention_scaling = 0.1 ln(factor) + 1`` (or the mscale ratio).
* ``llama3``: wavelengths above ``L0 / low_freq_factor`` divided by ``factor``, below
  ``L0 / high_freq_factor`` kept, smoothly interpolated between.
* ``longrope`` (Phi-3 long context): ``theta_i / ext_i`` with per-pair factors ``short_factor``,
  or ``long_factor`` once ``seq_len`` exceeds ``L0 = original_max_position_embeddings``;
  ``attention_scaling = sqrt(1 + ln(factor) / ln(L0))`` (``factor`` defaults to
  ``max_position_embeddings / L0``).
* ``proportional`` (Gemma 4): ``dim`` is the head dim; the first
  ``int(partial_rotary_factor * dim // 2)`` pairs get ``base^(-2i/dim)``, the others frequency 0
  (cos 1, sin 0: they pass through), all divided by ``factor``.
"""

from __future__ import annotations

import math

import torch

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3", "proportional")


def _base_inv_freq(dim: int, base: float, device=None) -> torch.Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float32) / dim
    return 1.0 / (base**exponents)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(
    dim: int,
    base: float = 10000.0,
    rope_type: str = "default",
    *,
    factor: float | None = None,
    max_position_embeddings: int | None = None,
    original_max_position_embeddings: int | None = None,
    seq_len: int | None = None,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    beta_fast: float | None = None,
    beta_slow: float | None = None,
    mscale: float | None = None,
    mscale_all_dim: float | None = None,
    attention_factor: float | None = None,
    truncate: bool = True,
    long_factor=None,
    short_factor=None,
    partial_rotary_factor: float = 1.0,
    device=None,
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (fp32, ``[dim // 2]``) and the cos/sin scaling for one rope type."""
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_type must be one of {ROPE_TYPES}, got {rope_type!r}")
    if not isinstance(dim, int) or dim <= 0 or dim % 2:
        raise ValueError(f"dim (the rotary dim) must be a positive even int, got {dim!r}")

    def need(name, value):
        if value is None:
            raise ValueError(f"rope_type={rope_type!r} needs {name}")
        return value

    if rope_type == "default":
        return _base_inv_freq(dim, base, device), 1.0
    if rope_type == "linear":
        return _base_inv_freq(dim, base, device) / need("factor", factor), 1.0
    if rope_type == "dynamic":
        factor = need("factor", factor)
        l0 = need("max_position_embeddings", max_position_embeddings)
        length = l0 if seq_len is None else max(seq_len, l0)
        base = base * ((factor * length / l0) - (factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(dim, base, device), 1.0
    if rope_type == "longrope":
        l0 = need("original_max_position_embeddings", original_max_position_embeddings)
        if factor is None:
            factor = need("max_position_embeddings", max_position_embeddings) / l0
        if attention_factor is None:
            attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(l0))
        ext = need("long_factor", long_factor) if seq_len and seq_len > l0 else need("short_factor", short_factor)
        if len(ext) != dim // 2:
            raise ValueError(f"longrope factors must have dim // 2 = {dim // 2} entries, got {len(ext)}")
        exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float32) / dim
        return 1.0 / (torch.tensor(ext, dtype=torch.float32, device=device) * base**exponents), attention_factor
    if rope_type == "proportional":
        angles = int(partial_rotary_factor * dim // 2)
        exponents = torch.arange(0, 2 * angles, 2, dtype=torch.int64).to(device=device, dtype=torch.float32) / dim
        inv = torch.cat((1.0 / base**exponents, torch.zeros(dim // 2 - angles, device=device)))
        return inv / (1.0 if factor is None else factor), 1.0
    if rope_type == "llama3":
        factor = need("factor", factor)
        l0 = need("original_max_position_embeddings", original_max_position_embeddings)
        inv = _base_inv_freq(dim, base, device)
        wavelen = 2 * math.pi / inv
        long_wavelen, short_wavelen = l0 / low_freq_factor, l0 / high_freq_factor
        scaled = torch.where(wavelen > long_wavelen, inv / factor, inv)
        smooth = (l0 / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < short_wavelen) * ~(wavelen > long_wavelen)
        return torch.where(medium, blended, scaled), 1.0

    # yarn
    l0 = need("original_max_position_embeddings", original_max_position_embeddings)
    if factor is None:
        factor = need("max_position_embeddings", max_position_embeddings) / l0
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
        else:
            attention_factor = _yarn_mscale(factor)
    fast, slow = beta_fast or 32, beta_slow or 1

    def correction_dim(rotations):  # the dim whose wavelength fits `rotations` times in l0
        return (dim * math.log(l0 / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(fast), correction_dim(slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1).to(device=device)
    powers = base ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float32) / dim)
    extrapolation, interpolation = 1.0 / powers, 1.0 / (factor * powers)
    keep = 1 - ramp  # 1: extrapolate (high frequencies), 0: interpolate
    return interpolation * (1 - keep) + extrapolation * keep, attention_factor


def rope_inv_freq_from_config(config, seq_len: int | None = None, device=None,
                              layer_type: str | None = None) -> tuple[torch.Tensor, float]:
    """``rope_inv_freq`` with the parameters of a transformers config (``config.rope_parameters``).
    ``layer_type``: for configs with one set of parameters per layer type (Gemma 3: its
    ``"sliding_attention"`` and ``"full_attention"`` layers rotate with different thetas), the
    set to use, as transformers' ``ROPE_INIT_FUNCTIONS`` take it; required there."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    per_type = sorted(k for k, v in params.items() if isinstance(v, dict))
    if layer_type is not None or per_type:
        if layer_type not in per_type:
            raise ValueError(f"config.rope_parameters holds one set of parameters per layer type {per_type}: pass "
                             f"layer_type= one of them, got {layer_type!r}" if per_type else
                             f"layer_type={layer_type!r}, but config.rope_parameters holds one set for every layer")
        params = dict(params[layer_type])
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    partial = params.get("partial_rotary_factor", 1.0)
    # proportional rope keeps the whole head dim (pairs past the partial factor get frequency 0)
    dim = head_dim if params.get("rope_type") == "proportional" else int(head_dim * partial)
    kwargs = {k: params[k] for k in ("factor", "original_max_position_embeddings", "low_freq_factor",
                                     "high_freq_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
                                     "attention_factor", "truncate", "long_factor", "short_factor")
              if params.get(k) is not None}
    return rope_inv_freq(dim, params.get("rope_theta", 10000.0), params.get("rope_type", "default"),
                         max_position_embeddings=getattr(config, "max_position_embeddings", None),
                         seq_len=seq_len, partial_rotary_factor=partial, device=device, **kwargs)


def rope_cos_sin_cache(inv_freq: torch.Tensor, max_position: int, attention_scaling: float = 1.0, *,
                       interleaved: bool = False, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``[max_position, R]`` cos/sin tables, ``R = 2 * len(inv_freq)``, in the layout the
    kernels pair: halves ``cat(freqs, freqs)`` (default) or neighbours repeated (``interleaved``).
    Angles ``position * inv_freq`` in fp32 as transformers computes them; stored as ``dtype``."""
    if not isinstance(max_position, int) or isinstance(max_position, bool) or max_position <= 0:
        raise ValueError(f"max_position must be a positive int, got {max_position!r}")
    if not isinstance(inv_freq, torch.Tensor) or inv_freq.dim() != 1:
        raise ValueError(f"inv_freq must be a 1-D tensor (R / 2 frequencies), got {inv_freq!r:.60}")
    pos = torch.arange(max_position, device=inv_freq.device, dtype=torch.float32)
    freqs = pos[:, None] * inv_freq.float()[None, :]
    emb = freqs.repeat_interleave(2, dim=-1) if interleaved else torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * attention_scaling).to(dtype), (emb.sin() * attention_scaling).to(dtype)


def cos_sin_from_angles(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables from an angle table (TransformerEngine's ``freqs``, or ``positions x
    inv_freq``), computed in fp32 whatever its dtype; differentiable. Any shape ``[..., R]``."""
    if not isinstance(angles, torch.Tensor) or not angles.is_floating_point():
        raise TypeError(f"angles must be a float tensor, got {getattr(angles, 'dtype', type(angles).__name__)}")
    a = angles.float()
    return a.cos(), a.sin()


def split_cos_sin_cache(cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's ``cos_sin_cache`` ``[max_pos, R]`` (cos of the R/2 pairs, then their sin) as the
    per-pair cos and sin caches ``[max_pos, R/2]`` (views) that ``pair_tables=True`` takes::

        cos, sin = rk.freqs.split_cos_sin_cache(cos_sin_cache)
        q, k = rk.apply_rotary_transformers(q, k, cos, sin, 2, pair_tables=True, positions=positions)
    """
    if not isinstance(cos_sin_cache, torch.Tensor) or cos_sin_cache.dim() != 2 or cos_sin_cache.shape[-1] % 2:
        raise ValueError(f"cos_sin_cache must be [max_pos, R] with R even, got {getattr(cos_sin_cache, 'shape', None)}")
    return cos_sin_cache.chunk(2, dim=-1)


def context_parallel_positions(seq_len: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """The positions of the tokens that rank ``cp_rank`` of ``cp_size`` holds under load-balanced
    context parallelism (TransformerEngine / Megatron): the sequence is cut into ``2 * cp_size``
    equal chunks and rank r holds chunks ``r`` and ``2 * cp_size - 1 - r``. Pass them as
    ``positions=`` with a cos/sin cache: int64 ``[seq_len // cp_size]``."""
    for name, v in (("seq_len", seq_len), ("cp_size", cp_size), ("cp_rank", cp_rank)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if cp_size < 1 or not 0 <= cp_rank < cp_size:
        raise ValueError(f"need cp_size >= 1 and 0 <= cp_rank < cp_size, got cp_size={cp_size}, cp_rank={cp_rank}")
    if seq_len < 0 or seq_len % (2 * cp_size):
        raise ValueError(f"seq_len={seq_len} must be a multiple of 2 * cp_size = {2 * cp_size}")
    chunk = seq_len // (2 * cp_size)
    first, second = cp_rank * chunk, (2 * cp_size - 1 - cp_rank) * chunk
    return torch.cat((torch.arange(first, first + chunk, device=device),
                      torch.arange(second, second + chunk, device=device)))
