"""Storage backends: a local folder and S3 (moto's server), through the same flush."""

import os

import fakeredis
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from producer import InvalidTableName, Producer, Settings, wire
from tests.conftest import free_port, id_batch
from workers.flusher import Flusher
from workers.storage import TMP_DIR, Storage


def test_local_paths_and_file_uris_are_the_same_storage(tmp_path):
    assert Storage(str(tmp_path)).root == str(tmp_path)
    assert Storage(f"file://{tmp_path}").root == str(tmp_path)
    assert Storage("relative/dir").root.endswith("/relative/dir")


@pytest.mark.parametrize("name", [TMP_DIR, "_deltaflush_catalog", "_x", "../x", "a/b"])
def test_no_table_name_reaches_a_folder_of_our_own(tmp_path, name):
    """Every folder of deltaflush's own beside the tables starts with '_' (today
    _deltaflush_tmp, which the temp sweep empties); no table name can."""
    assert not wire.valid_table_name(name)
    with pytest.raises(InvalidTableName):
        Producer(client=fakeredis.FakeRedis(), settings=Settings()).append(
            name, [{"a": 1}])
    storage = Storage(str(tmp_path))
    for call in (storage.table_dir, storage.list_files,
                 lambda t: storage.final_path(t, "part-x.parquet")):
        with pytest.raises(InvalidTableName):
            call(name)


def test_publish_is_atomic_replace_and_leaves_no_temp(tmp_path):
    s = Storage(str(tmp_path))
    for content in (b"one", b"two"):
        temp = s.temp_path("t", "part-x", 1)
        with s.open_temp(temp) as f:
            f.write(content)
        s.publish(temp, s.final_path("t", "part-x.parquet"))
    assert (tmp_path / "t" / "part-x.parquet").read_bytes() == b"two"
    assert list((tmp_path / TMP_DIR / "t").iterdir()) == []


def test_sweep_removes_only_old_temp_files(tmp_path):
    s = Storage(str(tmp_path))
    temp = s.temp_path("t", "part-x", 1)
    s.open_temp(temp).close()
    assert s.sweep_temp(older_than_s=3600) == 0
    assert s.sweep_temp(older_than_s=-1) == 1


@pytest.fixture(scope="module")
def s3_uri():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    import boto3

    boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing",
                 ).create_bucket(Bucket="lake")
    mp = pytest.MonkeyPatch()
    mp.setenv("AWS_ACCESS_KEY_ID", "testing")
    mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    yield f"s3://lake/prefix?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    mp.undo()
    server.stop()


def test_flush_to_s3_lands_every_row_once(real_redis, s3_uri):
    settings = Settings(storage_uri=s3_uri, max_file_bytes=16_384)
    p = Producer(client=real_redis, settings=settings)
    for i in range(20):
        p.append("events", id_batch(i * 50, 50))
    storage = Storage(s3_uri)
    result = Flusher(real_redis, storage, settings).flush("events")
    assert result.rows == 1000 and result.files > 1
    assert all(path.startswith("s3://lake/prefix/events/part-") for path in result.paths)
    files = storage.list_files("events")
    assert len(files) == result.files
    ids = ds.dataset(storage.table_dir("events"), filesystem=storage.fs,
                     format="parquet").to_table()["id"].to_pylist()
    assert sorted(ids) == list(range(1000))
    # no temporary object remains
    from pyarrow.fs import FileSelector
    leftovers = storage.fs.get_file_info(FileSelector(f"lake/prefix/{TMP_DIR}", recursive=True,
                                                      allow_not_found=True))
    assert [i for i in leftovers if i.type.name == "File"] == []


def test_a_table_folder_may_exist_before_its_first_file(tmp_path, monkeypatch):
    """``publish`` creates the table's folder, then renames the file into it: a reader that
    polls sees an empty folder in between. The tests' reader (``read_ids``) takes it as no
    rows; reading the folder as a dataset would fail (it has no ``id`` column)."""
    from tests.conftest import read_ids

    storage = Storage(str(tmp_path))
    seen = []
    real_replace = os.replace

    def replace(src, dst):
        seen.append((os.listdir(os.path.dirname(dst)), read_ids(tmp_path, "events")))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    temp = storage.temp_path("events", "part-1.parquet", 1)
    with storage.open_temp(temp) as f:
        pq.write_table(id_batch(0, 3), f)
    storage.publish(temp, storage.final_path("events", "part-1.parquet"))
    assert seen == [([], [])]
    assert read_ids(tmp_path, "events") == [0, 1, 2]
