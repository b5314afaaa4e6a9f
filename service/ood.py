"""An out-of-distribution guard for a probe: how far a request's hidden state lies from the
states the probe was trained on, so that the probe abstains where its answer means nothing.

The features are standardised as the probe's were, projected on the training set's first k
principal components, and scored two ways, both inspectable and both cheap (a k x d product):
the Mahalanobis distance inside the k-dimensional subspace (Ledoit-Wolf covariance) and the
norm of what the subspace leaves out (the residual, in standard units). A request is in
distribution only when both are within the thresholds chosen on the training set's
out-of-fold distances (benchmarks/probe_guard.py prints them). Numpy only, like the probes."""

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

    def read(self, x: Any) -> GuardReading:
        """The two distances of one state vector, and whether both are within bounds."""
        import numpy as np

        z = (np.asarray(x, np.float64) - self.mean) / self.scale
        s = self.components @ z
        diff = s - self.location
        distance = float(np.sqrt(max(0.0, diff @ self.precision @ diff)))
        residual = float(np.linalg.norm(z - self.components.T @ s))
        inside = distance <= self.max_distance and residual <= self.max_residual
        return GuardReading(distance, residual, inside)

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
        )
        k, d = guard.components.shape
        shapes = (guard.mean.shape, guard.scale.shape, guard.location.shape, guard.precision.shape)
        if shapes != ((d,), (d,), (k,), (k, k)):
            raise ValueError(f"guard arrays do not fit {k} components of {d} dimensions")
        return guard
