"""The soak benchmark, briefly, on the real server and the small real model: an open-loop
Poisson stream above the sustainable rate gets answers or clean rejections, no 5xx, no allow
from a degraded answer, and the server's memory is read over time."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from benchmarks import soak

pytestmark = [
    pytest.mark.model,
    pytest.mark.skipif(
        not soak.RECORDS.is_file(), reason=f"{soak.RECORDS} is not here (../shared/data)"
    ),
]


def test_a_short_soak_over_the_sustainable_rate_stays_clean(tmp_path: Path) -> None:
    args = argparse.Namespace(
        minutes=0.5,
        warmup_min=0.1,
        rate_factor=3.0,
        calibrate=2,
        budget_ms=20_000,
        sample_s=1.0,
        seed=1,
        model="smollm2-135m-instruct-q4_1",
        out=tmp_path / "soak.png",
    )
    summary = soak.asyncio.run(soak.soak(args))
    assert summary["requests"] >= 5
    assert summary["server_errors"] == 0
    assert summary["allow_degraded"] == 0
    assert summary["answered"] + summary["rejected"] == summary["requests"]
    assert summary["answered"] > 0
    assert summary["rss_growth"] == summary["rss_growth"]  # memory was sampled (not NaN)
    assert set(summary["rss_split_mb"]) == {"anon", "file"}
    assert (tmp_path / "soak.png").stat().st_size > 10_000
