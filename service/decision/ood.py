"""An out-of-distribution guard for a probe: how far a request's hidden state lies from the
states the probe was trained on, so that the probe abstains where its answer means nothing.

The features are standardised as the probe's were, projected on the training set's first k
principal components, and scored two ways, both inspectable and both cheap (a k x d product):
the Mahalanobis distance inside the k-dimensional subspace (Ledoit-Wolf covariance) and the
norm of what the subspace leaves out (the residual, in standard units); both thresholds are
quantiles of the training set's out-of-fold distances (benchmarks/probes/guard.py prints them).
A third reading is the probe's own raw score: it must lie within the range the probe gave its
training records. The decision direction carries little of the states' variance, so a state
can sit among the training states on every principal axis and still lie far beyond them
along that one direction (hand-written actions did: P(unsafe) = 0.000, scores below any
training record's). A request is in distribution only when all three hold. Numpy only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# significant digits kept in the JSON: distances move by < 1e-3 relative, the file stays small
_DIGITS = 4


def _rounded(values: Any) -> Any:
    import numpy as np

    return np.vectorize(lambda v: float(f"{v:.{_DIGITS}g}"), otypes=[float])(values).tolist()


@dataclass(frozen=True)
class GuardReading:
    distance: float  # Mahalanobis, inside the principal subspace
    residual: float  # norm of the standardised state outside it
    score: float  # the decision probe's raw score (logit before calibration)
    inside: bool


@dataclass(frozen=True)
class OodGuard:
    layer: int
    mean: Any  # (d,) standardisation, as the decision probe's
    scale: Any  # (d,)
    components: Any  # (k, d) orthonormal rows: the principal axes
    location: Any  # (k,) mean of the projected training states
    precision: Any  # (k, k) inverse of the Ledoit-Wolf covariance of the projections
    max_distance: float
    max_residual: float
    min_score: float  # the range of the decision probe's raw score on its training records
    max_score: float

    def distances(self, x: Any) -> tuple[float, float]:
        """(Mahalanobis distance inside the principal subspace, residual outside it)."""
        import numpy as np

        z = (np.asarray(x, np.float64) - self.mean) / self.scale
        s = self.components @ z
        diff = s - self.location
        distance = float(np.sqrt(max(0.0, diff @ self.precision @ diff)))
        return distance, float(np.linalg.norm(z - self.components.T @ s))

    def read(self, x: Any, score: float) -> GuardReading:
        """The distances of one state vector, and whether they and the probe's score for it
        are all within bounds."""
        distance, residual = self.distances(x)
        inside = (
            distance <= self.max_distance
            and residual <= self.max_residual
            and self.min_score <= score <= self.max_score
        )
        return GuardReading(distance, residual, score, inside)

    def to_json(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "mean": _rounded(self.mean),
            "scale": _rounded(self.scale),
            "components": _rounded(self.components),
            "location": _rounded(self.location),
            "precision": _rounded(self.precision),
            "max_distance": float(self.max_distance),
            "max_residual": float(self.max_residual),
            "min_score": float(self.min_score),
            "max_score": float(self.max_score),
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> OodGuard:
        import numpy as np

        guard = cls(
            layer=int(raw["layer"]),
            mean=np.asarray(raw["mean"], np.float64),
            scale=np.asarray(raw["scale"], np.float64),
            components=np.asarray(raw["components"], np.float64),
            location=np.asarray(raw["location"], np.float64),
            precision=np.asarray(raw["precision"], np.float64),
            max_distance=float(raw["max_distance"]),
            max_residual=float(raw["max_residual"]),
            min_score=float(raw["min_score"]),
            max_score=float(raw["max_score"]),
        )
        k, d = guard.components.shape
        shapes = (guard.mean.shape, guard.scale.shape, guard.location.shape, guard.precision.shape)
        if shapes != ((d,), (d,), (k,), (k, k)):
            raise ValueError(f"guard arrays do not fit {k} components of {d} dimensions")
        return guard
