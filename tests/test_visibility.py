"""The visibility rule against a brute-force reading of the spec, and the pattern parser."""

import numpy as np
import pytest

from mlx_ksa import visibility
from mlx_ksa.layout import Layout
from mlx_ksa.pattern import PatternError, parse_windows
from tests import torch_reference as ref


@pytest.mark.parametrize("k,S,W", [(4, 1, 2), (4, 2, 0), (8, 1, 1), (3, 2, 5), (2, 1, 100), (5, 3, 1)])
def test_predicate_matches_spec_enumeration(k, S, W):
    rows = ref.expanded_layout(13 * k + 2, k, S)
    L = len(rows)
    expected = ref.spec_mask(rows, k, W)
    p = np.arange(L)
    got = visibility.visible(p[:, None], p[None, :], Layout(k, S), W)
    np.testing.assert_array_equal(got, expected)


def test_ranges_are_the_text_rows_of_the_predicate():
    k, S, W = 4, 2, 3
    layout = Layout(k, S)
    for t in range(60):
        q = layout.expanded_text_index(t)
        text = [u for u in range(60) if visibility.visible(q, layout.expanded_text_index(u), layout, W)]
        summ = [c * S + j for c in range(15) for j in range(S)
                if visibility.visible(q, layout.expanded_summary_index(c, j), layout, W)]
        assert text == list(range(visibility.band_start(t, k, W), t + 1))
        assert summ == list(range(visibility.summary_prefix(t, k, S, W)))


def test_summary_mask_is_the_summary_rows_of_the_predicate():
    k, S, W = 4, 3, 2
    layout = Layout(k, S)
    c = 5
    for j in range(S):
        q = layout.expanded_summary_index(c, j)
        own = [layout.expanded_summary_index(c, i) for i in range(S)] + [c * k + u + c * S for u in range(k)]
        np.testing.assert_array_equal(
            visibility.summary_mask(k, S)[j], visibility.visible(q, np.array(own), layout, W)
        )
        # ... and nothing outside its chunk.
        others = np.array([p for p in range(10 * (k + S)) if p // (k + S) != c])
        assert not visibility.visible(q, others, layout, W).any()


@pytest.mark.parametrize("text,layers,expected", [
    ("([128]*3+[16768]*1)*9", 36, [128, 128, 128, 16768] * 9),
    ("([128]*3+[1024]*1)*6", 24, [128, 128, 128, 1024] * 6),
    ("([2]*3+[64]*1)*1", 4, [2, 2, 2, 64]),
    ("4", 3, [4, 4, 4]),
    ("2*(1+1)", 2, [4, 4]),
    ("[1, 2,3]", 3, [1, 2, 3]),
    ("3*[5]+[6,]", 4, [5, 5, 5, 6]),
    (7, 2, [7, 7]),
    ([1, 0], 2, [1, 0]),
])
def test_pattern_valid(text, layers, expected):
    assert parse_windows(text, layers) == expected


@pytest.mark.parametrize("text", [
    "__import__('os').system('echo pwned')",
    "[1]*3 if True else 0",
    "lambda: 1",
    "[1]*4; import os",
    "-1",
    "[1]*-1",
    "[[1]]*4",
    "[1]*[2]",
    "1+[1]",
    "(1",
    "[1,2",
    "",
    "1.5",
    "[1]*10**9",
    "[1]*99999999",
    "9" * 60,
    "(" * 5000,
    "(" * 1000 + "1" + ")" * 1000,
    "[" * 3000,
    "[1]*5",  # wrong layer count
])
def test_pattern_rejects(text):
    with pytest.raises(PatternError):
        parse_windows(text, 4)


@pytest.mark.parametrize("value", [None, 1.0, True, {"a": 1}, [1, -2, 3, 4], [1, 2, 3, "4"]])
def test_pattern_rejects_types(value):
    with pytest.raises(PatternError):
        parse_windows(value, 4)
