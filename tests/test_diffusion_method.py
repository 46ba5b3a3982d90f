"""The diffusion method apart from any net: schedules, objectives, samplers and guidance.

Closed forms where they exist (forward noising, published schedules, the Gaussian toy whose
probability-flow ODE is solved exactly), MONAI's schedulers where we reproduce their update rules.
"""

from __future__ import annotations

import math

import pytest
import torch

from medgen.diffusion import (
    DiffusionObjective,
    NoiseSchedule,
    RectifiedFlowObjective,
    classifier_free_guidance,
    condition_dropout_mask,
    cosine_alpha_bar,
    ddim_sample,
    ddim_step,
    ddpm_coefficients,
    ddpm_sample,
    ddpm_step,
    dpmpp_2m_sample,
    eps_from_v,
    eps_from_x0,
    euler_sample,
    flow_time_grid,
    get_sampler,
    guided,
    heun_sample,
    make_betas,
    min_snr_weight,
    predict_x0_eps,
    prediction_target,
    shift_time,
    sigmoid_alpha_bar,
    timestep_grid,
    v_from_x0_eps,
    x0_from_eps,
    x0_from_v,
)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------
# Schedules
# ------------------------------------------------------------------------------------------------
def test_published_schedules():
    T = 1000
    lin = make_betas("linear", T).double()
    torch.testing.assert_close(lin, torch.linspace(1e-4, 0.02, T, dtype=torch.float64))
    scaled = make_betas("scaled_linear", T).double()  # MONAI's / diffusers' default betas
    expected = torch.linspace(1e-4**0.5, 0.02**0.5, T, dtype=torch.float64) ** 2
    torch.testing.assert_close(scaled, expected)
    scaled = make_betas("scaled_linear", T, beta_start=0.00085, beta_end=0.012).double()
    expected = torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float64) ** 2
    torch.testing.assert_close(scaled, expected)  # Stable Diffusion's, explicitly
    # Cosine (Nichol & Dhariwal 2021, Eq. 17): alpha_bar at 0-based index i is f(i+1)/f(0),
    # except where beta hits its 0.999 clip at the very end.
    cos = NoiseSchedule("cosine", T)
    t = torch.arange(1, T + 1, dtype=torch.float64) / T
    closed = cosine_alpha_bar(t)
    torch.testing.assert_close(cos.alphas_cumprod[:-1].double(), closed[:-1], rtol=2e-4, atol=1e-6)
    assert float(cos.betas.max()) <= 0.999 + 1e-7
    # Sigmoid (Chen 2023, Alg. 1): alpha_bar(0) = 1, alpha_bar(1/2) = 1/2 for a symmetric range.
    sig = NoiseSchedule("sigmoid", T)
    closed = sigmoid_alpha_bar(t)
    torch.testing.assert_close(sig.alphas_cumprod[:-1].double(), closed[:-1], rtol=2e-4, atol=1e-6)
    assert float(sigmoid_alpha_bar(torch.tensor(0.0))) == pytest.approx(1.0)
    assert float(sigmoid_alpha_bar(torch.tensor(0.5))) == pytest.approx(0.5)
    for kind in ("linear", "scaled_linear", "cosine", "sigmoid"):
        s = NoiseSchedule(kind, T)
        a = s.alphas_cumprod
        assert (a[1:] < a[:-1]).all() and 0 < float(a[-1]) < 0.01 < 0.99 < float(a[0])
        # alphas_cumprod is the running product of 1 - beta (in float64, then stored as float32).
        torch.testing.assert_close(
            a.double(), torch.cumprod(1 - s.betas.double(), 0), rtol=1e-5, atol=0
        )
        assert not s.state_dict()  # buffers, not persistent: the config rebuilds them


def test_schedules_match_monai_betas():
    from monai.networks.schedulers import DDPMScheduler

    for ours, theirs, kwargs in [
        ("linear", "linear_beta", {}),
        ("scaled_linear", "scaled_linear_beta", {"beta_start": 0.0015, "beta_end": 0.0195}),
        ("cosine", "cosine", {}),
    ]:
        s = NoiseSchedule(ours, 500, **kwargs)
        m = DDPMScheduler(500, schedule=theirs, **kwargs)
        torch.testing.assert_close(s.alphas_cumprod, m.alphas_cumprod.float())


