"""A table's format: pinned at its first configuration or flush, fixed once it has data."""

import pytest

from producer import Producer, Settings
from producer.errors import ConfigError
from tests.conftest import id_batch
from workers.flusher import Flusher
from workers.storage import Storage


def test_the_first_flush_pins_the_default_format(any_redis, storage_dir):
    p = Producer(client=any_redis, settings=Settings())
    p.append("events", id_batch(0, 10))
    assert p.table_config("events").format is None
    Flusher(any_redis, Storage(str(storage_dir)), Settings()).flush("events")
    assert p.table_config("events").format == "parquet"
    # a worker started later with another default keeps the table's format
    later = Settings(table_format="delta")
    assert Flusher(any_redis, Storage(str(storage_dir)), later).sink_for(
        p.table_config("events")).format == "parquet"


def test_configure_pins_the_producers_default_format(any_redis):
    p = Producer(client=any_redis, settings=Settings(table_format="iceberg"))
    assert p.configure("events", compression="snappy").format == "iceberg"
    assert p.configure("events", format="delta").format == "delta"  # no data yet


def test_the_format_of_a_table_with_flushed_data_cannot_change(any_redis, storage_dir):
    p = Producer(client=any_redis, settings=Settings())
    p.append("events", id_batch(0, 10))
    Flusher(any_redis, Storage(str(storage_dir)), Settings()).flush("events")
    with pytest.raises(ConfigError, match="already has data flushed as parquet.*new table"):
        p.configure("events", format="iceberg")
    assert p.table_config("events").format == "parquet"
    assert p.configure("events", compression="snappy").format == "parquet"


def test_an_unknown_format_is_refused(any_redis):
    p = Producer(client=any_redis, settings=Settings())
    with pytest.raises(ConfigError, match="format 'orc' is not one of parquet, iceberg, delta"):
        p.configure("events", format="orc")
    with pytest.raises(ConfigError, match="DELTAFLUSH_TABLE_FORMAT"):
        Settings.from_env({"DELTAFLUSH_TABLE_FORMAT": "orc"})
