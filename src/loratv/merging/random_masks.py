"""Random masks that do not depend on how the work is scheduled: DARE's and DELLA's drops.

mergekit draws them from torch's one global generator, so a mask changes with the order tensors are processed in, the
thread count and CPU vs GPU. Here each element's uniform number is a pure function of (seed, tensor name, input
position, element index): NumPy's Philox, a counter-based generator, keyed by the SHA-256 of the first three, gives
the element at flat index i as the i-th number of that key's stream, whatever else is computed, in whatever order.
The stream is drawn in chunks, so memory stays one chunk of float64 numbers.
"""

import hashlib

import numpy as np
import torch

CHUNK = 1 << 22  # uniforms drawn at a time


def _stream(seed: int, tensor: str, position: int) -> np.random.Generator:
    digest = hashlib.sha256(f"loratv-mask\0{seed}\0{tensor}\0{position}".encode()).digest()
    key = np.frombuffer(digest[:16], dtype=np.uint64)
    return np.random.Generator(np.random.Philox(key=key))


def keep_mask(seed: int, tensor: str, position: int, keep_probability: torch.Tensor | float,
              shape: tuple) -> torch.Tensor:
    """Element i is kept when its uniform u_i ∈ [0, 1) is below its keep probability.

    Args:
        seed: the merge's seed.
        tensor: the tensor's name.
        position: the input's position among the models.
        keep_probability: one probability for every element, or a tensor of them shaped `shape` (float64 or float32).
        shape: the tensor's shape.

    Returns:
        A boolean mask of `shape`, on the CPU.
    """
    n = int(np.prod(shape)) if shape else 1
    generator = _stream(seed, tensor, position)
    probabilities = None if isinstance(keep_probability, float) else \
        keep_probability.detach().to("cpu", torch.float64).reshape(-1).numpy()
    mask = np.empty(n, dtype=bool)
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        u = generator.random(stop - start)
        limit = keep_probability if probabilities is None else probabilities[start:stop]
        mask[start:stop] = u < limit
    return torch.from_numpy(mask).reshape(shape)
