"""Inverse matrix square root by Newton–Schulz, for (batches of) SPD matrices.

Two exact forms of the same function:

* ``iterate``: the matrix iterations (fast on GPUs, where matmuls are cheap), in a form with a fifth fewer
  products and a hand-written backward pass (:func:`isqrt_newton_schulz_fast`).
* ``eigh``: every iterate is a polynomial in ``B = A/‖A‖_F``, so ``D = q(B)/√‖A‖_F`` where ``q`` is the scalar
  Newton–Schulz recursion applied to each eigenvalue of ``B``. One ``eigh`` gives the forward pass; the
  backward pass uses the Daleckii–Krein formula with divided differences of ``q`` (in float64, derivatives
  where eigenvalues coincide, from a complex-step evaluation of the recursion). Same D, same gradient, and on
  CPUs several times cheaper than 3·n_iter dense matmuls and their backward. Every quantity the backward
  pass needs is prepared in the forward pass, so that the backward pass is five products and a few
  elementwise operations.
"""

from __future__ import annotations

import torch

METHODS = ("auto", "iterate", "eigh")


def isqrt_newton_schulz(a: torch.Tensor, n_iter: int) -> torch.Tensor:
    """``a^{-1/2}`` of ``(..., d, d)`` SPD matrices, differentiable through the iterations.

    ``Y = A/‖A‖_F, Z = I``; repeat ``T = ½(3I − ZY), Y = YT, Z = TZ``; return ``Z/√‖A‖_F``
    (Frobenius norm per matrix).
    """
    norm = torch.linalg.matrix_norm(a, keepdim=True)
    y = a / norm
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(a)
    z = eye
    for _ in range(n_iter):
        t = 0.5 * (3.0 * eye - z @ y)
        y = y @ t
        z = t @ z
    return z / norm.sqrt()


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for matrices or batches of them, as one ``mm``/``bmm`` (``matmul`` on batches adds views)."""
    return torch.bmm(a, b) if a.dim() == 3 else torch.matmul(a, b)


def _addmm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float = 1.0, alpha: float = 1.0) -> torch.Tensor:
    """``beta·acc + alpha·a @ b`` as one ``addmm``/``baddbmm``."""
    return (torch.baddbmm if a.dim() == 3 else torch.addmm)(acc, a, b, beta=beta, alpha=alpha)


class _NewtonSchulzFast(torch.autograd.Function):
    """The iterations of :func:`isqrt_newton_schulz_fast` with a hand-written backward pass.

    Every iterate is a polynomial in the symmetric ``B``, so ``B ↦ Z_n(B)`` has a self-adjoint derivative
    ``L`` (``⟨G, L(E)⟩ = ⟨L(G), E⟩``): the gradient ``L(G)`` is the derivative in the direction ``G``, propagated
    forward through the kept iterates (``dT = −½dP``, ``dZ ← dT·Z + T·dZ``, ``dP ← T·dP·T + dT·TP + TP·dT``):
    two products per ``Z`` step and four per ``P`` step, half of what autograd records through the products.
    Then ``c = ‖A‖_F``: ``∂A = c^{-3/2}·(L(G) − (⟨L(G), B⟩ + ½⟨G, Z_n⟩)·B)``. The same gradient as autograd through
    the iterations, up to rounding (tests compare both with the plain form).
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, n_iter: int) -> torch.Tensor:  # type: ignore[override]
        norm = torch.linalg.matrix_norm(a, keepdim=True)
        p = a / norm
        b = p
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).mul_(1.5)
        ts, tps, zs = [], [], []
        z: torch.Tensor | None = None
        for k in range(n_iter):
            # ½(3I − P). Not add(alpha=-0.5): inductor (torch 2.14) computes that one wrongly after a matmul.
            t = torch.sub(eye, p, alpha=0.5)
            ts.append(t)
            if z is not None:
                zs.append(z)
            z = t if z is None else _mm(t, z)
            if k < n_iter - 1:
                tp = _mm(t, p)
                tps.append(tp)
                p = _mm(tp, t)
        assert z is not None  # n_iter >= 1
        rn = norm.rsqrt()
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(b, z, rn / norm, *ts, *tps, *zs)
            ctx.n_iter = n_iter
        return z * rn

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        n = ctx.n_iter
        b, z_n, rc3, *rest = ctx.saved_tensors
        ts, tps, zs = rest[:n], rest[n:2 * n - 1], rest[2 * n - 1:]
        dp = grad  # dP_0 = E = G
        dz: torch.Tensor | None = None  # dZ_1 = dT_0 = −½E, kept implicit
        for k in range(n):
            t = ts[k]
            if k > 0:  # dZ_{k+1} = dT_k·Z_k + T_k·dZ_k with dT_k = −½dP_k
                dz = (_addmm(_mm(t, grad), dp, zs[k - 1], beta=-0.5, alpha=-0.5) if dz is None
                      else _addmm(_mm(t, dz), dp, zs[k - 1], alpha=-0.5))
            if k < n - 1:  # dP_{k+1} = T_k·dP_k·T_k − ½(dP_k·TP_k + TP_k·dP_k)
                tp = tps[k]
                dp = _addmm(_addmm(_mm(_mm(t, dp), t), dp, tp, alpha=-0.5), tp, dp, alpha=-0.5)
        lg = dz if dz is not None else grad * -0.5
        dims = (-2, -1)
        coef = torch.add((lg * b).sum(dims, keepdim=True), (grad * z_n).sum(dims, keepdim=True), alpha=0.5)
        return torch.addcmul(lg, b, coef, value=-1.0).mul_(rc3), None


