"""The quality benchmark: held-out scenes through a model with a reducer attached, scored exactly.

Item i of the question set asks task TASKS[i % 7] about the scene of seed `seed_start + i`; caption j
describes the scene of seed `seed_start + CAPTION_SEED_OFFSET + j`. Training draws seeds below
HELD_OUT_SEED_START, so the default range is never seen in training.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

import reducers
from pipeline.flags import option
from reference.model import REFERENCE_MODEL_DIR, prompt
from reference.scenes import (CAPTION_TASK, TASKS, Question, Scene, answer_correct, benchmark_item, caption_scores,
                              f1, patch_coverage, render_scene)
from reducers.methods import Method, create, with_params
from reducers.stages import split

HELD_OUT_SEED_START = 10_000_000
CAPTION_SEED_OFFSET = 1_000_000
DEFAULT_QUESTIONS = 2100   # 300 per task
DEFAULT_CAPTIONS = 500
ANSWER_TOKENS = 4          # the longest answer ("top left") is 2 words, then </s>
CAPTION_TOKENS = 20        # 4 objects x "a colour shape" + 3 commas + </s>

# The sections of jobs/evaluate.py's `--help`; every EvaluateConfig field names one.
EVALUATE_GROUPS = {
    "method": "the model and the reduction scored",
    "items": "which held-out items are asked",
    "run": "how it runs and where the result goes",
}


@dataclass
class EvaluateConfig:
    """The flags of jobs/evaluate.py: one method at one budget on the held-out benchmark."""
    model: str = option(str(REFERENCE_MODEL_DIR), "model folder (default: the shipped one)", "DIR", group="method")
    reducer: str | None = option(None, "method name, as in reducers.available(), or object-oracle", "NAME",
                                 group="method", required=True)
    visual_tokens: int | None = option(None, "layer-averaged visual tokens in the LLM (default: none)", "N",
                                       group="method")
    ratio: float | None = option(None, "visual tokens as a share of the full count (default: none)", "R",
                                 group="method")
    seed_start: int = option(HELD_OUT_SEED_START, "seed of the first scene asked", "S", group="items")
    questions: int = option(DEFAULT_QUESTIONS, "questions asked, the tasks in turn", "N", group="items")
    captions: int = option(DEFAULT_CAPTIONS, "captions asked for", "N", group="items")
    batch_size: int = option(32, "images per generate call", "B", group="run")
    threads: int | None = option(None, "torch threads (default: torch's choice)", "N", group="run")
    json: Path | None = option(None, "also write the result object here (default: none)", "FILE", group="run")
    unreduced: Path | None = option(None, "a --json file of `--reducer none` on the same model and items, reused "
                                          "as the baseline instead of scoring the unreduced model again "
                                          "(default: none)", "FILE", group="run")


@dataclass(frozen=True)
class Item:
    scene: Scene
    question: Question


def question_items(seed_start: int, count: int, image_size: int) -> list[Item]:
    return [Item(*benchmark_item(seed_start + i, TASKS[i % len(TASKS)], image_size)) for i in range(count)]


def caption_items(seed_start: int, count: int, image_size: int) -> list[Item]:
    return [Item(*benchmark_item(seed_start + CAPTION_SEED_OFFSET + j, CAPTION_TASK, image_size)) for j in range(count)]


def image_size_of(processor) -> int:
    return int(processor.image_processor.crop_size["height"])


@dataclass
class ObjectOracle(Method):
    """Benchmark-only reference, not a method: keeps the patches the objects cover most (from the scene's ground
    truth), the rest by a seeded random draw, at the same place as `random` (after the tower's first layer).
    Comparing it with `random` shows whether the benchmark can judge which tokens a method keeps. Not in the
    reducers' registry: the benchmark attaches an instance (`method_named`)."""
    name: ClassVar[str] = "object-oracle"
    vision_share: float = 1.0
    seed: int = 0
    coverage: Tensor | None = None  # [images, patches]: set by `answer` before each batch

    def vision_sites(self, shape):
        return [0]

    def reduce_vision(self, step):
        if self.coverage is None or self.coverage.shape[0] != step.cand.shape[0]:
            raise RuntimeError("object-oracle needs the benchmark to set the coverage of the batch's images")
        draw = torch.rand(self.coverage.shape[1], generator=torch.Generator().manual_seed(self.seed))
        # coverage dominates; the draw (< 1e-3) only orders the patches no object touches
        scores = (self.coverage + 1e-3 * draw).to(step.cand.device).gather(1, step.slots)
        return split(step, scores).reduction()


ORACLES: dict[str, type[Method]] = {ObjectOracle.name: ObjectOracle}


def method_named(name: str, **params) -> Method:
    """The benchmark's oracle or a reducers method, by name, with hyperparameters `params` (unknown ones refused)."""
    return with_params(ORACLES[name], **params) if name in ORACLES else create(name, **params)


def object_coverage(scenes: list[Scene], patch: int) -> Tensor:
    """[images, patches]: the share of each patch covered by any object."""
    rows = []
    for scene in scenes:
        _, index_map = render_scene(scene)
        rows.append(patch_coverage(index_map, patch, len(scene.objects)).sum(axis=0).reshape(-1))
    return torch.from_numpy(np.stack(rows)).float()


@torch.inference_mode()
def answer(model, processor, items: list[Item], max_new_tokens: int, batch_size: int,
           attachment: reducers.Attachment | None = None) -> list[str]:
    """Greedy answers of the model (with whatever reducer is attached) to the items, in order."""
    answers = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        if attachment is not None and isinstance(attachment.method, ObjectOracle):
            attachment.method.coverage = object_coverage([item.scene for item in chunk], processor.patch_size)
        inputs = processor(images=[item.scene.render() for item in chunk],
                           text=[prompt(processor, item.question.text) for item in chunk],
                           padding=True, return_tensors="pt")
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new_tokens = generated[:, inputs["input_ids"].shape[1]:]
        answers += processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return answers


def score(questions: list[Item], question_answers: list[str], captions: list[Item], caption_texts: list[str]) -> dict:
    """Accuracy per task and overall, caption precision / recall / F1 (means over captions)."""
    per_task: dict[str, list[bool]] = defaultdict(list)
    for item, predicted in zip(questions, question_answers):
        per_task[item.question.task].append(answer_correct(predicted, item.question.answer))
    pairs = [caption_scores(text, item.scene) for item, text in zip(captions, caption_texts)]
    hits = [hit for task_hits in per_task.values() for hit in task_hits]
    return {
        "vqa_accuracy": sum(hits) / len(hits) if hits else None,
        "per_task": {task: sum(v) / len(v) for task, v in sorted(per_task.items())},
        "caption_precision": sum(p for p, _ in pairs) / len(pairs) if pairs else None,
        "caption_recall": sum(r for _, r in pairs) / len(pairs) if pairs else None,
        "caption_f1": sum(f1(p, r) for p, r in pairs) / len(pairs) if pairs else None,
    }


def run(model, processor, reducer: str, visual_tokens: int | None = None, ratio: float | None = None,
        seed_start: int = HELD_OUT_SEED_START, questions: int = DEFAULT_QUESTIONS, captions: int = DEFAULT_CAPTIONS,
        batch_size: int = 32, params: dict | None = None) -> dict:
    """Score one method (a name `method_named` knows) at one budget on the held-out set, attached through
    `reducers.attach` with its hyperparameters `params` (None: its defaults)."""
    size = image_size_of(processor)
    question_set, caption_set = question_items(seed_start, questions, size), caption_items(seed_start, captions, size)
    method = method_named(reducer, **(params or {}))
    budget = {"visual_tokens": visual_tokens, "ratio": ratio} if method.takes_budget else {}
    with reducers.attach(model, method, **budget) as attachment:
        question_answers = answer(model, processor, question_set, ANSWER_TOKENS, batch_size, attachment)
        caption_texts = answer(model, processor, caption_set, CAPTION_TOKENS, batch_size, attachment)
    result = score(question_set, question_answers, caption_set, caption_texts)
    examples = [{"question": item.question.text, "expected": item.question.answer, "answer": text}
                for item, text in list(zip(question_set, question_answers))[:len(TASKS)]]
    return {"reducer": reducer, "params": params or {}, "visual_tokens": visual_tokens, "ratio": ratio,
            "seed_start": seed_start, "questions": questions, "captions": captions, **result, "examples": examples}


def retention(reduced: float | None, unreduced: float | None) -> float | None:
    """score / the unreduced model's score (None when either is missing or the unreduced score is 0)."""
    if reduced is None or not unreduced:
        return None
    return reduced / unreduced


def with_retention(result: dict, unreduced: dict) -> dict:
    return {**result, "retention_vqa": retention(result["vqa_accuracy"], unreduced["vqa_accuracy"]),
            "retention_caption": retention(result["caption_f1"], unreduced["caption_f1"]),
            "unreduced": {k: unreduced[k] for k in ("vqa_accuracy", "caption_f1", "per_task")}}
