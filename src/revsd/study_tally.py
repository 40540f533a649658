"""The paper's Table 3 from the study's votes: per annotator, the pairs all annotators agree on, the average.

Pure arithmetic on a votes table (``annotator, pair_id, answer``); ``revsd.study`` stores the votes and writes
``tally.md`` / ``tally.csv``.
"""

from __future__ import annotations

import pandas as pd

ANSWERS = ("ours", "original", "undecided")


def tally(votes: pd.DataFrame) -> pd.DataFrame:
    """Rows: each annotator, ``all agree`` (pairs judged by every annotator with one common answer, counted
    per answer), ``average`` (mean of the annotator rows); columns: ours, original, undecided, pairs."""
    cols = [*ANSWERS, "pairs"]
    if votes.empty:
        return pd.DataFrame(columns=cols, dtype=float)
    per = pd.crosstab(votes["annotator"], votes["answer"]).reindex(columns=list(ANSWERS), fill_value=0)
    per["pairs"] = per.sum(axis=1)
    n_annot = votes["annotator"].nunique()
    by_pair = votes.groupby("pair_id")["answer"].agg(["nunique", "size", "first"])
    agree = by_pair[(by_pair["size"] == n_annot) & (by_pair["nunique"] == 1)]["first"].value_counts()
    all_agree = {a: int(agree.get(a, 0)) for a in ANSWERS}
    all_agree["pairs"] = int((by_pair["size"] == n_annot).sum())
    table = per.astype(float)
    table.loc["all agree"] = all_agree
    table.loc["average"] = per.mean(axis=0).round(2)
    table.index.name = "annotator"
    return table


def to_markdown(table: pd.DataFrame) -> str:
    head = ["annotator", "ours", "original", "undecided", "pairs judged"]
    fmt = lambda v: f"{v:g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([str(i), *map(fmt, row)]) + " |" for i, row in zip(table.index, table.values)]
    return "\n".join(lines) + "\n"
