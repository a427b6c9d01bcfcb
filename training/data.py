"""Training data: JSONL files or built-in tasks -> tokenized examples with completion-only labels."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from remix.chat import assistant_text, text_of
from remix.chat import prompt_ids as chat_ids  # (the prompt as the server builds it)
from training.tasks import TASKS, build_task

IGNORE = -100  # label of tokens that carry no loss (prompt, padding)


class DataError(ValueError):
    """Bad training data; the message names the file, line and field of every problem (up to 20)."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE outside the completion / assistant tokens
    task: str = "custom"
    prompt_ids: list[int] | None = None  # the generation prompt (for exact-match evaluation)
    reference: str | None = None  # the expected completion text


ROLES = ("system", "developer", "user", "assistant", "tool")


def _message_problems(m, where: str, field: str) -> list[str]:
    """Problems of one message (field: its path in the row, e.g. messages[2])."""
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        return [f"{where}: field '{field}' must be an object with a string 'role'"]
    if m["role"] not in ROLES:
        return [f"{where}: field '{field}.role' must be one of {', '.join(ROLES)}, got {m['role']!r}"]
    calls = m.get("tool_calls")
    if calls is not None:
        if m["role"] != "assistant":
            return [f"{where}: field '{field}.tool_calls': only assistant messages carry tool calls"]
        if not isinstance(calls, list) or not calls:
            return [f"{where}: field '{field}.tool_calls' must be a non-empty list"]
        for j, c in enumerate(calls):
            f = c.get("function") if isinstance(c, dict) else None
            if not isinstance(f, dict) or not isinstance(f.get("name"), str) \
                    or not isinstance(f.get("arguments"), (str, dict)):
                return [f"{where}: field '{field}.tool_calls[{j}]' must be {{'function': {{'name': str, 'arguments': JSON text or "
                        f"object}}}}"]
    content = m.get("content")
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return []
    if not isinstance(content, str) and not (content is None and calls):
        return [f"{where}: field '{field}.content' must be a string or a list of text parts (or null beside tool_calls)"]
    return []


def _row_problems(row, where: str) -> list[str]:
    if not isinstance(row, dict):
        return [f"{where}: expected a JSON object, got {type(row).__name__}"]
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            return [f"{where}: field 'messages' must be a non-empty list"]
        problems = [p for i, m in enumerate(msgs) for p in _message_problems(m, where, f"messages[{i}]")]
        tools = row.get("tools")
        if tools is not None and (not isinstance(tools, list) or not all(
                isinstance(t, dict) and isinstance(t.get("function"), dict) and isinstance(t["function"].get("name"), str)
                for t in tools)):
            problems.append(f"{where}: field 'tools' must be a list of {{'type': 'function', 'function': {{'name', "
                            f"'description', 'parameters'}}}} objects")
        if not problems and msgs[-1].get("role") != "assistant":
            problems.append(f"{where}: field 'messages' must end with an assistant message (the loss is on it)")
        return problems
    problems = []
    for field in ("prompt", "completion"):
        if field not in row:
            problems.append(f"{where}: field '{field}' is missing (rows need prompt+completion or messages)")
        elif not isinstance(row[field], str):
            problems.append(f"{where}: field '{field}' must be a string, got {type(row[field]).__name__}")
    if not problems and not row["completion"]:
        problems.append(f"{where}: field 'completion' is empty")
    return problems


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSONL file, validated; raises DataError listing every bad row (file:line: field ...)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows, problems = [], []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                problems.append(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})")
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{where}: invalid JSON ({e.msg} at column {e.colno})")
                continue
            found = _row_problems(row, where)
            problems += found
            if not found:
                rows.append(row)
    if problems:
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DataError(f"{len(problems)} bad row(s) in {path}:\n  - " + "\n  - ".join(problems[:20]) + more)
    if not rows:
        raise DataError(f"{path}: no examples")
    return rows


def to_messages(row: dict) -> list[dict]:
    if "messages" in row:
        return row["messages"]
    return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]


