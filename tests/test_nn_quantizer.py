"""Tests for medgen.nn.VectorQuantizer (VQ-VAE bottleneck with EMA codebook), at tiny 2D/3D shapes."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from medgen.nn import QuantizerOutput, VectorQuantizer

SPATIAL = {2: (4, 5), 3: (3, 4, 2)}
CHANNELS_LAST = {2: torch.channels_last, 3: torch.channels_last_3d}
BUFFERS = ("embedding", "cluster_size", "embed_sum", "initialized")


def _z(spatial_dims: int, dim: int = 4, batch: int = 2, seed: int = 0, **kw) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, dim, *SPATIAL[spatial_dims], generator=g, **kw)


def _flat(z: torch.Tensor) -> torch.Tensor:
    """``(B, D, *spatial) -> (N, D)`` in the order of ``indices.flatten()``."""
    return z.movedim(1, -1).reshape(-1, z.shape[1])


def _set_codebook(vq: VectorQuantizer, codebook: torch.Tensor, cluster_size=None) -> None:
    """Give ``vq`` a known state: codebook, ``embed_sum = N * e`` and cluster sizes ``N``."""
    k = codebook.shape[0]
    size = (
        torch.ones(k) if cluster_size is None else torch.as_tensor(cluster_size, dtype=torch.float)
    )
    with torch.no_grad():
        vq.embedding.copy_(codebook)
        vq.cluster_size.copy_(size)
        vq.embed_sum.copy_(codebook * size[:, None])
        vq.initialized.fill_(True)


def _min_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance from each row of ``a`` to its nearest row of ``b``, computed exactly (no mm trick)."""
    return (a[:, None, :].double() - b[None].double()).pow(2).sum(-1).min(dim=1).values.sqrt()


def _buffers(vq: VectorQuantizer) -> dict[str, torch.Tensor]:
    return {name: getattr(vq, name).clone() for name in BUFFERS}


# --------------------------------------------------------------------------------------------------
# outputs


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("training", [True, False])
def test_output_shapes(spatial_dims, training):
    vq = VectorQuantizer(spatial_dims, num_embeddings=16, embedding_dim=4).train(training)
    z = _z(spatial_dims)
    out = vq(z)
    assert isinstance(out, QuantizerOutput)
    assert out.quantized.shape == z.shape and out.quantized.dtype == z.dtype
    assert out.loss.shape == () and out.loss.dtype == torch.float32
    assert out.indices.shape == (2, *SPATIAL[spatial_dims]) and out.indices.dtype == torch.long
    assert out.perplexity.shape == () and 1.0 <= out.perplexity.item() <= 16.0
    assert out.usage.shape == () and 0.0 < out.usage.item() <= 1.0
    decoded = vq.lookup(out.indices)
    assert decoded.shape == z.shape and decoded.is_contiguous()


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_indices_are_the_nearest_codes(spatial_dims):
    vq = VectorQuantizer(spatial_dims, 16, 4, init="uniform").eval()
    _set_codebook(vq, torch.randn(16, 4, generator=torch.Generator().manual_seed(3)))
    vq.max_distance_elements = 16 * 7  # force several chunks of the distance matrix
    z = _z(spatial_dims)
    out = vq(z)
    brute = (_flat(z)[:, None, :].double() - vq.embedding[None].double()).pow(2).sum(-1)
    assert torch.equal(out.indices.flatten(), brute.argmin(dim=1))
    # quantized is exactly the chosen code, and lookup decodes the indices to it
    torch.testing.assert_close(
        out.quantized, vq.embedding[out.indices].movedim(-1, 1), rtol=0, atol=0
    )
    torch.testing.assert_close(vq.lookup(out.indices), out.quantized, rtol=0, atol=0)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_straight_through_gradient_and_commitment_loss(spatial_dims):
    beta = 0.4
    vq = VectorQuantizer(spatial_dims, 8, 4, commitment_cost=beta)
    z = _z(spatial_dims, requires_grad=True)
    out = vq(z)
    q = out.quantized.detach()
    torch.testing.assert_close(out.loss, beta * ((z.detach() - q) ** 2).mean())
    g = torch.randn_like(z)
    (out.quantized * g).sum().backward()
    torch.testing.assert_close(z.grad, g, rtol=0, atol=0)  # identity: d quantized / d z = I
    z.grad = None
    out = vq(z)  # the codebook is a buffer: the loss pulls only the encoder
    out.loss.backward()
    q = out.quantized.detach()
    torch.testing.assert_close(z.grad, 2 * beta * (z.detach() - q) / z.numel())
    assert not list(vq.parameters())


