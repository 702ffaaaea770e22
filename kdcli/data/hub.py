"""A Hugging Face Hub dataset (``datasets.load_dataset``; needs network)."""

from __future__ import annotations

from functools import partial
from typing import Callable, Iterator

from kdcli.data.files import SPLITS, RawRow
from kdcli.errors import DataError
from kdcli.recipe import DataConfig


def read_hub(data: DataConfig) -> tuple[dict[str, Callable[[], Iterator[RawRow]]], list[str]]:
    """Rows of a Hub dataset's train/validation/test splits (each a function that goes through them
    again: the Arrow files `load_dataset` made are read a row at a time, never copied), and its class
    names when the label is a ClassLabel."""
    import datasets

    try:
        loaded = datasets.load_dataset(data.hub_name, data.hub_config)
    except Exception as exc:  # offline, unknown name, gated, bad config: all the user's to fix
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"could not load Hub dataset '{data.hub_name}'"
            + (f" ({data.hub_config})" if data.hub_config else "")
            + f": {reason}",
            "without network, download the data once and set data.path (or data.files) to the local file "
            "with format = 'jsonl', 'csv' or 'parquet'",
        ) from None
    if "train" not in loaded:
        raise DataError(
            f"Hub dataset '{data.hub_name}' has no train split (it has {', '.join(loaded)})",
            "choose another hub_config",
        )
    def rows(split: str) -> Iterator[RawRow]:
        for i, row in enumerate(loaded[split], start=1):
            yield RawRow(f"{data.hub_name}[{split}] row {i}", f"{split}-{i}", row)

    parts = {split: partial(rows, split) for split in SPLITS if split in loaded}
    label_feature = loaded["train"].features.get(data.columns.label or "")
    names = list(label_feature.names) if isinstance(label_feature, datasets.ClassLabel) else []
    return parts, names
