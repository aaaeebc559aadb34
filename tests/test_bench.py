"""benchmarks/bench.py: the --rounds merge (each row's best time, derived columns recomputed) and
the layout adapter of the [B, H, S, D]-only peers."""

import importlib.util
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location("bench", Path(__file__).parents[1] / "benchmarks" / "bench.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _row(impl, pass_, ms, copy_gbs, nbytes=1e6, layout="bhsd"):
    return dict(shape="llama3-8b", tokens="2k", B=1, S=2048, dtype="bfloat16", cos="same", layout=layout,
                pass_=pass_, impl=impl, ms=ms, iqr=0.0, gbs=nbytes / ms / 1e6, frac=0.0, copy_gbs=copy_gbs,
                speedup=None, peak_mb=float("nan"))


def test_best_of_rounds_keeps_each_rows_best_and_recomputes():
    r1 = [_row("eager", "fwd", 4.0, 10.0), _row("ours", "fwd", 1.0, 10.0), _row("ours", "inplace", 0.8, 10.0)]
    r2 = [_row("eager", "fwd", 5.0, 20.0), _row("ours", "fwd", 0.5, 20.0), _row("ours", "inplace", 0.9, 20.0)]
    rows = {(r["impl"], r["pass_"]): r for r in bench.best_of_rounds([r1, r2])}
    assert len(rows) == 3
    fwd = rows["ours", "fwd"]
    assert fwd["ms"] == 0.5 and fwd["copy_gbs"] == 20.0
    assert fwd["gbs"] == pytest.approx(1e6 / 0.5 / 1e6) and fwd["frac"] == pytest.approx(fwd["gbs"] / 20.0)
    assert fwd["speedup"] == pytest.approx(4.0 / 0.5)  # against eager's best, whichever round it came from
    assert rows["ours", "inplace"]["ms"] == 0.8 and rows["ours", "inplace"]["speedup"] == pytest.approx(4.0 / 0.8)
    assert rows["eager", "fwd"]["speedup"] == pytest.approx(1.0)


def test_best_of_rounds_keeps_layouts_apart():
    rows = bench.best_of_rounds([[_row("ours", "fwd", 1.0, 10.0, layout="bhsd"),
                                  _row("ours", "fwd", 2.0, 10.0, layout="bshd")]])
    assert sorted(r["ms"] for r in rows) == [1.0, 2.0]


@pytest.mark.parametrize("layout", list(bench.LAYOUTS))
def test_peer_outputs_come_back_in_the_callers_layout(layout):
    """Liger and flash-attn take [B, H, S, D] only: through in_layout their outputs have q/k's own
    layout (the backward rows feed gradients shaped like q and k), and the values of eager's."""
    q, k, cos, sin, ud = bench.make_layout(2, 5, 4, 2, 16, 16, torch.float32, torch.float32, torch.device("cpu"),
                                           layout)
    got = bench.in_layout(lambda *a: bench.eager(*a, 1))(q, k, cos, sin, ud)
    for g, w in zip(got, bench.eager(q, k, cos, sin, ud)):
        assert g.shape == w.shape and torch.equal(g, w)
