"""
Scoring generated answers against reference answers, with error bars.

    from score import score, wilson, mcnemar
    score("The answer is 85.", "85", "numeric")     # True: the last number in each is equal
    wilson(31, 40)                                  # (0.625, 0.877): 95% interval of 31 right out of 40
    mcnemar(right_a, right_b)                       # who gets which examples right, and the exact p-value
    pick_metric(["85", "-3.5"])                     # "numeric": the metric --eval-metric auto takes

Metrics (METRICS): exact (after normalisation: case, whitespace, punctuation), contains (the normalised
reference appears in the normalised answer), numeric (the last number of each, equal within a relative
1e-6), choice (the first standalone choice letter A-J), regex (the pattern's first group, or its match,
equals the reference after normalisation). This file imports nothing of the project.
"""
import math
import re
import string

METRICS = ("exact", "contains", "numeric", "choice", "regex")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_CHOICE = re.compile(r"(?<![A-Za-z])\(?([A-J])\)?(?![A-Za-z])")


def normalize(s: str) -> str:
    """Lower case, punctuation to spaces, runs of whitespace to one space."""
    return " ".join(s.lower().translate(_PUNCT).split())


def last_number(s: str) -> float | None:
    found = _NUMBER.findall(s)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:   # "1,2,,3": commas that are not thousands separators
        return None


def first_choice(s: str) -> str | None:
    m = _CHOICE.search(s.strip())
    return m.group(1) if m else None


def score(answer: str, reference: str, metric: str = "exact", pattern: str | None = None) -> bool:
    """Whether `answer` gets `reference` right under `metric`. An empty answer is never right."""
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r}: choose one of {', '.join(METRICS)}")
    if not answer.strip():
        return False
    if metric == "exact":
        return normalize(answer) == normalize(reference)
    if metric == "contains":
        ref = normalize(reference)
        return bool(ref) and f" {ref} " in f" {normalize(answer)} "
    if metric == "numeric":
        a, r = last_number(answer), last_number(reference)
        return a is not None and r is not None and math.isclose(a, r, rel_tol=1e-6, abs_tol=1e-9)
    if metric == "choice":
        a, r = first_choice(answer), first_choice(reference)
        return a is not None and a == r
    if not pattern:
        raise ValueError("metric 'regex' needs a pattern (--eval-regex)")
    m = re.search(pattern, answer)
    return bool(m) and normalize(m.group(1) if m.groups() else m.group(0)) == normalize(reference)


def pick_metric(references: list[str]) -> str:
    """The metric that suits these references: choice when every one is a choice letter, numeric when
    every one is a number, else exact."""
    refs = [r.strip() for r in references]
    if refs and all(re.fullmatch(r"\(?[A-J]\)?", r) for r in refs):
        return "choice"
    if refs and all(_NUMBER.fullmatch(r) for r in refs):
        return "numeric"
    return "exact"


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval for k successes in n trials (95% by default); (0, 1) when n = 0.
    Unlike p ± z·sqrt(p(1-p)/n) it stays inside [0, 1] and is honest at 0 or n successes."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar(right_a: list[bool], right_b: list[bool]) -> dict:
    """Two models on the same examples: how many each gets right that the other does not, and the
    two-sided p-value of McNemar's exact test (a binomial test on those discordant examples: under
    "no difference" each is equally likely to favour either model)."""
    if len(right_a) != len(right_b):
        raise ValueError(f"mcnemar: {len(right_a)} and {len(right_b)} results; they must score the same examples")
    a_only = sum(a and not b for a, b in zip(right_a, right_b))
    b_only = sum(b and not a for a, b in zip(right_a, right_b))
    n = a_only + b_only
    tail = sum(math.comb(n, i) for i in range(min(a_only, b_only) + 1)) / 2 ** n if n else 0.5
    return dict(a_only=a_only, b_only=b_only, p=min(1.0, 2 * tail))
