r"""The Gramian-engine interface.

An engine takes ``M`` losses (a flat vector) and the parameters :math:`\theta_1, \dots,
\theta_P` that Jacobian descent acts on, and returns a :class:`GramianResult` holding

* the Gramian :math:`G = \sum_p J_p J_p^\top \in \mathbb{R}^{M \times M}` (float32 or wider),
  where :math:`J_p` is the Jacobian of the losses with respect to :math:`\theta_p`;
* a way to build the weighted gradient :math:`J_p^\top w` for every parameter once the weights
  :math:`w` are known.

Engines differ in *how*: the :class:`~jdoptim.gramian.JacobianEngine` materialises every
:math:`J_p` with one batched vector-Jacobian product and reads the weighted gradient off it (no
second backward); a layer-wise engine can build :math:`G` from layer inputs and output
gradients without materialising :math:`J` and then run one ordinary backward of
:math:`w^\top L`. New engines subclass :class:`GramianEngine` and register a name with
:func:`jdoptim.gramian.register_engine`, after which ``engine="name"`` (and, if they choose to,
``engine="auto"``) selects them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from ..distributed import Communicator


class GramianResult(ABC):
    """The Gramian of one call of an engine, and how to turn weights into gradients."""

    gramian: Tensor
    """``[M, M]`` Gramian of the losses with respect to the engine's parameters (detached)."""

    #: Whether :meth:`jacobian` is available (the full ``[M, n]`` Jacobian is in memory).
    materialized: bool = False

    #: For per-sample losses (objective ``b`` depends on sample ``b`` only): their batch
    #: dimension. ``None``: the engine does not know (see :meth:`to_global`).
    batch_dim: int | None = None

    gramian_exponent: Tensor | None = None
    """``None`` or an int 0-d tensor ``e``: the Gramian of the losses is
    ``gramian * 2**e``. ``e = 0`` in the normal range; engines form the Gramian of gradients
    scaled by a power of two when they are so large (or small) that it would overflow (or
    underflow), see :mod:`jdoptim.gramian._scale`. The weighted gradient is never scaled."""

    @abstractmethod
    def weighted_gradient(self, weights: Tensor) -> list[Tensor | None]:
        r"""Return :math:`J_p^\top w` for each parameter (``None`` where no loss reaches it).

        ``weights`` is a flat ``[M]`` vector. The gradients have their parameter's shape and
        dtype.
        """

    def to_global(
        self,
        comm: Communicator,
        losses: Tensor,
        batch_dim: int | None,
        sizes: list[int] | None,
    ) -> tuple[GramianResult, Tensor]:
        """The result of the global distributed step, and the global (detached) losses.

        ``losses`` are this rank's, in the caller's shape. ``batch_dim=None``: batch-mean
        objectives (the mean over ranks); otherwise per-sample objectives concatenated along
        ``batch_dim`` over ranks (``sizes``: every rank's size there; ``None``: equal). Only
        :class:`jdoptim.distributed.Communicator` methods may communicate (see
        :mod:`jdoptim.distributed`).
        """
        raise NotImplementedError(
            f"{type(self).__name__} has no global distributed step; use distributed='local'."
        )

    def jacobian(self) -> Tensor:
        """Return the ``[M, n]`` Jacobian over the parameters some loss reaches (concatenated in
        order, each flattened). Only for engines that materialise it."""
        raise NotImplementedError(f"{type(self).__name__} does not materialise the Jacobian.")

    def split(self, vector: Tensor) -> list[Tensor | None]:
        """Split an ``[n]`` vector laid out like :meth:`jacobian`'s columns into per-parameter
        gradients (``None`` for the parameters no loss reaches)."""
        raise NotImplementedError(f"{type(self).__name__} does not materialise the Jacobian.")


class GramianEngine(ABC):
    """Computes the Gramian of a vector of losses with respect to some parameters."""

    #: Name under which the engine is registered (see :func:`jdoptim.gramian.register_engine`).
    name: str = "abstract"

    #: Whether results can build an ``[M, n]`` Jacobian (needed by Jacobian-only aggregators).
    materializes_jacobian: bool = False

    #: Whether :meth:`compute` reads the shape of the losses (e.g. which dimension is the
    #: batch). :func:`jdoptim.jd_backward` gives such an engine the losses as they are, and
    #: any other engine the flat vector ``losses.reshape(-1)``. The Gramian is always in the
    #: row-major order of the flattened losses.
    shaped_losses: bool = False

    @abstractmethod
    def compute(
        self, losses: Tensor, params: Sequence[Tensor], *, retain_graph: bool = False
    ) -> GramianResult:
        """Differentiate the flat ``[M]`` vector ``losses`` (any shape, for an engine with
        :attr:`shaped_losses`) with respect to ``params``.

        ``retain_graph`` keeps the autograd graph of ``losses`` alive after the call (needed
        when something else still back-propagates through it).
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
