"""Apply parallelism to a finished model from outside (as torchtitan's parallelize_* functions do).

Order: activation checkpointing per block -> torch.compile per block -> DDP, or FSDP2 `fully_shard` per
block and at the root. The model files hold no distributed code.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from llmtrain.config import check_shard_size, fsdp_wraps, reshards_after_forward
from llmtrain.distributed.env import DistInfo

PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def block_lists(model: nn.Module) -> Iterator[nn.ModuleList]:
    """Every `layers` ModuleList of transformer blocks (one per stack: one, or encoder + decoder)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] == "layers":
            yield module


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward instead of storing them. A block with dropout replays
    the forward's RNG state in its recomputation, so backward sees the masks the forward drew; without
    dropout there is no random op to replay and the RNG state is not saved."""
    for layers in block_lists(model):
        for i, block in enumerate(layers):
            random = any(isinstance(m, nn.Dropout) and m.p > 0 for m in block.modules())
            layers[i] = checkpoint_wrapper(block, preserve_rng_state=random)


def apply_compile(model: nn.Module) -> None:
    """Compile each block separately: blocks are identical, so one compiled graph serves them all. On CUDA
    the loss's passes over the logits are compiled too (on the CPU its cache-sized eager chunks stay)."""
    for layers in block_lists(model):
        for i, block in enumerate(layers):
            layers[i] = torch.compile(block, fullgraph=False)
    # not the MLM head: its rows (the selected positions) change in number every step (H100: BERT-base
    # 35.7 ms a step with the eager chunks, 42.5 ms compiled)
    family = getattr(getattr(model, "cfg", None), "family", None)
    if family in ("decoder", "encoder_decoder") and next(model.parameters()).device.type == "cuda":
        model.compiled_loss = True


def fsdp_mesh(info: DistInfo, shard_size: int) -> DeviceMesh:
    """1-D mesh for full sharding; 2-D (replicate, shard) for hybrid sharding; shard_size 1 replicates."""
    world = info.world_size
    check_shard_size(shard_size, world)
    shard = shard_size or world
    if shard == world:
        return init_device_mesh(info.device.type, (world,), mesh_dim_names=("shard",))
    return init_device_mesh(info.device.type, (world // shard, shard), mesh_dim_names=("replicate", "shard"))


def block_resharding(
    setting: bool | None, n_blocks: int, shard_devices: int, cpu_offload: bool, precision: str
) -> list[bool]:
    """reshard_after_forward for each block in forward order (`reshards_after_forward`). Auto keeps the last
    block gathered when the others reshard: backward starts with it at once (torchtitan's default policy)."""
    reshard = reshards_after_forward(setting, shard_devices, cpu_offload, precision)
    return [reshard and not (setting is None and i == n_blocks - 1) for i in range(n_blocks)]


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    precision: str,
    reshard_after_forward: bool | None = None,
    cpu_offload: bool = False,
) -> None:
    """fully_shard each block, then the root (embeddings, final norms, head).

    reshard_after_forward=True frees gathered parameters after each block's forward (ZeRO-3); False keeps
    them until backward (ZeRO-2: more memory, less communication); None chooses (`block_resharding`).
    Under bf16/fp16 parameters are gathered in that dtype and gradients reduced in fp32; the sharded master
    weights and Adam states stay fp32.
    """
    mp = MixedPrecisionPolicy(param_dtype=PRECISION_DTYPES[precision], reduce_dtype=torch.float32)
    kwargs = {"mesh": mesh, "mp_policy": mp}
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    blocks = [block for layers in block_lists(model) for block in layers]
    # the shard dimension is the mesh's last (1-D: shard; 2-D: replicate x shard)
    resharding = block_resharding(reshard_after_forward, len(blocks), mesh.size(-1), cpu_offload, precision)
    for block, reshard in zip(blocks, resharding):
        fully_shard(block, reshard_after_forward=reshard, **kwargs)
    fully_shard(model, reshard_after_forward=False, **kwargs)  # the root is needed again at once in backward
    for method in ("encode", "decode"):  # called directly by generation: they must gather parameters too
        if hasattr(model, method):
            register_fsdp_forward_method(model, method)


def reshard_all(model: nn.Module) -> None:
    """Free every FSDP module's gathered parameters: a block not resharded after forward keeps them after a
    forward that no backward follows (evaluation, sampling). No-op without FSDP."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@torch.no_grad()
def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ (2-norm), returning the total norm as a plain tensor. FSDP's gradients
    are DTensors sharded over the mesh's shard dimension: their norm is taken on the local shards and the
    squares summed over that dimension with one all-reduce, and they are scaled in place locally, without
    DTensor's per-op dispatch on the host (a few ms a step on a 12-block model)."""
    params = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in params]
    if not grads or not all(isinstance(g, DTensor) for g in grads):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    mesh, placements = grads[0].device_mesh, grads[0].placements
    local = [g.to_local() for g in grads]
    squares = torch.stack(torch._foreach_norm(local)).double().square().sum()
    for dim, placement in enumerate(placements):  # replicated dimensions hold the same gradients already
        if placement.is_shard():
            dist.all_reduce(squares, group=mesh.get_group(dim))
    total = squares.sqrt().float()
    torch._foreach_mul_(local, (max_norm / (total + 1e-6)).clamp(max=1.0))
    return total


def parallelize(model: nn.Module, parallel, info: DistInfo, precision: str) -> nn.Module:
    """Returns the module to call in the training step; `model` itself stays the one to save and sample.
    parallel.strategy=fsdp on one device leaves the model unwrapped unless asked otherwise (`fsdp_wraps`)."""
    if parallel.activation_checkpointing:
        apply_activation_checkpointing(model)
    if parallel.compile:
        apply_compile(model)
    if fsdp_wraps(parallel, info.world_size):
        apply_fsdp(
            model,
            fsdp_mesh(info, parallel.shard_size),
            precision,
            parallel.reshard_after_forward,
            parallel.cpu_offload,
        )
        return model
    if info.distributed:  # ddp, or `single` launched by torchrun on several ranks: replicas must stay in sync
        device_ids = [info.device.index] if info.device.type == "cuda" else None
        # gradients are views into DDP's all-reduce buckets: no second copy of them
        return DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)
    return model