def isqrt_newton_schulz_fast(a: torch.Tensor, n_iter: int) -> torch.Tensor:
    """:func:`isqrt_newton_schulz` with 3·(n_iter − 1) matrix products instead of 3·n_iter.

    All iterates are polynomials in ``B = A/‖A‖_F`` and commute, so with ``P = ZY``: ``T = ½(3I − P)``,
    ``P ← T·P·T`` and ``Z ← T·Z``; the first step needs no product (``P₀ = B``, ``Z₁ = T₀``) and the last
    needs no ``P``. The same function in exact arithmetic (tests compare values and gradients with the
    plain form); its backward pass is hand-written (:class:`_NewtonSchulzFast`), in fewer operations than
    autograd's.
    """
    return _NewtonSchulzFast.apply(a, n_iter)


# The imaginary step of the complex-step derivative: q(λ + ih) = q(λ) + ih·q'(λ) + O(h²), exact to rounding
# for a polynomial evaluated in complex128 (no difference quotient, so no cancellation).
_STEP = 2.0**-100  # ≈ 7.9e-31; a power of two: h, 2h and 1/h are exact in float32 and float64


def _scalar_newton_schulz(lam: torch.Tensor, n_iter: int) -> torch.Tensor:
    """q(λ) + ih·q'(λ) (complex128): the Newton–Schulz recursion on scalars (``y = λ, z = 1``, then
    ``t = ½(3 − zy); y ← yt; z ← tz``), elementwise, at ``λ + ih``."""
    y = lam.to(torch.complex128).add_(_STEP * 1j)
    z = torch.rsub(y, 1.5, alpha=0.5)  # the first step: z = t = ½(3 − λ)
    y = y * z
    half3 = torch.full_like(z, 1.5)
    for k in range(1, n_iter):
        t = torch.addcmul(half3, z, y, value=-0.5)
        if k < n_iter - 1:
            torch._foreach_mul_([z, y], [t, t])  # both updates in one launch
        else:
            z = z.mul_(t)
    return z


def _row(t: torch.Tensor) -> torch.Tensor:
    """``t (..., n)`` as rows that broadcast against ``(..., n, n)`` (a view only for batches)."""
    return t if t.dim() == 1 else t.unsqueeze(-2)


