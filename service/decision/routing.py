"""Latency-budget routing, pure logic: a live latency model per tier and the choice of tier.

Each tier keeps its recent prefill and decode speeds over a sliding window (a bounded count
*and* a maximum age, so the estimate follows the machine's current load instead of keeping its
first entries for an hour). A request's latency is predicted as

    queue wait + uncached prompt tokens / prefill rate + output tokens / decode rate,

at a high percentile of the observed speeds; the grammar bounds the output length. A remote
tier that serves many requests at once is predicted instead from the time per request that it
took at about the number in flight that the request would join."""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from enum import StrEnum


@dataclass(frozen=True)
class Observation:
    at: float
    prefill_tps: float  # evaluated (uncached) prompt tokens per second
    decode_tps: float
    miss_ratio: float  # share of the prompt that was not reused from the KV cache
    service_s: float  # the whole generation, queue excluded
    concurrency: int = 1  # requests in flight on the engine when it was sent, itself included


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _level(concurrency: int) -> int:
    """Concurrency in powers of two: 1, 2, 3-4, 5-8, 9-16, ..."""
    return max(0, (concurrency - 1).bit_length())


# Fewer measurements than this at one level are pooled with the nearest other levels: at the
# 0.9 quantile, a handful is its slowest one (a cold first prefill), which would predict every
# request infeasible and so never let the tier measure that level again.
_MIN_AT_LEVEL = 8


def _at_concurrency(obs: list[Observation], concurrency: int | None) -> list[Observation]:
    """The observations made at the measured concurrency level nearest `concurrency` (on a
    tie, the busier level: the slower one), widened to the next nearest levels until there
    are _MIN_AT_LEVEL. A batching engine serves each request more slowly the more it serves
    at once, so a remote tier is predicted from what it did at about the load it has now,
    not from a serial queue."""
    if concurrency is None or not obs:
        return obs
    want = _level(concurrency)
    levels = sorted({_level(o.concurrency) for o in obs}, key=lambda lv: (abs(lv - want), -lv))
    chosen: set[int] = set()
    picked: list[Observation] = []
    for level in levels:
        chosen.add(level)
        picked = [o for o in obs if _level(o.concurrency) in chosen]
        if len(picked) >= _MIN_AT_LEVEL:
            break
    return picked


def _decode_tps(obs: list[Observation], quantile: float) -> float:
    """Decode speed at the quantile of slowness over the observations that decoded (none:
    infinitely fast, so that only prefill counts until a generation is seen)."""
    speeds = [o.decode_tps for o in obs if not math.isnan(o.decode_tps)]
    return _quantile(speeds, 1 - quantile) if speeds else math.inf


class LatencyModel:
    def __init__(self, window: int = 64, max_age_s: float = 600.0) -> None:
        self._obs: deque[Observation] = deque(maxlen=window)
        self._max_age_s = max_age_s

    def observe(
        self,
        *,
        prompt_tokens: int,
        cached_tokens: int,
        prefill_s: float,
        completion_tokens: int,
        decode_s: float,
        concurrency: int = 1,
        now: float | None = None,
    ) -> None:
        evaluated = max(1, prompt_tokens - cached_tokens)
        if prefill_s <= 0:
            return  # nothing to say about speed
        # a prefill-only answer (a probe) says nothing about decode speed
        decoded = completion_tokens >= 2 and decode_s > 0
        if not decoded and evaluated < 16:
            return
        self._obs.append(
            Observation(
                at=time.monotonic() if now is None else now,
                prefill_tps=evaluated / prefill_s,
                decode_tps=(completion_tokens - 1) / decode_s if decoded else math.nan,
                miss_ratio=evaluated / max(prompt_tokens, 1),
                service_s=prefill_s + decode_s,
                concurrency=max(1, concurrency),
            )
        )

    def _recent(self, now: float | None) -> list[Observation]:
        cutoff = (time.monotonic() if now is None else now) - self._max_age_s
        recent = [o for o in self._obs if o.at >= cutoff]
        # never forget everything: an idle tier keeps its last few measurements
        return recent or list(self._obs)[-4:]

    @property
    def ready(self) -> bool:
        return bool(self._obs)

    def predict(
        self,
        prompt_tokens: int,
        output_tokens: int,
        queue_s: float = 0.0,
        *,
        quantile: float = 0.9,
        now: float | None = None,
        concurrency: int | None = None,
    ) -> float:
        """Seconds, at the given quantile of slowness. A tier never measured is assumed to
        fit (0 s): the hard deadline still holds, and the first answer seeds the model.

        `concurrency` (a remote tier that batches): the whole time per request measured at
        about that many in flight. Its time to the first token is not a prefill speed there:
        it includes the engine's scheduling of the others' prefills and decodes."""
        obs = _at_concurrency(self._recent(now), concurrency)
        if not obs:
            return 0.0
        if concurrency is not None:
            return queue_s + _quantile([o.service_s for o in obs], quantile)
        prefill = _quantile([o.prefill_tps for o in obs], 1 - quantile)
        miss = _quantile([o.miss_ratio for o in obs], quantile)
        return queue_s + prompt_tokens * miss / prefill + output_tokens / _decode_tps(obs, quantile)

    def seconds_for(
        self, evaluated_tokens: int, output_tokens: int, *, quantile: float = 0.9
    ) -> float:
        """Seconds to evaluate this many prompt tokens (known to miss the KV cache) and
        decode this many, at the given quantile of slowness (0 before any measurement)."""
        obs = self._recent(None)
        if not obs:
            return 0.0
        prefill = _quantile([o.prefill_tps for o in obs], 1 - quantile)
        return evaluated_tokens / prefill + output_tokens / _decode_tps(obs, quantile)

    def typical_service_s(self, now: float | None = None) -> float:
        obs = self._recent(now)
        return _quantile([o.service_s for o in obs], 0.5) if obs else 0.0

    def prompt_tokens_within(
        self,
        seconds: float,
        output_tokens: int,
        *,
        quantile: float = 0.9,
        concurrency: int | None = None,
    ) -> int:
        """The largest prompt that fits `seconds` (0 when even the output alone does not)."""
        obs = _at_concurrency(self._recent(None), concurrency)
        if not obs:
            return 1 << 30
        prefill = _quantile([o.prefill_tps for o in obs], 1 - quantile)
        miss = _quantile([o.miss_ratio for o in obs], quantile)
        spare = seconds - output_tokens / _decode_tps(obs, quantile)
        return max(0, int(spare * prefill / max(miss, 1e-3)))


