"""Every Prometheus metric, defined in one place on an explicit registry (one per app, so
tests can build several apps in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)


class Metrics:
    # A flat list of declarations, one per metric, in the one place that defines them: there is
    # no logic to split, and methods grouping them would only scatter the attributes callers
    # look up by name.
    # long: a flat list of metric declarations
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "gatekeeper_requests",
            "Decisions answered, by tier and decision.",
            ["tier", "decision", "degraded"],
            registry=r,
        )
        self.decided_by = Counter(
            "gatekeeper_decided_by",
            "Answers by what produced the decision: generation, probe, or none (fail-closed).",
            ["tier", "path"],
            registry=r,
        )
        self.probe_abstentions = Counter(
            "gatekeeper_probe_abstentions",
            "Requests a probe would have allowed but found unlike its training data (its "
            "out-of-distribution guard), so generation decided instead.",
            ["tier"],
            registry=r,
        )
        self.fail_closed = Counter(
            "gatekeeper_fail_closed",
            "Fail-closed (degraded) answers, by reason.",
            ["tier", "reason"],
            registry=r,
        )
        self.injection_signals = Counter(
            "gatekeeper_injection_signals",
            "Judge-directed text found in requests, by place (action, goal, profile, history, "
            "evidence) and kind.",
            ["place", "kind"],
            registry=r,
        )
        self.injection_capped = Counter(
            "gatekeeper_injection_capped",
            "Decisions turned into escalate because the request held judge-directed text, by "
            "the decision the model gave.",
            ["tier", "decision"],
            registry=r,
        )
        self.revisions = Counter(
            "gatekeeper_revisions",
            "Revision attempts after an unsafe verdict, by outcome: allowed (offered as "
            "revise), rejected (the judge would not allow it), unchanged, no_budget, tripwire, "
            "loop, invalid, fault.",
            ["tier", "outcome"],
            registry=r,
        )
        self.invalid_outputs = Counter(
            "gatekeeper_invalid_outputs",
            "Model outputs that failed verification.",
            ["tier"],
            registry=r,
        )
        self.loops = Counter(
            "gatekeeper_loops",
            "Doom loops stopped, by tier, kind and recovery action.",
            ["tier", "kind", "action"],
            registry=r,
        )
        self.predicted_seconds = Histogram(
            "gatekeeper_predicted_seconds",
            "Predicted latency of the chosen tier.",
            ["tier"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.budget_misses = Counter(
            "gatekeeper_budget_misses",
            "Answers later than their latency budget.",
            ["tier"],
            registry=r,
        )
        self.routes = Counter(
            "gatekeeper_routes",
            "Routing outcomes (fits, pinned, routed_down, shrunk, infeasible, overloaded).",
            ["tier", "kind"],
            registry=r,
        )
        self.escalations = Counter(
            "gatekeeper_escalations",
            "Low-confidence answers re-asked on a stronger tier.",
            ["from_tier", "to_tier"],
            registry=r,
        )
        self.stage_seconds = Histogram(
            "gatekeeper_stage_seconds",
            "Time per pipeline stage.",
            ["tier", "stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "gatekeeper_tokens",
            "Tokens processed, by tier and kind (prompt, completion).",
            ["tier", "kind"],
            registry=r,
        )
        self.model_loaded = Gauge(
            "gatekeeper_model_loaded",
            "1 when the tier's model is loaded, else 0.",
            ["tier", "model"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "gatekeeper_queue_depth",
            "Requests waiting for or running on a tier.",
            ["tier"],
            registry=r,
        )
        self.engine_concurrency = Histogram(
            "gatekeeper_engine_concurrency",
            "Requests in flight on a remote engine replica when each request was sent, that "
            "one included (1 on a serial tier).",
            ["tier"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.replica_up = Gauge(
            "gatekeeper_replica_up",
            "1 while a remote tier's engine replica takes requests, 0 while it is ejected.",
            ["tier", "replica"],
            registry=r,
        )
        self.replica_events = Counter(
            "gatekeeper_replica_events",
            "Remote engine replicas ejected (failed, stalled, health), readmitted, or busy "
            "(answered 429/503).",
            ["tier", "replica", "event"],
            registry=r,
        )
        self.budget_used = Histogram(
            "gatekeeper_budget_used_ratio",
            "Answer time over the request's latency budget (above 1: a miss).",
            ["tier"],
            buckets=(0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.25, 1.5, 2.0, 4.0),
            registry=r,
        )
        self.http_errors = Counter(
            "gatekeeper_http_errors",
            "Error responses, by status code and error code.",
            ["status", "code"],
            registry=r,
        )
