"""Distributed training with ``rotary_kernels.hub.kernelize`` on CPU (gloo, 2 processes): DDP and
FSDP2 in the default run, DeepSpeed ZeRO-3 (deepspeed.initialize, and transformers' Trainer with
and without gradient checkpointing) behind ``-m slow`` (installs deepspeed and accelerate).

Each engine trains a tiny Llama for 5 AdamW steps twice in the same processes, with the model's
own RoPE and with the kernel: losses and final parameters are bit-identical between the two, the
kernel ran on every rank (forward and backward of every layer, every step), and both match the
single-process run on the whole batch (to reduction-order rounding).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

pytest.importorskip("kernels")
pytest.importorskip("transformers")

import dist_train  # noqa: E402

LAYERS = 2


@pytest.fixture(scope="module")
def single():
    import rotary_kernels as rk

    torch.set_num_threads(1)
    try:
        return {k: dist_train.run_single(k) for k in (False, True)}
    finally:
        rk.hub.restore()


def _check(results, single, *, atol=1e-4, same_optimizer=True):
    own_1, ker_1 = single[False], single[True]
    assert own_1["losses"] == ker_1["losses"]
    assert all(torch.equal(own_1["params"][n], ker_1["params"][n]) for n in own_1["params"])
    for rank, res in enumerate(results):
        own, ker = res["own"], res["kernel"]
        assert own["calls"] == 0, "the model's own code calls no kernel op"
        # forward and backward of every layer, every step, on this rank
        assert ker["calls"] >= 2 * LAYERS * dist_train.STEPS, (rank, ker["calls"])
        assert ker["losses"] == own["losses"], rank
        assert ker["params"].keys() == own["params"].keys()
        for n in own["params"]:
            assert torch.equal(ker["params"][n], own["params"][n]), (rank, n)
        # the same training as one process on the whole batch, up to reduction order
        if not same_optimizer:  # the first loss (before any optimizer step) only
            torch.testing.assert_close(ker["losses"][0], own_1["losses"][0], rtol=1e-5, atol=1e-5)
            continue
        torch.testing.assert_close(torch.tensor(ker["losses"]), torch.tensor(own_1["losses"]), rtol=1e-5, atol=1e-5)
        for n in own["params"]:
            torch.testing.assert_close(ker["params"][n], own_1["params"][n], rtol=0, atol=atol, msg=n)


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_torch_engines(engine, single, tmp_path):
    _check(dist_train.launch(engine, tmp_path), single)


def _ensure(*pkgs):
    missing = [p for p in pkgs if importlib.util.find_spec(p.split("=")[0].split("<")[0].split(">")[0]) is None]
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *missing], check=True)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["deepspeed", "trainer-deepspeed", "trainer-deepspeed-gc"])
def test_deepspeed_zero3(engine, single, tmp_path, monkeypatch):
    _ensure("deepspeed", "accelerate")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    results = dist_train.launch(engine, tmp_path)
    if engine == "deepspeed":
        # DeepSpeed's optimizer step over ZeRO-3 partitions is not torch's AdamW on the full
        # model (losses from step 2 on differ from one process by up to ~2e-4 relative, with or
        # without the kernel): vs one process, the first loss; kernel vs own code, everything.
        _check(results, single, same_optimizer=False)
        return
    # Trainer: its own schedule/optimizer defaults; compare kernel vs own code on every rank.
    for res in results:
        own, ker = res["own"], res["kernel"]
        assert own["calls"] == 0 and ker["calls"] >= 2 * LAYERS * dist_train.STEPS
        assert ker["losses"] == own["losses"] and len(own["losses"]) == dist_train.STEPS
        for n in own["params"]:
            assert torch.equal(ker["params"][n], own["params"][n]), n
