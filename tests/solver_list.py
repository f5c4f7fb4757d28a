"""The single list of solvers that drives the generic suites (orders, properties, gradients).

Adding a solver = one entry here. Each entry: (id, factory, declared order, kind) where kind is
"ode" or "sde". The order suites check ``empirical_order >= order - tolerance``.
"""
from functools import partial

from adjointflow.solvers import DDIM, DEIS, DPMSolverPP, Euler, EulerMaruyama, Heun, SDEDPMSolverPP, UniPC

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
    ("deis2_logrho", partial(DEIS, order=2, variant="logrho"), 2),
    ("deis3_logrho", partial(DEIS, order=3, variant="logrho"), 3),
    # UniPC-p: the corrector adds one order to UniP-p (p + 1); for p = 3 the first-order warm-up step caps it at 3
    ("unipc1_bh1", partial(UniPC, order=1, variant="bh1"), 2),
    ("unipc1_bh2", partial(UniPC, order=1), 2),
    ("unipc2_bh1", partial(UniPC, order=2, variant="bh1"), 3),
    ("unipc2_bh2", partial(UniPC, order=2), 3),
    ("unipc3_bh1", partial(UniPC, order=3, variant="bh1"), 3),
    ("unipc3_bh2", partial(UniPC, order=3), 3),
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
    # logrho-DEIS-2 approaches 2 from below (local 1.80, 1.91, 1.96 from 10 steps on); UniPC's pre-asymptotic
    # error changes sign near 20 steps (UniPC-3) and its local orders reach p + 1 from 40 steps on
    "deis2_logrho": [20, 40, 80, 160],
    "unipc1_bh1": [20, 40, 80, 160],
    "unipc1_bh2": [20, 40, 80, 160],
    "unipc2_bh1": [40, 80, 160, 320],
    "unipc2_bh2": [40, 80, 160, 320],
    "unipc3_bh1": [40, 80, 160, 320],
    "unipc3_bh2": [40, 80, 160, 320],
}
