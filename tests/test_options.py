"""The launch option table (shim/terminai_shim/options.py) against everything
that spells an option outside it: the JSON Schema of `initialize`, the
TypeScript package's options and the parameters it sends, the docs' table,
and the two doors, which must build the same request from the same options."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
from terminai_shim import options
from terminai_shim.errors import ConfigError
from terminai_shim.options import OPTIONS

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((REPO / "docs/shim-protocol.schema.json").read_text())
INITIALIZE = SCHEMA["$defs"]["params"]["initialize"]["properties"]
CONTEXTS = (REPO / "clients/node/src/contexts.ts").read_text()
SCHEMA_TYPE = {"flag": "boolean", "text": "string", "path": "string", "whole": "integer", "names": "array",
               "layer-files": "array"}  # fmt: skip


def test_the_table_is_the_schema_of_initialize():
    assert set(INITIALIZE) == options.INITIALIZE_KEYS
    for o in OPTIONS:
        if o.key is None:
            continue
        prop = INITIALIZE[o.key]
        if o.kind == "choice":
            assert tuple(prop["enum"]) == o.choices, o.name
        elif o.kind == "network":
            modes = {m for alt in prop["oneOf"] for m in alt.get("enum", alt.get("properties", {}).get("mode", {})
                                                                   .get("enum", []))}  # fmt: skip
            assert modes == set(o.choices), modes
        else:
            assert prop["type"] == SCHEMA_TYPE[o.kind], o.name
    assert "allow" in INITIALIZE["network"]["oneOf"][1]["properties"], "--allow travels inside network"


def _initialize_literal() -> set[str]:
    """The keys the TypeScript package sends in initialize: its literal, and each tier's own."""
    body = CONTEXTS[CONTEXTS.index("function initializeParams(") :]
    body = body[: body.index("...tier,")]
    keys = set(re.findall(r"^\s+(\w+):", body, re.M))
    for tier in re.findall(r"^const \w+_TIER = \{([^}]*)\};", CONTEXTS, re.M):
        keys |= set(re.findall(r"(\w+):", tier))
    return keys


def test_the_typescript_package_sends_every_option_and_types_its_choices():
    assert _initialize_literal() == options.INITIALIZE_KEYS
    declared = CONTEXTS[CONTEXTS.index("export interface RuntimeOptions {") :]
    declared = declared[: declared.index("\n}\n")]
    for o in OPTIONS:
        if o.kind != "choice" or o.key is None:
            continue
        union = re.search(rf"\b{o.key}\?: ((?:'[\w-]+'(?: \| )?)+);", declared)
        if union is None:  # the tier is the context's class (backend), not an option
            assert o.key in _initialize_literal() and o.key not in declared, o.key
            continue
        assert tuple(re.findall(r"'([\w-]+)'", union[1])) == o.choices, o.key


def test_the_docs_table_is_the_table():
    text = (REPO / "docs/shim-protocol.md").read_text()
    begin, end = "<!-- options: begin (inv docs) -->\n", "<!-- options: end -->"
    assert begin in text and end in text, "docs/shim-protocol.md has lost its options table"
    assert text[text.index(begin) + len(begin) : text.index(end)] == options.markdown_table(), "run `inv docs`"


def test_every_flag_and_key_is_spelled_once():
    for attr in ("name", "flag", "key"):
        spelled = [getattr(o, attr) for o in OPTIONS if getattr(o, attr)]
        assert len(spelled) == len(set(spelled)), attr


