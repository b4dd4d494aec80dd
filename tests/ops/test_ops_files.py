"""The shipped monitoring files name only metrics that ``trolley-tasks metrics`` serves, so a rename breaks a test
instead of a dashboard nobody looks at until the night it matters."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from trolley_tasks.cli import metrics

ROOT = Path(__file__).resolve().parents[2]
SERVED = set(re.findall(r'"(trolley_[a-z_]+)"', Path(metrics.__file__).read_text()))


def test_the_dashboard_uses_only_served_metrics() -> None:
    dashboard = json.loads((ROOT / "ops" / "grafana-dashboard.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = {name for expr in expressions for name in re.findall(r"\btrolley_[a-z_]+", expr)}
    assert used and used <= SERVED, used - SERVED
    assert {"trolley_job_instances", "trolley_source_breaker_state", "trolley_queue_messages"} <= used


def test_the_scrape_config_points_at_the_metrics_port() -> None:
    config = yaml.safe_load((ROOT / "ops" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:9808"]
    assert "= 9808" in Path(metrics.__file__).read_text()


def compose() -> dict:  # type: ignore[type-arg]
    loaded: dict = yaml.safe_load((ROOT / "docker-compose.yml").read_text())  # type: ignore[type-arg]
    return loaded


def test_compose_redis_persists_and_never_evicts() -> None:
    command = compose()["services"]["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"


def test_compose_every_service_has_a_healthcheck_and_the_worker_scales() -> None:
    services = compose()["services"]
    assert {"redis", "worker", "flower", "metrics", "orthanc", "cohort"} <= set(services)
    assert all("healthcheck" in service for service in services.values()), [
        name for name, service in services.items() if "healthcheck" not in service
    ]
    worker = services["worker"]
    # --scale needs no fixed name and no published host port
    assert "container_name" not in worker and "ports" not in worker
    assert worker["stop_signal"] == "SIGTERM" and worker["stop_grace_period"]
    assert set(services["orthanc"]["profiles"]) == set(services["cohort"]["profiles"]) == {"demo"}


def test_compose_publishes_only_on_loopback() -> None:
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
    flower = compose()["services"]["flower"]
    assert "FLOWER_PASSWORD" in flower["environment"]
