"""Collect the token streams the loop detector is measured on: real outputs of real models.

- `loops`: Gemma-3-270m (base) and SmolLM2-135M at greedy decoding, on prompts that make small
  models loop: base-model completion of rationales and lists, and our JSON answer grammar with
  a long rationale bound, on agent records from ../shared/data.
- `normal`: Qwen2.5-Coder-0.5B and 1.5B answering agent records through the service's own
  prompt and grammar, as in production (history cut to the last turns to keep it fast).

Each output is saved with its token ids and text pieces, one JSON line per output, for
benchmarks/loop_bench.py to label and replay.

    .venv/bin/python -m benchmarks.loop_corpus loops  --out benchmarks/data/loops.jsonl
    .venv/bin/python -m benchmarks.loop_corpus normal --out benchmarks/data/normal.jsonl --per-model 200,100
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from benchmarks.records import load_records, split
from service.backends.base import ChatMessage, Constraint, GenerationRequest, Prompt
from service.backends.llama_cpp import LlamaCppBackend
from service.decision.grammar import RESPONSE_PREFIX, AnswerShape, build_constraint
from service.decision.prompt import build_prompt
from service.evidence import PolicyLibrary
from service.ops.weights import ModelStore
from service.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "assebench" / "AgentJudge-security.json"

LOOP_MODELS = ("gemma-3-270m-q4_k_m", "smollm2-135m-instruct-q4_1")
NORMAL_MODELS = ("qwen2.5-coder-0.5b-instruct-q4_k_m", "qwen2.5-coder-1.5b-instruct-q4_k_m")

COMPLETION_PROMPTS = [
    "The policy is not clear. The agent",
    "Rationale: the agent should not do this because",
    "Reasons why deleting the files is unsafe:\n1.",
    "The agent's action violates the policy because the policy says that",
    '{"decision": "deny", "reason": "',
    "Q: Is it safe to send the password by email?\nA:",
    "List of rules:\n- Do not",
    "The user asked the agent to transfer money. The agent",
    "Summary of the conversation: The user",
    "Step 1: Check the request. Step 2:",
    "I cannot help with that. I cannot",
    "The evidence shows that the evidence",
]


def _free(backend: LlamaCppBackend, text: str, max_tokens: int) -> tuple[list[int], list[str]]:
    """Greedy completion without a grammar (raw text, or the model's chat template)."""
    request = GenerationRequest(
        prompt=Prompt((ChatMessage("user", text),)),
        constraint=Constraint(schema={}, gbnf=""),  # no grammar: free text
        max_tokens=max_tokens,
        deadline=time.monotonic() + 600,
    )
    return _run(backend, request)


def _run(backend: LlamaCppBackend, request: GenerationRequest) -> tuple[list[int], list[str]]:
    ids: list[int] = []
    pieces: list[str] = []

    def hook(token: int, piece: str) -> bool:
        ids.append(token)
        pieces.append(piece)
        return False

    backend.generate(request, hook)
    return ids, pieces


def _record_prompt(
    record_request: Any, backend: LlamaCppBackend, rationale_chars: int, keep_turns: int
) -> GenerationRequest:
    request = record_request.model_copy(update={"history": record_request.history[-keep_turns:]})
    pack = list(PolicyLibrary().get("default").items)
    built = build_prompt(
        request,
        pack,
        count_tokens=backend.count_tokens,
        max_prompt_tokens=backend.context_size - 400,
        max_turn_chars=600,
    )
    shape = AnswerShape(
        tuple(i.id for i in built.evidence), built.history_ids, 4, rationale_chars, 240
    )
    return GenerationRequest(
        built.prompt, build_constraint(shape), max_tokens=400, deadline=time.monotonic() + 600
    )


def _backend(name: str, chat_template: str = "auto", n_ctx: int = 2048) -> LlamaCppBackend:
    path = ModelStore(load_settings()).resolve(name)
    backend = LlamaCppBackend(name, path, n_ctx=n_ctx, chat_template=chat_template)
    backend.load()
    return backend


def collect_loops(out: Path, records_per_model: int) -> None:
    _, reporting = split(load_records(DATA))
    with out.open("w") as fh:
        for name in LOOP_MODELS:
            for template in ("none", "auto"):
                backend = _backend(name, template)
                if template == "auto" and backend._formatter is None:
                    backend.close()  # a base model without a template: same as "none"
                    continue
                for i, text in enumerate(COMPLETION_PROMPTS):
                    ids, pieces = _free(backend, text, 256)
                    fh.write(
                        json.dumps(
                            {
                                "source": f"{name}/{template}/free/{i}",
                                "model": name,
                                "ids": ids,
                                "pieces": pieces,
                            }
                        )
                        + "\n"
                    )
                    fh.flush()
                    print(f"{name} {template} free {i}: {''.join(pieces)[:100]!r}", flush=True)
                backend.close()
            backend = _backend(name, "auto")
            for record in reporting[:records_per_model]:
                request = _record_prompt(
                    record.request, backend, rationale_chars=1200, keep_turns=2
                )
                ids, pieces = _run(backend, request)
                fh.write(
                    json.dumps(
                        {
                            "source": f"{name}/json/{record.id}",
                            "model": name,
                            "ids": ids,
                            "pieces": pieces,
                        }
                    )
                    + "\n"
                )
                fh.flush()
                print(f"{name} json {record.id}: {''.join(pieces)[:100]!r}", flush=True)
            backend.close()


def collect_normal(out: Path, per_model: list[int]) -> None:
    tuning, _ = split(load_records(DATA))
    with out.open("w") as fh:
        for name, count in zip(NORMAL_MODELS, per_model, strict=True):
            backend = _backend(name, "auto", n_ctx=2048)
            started = time.monotonic()
            for n, record in enumerate(tuning[:count], start=1):
                request = _record_prompt(record.request, backend, rationale_chars=240, keep_turns=2)
                ids, pieces = _run(backend, request)
                text = RESPONSE_PREFIX + "".join(pieces)
                fh.write(
                    json.dumps(
                        {
                            "source": f"{name}/json/{record.id}",
                            "model": name,
                            "ids": ids,
                            "pieces": pieces,
                        }
                    )
                    + "\n"
                )
                fh.flush()
                print(
                    f"{name} {n}/{count} {time.monotonic() - started:.0f}s: {text[:90]!r}",
                    flush=True,
                )
            backend.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("corpus", choices=["loops", "normal"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--records", type=int, default=15, help="agent records per looping model")
    parser.add_argument("--per-model", default="200,100", help="normal outputs per Qwen model")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.corpus == "loops":
        collect_loops(args.out, args.records)
    else:
        collect_normal(args.out, [int(n) for n in args.per_model.split(",")])


if __name__ == "__main__":
    main()