# One value of each option, as each door spells it (the canonical value, the flags, the JSON).
SAMPLES: dict[str, tuple[list[str], object]] = {
    "kernel": (["--kernel", "/k/vmlinux"], "/k/vmlinux"),
    "rootfs": (["--rootfs", "/k/root.squashfs"], "/k/root.squashfs"),
    "workspace": (["--workspace", "/w"], "/w"),
    "workspace_mount": (["--workspace-mount", "/src"], "/src"),
    "manifest": (["--manifest", "/r"], "/r"),
    "store": (["--store", "s3://b/p"], "s3://b/p"),
    "channel": (["--channel", "beta"], "beta"),
    "release": (["--release", "1.2.3"], "1.2.3"),
    "memory_mib": (["--memory", "1024"], 1024),
    "cpus": (["--cpus", "2"], 2),
    "trusted_root": (["--trusted-root", "/t.json"], "/t.json"),
    "identity": (["--identity", "me@example.org"], "me@example.org"),
    "issuer": (["--issuer", "https://issuer.example"], "https://issuer.example"),
    "allow_http": (["--allow-http"], True),
    "dev": (["--dev"], True),
    "accel": (["--accel", "tcg"], "tcg"),
    "backend": (["--backend", "container"], "container"),
    "image": (["--image", "/i.oci.tar"], "/i.oci.tar"),
    "profile": (["--profile", "full"], "full"),
    "layers": (["--layers", "tools,build"], ["tools", "build"]),
    "layer_files": (["--layer", "tools=/l.squashfs"], [{"name": "tools", "path": "/l.squashfs"}]),
    "network": (
        ["--network", "allowlist", "--allow", "example.org:443"],
        {"mode": "allowlist", "allow": ["example.org:443"]},
    ),
    "cold": (["--cold"], True),
    "user": (["--user", "root"], "root"),
    "writable_git": (["--writable-git"], True),
    "force_workspace": (["--force-workspace"], True),
    "require_microvm": (["--require-microvm"], True),
}
JSON_ONLY = {"rootfs_format", "image_sha256"}  # a developer's file details the command line reads from the file
CLI_ONLY = {"allow"}  # initialize carries it inside network


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    options.add_arguments(p, ("local", "launch", "source", "trust"))
    return p


def test_every_option_has_a_sample_for_both_doors():
    flagged = {o.name for o in OPTIONS if o.flag} - CLI_ONLY
    keyed = {o.name for o in OPTIONS if o.key} - JSON_ONLY
    assert flagged == keyed == set(SAMPLES)
    assert {o.name for o in OPTIONS if o.flag is None} == JSON_ONLY
    assert {o.name for o in OPTIONS if o.key is None} == CLI_ONLY


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_both_doors_build_the_same_request(name):
    flags, value = SAMPLES[name]
    given = {options.BY_NAME[name].key: value}
    if options.BY_NAME[name].group == "source" and name not in ("manifest", "store"):  # means something with a release
        flags, given = ["--manifest", "/r", *flags], {"manifest": "/r", **given}
    from_cli = options.launch_request(options.from_args(_parser().parse_args(flags)))
    from_json = options.launch_request(options.from_params(given))
    assert from_cli == from_json
    assert from_cli != options.launch_request({}), f"{name} changed nothing"


def test_initialize_refuses_a_value_of_the_wrong_kind():
    for key, bad in (("writableGit", "yes"), ("memoryMib", True), ("memoryMib", "512"), ("accel", 3),
                     ("workspace", 3), ("layers", "tools"), ("layerFiles", [{"name": "x"}])):  # fmt: skip
        with pytest.raises(ConfigError, match=key):
            options.from_params({key: bad})
    assert options.from_params({"channel": ""})["channel"] is None, "an empty string is not given, as before"


def test_launch_checks_every_choice_whichever_door(tmp_path):
    """The readers check kinds; the choices are checked once, by launch."""
    from terminai_shim.launch import resolve

    for key, bad, words in (("user", "admin", "unknown guest user"), ("backend", "vmware", "unknown backend"),
                            ("rootfsFormat", "ext4", "unknown root image format"),
                            ("accel", "fast", "unknown accelerator")):  # fmt: skip
        given = {"kernel": str(tmp_path / "k"), "rootfs": str(tmp_path / "r"), key: bad}
        with pytest.raises(ConfigError, match=words):
            resolve(options.launch_request(options.from_params(given)))
