"""Data as users hold it: a ``torch.utils.data.Dataset`` or ``DataLoader`` of ``(x, y)`` items, read in chunks.

:func:`as_tensors` turns such data into the ``(X, y)`` pair of tensors that the library works on, reading it
batch by batch (a ``Dataset`` through a sequential ``DataLoader`` of ``batch_size`` items). The order of the
rows is the order of the data: a loader that shuffles would give every pass a different order and the scores
no fixed training-point index, so it is refused. Tensor pairs pass through unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler

from .validation import check_positive_int

#: items per batch when a ``Dataset`` is read
READ_BATCH = 1024


def is_dataset(data: Any) -> bool:
    return isinstance(data, (Dataset, DataLoader)) and not isinstance(data, (tuple, list))


def as_tensors(name: str, data: Any, *, batch_size: int = READ_BATCH) -> Any:
    """``(X, y)`` tensors from a ``Dataset`` / ``DataLoader`` of ``(x, y)`` items; anything else is returned as
    it is (tensor pairs are checked by the caller)."""
    if not is_dataset(data):
        return data
    check_positive_int("batch_size", batch_size)
    if isinstance(data, DataLoader):
        if isinstance(data.sampler, RandomSampler):
            raise ValueError(f"{name}: the DataLoader shuffles (a RandomSampler); influence scores are indexed by "
                             "the order of the data, so pass a DataLoader with shuffle=False (or the Dataset)")
        loader = data
    else:
        loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    Xs: list[Tensor] = []
    ys: list[Tensor] = []
    for item in loader:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"{name}: every item (batch) must be an (x, y) pair, got {type(item).__name__}"
                             + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else ""))
        x, y = item
        Xs.append(torch.as_tensor(x))
        ys.append(torch.as_tensor(y))
    if not Xs:
        raise ValueError(f"{name}: the data set is empty")
    return torch.cat(Xs), torch.cat(ys)
