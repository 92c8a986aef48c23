"""Training data of the reference model: scenes turned into batches (multi-turn prompts, vision targets,
attention targets, dropped background patches). Every batch is drawn fresh from its seeds."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from reference.model import Architecture
from reference.scenes import (CAPTION_TASK, COLOURS, PLURAL, SHAPES, TASKS, Question, Scene, ask, generate_scene,
                              patch_coverage, render_scene)

VALIDATION_SEED_START = 20_000_000
PAIRS = [(c, s) for c in COLOURS for s in SHAPES]
# Extra draws of the tasks whose questions vary most within one scene (which colour / pair is asked about).
EXTRA_TURNS = ("presence", "presence", "count_colour", "count_shape", "position")
PATCH_OBJECT_THRESHOLD = 0.2  # a patch belongs to an object when the object covers this share of its pixels


def patch_quadrants(patches: int) -> Tensor:
    """Quadrant index (0 top left, 1 top right, 2 bottom left, 3 bottom right) of each patch of a square grid."""
    grid = math.isqrt(patches)
    half = torch.arange(grid) >= grid / 2
    return (2 * half[:, None].long() + half[None, :].long()).flatten()

def coverage_by_object(scene: Scene, index_map: np.ndarray, patch: int) -> np.ndarray:
    """Share of each patch's pixels that each object covers: [objects, patches]."""
    return patch_coverage(index_map, patch, len(scene.objects)).reshape(len(scene.objects), -1)


