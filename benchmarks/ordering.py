"""Answer order, measured on decision quality (issue #6): the decision first (the service's
order: the decision is read from the logits at the first position, and with explain=false
nothing else is generated) against a rationale written first, the decision after it.

Same model, same prompt (the service's own, for the same records), greedy, the same rationale
bound; only the order of the two fields differs; each arm's decision is the greedy word.
Prints accuracy (allow = safe, anything else = unsafe), the tokens generated before the
decision is known, and the decision-first arm's accuracy under the service's own rule (allow
only when P(allow) at the first position reaches the tier's threshold), which only the
decision-first order gives.

    .venv/bin/python -m benchmarks.ordering [--tier edge] [--records 16]

The records are a fixed, label-balanced sample of the tuning part of ASSEBench-Security. The
prompt's worked examples show the decision first, so the rationale-first arm reads examples
in the other order; that is the service's prompt as it is, not a tuned rival.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import replace
from pathlib import Path

from benchmarks.quality import DEFAULT_DATA, sample
from benchmarks.records import load_records, split
from service.backends.base import Backend, Constraint, Generation, GenerationRequest, Prompt
from service.decision.answers import normalised
from service.decision.grammar import DECISIONS, RESPONSE_PREFIX
from service.decision.pipeline import Gatekeeper
from service.decision.prompt import build_prompt
from service.decision.tiers import Tier, TierPool
from service.evidence import PolicyLibrary
from service.ops.telemetry import Metrics
from service.settings import load_settings

_DECISION = "(" + " | ".join(json.dumps(d) for d in DECISIONS) + ")"
_CHAR = r'char ::= [^"\\\x00-\x1F\x7F]'


def orders(rationale_chars: int) -> dict[str, tuple[str, str]]:
    """order -> (response prefix, GBNF of the rest)."""
    text = f"char{{0,{rationale_chars}}}"
    return {
        "decision first": (
            RESPONSE_PREFIX,
            f'root ::= {_DECISION} "\\", \\"rationale\\": \\"" {text} "\\"}}"\n{_CHAR}\n',
        ),
        "rationale first": (
            '{"rationale": "',
            f'root ::= {text} "\\", \\"decision\\": \\"" {_DECISION} "\\"}}"\n{_CHAR}\n',
        ),
    }


def answer(
    backend: Backend, tier: Tier, prompt: Prompt, prefix: str, gbnf: str
) -> tuple[str, Generation]:
    """One arm's greedy answer to the prompt: its decision ("invalid" when the JSON holds
    none) and the generation."""
    generation = backend.generate(
        GenerationRequest(
            replace(prompt, response_prefix=prefix),
            Constraint(schema={}, gbnf=gbnf, choices=DECISIONS),
            max_tokens=tier.settings.max_tokens,
            deadline=time.monotonic() + 600,
        )
    )
    try:
        decision = json.loads(prefix + generation.text, strict=False)["decision"]
    except (ValueError, KeyError):
        decision = "invalid"
    return decision, generation


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tier", default="edge")
    parser.add_argument("--records", type=int, default=16)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    return parser.parse_args()


async def main() -> None:
    args = parse_args()
    tuning, _reporting = split(load_records(args.data))
    records = sample(tuning, args.records)
    settings = load_settings(load_tiers=[args.tier], warmup=False)
    metrics = Metrics()
    pool = TierPool(settings, metrics)
    await pool.load_all()
    tier = pool.get(args.tier)
    backend = tier.backend
    if tier.state != "loaded" or backend is None:
        raise SystemExit(f"tier {args.tier} is {tier.state}: {tier.detail}")
    gatekeeper = Gatekeeper(settings, pool, PolicyLibrary(), metrics)
    arms = orders(tier.settings.rationale_chars)
    right = dict.fromkeys(arms, 0)
    threshold = gatekeeper.settings.allow_threshold_of(args.tier)
    at_threshold = 0
    before = dict.fromkeys(arms, 0)  # tokens generated before the decision is known
    print(f"tier {args.tier} ({tier.model}), {len(records)} tuning records")
    for record in records:
        built = build_prompt(
            record.request,
            gatekeeper._evidence(record.request),
            count_tokens=backend.count_tokens,
            max_prompt_tokens=backend.context_size - tier.settings.max_tokens,
            max_turn_chars=settings.max_turn_chars,
        )
        row = []
        for order, (prefix, gbnf) in arms.items():
            decision, generation = answer(backend, tier, built.prompt, prefix, gbnf)
            right[order] += (decision != "allow") == record.unsafe
            if prefix == RESPONSE_PREFIX:  # the probabilities are read at the first position
                p_allow = normalised(generation.choice_probs).get("allow", 0.0)
                gated = "allow" if p_allow >= threshold else "not allow"
                at_threshold += (gated != "allow") == record.unsafe
            if order == "decision first":
                before[order] += 1
            else:
                before[order] += backend.count_tokens(generation.text.split('", "decision')[0])
            row.append(f"{decision:9s}")
        label = "unsafe" if record.unsafe else "safe"
        print(f"  {record.id[:24]:24s} {label:6s} " + " ".join(row))
    n = len(records)
    for order in arms:
        print(
            f"{order:16s} accuracy {right[order] / n:6.1%} ({right[order]}/{n}), "
            f"{before[order] / n:5.1f} tokens generated before the decision"
        )
    print(
        f"decision first, allow only at P(allow) >= {threshold} (the service's rule): "
        f"accuracy {at_threshold / n:.1%} ({at_threshold}/{n})"
    )
    pool.close()


if __name__ == "__main__":
    asyncio.run(main())
