"""A small continuous-time DPM-Solver++ (2M, data prediction) with inversion, for PrimeComposer and TF-ICON-style
editing (Lu et al., "DPM-Solver++", 2022; the ``scripts/dpm_solver_pytorch.py`` the official code uses).

diffusers' ``DPMSolverMultistepScheduler`` works on integer timesteps and cannot run backwards, which inversion
needs; this follows the official sampler: the discrete VP schedule of the model (its ``alphas_cumprod``) is
interpolated in continuous time ``t in (0, 1]`` (``log alpha`` linear between ``t_n = n / N``), the time grid is
uniform ("time_uniform") from ``t_T = 1`` to ``t_0 = 1e-3``, the model sees ``1000 (t - 1/N)`` as its timestep, and
the update is the multistep second-order DPM-Solver++ with a first-order first step. Inversion runs the same grid
backwards.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["VPSchedule", "DPMSolverPP"]


class VPSchedule:
    """Continuous-time view of a discrete VP schedule (DPM-Solver's ``NoiseScheduleVP('discrete')``)."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        log_alphas = 0.5 * torch.log(alphas_cumprod.double())
        self.total_n = len(log_alphas)
        self.t_array = torch.linspace(0.0, 1.0, self.total_n + 1, dtype=torch.float64)[1:]
        self.log_alpha_array = log_alphas

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        t = t.double().clamp(self.t_array[0], 1.0)
        idx = torch.searchsorted(self.t_array, t).clamp(1, self.total_n - 1)
        t0, t1 = self.t_array[idx - 1], self.t_array[idx]
        a0, a1 = self.log_alpha_array[idx - 1], self.log_alpha_array[idx]
        return a0 + (a1 - a0) * (t - t0) / (t1 - t0)

    def alpha(self, t):
        return torch.exp(self.log_alpha(t))

    def sigma(self, t):
        return torch.sqrt(1.0 - torch.exp(2.0 * self.log_alpha(t)))

    def lam(self, t):
        la = self.log_alpha(t)
        return la - 0.5 * torch.log(1.0 - torch.exp(2.0 * la))

    def model_time(self, t) -> torch.Tensor:
        """The discrete timestep the UNet sees: ``1000 (t - 1/N)``."""
        return (t - 1.0 / self.total_n) * 1000.0


class DPMSolverPP:
    """Multistep DPM-Solver++(2M) on a uniform time grid, forwards (sampling) or backwards (inversion)."""

    def __init__(self, alphas_cumprod: torch.Tensor, steps: int = 20, t_end: float = 1e-3, t_start: float = 1.0,
                 prediction_type: str = "epsilon"):
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {prediction_type!r}")
        self.schedule = VPSchedule(alphas_cumprod)
        self.steps = steps
        self.prediction_type = prediction_type
        self.times = torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64)  # decode order: T -> 0

    def data_prediction(self, out: torch.Tensor, x: torch.Tensor, t) -> torch.Tensor:
        """``x0`` from the model output (epsilon, v or sample prediction)."""
        s = self.schedule
        alpha, sigma = s.alpha(t), s.sigma(t)
        if self.prediction_type == "epsilon":
            x0 = (x.double() - sigma * out.double()) / alpha
        elif self.prediction_type == "v_prediction":
            x0 = alpha * x.double() - sigma * out.double()
        else:
            x0 = out.double()
        return x0.to(x.dtype)

    def step(self, x: torch.Tensor, s, t, x0_s: torch.Tensor, x0_prev: torch.Tensor | None, s_prev) -> torch.Tensor:
        """One update from time ``s`` to ``t`` (either direction) given the data predictions."""
        sch = self.schedule
        lam_s, lam_t = sch.lam(s), sch.lam(t)
        h = lam_t - lam_s
        phi = torch.expm1(-h)
        alpha_t, sigma_t, sigma_s = sch.alpha(t), sch.sigma(t), sch.sigma(s)
        xd = x.double()
        if x0_prev is None:
            out = (sigma_t / sigma_s) * xd - alpha_t * phi * x0_s.double()
        else:
            r = (lam_s - sch.lam(s_prev)) / h
            d1 = (x0_s.double() - x0_prev.double()) / r
            out = (sigma_t / sigma_s) * xd - alpha_t * phi * x0_s.double() - 0.5 * alpha_t * phi * d1
        return out.to(x.dtype)

    def run(self, x: torch.Tensor, eps_fn: Callable, invert: bool = False, on_step: Callable | None = None):
        """Integrate from the first grid time to the last (``invert``: from ``t_0`` up to ``t_T``).

        ``eps_fn(x, i, model_time)`` returns the noise prediction of NFE ``i`` (at grid time ``i``); ``on_step(i,
        x, x_before)`` may return a replacement for the latent ``x`` reached by update ``i`` from ``x_before``
        (blending). As in the official sampler,
        the prediction at grid time ``i`` is made on the latent *before* ``on_step`` replaces it. Returns the latents
        at every grid time in the order visited (after any replacement).
        """
        times = self.times.flip(0) if invert else self.times
        latents = [x]
        x0 = self.data_prediction(eps_fn(x, 0, self.schedule.model_time(times[0])), x, times[0])
        x0_prev, t_prev = None, None
        for i in range(self.steps):
            s, t = times[i], times[i + 1]
            x_new = self.step(x, s, t, x0, x0_prev, t_prev)
            x0_prev, t_prev = x0, s
            if i + 1 < self.steps:
                x0 = self.data_prediction(eps_fn(x_new, i + 1, self.schedule.model_time(t)), x_new, t)
            replaced = on_step(i + 1, x_new, x) if on_step is not None else None
            x = replaced if replaced is not None else x_new
            latents.append(x)
        return latents