def vision_targets(scenes: list[Scene], coverage: list[np.ndarray], arch: Architecture) -> dict[str, Tensor]:
    """Per-patch pair and centre targets and per-image present pairs, from each image's `coverage_by_object`."""
    grid = arch.grid
    pair = np.zeros((len(scenes), grid * grid), dtype=np.int64)
    centre = np.zeros((len(scenes), grid * grid), dtype=np.float32)
    present = np.zeros((len(scenes), len(PAIRS)), dtype=np.float32)
    for b, (scene, covered) in enumerate(zip(scenes, coverage)):
        for i, obj in enumerate(scene.objects):
            k = PAIRS.index((obj.colour, obj.shape))
            present[b, k] = 1.0
            pair[b, covered[i] >= PATCH_OBJECT_THRESHOLD] = k + 1
            centre[b, int(obj.cy) // arch.patch_size * grid + int(obj.cx) // arch.patch_size] = 1.0
    return {"patch_pair": torch.from_numpy(pair), "patch_centre": torch.from_numpy(centre),
            "cls_pairs": torch.from_numpy(present)}


def scene_questions(scene: Scene) -> list[Question]:
    questions = []
    for turn, task in enumerate(TASKS + EXTRA_TURNS + (CAPTION_TASK,)):
        question = ask(scene, task, np.random.default_rng([scene.seed, turn]))
        if question is not None and question not in questions:
            questions.append(question)
    return questions


ObjectPatches = list[tuple[str, str, list[int]]]  # per object of an image: colour, shape, the patches it covers


def pack_turns(tok, kept_patches: list[list[int]], per_image: list[list[Question]], patches: int,
               original_positions: bool = False, objects: list[ObjectPatches] | None = None) -> dict[str, Tensor]:
    """Rows of [<s> USER : <image> per kept patch] + turns "q ASSISTANT : a </s>", each turn seeing the prefix
    and itself only.

    Positions run on through the prefix, and each turn's restart where the prefix ends, as in a single-turn
    prompt; with `original_positions` a kept patch keeps the position it has in the full grid and turns start
    after the full grid (what LLM-side pruning shows the LM), else positions are compact (vision-side pruning).
    Returns input_ids, labels (answer tokens and </s> only), position_ids and a 4-D boolean mask; given each
    image's `objects`, also the attention targets of `attention_targets` as (row, query, keys).
    """
    head = tok("USER: ")["input_ids"]
    rows, labels, segments, positions = [], [], [], []
    lookup_targets, gather_targets = [], []
    for row, (kept, questions) in enumerate(zip(kept_patches, per_image)):
        ids = head + [tok.image_token_id] * len(kept)
        pos = list(range(len(head))) + ([len(head) + k for k in kept] if original_positions
                                        else list(range(len(head), len(ids))))
        turn_start = len(head) + (patches if original_positions else len(kept))
        lab, seg = [-100] * len(ids), [0] * len(ids)
        if objects is not None:  # the objects' patches as sequence positions
            image_position = {patch: len(head) + i for i, patch in enumerate(kept)}
            placed = [(colour, shape, [image_position[p] for p in covered]) for colour, shape, covered in objects[row]]
        for turn, q in enumerate(questions, start=1):
            asked = tok(f"{q.text} ASSISTANT:", add_special_tokens=False)["input_ids"]
            answer = tok(f" {q.answer}</s>", add_special_tokens=False)["input_ids"]
            if objects is not None:
                lookups, gathers = attention_targets(tok, q, asked, answer, len(ids), placed)
                lookup_targets += [(row, query, keys) for query, keys in lookups]
                gather_targets += [(row, query, keys) for query, keys in gathers]
            ids += asked + answer
            lab += [-100] * len(asked) + answer
            seg += [turn] * (len(asked) + len(answer))
            pos += list(range(turn_start, turn_start + len(asked) + len(answer)))
        rows.append(ids), labels.append(lab), segments.append(seg), positions.append(pos)
    length = max(map(len, rows))
    pad = lambda xs, v: torch.tensor([x + [v] * (length - len(x)) for x in xs])  # noqa: E731
    input_ids, label_ids, segment = pad(rows, tok.pad_token_id), pad(labels, -100), pad(segments, -1)
    in_prefix = segment == 0
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    same_turn = segment[:, :, None] == segment[:, None, :]
    mask = causal & (same_turn | in_prefix[:, None, :]) & (segment[:, None, :] >= 0)
    mask |= torch.eye(length, dtype=torch.bool)  # padding rows attend to themselves (no empty softmax)
    packed = {"input_ids": input_ids, "labels": label_ids, "position_ids": pad(positions, 0),
              "attention_mask": mask[:, None]}
    if objects is not None:
        packed.update(lookup_targets=lookup_targets, gather_targets=gather_targets)
    return packed


def attention_targets(tok, question: Question, asked: list[int], answer: list[int], start: int,
                      objects: ObjectPatches) -> tuple[list[tuple[int, list[int]]], list[tuple[int, list[int]]]]:
    """(query, keys) pairs of one turn (token ids `asked` + `answer`) starting at sequence position `start`, for
    the two supervised heads.

    `objects` are the image's (colour, shape, sequence positions of its patches).
    lookup (an early layer): each colour / shape word, of the question or of a caption, looks at the patches of
    the objects it names, or at <s> (position 0) when none; the word's own embedding is the query, so this is
    one hop. gather (a later layer): each position that predicts an answer word looks at the question's colour /
    shape words, which by then hold what they found; with no such word (total count, caption) it looks at the
    objects directly: all of them, or in a caption the object whose colour comes next.
    """
    answer_query = start + len(asked) - 1  # the ":" of "ASSISTANT :"
    lookups = [(start + i, named_objects(tok, token, objects)) for i, token in enumerate(asked)]
    lookups += [(answer_query + 1 + i, named_objects(tok, token, objects)) for i, token in enumerate(answer)]
    lookups = [(query, keys) for query, keys in lookups if keys is not None]
    keywords = [query for query, _ in lookups if query < answer_query]
    if keywords:  # each position that predicts an answer word ("top", then "left") reads the question's words
        return lookups, [(answer_query + i, keywords) for i in range(len(answer) - 1)]
    if question.task == CAPTION_TASK:  # each "a" (4 tokens per "a red circle ,") predicts the next object's colour
        return lookups, [(answer_query + 1 + 4 * j, objects[o][2]) for j, o in enumerate(question.evidence)]
    return lookups, [(answer_query, [p for o in question.evidence for p in objects[o][2]])]


def named_objects(tok, token: int, objects: ObjectPatches) -> list[int] | None:
    """Patch positions of the objects a colour / shape word names ([0], i.e. <s>, when none); None for other words."""
    word = tok.convert_ids_to_tokens(token)
    shape = next((s for s, plural in PLURAL.items() if plural == word), word)
    if word not in COLOURS and shape not in SHAPES:
        return None
    return [p for colour, object_shape, keys in objects if word == colour or shape == object_shape for p in keys] or [0]


def dropped_background(coverage: np.ndarray, rng: np.random.Generator) -> list[int]:
    """Patches kept by the drop augmentation: every patch an object touches, and each other patch with one
    probability drawn per image from [0.05, 1] (so the LM sees from ~20 to all 144 visual tokens)."""
    keep_background = rng.uniform(0.05, 1.0)
    kept = (coverage > 0) | (rng.random(coverage.shape) < keep_background)
    return np.nonzero(kept)[0].tolist()


def make_batch(seeds: range, processor, arch: Architecture, with_text: bool, drop_probability: float = 0.0) -> dict:
    """Fresh scenes of `seeds`: pixels, vision targets and, `with_text`, packed turns.

    With `drop_probability`, the batch (chosen by a draw seeded from its first seed) is a drop batch: a
    random share of each image's background patches leaves the LM's input (the model's projector output is
    gathered to `kept_patches` by `PatchDropper`), with compact or original positions half the time each.
    Training-free methods hand the LM fewer visual tokens than it ever saw; a model this small, trained on
    full grids only, then answers "four four four" whatever tokens are kept, and the benchmark could not
    tell good choices from bad ones. Objects are never dropped, so no answer loses its evidence.
    """
    scenes = [generate_scene(seed, arch.image_size) for seed in seeds]
    rendered = [render_scene(scene) for scene in scenes]
    coverage = [coverage_by_object(scene, index_map, arch.patch_size) for scene, (_, index_map) in zip(scenes, rendered)]
    batch = {"pixel_values": processor.image_processor([image for image, _ in rendered], return_tensors="pt")["pixel_values"],
             "targets": vision_targets(scenes, coverage, arch)}
    if with_text:
        patches = arch.grid ** 2
        rng = np.random.default_rng([seeds[0], 99])
        kept = [list(range(patches))] * len(scenes)
        original_positions = False
        if rng.random() < drop_probability:
            kept = [dropped_background(c.sum(0), rng) for c in coverage]
            original_positions = bool(rng.random() < 0.5)
            batch["kept_patches"] = kept
        questions = [scene_questions(s) for s in scenes]
        objects = [[(o.colour, o.shape, covered) for o, covered in zip(s.objects, object_patches(c))]
                   for s, c in zip(scenes, coverage)]
        batch.update(pack_turns(processor.tokenizer, kept, questions, patches, original_positions, objects))
        batch["tasks"] = [[q.task for q in qs] for qs in questions]
    return batch


def object_patches(coverage: np.ndarray) -> list[list[int]]:
    """Per object (rows of `coverage` [objects, patches]), the patches it covers by at least the threshold, or
    its best-covered patch when it covers none that much."""
    return [np.nonzero(c >= PATCH_OBJECT_THRESHOLD)[0].tolist() or [int(c.argmax())] for c in coverage]
