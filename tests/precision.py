"""Rounding-error bounds the tests derive their tolerances from.

The bounds are the a-priori ones of Higham, *Accuracy and Stability of Numerical Algorithms*
(2nd ed., §2-3): with unit roundoff ``u`` of the working precision, an ``n``-term sum or dot
product computed in any order has an error of at most ``gamma(n) * sum |terms|``. They hold for
every summation order, so for every thread count and every vectorised kernel a CPU may pick.
"""

from __future__ import annotations

import math

import torch


def unit_roundoff(dtype: torch.dtype = torch.float32) -> float:
    """Return ``u``: half the distance from 1.0 to the next number of ``dtype``."""
    return torch.finfo(dtype).eps / 2


def gamma(n: int, dtype: torch.dtype = torch.float32) -> float:
    """Return ``gamma_n = n u / (1 - n u)``, the relative error bound of an ``n``-term sum."""
    nu = n * unit_roundoff(dtype)
    assert nu < 1, f"{n} terms exceed what {dtype} can bound"
    return nu / (1 - nu)


def probable_gamma(n: int, dtype: torch.dtype = torch.float32, lam: float = 8.0) -> float:
    """Return ``lam sqrt(n) u``, the probabilistic error bound of an ``n``-term sum.

    Higham and Mary (SIAM J. Sci. Comput. 41(5), 2019, Thm 2.4): when the rounding errors are
    independent and of mean zero, ``gamma(n)`` may be replaced by ``exp(lam sqrt(n) u + n u^2 /
    (1 - u)) - 1`` (about ``lam sqrt(n) u``) with probability at least ``1 - 2n exp(-lam^2 / 2)``:
    for ``lam = 8`` and a million terms, a failure rate below 3e-8. Use it where the worst-case
    ``gamma(n)``, which assumes every rounding error goes the same way, is too loose to test with.
    """
    u = unit_roundoff(dtype)
    return math.expm1(lam * math.sqrt(n) * u + n * u * u / (1 - u))


def float32_index_tolerance(num_params: int, probable: bool = False) -> float:
    """Return the error bound of a score from float64 gradients kept in a float32 index, relative
    to ``||g_train|| ||g_test||``.

    Each of the two factors is rounded to float32 once (relative error ``u`` per coordinate), and
    the ``num_params``-term dot product is summed in float32: the error is at most
    ``gamma(num_params + 2) * sum_k |g_train,k g_test,k|``, and by Cauchy-Schwarz that sum is at
    most ``||g_train|| ||g_test||``. ``probable`` takes `probable_gamma` instead of `gamma`.
    """
    return (probable_gamma if probable else gamma)(num_params + 2)


def float32_cosine_tolerance(num_params: int, probable: bool = False) -> dict[str, float]:
    """Return ``assert_close`` tolerances for grad-cos scores from a float32 index, against float64.

    The absolute part is `float32_index_tolerance`; the relative part covers the two float32
    norms (``gamma(num_params)`` each) and the float32 roundings of the norms and of the division
    (``3 u``), all relative to the score itself.
    """
    bound = probable_gamma if probable else gamma
    return {
        "atol": float32_index_tolerance(num_params, probable),
        "rtol": bound(2 * num_params + 3),
    }


def ranking_margin(scores: torch.Tensor, k: int) -> float:
    """Return the smallest gap between consecutive scores among the top ``k + 1`` (descending).

    A top-k computed with an error below half this margin cannot differ from the exact one.
    """
    top = scores.double().sort(descending=True).values[: k + 1]
    return float((top[:-1] - top[1:]).min())
