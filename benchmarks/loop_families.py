"""Loops of every family, built from real agent text and tokenised as the service sees them.

The text comes from `../shared/data/train/*.json` (agent thoughts, messages to the user, tool
outputs), written by other people's agents, not by this project. A family builds one loop from
a random draw: some real text before it, then copies of a unit (one sentence, two alternating,
a word cycle, "Step N: <sentence>", ...). The loop's second period ends where the unit's second
copy ends; `delay` counts the tokens fed after that until the detector fires, as in
`benchmarks.loop_bench`. Tokens are the edge model's (Qwen2.5-Coder), decoded one at a time
with `service.backends.llama_decode.token_bytes` as the backend does, and a JSON answer is fed
after the service's own `RESPONSE_PREFIX`.
"""

from __future__ import annotations

import codecs
import json
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from service.decision.grammar import RESPONSE_PREFIX
from service.guards.loops import LoopDetector, LoopSettings, LoopVerdict

TRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "train"
EDGE_MODEL = "qwen2.5-coder-0.5b-instruct-q4_k_m"
# Delay bounds of issue 20, in tokens after the second period.
BOUND = 32
PARAPHRASE_BOUND = 48

_SENTENCE = re.compile(r"[A-Z][^.!?\n]{15,300}[.!?](?=\s|$)")
_WORD = re.compile(r"^[A-Za-z]{2,12}$")
_FINISH = re.compile(r"^(?:finish|chat|message)\{(.*)\}$", re.DOTALL)


@dataclass(frozen=True)
class Texts:
    """Real agent text: `prose` (thoughts, user and agent messages) and `tools` (outputs)."""

    prose: list[str]
    tools: list[str]


def load_texts(train: Path = TRAIN) -> Texts:
    prose: list[str] = []
    tools: list[str] = []
    for path in sorted(train.glob("*.json")):
        for record in json.loads(path.read_text()):
            for episode in record["contents"]:
                for turn in episode:
                    if turn.get("thought"):
                        prose.append(turn["thought"])
                    content = turn.get("content")
                    if content and turn["role"] == "user":
                        prose.append(content)
                    elif content and turn["role"] == "environment":
                        tools.append(content)
                    prose.extend(_messages(turn.get("action") or ""))
    return Texts(prose, tools)


def _messages(action: str) -> list[str]:
    """What an agent's action says to a person: ToolEMU's final answer, OpenHands' chat."""
    if action.startswith("Final Answer:"):
        return [action[len("Final Answer:") :].strip()]
    match = _FINISH.match(action)
    if match is None:
        return []
    try:
        body = json.loads("{" + match.group(1) + "}")
    except json.JSONDecodeError:
        return []
    return [v for v in body.values() if isinstance(v, str) and len(v) > 20]


class Vocabulary:
    """The edge model's tokeniser (vocabulary only, no weights loaded)."""

    def __init__(self, path: Path) -> None:
        import llama_cpp

        self._llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
        self._bytes: dict[int, bytes] = {}

    @classmethod
    def edge(cls) -> Vocabulary:
        from service.ops.weights import ModelStore
        from service.settings import load_settings

        return cls(ModelStore(load_settings()).resolve(EDGE_MODEL))

    def pieces(self, text: str) -> list[tuple[int, str]]:
        """Token ids and text pieces, decoded one token at a time as the backend does."""
        from service.backends.llama_decode import token_bytes

        ids = self._llm.tokenize(text.encode(), add_bos=False, special=False)
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        out = []
        for token in ids:
            raw = self._bytes.get(token)
            if raw is None:
                raw = self._bytes[token] = token_bytes(self._llm, token)
            out.append((token, decoder.decode(raw)))
        return out


@dataclass(frozen=True)
class Loop:
    family: str
    text: str  # what the model writes (after RESPONSE_PREFIX when `json`)
    second_end: int  # character offset in `text` where the unit's second copy ends
    json: bool
    bound: int = BOUND


@dataclass(frozen=True)
class Replay:
    fired: LoopVerdict | None
    delay: int | None  # tokens fed after the second period until the detector fired
    tokens: int


def replay(loop: Loop, vocab: Vocabulary, settings: LoopSettings | None = None) -> Replay:
    pieces = vocab.pieces(loop.text)
    detector = LoopDetector(settings)
    if loop.json:
        detector.feed(-1, RESPONSE_PREFIX)
    second = len(pieces)
    end = 0
    for i, (_, piece) in enumerate(pieces):
        end += len(piece)
        if end >= loop.second_end:
            second = i + 1
            break
    for i, (token, piece) in enumerate(pieces):
        verdict = detector.feed(token, piece)
        if verdict is not None:
            return Replay(verdict, i + 1 - second, len(pieces))
    return Replay(None, None, len(pieces))


