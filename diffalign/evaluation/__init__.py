"""Evaluation: GenEval (prompts, rules, detectors), benchmark suites, generation, scoring and reports.

Entry points: `diffalign eval` / `diffalign score` (diffalign.evaluation.cli), `run_eval`
(diffalign.evaluation.runner), `load_suite` (diffalign.evaluation.suites). Submodules import their heavy
dependencies lazily. See docs/evaluation.md.
"""