def test_bad_schedule_names_are_errors():
    with pytest.raises(ValueError, match="unknown noise schedule"):
        NoiseSchedule("quadratic")
    with pytest.raises(ValueError, match="beta_start"):
        NoiseSchedule("linear", beta_start=0.1, beta_end=0.01)


def test_forward_noising_matches_its_closed_form():
    """q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I), analytically and empirically."""
    schedule = NoiseSchedule("linear", 1000)
    x0 = torch.tensor([-0.8, 0.1, 0.7])
    generator = torch.Generator().manual_seed(0)
    n = 200_000
    for t in (0, 10, 250, 999):
        a = float(torch.prod(1 - schedule.betas.double()[: t + 1]))
        assert float(schedule.alpha_bar(t)) == pytest.approx(a, rel=1e-5)
        noise = torch.randn(n, 3, generator=generator)
        x_t = schedule.add_noise(x0.expand(n, 3), noise, torch.full((n,), t))
        # exact: the same noise through the formula
        torch.testing.assert_close(x_t, math.sqrt(a) * x0 + math.sqrt(1 - a) * noise)
        mean, var = x_t.double().mean(0), x_t.double().var(0)
        se = math.sqrt((1 - a) / n)
        assert torch.allclose(mean, math.sqrt(a) * x0.double(), atol=5 * se)
        assert torch.allclose(var, torch.full((3,), 1 - a, dtype=torch.float64), rtol=0.02)
    assert float(schedule.alpha_bar(-1)) == 1.0  # the clean end used by samplers


# ------------------------------------------------------------------------------------------------
# Objectives
# ------------------------------------------------------------------------------------------------
def test_prediction_conversions_round_trip():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 2, 5, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 2, 5, 5, generator=g, dtype=torch.float64)
    a = torch.tensor([0.999, 0.7, 0.2, 1e-3], dtype=torch.float64).view(4, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = v_from_x0_eps(x0, eps, a)
    torch.testing.assert_close(x0_from_eps(x_t, eps, a), x0)
    torch.testing.assert_close(eps_from_x0(x_t, x0, a), eps)
    torch.testing.assert_close(x0_from_v(x_t, v, a), x0)
    torch.testing.assert_close(eps_from_v(x_t, v, a), eps)
    # v = alpha eps - sigma x0 and |v|^2 relation: alpha^2 + sigma^2 = 1 rotates (x0, eps).
    torch.testing.assert_close(v.square() + x_t.square(), x0.square() + eps.square() + 0 * v)
    for prediction in ("epsilon", "v", "x0"):
        target = prediction_target(x0, eps, a, prediction)
        got_x0, got_eps = predict_x0_eps(target, x_t, a, prediction)
        torch.testing.assert_close(got_x0, x0)
        torch.testing.assert_close(got_eps, eps)


def test_min_snr_weights_match_the_formula_and_equalise_prediction_types():
    snr = torch.tensor([0.01, 1.0, 5.0, 100.0])
    gamma = 5.0
    clip = torch.minimum(snr, torch.tensor(gamma))
    torch.testing.assert_close(min_snr_weight(snr, gamma, "epsilon"), clip / snr)
    torch.testing.assert_close(min_snr_weight(snr, gamma, "v"), clip / (snr + 1))
    torch.testing.assert_close(min_snr_weight(snr, gamma, "x0"), clip)
    # The weighted losses of all three types equal min(SNR, gamma) |x0 - x0_hat|^2 for one error.
    schedule = NoiseSchedule("cosine", 100)
    t = torch.tensor([5, 40, 90])
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    x0_hat = x0 + 0.1 * torch.randn(3, 1, 4, 4, generator=g)
    a = schedule.alpha_bar(t).view(3, 1, 1, 1)
    x_t = schedule.add_noise(x0, noise, t)
    expected = (
        torch.minimum(schedule.snr(t), torch.tensor(gamma))
        * (x0_hat - x0).square().flatten(1).mean(1)
    ).mean()
    for prediction in ("epsilon", "v", "x0"):
        eps_hat = eps_from_x0(x_t, x0_hat, a)
        pred = prediction_target(x0_hat, eps_hat, a, prediction)
        loss = DiffusionObjective(prediction, "l2", gamma)(pred, x0, noise, t, schedule)
        torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-7)


