"""Numpy samplers for the LiteRT pipeline: Euler and DPM-Solver++(2M), epsilon prediction.

They follow diffusers' EulerDiscreteScheduler and DPMSolverMultistepScheduler (same timesteps, sigmas
and updates for the SD configs; tests compare them step by step) without importing torch at run time.
"""

from __future__ import annotations

import numpy as np

from squeezegen.errors import SqueezegenError

SCHEDULERS = ("dpm++", "euler")


def _alphas_cumprod(cfg: dict) -> np.ndarray:
    n = cfg.get("num_train_timesteps", 1000)
    b0, b1 = cfg.get("beta_start", 0.00085), cfg.get("beta_end", 0.012)
    kind = cfg.get("beta_schedule", "scaled_linear")
    if kind == "scaled_linear":
        betas = np.linspace(b0**0.5, b1**0.5, n, dtype=np.float32) ** 2
    elif kind == "linear":
        betas = np.linspace(b0, b1, n, dtype=np.float32)
    else:
        raise SqueezegenError(f"beta_schedule {kind!r} is not supported: use scaled_linear or linear")
    return np.cumprod(1.0 - betas.astype(np.float64))


def _check(cfg: dict) -> None:
    if cfg.get("prediction_type", "epsilon") != "epsilon":
        raise SqueezegenError(
            f"prediction_type {cfg.get('prediction_type')!r} is not supported by the LiteRT pipeline: only epsilon"
        )


class Euler:
    """Euler (k-diffusion 'euler', no churn) on the sigma schedule."""

    def __init__(self, cfg: dict, steps: int):
        _check(cfg)
        n = cfg.get("num_train_timesteps", 1000)
        spacing = cfg.get("timestep_spacing", "leading")
        if spacing == "linspace":
            ts = np.linspace(0, n - 1, steps, dtype=np.float32)[::-1].copy()
        elif spacing == "leading":
            ratio = n // steps
            ts = (np.arange(0, steps) * ratio).round()[::-1].astype(np.float32) + cfg.get("steps_offset", 0)
        elif spacing == "trailing":
            ts = (np.arange(n, 0, -n / steps)).round().astype(np.float32) - 1
        else:
            raise SqueezegenError(f"timestep_spacing {spacing!r} is not supported")
        ac = _alphas_cumprod(cfg)
        full = ((1 - ac) / ac) ** 0.5
        self.sigmas = np.concatenate([np.interp(ts, np.arange(n), full), [0.0]]).astype(np.float32)
        self.timesteps = ts
        top = float(self.sigmas.max())
        self.init_noise_sigma = top if spacing in ("linspace", "trailing") else (top**2 + 1) ** 0.5

    def scale_model_input(self, x: np.ndarray, i: int) -> np.ndarray:
        return (x / (self.sigmas[i] ** 2 + 1) ** 0.5).astype(np.float32)

    def step(self, eps: np.ndarray, i: int, x: np.ndarray) -> np.ndarray:
        return (x + eps * (self.sigmas[i + 1] - self.sigmas[i])).astype(np.float32)


class DPMSolverPP:
    """DPM-Solver++ multistep, order 2 (first order on the first and last step), final sigma 0."""

    def __init__(self, cfg: dict, steps: int):
        _check(cfg)
        n = cfg.get("num_train_timesteps", 1000)
        spacing = cfg.get("timestep_spacing", "linspace")
        if spacing == "linspace":
            ts = np.linspace(0, n - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
        elif spacing == "leading":
            ratio = n // (steps + 1)
            ts = (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + cfg.get("steps_offset", 0)
        elif spacing == "trailing":
            ts = np.arange(n, 0, -n / steps).round().astype(np.int64) - 1
        else:
            raise SqueezegenError(f"timestep_spacing {spacing!r} is not supported")
        ac = _alphas_cumprod(cfg)
        full = ((1 - ac) / ac) ** 0.5
        self.sigmas = np.concatenate([np.interp(ts, np.arange(n), full), [0.0]])
        self.timesteps = ts.astype(np.float32)
        self.init_noise_sigma = 1.0
        self.prev_x0: np.ndarray | None = None

    def scale_model_input(self, x: np.ndarray, i: int) -> np.ndarray:
        return x

    def _alpha_sigma(self, i: int) -> tuple[float, float]:
        s = float(self.sigmas[i])
        alpha = 1.0 / (s**2 + 1) ** 0.5
        return alpha, s * alpha

    def step(self, eps: np.ndarray, i: int, x: np.ndarray) -> np.ndarray:
        alpha_s, sigma_s = self._alpha_sigma(i)
        x0 = (x - sigma_s * eps) / alpha_s
        last = i == len(self.timesteps) - 1
        alpha_t, sigma_t = self._alpha_sigma(i + 1)
        if sigma_t == 0.0:
            out = x0
        else:
            lam = lambda a, s: np.log(a) - np.log(s)  # noqa: E731
            h = lam(alpha_t, sigma_t) - lam(alpha_s, sigma_s)
            out = (sigma_t / sigma_s) * x - alpha_t * np.expm1(-h) * x0
            if self.prev_x0 is not None and not last:
                alpha_p, sigma_p = self._alpha_sigma(i - 1)
                r0 = (lam(alpha_s, sigma_s) - lam(alpha_p, sigma_p)) / h
                d1 = (x0 - self.prev_x0) / r0
                out = out - 0.5 * alpha_t * np.expm1(-h) * d1
        self.prev_x0 = x0
        return out.astype(np.float32)


def make_scheduler(name: str, cfg: dict, steps: int):
    if steps < 1:
        raise SqueezegenError(f"--steps must be at least 1, got {steps}")
    if name == "euler":
        return Euler(cfg, steps)
    if name == "dpm++":
        return DPMSolverPP(cfg, steps)
    raise SqueezegenError(f"unknown scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}")
