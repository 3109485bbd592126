"""The survival kit's contract, including the hostile inputs it must survive."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import pytest
import terminai_apts
from terminai_apts.action import cleanup, files
from terminai_apts.model import ObjectTableLabels

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[3]


def _as_nobody(fn, *args):
    """Run ``fn`` in a child that dropped root, so permission checks apply."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(r)
            os.setgid(65534)
            os.setuid(65534)
            out = json.dumps(fn(*args)).encode()
            os.write(w, out)
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(b"".join(chunks))


def test_version_is_release_version():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert terminai_apts.__version__ == project["project"]["version"]


def test_labels_are_str_enum():
    assert [label.value for label in ObjectTableLabels] == ["TRANSIT", "KEEP", "DELETE", "ARCHIVE", "UNKNOWN"]
    assert isinstance(ObjectTableLabels.TRANSIT, str)
    assert terminai_apts.model.ObjectTableLabels.TRANSIT == "TRANSIT"
    assert str(ObjectTableLabels.KEEP) == "KEEP"


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("setup.exe", "TRANSIT"),
        ("tool.deb", "TRANSIT"),
        ("photos.zip", "ARCHIVE"),
        ("src.tar.gz", "ARCHIVE"),
        ("report.PDF", "KEEP"),
        ("movie.mkv.crdownload", "DELETE"),
        ("mystery.bin", "UNKNOWN"),
    ],
)
def test_classify_file(tmp_path, name, label):
    p = tmp_path / name
    p.write_bytes(b"x")
    assert cleanup.classify_file(p) == label


def test_classify_odd_inputs(tmp_path):
    assert cleanup.classify_file(tmp_path / "missing.pdf") == ObjectTableLabels.UNKNOWN
    assert cleanup.classify_file(tmp_path) == ObjectTableLabels.UNKNOWN
    (tmp_path / "empty.pdf").write_bytes(b"")
    assert cleanup.classify_file(tmp_path / "empty.pdf") == ObjectTableLabels.DELETE
    assert cleanup.classify_file("bad\0path") == ObjectTableLabels.UNKNOWN


def test_scan_downloads_groups_and_limits(tmp_path):
    for name in ("a.exe", "b.pdf", "c.zip", "d.part", "e.xyz"):
        (tmp_path / name).write_bytes(b"1")
    out = cleanup.scan_downloads(str(tmp_path))
    assert out["TRANSIT"] == [str(tmp_path / "a.exe")]
    assert out["KEEP"] == [str(tmp_path / "b.pdf")]
    assert out["ARCHIVE"] == [str(tmp_path / "c.zip")]
    assert out["DELETE"] == [str(tmp_path / "d.part")]
    assert out["UNKNOWN"] == [str(tmp_path / "e.xyz")]
    limited = cleanup.scan_downloads(str(tmp_path), scan_limit=2)
    assert sum(len(v) for v in limited.values()) == 2
    assert "error" in cleanup.scan_downloads(str(tmp_path / "nope"))
    json.dumps(out)


def test_scan_downloads_defaults_to_home(tmp_path, monkeypatch):
    (tmp_path / "Downloads").mkdir()
    (tmp_path / "Downloads" / "x.iso").write_bytes(b"1")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cleanup.scan_downloads()["TRANSIT"] == [str(tmp_path / "Downloads" / "x.iso")]


def test_write_read_roundtrip_and_overwrite(tmp_path):
    p = str(tmp_path / "t.txt")
    assert files.write_file(p, "héllo", "utf-8")["bytes_written"] == 6
    assert files.read_file(p, "utf-8")["content"] == "héllo"
    assert "error" in files.write_file(p, "again", "utf-8")
    assert files.write_file(p, "again", "utf-8", overwrite=True)["bytes_written"] == 5
    assert files.read_file(p, "latin-1")["content"] == "again"
    assert [x for x in os.listdir(tmp_path) if x.startswith(".tmp")] == []


