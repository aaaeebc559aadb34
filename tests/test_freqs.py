"""rotary_kernels.freqs against transformers' ROPE_INIT_FUNCTIONS and its rotary embedding modules."""

import pytest
import torch

import rotary_kernels as rk
from rotary_kernels import freqs

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

CASES = {
    "default": dict(rope_type="default", rope_theta=10000.0),
    "linear": dict(rope_type="linear", rope_theta=10000.0, factor=4.0),
    "dynamic": dict(rope_type="dynamic", rope_theta=500000.0, factor=2.0),
    "yarn": dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=2048),
    "yarn-mscale": dict(rope_type="yarn", rope_theta=10000.0, factor=40.0, original_max_position_embeddings=4096,
                        mscale=1.0, mscale_all_dim=0.707, beta_fast=32, beta_slow=1),
    "llama3": dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192),
    "partial": dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5),
    "longrope": dict(rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=4096,
                     long_factor=[1.0 + 0.37 * i for i in range(64)], short_factor=[1.0 + 0.01 * i for i in range(64)]),
    "longrope-factor": dict(rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=4096, factor=3.0,
                            long_factor=[2.0 + 0.5 * i for i in range(64)], short_factor=[1.0] * 64),
    "proportional": dict(rope_type="proportional", rope_theta=1000000.0, partial_rotary_factor=0.25, factor=8.0),
}


def config(params, head_dim=128):
    return LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                       max_position_embeddings=8192, rope_parameters=dict(params))


@pytest.mark.parametrize("name", list(CASES))
def test_inv_freq_matches_transformers(name):
    cfg = config(CASES[name])
    rope_type = CASES[name]["rope_type"]
    if name == "partial":  # Llama ignores partial_rotary_factor; Phi honours it
        from transformers import PhiConfig
        from transformers.models.phi.modeling_phi import PhiRotaryEmbedding

        cfg = PhiConfig(hidden_size=512, num_attention_heads=4, rope_parameters=dict(CASES[name]))
        want, _ = PhiRotaryEmbedding.compute_default_rope_parameters(cfg)
        got, _ = freqs.rope_inv_freq_from_config(cfg)
        assert got.shape == (32,)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        return
    seq_lens = (None, 20000) if rope_type in ("dynamic", "longrope") else (None,)
    for seq_len in seq_lens:
        if rope_type == "default":
            want, want_scale = type(_rotary_module(cfg)).compute_default_rope_parameters(cfg)
        else:
            want, want_scale = ROPE_INIT_FUNCTIONS[rope_type](cfg, None, seq_len)
        got, scale = freqs.rope_inv_freq_from_config(cfg, seq_len=seq_len)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert scale == pytest.approx(want_scale, rel=1e-12)


def _rotary_module(cfg):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    return LlamaRotaryEmbedding(cfg)


@pytest.mark.parametrize("name", ["default", "llama3", "yarn"])
def test_cache_matches_llama_rotary_embedding(name):
    """The cache's rows are exactly the cos/sin LlamaRotaryEmbedding computes at those positions,
    so positions= into the cache reproduces the model's rotation."""
    cfg = config(CASES[name])
    module = _rotary_module(cfg)
    inv, scale = freqs.rope_inv_freq_from_config(cfg)
    cos, sin = freqs.rope_cos_sin_cache(inv, 4096, scale)
    position_ids = torch.tensor([[0, 1, 2, 3000, 4095], [7, 7, 100, 5, 9]])
    x = torch.zeros(1, dtype=torch.float32)
    want_cos, want_sin = module(x, position_ids)
    torch.testing.assert_close(cos[position_ids], want_cos, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sin[position_ids], want_sin, rtol=1e-6, atol=1e-6)
    q = torch.randn(2, 4, 5, 128)
    torch.testing.assert_close(rk.apply_rotary_emb(q, cos, sin, positions=position_ids),
                               rk.reference.rotary_reference(q, want_cos, want_sin), rtol=1e-5, atol=1e-5)


def test_interleaved_cache_layout():
    inv = freqs.rope_inv_freq(8)[0]
    cos, _ = freqs.rope_cos_sin_cache(inv, 3, interleaved=True)
    torch.testing.assert_close(cos[2, 0::2], cos[2, 1::2])
    torch.testing.assert_close(cos[2, 0::2], torch.cos(2 * inv))


def test_errors():
    with pytest.raises(ValueError, match="rope_type must be one of"):
        freqs.rope_inv_freq(64, rope_type="ntk-by-parts")
    with pytest.raises(ValueError, match="needs original_max_position_embeddings"):
        freqs.rope_inv_freq(64, rope_type="longrope")
    with pytest.raises(ValueError, match="32 entries"):
        freqs.rope_inv_freq(64, rope_type="longrope", original_max_position_embeddings=8, factor=2.0,
                            short_factor=[1.0] * 31)
    assert set(ROPE_INIT_FUNCTIONS) <= set(freqs.ROPE_TYPES)  # every type transformers has
    with pytest.raises(ValueError, match="needs factor"):
        freqs.rope_inv_freq(64, rope_type="linear")
    with pytest.raises(ValueError, match="positive even int"):
        freqs.rope_inv_freq(63)


def test_per_layer_type_parameters():
    """Gemma 3's rope_parameters hold one set per layer type (sliding layers theta 1e4, full ones
    1e6): each set bit-equal to Gemma3RotaryEmbedding's, and layer_type required (it silently
    took the default theta for both)."""
    from transformers import Gemma3TextConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

    cfg = Gemma3TextConfig(hidden_size=256, num_attention_heads=4, head_dim=64, num_hidden_layers=6)
    emb = Gemma3RotaryEmbedding(cfg)
    for layer_type in sorted(set(cfg.layer_types)):
        inv, scaling = freqs.rope_inv_freq_from_config(cfg, layer_type=layer_type)
        assert torch.equal(inv, getattr(emb, f"{layer_type}_inv_freq"))
        assert scaling == getattr(emb, f"{layer_type}_attention_scaling")
    with pytest.raises(ValueError, match="one set of parameters per layer type .*pass layer_type"):
        freqs.rope_inv_freq_from_config(cfg)
    with pytest.raises(ValueError, match="one set for every layer"):
        freqs.rope_inv_freq_from_config(LlamaConfig(), layer_type="full_attention")
