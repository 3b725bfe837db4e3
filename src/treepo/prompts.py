"""Where prompts come from: reasoning-gym tasks by name, a JSONL file, or a dataset as TRL users keep
it (a `save_to_disk` folder, parquet / JSON / CSV, read with `datasets`); and how they are rendered.

`choose_prompts` is the one way a job (rollout, eval, train) picks its problems from its config, and
`load_heldout` draws held-out problems disjoint from a training pool.

Every problem with the source is reported before any model work, naming the task setting or the
file line at fault.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from . import io
from .errors import InputError


@dataclass
class Prompt:
    """One task instance: the question, its reference answer (if any) and the source's metadata."""

    question: str
    answer: Optional[str] = None
    metadata: dict[str, Any] = field(default_factory=dict)
    # A conversational prompt (TRL's format): the messages, rendered as they are with the chat template;
    # `question` is then its last user message's text.
    messages: Optional[list[dict[str, Any]]] = None
    # A dataset row's other columns, handed to a user reward function as keyword lists (as TRL does).
    columns: dict[str, Any] = field(default_factory=dict)


def json_object(text: str, where: str, example: str) -> dict[str, Any]:
    """Parse one JSON object; an error names `where` the text came from and shows an `example`."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: not valid JSON ({e.msg}); write one JSON object, e.g. {example}.") from e
    if not isinstance(value, dict):
        raise InputError(f"{where}: expected a JSON object, e.g. {example}.")
    return value


def parse_task_args(text: Optional[str]) -> dict[str, Any]:
    return json_object(text, f"task_args={text!r}", '{"min_terms": 2}') if text else {}


def load_task(name: str, count: int, seed: int, task_args: Optional[dict[str, Any]] = None) -> list[Prompt]:
    """`count` problems of a reasoning-gym task (procedurally generated offline)."""
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    if name not in DATASETS:
        close = difflib.get_close_matches(name, list(DATASETS), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise InputError(f"task={name!r} is not a reasoning-gym task.{hint} See reasoning_gym.factory.DATASETS.")
    args = task_args or {}
    try:
        dataset = reasoning_gym.create_dataset(name, size=count, seed=seed, **args)
    except (TypeError, ValueError, AssertionError) as e:
        raise InputError(f"task={name!r} with task_args={json.dumps(args)}: {e}. Fix or drop the setting.") from e
    return [
        Prompt(question=entry["question"], answer=str(entry["answer"]), metadata={"task": name, "index": i, **entry})
        for i, entry in enumerate(dataset)
    ]


def load_jsonl(path: str | Path, count: Optional[int] = None) -> list[Prompt]:
    """Prompts from a JSONL file: one object per line with a 'prompt' string and an optional 'answer'."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"prompts={str(path)!r}: no such file.")
    if problem := io.utf8_problem(path):
        raise InputError(f"prompts={str(path)!r}: {problem}")
    prompts: list[Prompt] = []
    with path.open(encoding="utf-8-sig") as f:  # a byte-order mark (some Windows editors write one) is skipped
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            row = json_object(line, f"{path} line {number}", '{"prompt": "What is 2+2?", "answer": "4"}')
            problem = _prompt_problem(row)
            if problem:
                raise InputError(f"{path} line {number}: {problem}")
            answer = row.get("answer")
            if answer is not None and not isinstance(answer, (str, int, float)):
                raise InputError(f"{path} line {number}: 'answer' must be a string or a number.")
            extra = {k: v for k, v in row.items() if k not in ("prompt", "answer")}  # reach the reward, as in TRL
            prompts.append(Prompt(question=row["prompt"], answer=None if answer is None else str(answer), metadata=row,
                                  columns=extra))
            if count is not None and len(prompts) == count:
                break
    if not prompts:
        raise InputError(f"{path}: no prompts. Write one JSON object per line, e.g. {{\"prompt\": \"What is 2+2?\"}}.")
    return prompts


# Columns other datasets hold the prompt in; a file with one of them instead of 'prompt' gets a hint.
PROMPT_ALIASES = ("question", "problem", "input", "instruction", "query", "text", "content")


