"""FSDP2 resharding after forward: which blocks keep their gathered parameters into backward.

One in-process gloo rank: FSDP2 registers the gathered (plain) parameters on a module while they are
unsharded and the sharded DTensors again when it reshards, so the types seen after forward tell which
blocks were resharded.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from llmtrain.config import ParallelConfig, fsdp_wraps, reshards_after_forward
from llmtrain.distributed.env import destroy
from llmtrain.distributed.parallelize import (
    apply_fsdp,
    block_lists,
    block_resharding,
    clip_grad_norm,
    reshard_all,
)
from llmtrain.measure.options import strategy_of
from llmtrain.models import ModelConfig, build_model

pytestmark = pytest.mark.distributed


@pytest.fixture
def one_rank_mesh():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,), mesh_dim_names=("shard",))
    finally:
        destroy()  # also clears DTensor's caches, which keep the mesh and its gloo threads


def test_auto_reshards_only_where_it_saves_memory():
    for precision in ("bf16", "fp32"):  # sharded over several devices, or offloaded
        assert reshards_after_forward(None, 8, False, precision) and reshards_after_forward(
            None, 1, True, precision
        )
    # a shard group of one device: fp32 frees its gathered copy (it would double the weights); 16-bit keeps it
    assert reshards_after_forward(None, 1, False, "fp32")
    assert not reshards_after_forward(None, 1, False, "bf16") and not reshards_after_forward(
        None, 1, False, "fp16"
    )
    for shard_devices in (1, 8):  # an explicit setting is kept
        assert reshards_after_forward(True, shard_devices, False, "bf16")
        assert not reshards_after_forward(False, shard_devices, True, "fp32")
    # auto keeps the block backward starts with gathered; an explicit true reshards every block
    assert block_resharding(None, 4, 8, False, "bf16") == [True, True, True, False]
    assert block_resharding(None, 4, 1, True, "bf16") == [True, True, True, False]
    assert block_resharding(None, 4, 1, False, "bf16") == [False] * 4
    assert block_resharding(True, 4, 1, False, "bf16") == [True] * 4


def test_fsdp_wraps_over_several_devices_or_when_asked_on_one():
    auto = ParallelConfig(strategy="fsdp")
    assert fsdp_wraps(auto, 2) and not fsdp_wraps(auto, 1)  # one device: nothing to shard (torchtitan's rule)
    assert fsdp_wraps(ParallelConfig(strategy="fsdp", cpu_offload=True), 1)  # FSDP does the offloading
    for setting in (True, False):  # FSDP's own memory behaviour, asked for
        assert fsdp_wraps(ParallelConfig(strategy="fsdp", reshard_after_forward=setting), 1)
    assert not fsdp_wraps(ParallelConfig(strategy="ddp"), 2) and not fsdp_wraps(ParallelConfig(), 1)
    # the memory estimator follows what runs: unwrapped on one device is the plain model
    assert strategy_of(auto, 1, "bf16") == ("ddp", None)
    assert strategy_of(auto, 8, "bf16") == ("zero3", None)
    assert strategy_of(ParallelConfig(strategy="fsdp", reshard_after_forward=False), 1, "bf16") == (
        "zero2",
        None,
    )


@pytest.mark.parametrize(
    ("setting", "precision", "expected"),
    [
        (None, "fp32", [True, True, True, False]),  # all but the block backward starts with
        (None, "bf16", [False, False, False, False]),  # a one-device shard group, 16-bit: the copies stay
        (True, "bf16", [True, True, True, True]),
        (False, "fp32", [False, False, False, False]),
    ],
)
def test_blocks_resharded_after_forward(one_rank_mesh, setting, precision, expected):
    """The encoder's two blocks, then the decoder's; in fp32 the gradients equal the unwrapped model's."""
    torch.manual_seed(0)
    cfg = ModelConfig("encoder_decoder", vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=16)
    model = build_model(cfg)
    reference = build_model(cfg)
    reference.load_state_dict(model.state_dict())
    apply_fsdp(model, one_rank_mesh, precision, setting)
    ids, decoder_ids = torch.randint(5, 64, (2, 16)), torch.randint(5, 64, (2, 6))
    out = model(ids, decoder_ids, labels=decoder_ids)
    blocks = [block for layers in block_lists(model) for block in layers]  # encoder's, then decoder's
    resharded = [isinstance(next(block.parameters()), DTensor) for block in blocks]
    assert resharded == expected
    out.loss.backward()
    if precision != "fp32":
        return
    expected_out = reference(ids, decoder_ids, labels=decoder_ids)
    expected_out.loss.backward()
    torch.testing.assert_close(out.loss, expected_out.loss)
    grads = {n: p.grad for n, p in reference.named_parameters()}
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad.full_tensor(), grads[name], msg=name)


def test_reshard_all_frees_what_a_forward_without_backward_left_gathered(one_rank_mesh):
    """After an evaluation's forward the block that is not resharded after forward keeps its gathered
    parameters (the trainer's state_bytes must count shards); reshard_all frees them."""
    model = build_model(
        ModelConfig("decoder", vocab_size=64, d_model=32, n_layers=3, n_heads=2, max_seq_len=16)
    )
    apply_fsdp(model, one_rank_mesh, "fp32", None)
    blocks = list(next(block_lists(model)))
    ids = torch.randint(5, 64, (2, 16))
    with torch.no_grad():
        model(ids, labels=ids)
    assert [isinstance(next(block.parameters()), DTensor) for block in blocks] == [True, True, False]
    reshard_all(model)
    assert all(isinstance(p, DTensor) for p in model.parameters())


@pytest.mark.parametrize("max_norm", [0.05, 1e6])  # clipped, and left alone
def test_clip_grad_norm_on_local_shards_equals_torch_on_the_unwrapped_model(one_rank_mesh, max_norm):
    """clip_grad_norm on FSDP's DTensor gradients: torch's clip_grad_norm_ of the same gradients unwrapped."""
    torch.manual_seed(0)
    cfg = ModelConfig("decoder", vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=16)
    model, reference = build_model(cfg), build_model(cfg)
    reference.load_state_dict(model.state_dict())
    apply_fsdp(model, one_rank_mesh, "fp32", None)
    ids = torch.randint(5, 64, (2, 16))
    for m in (model, reference):
        m(ids, labels=ids).loss.backward()
    total = clip_grad_norm(model.parameters(), max_norm)
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm)
    assert not isinstance(total, DTensor) and expected > 0.05  # the first case does clip
    torch.testing.assert_close(total, expected)
    grads = {n: p.grad for n, p in reference.named_parameters()}
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad.full_tensor(), grads[name], msg=name)
