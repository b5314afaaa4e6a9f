"""Contract fuzzing: schemathesis cases from openapi.yaml against the live app (create_app with
scripted fake tiers, in-process over ASGI), every operation, schema-valid and schema-breaking
bodies, each response run through schemathesis's checks (no 5xx, status code and body conform
to the schema, content type, headers).

    .venv/bin/python -m benchmarks.fuzz --max-examples 500

It prints, per operation and generation mode, the cases run and the failures by check. The
test suite (tests/test_fuzz.py) runs the same loop with a small budget."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.core.failures import AcceptedNegativeData, FailureGroup
from schemathesis.core.result import Err
from schemathesis.generation.modes import GenerationMode
from schemathesis.openapi.checks import RejectedPositiveData

from service.app import create_app
from service.backends.fake import FakeBackend, Script
from service.evidence import DEFAULT_PACK
from service.settings import AuditSettings, AuthSettings, Settings, TierSettings

ROOT = Path(__file__).resolve().parents[1]
OPENAPI = ROOT / "openapi.yaml"
_ANSWERS = (  # generated text after the response prefix: valid, unsure, and broken outputs
    Script(
        'deny", "evidence": [], "history": [], "rationale": "fuzz"}', choice_probs={"deny": 0.9}
    ),
    Script(
        'allow", "evidence": [], "history": [], "rationale": "fuzz"}', choice_probs={"allow": 0.5}
    ),
    Script('allow", "evidence": ['),
    Script(error="engine fault"),
)
# Keys are configured, as in production, so that schemathesis's auth checks (a wrong or missing
# key must get 401) have something to check; the fuzzer's own calls carry the right one.
API_KEY = "fuzz-key-0123456789"
METRICS_KEY = "fuzz-metrics-key-0123"
AUTH_HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def fuzz_app() -> FastAPI:
    """The app with fake tiers that never run out of scripted answers."""
    config = Settings(
        tiers={"edge": TierSettings(backend="fake"), "mid": TierSettings(backend="fake")},
        models={},
        default_tier="edge",
        log_format="text",
        warmup=False,
        audit=AuditSettings(enabled=False),
        auth=AuthSettings(api_keys={"fuzz": _sha(API_KEY)}, metrics_key_sha256=_sha(METRICS_KEY)),
    )
    backends = {
        name: FakeBackend(f"{name}-model", scripts=list(_ANSWERS) * 100_000)
        for name in ("edge", "mid")
    }
    return create_app(config, backends)


@dataclass
class FuzzReport:
    cases: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)  # "operation: check title"
    examples: dict[str, str] = field(default_factory=dict)  # one reproduction per failure


# Tier and policy names are the server's configuration, not part of the schema: a well-formed
# unknown name is refused with the documented 400, which schemathesis's positive-data check
# would otherwise count as a rejected valid request. And a body over max_body_bytes is refused
# with the documented 413 before it is parsed, which its negative-data check does not list.
# Unique evidence ids are a rule JSON Schema cannot state (uniqueItems compares whole items).
_CONFIGURED_NAMES = {"unknown_tier", "unknown_policy"}
_UNSTATABLE = "duplicate evidence id"


def _expected(failure: BaseException, response: Any) -> bool:
    if isinstance(failure, AcceptedNegativeData) and response.status_code == 413:
        return True
    if not isinstance(failure, RejectedPositiveData):
        return False
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    if response.status_code == 422:
        return _UNSTATABLE in str(error.get("message"))
    return response.status_code == 400 and error.get("code") in _CONFIGURED_NAMES


def _configured_names(case: Any) -> Any:
    """Most schema-valid bodies name a configured tier and policy (or none), so that they
    reach the pipeline rather than stop at the 400 for an unknown name; a third keep theirs."""
    body = case.body
    if isinstance(body, dict):
        for name, known in (("tier", ("edge", "mid")), ("policy", (DEFAULT_PACK,))):
            value = body.get(name)
            if isinstance(value, str):
                pick = len(value) % 3
                if pick < 2:
                    body[name] = known[pick % len(known)]
    return case


def _failures(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [f for e in exc.exceptions for f in _failures(e)]
    return [exc]


def run_fuzz(
    max_examples: int, *, modes: tuple[GenerationMode, ...] = tuple(GenerationMode), seed: int = 0
) -> FuzzReport:
    """Run every operation of openapi.yaml against a fresh app; never raises on a failed check."""
    schema = schemathesis.openapi.from_path(OPENAPI)
    schema.app = fuzz_app()
    report = FuzzReport()
    for result in schema.get_all_operations():
        if isinstance(result, Err):  # openapi.yaml describes an operation it cannot parse
            raise result.err()
        operation = result.ok()
        for mode in modes:
            strategy = operation.as_strategy(generation_mode=mode)
            if mode == GenerationMode.POSITIVE:
                strategy = strategy.map(_configured_names)

            @settings(
                max_examples=max_examples,
                deadline=None,
                database=None,
                derandomize=seed == 0,
                suppress_health_check=list(HealthCheck),
                phases=(Phase.generate,),  # checks never raise: nothing to shrink
            )
            @given(case=strategy)
            def one(case: Any) -> None:
                key = f"{case.operation.label} [{case.meta.generation.mode.value if case.meta else '?'}]"

                report.cases[key] += 1
                headers = {"Authorization": f"Bearer {METRICS_KEY}"}
                if case.operation.path != "/metrics":
                    headers = AUTH_HEADERS
                try:
                    response = case.call(headers=headers)
                except Exception as exc:  # the app raised through the ASGI client: a 500
                    name = f"{key}: unhandled {type(exc).__name__}"
                    report.failures[name] += 1
                    report.examples.setdefault(name, f"{exc!r}\n{case.as_curl_command()}")
                    return
                report.statuses[f"{key} {response.status_code}"] += 1
                try:
                    case.validate_response(response, headers=headers)
                except (Exception, FailureGroup) as exc:  # a failed check is a finding
                    for failure in _failures(exc):
                        if _expected(failure, response):
                            continue
                        name = f"{key}: {getattr(failure, 'title', type(failure).__name__)}"
                        report.failures[name] += 1
                        report.examples.setdefault(name, str(exc)[:2000])

            try:
                one()
            except Unsatisfiable:  # no parameters and no body: no schema-breaking input
                report.cases[f"{operation.label} [{mode.value}]"] += 0
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--max-examples", type=int, default=200, help="cases per operation and mode"
    )
    parser.add_argument("--seed", type=int, default=0, help="0: derandomized (repeatable)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.CRITICAL, force=True)  # fail-closed answers log by design
    started = time.monotonic()
    report = run_fuzz(args.max_examples, seed=args.seed)
    seconds = time.monotonic() - started
    print(f"{sum(report.cases.values())} cases in {seconds:.1f} s")
    for key, n in sorted(report.cases.items()):
        print(f"  {n:>6}  {key}")
    print("status codes:")
    for key, n in sorted(report.statuses.items()):
        print(f"  {n:>6}  {key}")
    print(f"failures: {sum(report.failures.values())}")
    for key, n in report.failures.most_common():
        print(f"  {n:>6}  {key}\n{report.examples[key]}\n")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "seconds": round(seconds, 1),
                    "cases": report.cases,
                    "statuses": report.statuses,
                    "failures": report.failures,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
