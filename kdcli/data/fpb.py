"""Financial PhraseBank: latin-1 lines `sentence@label` (classify; for generate the label's name is the answer;
unlabelled, the label is not read)."""

from __future__ import annotations

import codecs
from typing import Iterator

from kdcli.data.fields import Example, class_index
from kdcli.data.files import SourceFile, blocks, check_text, excerpt, lines
from kdcli.errors import DataError
from kdcli.recipe import DataConfig

FPB_HINT = "Financial PhraseBank lines are `sentence@label`; check data.path and data.format"


def _looks_utf8(path) -> bool:
    """Non-ASCII bytes that are all valid UTF-8: almost never real latin-1."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    ascii_only = True
    try:
        for block in blocks(path):
            ascii_only = ascii_only and block.isascii()
            decoder.decode(block)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return not ascii_only


def read_fpb(source: SourceFile, data: DataConfig, names: list[str], labelled: bool) -> Iterator[Example]:
    encoding = data.encoding or "latin-1"
    check_text(source.path, encoding)
    # latin-1 decodes any bytes, so a UTF-8 copy of the release (one circulates) would be read as
    # mojibake without an error. Valid UTF-8 with non-ASCII bytes is almost never real latin-1.
    if data.encoding is None and _looks_utf8(source.path):
        raise DataError(
            f"{source.path} looks like UTF-8, but the Financial PhraseBank release is latin-1",
            "set data.encoding = 'utf-8' to read a re-encoded copy",
        )
    name, stem = str(source.path), source.path.stem
    for number, line in lines(source.path, encoding, checked=True):
        where = f"{name}:{number}"
        sentence, at, label = line.rpartition("@")  # split on the last @: a sentence may contain one
        if not at:
            raise DataError(f"{where}: expected `sentence@label`, got {excerpt(line)}", FPB_HINT)
        if not sentence.strip():
            raise DataError(f"{where}: empty sentence: {excerpt(line)}", "fix or remove that line")
        label_id = class_index(label.strip(), names, where) if labelled else -1
        yield Example(f"{stem}-{number}", sentence.strip(), [], label_id, [], where)
