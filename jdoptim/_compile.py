"""What ``torch.compile`` needs to capture a Jacobian-descent step, in one call.

A JD step differentiates the losses several times (the batched vector-Jacobian product of the
Gramian engine, and possibly a second backward). Dynamo only traces ``torch.autograd.grad`` /
``Tensor.backward`` when ``torch._dynamo.config.trace_autograd_ops`` is on (off by default in
torch 2.13); otherwise it breaks the graph there. :func:`configure_compile` switches it on;
:class:`jdoptim.JDOptimizer` calls it at construction unless told not to, so users never have
to touch torch internals.

What compiles and what does not (torch 2.13):

* A train step written as one function, forward + losses + ``opt.backward(losses)``, compiles
  with ``fullgraph=True``: the JD part (Jacobian, Gramian, weighting, weighted gradient) is one
  graph with no break. The autograd calls are traced with ``retain_graph=True`` (free inside one
  graph; Dynamo requires it when the losses outlive the graph).
* ``opt.step(losses)`` adds the inner optimizer's step, which torch compiles as a separate graph
  (``torch.optim.Optimizer.step`` breaks the graph on purpose), so use ``fullgraph=False`` there.
  Wrap the learning rate in a tensor (``lr=torch.tensor(1e-3)``) when an LR scheduler changes
  it, as for any compiled torch optimizer, or every new value recompiles the step.
* Losses computed *outside* the compiled function cannot be differentiated inside it (Dynamo:
  "autograd.grad with external grad_fn"): with ``fullgraph=False`` Dynamo falls back to eager for
  the JD part (documented fallback, same results); with ``fullgraph=True`` it raises.
* A model compiled on its own (``torch.compile(model)``) with JD run eagerly does not work with
  the default batched engine (``vmap`` cannot run a compiled backward, pytorch#138422; the
  engine raises a ``RuntimeError`` saying so). Compile the whole step instead, or use
  ``chunk_size=1`` together with ``torch._functorch.config.donated_buffer = False`` (the
  row-by-row backward passes need the compiled backward to keep its buffers).
* The finiteness check (``nonfinite="raise"``/``"skip"``) needs one device-to-host read. Under
  compile it is moved out of the JD graph to the next :meth:`JDOptimizer.step` (which already
  breaks the graph), and the gradients are written masked meanwhile so a bad step leaves them
  untouched (see :class:`jdoptim.JDOptimizer`).
"""

from __future__ import annotations

import torch


def configure_compile() -> None:
    """Set the Dynamo options a compiled JD step needs (idempotent).

    * ``trace_autograd_ops``: trace ``torch.autograd.grad`` (the Gramian engine's batched
      backward) instead of breaking the graph there;
    * ``nested_graph_breaks``: when a call breaks the graph inside a callee (the inner
      optimizer's ``step``, inside :meth:`JDOptimizer.step`), resume tracing in that callee
      instead of turning the whole call into a break in the caller. Without it the losses of
      ``opt.step(losses)`` would leave the compiled forward graph and the JD backward would run
      eagerly through a compiled backward, which ``vmap`` cannot do (pytorch#138422).

    * ``allow_rnn``: trace ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` instead of breaking the graph
      at them. Behind such a break the recurrent layer (and the layer-wise engine's hook on it)
      runs in a frame of its own, and an ``autograd.grad`` traced in the step's later frame does
      not reach the outputs recorded there (it silently yields no gradient for them).

    All three only let Dynamo capture code it would otherwise run eagerly behind a graph break.

    >>> configure_compile()
    >>> import torch
    >>> torch._dynamo.config.trace_autograd_ops
    True
    """
    torch._dynamo.config.trace_autograd_ops = True
    torch._dynamo.config.nested_graph_breaks = True
    torch._dynamo.config.allow_rnn = True