def test_perplexity_and_usage_for_a_constructed_assignment():
    vq = VectorQuantizer(2, 4, 2, init="uniform").eval()
    codes = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    _set_codebook(vq, codes)
    assignment = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])  # p = (1/2, 1/4, 1/4, 0)
    z = codes[assignment].T.reshape(1, 2, 2, 4)
    out = vq(z)
    assert torch.equal(out.indices.flatten(), assignment)
    entropy = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert out.perplexity.item() == pytest.approx(math.exp(entropy))  # = 2 ** 1.5
    assert out.usage.item() == pytest.approx(3 / 4)
    assert out.loss.item() == pytest.approx(0.0)


# --------------------------------------------------------------------------------------------------
# EMA codebook


def test_ema_update_matches_hand_computation():
    decay, eps = 0.5, 1e-5
    vq = VectorQuantizer(2, 3, 2, decay=decay, epsilon=eps, restart="none", init="uniform")
    _set_codebook(vq, torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    vectors = torch.tensor([[0.1, 0.0], [0.9, 0.1], [1.2, -0.1], [0.1, 0.2]])  # -> codes 0, 1, 1, 0
    z = vectors.T.reshape(1, 2, 2, 2)
    out = vq(z)
    assert out.indices.flatten().tolist() == [0, 1, 1, 0]
    # N_k = decay * 1 + (1 - decay) * n_k with n = (2, 2, 0)
    n = torch.tensor([0.5 + 0.5 * 2, 0.5 + 0.5 * 2, 0.5])
    # m_k = decay * e_k + (1 - decay) * sum of assigned vectors
    m = torch.tensor([[0.5 * 0.2, 0.5 * 0.2], [0.5 + 0.5 * 2.1, 0.5 * 0.0], [0.0, 0.5]])
    total = 3.5
    smoothed = (n + eps) / (total + 3 * eps) * total
    torch.testing.assert_close(vq.cluster_size, n)
    torch.testing.assert_close(vq.embed_sum, m)
    torch.testing.assert_close(vq.embedding, m / smoothed[:, None])
    # quantized used the codebook from before the update
    torch.testing.assert_close(
        _flat(out.quantized.detach()), torch.tensor([[0.0, 0.0], [1, 0], [1, 0], [0, 0]])
    )


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_eval_mode_changes_no_buffer(spatial_dims):
    vq = VectorQuantizer(spatial_dims, 8, 4)  # init="random_batch", not yet initialised
    before = _buffers(vq)
    vq.eval()
    for seed in range(3):
        vq(_z(spatial_dims, seed=seed))
    for name, value in before.items():
        assert torch.equal(getattr(vq, name), value), name


@pytest.mark.parametrize("batch, codes", [(2, 8), (1, 64)])
def test_random_batch_init_takes_codes_from_the_first_training_batch(batch, codes):
    torch.manual_seed(0)
    vq = VectorQuantizer(2, codes, 4, restart="none")
    assert not vq.initialized
    z = _z(2, batch=batch)  # 40 vectors >= 8 codes (no replacement); 20 < 64 (with replacement)
    rows = _flat(z)
    out = vq(z)  # quantized uses the codebook right after initialisation, before the EMA
    assert vq.initialized
    assert _min_dist(_flat(out.quantized.detach()), rows).max() < 1e-6
    if codes <= rows.shape[0]:
        assert out.usage.item() == 1.0  # K distinct batch vectors: each is its own nearest code
    # a second training step does not re-initialise: it quantises with the EMA codebook
    codebook = vq.embedding.clone()
    out = vq(_z(2, batch=batch, seed=5))
    assert _min_dist(_flat(out.quantized.detach()), codebook).max() < 1e-6


def test_dead_codes_are_revived_near_the_data():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0], [3.0, 3.0]])
    far = torch.full((4, 2), 100.0) + torch.arange(4.0)[:, None]
    vq = VectorQuantizer(2, 8, 2, decay=0.5, dead_code_threshold=1.0, init="uniform")
    # Far codes start with EMA usage 5: 5 -> 2.5 -> 1.25 -> 0.625 < 1, dead after the third step.
    _set_codebook(vq, torch.cat([centres, far]), cluster_size=[5.0] * 8)

    def batch() -> torch.Tensor:
        labels = torch.randint(4, (64,), generator=g)
        points = centres[labels] + 0.5 * torch.randn(64, 2, generator=g)
        return points.T.reshape(1, 2, 8, 8)

    usages = []
    for step in range(6):
        z = batch()
        usages.append(vq(z).usage.item())
        if step < 2:  # still alive: only the EMA (with Laplace smoothing) moves them, barely
            torch.testing.assert_close(vq.embedding[4:], far, rtol=1e-4, atol=0)
        if step == 2:
            # restarted codes are encoder outputs of this very batch
            d = _min_dist(vq.embedding[4:], _flat(z))
            assert d.max() < 1e-6
            torch.testing.assert_close(vq.cluster_size[4:], torch.ones(4))
    assert usages[0] == pytest.approx(0.5)
    assert usages[-1] > 0.5
    assert vq.embedding.abs().max() < 10.0