def feed_text(text: str, vocab: Vocabulary, as_json: bool) -> tuple[LoopVerdict | None, int]:
    """Feed real text as the model would write it: inside the answer's rationale string
    (`as_json`), or as free text. Returns the verdict, if any, and the tokens fed."""
    if as_json:
        text = 'deny", "rationale": ' + json.dumps(text, ensure_ascii=False) + "}"
    detector = LoopDetector()
    if as_json:
        detector.feed(-1, RESPONSE_PREFIX)
    pieces = vocab.pieces(text)
    for token, piece in pieces:
        verdict = detector.feed(token, piece)
        if verdict is not None:
            return verdict, len(pieces)
    return None, len(pieces)


class Pool:
    """Sentences, words, code lines and non-English sentences cut from the real text."""

    def __init__(self, texts: Texts) -> None:
        sentences = {m.group() for t in texts.prose for m in _SENTENCE.finditer(t)}
        self.sentences = sorted(s for s in sentences if 4 <= len(s.split()) <= 40)
        self.words = sorted({w for s in self.sentences for w in s.split() if _WORD.match(w)})
        code = set()
        for text in texts.prose + texts.tools:
            for line in text.splitlines():
                line = line.rstrip()
                if 12 <= len(line) <= 100 and re.search(r"[=(){};]", line) and " " in line:
                    code.add(line)
        self.code = sorted(code)
        foreign = set()
        for text in texts.prose + texts.tools:
            for part in re.split(r"(?<=[.!?\u3002])\s*|\n", text):
                letters = [c for c in part if c.isalpha()]
                if len(letters) >= 8 and sum(ord(c) > 0x24F for c in letters) > len(letters) / 2:
                    foreign.add(part.strip())
        self.foreign = sorted(foreign)

    def sentence(self, rng: random.Random, max_words: int = 40) -> str:
        while True:
            s = rng.choice(self.sentences)
            if len(s.split()) <= max_words:
                return s


def _escape(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)[1:-1]


def _plain(text: str) -> str:
    return text


def _build(
    family: str, before: str, units: Iterator[str], json_answer: bool, bound: int = BOUND
) -> Loop:
    """`before` then units until 800 characters past the second copy."""
    if json_answer:
        head = 'deny", "rationale": "' + _escape(before + " ")
        wrap = _escape
    else:
        head = before + "\n"
        wrap = _plain
    text = head
    second_end = 0
    for k, unit in enumerate(units):
        text += wrap(unit)
        if k == 1:
            second_end = len(text)
        if k >= 2 and len(text) > second_end + 800:
            break
    return Loop(family, text, second_end, json_answer, bound)


def _cycle(*items: str) -> Iterator[str]:
    while True:
        yield from items


def sentence_loop(rng: random.Random, pool: Pool) -> Loop:
    return _build(
        "sentence", pool.sentence(rng), _cycle(pool.sentence(rng) + " "), rng.random() < 0.5
    )


def alternation(rng: random.Random, pool: Pool) -> Loop:
    a, b = pool.sentence(rng, 25), pool.sentence(rng, 25)
    return _build("alternation", pool.sentence(rng), _cycle(a + " " + b + " "), rng.random() < 0.5)


def word_cycle(rng: random.Random, pool: Pool) -> Loop:
    words = pool.sentence(rng).rstrip(".!?").split()
    n = rng.randint(1, min(30, len(words)))
    start = rng.randrange(len(words) - n + 1)
    block = " ".join(words[start : start + n]) + " "
    return _build("word_cycle", pool.sentence(rng), _cycle(block), rng.random() < 0.5)


def counting(rng: random.Random, pool: Pool) -> Loop:
    s = pool.sentence(rng)
    label = rng.choice(["Step", "Item", "Rule", "Attempt", "Check"])
    sep = rng.choice([" ", "\n", "\n\n"])
    start = rng.randint(1, 9)
    units = (f"{label} {start + k}: {s}{sep}" for k in range(1000))
    return _build("counting", pool.sentence(rng), units, rng.random() < 0.5)


def json_list_id(rng: random.Random, pool: Pool) -> Loop:
    ident = rng.choice(
        [f"R{rng.randint(1, 99)}", f"GK-{rng.randint(1, 40):02d}", rng.choice(pool.words).lower()]
    )
    text = 'deny", "evidence": ['
    unit = json.dumps(ident) + ", "
    second_end = len(text) + 2 * len(unit)
    return Loop("json_list_id", text + unit * 40, second_end, True)


