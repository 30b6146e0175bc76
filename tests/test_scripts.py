"""The Lua scripts: one file each, with a header naming KEYS and ARGV, and error codes that
become exception classes in one place."""

import re

import pytest
import redis

from producer import scripts
from producer.errors import ClaimMismatch, InvariantViolation, LeaseLost, NotAtHead

NAMES = sorted(p.stem for p in scripts.FOLDER.glob("*.lua"))


def test_every_script_is_a_file_with_a_header_naming_its_arguments():
    assert {"append_check", "claim", "commit", "due", "lease_acquire", "lease_release",
            "lease_renew"} <= set(NAMES)
    for name in NAMES:
        script = scripts.load(name)
        head = script.source.split("\n", 1)[0]
        assert head.startswith(f"-- {name}: "), f"{name}.lua must say what it does first"
        assert script.keys, f"{name}.lua names no KEYS"
        # every KEYS[n] and ARGV[n] the body uses is named in the header
        for kind, named in (("KEYS", script.keys), ("ARGV", script.args)):
            used = {int(n) for n in re.findall(rf"{kind}\[(\d+)\]", script.source)}
            assert max(used, default=0) <= len(named) or (kind == "ARGV" and script.tail), \
                f"{name}.lua uses {kind}[{max(used)}] but names {len(named)}"


def test_arguments_go_by_name_and_a_wrong_name_is_refused():
    commit = scripts.load("commit")
    assert commit.tail == "dead"
    keys = dict.fromkeys(commit.keys, "k")
    args = {name: n for n, name in enumerate(commit.args)}
    key_list, arg_list = commit.argv(keys, args, ["1-1", "bad"])
    assert arg_list[-2:] == ["1-1", "bad"] and arg_list[:len(commit.args)] == list(
        range(len(commit.args)))
    with pytest.raises(TypeError, match="ARGV must be"):
        commit.argv(keys, {**args, "typo": 1})
    with pytest.raises(TypeError, match="KEYS must be"):
        commit.argv({}, args)
    with pytest.raises(TypeError, match="no repeated ARGV"):
        scripts.load("claim").argv(dict.fromkeys(scripts.load("claim").keys, "k"),
                                   dict.fromkeys(scripts.load("claim").args, 1), ["x"])


@pytest.mark.parametrize("code, cls", [("FENCED", LeaseLost), ("NOTHEAD", NotAtHead),
                                       ("NOCLAIM", ClaimMismatch), ("CLAIMED", ClaimMismatch)])
def test_error_codes_become_exception_classes(code, cls):
    error = scripts.script_error(redis.ResponseError(f"{code} something"), "events")
    assert type(error) is cls and "'events'" in str(error) and code in str(error)


def test_invariant_violations_are_not_lease_losses():
    assert issubclass(NotAtHead, InvariantViolation) and issubclass(ClaimMismatch,
                                                                    InvariantViolation)
    assert not issubclass(LeaseLost, InvariantViolation)
    other = redis.ResponseError("OOM command not allowed")
    assert scripts.script_error(other) is other


def test_a_script_refusal_raises_its_class(any_redis):
    claim = scripts.load("claim")
    any_redis.set("lease", "7")
    args = {"token": 8, "first": "1-0", "last": "2-0", "count": 2, "schema": b"",
            "config": ""}
    with pytest.raises(LeaseLost, match="FENCED"):
        claim(any_redis, {"lease": "lease", "claim": "claim"}, args, table="events")
    assert claim(any_redis, {"lease": "lease", "claim": "claim"}, {**args, "token": 7}) == 1
    with pytest.raises(ClaimMismatch, match="CLAIMED"):
        claim(any_redis, {"lease": "lease", "claim": "claim"}, {**args, "token": 7})


def test_the_spec_gives_the_digests_of_protocol_1s_check_script(real_redis):
    """docs/spec.md 7.2 names the append check by its SHA-256 and SHA-1, so that a producer
    carrying a copy can tell it is the right one; the Node producer checks the same SHA-256,
    and Redis gives the script the same SHA-1."""
    import hashlib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = (root / "docs" / "spec.md").read_text(encoding="utf-8")
    data = (scripts.FOLDER / "append_check.lua").read_bytes()
    assert b"\r" not in data  # the digests are of LF line endings (.gitattributes)
    sha256 = re.search(r"^SHA-256\s+([0-9a-f]{64})$", spec, re.M)
    sha1 = re.search(r"^SHA-1\s+([0-9a-f]{40})$", spec, re.M)
    assert sha256 and sha256[1] == hashlib.sha256(data).hexdigest(), \
        "append_check.lua changed: it is another protocol's script, or update docs/spec.md 7.2"
    assert sha1 and sha1[1] == hashlib.sha1(data).hexdigest() == scripts.load("append_check").sha
    assert real_redis.script_load(data) == sha1[1]
    node = (root / "clients" / "node" / "producer.js").read_text(encoding="utf-8")
    assert f"'{sha256[1]}'" in node