def test_restart_leaves_live_codes_untouched():
    torch.manual_seed(0)
    codebook = torch.randn(16, 4)
    z = _z(2, batch=1) * 0.3  # 20 vectors: only a few codes are used
    a = VectorQuantizer(2, 16, 4, dead_code_threshold=1.0, init="uniform")
    b = VectorQuantizer(2, 16, 4, dead_code_threshold=1.0, restart="none", init="uniform")
    _set_codebook(a, codebook)
    _set_codebook(b, codebook)
    a(z)
    b(z)
    dead = b.cluster_size < 1.0
    assert 0 < dead.sum() < 16
    live = ~dead
    for name in ("embedding", "cluster_size", "embed_sum"):
        assert torch.equal(getattr(a, name)[live], getattr(b, name)[live]), name
    # Dead codes became vectors of the batch, with one pseudo-observation each.
    d = _min_dist(a.embedding[dead], _flat(z))
    assert d.max() < 1e-6
    assert torch.equal(a.cluster_size[dead], torch.ones(int(dead.sum())))


def test_restart_uses_threshold_as_starting_usage_when_above_one():
    torch.manual_seed(0)
    vq = VectorQuantizer(2, 16, 4, dead_code_threshold=3.0, init="uniform")
    _set_codebook(vq, torch.randn(16, 4) + 50.0)  # all codes far away from data near 0
    vq(_z(2))
    assert torch.equal(vq.cluster_size, torch.full((16,), 3.0))
    torch.testing.assert_close(vq.embed_sum, 3.0 * vq.embedding)


# --------------------------------------------------------------------------------------------------
# state, dtypes, layouts, errors


