"""Inverse matrix square root by Newton–Schulz, for (batches of) SPD matrices.

Two exact forms of the same function:

* ``iterate``: the matrix iterations (fast on GPUs, where matmuls are cheap), in a form with a fifth fewer
  products and a hand-written backward pass (:func:`isqrt_newton_schulz_fast`).
* ``eigh``: every iterate is a polynomial in ``B = A/‖A‖_F``, so ``D = V·diag(φ(μ))·Vᵀ`` with
  ``φ(μ) = q(μ/c)/√c`` over the eigenpairs ``μ, V`` of ``A`` (``c = ‖A‖_F``), where ``q`` is the scalar
  Newton–Schulz recursion. One ``eigh`` gives the forward pass; the backward pass uses the Daleckii–Krein
  formula with divided differences of ``φ`` (the recursion in complex128 at ``μ + ih`` gives ``φ`` and ``hφ'`` at
  once, and one complex quotient the divided differences, derivatives where eigenvalues coincide). Same D,
  same gradient, and on CPUs several times cheaper than 3·n_iter dense matmuls and their backward. Every
  quantity the backward pass needs is prepared in the forward pass, so that the backward pass is four
  products and a few elementwise operations.
"""

from __future__ import annotations

import torch

from seg.nn.moments import scaled_eye

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
        eye = scaled_eye(a.shape[-1], 1.5, a.dtype, a.device)  # read-only, cached
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
        coef = torch.addcmul(lg * b, grad, z_n, value=0.5).sum((-2, -1), keepdim=True)  # ⟨L(G), B⟩ + ½⟨G, Z_n⟩
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
# (ih, 1.5) as complex128 tensors of shape (1,) per device: a dimensioned complex128 operand makes ``μ + ih``
# complex128 in one launch (a 0-d one would give complex64 for a float32 μ), and the recursion's ``addcmul``
# needs its constant as a tensor. Made by ``full``: no copy from host memory.
_CONSTANTS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _complex_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    consts = _CONSTANTS.get(device)
    if consts is None:
        consts = _CONSTANTS[device] = (torch.full((1,), _STEP * 1j, dtype=torch.complex128, device=device),
                                       torch.full((1,), 1.5 + 0j, dtype=torch.complex128, device=device))
    return consts


