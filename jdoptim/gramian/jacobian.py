r"""The Jacobian engine: batched vector-Jacobian products, then :math:`G = \sum_p J_p J_p^\top`.

For ``M`` losses :math:`L \in \mathbb{R}^M` and parameters :math:`\theta_1..\theta_P`, one
reverse pass batched over the ``M`` rows of the identity (``torch.autograd.grad`` with
``is_grads_batched=True``, i.e. ``vmap`` over autograd) gives every block
:math:`J_p = \partial L / \partial \theta_p \in \mathbb{R}^{M \times n_p}`. The Gramian is
accumulated block by block in float32 or wider (:func:`~jdoptim.gramian.accumulate_gram`),
and the weighted gradient is read off the same blocks, :math:`\nabla_p = J_p^\top w`: no
second backward.

Memory: the Jacobian itself (``M x n``) is held until the weighted gradient is built. The
batched backward also holds ``M`` copies of every intermediate gradient; ``chunk_size = c``
bounds that to ``c`` copies by running ``ceil(M / c)`` batched passes (a Python loop of static
length; under ``torch.compile`` it is unrolled, so keep the number of chunks small there).
``chunk_size=1`` runs ``M`` plain backward passes with no ``vmap`` at all, the fallback for
models that ``vmap`` cannot go through (e.g. some RNN kernels, or a model compiled on its own
while JD runs eagerly: pytorch#138422).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._base import GramianEngine, GramianResult
from ._kernels import accumulate_gram, accumulation_dtype
from ._scale import exponent, gram_shift, pow2
from ._vjp import chunked_batched_grad


class JacobianResult(GramianResult):
    """Per-parameter Jacobians ``[M, *p.shape]`` (``None`` where unreached) and their Gramian."""

    materialized = True

    def __init__(
        self,
        params: Sequence[Tensor],
        jacobians: Sequence[Tensor | None],
        m: int,
        device: torch.device | None = None,
    ) -> None:
        self.params = list(params)
        self.jacobians = list(jacobians)
        blocks = [j.reshape(m, -1) for j in self.jacobians if j is not None]
        self._blocks = blocks
        dtype = accumulation_dtype(*(b.dtype for b in blocks))
        device = blocks[0].device if blocks else device
        # The Gramian of 2^-s J (s = 0 unless J is huge or tiny): it cannot overflow.
        shift = gram_shift([exponent(b) for b in blocks], dtype, device)
        scale = pow2(-shift, dtype)
        gramian = torch.zeros(m, m, dtype=dtype, device=device)
        for block in blocks:
            gramian = accumulate_gram(gramian, block, scale)
        self.gramian = gramian
        self.gramian_exponent = 2 * shift

    def weighted_gradient(self, weights: Tensor) -> list[Tensor | None]:
        out: list[Tensor | None] = []
        for p, jac in zip(self.params, self.jacobians, strict=True):
            if jac is None:
                out.append(None)
                continue
            dtype = accumulation_dtype(jac.dtype, weights.dtype)
            flat = weights.to(dtype) @ jac.reshape(jac.shape[0], -1).to(dtype)
            out.append(flat.reshape(p.shape).to(p.dtype))
        return out

    def jacobian(self) -> Tensor:
        if not self._blocks:
            raise ValueError("No loss depends on the parameters: the Jacobian is empty.")
        dtype = self._blocks[0].dtype
        for b in self._blocks[1:]:
            dtype = torch.promote_types(dtype, b.dtype)
        return torch.cat([b.to(dtype) for b in self._blocks], dim=1)

    def split(self, vector: Tensor) -> list[Tensor | None]:
        out: list[Tensor | None] = []
        start = 0
        for p, jac in zip(self.params, self.jacobians, strict=True):
            if jac is None:
                out.append(None)
                continue
            n = p.numel()
            out.append(vector[start : start + n].reshape(p.shape).to(p.dtype))
            start += n
        return out


def _explain_compiled_backward_error(error: RuntimeError) -> None:
    """Re-raise the known failures of a separately compiled model's backward with guidance."""
    message = str(error)
    if "data pointer" in message or "donated buffer" in message:
        raise RuntimeError(
            "The Jacobian engine could not back-propagate through a compiled model's backward "
            "from outside the compiled region (pytorch#138422). Compile the whole train step "
            "(forward, losses and opt.step/opt.backward) in one torch.compile, or use "
            "chunk_size=1 with torch._functorch.config.donated_buffer = False."
        ) from error


class JacobianEngine(GramianEngine):
    r"""Materialise the Jacobian with batched vector-Jacobian products.

    :param chunk_size: number of Jacobian rows per backward pass. ``None`` (default) does all
        ``M`` rows in one batched pass; ``c >= 2`` bounds the memory of the batched backward;
        ``1`` avoids ``vmap`` (``M`` plain backward passes).

    >>> import torch
    >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
    >>> losses = torch.stack([x.sum(), (x**2).sum()])  # J = [[1, 1], [2, 4]]
    >>> JacobianEngine().compute(losses, [x]).gramian
    tensor([[ 2.,  6.],
            [ 6., 20.]])
    """

    name = "jacobian"
    materializes_jacobian = True

    def __init__(self, chunk_size: int | None = None) -> None:
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"`chunk_size` should be None or an int >= 1, but got {chunk_size!r}.")
        self.chunk_size = chunk_size

    def compute(
        self, losses: Tensor, params: Sequence[Tensor], *, retain_graph: bool = False
    ) -> JacobianResult:
        if losses.ndim != 1:
            raise ValueError(f"`losses` should be a flat vector, got shape {tuple(losses.shape)}.")
        m = losses.shape[0]
        params = list(params)
        eye = torch.eye(m, dtype=losses.dtype, device=losses.device)
        try:
            jacobians = chunked_batched_grad(
                [losses], params, [eye], self.chunk_size, retain_graph=retain_graph
            )
        except RuntimeError as error:
            _explain_compiled_backward_error(error)
            raise
        return JacobianResult(params, jacobians, m, losses.device)

    def __repr__(self) -> str:
        return f"JacobianEngine(chunk_size={self.chunk_size})"
