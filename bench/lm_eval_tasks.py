"""lm-evaluation-harness task configs pointed at local files (no network): its own hellaswag,
lambada_openai and wikitext processing, and a generic multiple-choice task. Shared by
bench/bench_tasks.py and tests/test_tasks.py's peer test."""

from __future__ import annotations

import json
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tasks"
MC_FILE = FIXTURES / "multiple_choice.jsonl"

LM_EVAL_TASKS = {"hellaswag": "hellaswag_fx", "lambada": "lambada_fx", "wikitext2": "wikitext_fx",
                 "multiple_choice": "mc_fx"}


def write_lm_eval_configs(d: Path, pages: list[str]) -> dict[str, str]:
    """lm-eval's hellaswag / lambada_openai / wikitext task configs with the dataset pointed at the
    local fixtures (the same text processing: lm-eval's own functions)."""
    (d / "pages.jsonl").write_text("".join(json.dumps({"page": p}) + "\n" for p in pages), encoding="utf-8")
    (d / "hs_utils.py").write_text("from lm_eval.tasks.hellaswag.utils import process_docs  # noqa: F401\n")
    (d / "wt_utils.py").write_text("from lm_eval.tasks.wikitext.preprocess_wikitext import (  # noqa: F401\n"
                                   "    process_results, wikitext_detokenizer)\n")
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n"
    (d / "hellaswag_fx.yaml").write_text(
        f"task: hellaswag_fx\n{common}    validation: {FIXTURES}/hellaswag/hellaswag_val.jsonl\n"
        "output_type: multiple_choice\nvalidation_split: validation\nprocess_docs: !function hs_utils.process_docs\n"
        'doc_to_text: "{{query}}"\ndoc_to_target: "{{label}}"\ndoc_to_choice: "choices"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (d / "lambada_fx.yaml").write_text(
        f"task: lambada_fx\n{common}    test: {FIXTURES}/lambada/lambada_test.jsonl\n"
        "output_type: loglikelihood\ntest_split: test\n"
        "doc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\ndoc_to_target: \"{{' '+text.split(' ')[-1]}}\"\n"
        "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (d / "wikitext_fx.yaml").write_text(
        f"task: wikitext_fx\n{common}    test: {d}/pages.jsonl\n"
        "output_type: loglikelihood_rolling\ntest_split: test\ndoc_to_text: \"\"\n"
        "doc_to_target: !function wt_utils.wikitext_detokenizer\nprocess_results: !function wt_utils.process_results\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    (d / "mc_fx.yaml").write_text(
        f"task: mc_fx\n{common}    test: {MC_FILE}\noutput_type: multiple_choice\ntest_split: test\n"
        'doc_to_text: "{{context}}"\ndoc_to_target: "{{label}}"\ndoc_to_choice: "{{choices}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return dict(LM_EVAL_TASKS)
