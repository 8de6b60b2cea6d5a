"""Damped Newton minimisation of many independent models at once, to a gradient-norm tolerance.

For a stack of ``B`` parameter vectors ``Theta`` ``[B, p]``, each model ``b`` minimises

    F_b(theta) = fun(theta_b)[b] + (l2 / 2) ||theta_b - center||^2          (center = 0 when None)

where ``fun(Theta_k, which)`` returns the ``[k]`` data terms of the models ``which`` (a ``[k]`` index tensor
into the stack) at parameters ``Theta_k`` ``[k, p]``; the models must not interact (the gradient of the sum is
the stack of the models' own gradients, and likewise for Hessian-vector products). Every model starts at its
row of ``theta0`` and is moved only by steps that decrease its own ``F_b``.

**Step (Levenberg-Marquardt).** At ``theta`` with gradient ``g`` and Hessian ``H`` (both of ``F_b``)

    s = -(H + mu_eff I)^{-1} g,        mu_eff = mu + max(0, -lambda_min(H)) + 1e-10 * ||H||_2 ,

so ``H + mu_eff I`` is positive definite even where ``H`` is indefinite (non-convex networks) or singular (dead
units). ``mu = 0`` is a pure Newton step where ``H`` is positive definite. The step is accepted only if the
actual decrease ``F(theta) - F(theta + s)`` is at least ``1e-4`` times the decrease predicted by the quadratic
model, ``pred = -(g^T s + s^T H s / 2) > 0``; when ``pred`` is below the round-off of ``F``
(``100 eps max(1, |F|)``) a decrease of ``||g||`` is required instead. A rejected step multiplies ``mu`` by 4
(at least ``1e-4 ||H||_2``) and is retried from the same ``theta`` without new derivatives; a step with
``rho = actual / predicted > 0.75`` divides it by 4. Hence no accepted step goes uphill, and from a warm start
the iteration converges to the local minimiser reached by descent from it (quadratically once there).

**Curvature.** ``p <= dense_max`` (and ``B p^2 <= DENSE_MAX_ENTRIES``): the dense ``[B, p, p]`` Hessians from
batched Hessian-vector products on the unit vectors (one double-backward per block of ``hvp_block`` columns for all
models) and their batched ``eigh`` (the step for any ``mu`` is then a closed form). A model's Hessian is kept for
its next iteration when the last step was accepted at the first trial and cut ``||g||`` by at least 4x (a chord
step: the ratio test above still guards descent); otherwise, and before a stall is declared, it is recomputed at
the current point, so the final steps are Newton steps.
``p > dense_max``: Newton-CG: each step solves
``(H + mu I) s = -g`` by conjugate gradients on Hessian-vector products (all models at once) to the relative
residual ``min(0.5, sqrt(||g||))``; a direction of non-positive curvature raises ``mu`` above its Rayleigh
quotient and the step is retried.

**Stop rule.** Model ``b`` has converged when ``||grad F_b(theta_b)|| <= tol * max(1, ||grad F_b(theta0_b)||)``
(relative to the starting gradient, absolute below 1). ``tol`` defaults to :func:`default_tol` of the dtype
(``1e-10`` in float64, ``1e-5`` in float32). A model still above it after ``max_iter`` iterations (each one step
search from one point, however many trial steps it needed), or whose step search stalls (``mu`` beyond
``1e16 ||H||``: no descent step exists at this precision), has failed: ``on_failure="raise"`` raises
:class:`NewtonConvergenceError`, ``"flag"`` returns it with ``converged[b] = False``.

**Smoothness.** The convergence theory needs a twice-differentiable objective (tanh, GELU, softplus networks;
linear models). With piecewise-linear activations (ReLU) a minimiser can lie on a kink, a training point exactly at
a hidden unit's hinge, where the gradient jumps and never vanishes (nearly all leave-one-out minimisers of the book's
Iris ReLU MLP do, ``benchmarks/newton_loo.py``): the step search then stalls or runs out of iterations and the model
is reported as not converged, never returned as if it were. Without weight decay, a network that fits every training
point can lower the cross-entropy for ever by growing its weights; the tolerance is then met far out where the loss
is flat, not at a minimiser (the distance moved, ``||theta - theta0||``, shows it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import vmap

from .objective import LossFn, Objective, set_flat_params
from .validation import check_choice, check_nonneg, check_positive, check_positive_int

#: ``fun(Theta_k [k, p], which [k]) -> [k]``: the data terms of the models ``which`` of a stack.
StackedFn = Callable[[Tensor, Tensor], Tensor]

ON_FAILURE = ("raise", "flag")
#: Above this many parameters the Hessians are not formed: Newton-CG on Hessian-vector products.
DENSE_MAX = 2000
#: Unit vectors per batched double-backward when the dense Hessians are assembled.
HVP_BLOCK = 64

_ACCEPT = 1e-4  # minimum ratio of actual to predicted decrease
_GOOD = 0.75  # above this ratio mu is decreased
_MU_MAX = 1e16  # relative to ||H||: beyond this the step search has stalled
_MAX_TRIALS = 40  # trial steps per iteration (4^40 covers every mu below _MU_MAX)
_REFRESH = 0.25  # a kept Hessian is recomputed after a step that cut ||g|| by less than this factor
#: Dense Hessians only while the stack's ``B p^2`` entries stay below this (1 GiB in float64); else Newton-CG.
DENSE_MAX_ENTRIES = 2**27


class NewtonConvergenceError(RuntimeError):
    """A Newton minimisation did not reach its gradient-norm tolerance."""


def default_tol(dtype: torch.dtype) -> float:
    """The default relative gradient-norm tolerance: ``1e-10`` in float64, ``1e-5`` in lower precision."""
    return 1e-10 if dtype == torch.float64 else 1e-5


@dataclass
class NewtonResult:
    """Outcome of :func:`newton_minimize` for a stack of ``B`` models.

    ``theta`` ``[B, p]`` the final parameters; ``value`` ``[B]`` ``F_b`` there; ``grad_norm`` ``[B]`` its
    ``||grad F_b||``; ``grad_norm_start`` ``[B]`` the same at ``theta0``; ``threshold`` ``[B]`` the gradient norm
    each model had to reach; ``iterations`` ``[B]`` (int64) iterations used; ``converged`` ``[B]``
    (bool) ``grad_norm <= threshold``; ``stalled`` ``[B]`` (bool) the step search found no descent step;
    ``hessians`` ``[B]`` (int64) Hessians formed (dense path) or Newton-CG iterations (each on fresh products).
    """

    theta: Tensor
    value: Tensor
    grad_norm: Tensor
    grad_norm_start: Tensor
    threshold: Tensor
    iterations: Tensor
    converged: Tensor
    stalled: Tensor
    hessians: Tensor

    def failure_message(self) -> str:
        bad = ~self.converged
        k, B = int(bad.sum()), bad.numel()
        worst = float(self.grad_norm[bad].max()) if k else 0.0
        stalled = int(self.stalled.sum())
        return (f"Newton did not converge for {k} of {B} models (largest gradient norm {worst:.3g}, thresholds "
                f"{float(self.threshold[bad].min()) if k else 0.0:.3g}..); {stalled} stalled (no descent step at this "
                f"precision: raise tol), the others ran out of iterations (raise max_iter); "
                f"on_failure='flag' returns them flagged instead of raising")


def newton_minimize(
    fun: StackedFn,
    theta0: Tensor,
    *,
    l2: float = 0.0,
    center: Tensor | None = None,
    tol: float | None = None,
    max_iter: int = 100,
    dense_max: int = DENSE_MAX,
    hvp_block: int = HVP_BLOCK,
    cg_max_iter: int | None = None,
    on_failure: str = "raise",
) -> NewtonResult:
    """Minimise every model of the stack ``theta0`` ``[B, p]`` by damped Newton (see the module docstring).

    ``tol``: relative gradient-norm tolerance (default :func:`default_tol`); ``max_iter``: iterations per model;
    ``dense_max``: the largest ``p`` with dense Hessians; ``hvp_block``: unit vectors per batched Hessian-vector
    product; ``cg_max_iter``: conjugate-gradient iterations per step of Newton-CG (default ``min(p, 500)``);
    ``on_failure``: ``"raise"`` or ``"flag"``. Returns a :class:`NewtonResult`.
    """
    check_choice("on_failure", on_failure, ON_FAILURE)
    check_positive_int("max_iter", max_iter)
    check_positive_int("hvp_block", hvp_block)
    check_nonneg("l2", l2)
    if not isinstance(dense_max, int) or dense_max < 0:
        raise ValueError(f"dense_max must be a non-negative int, got {dense_max!r}")
    if theta0.dim() != 2:
        raise ValueError(f"theta0 must have shape [B, p], got {tuple(theta0.shape)}")
    tol = default_tol(theta0.dtype) if tol is None else tol
    check_positive("tol", tol)
    B, p = theta0.shape
    cg_iters = min(p, 500) if cg_max_iter is None else cg_max_iter
    check_positive_int("cg_max_iter", cg_iters)
    dense = p <= dense_max and B * p * p <= DENSE_MAX_ENTRIES
    eps = torch.finfo(theta0.dtype).eps
    anchor = None if center is None else center.detach().to(dtype=theta0.dtype, device=theta0.device)

    def value_grad(th: Tensor, which: Tensor, graph: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``F`` ``[k]``, ``grad F`` ``[k, p]`` (detached), the leaf and the data gradient (with its graph when
        ``graph``, for Hessian-vector products)."""
        with torch.enable_grad():
            leaf = th.detach().clone().requires_grad_(True)
            v = fun(leaf, which)
            (gdata,) = torch.autograd.grad(v.sum(), leaf, create_graph=graph)
        d = th if anchor is None else th - anchor
        v = v.detach() + 0.5 * l2 * (d * d).sum(1)
        return v, gdata.detach() + l2 * d, leaf, gdata

    theta = theta0.detach().clone()
    all_models = torch.arange(B, device=theta.device)
    value, g0, _, _ = value_grad(theta, all_models, False)
    if not (bool(torch.isfinite(value).all()) and bool(torch.isfinite(g0).all())):
        raise ValueError("theta0: the objective or its gradient is not finite at the start")
    g0_norm = g0.norm(dim=1)
    threshold = tol * g0_norm.clamp_min(1.0)
    grad_norm = g0_norm.clone()
    iterations = torch.zeros(B, dtype=torch.long, device=theta.device)
    stalled = torch.zeros(B, dtype=torch.bool, device=theta.device)
    mu = torch.zeros(B, dtype=theta.dtype, device=theta.device)
    active = grad_norm > threshold

    hessians = torch.zeros(B, dtype=torch.long, device=theta.device)
    if dense:  # eigendecompositions of the Hessians, kept while they still give fast progress
        lam_c, V_c = theta.new_zeros(B, p), theta.new_zeros(B, p, p)
        refresh = torch.ones(B, dtype=torch.bool, device=theta.device)

    for _ in range(max_iter):
        if not bool(active.any()):
            break
        idx = all_models[active]
        th = theta[idx]
        if dense:
            f, g, _, _ = value_grad(th, idx, False)
            fresh = refresh[idx]
            if bool(fresh.any()):
                sub = idx[fresh]
                _, _, leaf, gdata = value_grad(theta[sub], sub, True)
                H = dense_hessians(_hvp_fn(gdata.requires_grad, gdata, leaf, l2), sub.numel(), p, theta, hvp_block)
                lam_c[sub], V_c[sub] = torch.linalg.eigh(H)
                hessians[sub] += 1
            curv, hvp = (lam_c[idx], V_c[idx]), None
        else:
            f, g, leaf, gdata = value_grad(th, idx, True)
            curv, hvp = None, _hvp_fn(gdata.requires_grad, gdata, leaf, l2)
            hessians[idx] += 1
        iterations[idx] += 1
        new_th, new_f, new_g, new_mu, stuck, first_try = _lm_iteration(
            lambda t, w, idx=idx: value_grad(t, idx[w], False)[:2], th, f, g, mu[idx], curv=curv, hvp=hvp,
            cg_iters=cg_iters, eps=eps)
        new_norm = new_g.norm(dim=1)
        if dense:
            stale_stuck = stuck & ~fresh  # stalled on an old Hessian: not a verdict, recompute it and go on
            stuck = stuck & fresh
            new_mu = torch.where(stale_stuck, torch.zeros_like(new_mu), new_mu)
            slow = new_norm > _REFRESH * g.norm(dim=1)
            refresh[idx] = stale_stuck | ~first_try | slow
        theta[idx], value[idx], mu[idx] = new_th, new_f, new_mu
        grad_norm[idx] = new_norm
        stalled[idx] = stuck
        active = (grad_norm > threshold) & ~stalled
    converged = grad_norm <= threshold
    stalled &= ~converged
    res = NewtonResult(theta, value, grad_norm, g0_norm, threshold, iterations, converged, stalled, hessians)
    if on_failure == "raise" and not bool(converged.all()):
        raise NewtonConvergenceError(res.failure_message())
    return res


