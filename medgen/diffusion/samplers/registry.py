"""The open sampler registry: a sampler is a function plus capability flags, found by name.

A sampler registers itself where it is defined (one module, see ``docs/models/diffusion.md``,
"Adding a sampler")::

    @register_sampler("my_sampler", family="vp", order=1, default_steps=50)
    def my_sample(denoise, schedule, x, steps=50, generator=None, hook=None): ...

and :class:`medgen.models.Diffusion` then accepts ``sample(sampler="my_sampler")`` on every model
whose :class:`~medgen.diffusion.process.DiffusionProcess` has the sampler's ``family``. The model
decides from the flags alone: the family must match, ``eta`` is passed only where
``supports_eta``, RePaint's ``resample`` only where ``supports_resample``, and ``steps`` defaults
to ``default_steps`` (``None``: the full training chain, ``num_train_timesteps``).

Calling conventions, by family (the process calls the function):

- ``"vp"``: ``fn(denoise, schedule, x, *, steps, generator, hook[, eta][, resample])`` with
  ``denoise(x_t, t) -> (x0_hat, eps_hat)`` at integer timesteps of the
  :class:`~medgen.diffusion.NoiseSchedule` ``schedule``;
- ``"flow"``: ``fn(velocity, x, *, steps, shift, generator, hook)`` with
  ``velocity(x_t, t) -> v`` at float times in ``[0, 1]``.

``hook(x, t_next) -> x`` is called after every step with the time just reached (``-1`` / ``0.0``
for clean data); ``generator`` is a CPU generator for step noise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

__all__ = [
    "SAMPLERS",
    "SAMPLER_FAMILIES",
    "Sampler",
    "get_sampler",
    "list_samplers",
    "register_sampler",
    "unregister_sampler",
]

#: Sampler families, one per kind of :class:`~medgen.diffusion.process.DiffusionProcess`.
SAMPLER_FAMILIES = ("vp", "flow")


@dataclass(frozen=True)
class Sampler:
    """A named sampler: its function, the process family it needs and its capabilities.

    Attributes:
        name: Canonical name.
        family: ``"vp"`` (needs a denoiser of a noise-schedule model) or ``"flow"`` (needs a
            velocity of a rectified-flow model).
        fn: The sampling function (calling convention of its family, see the module docstring).
        evals_per_step: Net evaluations per step (Heun: 2).
        stochastic: Whether it draws step noise (always, not only with ``eta > 0``).
        order: Order of accuracy of the solver (1: Euler-like, 2: DPM-Solver++(2M), Heun).
        default_steps: Steps when none are asked for; ``None``: the full training chain
            (``num_train_timesteps``, DDPM's reference).
        supports_eta: Takes ``eta`` (stochasticity, as DDIM's).
        supports_resample: Takes RePaint's ``resample``.
        aliases: Other names it is found by (lower case).
    """

    name: str
    family: str
    fn: Callable[..., Tensor]
    evals_per_step: int = 1
    stochastic: bool = False
    order: int = 1
    default_steps: int | None = 50
    supports_eta: bool = False
    supports_resample: bool = False
    aliases: tuple[str, ...] = field(default=())

    def evaluations(self, steps: int) -> int:
        """Net evaluations for ``steps`` steps."""
        return self.evals_per_step * steps


#: Registered samplers by canonical name, in registration order (the live registry).
SAMPLERS: dict[str, Sampler] = {}
_ALIASES: dict[str, str] = {}


def _key(name: str) -> str:
    return str(name).lower().replace("-", "_")


def register_sampler(
    name: str,
    fn: Callable[..., Tensor] | None = None,
    *,
    family: str,
    stochastic: bool = False,
    order: int = 1,
    default_steps: int | None = 50,
    supports_eta: bool = False,
    supports_resample: bool = False,
    evals_per_step: int = 1,
    aliases: tuple[str, ...] | list[str] = (),
    replace: bool = False,
) -> Callable[..., Tensor] | Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Register a sampling function under ``name`` with its capability flags.

    Use it as a call, ``register_sampler("ddim", ddim_sample, family="vp", ...)``, or as a
    decorator, ``@register_sampler("ddim", family="vp", ...)`` (returns the function unchanged).

    Args:
        name: Canonical name (case-insensitive; ``-`` reads as ``_``).
        fn: The sampling function; omit it to get a decorator.
        family: ``"vp"`` or ``"flow"``: the process whose model function it calls.
        stochastic: Whether it draws step noise.
        order: Order of accuracy of the solver.
        default_steps: Steps when none are asked for (``None``: ``num_train_timesteps``).
        supports_eta: Takes ``eta``.
        supports_resample: Takes RePaint's ``resample``.
        evals_per_step: Net evaluations per step.
        aliases: Other names it is found by.
        replace: Replace an existing registration of ``name`` (else that is an error).

    Returns:
        ``fn``, or a decorator when ``fn`` is omitted.

    Raises:
        ValueError: For an unknown family, invalid flags, or a name (or alias) already taken.
    """
    if family not in SAMPLER_FAMILIES:
        raise ValueError(
            f"sampler family must be one of {', '.join(SAMPLER_FAMILIES)}, got {family!r}"
        )
    if order < 1 or evals_per_step < 1:
        raise ValueError(f"order and evals_per_step must be >= 1, got {order}, {evals_per_step}")
    if default_steps is not None and default_steps < 1:
        raise ValueError(f"default_steps must be >= 1 or None, got {default_steps}")

    def register(function: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if not callable(function):
            raise TypeError(f"sampler {name!r} needs a callable, got {type(function).__name__}")
        key = _key(name)
        names = (key, *(_key(a) for a in aliases))
        if not replace:
            taken = [n for n in names if n in SAMPLERS or n in _ALIASES]
            if taken:
                raise ValueError(
                    f"sampler name {taken[0]!r} is already registered; pass replace=True to "
                    "replace it"
                )
        else:
            unregister_sampler(key, missing_ok=True)
        SAMPLERS[key] = Sampler(
            name=key,
            family=family,
            fn=function,
            evals_per_step=int(evals_per_step),
            stochastic=bool(stochastic),
            order=int(order),
            default_steps=None if default_steps is None else int(default_steps),
            supports_eta=bool(supports_eta),
            supports_resample=bool(supports_resample),
            aliases=tuple(names[1:]),
        )
        for alias in names[1:]:
            _ALIASES[alias] = key
        return function

    return register if fn is None else register(fn)


def unregister_sampler(name: str, missing_ok: bool = False) -> None:
    """Remove the sampler ``name`` and its aliases from the registry (e.g. after a test)."""
    key = _key(name)
    spec = SAMPLERS.pop(key, None)
    if spec is None:
        if missing_ok:
            return
        raise ValueError(f"no sampler {name!r} is registered")
    for alias in spec.aliases:
        _ALIASES.pop(alias, None)


def get_sampler(name: str) -> Sampler:
    """The :class:`Sampler` called ``name`` (case-insensitive; aliases such as ``dpm++2m``)."""
    key = _key(name)
    key = _ALIASES.get(key, _ALIASES.get(str(name).lower(), key))
    if key not in SAMPLERS:
        raise ValueError(
            f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)} "
            f"(aliases: {', '.join(_ALIASES)})"
        )
    return SAMPLERS[key]


def list_samplers(
    family: str | None = None,
    *,
    stochastic: bool | None = None,
    supports_eta: bool | None = None,
    supports_resample: bool | None = None,
) -> list[str]:
    """Names of the registered samplers, in registration order, filtered by capabilities.

    Args:
        family: Only samplers of this family (``"vp"`` / ``"flow"``); ``None``: all.
        stochastic: Only (non-)stochastic samplers; ``None``: either.
        supports_eta: Only samplers that do (not) take ``eta``; ``None``: either.
        supports_resample: Only samplers that do (not) take ``resample``; ``None``: either.

    Returns:
        Canonical names.
    """
    wanted = {
        "family": family,
        "stochastic": stochastic,
        "supports_eta": supports_eta,
        "supports_resample": supports_resample,
    }
    return [
        spec.name
        for spec in SAMPLERS.values()
        if all(v is None or getattr(spec, k) == v for k, v in wanted.items())
    ]
