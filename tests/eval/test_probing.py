"""Corpus labels on a hand-written snippet, and k-sparse probes that must find a planted feature."""

import numpy as np
import pytest

from sparse_coding.eval import probing

# Written for this test, in the shape of reStructuredText with Python in it.
ROW = ["Intro", " line", "\n", "Use", " ``", "len", "``", " like", " this", "::", "\n", "\n", "   ", "for",
       " x", " in", " y", ":", "\n", "Back", " to", " prose", " if", " so", "\n", "   ", ">>>", " import", " os",
       "\n"]  # fmt: skip


def test_corpus_labels_by_hand():
    labels = probing.corpus_labels([ROW])
    at = {task: dict(zip(range(len(ROW)), lab[0].tolist(), strict=True)) for task, lab in labels.items()}
    assert at["code_block"][0] == -1 and at["code_block"][1] == -1  # before the first newline: unlabelled
    assert [at["code_block"][i] for i in (13, 14, 15, 16)] == [1, 1, 1, 1]  # the indented block after '::'
    assert [at["code_block"][i] for i in (19, 20, 22)] == [0, 0, 0]  # back at the block's indentation
    assert at["doctest"][26] == 1 and at["doctest"][27] == 1 and at["doctest"][13] == 0
    assert at["code_block"][26] == 1  # a doctest line is code too
    assert at["inline_literal"][5] == 1 and at["inline_literal"][3] == 0
    assert at["python_keyword"][13] == 1 and at["python_keyword"][14] == 0  # 'for' in code: yes; 'x': no
    assert at["python_keyword"][22] == -1  # 'if' in prose is not asked about
    assert at["python_keyword"][27] == 1  # 'import' on a doctest line


def test_sparse_probe_finds_a_planted_feature():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    x = rng.normal(size=(2000, 30))
    x[:, 17] += 3 * y  # one informative feature among noise
    labels = {"code_block": np.where(np.arange(2000) % 7 == 0, -1, y)[None, :]}
    tokens, tasks = probing.probe_set(labels, 600, seed=0)
    yy, train, test = tasks["code_block"]
    assert (yy[train] == 1).sum() == (yy[train] == 0).sum() and len(test) == 240
    assert not np.isin(tokens[train], tokens[test]).any()
    out = probing.probe_tasks({"f": x[tokens]}, tasks, ks=[1, 5, 50], dense=x[tokens])
    acc = out["tasks"]["code_block"]["f"]
    assert acc["1"] > 0.9 and "50" not in acc  # k above the number of features is skipped
    assert out["mean"]["f"]["1"] == acc["1"] and out["mean"]["dense"] > 0.9
    noise = probing.probe_tasks({"noise": np.delete(x, 17, axis=1)[tokens]}, tasks, ks=[1])
    assert noise["tasks"]["code_block"]["noise"]["1"] < 0.65


def test_a_task_without_enough_tokens_is_skipped():
    labels = {"doctest": np.array([[1] * (probing.MIN_PER_CLASS - 1) + [0] * 100])}
    tokens, tasks = probing.probe_set(labels, 100, seed=0)
    assert tasks == {} and len(tokens) == 0
    assert probing.probe_tasks({}, tasks, [1]) == {"tasks": {}, "mean": {}}


@pytest.mark.parametrize("text", ["no newline at all", ""])
def test_rows_without_a_full_line_are_unlabelled(text):
    labels = probing.corpus_labels([[text]])
    assert all((lab == -1).all() for lab in labels.values())