def _hvp_fn(has_graph: bool, gdata: Tensor, leaf: Tensor, l2: float) -> Callable[..., Tensor]:
    """``V [k, p] -> H V`` (or ``V [c, k, p] -> [c, k, p]`` with ``batched``) of every model at ``leaf``."""

    def hvp(V: Tensor, batched: bool = False) -> Tensor:
        if not has_graph:  # the data term is linear in theta
            return l2 * V
        (hv,) = torch.autograd.grad(gdata, leaf, V, retain_graph=True, is_grads_batched=batched, allow_unused=True)
        return l2 * V if hv is None else hv + l2 * V

    return hvp


def dense_hessians(hvp: Callable[..., Tensor], k: int, p: int, like: Tensor, block: int = HVP_BLOCK) -> Tensor:
    """The ``[k, p, p]`` symmetric Hessians of ``k`` models from batched products ``hvp(V [c, k, p], batched=True)``.

    Column ``j`` of every model's Hessian is ``H e_j``; ``block`` columns are computed per call.
    """
    H = like.new_empty(k, p, p)
    for start in range(0, p, block):
        stop = min(start + block, p)
        E = like.new_zeros(stop - start, k, p)
        E[torch.arange(stop - start), :, torch.arange(start, stop)] = 1
        H[:, :, start:stop] = hvp(E, batched=True).permute(1, 2, 0)
    return 0.5 * (H + H.transpose(1, 2))


