"""Whether a profile's figures can be set against the published ones, and if not, why not.

Only the ``published`` profile runs what the source table ran. Another profile
(``quick``) trains a smaller model, or on other data, at other sizes: its
figures differing from the published ones says nothing about the engine, so
``compare`` says once per table why it does not compare them row by row, and
compares what does carry over (the shape of the speedups, each over the ideal
of its own settings; the gap between pipeline and data-parallel rows).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional

if TYPE_CHECKING:  # config imports models; rendering needs only the attributes
    from gpipe_bench.config import Profile, Row, Table

__all__ = ["PUBLISHED", "published_row", "why_not"]

#: The profile that runs the published table's setup.
PUBLISHED = "published"


def published_row(table: "Table", name: str) -> Optional["Row"]:
    """The published profile's row ``name``: the settings the published figures belong to."""
    profile = table.profiles.get(PUBLISHED)
    return next((r for r in profile.rows if r.name == name), None) if profile is not None else None


def why_not(table: "Table", profile: "Profile") -> Optional[str]:
    """None where ``profile`` is the published setup; else what differs from it, in words."""
    if profile.name == PUBLISHED:
        return None
    published = table.profiles.get(PUBLISHED)
    if published is None:
        return f"the {profile.name} profile has no published setup to compare with"
    theirs, ours = published.settings, profile.settings
    differs: List[str] = []
    model, their_model = profile.model or table.model, published.model or table.model
    if model != their_model:
        differs.append(f"{model}, not {their_model}")
    elif dict(profile.model_args) != dict(published.model_args) or any(
        dict(row.model_args) != dict(mine.model_args)
        for row in profile.rows
        for mine in [published_row(table, row.name)]
        if mine is not None
    ):
        differs.append(f"a smaller {model}")
    dataset, their_dataset = ours.extra.get("dataset"), theirs.extra.get("dataset")
    if dataset != their_dataset:
        differs.append(f"{dataset or 'synthetic'} data, not {their_dataset or 'synthetic'}")
    if ours.input_size != theirs.input_size:
        differs.append(f"{ours.input_size}px inputs, not {theirs.input_size}px")
    if any(
        (row.batch, row.chunks) != (mine.batch, mine.chunks)
        for row in profile.rows
        for mine in [published_row(table, row.name)]
        if mine is not None
    ):
        differs.append("other batches")
    what = ", ".join(differs) if differs else "other settings"
    return f"the {profile.name} profile runs {what}"
