"""Conversations (jsonl, generate): ``{"messages": [{"role": ..., "content": ...}, ...]}`` per line,
the chat format of instruct models. The last turn is the assistant's answer, the turns before it
the prompt; every model renders them with its own chat template. Unlabelled, a conversation may end
without the answer, and an answer it has is not read."""

from __future__ import annotations

from typing import Iterator

from kdcli.data.fields import Example
from kdcli.data.files import SourceFile, excerpt, json_rows
from kdcli.errors import DataError
from kdcli.recipe import DataConfig

ROLES = ("system", "user", "assistant")
MESSAGES_HINT = (
    'each line is {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}: '
    "roles system, user or assistant, the last turn the assistant's answer"
)


def read_messages(source: SourceFile, data: DataConfig, names: list[str], labelled: bool) -> Iterator[Example]:
    for row in json_rows(source.path, data.encoding or "utf-8"):
        turns = row.data.get("messages")
        least = (2, "two turns") if labelled else (1, "one turn")
        if not isinstance(turns, list) or len(turns) < least[0]:
            raise DataError(f"{row.where}: 'messages' should be a list of at least {least[1]}, got "
                            f"{excerpt(repr(turns))}", MESSAGES_HINT)
        for turn in turns:
            if (not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str)
                    or set(turn) - {"role", "content"}):
                raise DataError(f"{row.where}: not a turn of role system, user or assistant with text content: "
                                f"{excerpt(repr(turn))}", MESSAGES_HINT)
        if not labelled:
            prompt = turns[:-1] if turns[-1]["role"] == "assistant" else turns
            answers = []
        else:
            *prompt, answer = turns
            if answer["role"] != "assistant" or not answer["content"].strip():
                raise DataError(f"{row.where}: the last turn should be the assistant's answer, got "
                                f"{excerpt(repr(answer))}", MESSAGES_HINT)
            answers = [answer["content"].strip()]
        users = [turn["content"] for turn in prompt if turn["role"] == "user"]
        if not users:
            raise DataError(f"{row.where}: no user turn before the answer", MESSAGES_HINT)
        yield Example(str(row.data.get("id", row.default_id)), users[-1], [], -1, answers, row.where,
                      messages=prompt)