def _lm_iteration(value_grad, th, f, g, mu, *, curv, hvp, cg_iters, eps):
    """One Levenberg-Marquardt iteration for ``k`` models: trial steps until each accepts one or stalls.

    ``value_grad(Theta_w, w)`` gives ``F`` and ``grad F`` of the models ``w`` (indices into the ``k``).
    ``curv``: the eigendecompositions ``(lam [k, p], V [k, p, p])`` of the (possibly earlier) Hessians, or None for
    Newton-CG on the products ``hvp`` at ``th``. Returns the new ``theta, F, grad F, mu``, the ``[k]`` stalled flags
    and the ``[k]`` flags "accepted at the first trial".
    """
    k, p = th.shape
    gnorm = g.norm(dim=1)
    dense = curv is not None
    if dense:
        lam, V = curv
        scale = lam.abs().amax(1).clamp_min(1e-12)
        gv = (V.transpose(1, 2) @ g.unsqueeze(2)).squeeze(2)  # g in the eigenbasis [k, p]
        shift = (-lam[:, 0]).clamp_min(0) + 1e-10 * scale
    else:
        Hg = hvp(g)
        scale = ((g * Hg).sum(1).abs() / (g * g).sum(1).clamp_min(1e-300)).clamp_min(1e-12)
        shift = 1e-10 * scale
    noise = 100 * eps * f.abs().clamp_min(1.0)
    trying = torch.ones(k, dtype=torch.bool, device=th.device)
    stuck = torch.zeros(k, dtype=torch.bool, device=th.device)
    first_try = torch.zeros(k, dtype=torch.bool, device=th.device)
    th, f, g, mu = th.clone(), f.clone(), g.clone(), mu.clone()
    for trial in range(_MAX_TRIALS):
        w = trying.nonzero().squeeze(1)
        if w.numel() == 0:
            break
        mu_eff = mu[w] + shift[w]
        if dense:
            d = lam[w] + mu_eff.unsqueeze(1)
            coef = gv[w] / d
            s = -(V[w] @ coef.unsqueeze(2)).squeeze(2)
            pred = (gv[w] * coef).sum(1) - 0.5 * (lam[w] * coef * coef).sum(1)
            ok_dir = torch.ones_like(w, dtype=torch.bool)
        else:
            s, rayleigh, ok_dir = _cg_steps(hvp, g, w, mu_eff, cg_iters, gnorm)
            Hs = hvp(_scatter(s, w, k, p))[w]
            pred = -((g[w] * s).sum(1) + 0.5 * (s * Hs).sum(1))
            # negative curvature: mu above minus the Rayleigh quotient of the offending direction
            bump = torch.where(ok_dir, mu[w], torch.maximum(4 * mu[w], 2 * (-rayleigh).clamp_min(0) + 1e-4 * scale[w]))
            mu[w] = bump
        f_t, g_t = value_grad(th[w] + s, w)
        finite = torch.isfinite(f_t) & torch.isfinite(g_t).all(1)
        ared = f[w] - f_t
        rho = ared / pred.clamp_min(1e-300)
        by_value = (pred > noise[w]) & (ared >= _ACCEPT * pred)
        by_grad = (pred <= noise[w]) & (g_t.norm(dim=1) < gnorm[w])
        accept = ok_dir & finite & (pred > 0) & (by_value | by_grad)
        good = accept & (by_grad | (rho > _GOOD))
        wa = w[accept]
        th[wa], f[wa], g[wa] = th[wa] + s[accept], f_t[accept], g_t[accept]
        mu_w = mu[w]
        mu_w = torch.where(good, mu_w / 4, mu_w)
        mu_w = torch.where(good & (mu_w < 1e-12 * scale[w]), torch.zeros_like(mu_w), mu_w)
        raise_mu = ok_dir & ~accept
        mu_w = torch.where(raise_mu, torch.maximum(4 * mu_w, 1e-4 * scale[w]), mu_w)
        mu[w] = mu_w
        trying[w[accept]] = False
        if trial == 0:
            first_try[w[accept]] = True
        gave_up = mu[w] > _MU_MAX * scale[w]
        stuck[w[gave_up & ~accept]] = True
        trying[w[gave_up]] = False
    return th, f, g, mu, stuck, first_try