def _divided_differences(lam: torch.Tensor, q: torch.Tensor, hdq: torch.Tensor) -> torch.Tensor:
    """``K_ij = (q(λ_i) − q(λ_j)) / (λ_i − λ_j)``, and the mean of ``q'(λ_i)``, ``q'(λ_j)`` where ``λ_i ≈ λ_j``
    (``q`` and ``hdq = h·q'`` in float64, from :func:`_scalar_newton_schulz`; the result in float64).

    The cancellation error of the quotient is about 1e-16/δ relative for a relative gap δ; pairs closer than
    δ = 1e-7 take the mean derivative ``h(q'_i + q'_j)/2h``, whose error is O(δ²). The gaps are taken in λ's
    dtype: a float32 gap is exact to float32's rounding, the precision the result is used at.
    """
    lam_col = lam.unsqueeze(-1)
    gap = lam_col - _row(lam)
    # |λ_i − λ_j| ≤ 1e-7·(|λ_i| + |λ_j|); |λ_i + λ_j| is the same sum where the signs agree, and pairs of opposite
    # signs are never that close.
    close = gap.abs() <= (lam_col + _row(lam)).abs_().mul_(1e-7)
    num = torch.where(close, hdq.unsqueeze(-1) + _row(hdq), q.unsqueeze(-1) - _row(q))
    return num / gap.masked_fill_(close, 2 * _STEP)


class _IsqrtEigh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: torch.Tensor, n_iter: int) -> torch.Tensor:  # type: ignore[override]
        # D = V·diag(φ)·Vᵀ with φ = q(λ)/√c, where μ, V are the eigenpairs of A, c = ‖A‖_F = ‖μ‖ and λ = μ/c the
        # eigenvalues of B = A/c.
        mu, vec = torch.linalg.eigh(a)
        c = torch.linalg.vector_norm(mu, dim=-1, keepdim=True)
        lam = mu / c
        q_dq = torch.view_as_real(_scalar_newton_schulz(lam, n_iter))  # (..., 2): q and h·q'
        q = q_dq[..., 0]
        rc = c.rsqrt()
        vec_t = vec.mT  # kept for the backward pass too
        out = _mm(vec * _row(q.to(a.dtype) * rc), vec_t)
        if ctx.needs_input_grad[0]:
            # Everything the backward pass needs, in the eigenbasis (no n×n matrix beyond V and K kept):
            # the divided differences K of q and slope_c = λ·q' + ½q (∂φ/∂c = −slope_c/c^{3/2}).
            hdq = q_dq[..., 1]
            k = _divided_differences(lam, q, hdq).to(a.dtype)
            slope_c = torch.addcmul(q * 0.5, lam, hdq, value=1.0 / _STEP).to(a.dtype)
            ctx.save_for_backward(vec, vec_t, lam, k, slope_c, rc / c)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        vec, vec_t, lam, k, slope_c, rc3 = ctx.saved_tensors
        # In the eigenbasis (M = Vᵀ·G·V, G as it is, not its symmetric part, as autograd): for fixed c the
        # Daleckii–Krein term K ∘ M/c^{3/2}; c = ‖A‖_F adds s·A/c = s·V·diag(λ)·Vᵀ with
        # s = Σ_i M_ii·∂φ_i/∂c = −Σ_i M_ii·slope_c_i/c^{3/2}. One change of basis back for both.
        m = _mm(_mm(vec_t, grad), vec)
        s = torch.linalg.vecdot(m.diagonal(dim1=-2, dim2=-1), slope_c)
        inner = k * m
        inner.diagonal(dim1=-2, dim2=-1).addcmul_(s if s.dim() == 0 else s.unsqueeze(-1), lam, value=-1.0)
        inner = inner * (rc3 if rc3.dim() == 1 else rc3.unsqueeze(-1))
        return _mm(_mm(vec, inner), vec_t), None


def isqrt_eigh(a: torch.Tensor, n_iter: int) -> torch.Tensor:
    """The same function and gradient as :func:`isqrt_newton_schulz`, through one eigendecomposition."""
    return _IsqrtEigh.apply(a, n_iter)


def isqrt(a: torch.Tensor, n_iter: int, method: str = "auto") -> torch.Tensor:
    """The inverse square root used by the deconvolution layers.

    ``auto`` takes the eigendecomposition form on CPUs and the iterations on GPUs (where ``eigh`` is slow
    and matmuls cheap); both compute the same Newton–Schulz result.
    """
    if method == "auto":
        method = "iterate" if a.is_cuda else "eigh"
    if method == "eigh":
        return isqrt_eigh(a, n_iter)
    if method == "iterate":
        return isqrt_newton_schulz_fast(a, n_iter)
    raise ValueError(f"isqrt method must be one of {', '.join(METHODS)}, got {method!r}")
