"""The Recipe: what a fine-tuning task is, as data plus small pure functions.

A recipe never imports torch, a backend or a trainer. It names its data source, its instruction,
how one example becomes a conversation, its labels (classification) or target field (captioning),
its default model and its per-recipe config defaults. Everything else is the pipeline's job.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Sequence

from ..data import samples

TaskKind = Literal["classification", "captioning", "vqa"]


@dataclass(frozen=True)
class DataSource:
    """Where a recipe's data comes from by default.

    kind: "kaggle_folders" (a Kaggle dataset in class-folder layout), "hf" (a Hugging Face dataset
    name, or a folder saved with `save_to_disk`), "class_folders" (a local folder per class),
    "table" (CSV/JSONL with path,label[,split] or image,text columns).
    """

    kind: str
    id: str = ""  # Kaggle "owner/slug" or HF dataset name
    layout: tuple[str, ...] = ()  # sub-folders from the download root to the class folders
    image_column: str = "image"
    target_column: str = "label"
    train_split: str = "train"
    test_split: str = "test"
    attribution: str = ""  # license + credit, copied into reports and model cards


@dataclass(frozen=True)
class TableSource(DataSource):
    """A DataSource for listings, class folders and HF datasets with configurable columns.

    kind "auto" finds the format from the data location (a .csv/.tsv/.jsonl/.json listing, a folder of
    class folders, a save_to_disk folder, or a HF dataset name); "table" is the same dispatch, named
    for sources whose default is a table. Empty column names are detected from the data.
    """

    kind: str = "auto"
    image_column: str = ""
    target_column: str = ""
    data_format: str = "auto"  # auto | table | class_folders | hf
    target_template: str = ""  # "{title} costs {price}": the target from several columns
    column_aliases: tuple[tuple[str, tuple[str, ...]], ...] = ()  # template/image name -> columns to try, in order
    split_column: str = "split"
    test_fraction: float = 0.1
    question_column: str = "question"  # vqa: the question and answer columns, optional answer type / image group
    answer_column: str = "answer"
    answer_type_column: str = ""
    image_group_column: str = ""
    drop_duplicates: bool = False  # listings: keep one of rows that repeat an earlier row


@dataclass(frozen=True)
class Recipe:
    name: str
    task: TaskKind
    instruction: str
    source: DataSource
    default_model: str  # 16-bit checkpoint (hf backend on CPU, merged exports' base_model)
    default_model_4bit: str = ""  # pre-quantized checkpoint the GPU backends load by default
    labels: tuple[str, ...] = ()  # classification: the exact answers, in a fixed order
    image_size: int = 512  # longest image side fed to the model; it drives memory use
    max_new_tokens: int = 16  # generation budget at evaluation
    defaults: dict[str, Any] = field(default_factory=dict)  # config overrides, flat names
    # Captioning: extra metrics from (predictions, references), reported beside BLEU/ROUGE-L (product_catalog's
    # per-field exact match). A plain function, so a recipe needs no subclass for it.
    score_text: Callable[[Sequence[str], Sequence[str]], Mapping[str, Any]] | None = field(default=None, compare=False)

    def __post_init__(self):
        # A subclass that defines score_text as a method (how a recipe added its metrics before this field): the
        # generated __init__ stores the field's None over it, and its metrics would silently not be reported.
        method = getattr(type(self), "score_text", None)
        if callable(method) and (self.score_text is None or getattr(self.score_text, "__func__", None) is method):
            object.__delattr__(self, "score_text")  # the method, bound to this recipe (also after replace())

    def target(self, example: dict) -> str:
        """The answer text of a loaded example (sources put it in the `target` column)."""
        return str(example["target"])

    def instruction_for(self, example: dict | None = None) -> str:
        """The instruction with the row's {column} placeholders filled (e.g. "{question}")."""
        return samples.fill(self.instruction, example or {})

    def prompt(self, image: Any = None, example: dict | None = None, images: Sequence[Any] | None = None) -> list[dict]:
        """The conversation up to the answer to score: the row's own turns before its last answer, or one user
        turn with its image(s) then the instruction."""
        example = example or {}
        images = list(images) if images is not None else [image]
        stored = samples.stored_messages(example)
        if stored is not None:
            last = max(i for i, m in enumerate(stored) if m["role"] == "assistant")
            return samples.with_images(stored[:last], images)
        n_images = len(samples.image_refs(example)) if "image" in example else len(images)
        return samples.single_turn((images + [None] * n_images)[:n_images], self.instruction_for(example), None)

    def answered(self, example: dict | None, answer: str, images: Sequence[Any] | None = None) -> list[dict]:
        """The prompt of the row followed by `answer` as its last assistant turn (scoring, generation prompts)."""
        return self.prompt(example=example, images=images) + [
            {"role": "assistant", "content": [{"type": "text", "text": answer}]}]

    def to_conversation(self, example: dict, image: Any = None, images: Sequence[Any] | None = None) -> list[dict]:
        """The whole training conversation: every turn, each assistant turn an answer to train on."""
        images = list(images) if images is not None else [image]
        stored = samples.stored_messages(example)
        if stored is not None:
            return samples.with_images(stored, images)
        return self.prompt(example=example, images=images) + [
            {"role": "assistant", "content": [{"type": "text", "text": self.target(example)}]}]

    @property
    def is_classification(self) -> bool:
        return self.task == "classification"

    @property
    def is_vqa(self) -> bool:
        return self.task == "vqa"
