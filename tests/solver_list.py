"""The single list of solvers that drives the generic suites (orders, properties, gradients).

Adding a solver = one entry here. Each entry: (id, factory, declared order, kind) where kind is
"ode" or "sde". The order suites check ``empirical_order >= order - tolerance``.
"""
from functools import partial

from adjointflow.solvers import DDIM, DEIS, DPMSolverPP, Euler, EulerMaruyama, Heun, SDEDPMSolverPP

ODE_SOLVERS = [
    ("euler", Euler, 1),
    ("heun", Heun, 2),
    ("ddim", DDIM, 1),
    ("dpmpp_2m", partial(DPMSolverPP, order=2), 2),
    ("dpmpp_2m_heun", partial(DPMSolverPP, order=2, solver_type="heun"), 2),
    ("dpmpp_3m", partial(DPMSolverPP, order=3), 3),
    ("dpmpp_2s", partial(DPMSolverPP, order=2, multistep=False), 2),
    ("dpmpp_3s", partial(DPMSolverPP, order=3, multistep=False), 3),
    ("dpmpp_3s_heun", partial(DPMSolverPP, order=3, multistep=False, solver_type="heun"), 3),
    ("deis1", partial(DEIS, order=1), 1),
    ("deis2_tab", partial(DEIS, order=2), 2),
    ("deis3_tab", partial(DEIS, order=3), 3),
    ("deis2_rhoab", partial(DEIS, order=2, variant="rhoAB"), 2),
    ("deis3_rhoab", partial(DEIS, order=3, variant="rhoAB"), 3),
]

SDE_SOLVERS = [
    ("euler_maruyama", EulerMaruyama, 1),
    # strong (pathwise) order 1 for both: the Brownian-increment noise term limits it, whatever the drift order
    ("sde_dpmpp_1", partial(SDEDPMSolverPP, order=1), 1),
    ("sde_dpmpp_2m", partial(SDEDPMSolverPP, order=2), 1),
]

ALL_SOLVERS = [(i, f, o, "ode") for i, f, o in ODE_SOLVERS] + [(i, f, o, "sde") for i, f, o in SDE_SOLVERS]

#: Step counts in the asymptotic range, for solvers whose order shows only on finer grids than an order
#: suite's default (measured on GaussianData with std down to 0.1, uniform log-SNR grids: tAB/rhoAB-DEIS-3
#: and the paper-form DPM-Solver++(3S) approach order 3 from below, local orders ~2.8/2.9/2.96 at 40..320).
ORDER_STEPS = {
    "dpmpp_3s": [80, 160, 320],
    "dpmpp_3s_heun": [40, 80, 160],
    "deis2_tab": [40, 80, 160],
    "deis3_tab": [80, 160, 320],
    "deis2_rhoab": [80, 160, 320],
    "deis3_rhoab": [160, 320, 640],
}
