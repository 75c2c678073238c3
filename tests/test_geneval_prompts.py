"""GenEval prompt generator: byte-identity with the official files (djghosh13/geneval @ af4902f).

The expected hashes and lines were taken from the official prompts/ folder; the files themselves are not
stored here."""

import hashlib
import json
from collections import Counter

from diffalign.evaluation.geneval_prompts import (
    OBJECT_NAMES,
    TASKS,
    generate_geneval_metadata,
    metadata_jsonl,
    prompts_txt,
    write_geneval_prompts,
)

OFFICIAL_METADATA_SHA256 = "5c48e0813e812e3c373fa5c8ed07a8f0a483be30272b4427b0559c8048e67c13"
OFFICIAL_PROMPTS_SHA256 = "55b6e3650e980c13daf30569eb666e000faf19bfc2b7b4cbe999fcdb7aa9d680"
OFFICIAL_OBJECT_NAMES_SHA256 = "608f6a0e5c8ca1c7a92b818430141fe268c85b7930b50f4160f1d65893b5bacd"
OFFICIAL_FIRST = '{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}'
OFFICIAL_LAST = (
    '{"tag": "color_attr", "include": [{"class": "pizza", "count": 1, "color": "blue"}, '
    '{"class": "baseball glove", "count": 1, "color": "yellow"}], '
    '"prompt": "a photo of a blue pizza and a yellow baseball glove"}'
)
OFFICIAL_POSITION_EXAMPLE = (
    '{"tag": "position", "include": [{"class": "teddy bear", "count": 1}, '
    '{"class": "dog", "count": 1, "position": ["right of", 0]}], "prompt": "a photo of a dog right of a teddy bear"}'
)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_object_names_match_official_file():
    assert len(OBJECT_NAMES) == 80 and OBJECT_NAMES[0] == "person"
    assert _sha("".join(n + "\n" for n in OBJECT_NAMES)) == OFFICIAL_OBJECT_NAMES_SHA256


def test_structure_and_counts_per_task():
    samples = generate_geneval_metadata()
    assert len(samples) == 553
    tags = Counter(s["tag"] for s in samples)
    assert tags == {"single_object": 80, "two_object": 99, "counting": 80, "colors": 94, "position": 100, "color_attr": 100}
    assert list(dict.fromkeys(s["tag"] for s in samples)) == list(TASKS)  # tasks appear in order, contiguous
    counts = Counter(s["include"][0]["count"] for s in samples if s["tag"] == "counting")
    assert counts == {2: 26, 3: 28, 4: 26}
    for s in samples:
        assert list(s)[0] == "tag" and list(s)[-1] == "prompt"
        if s["tag"] == "counting":
            assert s["exclude"] == [{"class": s["include"][0]["class"], "count": s["include"][0]["count"] + 1}]
        else:
            assert "exclude" not in s
        if s["tag"] in ("colors", "color_attr"):
            assert all(inc["class"] != "person" and "color" in inc for inc in s["include"])
        if s["tag"] == "position":
            assert s["include"][1]["position"][1] == 0 and "position" not in s["include"][0]
    assert len({json.dumps(s) for s in samples}) == 553  # de-duplicated


def test_first_last_lines_and_full_hash(tmp_path):
    samples = generate_geneval_metadata()
    text = metadata_jsonl(samples)
    lines = text.splitlines()
    assert lines[0] == OFFICIAL_FIRST
    assert lines[-1] == OFFICIAL_LAST
    assert OFFICIAL_POSITION_EXAMPLE in lines
    assert _sha(text) == OFFICIAL_METADATA_SHA256
    assert _sha(prompts_txt(samples)) == OFFICIAL_PROMPTS_SHA256

    out = write_geneval_prompts(tmp_path / "prompts")
    assert hashlib.sha256((out / "evaluation_metadata.jsonl").read_bytes()).hexdigest() == OFFICIAL_METADATA_SHA256
    assert hashlib.sha256((out / "generation_prompts.txt").read_bytes()).hexdigest() == OFFICIAL_PROMPTS_SHA256


def test_other_seed_gives_other_suite():
    # The hash test above can fail: a different seed must give a different file.
    assert _sha(metadata_jsonl(generate_geneval_metadata(seed=44))) != OFFICIAL_METADATA_SHA256
