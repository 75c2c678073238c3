"""diffalign.atomic: the final name holds the old file or the whole new one, never a part."""

import pytest

from diffalign.atomic import TEMP_GLOB, atomic_path, remove_temps, write_atomic


def test_write_atomic_text_and_bytes(tmp_path):
    assert write_atomic(tmp_path / "a.json", "é{}").read_text(encoding="utf-8") == "é{}"
    assert write_atomic(tmp_path / "b.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    write_atomic(tmp_path / "a.json", "new")
    assert (tmp_path / "a.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.bin"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "run.json"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert path.read_text() == "old" and list(tmp_path.iterdir()) == [path]


def test_the_temp_keeps_the_suffix_and_is_found_by_the_glob(tmp_path):
    with atomic_path(tmp_path / "0001.png") as tmp:  # PIL picks the format from the suffix
        assert tmp.parent == tmp_path and tmp.suffix == ".png" and tmp.name.startswith(".")
        tmp.write_bytes(b"x")
        assert list(tmp_path.glob(TEMP_GLOB)) == [tmp]
    assert (tmp_path / "0001.png").read_bytes() == b"x" and not list(tmp_path.glob(TEMP_GLOB))
    (tmp_path / ".0002.tmp-99.png").write_bytes(b"left by a killed process")
    remove_temps(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["0001.png"]
