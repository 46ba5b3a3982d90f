"""The open sampler registry: flags, registration, and the model's checks by flags.

A contract test runs over every registered sampler (a new one is covered once it is registered):
its flags must tell the truth (net evaluations per step, stochastic or not, where the hook is
called), with the model functions of its family's process.
"""

from __future__ import annotations

import pkgutil
import sys

import pytest
import torch

import medgen.diffusion.samplers as samplers_package
from medgen.diffusion import (
    SAMPLERS,
    ddim_sample,
    euler_sample,
    get_sampler,
    list_samplers,
    make_process,
    register_sampler,
    unregister_sampler,
)
from medgen.models import Diffusion
from tests.helpers import TINY_DIFFUSION_NET

TINY_NET = TINY_DIFFUSION_NET


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(**kwargs) -> Diffusion:
    torch.manual_seed(0)
    kwargs.setdefault("schedule", {"kind": "cosine", "num_train_timesteps": 20})
    model = Diffusion(net=TINY_NET, sample_size=[8, 8], **kwargs)
    with torch.no_grad():
        for p in model.net.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    return model


@pytest.fixture()
def toy():
    """Registers samplers for one test and removes them afterwards."""
    names = []

    def register(name, fn, **flags):
        register_sampler(name, fn, **flags)
        names.append(name)

    yield register
    for name in names:
        unregister_sampler(name, missing_ok=True)


# ------------------------------------------------------------------------------------------------
# The registry
# ------------------------------------------------------------------------------------------------
def test_builtin_samplers_and_their_flags():
    assert list_samplers("vp") == ["ddim", "ddpm", "dpmpp_2m"]
    assert list_samplers("flow") == ["euler", "heun"]
    assert list_samplers("vp", supports_eta=True) == ["ddim"]
    assert list_samplers(supports_resample=True) == ["ddim", "ddpm"]
    assert list_samplers(stochastic=True) == ["ddpm"]
    ddpm, heun = get_sampler("ddpm"), get_sampler("rflow_heun")
    assert ddpm.default_steps is None and ddpm.stochastic and ddpm.order == 1
    assert heun.name == "heun" and heun.order == 2 and heun.evaluations(10) == 20
    assert get_sampler("DPM++2M").order == 2 and get_sampler("dpm-solver++").name == "dpmpp_2m"
    # every module of the package is imported with it (a new sampler is one file)
    for module in pkgutil.iter_modules(samplers_package.__path__):
        assert f"medgen.diffusion.samplers.{module.name}" in sys.modules


def test_registration_errors_and_replacement(toy):
    with pytest.raises(ValueError, match="already registered"):
        register_sampler("ddim", ddim_sample, family="vp")
    with pytest.raises(ValueError, match="already registered"):
        register_sampler("mine", ddim_sample, family="vp", aliases=("dpm++",))
    with pytest.raises(ValueError, match="family must be one of vp, flow"):
        register_sampler("mine", ddim_sample, family="score")
    with pytest.raises(ValueError, match="order"):
        register_sampler("mine", ddim_sample, family="vp", order=0)
    toy("mine", ddim_sample, family="vp", aliases=("my-alias",))
    assert get_sampler("My_Alias").name == "mine"
    register_sampler("mine", euler_sample, family="flow", replace=True)
    assert get_sampler("mine").family == "flow" and "my_alias" not in list_samplers()
    with pytest.raises(ValueError, match="unknown sampler"):
        get_sampler("my_alias")
    unregister_sampler("mine")
    with pytest.raises(ValueError, match="unknown sampler 'mine'"):
        get_sampler("mine")


def test_decorator_form_returns_the_function():
    @register_sampler("decorated", family="flow", order=1)
    def decorated(velocity, x, steps=2, shift=1.0, generator=None, hook=None):
        return euler_sample(velocity, x, steps, shift, generator, hook)

    try:
        assert get_sampler("decorated").fn is decorated and "decorated" in list_samplers("flow")
    finally:
        unregister_sampler("decorated")


