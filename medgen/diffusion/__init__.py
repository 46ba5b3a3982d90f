"""The diffusion method, apart from the network: noise schedules, objectives, samplers, guidance.

- :mod:`~medgen.diffusion.schedules`: :class:`NoiseSchedule` (linear, scaled linear, cosine,
  sigmoid) held as buffers.
- :mod:`~medgen.diffusion.objectives`: epsilon / v / x0 prediction with conversions, min-SNR
  weighting, L1/L2 losses, and the rectified-flow objective.
- :mod:`~medgen.diffusion.samplers`: DDPM, DDIM, DPM-Solver++(2M), rectified-flow Euler and Heun,
  one module each, in an open registry (:func:`register_sampler`, :func:`get_sampler`,
  :func:`list_samplers`) with capability flags.
- :mod:`~medgen.diffusion.process`: :class:`DiffusionProcess`, the variance-preserving process
  and the rectified flow behind one interface (training loss, the function samplers call, sampler
  family, defaults).
- :mod:`~medgen.diffusion.guidance`: classifier-free guidance and conditioning dropout.
- :mod:`~medgen.diffusion.inpainting`: RePaint-style inpainting as a sampler hook.

:class:`medgen.models.Diffusion` assembles these with a :class:`medgen.nets.DiffusionUNet`.
"""

from medgen.diffusion.guidance import classifier_free_guidance, condition_dropout_mask, guided
from medgen.diffusion.inpainting import repaint_hook
from medgen.diffusion.objectives import (
    LOSSES,
    PREDICTIONS,
    DiffusionObjective,
    RectifiedFlowObjective,
    eps_from_v,
    eps_from_x0,
    min_snr_weight,
    predict_x0_eps,
    prediction_target,
    shift_time,
    v_from_x0_eps,
    x0_from_eps,
    x0_from_v,
)
from medgen.diffusion.process import (
    PROCESS_PREDICTIONS,
    DiffusionProcess,
    RectifiedFlowProcess,
    VariancePreservingProcess,
    make_process,
)
from medgen.diffusion.samplers import (
    SAMPLER_FAMILIES,
    SAMPLERS,
    Sampler,
    ddim_sample,
    ddim_step,
    ddpm_coefficients,
    ddpm_sample,
    ddpm_step,
    dpmpp_2m_sample,
    euler_sample,
    flow_time_grid,
    get_sampler,
    heun_sample,
    list_samplers,
    register_sampler,
    timestep_grid,
    unregister_sampler,
)
from medgen.diffusion.schedules import (
    SCHEDULES,
    NoiseSchedule,
    cosine_alpha_bar,
    make_betas,
    sigmoid_alpha_bar,
)

__all__ = [
    "LOSSES",
    "PREDICTIONS",
    "PROCESS_PREDICTIONS",
    "SAMPLERS",
    "SAMPLER_FAMILIES",
    "SCHEDULES",
    "DiffusionObjective",
    "DiffusionProcess",
    "NoiseSchedule",
    "RectifiedFlowObjective",
    "RectifiedFlowProcess",
    "Sampler",
    "VariancePreservingProcess",
    "classifier_free_guidance",
    "condition_dropout_mask",
    "cosine_alpha_bar",
    "ddim_sample",
    "ddim_step",
    "ddpm_coefficients",
    "ddpm_sample",
    "ddpm_step",
    "dpmpp_2m_sample",
    "eps_from_v",
    "eps_from_x0",
    "euler_sample",
    "flow_time_grid",
    "get_sampler",
    "guided",
    "heun_sample",
    "list_samplers",
    "make_betas",
    "make_process",
    "min_snr_weight",
    "predict_x0_eps",
    "prediction_target",
    "register_sampler",
    "repaint_hook",
    "shift_time",
    "sigmoid_alpha_bar",
    "timestep_grid",
    "unregister_sampler",
    "v_from_x0_eps",
    "x0_from_eps",
    "x0_from_v",
]
