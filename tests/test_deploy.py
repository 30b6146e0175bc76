"""The deployment files, checked statically (no Docker engine or cluster here): the compose
file, the Dockerfile, the Kubernetes manifests (against the Kubernetes schemas), the KEDA
object and the Grafana dashboard, each against the contract and the code."""

import json
import re
import shlex
from pathlib import Path

import fakeredis
import pytest
import yaml

from producer import Producer, Settings
from producer.settings import _ENV
from workers.metrics import DeltaflushCollector

ROOT = Path(__file__).resolve().parent.parent
KNOWN_ENV = set(_ENV.values()) | {"DELTAFLUSH_LOG_JSON"}


def manifests():
    for path in sorted((ROOT / "deploy" / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path.name, doc


def containers(doc):
    return doc["spec"]["template"]["spec"]["containers"]


def test_compose_runs_the_contract_commands_with_a_safe_redis():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "worker", "beat", "flower", "exporter"} <= set(services)
    assert services["worker"]["command"][:4] == ["celery", "-A", "workers.app", "worker"]
    assert "-Q" not in services["worker"]["command"]  # every queue, as the contract says
    assert "replicas" not in services["worker"].get("deploy", {})  # --scale worker=4 works
    assert "container_name" not in services["worker"]
    assert services["beat"]["command"][:4] == ["celery", "-A", "workers.app", "beat"]
    flower = services["flower"]["command"]
    assert flower[:4] == ["celery", "-A", "workers.app", "flower"]
    assert any(arg.startswith("--basic-auth=") for arg in flower)
    redis = " ".join(services["redis"]["command"])
    assert "--appendfsync always" in redis and "--maxmemory-policy noeviction" in redis
    env = services["worker"]["environment"]
    assert set(env) - {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= KNOWN_ENV
    assert env["DELTAFLUSH_REDIS_URL"].startswith("redis://redis:")
    assert "lake" in compose["volumes"]
    assert "s3" in services["minio"]["profiles"]
    grace = int(services["worker"]["stop_grace_period"].rstrip("s"))
    assert grace >= 60


def test_dockerfile_installs_the_package_and_runs_a_worker():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"pip install .*'\.\[flower\]'", text)
    cmd = json.loads(re.search(r"^CMD (.+)$", text, re.M).group(1))
    assert cmd[:4] == ["celery", "-A", "workers.app", "worker"]
    assert "USER deltaflush" in text


# The KEDA custom resource is checked in test_keda_scales_the_worker_deployment_on_the_backlog.
@pytest.mark.parametrize("name,doc", [m for m in manifests()
                                      if not m[1]["apiVersion"].startswith("keda.sh/")],
                         ids=lambda v: v if isinstance(v, str)
                         else v.get("kind", "?") + "/" + v["metadata"]["name"])
def test_manifests_are_valid_kubernetes(name, doc):
    import kubernetes_validate

    kubernetes_validate.validate(doc, "1.30", strict=True)


def test_workers_shut_down_gracefully_and_have_probes():
    config = next(doc for _, doc in manifests() if doc["kind"] == "ConfigMap")["data"]
    assert set(config) <= KNOWN_ENV
    deployments = {doc["metadata"]["name"]: doc for _, doc in manifests()
                   if doc["kind"] in ("Deployment", "StatefulSet")}
    worker = deployments["deltaflush-worker"]
    grace = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > int(config["DELTAFLUSH_TASK_TIME_LIMIT_S"])
    (c,) = containers(worker)
    assert c["command"][:4] == ["celery", "-A", "workers.app", "worker"]
    assert "-Q" not in c["command"]
    for doc in deployments.values():
        for c in containers(doc):
            assert "livenessProbe" in c and "readinessProbe" in c or doc["metadata"][
                "name"] == "deltaflush-beat", doc["metadata"]["name"]
    beat = containers(deployments["deltaflush-beat"])[0]
    assert beat["command"][:4] == ["celery", "-A", "workers.app", "beat"]
    assert deployments["deltaflush-beat"]["spec"]["replicas"] == 1
    redis_args = " ".join(containers(deployments["deltaflush-redis"])[0]["args"])
    assert "--appendfsync always" in redis_args and "noeviction" in redis_args


def test_flower_requires_authentication():
    docs = [doc for _, doc in manifests()]
    secret = next(d for d in docs if d["kind"] == "Secret")
    assert "FLOWER_BASIC_AUTH" in secret["stringData"]
    flower = next(d for d in docs if d["kind"] == "Deployment"
                  and d["metadata"]["name"] == "deltaflush-flower")
    refs = containers(flower)[0]["envFrom"]
    assert {"secretRef": {"name": secret["metadata"]["name"]}} in refs


def test_keda_scales_the_worker_deployment_on_the_backlog():
    keda = next(doc for _, doc in manifests() if doc["apiVersion"].startswith("keda.sh/"))
    assert keda["kind"] == "ScaledObject"
    assert keda["spec"]["scaleTargetRef"]["name"] == "deltaflush-worker"
    triggers = {t["type"]: t["metadata"] for t in keda["spec"]["triggers"]}
    assert "deltaflush_pending_bytes" in triggers["prometheus"]["query"]
    assert triggers["redis"]["listName"] == "deltaflush"  # the flush_table queue
    assert keda["spec"]["minReplicaCount"] >= 1


def test_grafana_dashboard_queries_only_metrics_the_exporter_serves():
    client = fakeredis.FakeRedis()
    Producer(client=client, settings=Settings()).append("t", [{"a": 1}])
    served = set()
    for family in DeltaflushCollector(client, "deltaflush").collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
        served |= {family.name + s for s in suffixes.get(family.type, [""])}
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "deltaflush.json").read_text())
    used = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used |= set(re.findall(r"deltaflush_\w+", target["expr"]))
    assert used and used <= served, used - served


def test_compose_commands_parse_as_the_cli_and_celery_expect():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    from click.testing import CliRunner

    from workers.cli import main

    exporter = compose["services"]["exporter"]["command"]
    assert exporter[0] == "deltaflush"
    result = CliRunner().invoke(main, [*exporter[1:], "--help"])
    assert result.exit_code == 0, result.output
    assert shlex.join(compose["services"]["worker"]["command"])
