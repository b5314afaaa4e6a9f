"""Find a tier's GGUF file: an explicit path, a file shipped in a pip package, or chunks shipped
in several pip packages that are concatenated into a cache file and checked by sha256."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from functools import lru_cache
from pathlib import Path

from service.errors import ModelMissingError, ModelStoreError
from service.settings import ModelSource, Settings, TierSettings

logger = logging.getLogger(__name__)

_CHUNK = 8 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


@lru_cache(maxsize=16)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


def model_sha256(path: Path, known: str | None = None) -> str:
    """The model file's sha256: the catalogue's (already verified) or computed once."""
    if known:
        return known
    stat = path.stat()
    return _file_sha256(str(path), stat.st_size, stat.st_mtime_ns)


def _package_dir(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _install_hint(name: str, source: ModelSource) -> str:
    if source.requirements:
        return f"install it with: gatekeeper models install {name}"
    return "see models/tiers.toml"


class ModelStore:
    """Resolves catalogue entries and tier settings to verified GGUF paths."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._cache_dir = settings.model_cache_dir

    def resolve_tier(self, tier: TierSettings) -> tuple[str, Path]:
        """Return (model name, GGUF path) for a tier, assembling and verifying as needed."""
        if tier.model_path is not None:
            path = tier.model_path.expanduser()
            if not path.is_file():
                raise ModelMissingError(f"model file not found: {path}")
            if tier.model_sha256 and sha256_file(path) != tier.model_sha256:
                raise ModelStoreError(f"sha256 mismatch for {path}")
            return path.stem, path
        if tier.model is None:
            raise ModelStoreError("tier names no model")
        return tier.model, self.resolve(tier.model)

    def source(self, name: str) -> ModelSource | None:
        return self._settings.models.get(name)

    def resolve(self, name: str) -> Path:
        source = self._settings.models.get(name)
        if source is None:
            raise ModelStoreError(f"unknown model {name!r}")
        if source.path is not None:
            if not source.path.is_file():
                raise ModelMissingError(f"model file not found: {source.path}")
            return self._verified(source.path, source)
        if source.package is not None:
            assert source.package_file is not None  # checked by ModelSource
            pkg = _package_dir(source.package)
            path = pkg / source.package_file if pkg else None
            if path is None or not path.is_file():
                raise ModelMissingError(
                    f"model {name!r} is not installed; {_install_hint(name, source)}"
                )
            return self._verified(path, source)
        return self._assemble(name, source)

    def _verified(self, path: Path, source: ModelSource) -> Path:
        if source.sha256 is None:
            return path
        stamp = path.with_name(path.name + ".verified")
        stat = path.stat()
        key = {"sha256": source.sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        try:
            if json.loads(stamp.read_text()) == key:
                return path
        except (OSError, ValueError):
            pass
        actual = sha256_file(path)
        if actual != source.sha256:
            raise ModelStoreError(
                f"sha256 mismatch for {path}: expected {source.sha256}, got {actual}"
            )
        try:
            stamp.write_text(json.dumps(key))
        except OSError:  # a read-only location: verify again next time
            logger.debug("cannot write %s", stamp)
        return path

    def _part_files(self, name: str, source: ModelSource) -> list[Path]:
        files: list[Path] = []
        missing: list[str] = []
        for package in source.parts:
            pkg = _package_dir(package)
            found = sorted((pkg / "data").glob(source.part_glob)) if pkg else []
            if not found:
                missing.append(package)
            files.extend(found)
        if missing:
            raise ModelMissingError(
                f"model {name!r} is not installed ({len(missing)} of {len(source.parts)} "
                f"packages missing, e.g. {missing[0]}); {_install_hint(name, source)}"
            )
        return files

    def _assemble(self, name: str, source: ModelSource) -> Path:
        assert source.file is not None  # checked by ModelSource
        target = self._cache_dir / source.file
        if target.is_file():
            try:
                return self._verified(target, source)
            except ModelStoreError:
                logger.warning("cached %s fails its checksum; assembling it again", target)
                target.unlink()
        parts = self._part_files(name, source)
        self._cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        digest = hashlib.sha256()
        logger.info("assembling %s from %d parts into %s", name, len(parts), target)
        try:
            with tmp.open("wb") as out:
                for part in parts:
                    with part.open("rb") as fh:
                        while block := fh.read(_CHUNK):
                            digest.update(block)
                            out.write(block)
            if source.sha256 and digest.hexdigest() != source.sha256:
                raise ModelStoreError(
                    f"assembled {name} has sha256 {digest.hexdigest()}, expected {source.sha256}"
                )
            tmp.replace(target)
        finally:
            tmp.unlink(missing_ok=True)
        return self._verified(target, source)
