"""GRIT (arXiv 2601.00231) as plain torch: LoRA + rank-space K-FAC natural-gradient preconditioning +
Fisher-guided reprojection + geometry regularisers, with :class:`GRITOptimizer` as the whole step
(usable from a plain torch loop; ``GRITModule`` builds it under Lightning, where the callbacks in
``callbacks/`` hold the settings, start each micro-batch's statistics and log). The equations and
defaults are in docs/grit.md.

One optimizer step, in the order the code runs it:

1. **capture** (forward and backward of every micro-batch; :mod:`~fteval.grit.layer`,
   :mod:`~fteval.grit.capture`): each :class:`GritLoraLinear` hands u = A x (and, through
   autograd, v = B^T dL/dy) to :class:`~fteval.grit.capture.StatisticsCapture`, which keeps the
   tensors of the tokens that count (:func:`token_mask_from_batch`);
2. **regularisers** (:mod:`~fteval.grit.regularisers`): the geometry penalties add their
   gradients to the loss's, so they are clipped and preconditioned with them;
3. **clip** (:func:`~fteval.grit.solve.clip_gradients`): the global norm of the optimizer's
   gradients, before preconditioning as the reference does;
4. **fold** (:mod:`~fteval.grit.stats`): one batched Gram product per group of layers adds the
   step's u u^T and v v^T to the pending sums, which are folded into S_a and S_g (running mean
   until a side is first used, then EMA);
5. **refresh** (:mod:`~fteval.grit.stats`, :mod:`~fteval.grit.solve`): every ``update_freq``
   steps, the Cholesky factors of the damped S + l I;
6. **precondition** (:mod:`~fteval.grit.solve`): dB <- dB M_g^-1, dA <- M_a^-1 dA;
7. **optimizer step** (torch's optimizer);
8. **reprojection** (:mod:`~fteval.grit.reprojection`): every ``every_n_steps`` steps, A and B
   onto the top-k eigenvectors of S_a and S_g.

Steps 2-8 are :meth:`GRITOptimizer.step`; 3-6 are :meth:`KFAC.optimizer_step_work` (with
``inverse_timing="previous_step"`` 6 runs before 4, as the reference; with ``clip_stage="after"``
3 runs after 6). What GRIT keeps per layer lives on the layer: ``layer.stats`` (the factors) and
``layer.subspace`` (what the last reprojection kept); the adapter and both are written by
:mod:`~fteval.grit.export`.
"""

from fteval.grit.capture import StatisticsCapture, token_mask_from_batch
from fteval.grit.export import adapter_rank, export_grit_adapter, save_kfac_artifacts
from fteval.grit.kfac import KFAC
from fteval.grit.layer import GritLoraLinear, grit_layers, inject_grit_layers
from fteval.grit.optimizer import GRITOptimizer
from fteval.grit.regularisers import GeometryPenalties
from fteval.grit.reprojection import KeptSubspace, Reprojection, energy_rank, kept_ranks
from fteval.grit.solve import clip_gradients, damped_cholesky
from fteval.grit.stats import FactorGroup, RankSpaceStats

__all__ = [
    "FactorGroup",
    "GRITOptimizer",
    "GeometryPenalties",
    "GritLoraLinear",
    "KFAC",
    "KeptSubspace",
    "RankSpaceStats",
    "Reprojection",
    "StatisticsCapture",
    "adapter_rank",
    "clip_gradients",
    "damped_cholesky",
    "energy_rank",
    "export_grit_adapter",
    "grit_layers",
    "inject_grit_layers",
    "kept_ranks",
    "save_kfac_artifacts",
    "token_mask_from_batch",
]
