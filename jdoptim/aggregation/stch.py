"""PLACEHOLDER: to be implemented."""

from ._base import Aggregator


class STCH(Aggregator):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError

    def forward(self, x, /):
        raise NotImplementedError


from ._base import Weighting


class STCHWeighting(Weighting):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError

    def forward(self, x, /):
        raise NotImplementedError


