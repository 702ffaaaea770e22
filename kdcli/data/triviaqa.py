"""TriviaQA: the llm-foundry subset (`context`, `answer`, `aliases`) or the Hub schema (generate); unlabelled,
the answers are not read."""

from __future__ import annotations

from typing import Iterator

from kdcli.data.fields import (
    Example,
    answer_list,
    string_field,
    string_list_field,
    unique,
)
from kdcli.data.files import SourceFile, excerpt, json_rows
from kdcli.errors import DataError
from kdcli.recipe import DataConfig

TRIVIAQA_HINT = (
    "TriviaQA rows have context 'Question: ...\\nAnswer:', answer and aliases (or the Hub trivia_qa "
    "question and answer {value, aliases}); check data.path and data.format"
)


TRIVIA_PREFIX, TRIVIA_SUFFIX = "Question: ", "\nAnswer:"


def read_triviaqa(source: SourceFile, data: DataConfig, names: list[str], labelled: bool) -> Iterator[Example]:
    for row in json_rows(source.path, data.encoding or "utf-8"):
        if "context" in row.data:  # the llm-foundry subset
            context = string_field(row, "context", TRIVIAQA_HINT)
            if not (context.startswith(TRIVIA_PREFIX) and context.endswith(TRIVIA_SUFFIX)):
                raise DataError(
                    f"{row.where}: context should be 'Question: ...\\nAnswer:', got {excerpt(context)}", TRIVIAQA_HINT
                )
            question = context[len(TRIVIA_PREFIX) : -len(TRIVIA_SUFFIX)].strip()
            answers = unique([string_field(row, "answer", TRIVIAQA_HINT),
                              *string_list_field(row, "aliases", TRIVIAQA_HINT)]) if labelled else []
            qid = row.default_id
        elif isinstance(row.data.get("answer"), dict) or (not labelled and "question" in row.data):  # the Hub schema
            question = string_field(row, "question", TRIVIAQA_HINT).strip()
            answers = answer_list(row.data["answer"], row.where) if labelled else []
            qid = row.data.get("question_id") or row.default_id
        else:
            raise DataError(f"{row.where}: not a TriviaQA row (fields: {', '.join(row.data)})", TRIVIAQA_HINT)
        if not question:
            raise DataError(f"{row.where}: empty question", "fix or remove that line")
        yield Example(str(qid), question, [], -1, answers, row.where)