def test_objective_losses():
    schedule = NoiseSchedule("linear", 50)
    x0, noise = torch.zeros(2, 1, 3, 3), torch.ones(2, 1, 3, 3)
    t = torch.tensor([3, 7])
    assert float(
        DiffusionObjective("epsilon", "l1")(noise + 0.5, x0, noise, t, schedule)
    ) == pytest.approx(0.5)
    assert float(
        DiffusionObjective("epsilon", "l2")(noise + 0.5, x0, noise, t, schedule)
    ) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="prediction"):
        DiffusionObjective("score")
    with pytest.raises(ValueError, match="loss"):
        DiffusionObjective("epsilon", "huber")


def test_rectified_flow_objective():
    flow = RectifiedFlowObjective(time_sampling="logit_normal", shift=3.0)
    g = torch.Generator().manual_seed(0)
    t = flow.sample_time(10_000, generator=g)
    assert float(t.min()) > 0 and float(t.max()) < 1
    assert float(t.median()) > 0.5  # shift > 1 moves times towards noise
    x0, eps = torch.randn(5, 1, 4, 4, generator=g), torch.randn(5, 1, 4, 4, generator=g)
    tt = torch.rand(5, generator=g)
    x_t = flow.interpolate(x0, eps, tt)
    v = flow.target(x0, eps)
    got_x0, got_eps = flow.to_x0_eps(v, x_t, tt.view(5, 1, 1, 1))
    torch.testing.assert_close(got_x0, x0)
    torch.testing.assert_close(got_eps, eps)
    assert float(flow(v, x0, eps)) == 0.0
    torch.testing.assert_close(shift_time(torch.tensor([0.0, 1.0]), 3.0), torch.tensor([0.0, 1.0]))
    assert float(shift_time(torch.tensor(0.5), 3.0)) == pytest.approx(0.75)  # 1.5 / 2


# ------------------------------------------------------------------------------------------------
# Samplers against MONAI and against the training schedule
# ------------------------------------------------------------------------------------------------
def test_timestep_grid():
    assert timestep_grid(1000, 1000) == list(range(999, -1, -1))
    assert timestep_grid(1000, 10) == list(range(999, 0, -100))
    assert timestep_grid(300, 300)[0] == 299
    with pytest.raises(ValueError):
        timestep_grid(100, 101)


def test_1000_step_ddpm_uses_exactly_the_training_schedule():
    schedule = NoiseSchedule("linear", 1000)
    betas, alphas, abar = (
        schedule.betas.double(),
        schedule.alphas.double(),
        schedule.alphas_cumprod.double(),
    )
    seen = []

    def denoise(x, t):
        seen.append(t)
        return torch.zeros_like(x), x

    ddpm_sample(
        denoise, schedule, torch.randn(2, 1, 2, 2), generator=torch.Generator().manual_seed(0)
    )
    assert seen == list(range(999, -1, -1))  # every training timestep, once, in order
    for t in seen:
        c0, ct, var = ddpm_coefficients(schedule, t, t - 1)
        a_prev = float(abar[t - 1]) if t > 0 else 1.0
        assert c0 == pytest.approx(
            math.sqrt(a_prev) * float(betas[t]) / (1 - float(abar[t])), rel=1e-12
        )
        assert ct == pytest.approx(
            math.sqrt(float(alphas[t])) * (1 - a_prev) / (1 - float(abar[t])), rel=1e-12
        )
        assert var == pytest.approx(
            (1 - a_prev) / (1 - float(abar[t])) * float(betas[t]), rel=1e-12, abs=0
        )


