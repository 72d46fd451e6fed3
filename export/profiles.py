"""Batch-size optimisation profile shared by the TensorRT build and the Triton configs.

A TensorRT engine only accepts batch sizes inside the profile it was built with, and Triton's
``max_batch_size`` / dynamic batcher must stay inside the same range, so both read these
constants instead of repeating numbers.
"""

from __future__ import annotations

# Smallest, most frequent (the one kernels are tuned for) and largest batch of the profile.
TRT_MIN_BATCH = 1
TRT_OPT_BATCH = 64
TRT_MAX_BATCH = 256

# Triton dynamic batching: preferred batch sizes inside [TRT_MIN_BATCH, TRT_MAX_BATCH].
PREFERRED_BATCH_SIZES = (8, 32, TRT_OPT_BATCH)


def check_profile(min_batch: int, opt_batch: int, max_batch: int) -> None:
    """Raise ValueError unless 1 <= min <= opt <= max."""
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(
            f"optimization profile needs 1 <= min <= opt <= max, got min={min_batch} opt={opt_batch} max={max_batch}"
        )