def test_read_write_errors(tmp_path):
    assert "error" in files.read_file(str(tmp_path / "missing"), "utf-8")
    assert "error" in files.read_file(str(tmp_path), "utf-8")
    (tmp_path / "bin").write_bytes(b"\xff\xfe\x00")
    assert "not valid utf-8" in files.read_file(str(tmp_path / "bin"), "utf-8")["error"]
    assert "unknown encoding" in files.read_file(str(tmp_path / "bin"), "no-such-codec")["error"]
    assert "error" in files.write_file(str(tmp_path / "nodir" / "x"), "a", "utf-8")
    assert "error" in files.write_file(str(tmp_path / "x"), "ü", "ascii")
    assert "error" in files.read_file("a\0b", "utf-8")


def test_permission_errors_are_reported(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("s")
    secret.chmod(0o600)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o700)
    tmp_path.chmod(0o755)
    out = _as_nobody(files.read_file, str(secret), "utf-8")
    assert "PermissionError" in out["error"]
    out = _as_nobody(files.list_directory, str(locked))
    assert "PermissionError" in out["error"]
    out = _as_nobody(files.write_file, str(locked / "x"), "a", "utf-8")
    assert "error" in out
    out = _as_nobody(files.delete_files, [str(secret)], False, False)
    assert out["failed"] and "error" in out
    assert secret.exists()


def test_list_directory_pages_huge_dirs(tmp_path):
    for i in range(20000):
        (tmp_path / f"f{i:05d}").touch()
    page = files.list_directory(str(tmp_path), offset=19990, limit=100)
    assert page["total"] == 20000
    assert [e["name"] for e in page["entries"]] == [f"f{i:05d}" for i in range(19990, 20000)]
    assert "error" in files.list_directory(str(tmp_path / "missing"))
    assert "error" in files.list_directory(str(tmp_path), offset=-1)


def test_non_utf8_names(tmp_path):
    raw = os.path.join(os.fsencode(tmp_path), b"caf\xe9.txt")
    with open(raw, "wb") as f:
        f.write(b"needle here")
    listing = files.list_directory(str(tmp_path))
    json.dumps(listing)
    assert listing["entries"][0]["name"] == "caf\\xe9.txt"
    found = files.search_files("needle", str(tmp_path))
    json.dumps(found)
    assert found["matches"][0]["line"] == 1
    out = files.delete_files([os.fsdecode(raw)], dry_run=False)
    json.dumps(out)
    assert not os.path.exists(raw)


def test_search_symlink_loop_and_binary(tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "loop").symlink_to(tmp_path)
    (sub / "a.txt").write_text("one\nfind ME\n")
    (sub / "b.bin").write_bytes(b"\0find me")
    (tmp_path / "find-me.log").write_text("nothing")
    out = files.search_files("find me", str(tmp_path), recursive=True)
    kinds = sorted((m["kind"], os.path.basename(m["path"])) for m in out["matches"])
    assert kinds == [("content", "a.txt")]
    out = files.search_files("find", str(tmp_path), recursive=True, file_pattern="*.log")
    assert [m["kind"] for m in out["matches"]] == ["name"]
    assert "error" in files.search_files("x", str(tmp_path / "missing"))
    assert "error" in files.search_files("", str(tmp_path))


def test_delete_files(tmp_path):
    target = tmp_path / "keep.txt"
    target.write_text("k")
    link = tmp_path / "link"
    link.symlink_to(target)
    d = tmp_path / "dir"
    d.mkdir()
    (d / "x").touch()
    dry = files.delete_files([str(link), str(d)])
    assert dry["dry_run"] is True and dry["would_delete"] == [str(link)] and link.exists()
    assert dry["failed"][0]["error"].startswith("is a directory")
    real = files.delete_files([str(link), str(d), str(tmp_path / "missing")], recursive=True, dry_run=False)
    assert real["deleted"] == [str(link), str(d)]
    assert target.exists() and not link.exists() and not d.exists()
    assert real["failed"][0]["path"].endswith("missing")
    assert files.delete_files(str(target), dry_run=True)["would_delete"] == [str(target)]