def test_ddpm_steps_match_monai():
    from monai.networks.schedulers import DDPMScheduler

    schedule = NoiseSchedule("linear", 1000)
    monai = DDPMScheduler(1000, schedule="linear_beta", clip_sample=False)
    # MONAI takes the cumulative product in float32, ours in float64; with identical tables the
    # update rules agree to float32 round-off (1 - alpha_bar amplifies table round-off near t=0).
    monai.alphas_cumprod = schedule.alphas_cumprod.clone()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 4, 4, generator=g)
    for t in (999, 500, 1, 0):
        eps = torch.randn(2, 1, 4, 4, generator=g)
        x0, _ = predict_x0_eps(eps, x, schedule.alpha_bar(t), "epsilon")
        ours = ddpm_step(
            schedule,
            x,
            x0,
            t,
            t - 1,
            noise=torch.randn(x.shape, generator=torch.Generator().manual_seed(t)),
        )
        theirs, _ = monai.step(eps, t, x, generator=torch.Generator().manual_seed(t))
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_steps_match_monai(eta):
    from monai.networks.schedulers import DDIMScheduler

    schedule = NoiseSchedule("linear", 1000)
    monai = DDIMScheduler(1000, schedule="linear_beta", clip_sample=False)
    monai.alphas_cumprod = schedule.alphas_cumprod.clone()
    monai.set_timesteps(10)  # MONAI steps t -> t - 100
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 4, 4, generator=g)
    for t in (900, 400, 0):
        eps = torch.randn(2, 1, 4, 4, generator=g)
        x0, _ = predict_x0_eps(eps, x, schedule.alpha_bar(t), "epsilon")
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(t))
        ours = ddim_step(schedule, x0, eps, t, t - 100 if t >= 100 else -1, eta, noise)
        theirs, _ = monai.step(eps, t, x, eta=eta, generator=torch.Generator().manual_seed(t))
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_ddim_with_eta_zero_is_deterministic():
    schedule = NoiseSchedule("cosine", 100)
    weight = torch.randn(1, generator=torch.Generator().manual_seed(3))

    def denoise(x, t):  # any fixed function of (x, t)
        eps = torch.tanh(x * weight + t / 100)
        return x0_from_eps(x, eps, schedule.alpha_bar(t)), eps

    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    a = ddim_sample(denoise, schedule, x, 10, eta=0.0, generator=torch.Generator().manual_seed(1))
    b = ddim_sample(denoise, schedule, x, 10, eta=0.0, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = ddim_sample(denoise, schedule, x, 10, eta=1.0, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(a, c)


# ------------------------------------------------------------------------------------------------
# Gaussian toy: exact denoiser and exact ODE solution
# ------------------------------------------------------------------------------------------------
MU, STD = 0.5, 0.3


def _gaussian_denoiser(schedule):
    """Exact E[x0 | x_t] for x0 ~ N(MU, STD^2) elementwise (VP forward process)."""

    def denoise(x, t):
        a = float(schedule.alpha_bar(t).double())
        gain = STD**2 * math.sqrt(a) / (a * STD**2 + 1 - a)
        x0 = MU + gain * (x - math.sqrt(a) * MU)
        return x0, eps_from_x0(x, x0, torch.tensor(a, dtype=x.dtype))

    return denoise


def _start_and_exact(schedule, n=4096, seed=0):
    """A start x_{T-1} from the exact marginal and the exact probability-flow ODE end point.

    For Gaussian data the marginals are N(sqrt(a) MU, a STD^2 + 1 - a) and the probability-flow
    ODE is the affine map that keeps z = (x - sqrt(a) MU) / sqrt(a STD^2 + 1 - a) constant.
    """
    z = torch.randn(n, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    a = float(schedule.alpha_bar(schedule.num_train_timesteps - 1).double())
    start = math.sqrt(a) * MU + math.sqrt(a * STD**2 + 1 - a) * z
    return start, MU + STD * z


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_dpm_solver_converges_to_the_exact_ode_solution(kind):
    schedule = NoiseSchedule(kind, 1000)
    denoise = _gaussian_denoiser(schedule)
    start, exact = _start_and_exact(schedule)
    errors, ddim = {}, {}
    for steps in (5, 10, 25, 50, 100):
        errors[steps] = float(
            (dpmpp_2m_sample(denoise, schedule, start, steps) - exact).abs().max()
        )
        ddim[steps] = float((ddim_sample(denoise, schedule, start, steps) - exact).abs().max())
    assert errors[100] < errors[50] < errors[25] < errors[10] < errors[5]
    assert errors[100] < 2e-3, errors
    # Second order beats DDIM's first order at the same cost, by a growing factor.
    assert errors[25] < ddim[25] / 1.8 and errors[100] < ddim[100] / 20, (errors, ddim)
    out = dpmpp_2m_sample(denoise, schedule, start, 50)
    assert float(out.mean()) == pytest.approx(MU, abs=0.02)
    assert float(out.std()) == pytest.approx(STD, rel=0.05)


def test_ddpm_sampler_reaches_the_data_distribution():
    schedule = NoiseSchedule("cosine", 200)
    denoise = _gaussian_denoiser(schedule)
    x = torch.randn(20_000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = ddpm_sample(denoise, schedule, x, generator=torch.Generator().manual_seed(1))
    assert float(out.mean()) == pytest.approx(MU, abs=0.01)
    assert float(out.std()) == pytest.approx(STD, rel=0.03)


def test_rectified_flow_samplers_on_known_velocity_fields():
    x = torch.randn(64, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # A constant field: Euler is exact; from t = 1 to 0 the sample moves by -v.
    out = euler_sample(lambda x, t: torch.full_like(x, 2.0), x, steps=3)
    torch.testing.assert_close(out, x - 2.0)

    # Gaussian data: x_t = (1 - t) x0 + t eps has marginals N((1 - t) MU, (1 - t)^2 STD^2 + t^2)
    # and the flow keeps z = (x - (1 - t) MU) / s(t) constant; its velocity is exact here.
    def s(t):
        return math.sqrt((1 - t) ** 2 * STD**2 + t**2)

    def velocity(x, t):
        ds = ((t - 1) * STD**2 + t) / s(t)
        return -MU + ds * (x - (1 - t) * MU) / s(t)

    exact = MU + STD * x  # start at t = 1: x_1 = z
    euler = {n: float((euler_sample(velocity, x, n) - exact).abs().max()) for n in (5, 20, 80)}
    heun = {n: float((heun_sample(velocity, x, n) - exact).abs().max()) for n in (5, 20, 80)}
    assert euler[80] < euler[20] < euler[5]
    assert heun[80] < heun[20] < heun[5] and heun[80] < 1e-3
    assert heun[20] < euler[80]  # second order: 40 evaluations beat Euler's 80
    for shift in (1.0, 3.0):
        grid = flow_time_grid(10, shift)
        assert (
            grid[0] == 1.0
            and grid[-1] == 0.0
            and all(a > b for a, b in zip(grid[:-1], grid[1:], strict=True))
        )


# ------------------------------------------------------------------------------------------------
# Guidance and the registry
# ------------------------------------------------------------------------------------------------
def test_guidance():
    cond, uncond = torch.tensor([2.0]), torch.tensor([1.0])
    assert torch.equal(classifier_free_guidance(cond, uncond, 1.0), cond)
    assert torch.equal(classifier_free_guidance(cond, uncond, 0.0), uncond)
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 3.0), torch.tensor([4.0]))
    calls = []

    def f(name, value):
        def call():
            calls.append(name)
            return value

        return call

    assert torch.equal(guided(f("c", cond), f("u", uncond), 1.0), cond) and calls == ["c"]
    calls.clear()
    guided(
        f("c", cond), f("u", uncond), 2.0, joint_fn=lambda: (calls.append("j"), (cond, uncond))[1]
    )
    assert calls == ["j"]
    mask = condition_dropout_mask(10_000, 0.2, generator=torch.Generator().manual_seed(0))
    assert 0.18 < float(mask.float().mean()) < 0.22
    assert not condition_dropout_mask(5, 0.0).any()


def test_sampler_registry():
    assert get_sampler("DPM++2M").name == "dpmpp_2m"
    assert get_sampler("dpm-solver++").name == "dpmpp_2m"
    assert get_sampler("heun").evaluations(10) == 20
    assert get_sampler("ddpm").stochastic and not get_sampler("ddim").stochastic
    with pytest.raises(ValueError, match="unknown sampler"):
        get_sampler("plms")
