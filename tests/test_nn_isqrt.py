"""The eigendecomposition and fewer-products forms of Newton–Schulz equal the plain iterations (values, gradients)."""

from __future__ import annotations

import pytest
import torch

from seg.nn.isqrt import isqrt, isqrt_eigh, isqrt_newton_schulz, isqrt_newton_schulz_fast


def _spd(d: int, n: int, dtype=torch.float64, seed=0, batch=()):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, n, d, generator=g, dtype=dtype) * torch.linspace(0.05, 3, d, dtype=dtype)
    x = x + 0.7
    return x.transpose(-1, -2) @ x / n + 1e-5 * torch.eye(d, dtype=dtype)


@pytest.mark.parametrize("n_iter", [1, 5, 15])
@pytest.mark.parametrize("batch", [(), (3,)])
def test_eigh_form_equals_iterations_float64(n_iter, batch):
    a = _spd(24, 200, batch=batch, seed=n_iter)
    a1, a2 = a.clone().requires_grad_(), a.clone().requires_grad_()
    d1, d2 = isqrt_newton_schulz(a1, n_iter), isqrt_eigh(a2, n_iter)
    torch.testing.assert_close(d2, d1, rtol=1e-11, atol=1e-12 * d1.abs().max().item())
    grad = torch.randn_like(d1)  # not symmetric: the gradient must match autograd for any G
    (g1,) = torch.autograd.grad(d1, a1, grad)
    (g2,) = torch.autograd.grad(d2, a2, grad)
    torch.testing.assert_close(g2, g1, rtol=1e-9, atol=1e-11 * g1.abs().max().item())


@pytest.mark.parametrize("n_iter", [1, 2, 5, 15])
@pytest.mark.parametrize("batch", [(), (3,)])
def test_fast_iterations_equal_plain_iterations(n_iter, batch):
    a = _spd(24, 200, batch=batch, seed=10 + n_iter)
    a1, a2 = a.clone().requires_grad_(), a.clone().requires_grad_()
    d1, d2 = isqrt_newton_schulz(a1, n_iter), isqrt_newton_schulz_fast(a2, n_iter)
    torch.testing.assert_close(d2, d1, rtol=1e-11, atol=1e-12 * d1.abs().max().item())
    grad = torch.randn_like(d1)
    (g1,) = torch.autograd.grad(d1, a1, grad)
    (g2,) = torch.autograd.grad(d2, a2, grad)
    torch.testing.assert_close(g2, g1, rtol=1e-9, atol=1e-11 * g1.abs().max().item())


def test_repeated_eigenvalues():
    a = torch.diag(torch.tensor([2.0, 1.0, 1.0, 1.0, 0.5], dtype=torch.float64))
    a1, a2 = a.clone().requires_grad_(), a.clone().requires_grad_()
    grad = torch.randn(5, 5, dtype=torch.float64)
    (g1,) = torch.autograd.grad(isqrt_newton_schulz(a1, 5), a1, grad)
    (g2,) = torch.autograd.grad(isqrt_eigh(a2, 5), a2, grad)
    torch.testing.assert_close(g2, g1, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_clustered_eigenvalues_of_a_rank_deficient_covariance(dtype):
    # 6 samples of 24 features: 18 eigenvalues equal to eps in exact arithmetic, a few rounding steps apart (or
    # equal) once computed. The divided differences must not divide rounding noise by a gap of that size.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 24, generator=g, dtype=torch.float64) + 0.5
    a = x.T @ x / 6 + 1e-3 * torch.eye(24, dtype=torch.float64)
    grad = torch.randn(24, 24, generator=g, dtype=torch.float64)
    a1, a2 = a.clone().requires_grad_(), a.to(dtype).requires_grad_()
    (g1,) = torch.autograd.grad(isqrt_newton_schulz(a1, 5), a1, grad)
    (g2,) = torch.autograd.grad(isqrt_eigh(a2, 5), a2, grad.to(dtype))
    tol = 1e-8 if dtype == torch.float64 else 1e-4
    assert ((g2.double() - g1).abs().max() / g1.abs().max()) < tol


def test_float32_close_to_float64():
    a = _spd(64, 500, seed=4)
    ref = isqrt_newton_schulz(a, 5)
    for method in ("iterate", "eigh"):
        out = isqrt(a.float(), 5, method).double()
        assert ((out - ref).abs().max() / ref.abs().max()) < 1e-4, method


def test_unknown_method():
    with pytest.raises(ValueError, match="method"):
        isqrt(torch.eye(3), 5, "svd")


@pytest.mark.slow  # inductor compiles on the CPU: ~10 s
def test_iterations_compiled_equal_eager():
    # What GPUs run under train.compile. torch.add(I, P, alpha=-0.5) after a matmul came out wrong compiled
    # (1.4 relative error), silently.
    a = _spd(24, 200, seed=7)
    a1, a2 = a.clone().requires_grad_(), a.clone().requires_grad_()
    d1 = isqrt_newton_schulz_fast(a1, 5)
    d2 = torch.compile(isqrt_newton_schulz_fast)(a2, 5)
    torch.testing.assert_close(d2, d1, rtol=1e-12, atol=1e-12 * d1.abs().max().item())
    grad = torch.randn_like(d1)
    (g1,) = torch.autograd.grad(d1, a1, grad)
    (g2,) = torch.autograd.grad(d2, a2, grad)
    torch.testing.assert_close(g2, g1, rtol=1e-10, atol=1e-12 * g1.abs().max().item())
