"""Row-chunked iteration over one tensor, so that peak memory stays O(chunk) even for a 600 MB embedding."""

import math

CHUNK_BYTES = 128 << 20


def row_chunks(shape, bytes_per_element: int, chunk_bytes: int = CHUNK_BYTES):
    """(start, stop) row ranges along dim 0 whose work buffers stay under chunk_bytes; one range for scalars.

    Args:
        shape: the tensor's shape (a torch.Size or sequence of ints).
        bytes_per_element: bytes per element of the work buffers (not necessarily the stored dtype's).
        chunk_bytes: the budget per range; a range always has at least one row.

    Yields:
        (start, stop) pairs covering dim 0 in order; (0, 1) for a 0-d shape, (0, 0) for zero rows.
    """
    if len(shape) == 0:
        yield 0, 1
        return
    rows = shape[0]
    row_bytes = max(1, math.prod(shape[1:]) * bytes_per_element)
    step = max(1, chunk_bytes // row_bytes)
    if rows == 0:
        yield 0, 0
        return
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def rows_of(tensor, start: int, stop: int):
    """Rows [start, stop) of a tensor, or the whole tensor when it is 0-d (its one "row" from row_chunks).

    Args:
        tensor: a torch tensor.
        start: first row (inclusive).
        stop: last row (exclusive).

    Returns:
        A view of the rows, or the 0-d tensor itself.
    """
    return tensor if tensor.dim() == 0 else tensor[start:stop]
