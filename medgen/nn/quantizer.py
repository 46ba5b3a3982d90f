"""Vector quantiser with an exponential-moving-average codebook, for VQ-VAE and VQ-GAN latents.

The bottleneck of VQ-VAE (van den Oord et al., "Neural Discrete Representation Learning", 2017):
every latent vector is replaced by its nearest codebook entry, gradients pass straight through to
the encoder, and a commitment loss keeps the encoder close to the codebook (eq. 3). The codebook is
not learned by gradients but as an exponential moving average of the encoder outputs assigned to
each code (their Appendix A.1, eqs. 6-8; Razavi et al., "Generating Diverse High-Fidelity Images
with VQ-VAE-2", 2019), with Laplace smoothing of the cluster sizes so that rarely used codes do not
divide by zero. Codes whose usage decays below a threshold are restarted from random encoder
outputs of the current batch ("random restarts for embeddings" of Dhariwal et al., "Jukebox", 2020;
also the VQ-GAN of Khader et al., "Medical Diffusion", 2023), which fights codebook collapse.

This is our own implementation of those papers, written because MONAI's ``EMAQuantizer`` lacks
what VQ-GAN training on 3D latents needs: it has no dead-code restart or data-dependent
initialisation, builds an ``(N, K)`` one-hot matrix for the statistics and the whole ``(N, K)``
distance matrix at once, and turns autocast off on CUDA only. Here the statistics are an
``index_add``, distances are chunked, and every random choice is drawn on rank 0 so that a run on
several processes equals a single-process run on the concatenated batch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from medgen.nn.factories import check_spatial_dims, memory_format_of

__all__ = ["QuantizerOutput", "VectorQuantizer"]

_RESTARTS = ("random_batch", "none")
_INITS = ("random_batch", "uniform")


class QuantizerOutput(NamedTuple):
    """What :class:`VectorQuantizer` returns.

    Attributes:
        quantized: Nearest codes with straight-through gradients, ``(B, D, *spatial)``, in the
            dtype and memory format of the input.
        loss: Commitment loss ``beta * mean((z - sg[q])^2)``, a scalar (float32 or wider).
        indices: Code indices ``(B, *spatial)``, ``torch.long``.
        perplexity: ``exp`` of the entropy of the code histogram of this process's batch, a
            scalar in ``[1, K]``.
        usage: Fraction of the ``K`` codes used at least once in this process's batch, a scalar
            in ``[0, 1]``.
    """

    quantized: Tensor
    loss: Tensor
    indices: Tensor
    perplexity: Tensor
    usage: Tensor


def _random_indices(total: int, n: int, device: torch.device) -> Tensor:
    """Draw ``n`` indices in ``[0, total)``: without replacement when possible, else with."""
    if total >= n:
        return torch.randperm(total, device=device)[:n]
    return torch.randint(total, (n,), device=device)


class VectorQuantizer(nn.Module):
    """Vector quantiser with an EMA codebook and dead-code restarts, for ``(B, D, *spatial)``.

    Each vector ``z`` of the input (the channel axis at every spatial position) is assigned to its
    nearest code ``e_k = argmin_j ||z - e_j||^2``, computed as ``||e_j||^2 - 2 z . e_j`` (the
    ``||z||^2`` term does not change the argmin) in float32 even under autocast, in chunks that
    bound the size of the distance matrix. The output is ``q = e_k`` with the straight-through
    estimator (van den Oord et al., 2017, Sec. 3.2), so ``d quantized / d z`` is the identity, and
    the loss is the commitment term of their eq. 3, ``beta * ||z - sg[e]||^2`` (averaged over all
    elements). There is no codebook term: in training mode the codebook follows an exponential
    moving average (Appendix A.1, eqs. 6-8)::

        N_k <- decay * N_k + (1 - decay) * n_k              (cluster_size, n_k = batch count)
        m_k <- decay * m_k + (1 - decay) * sum_{z -> k} z     (embed_sum)
        e_k <- m_k / N~_k,   N~_k = (N_k + eps) / (sum_j N_j + K eps) * sum_j N_j

    where ``N~`` is the Laplace-smoothed cluster size. Codes start as one pseudo-observation
    (``N_k = 1``, ``m_k = e_k``). After each update, codes with ``N_k < dead_code_threshold`` are
    re-initialised from encoder outputs of the current batch drawn at random (Dhariwal et al.,
    2020) and given ``N_k = max(dead_code_threshold, 1)``, ``m_k = N_k e_k``, so that a restarted
    code survives the next step if it is used at least ``dead_code_threshold`` times; live codes
    are left as the EMA made them. With ``init="random_batch"`` the whole codebook is first set to
    ``K`` random encoder outputs of the first training batch.

    Buffers (none of them are parameters; they travel with ``state_dict``): ``embedding``
    ``(K, D)``, the codebook; ``cluster_size`` ``(K,)``; ``embed_sum`` ``(K, D)``; ``initialized``,
    a boolean scalar. Keep them in float32: the module computes in ``float32`` or the input's
    dtype, whichever is wider.

    The EMA update and restarts run only in training mode, under ``torch.no_grad``; evaluation
    never changes the buffers. When ``torch.distributed`` is initialised with more than one process
    and ``sync_ddp`` is true, the per-batch counts and sums are all-reduced (summed) before the
    update and every random choice is drawn on rank 0 from the concatenation of all processes'
    batches, so the codebook stays identical on every rank and equals that of a single process
    fed the concatenated batch (with rank 0 seeded like that process). All processes must then
    call ``forward`` in training mode together, as DDP does.

    Args:
        spatial_dims: Number of spatial dimensions, 2 or 3.
        num_embeddings: Codebook size ``K``.
        embedding_dim: Code dimension ``D``, the channel count of the input.
        commitment_cost: Weight ``beta`` of the commitment loss (0.25 in the paper).
        decay: EMA decay ``gamma`` in ``[0, 1)`` (0.99 in the paper).
        epsilon: Laplace-smoothing constant for the cluster sizes.
        dead_code_threshold: A code whose EMA cluster size falls below this is restarted; ``0``
            disables restarts.
        restart: ``"random_batch"`` (restart dead codes from random encoder outputs of the batch)
            or ``"none"``.
        init: ``"random_batch"`` (set the codebook from the first training batch) or ``"uniform"``
            (keep the initial ``U(-1/K, 1/K)`` codebook).
        sync_ddp: All-reduce statistics and share random choices across processes when
            ``torch.distributed`` is initialised.

    Example:
        >>> vq = VectorQuantizer(3, num_embeddings=512, embedding_dim=8)
        >>> out = vq(torch.randn(2, 8, 4, 4, 4))
        >>> out.quantized.shape, out.indices.shape
        (torch.Size([2, 8, 4, 4, 4]), torch.Size([2, 4, 4, 4]))
        >>> vq.lookup(out.indices).shape
        torch.Size([2, 8, 4, 4, 4])
    """

    embedding: Tensor
    cluster_size: Tensor
    embed_sum: Tensor
    initialized: Tensor

    #: Upper bound on the number of elements of one chunk of the ``(N, K)`` distance matrix.
    max_distance_elements: int = 2**25

    def __init__(
        self,
        spatial_dims: int,
        num_embeddings: int,
        embedding_dim: int,
        commitment_cost: float = 0.25,
        decay: float = 0.99,
        epsilon: float = 1e-5,
        dead_code_threshold: float = 1.0,
        restart: str | None = "random_batch",
        init: str = "random_batch",
        sync_ddp: bool = True,
    ) -> None:
        super().__init__()
        self.spatial_dims = check_spatial_dims(spatial_dims)
        if num_embeddings < 1 or embedding_dim < 1:
            raise ValueError(
                f"num_embeddings and embedding_dim must be positive, got {num_embeddings} and "
                f"{embedding_dim}."
            )
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}.")
        if epsilon <= 0.0:
            raise ValueError(f"epsilon must be positive, got {epsilon}.")
        if commitment_cost < 0.0 or dead_code_threshold < 0.0:
            raise ValueError(
                f"commitment_cost and dead_code_threshold must be non-negative, got "
                f"{commitment_cost} and {dead_code_threshold}."
            )
        restart = "none" if restart is None else restart
        if restart not in _RESTARTS:
            raise ValueError(f"restart must be one of {_RESTARTS}, got {restart!r}.")
        if init not in _INITS:
            raise ValueError(f"init must be one of {_INITS}, got {init!r}.")

        self.num_embeddings = int(num_embeddings)
        self.embedding_dim = int(embedding_dim)
        self.commitment_cost = float(commitment_cost)
        self.decay = float(decay)
        self.epsilon = float(epsilon)
        self.dead_code_threshold = float(dead_code_threshold)
        self.restart = restart
        self.init = init
        self.sync_ddp = bool(sync_ddp)

        k = self.num_embeddings
        embedding = torch.empty(k, self.embedding_dim).uniform_(-1.0 / k, 1.0 / k)
        self.register_buffer("embedding", embedding)
        self.register_buffer("cluster_size", torch.ones(k))
        self.register_buffer("embed_sum", embedding.clone())
        self.register_buffer("initialized", torch.tensor(init == "uniform"))

    # ----------------------------------------------------------------------------------------------
    # forward

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantise ``z`` and, in training mode, update the codebook.

        Args:
            z: Encoder output of shape ``(B, D, *spatial)``, any floating dtype and memory format.

        Returns:
            A :class:`QuantizerOutput`. ``quantized`` and ``indices`` are computed with the
            codebook as it was before this call's update.

        Raises:
            ValueError: If ``z`` is not a floating tensor of shape ``(B, D, *spatial)``.
        """
        self._check_input(z)
        dim = self.embedding_dim
        compute_dtype = torch.promote_types(
            torch.promote_types(z.dtype, self.embedding.dtype), torch.float32
        )
        # (B, D, *spatial) -> (B, *spatial, D) -> (N, D); free for channels-last inputs.
        z_flat = z.detach().movedim(1, -1).reshape(-1, dim).to(compute_dtype)

        if self.training and self.init == "random_batch":
            self._maybe_init(z_flat)

        codebook = self.embedding.to(compute_dtype)
        flat_indices = self._nearest(z_flat, codebook)
        indices = flat_indices.view(z.shape[0], *z.shape[2:])

        # Quantised vectors, laid out like z (channels-last stays channels-last).
        q = F.embedding(indices, codebook).movedim(-1, 1)
        q = q.contiguous(memory_format=memory_format_of(z))
        z_c = z.to(compute_dtype)
        loss = self.commitment_cost * F.mse_loss(z_c, q)
        # Straight-through estimator: forward value exactly q, gradient the identity to z.
        quantized = q.to(z.dtype) + (z - z.detach())

        counts = torch.bincount(flat_indices, minlength=self.num_embeddings)
        perplexity, usage = _perplexity_and_usage(counts)

        if self.training:
            self._update(z_flat, flat_indices, counts)

        return QuantizerOutput(quantized, loss, indices, perplexity, usage)

    def lookup(self, indices: Tensor) -> Tensor:
        """Decode code indices to vectors.

        Args:
            indices: Integer tensor of shape ``(B, *spatial)``.

        Returns:
            Codebook vectors of shape ``(B, D, *spatial)`` (contiguous, the codebook's dtype).

        Raises:
            ValueError: If ``indices`` is not an integer tensor with ``spatial_dims + 1`` dims.
        """
        if indices.dim() != self.spatial_dims + 1 or indices.is_floating_point():
            raise ValueError(
                f"indices must be an integer tensor of shape (B, *spatial) with {self.spatial_dims} "
                f"spatial dims, got {indices.dtype} of shape {tuple(indices.shape)}."
            )
        return F.embedding(indices.long(), self.embedding).movedim(-1, 1).contiguous()

    def extra_repr(self) -> str:
        return (
            f"spatial_dims={self.spatial_dims}, num_embeddings={self.num_embeddings}, "
            f"embedding_dim={self.embedding_dim}, commitment_cost={self.commitment_cost}, "
            f"decay={self.decay}, dead_code_threshold={self.dead_code_threshold}, "
            f"restart={self.restart!r}, init={self.init!r}"
        )

    # ----------------------------------------------------------------------------------------------
    # helpers

    def _check_input(self, z: Tensor) -> None:
        if (
            z.dim() != self.spatial_dims + 2
            or z.shape[1] != self.embedding_dim
            or not z.is_floating_point()
        ):
            raise ValueError(
                f"Expected a floating tensor of shape (B, {self.embedding_dim}, *spatial) with "
                f"{self.spatial_dims} spatial dims, got {z.dtype} of shape {tuple(z.shape)}."
            )

    @torch.no_grad()
    def _nearest(self, z_flat: Tensor, codebook: Tensor) -> Tensor:
        """Index of the nearest code for each row of ``z_flat`` ``(N, D)``; returns ``(N,)``."""
        # Autocast would run the matmul in bf16/fp16 and flip close assignments.
        with torch.autocast(device_type=z_flat.device.type, enabled=False):
            e_sq = codebook.pow(2).sum(dim=1)
            chunk = max(1, self.max_distance_elements // self.num_embeddings)
            if z_flat.shape[0] <= chunk:
                return torch.addmm(e_sq, z_flat, codebook.t(), alpha=-2.0).argmin(dim=1)
            return torch.cat(
                [
                    torch.addmm(e_sq, part, codebook.t(), alpha=-2.0).argmin(dim=1)
                    for part in z_flat.split(chunk)
                ]
            )

    def _distributed(self) -> bool:
        return (
            self.sync_ddp
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size() > 1
        )

    def _sample_rows(self, z_flat: Tensor, n: int) -> Tensor:
        """Draw ``n`` random rows of the (global) batch; identical on every process.

        In a distributed run, rank 0 draws indices into the concatenation of all processes' rows
        (in rank order), and each process contributes the rows it holds to a sum all-reduce.
        """
        device = z_flat.device
        if not self._distributed():
            return z_flat[_random_indices(z_flat.shape[0], n, device)]
        world, rank = dist.get_world_size(), dist.get_rank()
        sizes = torch.zeros(world, dtype=torch.long, device=device)
        sizes[rank] = z_flat.shape[0]
        dist.all_reduce(sizes)
        offsets = torch.cumsum(sizes, 0) - sizes
        total = int(sizes.sum())
        idx = torch.zeros(n, dtype=torch.long, device=device)
        if rank == 0:
            idx = _random_indices(total, n, device)
        dist.broadcast(idx, src=0)
        local = idx - offsets[rank]
        mine = (local >= 0) & (local < z_flat.shape[0])
        rows = z_flat.new_zeros(n, z_flat.shape[1])
        rows[mine] = z_flat[local[mine]]
        dist.all_reduce(rows)
        return rows

    @torch.compiler.disable
    @torch.no_grad()
    def _maybe_init(self, z_flat: Tensor) -> None:
        """Set the codebook to random rows of the first training batch (once)."""
        if bool(self.initialized):
            return
        rows = self._sample_rows(z_flat, self.num_embeddings).to(self.embedding.dtype)
        self.embedding.copy_(rows)
        self.embed_sum.copy_(rows)
        self.cluster_size.fill_(1.0)
        self.initialized.fill_(True)

    # Collectives and data-dependent restarts are side effects; keep them out of compiled graphs.
    @torch.compiler.disable
    @torch.no_grad()
    def _update(self, z_flat: Tensor, flat_indices: Tensor, counts: Tensor) -> None:
        """EMA update of the codebook (van den Oord et al., 2017, eqs. 6-8), then restarts."""
        k, dim = self.num_embeddings, self.embedding_dim
        # Per-code sums and counts in one (K, D + 1) tensor, so one all-reduce carries both.
        stats = z_flat.new_zeros(k, dim + 1)
        stats[:, :dim].index_add_(0, flat_indices, z_flat)
        stats[:, dim] = counts.to(stats.dtype)
        if self._distributed():
            dist.all_reduce(stats)
        stats = stats.to(self.embed_sum.dtype)

        weight = 1.0 - self.decay
        self.cluster_size.lerp_(stats[:, dim], weight)
        self.embed_sum.lerp_(stats[:, :dim], weight)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.epsilon) / (total + k * self.epsilon) * total
        self.embedding.copy_(self.embed_sum / smoothed.unsqueeze(1))

        if self.restart == "none" or self.dead_code_threshold <= 0.0:
            return
        # cluster_size is identical on every rank, so all ranks agree on this branch.
        dead = self.cluster_size < self.dead_code_threshold
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        rows = self._sample_rows(z_flat, n_dead).to(self.embedding.dtype)
        start = max(self.dead_code_threshold, 1.0)
        self.embedding[dead] = rows
        self.embed_sum[dead] = rows * start
        self.cluster_size[dead] = start


def _perplexity_and_usage(counts: Tensor) -> tuple[Tensor, Tensor]:
    """Perplexity ``exp(-sum p log p)`` and fraction of used codes of a histogram ``(K,)``."""
    counts = counts.float()
    probs = counts / counts.sum().clamp_min(1.0)
    perplexity = torch.exp(-torch.xlogy(probs, probs).sum())
    usage = (counts > 0).float().mean()
    return perplexity, usage
