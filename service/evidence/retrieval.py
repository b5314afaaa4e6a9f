"""Rank a policy pack's rules against one request with BM25 (bm25s: sparse, numpy/scipy only,
no model weights, microseconds per query on a pack of hundreds of rules).

A rule's document is its text, its triple and its retrieval keywords; the query is the
proposed action, the user's goal and the most recent history turns, where the risk shows."""

from __future__ import annotations

from collections.abc import Sequence

import bm25s
import numpy as np
import Stemmer

from service.schemas import EvaluateRequest, EvidenceItem, RuleEvidence, TextAction

# The newest turns carry most of the signal (the tool output the action reacts to).
_QUERY_TURNS = 6
_QUERY_CHARS = 6000


def query_text(request: EvaluateRequest) -> str:
    action = request.action
    acted = action.text if isinstance(action, TextAction) else f"{action.tool} {action.arguments}"
    turns = [
        " ".join(filter(None, (t.content, t.thought, t.action)))
        for t in request.history[-_QUERY_TURNS:]
    ]
    # the action counts twice: it is what is being judged
    return " ".join([acted, acted, request.goal, *turns])[:_QUERY_CHARS]


def item_text(item: EvidenceItem, keywords: str = "") -> str:
    if isinstance(item, RuleEvidence):
        return f"{item.text} {keywords}"
    return f"{item.subject} {item.predicate.replace('_', ' ')} {item.object} {keywords}"


class PackRetriever:
    """BM25 over one pack's items; `rank` returns them most relevant first (ties keep the
    pack's order, so a query that matches nothing gets the pack as written)."""

    def __init__(self, items: Sequence[EvidenceItem], keywords: Sequence[str] = ()) -> None:
        self.items = tuple(items)
        words = list(keywords) + [""] * (len(self.items) - len(keywords))
        self._tokenizer = bm25s.tokenization.Tokenizer(
            stopwords="en", stemmer=Stemmer.Stemmer("english")
        )
        corpus = [item_text(item, kw) for item, kw in zip(self.items, words, strict=True)]
        ids = self._tokenizer.tokenize(
            corpus, return_as="ids", update_vocab=True, show_progress=False
        )
        self._bm25 = bm25s.BM25()
        self._bm25.index(ids, show_progress=False)

    def scores(self, query: str) -> np.ndarray:
        tokens = self._tokenizer.tokenize(
            [query], return_as="ids", update_vocab=False, show_progress=False
        )[0]
        if not tokens:
            return np.zeros(len(self.items))
        # each distinct term once: a long trace repeats common words ("email", "file") so
        # often that they would outweigh the rare terms that tell the rules apart
        distinct = list(dict.fromkeys(tokens))
        return np.asarray(self._bm25.get_scores(distinct), dtype=float)

    def rank(self, query: str, k: int | None = None) -> list[EvidenceItem]:
        order = np.argsort(-self.scores(query), kind="stable")
        return [self.items[i] for i in order[: k if k is not None else len(order)]]
