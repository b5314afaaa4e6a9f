"""Streaming doom-loop detection for token-by-token LLM output.

Small models under a JSON grammar fall into loops: the same sentence or JSON value again and
again, periodic token cycles, endless whitespace or punctuation. `LoopDetector` is fed every
token as it is decoded and reports the first loop it sees, so the caller can stop generation.
All state is incremental and bounded: a token costs O(max_period) plus O(1) per character.

`settings` holds the thresholds and the verdict, `detector` the detector with its token and
character detectors, `text` the JSON lexer and the sentence, value and paraphrase detectors.
"""

from service.guards.loops.detector import LoopDetector
from service.guards.loops.settings import LoopKind, LoopSettings, LoopVerdict

__all__ = ["LoopDetector", "LoopKind", "LoopSettings", "LoopVerdict"]
