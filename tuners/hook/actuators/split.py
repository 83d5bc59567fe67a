"""Cutting a batch into micro-batches along its first dimension, whatever holds the tensors.

A batch is a tensor, or tuples, lists, dicts, namedtuples and dataclasses of them (nested); a
tensor whose first dimension is the batch's row count is sliced (a view, no copy), every other
leaf (strings, numbers, a tensor of another length) goes to each micro-batch unchanged.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable


def _is_tensor(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "numel") and hasattr(x, "__getitem__")


def _map(batch: Any, fn: Callable[[Any], Any]) -> Any:
    """`batch` with every tensor leaf replaced by fn(leaf)."""
    if _is_tensor(batch):
        return fn(batch)
    t = type(batch)
    if t is tuple or t is list:
        return t(_map(x, fn) for x in batch)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):          # namedtuple
        return t(*(_map(x, fn) for x in batch))
    if isinstance(batch, (tuple, list)):
        return t(_map(x, fn) for x in batch)
    if isinstance(batch, dict):
        out = {k: _map(v, fn) for k, v in batch.items()}
        return out if t is dict else t(out)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return dataclasses.replace(batch, **{f.name: _map(getattr(batch, f.name), fn)
                                             for f in dataclasses.fields(batch) if f.init})
    return batch


def leaves(batch: Any) -> list[Any]:
    out: list[Any] = []

    def take(x: Any) -> Any:
        out.append(x)
        return x
    _map(batch, take)
    return out


def rows(batch: Any) -> int:
    """The batch's row count: the first dimension of its first tensor with one (0: none)."""
    for t in leaves(batch):
        if len(t.shape) >= 1:
            return int(t.shape[0])
    return 0


def elements(batch: Any, n: int) -> int:
    """Elements in the tensors that are split (first dimension n): the size memory grows with,
    so a batch padded to a longer sample counts as bigger than one of the same rows."""
    return sum(int(t.numel()) for t in leaves(batch) if len(t.shape) >= 1 and t.shape[0] == n)


def part(batch: Any, n: int, start: int, stop: int) -> Any:
    """Rows start:stop of every tensor with first dimension n."""
    return _map(batch, lambda t: t[start:stop] if len(t.shape) >= 1 and t.shape[0] == n else t)


def sizes(n: int, most: int) -> list[int]:
    """n rows in the fewest micro-batches of at most `most` rows, as equal as they come."""
    most = max(1, min(most, n))
    k = -(-n // most)
    base, extra = divmod(n, k)
    return [base + 1] * extra + [base] * (k - extra)