def tokenize(row: dict, tokenizer, max_len: int, chat: bool = True) -> Example | None:
    """Tokenize one row; labels cover the assistant turns only. None if nothing to learn fits max_len."""
    task = row.get("task", "custom")
    if chat and tokenizer.chat_template:
        messages, tools = to_messages(row), row.get("tools")
        ids, labels = [], []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix = chat_ids(tokenizer, messages[:i], tools, add_generation_prompt=True)
            full = chat_ids(tokenizer, messages[: i + 1], tools, add_generation_prompt=False)
            if full[: len(prefix)] != prefix:
                raise DataError("the tokenizer's chat template does not render turns as prefixes; use chat: false")
            labels += [IGNORE] * (len(prefix) - len(ids)) + full[len(prefix):]
            ids = full
        prompt_ids = prefix  # (the last message is the assistant's: its prefix is the generation prompt)
        reference = assistant_text(messages[-1])  # (with calls: as the model writes them)
    else:
        prompt = row["prompt"] if "prompt" in row else "\n".join(text_of(m.get("content"))
                                                                 for m in row["messages"][:-1])
        reference = row["completion"] if "completion" in row else assistant_text(row["messages"][-1])
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        completion = tokenizer(reference, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        ids, labels = prompt_ids + completion, [IGNORE] * len(prompt_ids) + completion
    ids, labels = ids[:max_len], labels[:max_len]
    if all(label == IGNORE for label in labels):
        return None
    return Example(ids, labels, task, prompt_ids, reference)


def load_examples(source: str, split: str, tokenizer, max_len: int, size: int, seed: int, chat: bool = True,
                  rows: list[dict] | None = None) -> list[Example]:
    """Examples from a built-in task name or a JSONL path (``rows``: that file's rows, already read and split)."""
    if rows is None:
        rows = build_task(source, split, size, seed) if source in TASKS else read_jsonl(source)
    examples = [ex for row in rows if (ex := tokenize(row, tokenizer, max_len, chat)) is not None]
    if not examples:
        raise DataError(f"{source}: no example has a completion within max_seq_len={max_len}")
    return examples


def split_rows(rows: list[dict], share: float, cap: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held out): ``floor(share * len(rows))`` rows, at most ``cap``, drawn by ``seed`` and kept out of
    training (as Hugging Face's scripts' validation_split_percentage); none where that is 0."""
    count = min(cap, int(share * len(rows)))
    if count < 1:
        return rows, []
    held = set(random.Random(seed).sample(range(len(rows)), count))
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def train_and_heldout(data: str, eval_data: str, tokenizer, max_len: int, train_size: int, eval_size: int,
                      seed: int, chat: bool = True, eval_split: float = 0.0) -> tuple[list[Example], list[Example]]:
    """The examples training.fit trains on and those it evaluates on (:func:`heldout_examples`); rows of a JSONL
    ``data`` file held out by ``eval_split`` are not trained on."""
    rows = train_rows = None
    if not eval_data and data not in TASKS and eval_split > 0:  # (a JSONL file, part of it held out: read once)
        rows = read_jsonl(data)
        train_rows = split_rows(rows, eval_split, eval_size, seed)[0]
    heldout = heldout_examples(data, eval_data, tokenizer, max_len, eval_size, seed, chat, eval_split, rows)
    return load_examples(data, "train", tokenizer, max_len, train_size, seed, chat, rows=train_rows), heldout


def heldout_examples(data: str, eval_data: str, tokenizer, max_len: int, size: int, seed: int, chat: bool = True,
                     eval_split: float = 0.0, rows: list[dict] | None = None) -> list[Example]:
    """The held-out set training.fit evaluates on: ``eval_data`` (a JSONL path or task name, its first ``size``
    examples), else the test split of the built-in task ``data`` (drawn with seed + 1), else ``eval_split`` of the
    JSONL file ``data``'s rows (``rows``: those rows, already read; at most ``size``, drawn by ``seed``), else none."""
    if eval_data:
        return load_examples(eval_data, "test", tokenizer, max_len, size, seed, chat)[:size]
    if data in TASKS:
        return load_examples(data, "test", tokenizer, max_len, size, seed + 1, chat)
    if eval_split > 0:
        _, held = split_rows(read_jsonl(data) if rows is None else rows, eval_split, size, seed)
        if held:
            return load_examples(data, "test", tokenizer, max_len, size, seed, chat, rows=held)
    return []


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels ([B, L])."""
    L = max(len(ex.input_ids) for ex in examples)
    ids = torch.full((len(examples), L), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), L), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), L), dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids[i, :n] = torch.tensor(ex.input_ids)
        labels[i, :n] = torch.tensor(ex.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
