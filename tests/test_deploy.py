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


def manifests(folder: Path = ROOT / "deploy" / "k8s"):
    """``(file name, document)`` of every Kubernetes manifest in ``folder``."""
    for path in sorted(folder.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path.name, doc


def kubernetes_objects(found):
    """``found`` manifests but KEDA's custom resources (each has a test of its own), as
    parameters ``name, doc`` with the ids ``file-Kind/name``."""
    return [pytest.param(name, doc, id=f"{name}-{doc.get('kind', '?')}/{doc['metadata']['name']}")
            for name, doc in found if not doc["apiVersion"].startswith("keda.sh/")]


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
@pytest.mark.parametrize("name,doc", kubernetes_objects(manifests()))
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


# --- the Redis Cluster option (docs/cluster.md) ------------------------------------------


def cluster_manifests():
    return manifests(ROOT / "deploy" / "k8s" / "cluster")


@pytest.mark.parametrize("name,doc", kubernetes_objects(cluster_manifests()))
def test_cluster_manifests_are_valid_kubernetes(name, doc):
    import kubernetes_validate

    kubernetes_validate.validate(doc, "1.30", strict=True)


def test_the_cluster_option_runs_six_durable_nodes_joined_with_replicas_and_rabbitmq():
    docs = [doc for _, doc in cluster_manifests()]
    config = next(d for d in docs if d["kind"] == "ConfigMap")
    assert config["metadata"]["name"] == "deltaflush"  # what the fleet's deployments read
    env = config["data"]
    assert set(env) <= KNOWN_ENV
    assert int(env["DELTAFLUSH_APPEND_REPLICAS"]) >= 1
    node = next(d for d in docs if d["kind"] == "StatefulSet"
                and d["metadata"]["name"] == "deltaflush-redis-cluster")
    assert node["spec"]["replicas"] == 6
    args = " ".join(containers(node)[0]["args"])
    for flag in ("--cluster-enabled yes", "--appendonly yes", "--appendfsync always",
                 "--maxmemory-policy noeviction", "--cluster-announce-hostname"):
        assert flag in args
    service = node["spec"]["serviceName"]
    assert env["DELTAFLUSH_REDIS_URL"].startswith(
        f"redis://{node['metadata']['name']}-0.{service}:6379")
    job = next(d for d in docs if d["kind"] == "Job")
    script = " ".join(job["spec"]["template"]["spec"]["containers"][0]["command"])
    assert "redis-cli --cluster create" in script and "--cluster-replicas 1" in script
    # the broker: RabbitMQ, its URL in the Secret every deployment of the fleet reads
    broker = next(d for d in docs if d["kind"] == "Secret"
                  and d["metadata"]["name"] == "deltaflush-broker")
    url = broker["stringData"]["DELTAFLUSH_BROKER_URL"]
    assert url.startswith("amqp://") and "@deltaflush-rabbitmq:5672/" in url
    assert any(d["kind"] == "StatefulSet" and d["metadata"]["name"] == "deltaflush-rabbitmq"
               for d in docs)
    for _, doc in manifests():
        if doc["kind"] == "Deployment" and doc["metadata"]["name"] != "deltaflush-redis":
            refs = containers(doc)[0]["envFrom"]
            assert {"secretRef": {"name": "deltaflush-broker", "optional": True}} in refs
    keda = next(d for d in docs if d["apiVersion"].startswith("keda.sh/"))
    triggers = {t["type"]: t["metadata"] for t in keda["spec"]["triggers"]}
    assert triggers["rabbitmq"]["queueName"] == "deltaflush"  # the flush_table queue
    assert triggers["rabbitmq"]["hostFromEnv"] == "DELTAFLUSH_BROKER_URL"


def test_the_compose_cluster_file_puts_the_fleet_on_a_cluster_and_rabbitmq():
    base = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    over = yaml.safe_load((ROOT / "docker-compose.cluster.yml").read_text())["services"]
    nodes = ["redis"] + [f"redis-{i}" for i in range(1, 6)]
    for name in nodes:
        command = " ".join(over[name]["command"])
        assert "--cluster-enabled yes" in command and "--appendfsync always" in command
        assert "--maxmemory-policy noeviction" in command
        assert f"--cluster-announce-hostname {name} " in command
    create = " ".join(over["redis-cluster"]["command"])
    assert "redis-cli --cluster create" in create and "--cluster-replicas 1" in create
    assert set(over["redis-cluster"]["depends_on"]) == set(nodes)
    assert over["rabbitmq"]["image"].startswith("rabbitmq:")
    for name in ("worker", "beat", "flower", "exporter"):
        assert name in base
        env = over[name]["environment"]
        assert set(env) <= KNOWN_ENV
        assert env["DELTAFLUSH_BROKER_URL"].startswith("amqp://") and "@rabbitmq:" in \
            env["DELTAFLUSH_BROKER_URL"]
        assert env["DELTAFLUSH_REDIS_URL"].startswith("redis://redis:")
        assert int(env["DELTAFLUSH_APPEND_REPLICAS"]) >= 1
        assert over[name]["depends_on"]["redis-cluster"]["condition"] == \
            "service_completed_successfully"
