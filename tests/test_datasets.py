"""Datasets as TRL users keep them: save_to_disk folders, parquet / JSON / CSV files, through datasets.

treepo train / eval --prompts PATH with --prompt-column / --answer-column; a conversational prompt
column is rendered with the chat template; extra columns reach a user reward function as TRL
passes them (keyword lists); a missing column or a bad row is named.
"""

from __future__ import annotations

import json

import pytest

datasets = pytest.importorskip("datasets")

import tiny  # noqa: E402
import toy_rewards  # noqa: E402
from treepo import cli  # noqa: E402
from treepo.config import EvalConfig  # noqa: E402
from treepo.errors import ConfigError, InputError  # noqa: E402
from treepo.prompts import Prompt, load_dataset_prompts, render  # noqa: E402

ROWS = [{"question": "What is 12 plus 7?", "solution": "19", "level": 1},
        {"question": "Count the letters in banana", "solution": "6", "level": 2}]


def write(tmp_path, kind: str):
    data = datasets.Dataset.from_list(ROWS)
    if kind == "disk":
        data.save_to_disk(str(tmp_path / "ds"))
        return tmp_path / "ds"
    path = tmp_path / f"ds.{kind}"
    if kind == "parquet":
        data.to_parquet(str(path))
    elif kind == "csv":
        data.to_csv(str(path), index=False)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS) if kind == "jsonl" else json.dumps(ROWS))
    return path


@pytest.mark.parametrize("kind", ["disk", "parquet", "csv", "json", "jsonl"])
def test_every_kind_loads_with_named_columns(tmp_path, kind):
    prompts = load_dataset_prompts(write(tmp_path, kind), None, "question", "solution")
    assert [p.question for p in prompts] == [r["question"] for r in ROWS]
    assert [p.answer for p in prompts] == ["19", "6"]
    assert [p.columns["level"] for p in prompts] == [1, 2] and "question" not in prompts[0].columns


def test_a_missing_column_or_bad_row_is_named(tmp_path):
    path = write(tmp_path, "parquet")
    with pytest.raises(InputError, match=r"no 'prompt' column; its columns are question, solution, level.*--prompt-column question"):
        load_dataset_prompts(path)
    with pytest.raises(InputError, match="no 'ref' column"):
        load_dataset_prompts(path, None, "question", "ref")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": "fine"}\n{"q": ""}\n')
    with pytest.raises(InputError, match=r"row 1: 'q' is empty"):
        load_dataset_prompts(bad, None, "q")
    with pytest.raises(InputError, match="no such file or folder"):
        load_dataset_prompts(tmp_path / "nope")


def test_conversational_prompts_are_rendered_with_the_chat_template(tmp_path):
    rows = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 2?"}],
             "answer": "4"}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "chat.parquet"))
    (p,) = load_dataset_prompts(tmp_path / "chat.parquet")
    assert p.question == "What is 2 plus 2?" and p.messages[0]["role"] == "system"
    tok = tiny.tokenizer().__class__.from_pretrained(tiny.save_model_dir(tmp_path / "m"))
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    text = tok.decode(render(p, tok, "ignored: the conversation has its own system message"))
    assert text.startswith("<system>Be brief.") and "ignored" not in text
    plain = Prompt(question="x", messages=[{"role": "user", "content": "x"}])
    assert tok.decode(render(plain, tok, "SYS")).startswith("<system>SYS")
    tok.chat_template = None
    with pytest.raises(InputError, match="chat template"):
        render(plain, tok, "")


def test_column_flags_need_a_dataset_and_two_names():
    with pytest.raises(ConfigError, match="--prompts"):
        EvalConfig(prompt_column="question")
    with pytest.raises(ConfigError, match="two different columns"):
        EvalConfig(prompts="x.parquet", prompt_column="a", answer_column="a")


def test_eval_and_train_take_a_dataset_and_pass_extra_columns_to_the_reward(tmp_path):
    path = write(tmp_path, "disk")
    model_dir = tiny.save_model_dir(tmp_path / "model")
    common = ["--prompts", str(path), "--prompt-column", "question", "--answer-column", "solution",
              "--reward", "toy_rewards:record_columns", "--width", "2", "--depth", "2", "--segment_len", "4"]
    toy_rewards.SEEN_COLUMNS.clear()
    assert cli.main(["eval", "--model", str(model_dir), "--num_prompts", "2", "--out", str(tmp_path / "e"),
                     *common]) == 0
    seen = toy_rewards.SEEN_COLUMNS[-1]
    assert sorted(seen["level"]) == [1, 1, 2, 2] and sorted(set(seen["answer"])) == ["19", "6"]
    toy_rewards.SEEN_COLUMNS.clear()
    assert cli.main(["train", "--model", str(model_dir), "--num_prompts", "2", "--steps", "1",
                     "--prompts_per_step", "2", "--learning_rate", "0.001", "--tensorboard", "false",
                     "--out", str(tmp_path / "t"), *common]) == 0
    assert toy_rewards.SEEN_COLUMNS and set(toy_rewards.SEEN_COLUMNS[0]["level"]) <= {1, 2}


def test_a_plain_prompts_jsonl_hands_its_extra_fields_to_the_reward_too(tmp_path):
    from treepo.prompts import load_jsonl

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "2+2?", "answer": "4", "level": 1}\n{"prompt": "3+3?", "answer": "6", "level": 2}\n')
    prompts = load_jsonl(path)
    assert [p.columns for p in prompts] == [{"level": 1}, {"level": 2}]


def test_a_renamed_answer_column_also_reaches_the_reward_under_its_own_name(tmp_path):
    prompts = load_dataset_prompts(write(tmp_path, "json"), None, "question", "solution")
    assert [p.columns["solution"] for p in prompts] == [p.answer for p in prompts]  # as TRL's accuracy_reward reads it
