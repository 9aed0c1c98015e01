"""Scorers, the Wilson interval and McNemar's test, against hand-computed values."""
import re

import pytest

from score import mcnemar, pick_metric, score, wilson


def test_exact_and_contains_normalise_case_whitespace_punctuation():
    assert score("  Paris. ", "paris", "exact") and score("PARIS!", "Paris", "exact")
    assert not score("Paris, France", "Paris", "exact")
    assert score("It is Paris, France.", "paris", "contains")
    assert not score("Parisian", "Paris", "contains")   # whole words, not a substring of one
    assert not score("", "", "exact") and not score("   ", "x", "contains")   # an empty answer is never right


def test_numeric_takes_the_last_number_of_each():
    assert score("47 + 38 = 85", "85", "numeric")
    assert score("The total is 1,234.50 dollars", "1234.5", "numeric")
    assert score("It drops to -3.", "-3", "numeric")
    assert not score("85 or maybe 86", "85", "numeric")          # several numbers: the last one counts
    assert not score("eighty-five", "85", "numeric")             # no number
    assert not score("85", "no number here", "numeric")


def test_choice_and_regex():
    assert score("(B) because ...", "B", "choice") and score("B. Blue", "(B)", "choice")
    assert not score("Because A is wrong, the answer is C", "C", "choice")   # the first letter counts: A
    assert not score("I do not know", "A", "choice")   # no standalone letter ("I" is past J)
    assert score("Answer: 42 apples", "42", "regex", r"Answer:\s*(\d+)")
    assert not score("Answer: 41", "42", "regex", r"Answer:\s*(\d+)")
    with pytest.raises(ValueError, match="needs a pattern"):
        score("x", "x", "regex")
    with pytest.raises(ValueError, match="choose one of"):
        score("x", "x", "bleu")


def test_wilson_interval_equals_hand_computed_values():
    # 31 of 40: centre (0.775 + z²/80) / (1 + z²/40), half-width z·sqrt(pq/n + z²/4n²) / (1 + z²/40), z = 1.96.
    lo, hi = wilson(31, 40)
    assert lo == pytest.approx(0.62496, abs=1e-4) and hi == pytest.approx(0.87684, abs=1e-4)
    lo, hi = wilson(0, 10)   # none right: the interval still has width
    assert lo == 0 and hi == pytest.approx(0.27753, abs=1e-4)
    assert wilson(10, 10) == pytest.approx((0.72247, 1.0), abs=1e-4) and wilson(0, 0) == (0.0, 1.0)


def test_mcnemar_exact_test_equals_hand_computed_values():
    a = [True] * 3 + [True] + [False] * 5 + [False] * 2   # a alone right on 1, b alone on 5
    b = [True] * 3 + [False] + [True] * 5 + [False] * 2
    r = mcnemar(a, b)
    assert (r["a_only"], r["b_only"]) == (1, 5) and r["p"] == pytest.approx(2 * (1 + 6) / 64)
    assert mcnemar([True, False], [True, False])["p"] == 1.0          # no discordant example
    assert mcnemar([False] * 10, [True] * 10)["p"] == pytest.approx(2 / 1024)
    with pytest.raises(ValueError):
        mcnemar([True], [True, False])


def _solve(family, q):
    """The answer to a generated question, worked out again from its text alone."""
    nums = [int(x) for x in re.findall(r"\d+", q)]
    if family == "sum":
        return str(nums[0] + nums[1])
    if family == "difference":
        return str(nums[0] - nums[1])
    if family == "product":
        return str(nums[0] * nums[1])
    if family == "largest":
        return str(max(nums))
    if family == "sort":
        return ", ".join(map(str, sorted(nums)))
    if family == "next_term":
        return str(nums[3] + nums[3] - nums[2])
    words = re.search(r"(?:order: |list: |word ')([a-z ,]+)'?[.?]", q).group(1).replace(",", " ").split()
    if family == "reverse":
        return " ".join(words[::-1])
    if family == "count":
        return str(len(words))
    return words[0][-1]   # last_letter


def test_task_records_are_right_unique_and_reproducible():
    """The audit's default task: every family in turn, no question twice (a held-out question was never
    trained on), each reference what the question asks, scored right by the exact metric, the same
    records for the same seed."""
    from defaults import TASK_FAMILIES, task_records
    recs = task_records(450)
    assert recs == task_records(450) and recs != task_records(450, seed=1)
    assert len({r["instruction"] for r in recs}) == 450
    assert [r["family"] for r in recs[:len(TASK_FAMILIES)]] == list(TASK_FAMILIES)
    for r in recs:
        assert r["output"] == _solve(r["family"], r["instruction"]), r
        assert r["instruction"].endswith(" only.") and score(r["output"], r["output"], "exact")


def test_pick_metric_suits_the_references():
    """--eval-metric auto: choice letters, numbers, anything else."""
    assert pick_metric(["A", "(C)", " J "]) == "choice"
    assert pick_metric(["85", "-3.5", "1,000", ".5"]) == "numeric"
    assert pick_metric(["85", "eighty"]) == pick_metric(["A", "K"]) == pick_metric(["a, b"]) == pick_metric([]) == "exact"
