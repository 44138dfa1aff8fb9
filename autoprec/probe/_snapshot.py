"""Tensors set aside off the device and put back bit for bit: how tuning trains without a second model.

``tune`` measures on a private model whose parameters *share storage* with the caller's (no copy of
the weights: the probe and search never change them). Its training runs (the FP32 reference and
the verification of the policy) do change them, in place: a :class:`Snapshot` of the trainable
parameters and the buffers is taken before, and every run ends by restoring it, as ``tune`` does on
any exit, success or error (Ctrl-C included). So tuning holds what one FP32 training step holds
(weights, gradients, optimizer state, activations) plus the snapshot, and the snapshot is off the
device: in host memory for a model on a GPU, in a temporary file for a model on the CPU (the
operating system's file cache may keep it in RAM while memory is free, but it is not the
process's to hold, and it is dropped under pressure).

While ``tune`` runs, the caller's weights therefore take the values of a training run for some
seconds: a model shared with another thread that is used during tuning sees them.

Example:
    >>> import torch
    >>> w = torch.nn.Parameter(torch.ones(3))
    >>> with Snapshot([w]) as snap:
    ...     with torch.no_grad():
    ...         _ = w.mul_(5)
    ...     snap.restore()
    ...     w.tolist()
    [1.0, 1.0, 1.0]
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any, Iterable

import torch

__all__ = ["Snapshot", "park", "unpark"]

log = logging.getLogger("autoprec.snapshot")


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 view of its own storage (``t`` contiguous)."""
    return t.detach().reshape(-1).view(torch.uint8)


class Snapshot:
    """The values of ``tensors`` now, kept in host memory (GPU tensors) or a temporary file (CPU tensors).

    :meth:`restore` writes them back into the same tensors (their storage, not new tensors), as
    often as needed; :meth:`close` (or leaving the ``with`` block) frees the copy. ``nbytes`` is
    its size; ``where`` says where it is (``"host memory"``, ``"file"``).
    """

    def __init__(self, tensors: Iterable[torch.Tensor], *, spill: bool | None = None) -> None:
        seen: set[int] = set()
        self.tensors = [t for t in tensors if not (id(t) in seen or seen.add(id(t)))]
        self.nbytes = sum(t.numel() * t.element_size() for t in self.tensors)
        on_cpu = all(t.device.type == "cpu" for t in self.tensors)
        self._copies: list[torch.Tensor] | None = None
        self._path: str | None = None
        self._layout: list[tuple] = []
        if (on_cpu if spill is None else spill) and self.nbytes:
            try:
                self._spill()
            except (OSError, RuntimeError, TypeError) as exc:  # a full disk, a dtype with no byte view
                log.info("snapshot kept in memory: %s", exc)
                self._close_file()
        if self._path is None:
            self._copies = [t.detach().to("cpu", copy=True) for t in self.tensors]
        self.where = "file" if self._path is not None else "host memory"

    def _spill(self) -> None:
        fd, self._path = tempfile.mkstemp(prefix="autoprec-snapshot-", suffix=".bin")
        with os.fdopen(fd, "wb") as fh:
            for t in self.tensors:
                fh.write(_bytes(t.contiguous()).numpy())

    def restore(self) -> None:
        """Put the saved values back into the tensors (no autograd record, no new storage)."""
        self._write(self.tensors)

    def release(self) -> None:
        """Let go of the tensors (their memory can be freed once the caller drops them too); :meth:`fresh`
        makes them again."""
        self._layout = [(t.shape, t.stride(), t.dtype, t.device) for t in self.tensors]
        self.tensors = []

    def fresh(self) -> list[torch.Tensor]:
        """New tensors with the layout and the saved values of those :meth:`release` let go of."""
        out = [torch.empty_strided(shape, stride, dtype=dtype, device=device)
               for shape, stride, dtype, device in self._layout]
        self._write(out)
        return out

    def _write(self, tensors: list[torch.Tensor]) -> None:
        with torch.no_grad():
            if self._copies is not None:
                for t, saved in zip(tensors, self._copies):
                    t.copy_(saved)
                return
            if self._path is None:
                return
            with open(self._path, "rb") as fh:
                for t in tensors:
                    target = t if t.is_contiguous() else torch.empty_like(t, memory_format=torch.contiguous_format)
                    view = _bytes(target).numpy()
                    if fh.readinto(view) != view.nbytes:
                        raise RuntimeError(f"autoprec's snapshot file {self._path} was truncated")
                    if target is not t:
                        t.copy_(target)

    def close(self) -> None:
        """Free the saved copy."""
        self._copies = None
        self._close_file()

    def _close_file(self) -> None:
        if self._path is not None:
            try:
                os.unlink(self._path)
            except OSError:
                pass
            self._path = None

    def __enter__(self) -> "Snapshot":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # a snapshot dropped without close() leaves no file behind
        self._close_file()


def park(ref: dict[str, Any]) -> tuple[Snapshot, list[bool]]:
    """Move ``ref["grads"]`` off the device (host memory, or a file for CPU tensors) and drop them.

    Example:
        >>> ref = {"grads": [torch.ones(2), None]}
        >>> parked = park(ref)
        >>> "grads" in ref, unpark(parked)
        (False, [tensor([1., 1.]), None])
    """
    grads = ref.pop("grads")
    present = [g is not None for g in grads]
    parked = Snapshot([g for g in grads if g is not None])
    parked.release()
    return parked, present


def unpark(parked: tuple[Snapshot, list[bool]]) -> list[torch.Tensor | None]:
    """The gradients :func:`park` set aside, on their device again (see its example)."""
    snap, present = parked
    fresh = iter(snap.fresh())
    snap.close()
    return [next(fresh) if here else None for here in present]
