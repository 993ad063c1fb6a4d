r"""Loss-level scalarizations (torchjd 0.18's ``torchjd.scalarization``).

A :class:`Scalarizer` maps the tensor of losses :math:`L` to one loss; the model is trained by
an ordinary backward of it: no Jacobian, no Gramian. Some keep state across steps
(:class:`DWA`, :class:`FAMO`) or have trainable parameters (:class:`UW`, :class:`IMTLL`).
:class:`jdoptim.JDOptimizer` accepts a scalarizer in place of an aggregator and then takes a
plain step from the losses alone.

>>> import torch
>>> from jdoptim.scalarization import Mean, STCH
>>> losses = torch.tensor([0.5, 1.2, 2.0])
>>> Mean()(losses), STCH(mu=0.1)(losses)
(tensor(1.2333), tensor(0.6740))
"""

from ._base import Scalarizer
from .dwa import DWA
from .famo import FAMO
from .learned import IMTLL, UW
from .preference import COSMOS, PBI, STCH
from .simple import Constant, GeometricMean, Mean, Random, Sum

__all__ = [
    "COSMOS",
    "DWA",
    "FAMO",
    "IMTLL",
    "PBI",
    "STCH",
    "UW",
    "Constant",
    "GeometricMean",
    "Mean",
    "Random",
    "Scalarizer",
    "Sum",
]