def _scatter(s: Tensor, w: Tensor, k: int, p: int) -> Tensor:
    out = s.new_zeros(k, p)
    out[w] = s
    return out


def _cg_steps(hvp, g, w, mu_eff, max_iter, gnorm):
    """Solve ``(H_b + mu_b I) s_b = -g_b`` for the models ``w`` by conjugate gradients, all at once.

    Stops each model at the relative residual ``min(0.5, sqrt(||g_b||))``. Returns ``s`` ``[|w|, p]``, the
    Rayleigh quotient ``d^T H d / d^T d`` of the last direction, and ``ok`` (``False`` where a direction of
    non-positive curvature of ``H + mu I`` was met: the step must be retried with a larger ``mu``).
    """
    k, p = g.shape
    gw = g[w]
    target = torch.minimum(torch.full_like(gnorm[w], 0.5), gnorm[w].sqrt()) * gnorm[w]
    s = torch.zeros_like(gw)
    r = -gw.clone()
    d = r.clone()
    rr = (r * r).sum(1)
    done = rr.sqrt() <= target
    ok = torch.ones_like(done)
    rayleigh = torch.zeros_like(rr)
    for _ in range(max_iter):
        if bool(done.all()):
            break
        Hd = hvp(_scatter(d, w, k, p))[w]
        dd = (d * d).sum(1).clamp_min(1e-300)
        dHd = (d * Hd).sum(1) + mu_eff * dd
        neg = (dHd <= 0) & ~done
        rayleigh = torch.where(neg, (dHd - mu_eff * dd) / dd, rayleigh)
        ok &= ~neg
        done |= neg
        alpha = torch.where(done, torch.zeros_like(rr), rr / dHd.clamp_min(1e-300))
        s = s + alpha.unsqueeze(1) * d
        r = r - alpha.unsqueeze(1) * (Hd + mu_eff.unsqueeze(1) * d)
        rr_new = (r * r).sum(1)
        beta = torch.where(done, torch.zeros_like(rr), rr_new / rr.clamp_min(1e-300))
        d = torch.where(done.unsqueeze(1), d, r + beta.unsqueeze(1) * d)
        rr = torch.where(done, rr, rr_new)
        done |= rr.sqrt() <= target
    return s, rayleigh, ok


