"""Where in the model's own code a functional op is called: its call site, eager or compiled.

An op-level layer is one call site of one op in one module's ``forward`` (``mixer::matmul``): a
``torch.matmul`` run once per time step in a Python loop is one layer however long the sequence,
so the candidates do not grow with it and a policy fits other lengths. The site is the innermost
frame of the model's code: frames of torch's functional wrappers (``torch/nn/functional.py``,
``torch/overrides.py``, ``torch/_tensor.py``) and of autoprec are passed over, ``torch/nn/modules``
(a torch module's own ``forward``) is model code. Eagerly it is read from the Python stack; under
``torch.compile`` from Dynamo's inlining translators, which stand for the same frames.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Iterable, Iterator

import torch

__all__ = ["call_site"]

log = logging.getLogger("autoprec.runtime")

_TORCH = os.path.dirname(torch.__file__) + os.sep
_TORCH_MODULES = os.path.join(_TORCH, "nn", "modules") + os.sep
_OURS = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _model_code(filename: str) -> bool:
    if filename.startswith(_OURS):
        return False
    return not filename.startswith(_TORCH) or filename.startswith(_TORCH_MODULES)


def _site(frames: Iterable[tuple[str, int, int]]) -> tuple[tuple[str, int, int], ...] | None:
    """The model-code frames from the innermost up to the module's ``forward`` (the first autoprec
    frame above model code: the runtime calls each ``forward``)."""
    found: list[tuple[str, int, int]] = []
    for frame in frames:
        if frame[0].startswith(_OURS):
            if found:
                break
        elif _model_code(frame[0]):
            found.append(frame)
    return tuple(found) or None


def _python_site() -> tuple[tuple[str, int, int], ...] | None:
    """:func:`_site` over the Python stack, as one loop (no generator: the eager op pays for each call)."""
    found: list[tuple[str, int, int]] = []
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        name = code.co_filename
        if name.startswith(_OURS):
            if found:
                break
        elif not name.startswith(_TORCH) or name.startswith(_TORCH_MODULES):
            found.append((name, code.co_firstlineno, frame.f_lineno))
        frame = frame.f_back
    return tuple(found) or None


def _dynamo_frames() -> Iterator[tuple[str, int, int]]:
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx: Any = InstructionTranslator.current_tx().output.current_tx
    except (ImportError, AttributeError) as exc:  # pragma: no cover - a torch whose Dynamo differs
        log.warning("autoprec cannot read call sites under torch.compile on this torch (%s): op-level "
                    "layers called in a loop are numbered per call there, and only the first call of "
                    "each meets its policy entry", exc)
        return
    while tx is not None:
        yield tx.f_code.co_filename, tx.f_code.co_firstlineno, tx.lineno
        tx = getattr(tx, "parent", None)


def call_site() -> tuple[tuple[str, int, int], ...] | None:
    """The model code calling the op being handled: ``(file, first line of the function, line)`` of
    each frame from the call up to the module's ``forward`` (so one line in a helper called from two
    lines is two sites), or None where no frame is model code. Call it from a mode's ``__torch_function__``.

    Example:
        >>> def forward():
        ...     return call_site()
        >>> forward()[0][1:] == (forward.__code__.co_firstlineno, forward.__code__.co_firstlineno + 1)
        True
    """
    # torch.compile runs it for real while tracing (see below), with the compiling flag set
    return _site(_dynamo_frames()) if torch.compiler.is_compiling() else _python_site()


# Dynamo runs it while tracing (it reads the tracer's frames) and keeps its result as a constant
call_site._dynamo_marked_constant = True  # type: ignore[attr-defined]
