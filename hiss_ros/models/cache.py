"""Caching of tensors derived from parameters, for the streaming (no-grad) path."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch
from torch import Tensor


class DerivedTensor:
    """A tensor computed from parameters, recomputed only when one of them changed.

    A change is an in-place update (optimizer step, ``load_state_dict``: the tensor's version
    counter moves) or a replacement (``.to()``, ``.double()``: its storage moves). While autograd
    is recording nothing is cached, so training always differentiates through the computation.
    """

    def __init__(self, compute: Callable[..., Tensor]) -> None:
        self._compute = compute
        self._key: tuple | None = None
        self._value: Tensor | None = None

    def get(self, params: Sequence[Tensor], *args: Hashable) -> Tensor:
        if torch.is_grad_enabled():
            return self._compute(*args)
        key = (args, tuple((p._version, p.data_ptr(), p.dtype, p.device) for p in params))
        if key != self._key:
            self._value, self._key = self._compute(*args), key
        return self._value