# --- glue for the library's objectives ----------------------------------------------------------------------------

def weighted_data_terms(objective: Objective, weights: Tensor, normalization: str = "remaining") -> StackedFn:
    """``fun(Theta_k, which)`` of the weighted training objective of :mod:`influence_lib.retrain`:

        fun(Theta, which)[j] = sum_i w_{which_j, i} loss(z_i, theta_j) / D_j

    with ``D_j = sum_i w_{which_j, i}`` (``normalization="remaining"``) or ``n`` (``"full"``); ``weights`` ``[B, n]``.
    The weight decay is not included (pass ``l2=objective.weight_decay`` to :func:`newton_minimize`).
    """
    check_choice("normalization", normalization, ("remaining", "full"))
    X, y, n, loss_fn = objective.X, objective.y, objective.n, objective.loss_fn
    W = weights.to(dtype=X.dtype, device=X.device)
    if W.dim() != 2 or W.shape[1] != n:
        raise ValueError(f"weights must have shape [B, {n}], got {tuple(weights.shape)}")
    if normalization == "remaining" and bool((W.sum(1) == 0).any()):
        raise ValueError("weights: a model has no training point left (all weights zero)")

    def per_model(theta: Tensor, w: Tensor) -> Tensor:
        out = objective.forward(theta, X)
        losses = vmap(lambda o, t: loss_fn(o.unsqueeze(0), t.unsqueeze(0)))(out, y)
        denom = w.sum() if normalization == "remaining" else w.new_tensor(float(n))
        return (w * losses).sum() / denom

    stacked = vmap(per_model)
    return lambda Theta, which: stacked(Theta, W[which])


