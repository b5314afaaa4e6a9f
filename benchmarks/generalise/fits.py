"""Readers: each turns records into scores, trained on some and applied to others. A `Fit`
takes the training records and returns the scorer of any others."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from benchmarks.generalise.data import Data, weights

SEED = 0
C_GRID = (0.001, 0.01, 0.1)

Fit = Callable[[Data], Callable[[Data], np.ndarray]]


def hidden_reader(read: str, layers: tuple[int, ...], c: float) -> Fit:
    """Standardise, logistic regression on the concatenated layers of one read."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    def features(data: Data) -> np.ndarray:
        x = data.edge[read][:, list(layers), :]
        return x.reshape(len(x), -1)

    def fit(train: Data) -> Callable[[Data], np.ndarray]:
        x = features(train)
        scaler = StandardScaler().fit(x)
        clf = LogisticRegression(C=c, max_iter=3000, random_state=SEED)
        clf.fit(scaler.transform(x), train.y, sample_weight=weights(train))
        return lambda test: clf.decision_function(scaler.transform(features(test)))

    return fit


def tfidf_reader(c: float) -> Fit:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    def fit(train: Data) -> Callable[[Data], np.ndarray]:
        vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True, max_features=50_000)
        x = vec.fit_transform(train.texts)
        clf = LogisticRegression(C=c, max_iter=3000, random_state=SEED)
        clf.fit(x, train.y, sample_weight=weights(train))
        return lambda test: clf.decision_function(vec.transform(test.texts))

    return fit


def vector_reader(key: str, c: float) -> Fit:
    """Standardise, logistic regression on a precomputed vector per record (`data.vectors`)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    def fit(train: Data) -> Callable[[Data], np.ndarray]:
        x = train.vectors[key]
        scaler = StandardScaler().fit(x)
        clf = LogisticRegression(C=c, max_iter=3000, random_state=SEED)
        clf.fit(scaler.transform(x), train.y, sample_weight=weights(train))
        return lambda test: clf.decision_function(scaler.transform(test.vectors[key]))

    return fit


def readers(edge: bool) -> Iterator[tuple[str, Fit]]:
    for c in (1.0, 10.0):
        yield f"tfidf C={c:g}", tfidf_reader(c)
    for c in C_GRID:
        yield f"minilm C={c:g}", vector_reader("minilm", c)
    if not edge:
        return
    for read in ("mean", "last"):
        for layer in (3, 6, 9, 12, 15, 17):
            for c in C_GRID:
                yield f"edge:{read}@{layer} C={c:g}", hidden_reader(read, (layer,), c)
    for layers in ((6, 9, 12, 15), (9, 12, 15, 17)):
        for c in C_GRID:
            name = "+".join(map(str, layers))
            yield f"edge:mean@{name} C={c:g}", hidden_reader("mean", layers, c)
