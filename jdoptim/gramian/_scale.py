r"""A Gramian that cannot overflow: the gradients are scaled by a power of two first.

The Gramian of gradients :math:`g` of size :math:`\sim 2^e` has entries :math:`\sim 2^{2e}`, so in
float32 it overflows once the gradients pass :math:`\sim 2^{64} \approx 1.8 \cdot 10^{19}` (the
losses scaled by :math:`10^{20}`, say), although every gradient is still finite, and it
underflows for gradients below :math:`\sim 2^{-64}`. The layer-wise and multi-task engines
therefore form the Gramian of :math:`2^{-s} g` from their (small) per-layer factors, with the
integer shift

.. math:: s = e - \operatorname{clamp}(e, -E, E), \qquad
    2^{e-1} \le \max |g| < 2^{e} \quad (\text{from } \texttt{torch.frexp}),

where :math:`E` is 32 for a float32 Gramian and 480 for float64 (:func:`limit`). For gradients
formed from a layer's inputs :math:`A` and output gradients :math:`D` (linear, convolution and
embedding layers), :math:`e` bounds :math:`\max|D| \max|A|` instead, read from the small factors
and not from the gradients (no pass over them); the gradients are below :math:`2^{e}` times the
number of positions, which the :math:`2^{64}` of headroom absorbs. So:

* whenever :math:`-E \le e \le E` (every ordinary training step) :math:`s = 0`:
  the Gramian is exactly :math:`G`, as if nothing were scaled;
* otherwise the Gramian is :math:`2^{-2s} G`, formed from scaled factors with entries below
  :math:`2^{E}`, so no product or sum overflows and none underflows far from the largest.
  Scaling by a power of two is exact (no rounding), and the shift follows the gradients: the
  losses :math:`2^k L` give :math:`e + k`, so their scaled Gramian is :math:`2^{2j}` times that of
  :math:`L` for an integer :math:`j` (``0`` once both are out of range).

The weighted gradient :math:`J^\top w` is always formed from the unscaled factors, so it scales
exactly with the losses. A weighting that is invariant to multiplying :math:`G` by a power of two
(UPGrad, DualProj, MGDA, IMTL-G, Aligned-MTL, PCGrad, CAGrad, and the constant ones) thus gives
exactly the same JD update on :math:`2^k L` as :math:`2^k` times the one on :math:`L`. One that
reads the absolute size of :math:`G` (STCH's nadir accumulated over steps, a threshold such as
UPGrad's ``norm_eps`` on the trace) sees :math:`G` unchanged in the normal range, and a
rescaled :math:`G` only where :math:`G` itself is not representable. The results expose
``gramian_exponent`` (:math:`2s`): the Gramian of the losses is ``gramian * 2**gramian_exponent``.

All of it is tensor arithmetic (a max-abs reduction and ``frexp`` per factor): no host sync, and
it compiles into the step's graph. The Jacobian engine, whose ``[M, n]`` Jacobian would cost
two more passes to scale, scales the losses instead (:class:`~jdoptim.gramian.JacobianEngine`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def limit(dtype: torch.dtype) -> int:
    """:math:`E`: the scaled gradients stay below :math:`2^E`, leaving :math:`2^{64}` of headroom
    for the sums of a Gramian of ``dtype``.

    >>> limit(torch.float32), limit(torch.float64)
    (32, 480)
    """
    return (_maxexp(dtype) - 64) // 2


def _maxexp(dtype: torch.dtype) -> int:
    """The smallest ``e`` with ``2**e`` above the largest finite value of ``dtype``."""
    return math.ceil(math.log2(torch.finfo(dtype).max))


def exponent(x: Tensor) -> Tensor:
    """The int32 0-d ``e`` with ``2**(e-1) <= max|x| < 2**e`` (``0`` for zeros or no entries;
    non-finite entries give ``0`` and stay non-finite once scaled).

    >>> exponent(torch.tensor([3.0, -0.5]))
    tensor(2, dtype=torch.int32)
    """
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.int32, device=x.device)
    x = x.detach()  # amax and amin: far faster than vector_norm(ord=inf), even aminmax, on CPU
    wide = _wide([x])
    amax = torch.maximum(x.amax().to(wide), -x.amin().to(wide))
    return torch.frexp(amax).exponent


def _wide(xs: Sequence[Tensor]) -> torch.dtype:
    """float64 when one of ``xs`` is (its maxima may be beyond float32's range: ``1e300`` is
    ``inf`` and ``1e-300`` is ``0`` there, whose exponent is 0), else float32."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def exponents(xs: Sequence[Tensor]) -> list[Tensor]:
    """:func:`exponent` of each of ``xs``: two reductions per tensor, then the rest for all of
    them at once (on one device; else one :func:`exponent` per tensor).

    >>> [int(e) for e in exponents([torch.tensor([3.0, -0.5]), torch.zeros(0), torch.ones(2)])]
    [2, 0, 1]
    """
    if len({x.device for x in xs}) != 1:
        return [exponent(x) for x in xs]
    wide = _wide(xs)
    top, low = [], []
    for x in xs:
        x = x.detach() if x.requires_grad else x
        if x.numel() == 0:
            zero = torch.zeros((), dtype=wide, device=x.device)
            top.append(zero)
            low.append(zero)
        else:
            hi, lo = x.amax(), x.amin()
            top.append(hi if hi.dtype == wide else hi.to(wide))
            low.append(lo if lo.dtype == wide else lo.to(wide))
    amax = torch.maximum(torch.stack(top), -torch.stack(low))
    return list(torch.frexp(amax).exponent.unbind())


