r"""Which claimed parameters the losses also reach outside their modules' recorded calls.

A layer rule differentiates a parameter through the calls of its module that a forward hook
recorded. If the autograd graph of the losses also uses the parameter elsewhere (a tied output
head ``F.linear(h, emb.weight)``, another module's forward reading ``lin.weight``), the rule would
miss that use. This module finds such parameters from the graph's structure alone (no data is
read, no host sync), so the engines send them to their exact fallback instead.

Each recorded call owns the autograd nodes between its output and its input: the nodes reached
from ``output.grad_fn`` without going through the input's ``grad_fn``. An edge from any other
node to the ``AccumulateGrad`` node of a claimed parameter is a use outside the rule.

The graph is only visible eagerly: under ``torch.compile`` (Dynamo cannot read ``grad_fn``)
the check cannot run (the engines then reuse the verdict of their last eager call), see
:func:`graph_visible`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor


def graph_visible() -> bool:
    """Whether autograd nodes can be inspected now (not while ``torch.compile`` traces)."""
    return not torch.compiler.is_compiling()


def saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks are active (checkpointing, offloading): unpacking a saved
    tensor in the forward pass could then recompute or move it."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


def input_node(args: tuple) -> object | None:
    """The ``grad_fn`` of a call's first tensor argument (eager only; ``None`` otherwise)."""
    if args and isinstance(args[0], Tensor) and graph_visible():
        return args[0].grad_fn
    return None


def _closure(starts: list, stop: object | None = None) -> set:
    """Nodes reached from ``starts`` through ``next_functions``, not going through ``stop`` (a
    node, or a set of nodes) nor into ``AccumulateGrad`` nodes (leaves)."""
    stops = stop if isinstance(stop, (set, frozenset)) else {stop}
    seen = {n for n in starts if n is not None}
    todo = list(seen)
    while todo:
        node = todo.pop()
        for child, _ in node.next_functions:
            if child is None or child in stops or child in seen or hasattr(child, "variable"):
                continue
            seen.add(child)
            todo.append(child)
    return seen


def local_nodes(output: Tensor, stop: object | None) -> set:
    """Nodes of the graph between ``output`` and the node ``stop`` (its input; or a set of
    nodes, its inputs), exclusive."""
    return _closure([output.grad_fn], stop)


def reachable(roots: Sequence[Tensor]) -> set:
    """Every node of the graph of ``roots`` (``AccumulateGrad`` nodes of leaves excluded)."""
    return _closure([r.grad_fn for r in roots])


def leaf_users(roots: Sequence[Tensor], leaves: Iterable[Tensor]) -> dict[int, set]:
    """For each of ``leaves`` (by ``id``), the nodes of the graph of ``roots`` that use it."""
    wanted = {id(p) for p in leaves}
    users: dict[int, set] = {i: set() for i in wanted}
    if not wanted:
        return users
    starts = [r.grad_fn for r in roots if r.grad_fn is not None]
    seen = set(starts)
    todo = list(starts)
    while todo:
        node = todo.pop()
        for child, _ in node.next_functions:
            if child is None:
                continue
            if hasattr(child, "variable"):  # AccumulateGrad: a leaf
                leaf = id(child.variable)
                if leaf in wanted:
                    users[leaf].add(node)
                continue
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return users


def used_outside(
    roots: Sequence[Tensor],
    calls: Iterable[tuple[Tensor, object | None, Iterable[Tensor]]],
) -> set[int]:
    """``id`` of every claimed parameter that the graph of ``roots`` uses outside its calls.

    ``calls`` holds, per recorded call, its output, its input's ``grad_fn`` (:func:`input_node`)
    and the parameters its rule claims. Eager only (see :func:`graph_visible`).

    >>> lin = torch.nn.Linear(2, 2)
    >>> x = torch.randn(3, 2)
    >>> y = lin(x)
    >>> loss = (y + torch.nn.functional.linear(x, lin.weight)).sum()  # weight used twice
    >>> used_outside([loss], [(y, None, [lin.weight, lin.bias])]) == {id(lin.weight)}
    True
    """
    calls = list(calls)
    users = leaf_users(roots, (p for _, _, params in calls for p in params))
    return outside_of(users, [(local_nodes(out, stop), params) for out, stop, params in calls])


def outside_of(users: dict[int, set], regions: Iterable[tuple[set, Iterable[Tensor]]]) -> set[int]:
    """``id`` of the leaves of ``users`` with a user outside every region that claims them
    (``regions``: node sets and the leaves each one claims); unclaimed leaves are ignored."""
    allowed: dict[int, set] = {}
    for nodes, params in regions:
        for p in params:
            allowed.setdefault(id(p), set()).update(nodes)
    return {i for i, ok in allowed.items() if not users.get(i, set()) <= ok}