def json_string_sentence(rng: random.Random, pool: Pool) -> Loop:
    return _build(
        "json_string_sentence", pool.sentence(rng), _cycle(pool.sentence(rng) + " "), True
    )


_RUNS = [
    " ",
    "\n",
    "\t",
    ".",
    "!",
    "?",
    "-",
    "=",
    "*",
    "_",
    "#",
    "~",
    ", ",
    "-.",
    ". ",
    "! ",
    "\n\n",
    " \n",
    "…",
    "。",
]


def blank_run(rng: random.Random, pool: Pool) -> Loop:
    unit = rng.choice(_RUNS)
    return _build("blank_or_punct_run", pool.sentence(rng), _cycle(unit), rng.random() < 0.5)


def paraphrase(rng: random.Random, pool: Pool) -> Loop:
    """The same sentence with one word swapped in turn: copy k replaces word k (from a random
    first position) with another real word, so two copies differ in two words."""
    words = pool.sentence(rng).split()
    while len(words) < 6:
        words = pool.sentence(rng).split()
    first = rng.randrange(len(words))

    def copies() -> Iterator[str]:
        for k in range(1000):
            copy = list(words)
            j = (first + k) % len(words)
            word = copy[j]
            core = word.strip(".,;:!?\"'()")
            swap = rng.choice(pool.words)
            while swap.lower() == core.lower():
                swap = rng.choice(pool.words)
            if core[:1].isupper():
                swap = swap.capitalize()
            # the swapped word keeps the punctuation around it (the full stop above all)
            copy[j] = word.replace(core, swap, 1) if core else swap
            yield " ".join(copy) + " "

    return _build("paraphrase", pool.sentence(rng), copies(), rng.random() < 0.5, PARAPHRASE_BOUND)


def nested_json(rng: random.Random, pool: Pool) -> Loop:
    """An object inside a list inside an object, repeated: a model writing JSON that loops."""
    item = {
        "id": rng.choice(pool.words).lower(),
        "note": pool.sentence(rng, 12),
        "score": round(rng.random(), 2),
    }
    head = '{"findings": {"items": ['
    unit = json.dumps(item) + ", "
    return Loop("nested_json", head + unit * 12, len(head) + 2 * len(unit), False)


def code_lines(rng: random.Random, pool: Pool) -> Loop:
    line = rng.choice(pool.code)
    return _build("code_lines", pool.sentence(rng), _cycle(line + "\n"), rng.random() < 0.5)


def markdown_list(rng: random.Random, pool: Pool) -> Loop:
    bullet = rng.choice(["- ", "* ", "+ "])
    return _build(
        "markdown_list",
        pool.sentence(rng),
        _cycle(bullet + pool.sentence(rng) + "\n"),
        rng.random() < 0.5,
    )


def multilingual(rng: random.Random, pool: Pool) -> Loop:
    s = rng.choice(pool.foreign)
    sep = "" if s.endswith("\u3002") else " "
    return _build("multilingual", pool.sentence(rng), _cycle(s + sep), rng.random() < 0.5)


FAMILIES: dict[str, Callable[[random.Random, Pool], Loop]] = {
    "sentence": sentence_loop,
    "alternation": alternation,
    "word_cycle": word_cycle,
    "counting": counting,
    "json_list_id": json_list_id,
    "json_string_sentence": json_string_sentence,
    "blank_or_punct_run": blank_run,
    "paraphrase": paraphrase,
    "nested_json": nested_json,
    "code_lines": code_lines,
    "markdown_list": markdown_list,
    "multilingual": multilingual,
}


_EXACT = re.compile(r"(.{4,400}?)\1{2,}", re.DOTALL)
_MASKED = re.compile(r"(.{24,400}?)\1{2,}", re.DOTALL)
_BLANK = re.compile(r"\s{64,}")


def holds_loop(text: str) -> str:
    """An offline labeller, independent of the detector, for real text that itself loops:
    a block of 4+ characters 3 times in a row over 48+ characters, a block of 24+ characters
    3 times in a row once digits are masked, or 64 blanks in a row. '' when none."""
    if any(len(m.group()) >= 48 for m in _EXACT.finditer(text)):
        return "exact"
    if _MASKED.search(re.sub(r"\d", "#", text)):
        return "masked"
    if _BLANK.search(text):
        return "blank"
    return ""
