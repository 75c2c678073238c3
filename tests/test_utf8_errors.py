"""Non-UTF-8 text files (training JSONL / JSON, prompt files, suite files) are one clear line naming the
file, the line and byte offset, and the fix; never a UnicodeDecodeError traceback."""

import json

import pytest

from diffalign.data import DataConfig, build_preference_dataset
from diffalign.data.sources import DataFormatError, read_json_rows
from diffalign.evaluation.suites import SuiteError, load_suite, read_prompt_file

LATIN1_LINE = '{"prompt": "caf\u00e9 au lait", "chosen": "a.png", "rejected": "b.png"}\n'
GOOD_LINE = '{"prompt": "tea", "chosen": "a.png", "rejected": "b.png"}\n'


def _one_line_naming(message: str, path, line: int):
    assert "\n" not in message and str(path) in message and "UTF-8" in message
    assert f"line {line}" in message and "byte offset" in message


def test_latin1_jsonl_is_a_clear_data_error(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes((GOOD_LINE + LATIN1_LINE).encode("latin-1"))
    with pytest.raises(DataFormatError) as err:
        read_json_rows(str(path))
    _one_line_naming(str(err.value), path, 2)
    offset = len(GOOD_LINE) + LATIN1_LINE.index("\u00e9")
    assert f"byte offset {offset}" in str(err.value)
    with pytest.raises(DataFormatError, match="not UTF-8"):  # through the dataset builder too
        build_preference_dataset(DataConfig(format="jsonl", source=str(path), resolution=16))


def test_latin1_json_list_is_a_clear_data_error(tmp_path):
    path = tmp_path / "train.json"
    path.write_bytes(json.dumps([{"prompt": "caf\u00e9"}], ensure_ascii=False).encode("cp1252"))
    with pytest.raises(DataFormatError) as err:
        read_json_rows(str(path))
    _one_line_naming(str(err.value), path, 1)


def test_utf8_with_bom_and_crlf_still_read(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (GOOD_LINE + LATIN1_LINE).replace("\n", "\r\n").encode("utf-8"))
    rows = read_json_rows(str(path))
    assert [r["prompt"] for r in rows] == ["tea", "caf\u00e9 au lait"]


def test_prompt_files(tmp_path):
    txt = tmp_path / "prompts.txt"
    txt.write_bytes("a cat\nna\u00efve art\n".encode("latin-1"))
    with pytest.raises(SuiteError) as err:
        read_prompt_file(txt)
    _one_line_naming(str(err.value), txt, 2)
    bad_json = tmp_path / "prompts.jsonl"
    bad_json.write_text('{"prompt": "a"}\n{"prompt": oops}\n', encoding="utf-8")
    with pytest.raises(SuiteError, match=r"prompts.jsonl:2: not valid JSON"):
        read_prompt_file(bad_json)
    bad_json.write_text('{"prompt": "a"}\n["not", "an", "object"]\n', encoding="utf-8")
    with pytest.raises(SuiteError, match=r"prompts.jsonl:2: expected a JSON object"):
        read_prompt_file(bad_json)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(SuiteError, match="holds no prompts"):
        read_prompt_file(empty)
    ok = tmp_path / "ok.txt"
    ok.write_bytes(b"\xef\xbb\xbfa cat\r\nna\xc3\xafve art\r\n")
    assert read_prompt_file(ok) == ["a cat", "na\u00efve art"]


def test_suite_yaml_and_its_prompt_file(tmp_path):
    (tmp_path / "p.txt").write_bytes("caf\u00e9\n".encode("latin-1"))
    (tmp_path / "s.yaml").write_text("name: s\nprompts: {type: file, path: p.txt}\n", encoding="utf-8")
    with pytest.raises(SuiteError) as err:
        load_suite(tmp_path / "s.yaml").load_prompts()
    _one_line_naming(str(err.value), tmp_path / "p.txt", 1)
    (tmp_path / "t.yaml").write_bytes("name: s\ndescription: caf\u00e9\nprompts: {type: file, path: p.txt}\n".encode("latin-1"))
    with pytest.raises(SuiteError) as err:
        load_suite(tmp_path / "t.yaml")
    _one_line_naming(str(err.value), tmp_path / "t.yaml", 2)


def test_score_cli_with_a_latin1_prompt_file_exits_2_with_one_line(tmp_path, capsys):
    from diffalign.evaluation.cli import score_main

    (tmp_path / "imgs").mkdir()
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("caf\u00e9\n".encode("latin-1"))
    rc = score_main(["--images", str(tmp_path / "imgs"), "--prompts", str(prompts), "--scorers", "toy", "--quiet",
                     "--device", "cpu"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and str(prompts) in err and "UTF-8" in err