def newton_polish(
    model: nn.Module,
    loss_fn: LossFn,
    train: tuple[Tensor, Tensor],
    *,
    weight_decay: float = 0.0,
    tol: float | None = None,
    max_iter: int = 100,
    params: Sequence[str] | None = None,
    dense_max: int = DENSE_MAX,
    on_failure: str = "raise",
) -> dict[str, float | int | bool]:
    """Move ``model`` in place to the stationary point of its training objective nearest its current parameters.

    The objective is ``mean_i loss_fn(model(x_i), y_i) + (weight_decay/2) ||theta||^2`` (that of
    :func:`influence_lib.retrain.train_model`), minimised by :func:`newton_minimize` from the current parameters (e.g.
    after Adam). Returns ``{"loss", "grad_norm", "grad_norm_start", "iterations", "converged"}``. With
    ``on_failure="flag"`` a model that did not converge is left at its last iterate and reported with
    ``converged=False``.
    """
    obj = Objective(model, loss_fn, *train, weight_decay=weight_decay, params=params)
    fun = weighted_data_terms(obj, torch.ones(1, obj.n, dtype=obj.X.dtype, device=obj.X.device))
    res = newton_minimize(fun, obj.theta().unsqueeze(0), l2=weight_decay, tol=tol, max_iter=max_iter,
                          dense_max=dense_max, on_failure=on_failure)
    set_flat_params(model, res.theta[0], obj.spec.names)
    return {"loss": float(res.value[0]), "grad_norm": float(res.grad_norm[0]),
            "grad_norm_start": float(res.grad_norm_start[0]), "iterations": int(res.iterations[0]),
            "converged": bool(res.converged[0])}
