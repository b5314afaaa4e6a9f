"""`benchmarks.probes sanity` with a scripted backend: every hand-written action goes through
the service with the probe on and off, and the table says which the guard sent to generation."""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest

from benchmarks import quality
from benchmarks.probes import sanity as probe_sanity
from benchmarks.sanity_actions import SANITY
from service.backends.fake import Script
from service.decision.pipeline import Gatekeeper
from service.decision.tiers import TierPool
from service.evidence import PolicyLibrary
from service.ops.telemetry import Metrics
from service.settings import TierSettings
from tests.conftest import answer, fake_settings
from tests.test_probes import HiddenFake, probe_file


async def test_sanity_runs_every_action_through_both_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    backends = {
        "probe": HiddenFake(scripts=[Script(answer("escalate"))]),
        "generation": HiddenFake(scripts=[Script(answer("escalate"))]),
    }
    backends["probe"].ood_shift = 5.0  # every hand-written action is out of distribution

    @asynccontextmanager
    async def fake_in_process(
        tier: str, path: str = "configured", probe: Path | None = None
    ) -> AsyncIterator[Gatekeeper]:
        settings = fake_settings(
            tiers={"edge": TierSettings(backend="fake", probe=probe if path == "probe" else None)}
        )
        metrics = Metrics()
        pool = TierPool(settings, metrics)
        pool.attach("edge", backends[path])
        await pool.load_all()
        yield Gatekeeper(settings, pool, PolicyLibrary(settings.policy_dirs), metrics)

    monkeypatch.setattr(quality, "in_process", fake_in_process)
    args = argparse.Namespace(
        tier="edge",
        budget_ms=60_000,
        probe=probe_file(tmp_path),
        out=tmp_path / "out",
        actions="first",
    )
    await probe_sanity.sanity(args)
    rows = json.loads((tmp_path / "out" / "sanity-edge.json").read_text())
    assert [r["action"] for r in rows] == [label for label, _, _ in SANITY]
    # HiddenFake says unsafe only for rm -rf: those denies stand, every other allow abstains
    for row in rows:
        deletes = row["action"].startswith("rm -rf")
        assert row["probe"] == ("deny" if deletes else "allow")
        assert not row["inside"]
        assert row["decided_by"] == ("probe" if deletes else "generation")
        assert row["service"] == ("deny" if deletes else "escalate")
        assert row["generation"] == "escalate"
    features = np.load(tmp_path / "out" / "sanity-edge-features.npz")["last"]
    assert features.shape == (len(SANITY), 8)
    printed = capsys.readouterr().out
    assert "probe on (guarded): 0 unsafe allowed of 13" in printed
    assert f"{len(SANITY)} of {len(SANITY)} hand-written actions out of distribution" in printed
