"""Suite files are data: a suite that names Python code (a `callable` prompt source or a `module:factory`
scorer) is refused unless the caller opts in (`diffalign eval --allow-code-in-suites`)."""

import importlib

import pytest

from diffalign.evaluation.suites import SuiteError, available_suites, load_suite

ALLOW_CODE_FLAG = "--allow-code-in-suites"  # the documented command-line flag

CALLS: list[str] = []


def recording_prompts():
    CALLS.append("called")
    return ["a red circle", "a blue square"]


def _calls() -> list[str]:
    # the suite imports this file as `tests.test_suite_security`, maybe not the module object pytest runs
    return importlib.import_module("tests.test_suite_security").CALLS


def _write(tmp_path, text, name="s.yaml"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_callable_prompt_source_is_refused_by_default(tmp_path):
    _calls().clear()
    path = _write(tmp_path, "name: c\nprompts: {type: callable, target: 'tests.test_suite_security:recording_prompts'}\n")
    with pytest.raises(SuiteError) as err:
        load_suite(path).load_prompts()
    message = str(err.value)
    assert "\n" not in message and str(path) in message and ALLOW_CODE_FLAG in message
    assert "tests.test_suite_security:recording_prompts" in message
    assert _calls() == []  # nothing was imported or run

    s = load_suite(path, allow_code=True)
    assert [i.prompt for i in s.load_prompts()] == ["a red circle", "a blue square"] and _calls() == ["called"]


def test_scorer_import_path_in_a_suite_is_refused_by_default(tmp_path):
    (tmp_path / "p.txt").write_text("one\n", encoding="utf-8")
    path = _write(tmp_path, "name: s\nprompts: {type: file, path: p.txt}\nscorers: [toy, 'evil.module:factory']\n")
    with pytest.raises(SuiteError, match="evil.module:factory"):
        load_suite(path)
    assert load_suite(path, allow_code=True).scorers == ["toy", "evil.module:factory"]


def test_shipped_suites_are_data_only():
    for name in available_suites():
        load_suite(name)  # allow_code=False: raises if a shipped suite names code


def test_toyworld_prompts_file_equals_the_toy_grammar():
    """The toyworld suite's data-only prompt file gives exactly eval_prompts(): same prompts, same metadata,
    same order (the demo's numbers depend on it)."""
    from diffalign.toy.prompts import eval_prompts

    suite = load_suite("toyworld")
    assert [s.type for s in suite.prompts] == ["file"]
    items = suite.load_prompts()
    assert [it.metadata for it in items] == eval_prompts()
    assert [it.index for it in items] == list(range(18)) and all(it.group is None for it in items)


def test_eval_cli_refuses_code_in_suites_with_one_line_and_exit_2(tmp_path, capsys):
    from diffalign.evaluation.cli import eval_main

    _calls().clear()
    path = _write(tmp_path, "name: c\nprompts: {type: callable, target: 'tests.test_suite_security:recording_prompts'}\n")
    rc = eval_main(["--model", str(tmp_path / "no-model"), "--suite", str(path), "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and ALLOW_CODE_FLAG in err and str(path) in err
    assert _calls() == []


def test_eval_help_documents_the_flag(capsys):
    from diffalign.evaluation.cli import eval_main

    with pytest.raises(SystemExit):
        eval_main(["--help"])
    assert ALLOW_CODE_FLAG in capsys.readouterr().out


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("name: x\nprompts: {type: file, path: p.txt}\nstepz: 3\n", "stepz: Extra inputs are not permitted"),
        ("name: x\nprompts: {type: file, path: p.txt}\nsampler: magic\n", "unknown sampler 'magic'"),
        ("name: x\nprompts: [unclosed\n", "not valid YAML"),
    ],
)
def test_invalid_suite_errors_are_one_line(tmp_path, text, fragment):
    path = _write(tmp_path, text)
    with pytest.raises(SuiteError) as err:
        load_suite(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value) and fragment in str(err.value)
