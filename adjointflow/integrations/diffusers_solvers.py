"""``matching_solver``: the adjointflow solver that takes the same steps as a diffusers scheduler.

On the grid of :func:`~adjointflow.integrations.timesteps_from_diffusers`:

* ``DDIMScheduler`` (``eta = 0``, the pipelines' default) is :class:`~adjointflow.DDIM`: both are
  ``x_t = alpha_t x0_hat + sigma_t eps_hat`` (Song et al. 2021, eq. 12 with ``sigma = 0``);
* ``DPMSolverMultistepScheduler`` with ``algorithm_type="dpmsolver++"`` and order 1 or 2 is
  :class:`~adjointflow.DPMSolverPP` (``multistep=True``, the same ``solver_type`` and
  ``lower_order_final``; Lu et al. 2022, DPM-Solver++ 2M);
* ``FlowMatchEulerDiscreteScheduler`` is :class:`~adjointflow.Euler`: ``x_{s'} = x_s + (s' - s) u``.

Scheduler options that change the update (clipping, thresholding, SDE variants, third order)
raise ``ValueError``: no solver here reproduces them.
"""
from __future__ import annotations

from ..diffusers_adapter import _config
from ..solvers import DDIM, DPMSolverPP, Euler
from ..solvers.base import Solver

__all__ = ["matching_solver"]


def _refuse(name: str, cfg, options: tuple[str, ...]) -> None:
    on = [o for o in options if cfg.get(o)]
    if on:
        raise ValueError(f"{name} with {', '.join(f'{o}={cfg[o]!r}' for o in on)} changes the update; no adjointflow "
                         "solver reproduces it (turn it off to compare, or pick any solver for the grid)")


def matching_solver(scheduler) -> Solver:
    """The solver whose steps equal ``scheduler.step`` on the scheduler's own grid; see the module docstring."""
    cfg = _config(scheduler)
    name = str(cfg.get("_class_name") or type(scheduler).__name__)
    if name == "DDIMScheduler":
        _refuse(name, cfg, ("clip_sample", "thresholding"))
        return DDIM()
    if name == "DPMSolverMultistepScheduler":
        _refuse(name, cfg, ("thresholding", "euler_at_final"))
        algo, order = cfg.get("algorithm_type", "dpmsolver++"), int(cfg.get("solver_order", 2))
        if algo != "dpmsolver++":
            raise ValueError(f"{name} with algorithm_type={algo!r}: only 'dpmsolver++' is reproduced (DPMSolverPP); "
                             "the SDE variants draw their own noise")
        if order not in (1, 2):
            raise ValueError(f"{name} with solver_order={order}: diffusers' 3M differs from DPMSolverPP(order=3) "
                             "(ours integrates the quadratic exactly); orders 1 and 2 are reproduced")
        return DPMSolverPP(order=order, solver_type=cfg.get("solver_type", "midpoint"),
                           lower_order_final=bool(cfg.get("lower_order_final", True)))
    if name == "FlowMatchEulerDiscreteScheduler":
        _refuse(name, cfg, ("stochastic_sampling",))
        return Euler()
    raise ValueError(f"no solver reproduces {name}'s steps; matching solvers exist for DDIMScheduler, "
                     "DPMSolverMultistepScheduler and FlowMatchEulerDiscreteScheduler")
