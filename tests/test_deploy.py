"""The deploy/ files: alert rules and scrape config pass promtool (and their unit tests), the
dashboard and the rules use only metrics that service/ops/telemetry.py defines, and the manifests
hold what operators rely on (probes, resources, a non-root image with a HEALTHCHECK)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.ops.telemetry import Metrics

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian: apt-get install prometheus)"
)
_SUFFIXES = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}


def _exported_names() -> set[str]:
    names = set()
    for family in Metrics().registry.collect():
        names |= {family.name + suffix for suffix in _SUFFIXES[family.type]}
    return names


def _used_names(text: str) -> set[str]:
    return set(re.findall(r"\bgatekeeper_[a-z_]+\b", text))


def _promtool(*args: str) -> str:
    assert PROMTOOL is not None
    done = subprocess.run(
        [PROMTOOL, *args], cwd=DEPLOY / "prometheus", capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@needs_promtool
def test_prometheus_config_and_rules_pass_promtool() -> None:
    assert "SUCCESS: 5 rules found" in _promtool("check", "rules", "alerts.yml")
    assert "is valid prometheus config" in _promtool("check", "config", "prometheus.yml")


@needs_promtool
def test_alerts_fire_on_a_sick_service_and_not_on_a_healthy_one() -> None:
    assert "SUCCESS" in _promtool("test", "rules", "alerts.test.yml")


def test_rules_cover_the_required_alerts_on_real_metric_names() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    alerts = {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"]}
    assert {
        "GatekeeperFailClosedRateHigh",
        "GatekeeperBudgetMisses",
        "GatekeeperLoopRateHigh",
        "GatekeeperTierDown",
    } <= set(alerts)
    used = _used_names("\n".join(alerts.values()))
    assert used and used <= _exported_names(), used - _exported_names()


def test_dashboard_shows_the_required_panels_on_real_metric_names() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "gatekeeper.json").read_text())
    exprs = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in dashboard["panels"]}
    needed = {
        "Decisions by tier": "gatekeeper_requests_total",
        "Latency percentiles against the budget": "gatekeeper_stage_seconds_bucket",
        "Share of the budget used (per request)": "gatekeeper_budget_used_ratio_bucket",
        "Fail-closed answers by reason": "gatekeeper_fail_closed_total",
        "Doom loops": "gatekeeper_loops_total",
        "Queue depth": "gatekeeper_queue_depth",
    }
    for title, metric in needed.items():
        assert metric in exprs[title], title
    used = _used_names(" ".join(exprs.values()))
    assert used <= _exported_names(), used - _exported_names()
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def _k8s() -> dict[str, dict[str, Any]]:
    docs = yaml.safe_load_all((DEPLOY / "k8s" / "gatekeeper.yaml").read_text())
    return {d["kind"]: d for d in docs}


def test_kubernetes_deployment_probes_resources_service_and_hpa() -> None:
    k = _k8s()
    pod = k["Deployment"]["spec"]["template"]
    [container] = pod["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert {"cpu", "memory"} <= set(container["resources"]["limits"])
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    grace = next(
        float(e["value"]) for e in container["env"] if e["name"] == "GATEKEEPER_SHUTDOWN_GRACE_S"
    )
    assert pod["spec"]["terminationGracePeriodSeconds"] > grace
    labels = pod["metadata"]["labels"]
    assert k["Service"]["spec"]["selector"].items() <= labels.items()
    target = k["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", k["Deployment"]["metadata"]["name"])


def test_compose_runs_gatekeeper_prometheus_and_grafana_from_the_repo() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert {"gatekeeper", "prometheus", "grafana"} <= set(compose["services"])
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), source
    assert (ROOT / compose["services"]["gatekeeper"]["build"]["dockerfile"]).is_file()


def test_dockerfile_is_multi_stage_non_root_with_a_healthcheck() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 3
    assert "ARG BASE_IMAGE=debian:bookworm-slim" in text
    assert re.search(r"^HEALTHCHECK .*\n.*/healthz", text, re.M)
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and user[-1] not in {"root", "0"}
    assert "GGML_NATIVE=OFF" in text  # portable CPU build
    # every GATEKEEPER_* variable the image sets is a real setting
    from service.settings import Settings

    for name in re.findall(r"\bGATEKEEPER_([A-Z_]+)=", text):
        top = name.lower().split("__")[0]
        assert top in Settings.model_fields or top == "config", name


def _strategic_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    from service.settings import load_settings

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load_settings().tiers["strategic"]


def test_kubernetes_vllm_example_configures_a_pooled_remote_strategic_tier(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "gatekeeper-vllm.yaml").read_text()))
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    engine = by["StatefulSet", "vllm"]
    assert by["Service", "vllm"]["spec"]["clusterIP"] == "None"  # one DNS name per replica
    [vllm] = engine["spec"]["template"]["spec"]["containers"]
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert vllm["readinessProbe"]["httpGet"]["path"] == "/health"
    seqs = next(int(a.split("=")[1]) for a in vllm["args"] if a.startswith("--max-num-seqs="))
    [gk] = by["Deployment", "gatekeeper-vllm"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in gk["env"] if "value" in e}
    tier = _strategic_from(env, monkeypatch)
    replicas = engine["spec"]["replicas"]
    assert tier.backend == "openai" and len(tier.replica_urls) == replicas
    assert all(f"vllm-{i}.vllm:8000/v1" in tier.replica_urls[i] for i in range(replicas))
    assert tier.max_concurrency == seqs  # no more in flight than the engine batches
    served = next(a.split("=")[1] for a in vllm["args"] if a.startswith("--served-model-name="))
    assert tier.remote_model == served


def test_compose_vllm_profile_points_a_second_gatekeeper_at_the_engine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    services = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    assert services["vllm"]["profiles"] == ["vllm"] == services["gatekeeper-vllm"]["profiles"]
    assert "profiles" not in services["gatekeeper"]  # the default stack is unchanged
    env = {
        k: v
        for k, v in services["gatekeeper-vllm"]["environment"].items()
        if not v.startswith("${")
    }
    tier = _strategic_from(env, monkeypatch)
    assert tier.replica_urls == ["http://vllm:8000/v1"] and tier.max_concurrency == 64
