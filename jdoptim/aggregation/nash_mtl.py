"""PLACEHOLDER: to be implemented."""

from ._base import Aggregator


class NashMTL(Aggregator):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError

    def forward(self, x, /):
        raise NotImplementedError