class RouteKind(StrEnum):
    FITS = "fits"  # the most capable tier that fits
    PINNED = "pinned"
    ROUTED_DOWN = "routed_down"  # a more capable tier fit but was saturated
    SHRUNK = "shrunk"  # nothing fit: the fastest tier with a trimmed prompt
    INFEASIBLE = "infeasible"
    OVERLOADED = "overloaded"


@dataclass(frozen=True)
class TierView:
    """What the router needs to know of one tier, weakest tiers first in a list."""

    name: str
    available: bool
    saturated: bool
    predict_s: float  # predicted latency of this request on it, queue wait included
    max_prompt_tokens: int  # the largest prompt that would fit the remaining budget


@dataclass(frozen=True)
class Route:
    kind: RouteKind
    tier: str | None
    predicted_s: float
    max_prompt_tokens: int | None = None  # set when the prompt must shrink to fit


def choose_route(
    tiers: list[TierView], remaining_s: float, *, pinned: str | None, min_prompt_tokens: int
) -> Route:
    """The most capable available tier whose predicted latency fits `remaining_s`."""
    if pinned is not None:
        view = next(t for t in tiers if t.name == pinned)
        if view.saturated:
            return Route(RouteKind.OVERLOADED, view.name, view.predict_s)
        if view.predict_s <= remaining_s:
            return Route(RouteKind.PINNED, view.name, view.predict_s)
        if view.max_prompt_tokens >= min_prompt_tokens:
            return Route(RouteKind.SHRUNK, view.name, remaining_s, view.max_prompt_tokens)
        return Route(RouteKind.INFEASIBLE, view.name, view.predict_s)
    available = [t for t in tiers if t.available]
    fitting = [t for t in available if t.predict_s <= remaining_s]
    open_fitting = [t for t in fitting if not t.saturated]
    if open_fitting:
        best = open_fitting[-1]
        kind = RouteKind.FITS if best is fitting[-1] else RouteKind.ROUTED_DOWN
        return Route(kind, best.name, best.predict_s)
    if fitting:  # every tier that fits is saturated
        return Route(RouteKind.OVERLOADED, fitting[-1].name, fitting[-1].predict_s)
    shrinkable = [
        t for t in available if not t.saturated and t.max_prompt_tokens >= min_prompt_tokens
    ]
    if shrinkable:
        fastest = max(shrinkable, key=lambda t: t.max_prompt_tokens)
        return Route(RouteKind.SHRUNK, fastest.name, remaining_s, fastest.max_prompt_tokens)
    if available and all(t.saturated for t in available):
        return Route(RouteKind.OVERLOADED, available[0].name, available[0].predict_s)
    first = available[0] if available else (tiers[0] if tiers else None)
    return Route(RouteKind.INFEASIBLE, first.name if first else None, math.inf)
