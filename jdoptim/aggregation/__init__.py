r"""Aggregators and weightings for Jacobian descent.

Jacobian descent minimises several objectives :math:`f_1, \dots, f_m` at once. At each step the
Jacobian :math:`J \in \mathbb{R}^{m \times n}` (row :math:`i` is the gradient :math:`g_i` of
:math:`f_i`) is reduced to a single update direction by an **aggregator**
:math:`\mathcal{A}: \mathbb{R}^{m \times n} \to \mathbb{R}^n`.

Most aggregators are *weighted*: they compute weights :math:`w \in \mathbb{R}^m` and return
:math:`w^\top J`. When the weights only depend on the Gramian :math:`G = J J^\top` (the matrix
of inner products :math:`\langle g_i, g_j \rangle`), the **weighting** can be applied to
:math:`G` alone, which is all :class:`jdoptim.JDOptimizer` ever needs: the Gramian is
:math:`m \times m`, however many parameters the model has. A **generalized weighting** does the
same for a tensor of objectives of shape :math:`[m_1, \dots, m_k]`: it takes the generalized
Gramian of shape :math:`[m_1, \dots, m_k, m_k, \dots, m_1]` and returns weights of shape
:math:`[m_1, \dots, m_k]`; :class:`Flattening` builds one from any weighting.

>>> from torch import ones, tensor
>>> from jdoptim.aggregation import Flattening, UPGrad, UPGradWeighting
>>> J = tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
>>> UPGrad()(J)
tensor([0.2929, 1.9004, 1.9004])
>>> UPGradWeighting()(J @ J.T)
tensor([1.1109, 0.7894])
>>> Flattening(UPGradWeighting())(ones((2, 3, 3, 2)))
tensor([[0.1667, 0.1667, 0.1667],
        [0.1667, 0.1667, 0.1667]])

Every weighting is written in pure torch: it runs on any device with no host-device
synchronisation and can be captured by ``torch.compile(..., fullgraph=True)``.
"""

from ._base import (
    Aggregator,
    GeneralizedWeighting,
    GramianWeightedAggregator,
    Stateful,
    WeightedAggregator,
    Weighting,
)
from ._checks import set_value_checks, value_checks
from .aligned_mtl import AlignedMTL, AlignedMTLWeighting
from .cagrad import CAGrad, CAGradWeighting
from .config import ConFIG
from .constant import Constant, ConstantWeighting
from .crmogm import CRMOGMWeighting
from .db_mtl import DBMTL, DBMTLWeighting
from .dualproj import DualProj, DualProjWeighting
from .excess_mtl import ExcessMTL, ExcessMTLWeighting
from .fairgrad import FairGrad, FairGradWeighting
from .flattening import Flattening
from .graddrop import GradDrop
from .gradnorm import GradNorm, GradNormWeighting
from .gradvac import GradVac, GradVacWeighting
from .imtl_g import IMTLG, IMTLGWeighting
from .krum import Krum, KrumWeighting
from .mean import Mean, MeanWeighting
from .mgda import MGDA, MGDAWeighting
from .moco import MoCo
from .modo import MoDoWeighting
from .nash_mtl import NashMTL
from .pcd import PCD, PCDWeighting
from .pcgrad import PCGrad, PCGradWeighting
from .random import Random, RandomWeighting
from .sdmgrad import SDMGradWeighting
from .stch import STCH, STCHWeighting
from .sum import Sum, SumWeighting
from .trimmed_mean import TrimmedMean
from .upgrad import UPGrad, UPGradWeighting

__all__ = [
    "Aggregator",
    "AlignedMTL",
    "AlignedMTLWeighting",
    "CAGrad",
    "CAGradWeighting",
    "CRMOGMWeighting",
    "ConFIG",
    "Constant",
    "ConstantWeighting",
    "DBMTL",
    "DBMTLWeighting",
    "DualProj",
    "DualProjWeighting",
    "ExcessMTL",
    "ExcessMTLWeighting",
    "FairGrad",
    "FairGradWeighting",
    "Flattening",
    "GeneralizedWeighting",
    "GradDrop",
    "GradNorm",
    "GradNormWeighting",
    "GradVac",
    "GradVacWeighting",
    "GramianWeightedAggregator",
    "IMTLG",
    "IMTLGWeighting",
    "Krum",
    "KrumWeighting",
    "MGDA",
    "MGDAWeighting",
    "Mean",
    "MeanWeighting",
    "MoCo",
    "MoDoWeighting",
    "NashMTL",
    "PCD",
    "PCDWeighting",
    "PCGrad",
    "PCGradWeighting",
    "Random",
    "RandomWeighting",
    "SDMGradWeighting",
    "STCH",
    "STCHWeighting",
    "Stateful",
    "Sum",
    "SumWeighting",
    "TrimmedMean",
    "UPGrad",
    "UPGradWeighting",
    "WeightedAggregator",
    "Weighting",
    "set_value_checks",
    "value_checks",
]
