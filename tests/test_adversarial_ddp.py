"""Every adversarial family (and diffusion) trains under ``trainer=ddp_cpu`` with identical ranks.

The alternating generator/discriminator steps leave one side without gradients in each step, which
DistributedDataParallel refuses unless it is told to look for unused parameters; the shared
adversarial core sets that up for every family (the KL autoencoder once lacked it).
"""

from __future__ import annotations

import pytest
import torch

import medgen
from medgen.utils.targets import register_target
from tests.conftest import tiny_overrides
from tests.helpers import RankParameterDump

register_target(RankParameterDump, "tests.helpers.RankParameterDump")

FAMILIES = {
    "dcgan": ["model.generator.channels=[16,8,8,8]", "model.discriminator.channels=[8,8,8,16]"],
    "aggrgan": ["model.net_defaults.image_size=16", "data.train.size=16", "data.val.size=16"],
    "pix2pix": ["model.generator.ngf=4", "model.discriminator.ndf=4"],
    "cyclegan": [
        "model.generator.ngf=4",
        "model.discriminator.ndf=4",
        "model.generator.n_blocks=1",
    ],
    "autoencoder_kl_2d": ["model.adv_start_step=0", "model.net.channels=[4,8]"],
    "vqgan_3d": ["model.adv_start_step=0", "model.net.channels=[4,8]"],
    # the non-adversarial families share the same DDP path; diffusion has no discriminator
    "ddpm_2d": [
        "data.train.size=16",
        "model.net.channels=[8,16]",
        "model.net.attention_levels=[false,true]",
        "model.net.num_head_channels=8",
        "model.net.norm_num_groups=4",
    ],
}


@pytest.mark.parametrize("experiment", sorted(FAMILIES))
def test_every_adversarial_family_trains_under_ddp_with_identical_ranks(experiment, tmp_path):
    dump = tmp_path / "params"
    overrides = [
        *tiny_overrides(tmp_path / "run", experiment),
        "trainer=ddp_cpu",
        "data.train.length=8",
        "data.batch_size=2",
        "++trainer.limit_val_batches=0",
        "num_samples=0",
        "export=false",
        "~callbacks.image_logger",
        "+callbacks.rank_dump._target_=tests.helpers.RankParameterDump",
        f"+callbacks.rank_dump.folder={dump}",
        *FAMILIES[experiment],
    ]
    medgen.train(medgen.compose("train", overrides))
    ranks = [torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    start = torch.load(dump / "rank0_start.pt", weights_only=True)
    assert ranks[0].keys() == ranks[1].keys() == start.keys()
    for name, value in ranks[0].items():
        torch.testing.assert_close(ranks[1][name], value, rtol=0, atol=0, msg=name)
    changed = [n for n, v in ranks[0].items() if not torch.equal(v, start[n])]
    assert changed, "nothing was trained"
    if not any("discriminator" in n for n in start):
        return
    assert any("discriminator" in n for n in changed), "the discriminator never stepped"
    assert any("discriminator" not in n for n in changed), "the generator side never stepped"