def _prompt_problem(row: dict[str, Any]) -> Optional[str]:
    """What is wrong with a row's 'prompt' field and how to fix it, or None when it is a usable string."""
    if "prompt" not in row:
        alias = next((k for k in PROMPT_ALIASES if isinstance(row.get(k), str)), None)
        if alias:
            return (f"no 'prompt' field, but a {alias!r} one: rename that column to 'prompt' "
                    f"(e.g. {{\"prompt\": ..., \"answer\": ...}}).")
        fields = ", ".join(repr(k) for k in list(row)[:6]) or "none"
        return f"no 'prompt' field (fields: {fields}); give each line a 'prompt' string."
    value = row["prompt"]
    if value is None:
        return "'prompt' is null: give the prompt text as a string."
    if not isinstance(value, str):
        kind = "a number" if isinstance(value, (int, float)) and not isinstance(value, bool) else f"a JSON {type(value).__name__}"
        shown = json.dumps(value)[:40]
        return (f"'prompt' is {kind} ({shown}), not a string: write the prompt text in quotes, "
                f"e.g. {{\"prompt\": {json.dumps(shown)}}}.")
    if not value.strip():
        return "'prompt' is empty: give the prompt text."
    return None


def render(prompt: Prompt, tokenizer, system_prompt: str) -> list[int]:
    """Token ids of the prompt in the model's chat format (a plain layout for tokenizers without a template).

    A conversational prompt is rendered as its messages, with `system_prompt` put first only when
    the conversation has no system message of its own.
    """
    if prompt.messages is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise InputError("a conversational prompt (a list of messages) needs a tokenizer with a chat template; "
                             "this model's has none: give plain-text prompts, or a model with a chat template.")
        messages = list(prompt.messages)
        if system_prompt and not any(m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": system_prompt}] + messages
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": prompt.question})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding here
            ids = ids["input_ids"]
        return list(ids)
    text = f"{system_prompt}\n\n{prompt.question}\n\nAnswer:" if system_prompt else f"{prompt.question}\n\nAnswer:"
    return list(tokenizer(text)["input_ids"])


HELDOUT_SEED_OFFSET = 1_000_003  # held-out problems come from a seed the training pool never uses


def load_heldout(task: str, count: int, seed: int, task_args: Optional[dict[str, Any]], exclude: set[str]) -> list[Prompt]:
    """`count` problems of a reasoning-gym task from a seed disjoint from training's, minus any whose
    question text is in `exclude` (the training pool), so a small problem space cannot leak."""
    kept: list[Prompt] = []
    size = count
    for _ in range(4):  # a few tries with a larger draw when the exclusion removes many
        drawn = load_task(task, size, seed + HELDOUT_SEED_OFFSET, task_args)
        kept = [p for p in drawn if p.question not in exclude][:count]
        if len(kept) == count:
            return kept
        size *= 2
    raise InputError(
        f"task={task!r}: only {len(kept)} of {count} held-out problems differ from the training pool; the "
        "task's problem space is too small: lower the held-out count or the training pool (num_prompts)."
    )


DATASET_SUFFIXES = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}


