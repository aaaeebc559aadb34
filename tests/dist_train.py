"""Distributed training with the kernel (tests/test_distributed.py): a tiny Llama, 5 AdamW
steps, on CPU with gloo, each engine run twice in the same processes (the model's own RoPE, then
``rotary_kernels.hub.kernelize(model)``), the kernel's ops counted per rank.

Engines: ``ddp`` (DistributedDataParallel), ``fsdp2`` (``fully_shard`` per decoder layer and
root), ``deepspeed`` (ZeRO-3 via ``deepspeed.initialize``, ``DS_ACCELERATOR=cpu``),
``trainer-deepspeed`` (transformers' Trainer with a ZeRO-3 config; ``gc`` suffix: gradient
checkpointing). ``single`` is the one-process run on the whole batch, the reference.

Each rank writes ``{out}/{engine}-{rank}.pt``: per run (``own``, ``kernel``) the losses (mean over
the global batch), the final full parameters and the kernel op count.
"""

from __future__ import annotations

import os
import sys

STEPS, BATCH, SEQ = 5, 4, 12


def tiny_llama(seed=0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      attn_implementation="eager")
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).float()


def batches():
    import torch

    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 96, (BATCH, SEQ), generator=g) for _ in range(STEPS)]


def _counter():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import rotary_kernels as rk
    from zoo import CountOps, namespace

    return CountOps(namespace(rk))


def _full_params(model):
    out = {}
    for n, p in model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[n.removeprefix("module.")] = t.detach().clone()
    return out


def run_single(kernel: bool):
    import torch

    import rotary_kernels as rk

    model = tiny_llama()
    if kernel:
        rk.hub.kernelize(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    counter, losses = _counter(), []
    with counter:
        for ids in batches():
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    rk.hub.restore()
    return {"losses": losses, "params": _full_params(model), "calls": counter.calls}


def _train_torch(engine, rank, world, kernel):
    import torch
    import torch.distributed as dist

    import rotary_kernels as rk

    model = tiny_llama()
    if kernel:
        rk.hub.kernelize(model)
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model)
    elif engine == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    per = BATCH // world
    counter, losses = _counter(), []
    with counter:
        for ids in batches():
            ids = ids[rank * per:(rank + 1) * per]
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses.append(mean.item() / world)
    params = _full_params(model)
    rk.hub.restore()
    return {"losses": losses, "params": params, "calls": counter.calls}


DS_CONFIG = {
    "train_micro_batch_size_per_gpu": BATCH // 2,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 3},
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
    "steps_per_print": 1000,
}


def _train_deepspeed(rank, world, kernel):
    import deepspeed
    import torch
    import torch.distributed as dist

    import rotary_kernels as rk

    model = tiny_llama()
    if kernel:
        rk.hub.kernelize(model)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=dict(DS_CONFIG))
    per = BATCH // world
    counter, losses = _counter(), []
    with counter:
        for ids in batches():
            ids = ids[rank * per:(rank + 1) * per]
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses.append(mean.item() / world)
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    rk.hub.restore()
    engine.destroy()
    return {"losses": losses, "params": params, "calls": counter.calls}


def _train_trainer(rank, world, kernel, gc, out):
    import torch
    from accelerate import PartialState
    from transformers import Trainer, TrainingArguments

    import rotary_kernels as rk

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # the state is made for DeepSpeed ...
    PartialState(backend="gloo")  # ... before TrainingArguments: no GPU, no NCCL
    model = tiny_llama()
    if kernel:
        rk.hub.kernelize(model)
    data = [{"input_ids": ids[i], "labels": ids[i]} for ids in batches() for i in range(BATCH)]
    cfg = dict(DS_CONFIG)
    cfg.pop("optimizer")
    cfg["train_micro_batch_size_per_gpu"] = "auto"
    args = TrainingArguments(
        output_dir=os.path.join(out, f"trainer-{rank}"), per_device_train_batch_size=BATCH // world,
        max_steps=STEPS, learning_rate=1e-2, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.01,
        logging_steps=1, report_to=[], save_strategy="no", deepspeed=cfg, use_cpu=True, seed=0,
        data_seed=0, dataloader_drop_last=True, gradient_checkpointing=gc,
        accelerator_config={"use_configured_state": True}, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(data)
    counter = _counter()
    with counter:
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(trainer.model_wrapped.module.parameters())):
        params = {n: p.detach().clone() for n, p in trainer.model_wrapped.module.named_parameters()}
    rk.hub.restore()
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # the next run's Trainer makes its Accelerator afresh (same PartialState)
    return {"losses": losses, "params": params, "calls": counter.calls}


def worker(rank, world, port, engine, out):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from transformers.utils import logging as tlog

    tlog.set_verbosity_error()
    if engine.startswith(("deepspeed", "trainer")):
        os.environ["DS_ACCELERATOR"] = "cpu"
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    for kernel in (False, True):
        if engine in ("ddp", "fsdp2"):
            r = _train_torch(engine, rank, world, kernel)
        elif engine == "deepspeed":
            r = _train_deepspeed(rank, world, kernel)
        else:
            r = _train_trainer(rank, world, kernel, engine.endswith("-gc"), out)
        results["kernel" if kernel else "own"] = r
        dist.barrier()
    torch.save(results, os.path.join(out, f"{engine}-{rank}.pt"))
    dist.destroy_process_group()


def launch(engine, out, world=2):
    """Run ``engine`` on ``world`` CPU processes; returns the per-rank results."""
    import socket

    import torch
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(worker, args=(world, port, engine, str(out)), nprocs=world, join=True, start_method="spawn")
    return [torch.load(os.path.join(out, f"{engine}-{r}.pt"), weights_only=False) for r in range(world)]
