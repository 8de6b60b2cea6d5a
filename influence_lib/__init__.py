"""influence_lib: Hessians, inverse-HVPs, influence scores and leave-one-out retraining for torch models.

The public contract (see README):

    il.hessian(model, loss_fn, (X, y), weight_decay=0.0)                     -> Tensor[p, p]
    il.influence(model, loss_fn, train, test, method="exact", damping=0.0)   -> Tensor[n_test, n_train]
    il.loo_retrain(model, loss_fn, train, test, remove, ...)                 -> Tensor[len(remove), n_test]
    il.pearson(a, b), il.spearman(a, b)                                      -> float

Sign convention: a score is the predicted change of the test loss when the training point is REMOVED
(positive = the point helped the test prediction); it includes the 1/n of the mean loss.
"""

from .curvature import (
    DenseOperator,
    GaussNewtonOperator,
    HessianOperator,
    LinearOperator,
    extreme_eigenvalues,
    hessian,
    hvp,
    lanczos,
    spectrum_summary,
)
from .ekfac import EKFACSolver
from .influence import InfluenceCalculator, influence
from .lds import (
    LDSResult,
    SubsetRetrainResult,
    group_predictions,
    linear_datamodeling_score,
    retrain_subsets,
    sample_subsets,
    subset_retrain,
)
from .metrics import bootstrap_ci, mean_ci, pearson, spearman, top_k
from .newton import NewtonConvergenceError, NewtonResult, newton_minimize, newton_polish
from .objective import Objective, flat_params, set_flat_params
from .pbrf import PBRF, PBRFResult, pbrf_response, pbrf_retrain
from .preconditioned import ihvp_pcg
from .retrain import (
    LOOResult,
    TrainConfig,
    fit_stacked,
    loo_retrain,
    minimize_stacked,
    retrain_without,
    train_model,
    train_stack,
)
from .solvers import (
    METHODS,
    LissaDivergenceError,
    SolverError,
    ihvp_arnoldi,
    ihvp_cg,
    ihvp_exact,
    ihvp_lissa,
    ihvp_minres,
)
from .validation import NonFiniteError

__version__ = "0.1.0"

__all__ = [
    "METHODS", "DenseOperator", "EKFACSolver", "GaussNewtonOperator", "HessianOperator", "InfluenceCalculator",
    "LDSResult", "LOOResult", "LinearOperator", "SubsetRetrainResult", "group_predictions",
    "linear_datamodeling_score", "retrain_subsets", "sample_subsets", "subset_retrain",
    "LissaDivergenceError", "NonFiniteError", "Objective", "PBRF", "PBRFResult", "SolverError",
    "minimize_stacked", "pbrf_response", "pbrf_retrain",
    "TrainConfig", "NewtonConvergenceError", "NewtonResult", "newton_minimize", "newton_polish",
    "bootstrap_ci", "extreme_eigenvalues", "fit_stacked", "flat_params", "hessian", "hvp", "ihvp_arnoldi",
    "ihvp_cg", "ihvp_pcg", "ihvp_exact", "ihvp_lissa", "ihvp_minres", "influence", "lanczos", "loo_retrain",
    "mean_ci", "pearson",
    "retrain_without", "set_flat_params", "spearman", "spectrum_summary", "top_k", "train_model", "train_stack",
]