def load_dataset_prompts(path: str | Path, count: Optional[int] = None, prompt_column: str = "prompt",
                         answer_column: str = "answer") -> list[Prompt]:
    """Prompts from a dataset as TRL users keep it: a `save_to_disk` folder, or a parquet / JSON / CSV file.

    `prompt_column` holds a string or a conversation (a list of {role, content} messages); the
    optional `answer_column` the reference; every other column goes to `Prompt.columns`. A missing
    column, or a row whose prompt is empty or malformed, is named with its row number.
    """
    try:
        import datasets
    except ImportError as e:
        raise InputError(f"prompts={str(path)!r}: reading datasets needs the datasets package: pip install datasets "
                         "(or pip install 'treepo[trl]').") from e
    path = Path(path)
    if path.is_dir():
        try:
            data = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as e:
            raise InputError(f"prompts={str(path)!r}: not a dataset saved with save_to_disk ({e}).") from e
        if isinstance(data, datasets.DatasetDict):
            split = "train" if "train" in data else next(iter(data))
            data = data[split]
    elif path.is_file():
        kind = DATASET_SUFFIXES.get(path.suffix.lower())
        if kind is None:
            raise InputError(f"prompts={str(path)!r}: use a .jsonl, .json, .parquet or .csv file, or a folder "
                             "written by Dataset.save_to_disk.")
        if kind != "parquet" and (problem := io.utf8_problem(path)):
            raise InputError(f"prompts={str(path)!r}: {problem}")
        data = _read_dataset_file(datasets, kind, path)
    else:
        raise InputError(f"prompts={str(path)!r}: no such file or folder.")
    columns = list(data.column_names)
    if prompt_column not in columns:
        alias = next((c for c in (prompt_column, "prompt", *PROMPT_ALIASES) if c in columns), None)
        hint = f" (pass --prompt-column {alias})" if alias else ""
        raise InputError(f"{path}: no {prompt_column!r} column; its columns are {', '.join(columns)}{hint}.")
    if answer_column not in columns and answer_column != "answer":
        raise InputError(f"{path}: no {answer_column!r} column (--answer-column); its columns are {', '.join(columns)}.")
    prompts: list[Prompt] = []
    for number, row in enumerate(data):
        if count is not None and len(prompts) == count:
            break
        value = row[prompt_column]
        where = f"{path} row {number}"
        question, messages = _dataset_prompt(value, prompt_column, where)
        answer = row.get(answer_column)
        if answer is not None and not isinstance(answer, (str, int, float)):
            raise InputError(f"{where}: {answer_column!r} must be a string or a number, not {type(answer).__name__}.")
        # Every other column, and a renamed answer column under its own name too (a TRL reward such as
        # accuracy_reward(completions, solution) reads it so); the reference also goes out as `answer`.
        extra = {k: v for k, v in row.items() if k != prompt_column and (k != answer_column or k != "answer")}
        prompts.append(Prompt(question=question, answer=None if answer is None else str(answer), metadata=dict(row),
                              messages=messages, columns=extra))
    if not prompts:
        raise InputError(f"{path}: the dataset has no rows.")
    return prompts


def _read_dataset_file(datasets, kind: str, path: Path):
    """The file's rows with `datasets`, quietly: its own log lines and progress bars would print before our message,
    and its error names only the last step that failed, so the message gives the first cause."""
    bars_on = datasets.is_progress_bar_enabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL + 1)
    try:
        return datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as e:  # datasets raises many kinds for an unreadable file
        cause = e
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        why = f"{type(e).__name__}: {e}" if cause is e else f"{type(cause).__name__}: {cause}"
        raise InputError(f"prompts={str(path)!r}: cannot read it as {kind} ({why}).") from e
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars_on:
            datasets.enable_progress_bars()


def _dataset_prompt(value: Any, column: str, where: str) -> tuple[str, Optional[list[dict[str, Any]]]]:
    """(question text, messages or None) of a dataset row's prompt cell."""
    if isinstance(value, str):
        if not value.strip():
            raise InputError(f"{where}: {column!r} is empty: give the prompt text.")
        return value, None
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        users = [m["content"] for m in value if m["role"] == "user" and isinstance(m["content"], str)]
        if not users:
            raise InputError(f"{where}: {column!r} is a conversation without a user message with text content.")
        return users[-1], [{"role": m["role"], "content": m["content"]} for m in value]
    shown = json.dumps(value, default=str)[:60]
    raise InputError(f"{where}: {column!r} is {shown}: give a string, or a list of {{\"role\", \"content\"}} "
                     "messages (TRL's conversational format).")


def choose_prompts(source: Any, seed: int, count: Optional[int] = None) -> list[Prompt]:
    """The problems of a job's source (`source.prompts`, `.task`, `.task_args`, `.num_prompts`): the first
    `count` (default `num_prompts`) rows of a JSONL file or a dataset (`load_dataset_prompts`), or that
    many problems of a reasoning-gym task."""
    count = source.num_prompts if count is None else count
    if source.prompts:
        columns = (getattr(source, "prompt_column", "prompt"), getattr(source, "answer_column", "answer"))
        path = Path(source.prompts)
        if path.suffix.lower() == ".jsonl" and path.is_file() and columns == ("prompt", "answer"):
            return load_jsonl(path, count)  # treepo's own format (its messages name the line at fault)
        return load_dataset_prompts(path, count, *columns)
    return load_task(source.task, count, seed, parse_task_args(source.task_args))
