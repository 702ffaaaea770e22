"""Financial PhraseBank: latin-1 lines `sentence@label` (classify; for generate the label's name is the answer)."""

from __future__ import annotations

from kdcli.data.fields import Example, class_index
from kdcli.data.files import SourceFile, excerpt, lines, read_text
from kdcli.errors import DataError
from kdcli.recipe import DataConfig

FPB_HINT = "Financial PhraseBank lines are `sentence@label`; check data.path and data.format"


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def read_fpb(source: SourceFile, data: DataConfig, names: list[str]) -> list[Example]:
    text = read_text(source.path, data.encoding or "latin-1")
    # latin-1 decodes any bytes, so a UTF-8 copy of the release (one circulates) would be read as
    # mojibake without an error. Valid UTF-8 with non-ASCII bytes is almost never real latin-1.
    if data.encoding is None and not text.isascii() and _is_utf8(text.encode("latin-1")):
        raise DataError(
            f"{source.path} looks like UTF-8, but the Financial PhraseBank release is latin-1",
            "set data.encoding = 'utf-8' to read a re-encoded copy",
        )
    examples = []
    for number, line in lines(source.path, text):
        where = f"{source.path}:{number}"
        sentence, at, label = line.rpartition("@")  # split on the last @: a sentence may contain one
        if not at:
            raise DataError(f"{where}: expected `sentence@label`, got {excerpt(line)}", FPB_HINT)
        if not sentence.strip():
            raise DataError(f"{where}: empty sentence: {excerpt(line)}", "fix or remove that line")
        label_id = class_index(label.strip(), names, where)
        examples.append(Example(f"{source.path.stem}-{number}", sentence.strip(), [], label_id, [], where))
    return examples
