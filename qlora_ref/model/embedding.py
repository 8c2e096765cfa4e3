"""Token embedding: a row lookup. Frozen in QLoRA (the paper trains adapters only), unquantized."""

from __future__ import annotations

import numpy as np


class Embedding:
    """``forward(ids)`` returns ``weight[ids]``; ``backward(grad)`` returns the gradient of the table.

    Backward of a lookup y[b, t] = W[ids[b, t]]: each row of W receives the sum of the output gradients at
    the positions where its token occurs, dW[v] = sum_{(b,t): ids[b,t] = v} grad[b, t]. The model never
    calls it (the table is frozen); it is here so that every layer has its backward, checked by the tests.
    """

    def __init__(self, weight: np.ndarray):
        self.weight = np.ascontiguousarray(weight)
        self._ids = None

    @property
    def num_embeddings(self) -> int:
        return self.weight.shape[0]

    def forward(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        if not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"token ids must be integers, got {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_embeddings):
            raise ValueError(f"token ids must be in [0, {self.num_embeddings}), got range "
                             f"[{ids.min()}, {ids.max()}]")
        self._ids = ids
        return self.weight[ids]

    def backward(self, grad: np.ndarray) -> np.ndarray:
        grad_weight = np.zeros_like(self.weight)
        np.add.at(grad_weight, self._ids.reshape(-1), grad.reshape(-1, self.weight.shape[1]))
        return grad_weight

    def clear_cache(self) -> None:
        self._ids = None