def test_state_dict_round_trip():
    torch.manual_seed(0)
    vq = VectorQuantizer(3, 8, 4)
    for seed in range(3):
        vq(_z(3, seed=seed))
    state = vq.state_dict()
    assert set(state) == set(BUFFERS)
    fresh = VectorQuantizer(3, 8, 4)
    assert not fresh.initialized
    fresh.load_state_dict(state)
    for name in BUFFERS:
        assert torch.equal(getattr(fresh, name), getattr(vq, name)), name
    vq.eval()
    fresh.eval()
    z = _z(3, seed=9)
    a, b = vq(z), fresh(z)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.quantized, b.quantized)
    # the loaded flag prevents a second data-dependent initialisation
    fresh.train()
    codebook = fresh.embedding.clone()
    fresh.decay = 1.0 - 1e-12  # EMA (almost) frozen, restarts off: only an init could move codes
    fresh.restart = "none"
    fresh(z)
    torch.testing.assert_close(fresh.embedding, codebook)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_float64_input(spatial_dims):
    vq = VectorQuantizer(spatial_dims, 8, 4)
    z = _z(spatial_dims, dtype=torch.float64, requires_grad=True)
    out = vq(z)
    assert out.quantized.dtype == torch.float64 and out.loss.dtype == torch.float64
    out.loss.backward()
    assert z.grad.dtype == torch.float64
    assert vq.embedding.dtype == torch.float32


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_bf16_autocast_computes_distances_in_float32(spatial_dims):
    vq = VectorQuantizer(spatial_dims, 16, 4, init="uniform").eval()
    _set_codebook(vq, torch.randn(16, 4, generator=torch.Generator().manual_seed(1)))
    z = _z(spatial_dims).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vq(z)
    reference = vq(z.float())
    assert torch.equal(out.indices, reference.indices)
    assert out.quantized.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    torch.testing.assert_close(out.quantized.float(), reference.quantized, rtol=1e-2, atol=1e-2)
    vq.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        vq(z).loss.isfinite()
    assert vq.embedding.dtype == torch.float32 and vq.embedding.isfinite().all()


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_channels_last_input(spatial_dims):
    fmt = CHANNELS_LAST[spatial_dims]
    a = VectorQuantizer(spatial_dims, 8, 4)
    b = VectorQuantizer(spatial_dims, 8, 4)
    b.load_state_dict(a.state_dict())
    z = _z(spatial_dims)
    torch.manual_seed(0)
    ref = a(z)
    torch.manual_seed(0)
    out = b(z.contiguous(memory_format=fmt))
    assert out.quantized.is_contiguous(memory_format=fmt)
    assert torch.equal(out.indices, ref.indices)
    assert torch.equal(out.quantized, ref.quantized)
    assert torch.equal(a.embedding, b.embedding)


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="spatial_dims"):
        VectorQuantizer(1, 8, 4)
    with pytest.raises(ValueError, match="restart"):
        VectorQuantizer(2, 8, 4, restart="kmeans")
    with pytest.raises(ValueError, match="init"):
        VectorQuantizer(2, 8, 4, init="normal")
    with pytest.raises(ValueError, match="decay"):
        VectorQuantizer(2, 8, 4, decay=1.0)
    vq = VectorQuantizer(2, 8, 4)
    with pytest.raises(ValueError, match=r"\(B, 4, \*spatial\)"):
        vq(torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match="spatial dims"):
        vq(torch.randn(1, 4, 4, 4, 4))
    with pytest.raises(ValueError, match="indices"):
        vq.lookup(torch.zeros(1, 4, dtype=torch.long))


# --------------------------------------------------------------------------------------------------
# distributed: two CPU processes with gloo


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str, batches) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # rank 0 draws all random choices, like the single-process run
        vq = VectorQuantizer(2, 16, 4, decay=0.9)
        for step in batches:
            vq(step[rank])
        torch.save(vq.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(
    not dist.is_available() or "fork" not in mp.get_all_start_methods(),
    reason="needs torch.distributed and the fork start method",
)
def test_ddp_codebook_identical_across_ranks_and_equal_to_single_process(tmp_path):
    g = torch.Generator().manual_seed(0)
    # different data on each rank, and different batch sizes (1 and 2): 9 + 18 = 27 vectors a step
    batches = [
        [torch.randn(1, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g) + 1.0]
        for _ in range(4)
    ]
    # torch.multiprocessing's spawn API with the "fork" start method: the children inherit the
    # imported modules instead of re-importing medgen (which takes seconds on a busy CPU).
    mp.start_processes(
        _ddp_worker,
        args=(2, str(tmp_path / "init"), str(tmp_path), batches),
        nprocs=2,
        join=True,
        start_method="fork",
    )
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name in BUFFERS:
        assert torch.equal(states[0][name], states[1][name]), name

    torch.manual_seed(0)
    single = VectorQuantizer(2, 16, 4, decay=0.9)
    draws = []
    sample_rows = single._sample_rows
    single._sample_rows = lambda z, n: draws.append(n) or sample_rows(z, n)
    for step in batches:
        single(torch.cat(step))
    assert len(draws) > 1  # the initialisation and at least one dead-code restart
    for name in BUFFERS:
        torch.testing.assert_close(states[0][name], getattr(single, name), rtol=0, atol=1e-5)
