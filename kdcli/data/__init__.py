"""Datasets: read a source, normalise it to kd's schema, split it and save it (`kd prepare`).

Sources are the study's five datasets in their exact release formats (see
shared/data/README.md), each read by a module of its own (``fpb``, ``winogrande``,
``socialiqa``, ``aqua``, ``triviaqa``); generic csv/jsonl/parquet files mapped by
``data.columns`` (``generic``); or a Hugging Face Hub dataset (``hub``, needs network).
``read`` picks the reader and fills a ``store`` (the rows as Arrow batches, in memory or a
scratch file, and a few numbers a row), ``split`` cleans and splits on arrays of row numbers,
``prepare`` saves, and ``stage`` serves a stage's prepared rows to the commands. ``transfer`` reads a
stage's transfer set (unlabelled inputs, saved as its ``transfer`` split) and drops the rows that
would leak held-out text. No step holds a Python object per row (issue 15).

Every example becomes one row of the common schema:

- ``id``       str, stable (the release's own id, else ``FILESTEM-LINE``)
- ``text``     str, the prompt or sentence
- ``options``  list[str], the answer options of a choice (empty otherwise)
- ``label``    int, 0-based class or option index; -1 when there is none (generate)
- ``answers``  list[str], reference answers (TriviaQA: answer first, then aliases; AQuA: the correct option)

Label conventions for the generic formats, where a value's meaning is not fixed by a release:
classify labels are a class name from ``data.label_names`` or a 0-based class index (without
``label_names`` the class names are inferred: ``0..N`` for integer labels, else the sorted
names); choice labels are a 0-based option index or an option letter ``A``, ``B``, ...
The built-in adapters read their release's own convention (WinoGrande ``"1"``/``"2"``,
Social IQA 1-3, AQuA ``A``-``E``).

Prepared data lives in ``runs/NAME/data/STAGE/`` (the files ``DatasetDict.save_to_disk``
writes, written a batch at a time, plus ``manifest.json``). The manifest carries a fingerprint
of everything that shapes the data (data config, task, seed, source file hashes, kd version),
so an unchanged second run is a no-op. Every problem with the input is a DataError raised before anything is written.
"""

from __future__ import annotations

from kdcli.data.fields import Example
from kdcli.data.files import resolve_path, source_files
from kdcli.data.prepare import PrepareResult, load_prepared, prepare_recipe
from kdcli.data.read import read_examples

__all__ = ["Example", "PrepareResult", "load_prepared", "prepare_recipe", "read_examples", "resolve_path",
           "source_files"]
