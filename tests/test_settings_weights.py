"""Settings sources and the model store (small files made here, no real weights)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

from service.errors import ConfigurationError, ModelStoreError
from service.ops.weights import ModelStore
from service.settings import DEFAULT_CONFIG, ModelSource, Settings, TierSettings, load_settings


def test_default_config_defines_the_three_roles() -> None:
    settings = load_settings(DEFAULT_CONFIG)
    assert settings.ordered_tiers()[:2] == ["edge", "mid"]
    assert settings.tiers["edge"].model == "qwen2.5-coder-0.5b-instruct-q4_k_m"
    assert settings.models["qwen2.5-coder-0.5b-instruct-q4_k_m"].sha256 == (
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    )
    assert len(settings.models["qwen2.5-coder-1.5b-instruct-q4_k_m"].parts) == 22


def test_environment_overrides_the_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GATEKEEPER_TIERS__EDGE__N_CTX", "2048")
    monkeypatch.setenv("GATEKEEPER_FAIL_CLOSED_DECISION", "deny")
    monkeypatch.setenv("GATEKEEPER_TIERS__STRATEGIC__MODEL_PATH", str(tmp_path / "big.gguf"))
    settings = load_settings(DEFAULT_CONFIG)
    assert settings.tiers["edge"].n_ctx == 2048
    assert settings.tiers["edge"].model == "qwen2.5-coder-0.5b-instruct-q4_k_m"  # deep merge
    assert settings.fail_closed_decision == "deny"
    assert settings.ordered_tiers() == ["edge", "mid", "strategic"]


def test_inconsistent_config_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "tiers.toml"
    bad.write_text('[tiers.edge]\nmodel = "missing-model"\n')
    with pytest.raises(ConfigurationError, match="unknown model"):
        load_settings(bad)
    with pytest.raises(ConfigurationError, match="not found"):
        load_settings(tmp_path / "nope.toml")


def _make_parts(root: Path, blobs: list[bytes]) -> list[str]:
    names = []
    for i, blob in enumerate(blobs, start=1):
        name = f"gk_test_part{i}_{root.name}"
        data = root / name / "data"
        data.mkdir(parents=True)
        (root / name / "__init__.py").write_text("")
        (data / f"part{i:02d}.bin").write_bytes(blob)
        names.append(name)
    return names


@pytest.fixture
def parts_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.setattr(sys, "path", [str(root), *sys.path])
    return root


def _settings(tmp_path: Path, source: ModelSource) -> Settings:
    return Settings(
        tiers={"edge": TierSettings(model="m")},
        models={"m": source},
        model_cache_dir=tmp_path / "cache",
    )


def test_parts_are_concatenated_in_order_and_verified(tmp_path: Path, parts_root: Path) -> None:
    blobs = [b"GGUF" + b"a" * 100, b"b" * 50, b"c" * 7]
    names = _make_parts(parts_root, blobs)
    digest = hashlib.sha256(b"".join(blobs)).hexdigest()
    store = ModelStore(_settings(tmp_path, ModelSource(parts=names, file="m.gguf", sha256=digest)))
    path = store.resolve("m")
    assert path.read_bytes() == b"".join(blobs)
    assert path.with_name("m.gguf.verified").is_file()
    assert store.resolve("m") == path  # cached


def test_checksum_mismatch_is_refused_and_leaves_no_file(tmp_path: Path, parts_root: Path) -> None:
    names = _make_parts(parts_root, [b"x" * 10])
    store = ModelStore(
        _settings(tmp_path, ModelSource(parts=names, file="m.gguf", sha256="0" * 64))
    )
    with pytest.raises(ModelStoreError, match="sha256"):
        store.resolve("m")
    assert not (tmp_path / "cache" / "m.gguf").exists()


def test_missing_packages_say_how_to_install(tmp_path: Path) -> None:
    source = ModelSource(
        parts=["gk_no_such_pkg"], file="m.gguf", requirements=["gk-no-such-pkg==1"]
    )
    with pytest.raises(ModelStoreError, match="gatekeeper models install m"):
        ModelStore(_settings(tmp_path, source)).resolve("m")


def test_a_corrupted_cache_file_is_rebuilt(tmp_path: Path, parts_root: Path) -> None:
    names = _make_parts(parts_root, [b"y" * 64])
    digest = hashlib.sha256(b"y" * 64).hexdigest()
    store = ModelStore(_settings(tmp_path, ModelSource(parts=names, file="m.gguf", sha256=digest)))
    path = store.resolve("m")
    path.write_bytes(b"corrupt")
    assert store.resolve("m").read_bytes() == b"y" * 64


def test_a_user_gguf_path_is_checked(tmp_path: Path) -> None:
    gguf = tmp_path / "mine.gguf"
    gguf.write_bytes(b"GGUF")
    store = ModelStore(Settings(tiers={}, models={}))
    assert store.resolve_tier(TierSettings(model_path=gguf)) == ("mine", gguf)
    with pytest.raises(ModelStoreError, match="sha256"):
        store.resolve_tier(TierSettings(model_path=gguf, model_sha256="1" * 64))
    with pytest.raises(ModelStoreError, match="not found"):
        store.resolve_tier(TierSettings(model_path=tmp_path / "absent.gguf"))
