"""A stand-in for one compile of the train step, for the batch search: memory exactly affine in the batch.

Away from the HBM limit XLA:TPU's peak (and the temporaries its refusal quotes) are affine in the batch
(benchmarks/tpu_fit.jsonl), so this is the search's input with the compiler's cost taken out.
"""
from __future__ import annotations

GiB = 2 ** 30
HBM = 16 * GiB  # a v5e chip
OFFER = 15.75 * GiB  # what XLA:TPU offers of it


class AffineCompiler:
    """`check(batch)` for a step whose peak is `fixed + per_example * batch`. Above `limit` it refuses, and
    (unless `quotes` is False) quotes the temporaries and the HBM left for them, as XLA:TPU's message does."""

    def __init__(self, fixed: float = 2e8, per_example: float = 1.2e5, limit: float = OFFER, quotes: bool = True):
        self.fixed, self.per_example, self.limit, self.quotes = fixed, per_example, limit, quotes
        self.calls: list[int] = []

    def __call__(self, batch: int) -> dict:
        self.calls.append(batch)
        need = self.fixed + self.per_example * batch
        if need > self.limit:
            sizes = {"temp_required_bytes": int(need - self.fixed),
                     "hbm_available_bytes": int(self.limit - self.fixed)} if self.quotes else {}
            return {"fits": False, "compiler_refused": True, "compiler_message": "Ran out of memory", **sizes}
        return {"fits": True, "hbm_bytes": HBM, "per_device_bytes": {"peak": int(need)}}

    def true_max(self, granule: int) -> int:
        return int((self.limit - self.fixed) / self.per_example) // granule * granule
