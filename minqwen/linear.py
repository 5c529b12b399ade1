"""The projection every layer is made of: y = x · Wᵀ (+ b), with W stored [out, in] as in the checkpoint."""

import numpy as np


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    # x: [T, in], weight: [out, in] → [T, out]. NumPy hands the transposed view to BLAS as is.
    y = x @ weight.T
    if bias is not None:
        y += bias
    return y
