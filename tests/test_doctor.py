"""Start-up checks (``workers.doctor``): the same for ``deltaflush doctor`` and every worker."""

import subprocess

import pytest
import redis

from producer import Settings
from tests.conftest import CELERY, free_port, wait_for
from workers.doctor import FAIL, OK, WARN, durability, run_checks


def by_name(results):
    return {c.name: c for c in results}


def test_a_durable_redis_and_writable_storage_pass(durable_redis, storage_dir):
    settings = Settings(redis_url=durable_redis.url, storage_uri=str(storage_dir))
    results = run_checks(settings)
    assert {c.status for c in results} == {OK}, results
    assert {"redis", "redis eviction", "redis persistence", "broker", "storage"} == \
        set(by_name(results))
    assert not [p for p in storage_dir.rglob("*") if p.is_file()]  # the probe is gone


def test_an_evicting_redis_fails_and_no_aof_warns(real_redis):
    real_redis.config_set("maxmemory-policy", "allkeys-lru")
    try:
        found = by_name(durability(real_redis))
        assert found["redis eviction"].status == FAIL
        assert "'allkeys-lru'" in found["redis eviction"].detail
        assert found["redis persistence"].status == WARN  # the test server runs without AOF
        assert "appendonly" in found["redis persistence"].detail
        accepted = by_name(durability(real_redis, allow_volatile=True))
        assert {c.status for c in accepted.values()} == {OK}
        assert "DELTAFLUSH_ALLOW_VOLATILE_REDIS=1" in accepted["redis eviction"].detail
    finally:
        real_redis.config_set("maxmemory-policy", "noeviction")


def test_appendfsync_everysec_warns(durable_redis):
    client = redis.Redis.from_url(durable_redis.url)
    client.config_set("appendfsync", "everysec")
    found = by_name(durability(client))
    assert found["redis persistence"].status == WARN and "everysec" in \
        found["redis persistence"].detail
    client.close()


def test_unreachable_services_and_unwritable_storage_fail_naming_the_setting(tmp_path,
                                                                              monkeypatch):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    monkeypatch.setenv("DELTAFLUSH_REDIS_URL", f"redis://:secret@127.0.0.1:{free_port()}/0")
    monkeypatch.setenv("DELTAFLUSH_BROKER_URL", f"amqp://guest:guest@127.0.0.1:{free_port()}//")
    monkeypatch.setenv("DELTAFLUSH_STORAGE_URI", str(not_a_folder / "lake"))
    found = by_name(run_checks(Settings.from_env()))
    assert found["redis"].status == FAIL
    assert found["redis"].detail.startswith("DELTAFLUSH_REDIS_URL=redis://:***@127.0.0.1:")
    assert "secret" not in found["redis"].detail and "cannot reach Redis" in \
        found["redis"].detail
    assert found["broker"].status == FAIL and "DELTAFLUSH_BROKER_URL=amqp://" in \
        found["broker"].detail
    assert found["storage"].status == FAIL and \
        f"DELTAFLUSH_STORAGE_URI={not_a_folder}/lake" in found["storage"].detail


def start_worker(env, tmp_path, name):
    log = tmp_path / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([CELERY, "-A", "workers.app", "worker", "-c", "1",
                                 "--loglevel=INFO", "-n", f"{name}@%h", "--without-mingle",
                                 "--without-gossip"], env=env, cwd=tmp_path, stdout=out,
                                stderr=subprocess.STDOUT)
    return proc, log


@pytest.mark.integration
def test_a_worker_with_unwritable_storage_stops_with_the_reason(fleet_env, tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    env = dict(fleet_env, DELTAFLUSH_STORAGE_URI=str(not_a_folder / "lake"))
    proc, log = start_worker(env, tmp_path, "unwritable")
    try:
        assert proc.wait(60) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "start-up check storage failed" in text
    assert f"DELTAFLUSH_STORAGE_URI={not_a_folder}/lake" in text
    assert " ready." not in text


@pytest.mark.integration
def test_a_worker_on_an_evicting_redis_stops_unless_allowed(fleet_env, real_redis, tmp_path):
    real_redis.config_set("maxmemory-policy", "allkeys-lru")
    try:
        proc, log = start_worker(fleet_env, tmp_path, "evicting")
        assert proc.wait(60) != 0
        assert "maxmemory-policy is 'allkeys-lru'" in log.read_text()
        env = dict(fleet_env, DELTAFLUSH_ALLOW_VOLATILE_REDIS="1")
        proc, log = start_worker(env, tmp_path, "allowed")
        try:
            wait_for(lambda: b" ready." in log.read_bytes() or proc.poll() is not None, 60,
                     "the worker to start")
            assert proc.poll() is None, log.read_text()
        finally:
            proc.terminate()
            proc.wait(30)
    finally:
        real_redis.config_set("maxmemory-policy", "noeviction")
