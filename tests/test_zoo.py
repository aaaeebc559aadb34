"""The transformers model zoo through ``rotary_kernels.hub.kernelize`` (see tests/zoo.py).

Default run: one model type per distinct RoPE function body transformers routes through the
hub hook (plain, dtype-casting, fp32-upcasting, per-pair half-width tables half-split and
interleaved, opposite sign) plus the hub-layer path. ``-m slow``: every discovered model type;
the committed table is ``benchmarks/results/zoo.md`` (``python tests/zoo.py --write``).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("kernels")
pytest.importorskip("transformers")

import rotary_kernels as rk  # noqa: E402

import zoo  # noqa: E402  (tests/ is on sys.path: rootdir conftest)


def _supports(option):
    q = torch.randn(1, 1, 2, 4)
    cos = torch.randn(1, 2, 2 if option == "pair_tables" else 4)
    try:
        rk.apply_rotary_transformers(q, q.clone(), cos, cos, **{option: True})
        return True
    except TypeError:
        return False


HALF = _supports("pair_tables")
CONJ = _supports("conj")

# model type -> expected verdict (per-pair tables and -theta need the kernels' options)
FAST = {
    "llama": "exact",                         # q * cos + rotate_half(q) * sin
    "olmo2": "exact",                         # ... .to(q.dtype)
    "modernbert": "exact",                    # computed in fp32, cast back
    "gpt_oss": "exact" if HALF else "refused",                # half-width per-pair tables
    "openai_privacy_filter": "exact" if HALF else "refused",  # the same, interleaved pairs
    "nanochat": "exact" if CONJ else "refused",               # rotate_half of the opposite sign
    "deepseek_v3": "not routed",              # decorated, not attached: transformers never routes it
}


@pytest.fixture(autouse=True)
def _quiet():
    from transformers.utils import logging as tlog

    old = tlog.get_verbosity()
    tlog.set_verbosity_error()
    yield
    tlog.set_verbosity(old)
    rk.hub.restore()


def _verdict(model_type):
    rows = {t: status for t, _, status in zoo.discover()}
    if rows.get(model_type) == "not attached":
        return "not routed", "decorated but not attached"
    return zoo.check(model_type)


@pytest.mark.parametrize("model_type", sorted(FAST))
def test_zoo_fast(model_type):
    verdict, detail = _verdict(model_type)
    assert verdict == FAST[model_type], detail
    if verdict == "refused":
        assert "apply_rotary_pos_emb" in detail and "not supported by this build" in detail


def test_discovery_finds_the_zoo():
    rows = zoo.discover()
    pkgs = {p for _, p, _ in rows}
    assert len(pkgs) >= 100, "transformers 5.20-5.22 route RoPE through the hub hook in >100 modeling files"
    assert {"llama", "gpt_oss", "nanochat", "openai_privacy_filter"} <= pkgs


def _all_types():
    try:
        return [t for t, _, _ in zoo.discover()]
    except Exception:  # noqa: BLE001
        return []


@pytest.mark.slow
@pytest.mark.parametrize("model_type", _all_types())
def test_zoo_all(model_type):
    verdict, detail = _verdict(model_type)
    if verdict == "no tiny model":
        pytest.skip(detail)
    # exact: run and compared; probed: not runnable from input_ids, function and kernel checked
    assert verdict in ("exact", "probed", "refused", "not routed"), detail
