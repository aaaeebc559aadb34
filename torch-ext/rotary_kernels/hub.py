"""The mode-keyed kernel mapping for ``kernels.use_kernel_mapping`` and transformers.

``kernel_mapping()`` returns ``{"rotary_pos_emb": {device: {Mode: repository}}}`` for cuda,
rocm, xpu and cpu, the shape ``kernels.use_kernel_mapping`` and transformers'
``_KERNEL_MAPPING`` take. ``"rotary_pos_emb"`` is the name transformers gives
``apply_rotary_pos_emb`` (``@use_kernel_forward_from_hub("rotary_pos_emb")``).

Per mode (all out of place unless ``inplace_inference=True``):

=================================  ==========================================
``Mode.TRAINING``                  ``layers.apply_rotary_transformers`` (autograd)
``Mode.TRAINING | TORCH_COMPILE``  the same (custom ops: traced without breaks)
``Mode.INFERENCE``                 the same, or ``apply_rotary_transformers_inplace``
``Mode.INFERENCE | TORCH_COMPILE`` likewise
=================================  ==========================================

Out of place already moves the minimum bytes (read q, k once, write them once); in place only
saves allocating the outputs, and is legal only when nothing reads q/k after the rotation
(true of transformers' attention layers), hence opt-in.
"""

from __future__ import annotations

from pathlib import Path

LAYER_NAME = "rotary_pos_emb"
DEVICES = ("cuda", "rocm", "xpu", "cpu")


def kernel_mapping(
    repo_id: str = "kernels-community/rotary-kernels",
    *,
    version: int | None = 1,
    revision: str | None = None,
    repo_path: str | Path | None = None,
    inplace_inference: bool = False,
    devices: tuple[str, ...] = DEVICES,
) -> dict:
    """The mapping for ``kernels.use_kernel_mapping(...)`` / ``kernelize(..., mode=...)``.

    ``repo_path``: load from a local kernel tree (the repository root with ``build/``) instead
    of the Hub. ``revision`` takes precedence over ``version``.
    """
    from kernels import LayerRepository, LocalLayerRepository, Mode

    def repo(layer_name: str):
        if repo_path is not None:
            return LocalLayerRepository(Path(repo_path), layer_name=layer_name)
        if revision is not None:
            return LayerRepository(repo_id, layer_name=layer_name, revision=revision)
        return LayerRepository(repo_id, layer_name=layer_name, version=version)

    train = repo("apply_rotary_transformers")
    infer = repo("apply_rotary_transformers_inplace") if inplace_inference else train
    per_mode = {
        Mode.TRAINING: train,
        Mode.TRAINING | Mode.TORCH_COMPILE: train,
        Mode.INFERENCE: infer,
        Mode.INFERENCE | Mode.TORCH_COMPILE: infer,
    }
    return {LAYER_NAME: {device: dict(per_mode) for device in devices}}
