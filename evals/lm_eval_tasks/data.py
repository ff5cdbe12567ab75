"""Datasets for the local lm-eval tasks in this folder: the offline jsonl files where they exist, else
the hub datasets lm-eval's own `gsm8k` and `commonsense_qa` tasks read.

lm-eval calls these through `custom_dataset:` with the task's `--metadata` as keyword arguments, so
`--metadata '{"data_dir": "/path/to/data"}'` picks the folder; the default is `$QUIETDEPTH_SHARED_DATA`,
else `shared/data` beside the repository. CommonsenseQA's official jsonl nests the stem and choices
under `question`; it is flattened here into the hub schema (`question`, `choices: {label, text}`,
`answerKey`), so the prompts are lm-eval's templates unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import datasets

_DEFAULT_DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "data"


def _data_dir(data_dir: str | None) -> Path:
    return Path(data_dir or os.environ.get("QUIETDEPTH_SHARED_DATA", _DEFAULT_DATA_DIR))


def _local_or_none(folder: Path, files: dict[str, str], data_dir: str | None) -> dict[str, str] | None:
    """The local files by split; None (read the hub) where they are absent from the default folder. A folder
    given in --metadata or $QUIETDEPTH_SHARED_DATA must hold them."""
    paths = {split: folder / name for split, name in files.items()}
    if all(p.is_file() for p in paths.values()):
        return {split: str(p) for split, p in paths.items()}
    if data_dir or os.environ.get("QUIETDEPTH_SHARED_DATA"):
        missing = ", ".join(str(p) for p in paths.values() if not p.is_file())
        raise FileNotFoundError(f"{missing} not found: the data folder comes from --metadata data_dir or "
                                "$QUIETDEPTH_SHARED_DATA; point it at the folder holding gsm8k/ and commonsense_qa/, "
                                "or unset it to read the hub datasets")
    return None


def gsm8k(data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    """GSM8K train (few-shot pool) and test: `<data_dir>/gsm8k/{train,test}.jsonl`, or hub `openai/gsm8k`."""
    files = _local_or_none(_data_dir(data_dir) / "gsm8k", {"train": "train.jsonl", "test": "test.jsonl"}, data_dir)
    if files is None:
        return datasets.load_dataset("openai/gsm8k", "main")
    return datasets.load_dataset("json", data_files=files)


def _flatten_csqa(row: dict[str, Any]) -> dict[str, Any]:
    question = row["question"]
    return {
        "id": row["id"],
        "question": question["stem"],
        "question_concept": question["question_concept"],
        "choices": {"label": [c["label"] for c in question["choices"]], "text": [c["text"] for c in question["choices"]]},
        "answerKey": row["answerKey"],
    }


def commonsense_qa(data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    """CommonsenseQA train and validation in the hub schema: `<data_dir>/commonsense_qa/{train,dev}_rand_split.jsonl`
    (official nested schema, flattened), or hub `tau/commonsense_qa`."""
    files = _local_or_none(_data_dir(data_dir) / "commonsense_qa",
                           {"train": "train_rand_split.jsonl", "validation": "dev_rand_split.jsonl"}, data_dir)
    if files is None:
        return datasets.load_dataset("tau/commonsense_qa")
    raw = datasets.load_dataset("json", data_files=files)
    return raw.map(_flatten_csqa, remove_columns=raw["train"].column_names)


def answer_index(doc: dict[str, Any]) -> int:
    """Index of the gold choice (the cloze task's target)."""
    return doc["choices"]["label"].index(doc["answerKey"])