def gram_shift(exponents: Sequence[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    """The shift :math:`s` (int32 0-d) for gradients whose entries have the ``exponents``.

    >>> gram_shift([torch.tensor(3), torch.tensor(70)], torch.float32, torch.device("cpu"))
    tensor(38, dtype=torch.int32)
    """
    if not exponents:
        return torch.zeros((), dtype=torch.int32, device=device)
    same = (torch.int32, device)
    e = [x if (x.dtype, x.device) == same else x.to(device=device, dtype=torch.int32)
         for x in exponents]  # fmt: skip
    e = torch.stack(e).amax()
    hi = limit(dtype)
    return e - e.clamp(-hi, hi)


def pow2(e: Tensor, dtype: torch.dtype) -> Tensor:
    """:math:`2^e` as a 0-d tensor of ``dtype`` (``e`` clamped to the normal range).

    >>> pow2(torch.tensor(-3), torch.float32)
    tensor(0.1250)
    """
    lo, hi = round(math.log2(torch.finfo(dtype).tiny)), _maxexp(dtype) - 1
    return torch.ldexp(torch.ones((), dtype=dtype, device=e.device), e.clamp(lo, hi))


def known_zero(shift: Tensor | None) -> bool:
    """Whether ``shift`` is certainly 0 without a host-device synchronisation: ``None``, or an
    eager CPU tensor equal to 0 (reading a CPU tensor is free). Compiled and accelerator code
    always gets ``False``, so a caller that skips a multiplication by ``2**-shift = 1`` on
    ``True`` keeps both its result and its graph.

    >>> known_zero(torch.tensor(0, dtype=torch.int32)), known_zero(torch.tensor(3))
    (True, False)
    """
    if shift is None:
        return True
    if torch.compiler.is_compiling() or shift.device.type != "cpu":
        return False
    return int(shift) == 0  # eager CPU only: no device to synchronise with


def unless_zero(
    shift: Tensor | None,
    plain: Callable[..., Tensor],
    scaled: Callable[..., Tensor],
    operands: Sequence[Tensor],
) -> Tensor:
    """``plain(*operands)`` when ``shift`` is ``None`` or 0, else ``scaled(shift, *operands)``:
    skip a pass that multiplies by :math:`2^0 = 1` wherever that costs no synchronisation.

    * Eager on the CPU: a Python branch (:func:`known_zero`).
    * Compiled for the CPU: :func:`torch.cond`, whose predicate the compiled code reads on the
      host (free for a CPU tensor): no graph break, no recompilation, and only the branch
      taken runs.
    * On an accelerator: always ``scaled`` (reading ``shift`` would synchronise).

    ``plain`` and ``scaled`` must not return (views of) their inputs.

    >>> double = lambda s, x: x * 2.0 ** -s.float()
    >>> unless_zero(torch.tensor(1), lambda x: x + 0, double, [torch.ones(2)])
    tensor([0.5000, 0.5000])
    """
    if known_zero(shift):
        return plain(*operands)
    assert shift is not None
    if torch.compiler.is_compiling() and shift.device.type == "cpu":

        def unscaled(s: Tensor, *xs: Tensor) -> Tensor:
            return plain(*xs)

        return torch.cond(shift == 0, unscaled, scaled, (shift, *operands))
    return scaled(shift, *operands)
