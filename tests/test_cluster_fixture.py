"""The local Redis Cluster fixture (tests/cluster.py) itself: six nodes, three masters with a
replica each, every slot served, and a forced failover that promotes a replica."""

from redis.cluster import RedisCluster


def test_the_cluster_has_three_masters_with_a_replica_each(redis_cluster, cluster_prefix):
    masters = redis_cluster.masters()
    assert len(masters) == 3
    for master in masters:
        assert redis_cluster.replica_of(master).role() == "slave"
    client = RedisCluster.from_url(redis_cluster.url)
    try:
        keys = [f"{cluster_prefix}:{{t{i}}}:k" for i in range(30)]
        for k in keys:
            client.set(k, b"1")
        # the keys are spread over the masters, and each is on the master the fixture names
        served = {redis_cluster.master_of(k).port for k in keys}
        assert len(served) == 3
        for k in keys:
            with redis_cluster.master_of(k).client() as node:
                assert node.get(k) == b"1"
    finally:
        client.close()


def test_a_takeover_promotes_the_replica(own_cluster):
    key = "{x}:k"
    client = RedisCluster.from_url(own_cluster.url)
    client.set(key, b"v")
    master = own_cluster.master_of(key)
    replica = own_cluster.replica_of(master)
    with master.client() as m:  # the replica has the key before its master dies
        m.set(key, b"v")
        assert m.execute_command("WAIT", 1, 5000) == 1
    own_cluster.kill(master)
    own_cluster.takeover(replica)
    assert own_cluster.master_of(key).port == replica.port
    client.close()
    client = RedisCluster.from_url(own_cluster.url)
    assert client.get(key) == b"v"
    own_cluster.restart(master)
    own_cluster.wait_healthy()
    assert master.role() == "slave"
    client.close()
