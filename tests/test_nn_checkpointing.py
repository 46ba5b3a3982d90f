"""Tests for medgen.nn.checkpointing and the public spec helpers of medgen.nn.factories."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medgen.nn.checkpointing import (
    BufferSnapshot,
    RestoreRunningStats,
    StagedCheckpointMixin,
    apply_layers,
    checkpoint_stage,
    stages_from_starts,
    tracked_stat_buffers,
)
from medgen.nn.factories import get_norm_layer, split_spec


class _Net(StagedCheckpointMixin):
    def __init__(self, spatial_dims: int, gradient_checkpointing: bool) -> None:
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        bn = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
        self.gradient_checkpointing = gradient_checkpointing
        self.model = nn.Sequential(conv(2, 4, 3, padding=1), bn(4), nn.ReLU(), conv(4, 1, 1))
        self.stages = stages_from_starts([0, 3], len(self.model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run_stages(self.model, self.stages, x)


def test_stages_from_starts():
    assert stages_from_starts([0, 3, 4], 6) == ((0, 3), (3, 4), (4, 6))
    assert stages_from_starts([], 0) == ()


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_checkpointed_stages_match_plain_run_with_batch_norm(spatial_dims):
    torch.manual_seed(0)
    plain = _Net(spatial_dims, gradient_checkpointing=False).train()
    ckpt = _Net(spatial_dims, gradient_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 2, *(4,) * spatial_dims)
    outs = []
    for net in (plain, ckpt):
        inp = x.clone().requires_grad_()
        out = net(inp)
        out.square().sum().backward()
        outs.append((out, inp.grad, [p.grad for p in net.parameters()]))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])
    for a, b in zip(outs[0][2], outs[1][2], strict=True):
        torch.testing.assert_close(a, b)
    # running statistics updated once, not again by the recomputation
    for a, b in zip(tracked_stat_buffers([plain]), tracked_stat_buffers([ckpt]), strict=True):
        torch.testing.assert_close(a, b)
    assert int(ckpt.model[1].num_batches_tracked) == 1


def test_apply_layers_and_checkpoint_stage_agree():
    layers = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2))
    x = torch.randn(4, 3, requires_grad=True)
    torch.testing.assert_close(apply_layers(layers, 0, 3, x), layers(x))
    torch.testing.assert_close(checkpoint_stage(layers, 1, 3, x), layers[2](layers[1](x)))
    assert apply_layers(layers, 1, 1, x) is x


def test_restore_running_stats_undoes_updates():
    bn = nn.BatchNorm1d(3).train()
    buffers = tracked_stat_buffers([bn])
    assert len(buffers) == 3
    before = [b.clone() for b in buffers]
    with RestoreRunningStats(buffers):
        bn(torch.randn(5, 3))
        assert int(bn.num_batches_tracked) == 1
    for a, b in zip(buffers, before, strict=True):
        torch.testing.assert_close(a, b)
    snapshot = BufferSnapshot(buffers)
    with snapshot:
        bn(torch.randn(5, 3))
    assert int(bn.num_batches_tracked) == 1 and int(snapshot.saved[2]) == 0


def test_split_spec_and_instance_affine():
    assert split_spec("group", "norm") == ("group", {})
    name, kwargs = split_spec(("group", {"num_groups": 2}), "norm")
    assert (name, kwargs) == ("group", {"num_groups": 2})
    with pytest.raises(ValueError, match="norm given as a tuple"):
        split_spec(("group", 2), "norm")
    assert get_norm_layer("instance", 2, 4).affine
    assert not get_norm_layer("instance", 2, 4, instance_affine=False).affine
    assert get_norm_layer(("instance", {"affine": True}), 3, 4, instance_affine=False).affine
    assert isinstance(get_norm_layer("batch", 2, 4, instance_affine=False), nn.BatchNorm2d)
