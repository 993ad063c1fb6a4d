"""PLACEHOLDER: to be implemented."""

from ._base import Aggregator


class IMTLG(Aggregator):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError

    def forward(self, x, /):
        raise NotImplementedError


from ._base import Weighting


class IMTLGWeighting(Weighting):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError

    def forward(self, x, /):
        raise NotImplementedError


