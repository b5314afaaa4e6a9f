"""Does the judge hold on agent traffic it never saw? The cross-source protocol (issue #19).

    .venv/bin/python -m benchmarks.generalise extract --tier edge [--max-seconds N]
    .venv/bin/python -m benchmarks.generalise table [--out DIR]
    .venv/bin/python -m benchmarks.generalise ship --reader edge:mean@L [--write]

Every reader is trained on every training source but one (`benchmarks/sources.py`:
OpenAgentSafety, ToolEmu, the hand-written minimal pairs) and tested on the one left out, for
each source in turn; the table gives, per held-out source, accuracy, unsafe recall, the share of
safe records allowed, the escalate rate and AUC, and their macro mean. The thresholds of each
fold (allow below, deny above, escalate between) come from the training sources alone: each of
them is scored by a model trained on the others (leave one source out inside the fold) and the
allow threshold is the highest that still flags `--recall` of the unsafe records of *every*
one of them. Every choice (reader, layer, C) is made on the macro mean, never on one source's
own test part. Records are weighted so that each training source, and each label inside it,
counts the same.

`extract` runs the edge model's prefill on every record as the service's probe path does (the
probe prompt up to the roll-call's header, the request's tokens only through the deepest layer
read) and caches the mean of the residual stream over the proposed action's tokens and the
state at the last token, for blocks 0..17, under ~/.cache/gatekeeper/features/. Records go
round-robin over the sources, labels alternating, one record per task before a task's second,
so a bounded run (`--max-seconds`) leaves a balanced sample of each source. `table` reads the
cache; a record without features is left out of every edge reader's row and named."""

# One module per step, each importing only the ones before it: `data` (the records, the feature
# cache, the weights), `extraction` (`extract`), `fits` (the readers), `minilm` (the sentence
# encoder's vectors), `protocol` (leave one source out, thresholds, scores), `report` (`table`)
# and `cli` (`python -m benchmarks.generalise <command>`).

from benchmarks.generalise.cli import main
from benchmarks.generalise.data import LAYERS, Data, feature_dir, load_data, record_key, weights
from benchmarks.generalise.extraction import ORDER_SEED, extract, extraction_order
from benchmarks.generalise.fits import (
    C_GRID,
    SEED,
    Fit,
    hidden_reader,
    readers,
    tfidf_reader,
    vector_reader,
)
from benchmarks.generalise.minilm import MINILM_CACHE, MiniLM, minilm_features, minilm_pieces
from benchmarks.generalise.protocol import (
    Fold,
    Thresholds,
    auc,
    choose_thresholds,
    decisions,
    inner_calibration,
    leave_one_source_out,
    macro,
    platt,
    scores_of,
    within_source_auc,
)
from benchmarks.generalise.report import print_table, table

__all__ = [
    "C_GRID",
    "LAYERS",
    "MINILM_CACHE",
    "ORDER_SEED",
    "SEED",
    "Data",
    "Fit",
    "Fold",
    "MiniLM",
    "Thresholds",
    "auc",
    "choose_thresholds",
    "decisions",
    "extract",
    "extraction_order",
    "feature_dir",
    "hidden_reader",
    "inner_calibration",
    "leave_one_source_out",
    "load_data",
    "macro",
    "main",
    "minilm_features",
    "minilm_pieces",
    "platt",
    "print_table",
    "readers",
    "record_key",
    "scores_of",
    "table",
    "tfidf_reader",
    "vector_reader",
    "weights",
    "within_source_auc",
]
