"""Prompt rendering shared by the backends that tokenise locally (llama.cpp, MLX).

The chat template is rendered with numbered slots in place of the message contents; the
template's own text is then tokenised with special-token parsing on and each content with it
off, so agent text can never become control tokens."""

from __future__ import annotations

import re
from collections.abc import Callable

from service.backends.base import Prompt
from service.errors import BackendError

_SLOT = re.compile("\ue000(\\d+)\ue001")

Tokenize = Callable[[str], list[int]]


def slotted_messages(prompt: Prompt) -> list[dict[str, str]]:
    """The prompt's messages with each content replaced by its slot, for a chat template."""
    return [{"role": m.role, "content": f"\ue000{i}\ue001"} for i, m in enumerate(prompt.messages)]


def raw_completion(prompt: Prompt) -> str:
    """The rendering for a model without a chat template (never a guessed template)."""
    return (
        "".join(f"{m.role.upper()}:\n\ue000{i}\ue001\n\n" for i, m in enumerate(prompt.messages))
        + "ASSISTANT:\n"
    )


def tokenize_slotted(
    rendered: str, prompt: Prompt, *, template_text: Tokenize, content: Tokenize
) -> list[int]:
    """Tokens of `rendered` with its slots filled by the contents (tokenised as plain text),
    followed by the prompt's response prefix."""
    contents = [m.content.strip() for m in prompt.messages]
    tokens: list[int] = []
    pos = 0
    for match in _SLOT.finditer(rendered):
        glue = rendered[pos : match.start()]
        if glue:
            tokens += template_text(glue)
        text = contents[int(match.group(1))]
        if text:
            tokens += content(text)
        pos = match.end()
    tail = rendered[pos:]
    if tail:
        tokens += template_text(tail)
    if prompt.response_prefix:
        tokens += content(prompt.response_prefix)
    return tokens


def choice_table(choices: tuple[str, ...], content: Tokenize) -> dict[str, list[int]]:
    """For each choice word, the single tokens that can start it (its prefixes), the longest
    last: the first position's probability of a word is the sum over these."""
    table: dict[str, list[int]] = {}
    for word in choices:
        ids: list[int] = []
        for k in range(1, len(word) + 1):
            toks = content(word[:k])
            if len(toks) == 1 and toks[0] not in ids:
                ids.append(toks[0])
        table[word] = ids
    return table


def check_fits(prompt_tokens: int, max_tokens: int, n_ctx: int) -> None:
    if prompt_tokens + max_tokens > n_ctx:
        raise BackendError(
            f"prompt of {prompt_tokens} tokens + {max_tokens} does not fit n_ctx {n_ctx}"
        )
