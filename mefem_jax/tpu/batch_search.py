"""The largest global batch whose step fits, found with few compiles.

The search only sees `check(batch)`, the report `tpu.compile.check` gives for that global batch (what it
reads: `fits`, and `per_device_bytes["peak"]` of a fit or XLA's `temp_required_bytes` and
`hbm_available_bytes` of a refusal), so it runs just as well on a synthetic check. The arithmetic of one
step of the search is plain functions of the probes so far; `find_max_batch` is the loop around them.
"""
from __future__ import annotations

from typing import Callable

from absl import logging

from mefem_jax.tpu.report import fit_summary

# Aim a little under the limit: the peak XLA reports leaves the runtime a margin of its own, and a step
# that fits with nothing to spare compiles slowly (XLA rematerialises to squeeze it in).
AIM = 0.97


def first_batch(start_batch: int, granule: int) -> int:
    """`start_batch` rounded down to whole granules, at least one granule."""
    return max(granule, int(start_batch) // granule * granule)


def bracket(probes: dict[int, dict]) -> tuple[int, int | None]:
    """(lo, hi): the largest batch that fit (0: none did), the smallest that did not (None: none failed)."""
    lo = max((b for b, p in probes.items() if p["fits"]), default=0)
    hi = min((b for b, p in probes.items() if not p["fits"]), default=None)
    return lo, hi


def granule_step(lo: int, granule: int, rel_tol: float) -> int:
    """The resolution wanted at `lo`: `rel_tol` of it in whole granules, at least one granule."""
    return max(granule, int(rel_tol * lo) // granule * granule)


def bracket_closed(lo: int, hi: int | None, granule: int, rel_tol: float) -> bool:
    """Whether [lo, hi) is as narrow as wanted, or even one example per device does not fit."""
    return hi is not None and (hi - lo <= granule_step(lo, granule, rel_tol) or (hi == granule and not lo))


def line_crossing(points: list[tuple[int, float]], limit: float) -> float | None:
    """The batch where the line through two (batch, bytes) points reaches `limit`; None unless there are
    two points and the bytes grow with the batch."""
    if len(points) < 2 or points[1][1] <= points[0][1]:
        return None
    (b0, p0), (b1, p1) = points
    return b0 + (limit - p0) * (b1 - b0) / (p1 - p0)


def fit_crossing(probes: dict[int, dict], hbm_bytes: int) -> float | None:
    """Through the peaks of the two largest fits, against `AIM` of HBM."""
    pts = sorted((b, p["per_device_bytes"]["peak"]) for b, p in probes.items() if "per_device_bytes" in p)
    return line_crossing(pts[-2:], AIM * hbm_bytes)


def refusal_crossing(probes: dict[int, dict], hbm_bytes: int) -> float | None:
    """Through the temporaries XLA quoted for the two smallest refusals, against `AIM` of the smallest HBM
    offer among the probes (a probe that quotes none offers `AIM` of HBM). Peaks and temporaries measure
    different things, so a line never joins a fit to a refusal."""
    pts = sorted((b, p["temp_required_bytes"]) for b, p in probes.items() if "temp_required_bytes" in p)
    offered = min((p.get("hbm_available_bytes", AIM * hbm_bytes) for p in probes.values()), default=AIM * hbm_bytes)
    return line_crossing(pts[:2], AIM * offered)


def next_batch(probes: dict[int, dict], lo: int, hi: int | None, granule: int, hbm_bytes: int, rel_tol: float,
               predicted_fit: bool) -> tuple[int, bool]:
    """The next batch to compile, and whether it is a line's own (unclamped) prediction.

    `predicted_fit`: the last probe was a line's prediction and fit, so `lo` is about the boundary."""
    step = granule_step(lo, granule, rel_tol)
    if predicted_fit and (hi is None or lo + step < hi):
        return lo + step, False  # check just above it
    guess = fit_crossing(probes, hbm_bytes) if hi is None else (
        refusal_crossing(probes, hbm_bytes) or fit_crossing(probes, hbm_bytes))
    by_line = guess is not None
    if guess is None:  # double until something fails, then bisect (halve while nothing fits)
        guess = 2 * lo if hi is None else (lo + hi) / 2 if lo else hi / 2
    top = 16 * lo if hi is None else hi - granule  # a line fitted far from the boundary may overshoot wildly
    b = int(guess) // granule * granule
    clamped = min(max(b, lo + granule), top)
    return clamped, by_line and clamped == b


def find_max_batch(check: Callable[[int], dict], start_batch: int, granule: int, hbm_bytes: int,
                   max_compiles: int = 6, rel_tol: float = 0.05) -> dict:
    """The largest global batch (a multiple of `granule`, the device count) whose step fits.

    What compiles cost shapes the search: a step far from the HBM limit compiles in a minute or two, one
    that XLA refuses in seconds, but one just under the limit can take several minutes, because XLA then
    rematerialises to squeeze it in. Away from the limit both measures XLA gives are affine in the batch:
    the peak of a step that fits, and the temporaries its refusal message quotes. So the search starts at
    `start_batch` and doubles until something fails (or halves until something fits), then aims where the
    line through two probes of one kind meets its limit (97 % of HBM for peaks, XLA's available HBM for
    refused temporaries), kept inside the bracket [largest fit, smallest failure]; after a fit the line
    predicted, it tries `rel_tol` above it. Without two such probes it bisects. It stops when the bracket
    is within `rel_tol` (or one example per device does not fit), or after `max_compiles` calls of `check`.
    """
    probes: dict[int, dict] = {}
    batch, by_line = first_batch(start_batch, granule), False
    while batch > 0 and batch not in probes:
        probes[batch] = check(batch)
        logging.info("batch %d: %s", batch, fit_summary(probes[batch]))
        lo, hi = bracket(probes)
        if len(probes) >= max_compiles or bracket_closed(lo, hi, granule, rel_tol):
            break
        predicted_fit = by_line and probes[batch]["fits"]
        batch, by_line = next_batch(probes, lo, hi, granule, hbm_bytes, rel_tol, predicted_fit)
    lo, hi = bracket(probes)
    return {"max_batch": lo or None, "smallest_failing": hi, "granule": granule, "rel_tol": rel_tol,
            "compiles": len(probes), "exact": bracket_closed(lo, hi, granule, rel_tol),
            "probes": {str(b): probes[b] for b in sorted(probes)}}