# ------------------------------------------------------------------------------------------------
# The model uses any registered sampler, checked by its flags
# ------------------------------------------------------------------------------------------------
def test_a_registered_toy_sampler_is_usable_by_diffusion_sample(toy):
    calls = []

    def toy_sample(denoise, schedule, x, steps=10, generator=None, hook=None):
        calls.append(steps)
        return ddim_sample(denoise, schedule, x, steps, eta=0.0, generator=generator, hook=hook)

    toy("toy", toy_sample, family="vp", order=1, default_steps=3)
    assert "toy" in list_samplers("vp") and "toy" not in list_samplers("flow")
    model = _model()
    out = model.sample(2, sampler="toy", seed=1)  # default_steps
    assert calls == [3]
    assert torch.equal(out, model.sample(2, sampler="ddim", steps=3, seed=1))
    # the model's checks come from the flags: no eta, no resample
    with pytest.raises(ValueError, match="'toy' takes no eta; samplers with eta: ddim"):
        model.sample(2, sampler="toy", eta=0.5)
    known, mask = torch.zeros(1, 1, 8, 8), torch.ones(1, 1, 8, 8)
    with pytest.raises(ValueError, match=r"works with the ddim, ddpm samplers, not 'toy'"):
        model.sample(2, sampler="toy", known=known, mask=mask, resample=2)
    # a model can name it as its default sampler (config key model.sampler.name)
    default = _model(sampler={"name": "toy", "steps": 2})
    default.sample(1, seed=0)
    assert calls[-1] == 2
    # and error messages list it with the other samplers of its family
    with pytest.raises(ValueError, match="use one of ddim, ddpm, dpmpp_2m, toy"):
        model.sample(1, sampler="euler")


def test_flags_pass_eta_and_resample_and_the_flow_shift(toy):
    seen = {}

    def vp_toy(denoise, schedule, x, steps=1, generator=None, hook=None, eta=0.0, resample=1):
        seen.update(eta=eta, resample=resample)
        return ddim_sample(denoise, schedule, x, steps, eta, generator, hook, resample)

    def flow_toy(velocity, x, steps=1, shift=1.0, generator=None, hook=None):
        seen.update(shift=shift)
        return euler_sample(velocity, x, steps, shift, generator, hook)

    toy("vp_toy", vp_toy, family="vp", supports_eta=True, supports_resample=True, stochastic=True)
    toy("flow_toy", flow_toy, family="flow", default_steps=4)
    known, mask = torch.zeros(1, 1, 8, 8), torch.ones(1, 1, 8, 8)
    _model().sample(1, sampler="vp_toy", steps=2, eta=0.3, known=known, mask=mask, resample=2)
    assert seen == {"eta": 0.3, "resample": 2}
    flow = _model(prediction="flow", flow={"shift": 3.0})
    out = flow.sample(2, sampler="flow_toy", seed=0)
    assert seen["shift"] == 3.0
    assert torch.equal(out, flow.sample(2, sampler="euler", steps=4, seed=0))


def test_a_sampler_of_the_other_family_is_refused_with_the_allowed_names():
    with pytest.raises(ValueError, match="'euler'.*does not fit.*use one of ddim, ddpm, dpmpp_2m"):
        _model().sample(1, sampler="euler")
    flow = _model(prediction="flow")
    with pytest.raises(ValueError, match="does not fit a rectified-flow model; use one of euler"):
        flow.sample(1, sampler="dpm++2m")
    with pytest.raises(ValueError, match="does not fit a v-prediction model"):
        _model(prediction="v", sampler={"name": "heun"})  # checked when the model is built
    with pytest.raises(ValueError, match="'euler' takes no eta"):
        flow.sample(1, sampler="euler", eta=1.0)
    flow.sample(1, steps=1, sampler="euler", eta=0.0)  # no stochasticity asked for: fine


# ------------------------------------------------------------------------------------------------
# Contract: every registered sampler's flags tell the truth
# ------------------------------------------------------------------------------------------------
def _model_function(family: str, schedule, counter: list[int]):
    if family == "vp":
        from medgen.diffusion import eps_from_x0

        def denoise(x, t):
            counter.append(t)
            x0 = torch.tanh(0.9 * x)
            return x0, eps_from_x0(x, x0, schedule.alpha_bar(t).float())

        return denoise

    def velocity(x, t):
        counter.append(t)
        return 0.5 * x - t

    return velocity


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_registered_sampler_keeps_its_flags(name):
    spec = get_sampler(name)
    process = make_process(
        "epsilon" if spec.family == "vp" else "flow", {"num_train_timesteps": 20}
    )
    schedule = getattr(process, "schedule", None)
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    options = {"eta": 0.0} if spec.supports_eta else {}
    steps = 3

    def run(seed):
        counter, times = [], []

        def hook(y, t_next):
            times.append(t_next)
            return y

        out = process.run_sampler(
            spec,
            _model_function(spec.family, schedule, counter),
            x,
            steps=steps,
            generator=torch.Generator().manual_seed(seed),
            hook=hook,
            **options,
        )
        return out, counter, times

    out, counter, times = run(0)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert len(counter) == spec.evaluations(steps)
    assert len(times) == steps and times[-1] in (-1, 0.0)  # the last step reaches clean data
    assert torch.equal(run(0)[0], out)  # a seed gives the same samples
    assert torch.equal(run(1)[0], out) != spec.stochastic  # step noise iff stochastic
    assert process.default_sampler_steps(spec) == (spec.default_steps or 20)