def _scalar_newton_schulz(mu: torch.Tensor, rc: torch.Tensor, n_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(μ + ih, φ(μ + ih))`` (complex128) with ``φ(μ) = q(μ/c)/√c``, ``rc = 1/√c`` (broadcasting against ``μ``):
    the Newton–Schulz recursion on scalars (``y = λ, z = 1``, then ``t = ½(3 − zy); y ← yt; z ← tz``) started at
    ``y = μ·rc, z = rc``. ``t`` depends on ``zy = λ`` only and ``z`` is linear in its start, so the result is
    ``q(λ)·rc`` without a separate division by ``c`` and multiplication by ``rc``; its imaginary part is
    ``h·φ'(μ)`` (``c`` fixed)."""
    ih, half3 = _complex_constants(mu.device)
    m = mu + ih  # complex128
    y = m * rc
    t = torch.addcmul(half3, rc, y, value=-0.5)  # ½(3 − μ/c)
    z, y = torch._foreach_mul([t, y], [rc, t])
    for k in range(1, n_iter):
        t = torch.addcmul(half3, z, y, value=-0.5)
        if k < n_iter - 1:
            torch._foreach_mul_([z, y], [t, t])  # both updates in one launch
        else:
            z = z.mul_(t)
    return m, z


def _row(t: torch.Tensor) -> torch.Tensor:
    """``t (..., n)`` as rows that broadcast against ``(..., n, n)`` (a view only for batches)."""
    return t if t.dim() == 1 else t.unsqueeze(-2)


def _divided_differences(m: torch.Tensor, phi: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """``K_ij = (φ(μ_i) − φ(μ_j)) / (μ_i − μ_j)``, and the mean of ``φ'(μ_i)``, ``φ'(μ_j)`` where ``μ_i = μ_j``, in
    ``μ``'s dtype, from the complex-step values ``m = μ + ih`` and ``phi = φ(μ + ih)`` of :func:`_scalar_newton_schulz`.

    One complex quotient: ``Re[(Φ_i − conj Φ_j) / (m_i − conj m_j)]`` is ``(Δφ·g + 2h²·(φ'_i + φ'_j)) / (g² + 4h²)``
    with ``g = μ_i − μ_j``: the difference quotient wherever ``|g| ≫ h`` (h = 2⁻¹⁰⁰) and the mean derivative where
    ``g = 0``. ``φ`` is evaluated in float64 at the exact float32 eigenvalues, whose distinct values differ by
    at least one float32 rounding step (6e-8 relative): the quotient's cancellation error is then at most
    ~1e-16/6e-8 ≈ 2e-9 relative. Float64 eigenvalues can be closer than that: there, pairs closer than 1e-7
    relative take the mean derivative (error O(δ²)).
    """
    # conj_physical: one launch (a lazy conj() costs a view and a copy when the subtraction resolves it).
    num = phi.unsqueeze(-1) - _row(phi.conj_physical())
    den = m.unsqueeze(-1) - _row(m.conj_physical())
    if mu.dtype == torch.float64:
        mu_col = mu.unsqueeze(-1)
        close = (mu_col - _row(mu)).abs_() <= (mu_col + _row(mu)).abs_().mul_(1e-7)
        den = den.masked_fill_(close, 2 * _STEP * 1j)
    return torch.view_as_real(num.div_(den))[..., 0].to(mu.dtype)


class _IsqrtEigh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: torch.Tensor, n_iter: int) -> torch.Tensor:  # type: ignore[override]
        # D = V·diag(φ)·Vᵀ with φ(μ) = q(μ/c)/√c, where μ, V are the eigenpairs of A and c = ‖A‖_F = ‖μ‖.
        mu, vec = torch.linalg.eigh(a)
        c2 = torch.dot(mu, mu) if mu.dim() == 1 else mu.square().sum(-1, keepdim=True)
        rc = c2.pow(-0.25)  # 1/√c
        m, phi = _scalar_newton_schulz(mu, rc, n_iter)
        phi_h = torch.view_as_real(phi)  # (..., 2): φ and h·φ'
        phi_re = phi_h[..., 0]
        vec_t = vec.mT  # kept for the backward pass too
        out = _mm(vec * _row(phi_re.to(a.dtype)), vec_t)
        if ctx.needs_input_grad[0]:
            # Everything the backward pass needs, in the eigenbasis (no n×n matrix beyond V and K kept): the
            # divided differences K of φ (c fixed), slope = μ·φ' + ½φ (∂φ/∂c = −slope/c) and μ/c².
            k = _divided_differences(m, phi, mu)
            slope = torch.addcmul(phi_re * 0.5, mu, phi_h[..., 1], value=1.0 / _STEP).to(a.dtype)
            ctx.save_for_backward(vec, vec_t, mu / c2, k, slope)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        vec, vec_t, mu_c2, k, slope = ctx.saved_tensors
        # In the eigenbasis (M = Vᵀ·G·V, G as it is, not its symmetric part, as autograd): for fixed c the
        # Daleckii–Krein term K ∘ M; c = ‖A‖_F adds Σ_i M_ii·∂φ_i/∂c·A/c = −s·V·diag(μ/c²)·Vᵀ with
        # s = Σ_i M_ii·slope_i. One change of basis back for both.
        m = _mm(_mm(vec_t, grad), vec)
        s = torch.linalg.vecdot(m.diagonal(dim1=-2, dim2=-1), slope)
        inner = k * m
        inner.diagonal(dim1=-2, dim2=-1).addcmul_(s if s.dim() == 0 else s.unsqueeze(-1), mu_c2, value=-1.0)
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
