import logging

from workers.checks import eviction_warning, warn_on_eviction


def test_noeviction_is_quiet_and_allkeys_lru_warns(real_redis, caplog):
    real_redis.config_set("maxmemory-policy", "noeviction")
    assert eviction_warning(real_redis) is None
    try:
        real_redis.config_set("maxmemory-policy", "allkeys-lru")
        with caplog.at_level(logging.WARNING):
            warn_on_eviction(real_redis)
        assert "'allkeys-lru'" in caplog.text and "noeviction" in caplog.text
    finally:
        real_redis.config_set("maxmemory-policy", "noeviction")
