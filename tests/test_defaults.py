"""The release a launch boots when it names none (``terminai_shim.defaults``):
where it is looked up, in which order, what a bad configuration gets, and
that `inv release` makes a development release the default without ever
overwriting a default the user wrote. The VM side (a zero-argument context
booting it) is in clients/node/test/runtime.test.mjs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from terminai_shim.defaults import config_path, default_release, development_default
from terminai_shim.errors import ConfigError
from terminai_shim.launch import Trust, ready
from terminai_shim.options import from_params, launch_request

pytestmark = pytest.mark.unit


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A configuration directory of the test's own, nothing set."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    for name in ("TERMINAI_RELEASE", "TERMINAI_RELEASE_STORE", "TERMINAI_RELEASE_CHANNEL"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def _write(doc: object) -> None:
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))


def test_nothing_configured_is_no_default_and_a_launch_says_how_to_set_one(home):
    assert default_release() is None
    answer = ready(launch_request(from_params({})))
    assert not answer.ready and answer.code == "INVALID_CONFIG"
    assert "no default release is configured" in answer.reason and "TERMINAI_RELEASE" in answer.reason


def test_the_environment_comes_before_the_file_and_the_file_before_the_build(home, monkeypatch):
    _write({"store": "https://releases.example.invalid/terminai", "channel": "beta"})
    found = default_release()
    assert found is not None and found.source.store.endswith("/terminai") and found.source.channel == "beta"
    assert found.origin == str(config_path()) and found.trust == Trust()
    monkeypatch.setenv("TERMINAI_RELEASE_STORE", "s3://bucket/prefix")
    assert default_release().source.store == "s3://bucket/prefix"
    monkeypatch.setenv("TERMINAI_RELEASE", str(home / "dist/0.1.0"))
    found = default_release()
    assert found.source.manifest == str(home / "dist/0.1.0") and found.origin == "TERMINAI_RELEASE"


def test_a_launch_naming_nothing_gets_the_default_and_its_trust_unless_it_names_its_own(home):
    _write({"manifest": str(home / "rel"), "dev": True})
    request = launch_request(from_params({}))
    assert request.source.manifest == str(home / "rel") and request.local is None and request.trust.dev
    named = launch_request(from_params({"trustedRoot": "/r.json", "identity": "me@x", "issuer": "https://i"}))
    assert not named.trust.dev and named.trust.identity == "me@x", "a trust policy given is never replaced"
    own = launch_request(from_params({"kernel": "/k", "rootfs": "/r.erofs"}))
    assert own.source is None and own.local.kernel is not None, "files named are booted, not the default"
    _write({"store": "s3://bucket/releases", "channel": "beta"})
    followed = launch_request(from_params({"channel": "stable", "release": "0.1.0"})).source
    assert (followed.store, followed.channel, followed.release) == ("s3://bucket/releases", "stable", "0.1.0")
    explicit = launch_request(from_params({"manifest": "/elsewhere"}))
    assert explicit.source.manifest == "/elsewhere"


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("{not json", "is not JSON"),
        ("[]", "is not a JSON object"),
        ({"manifest": "/a", "store": "s3://b/c"}, "must name one release"),
        ({}, "must name one release"),
        ({"manifest": "/a", "trustme": True}, "unknown keys: trustme"),
        ({"manifest": 3}, "not a non-empty string"),
        ({"manifest": "/a", "dev": "yes"}, "dev that is not true or false"),
    ],
)
def test_a_bad_configuration_is_an_error_naming_its_file(home, text, words):
    _write(text)
    with pytest.raises(ConfigError) as e:
        default_release()
    assert words in e.value.message and str(config_path()) in e.value.message and e.value.hint


def test_inv_release_makes_its_release_the_default_but_never_replaces_the_users(home):
    first = development_default(home / "dist/0.1.0")
    assert first == config_path()
    doc = json.loads(first.read_text())
    assert doc == {"manifest": str(home / "dist/0.1.0"), "dev": True, "writtenBy": "inv release"}
    assert development_default(home / "dist/0.2.0") == first, "its own default moves on with each release"
    assert default_release().source.manifest == str(home / "dist/0.2.0")
    _write({"store": "s3://mine/releases"})
    assert development_default(home / "dist/0.3.0") is None
    assert json.loads(config_path().read_text()) == {"store": "s3://mine/releases"}, "the user's default stays"
    _write("{broken")
    assert development_default(home / "dist/0.3.0") is None and config_path().read_text() == "{broken"


def test_the_ready_command_answers_as_json_without_booting(home, tmp_path):
    shim = [sys.executable, "-m", "terminai_shim.cli", "ready", "--json"]
    done = subprocess.run([*shim, "--params", "{}"], capture_output=True, text=True, timeout=60)
    answer = json.loads(done.stdout)
    assert done.returncode == 1 and answer["ready"] is False and answer["code"] == "INVALID_CONFIG", done.stderr
    for params, words in (("[1]", "not a JSON object"), ("{nope", "not JSON"), ('{"bogus": 1}', "unknown")):
        done = subprocess.run([*shim, "--params", params], capture_output=True, text=True, timeout=60)
        assert done.returncode == 1 and words in json.loads(done.stdout)["reason"], done.stdout
    _write({"manifest": str(tmp_path / "no-such-release")})
    done = subprocess.run([*shim, "--params", "{}"], capture_output=True, text=True, timeout=60)
    answer = json.loads(done.stdout)
    assert done.returncode == 1 and not answer["ready"] and "no-such-release" in answer["reason"], answer
    assert "Traceback" not in done.stderr
