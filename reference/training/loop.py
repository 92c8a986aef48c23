"""Training of the reference model from scratch on procedural scenes (entry point: jobs/train_reference.py).

Two stages, both fed fresh scenes every step (training seeds start at 0; the benchmark's held-out range
starts at `pipeline.benchmark.HELD_OUT_SEED_START`, the validation range below at VALIDATION_SEED_START):
1. vision: the CLIP tower alone learns, per patch of its feature layer, which (colour, shape) covers the
   patch and whether it holds an object's centre, and on CLS which pairs are present. Dense per-patch
   targets teach shapes in minutes where answer-only training learned colours alone; they also keep each
   object's information in the patches that cover it, which is what lets the benchmark judge pruning.
2. joint: the whole model learns to answer (loss on answer tokens only, averaged per answer), the
   auxiliary losses kept on, plus `word_alignment_loss` (object patches project onto their words) and drop
   batches (`make_batch`: background patches leave the LM input, so reduced inputs are in distribution),
   plus `attention_supervision_loss` on one head of two LM layers: colour / shape words look at the
   objects they name, and the answer position looks at those words (answer-only training left this
   question-conditioned lookup at chance for 10k+ images). Each image carries every task as a separate
   turn that sees the image prefix and itself only (a 4-D block mask, positions restarting after the
   prefix): identical to single-turn prompts at evaluation, with the 144 image tokens paid once per ~12
   answers.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from safetensors.torch import load_file, save_file
from transformers import LlavaForConditionalGeneration
from transformers.models.llama.modeling_llama import rotate_half

from pipeline.reference import Architecture, build_model, build_processor
from pipeline.scenes import (CAPTION_TASK, COLOURS, PLURAL, QUADRANTS, SHAPES, TASKS, Question, Scene, ask,
                             generate_scene, patch_coverage, render_scene)

VALIDATION_SEED_START = 20_000_000
PAIRS = [(c, s) for c in COLOURS for s in SHAPES]
# Extra draws of the tasks whose questions vary most within one scene (which colour / pair is asked about).
EXTRA_TURNS = ("presence", "presence", "count_colour", "count_shape", "position")
BACKGROUND_WEIGHT = 0.2
AUX_HEADS_FILE = "aux_heads.safetensors"
PATCH_OBJECT_THRESHOLD = 0.2  # a patch belongs to an object when the object covers this share of its pixels


@dataclass
class Recipe:
    architecture: Architecture = field(default_factory=Architecture)
    seed: int = 0
    batch_size: int = 16
    vision_steps: int = 1100
    joint_steps: int = 1000
    vision_lr: float = 2e-3
    joint_lr: float = 2e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    aux_weight: float = 1.0
    joint_vision_lr_scale: float = 0.3
    align_weight: float = 1.0
    align_quadrant: bool = True     # the alignment target also holds the patch's quadrant words (word_alignment_loss)
    attention_weight: float = 1.0   # of the two attention-supervision losses (see attention_supervision_loss)
    lookup_layer: int = 1           # LM layer whose head 0 learns: colour / shape words -> the objects they name
    gather_layer: int = 3           # LM layer whose head 0 learns: answer position -> those words (attention_targets)
    turn_weighted_loss: bool = True  # every answer weighs the same in the loss (see answer_loss)
    drop_probability: float = 0.5   # share of joint batches with background patches dropped (see make_batch)
    init_from: str | None = None    # a folder saved by an earlier run (probes chain stages this way)
    validate_every: int = 250
    threads: int = 1
    bf16: bool = True
    train_seed_start: int = 0
    data: dict = field(default_factory=lambda: {
        "generator": "pipeline.scenes.generate_scene(seed, size=image_size, attempt=0)",
        "turns_per_image": list(TASKS) + list(EXTRA_TURNS) + [CAPTION_TASK],
        "question_rng": "numpy default_rng([seed, turn_index])",
        "patch_object_threshold": PATCH_OBJECT_THRESHOLD,
    })


class AuxiliaryHeads(nn.Module):
    """Vision-side training targets on the feature layer; not part of the saved model.

    Per patch: the colour and the shape of the object covering it (class 0 = background; two factorised
    heads, so shape gets its own gradient rather than one shared with 20 pairs), whether it holds an
    object's centre (what counting needs), and its quadrant (keeps position in the features). On CLS:
    which pairs are present (makes the CLS attention, read by VisionZip and FiCoCo-V, look at objects).
    """

    def __init__(self, hidden: int):
        super().__init__()
        self.patch_colour = nn.Linear(hidden, len(COLOURS) + 1)
        self.patch_shape = nn.Linear(hidden, len(SHAPES) + 1)
        self.patch_centre = nn.Linear(hidden, 1)
        self.patch_quadrant = nn.Linear(hidden, 4)
        self.cls_pairs = nn.Linear(hidden, len(PAIRS))

    def loss(self, features: Tensor, targets: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """Sum of the losses on `features` [B, 1 + P, H], and colour / shape accuracy on object patches."""
        cls, patches = features[:, 0].float(), features[:, 1:].float()
        pair = targets["patch_pair"]
        on_object = pair > 0
        colour = torch.where(on_object, (pair - 1) // len(SHAPES) + 1, 0)
        shape = torch.where(on_object, (pair - 1) % len(SHAPES) + 1, 0)
        loss, accuracy = torch.zeros(()), {}
        for name, head, target in (("colour", self.patch_colour, colour), ("shape", self.patch_shape, shape)):
            logits = head(patches)
            # background is ~85 % of patches: down-weighted so that the object patches drive learning
            weight = torch.ones(logits.shape[-1])
            weight[0] = BACKGROUND_WEIGHT
            loss = loss + F.cross_entropy(logits.flatten(0, 1), target.flatten(), weight=weight)
            accuracy[name] = (logits.argmax(-1) == target)[on_object].float().mean().item()
        loss = loss + F.binary_cross_entropy_with_logits(self.patch_centre(patches).squeeze(-1), targets["patch_centre"])
        quadrants = patch_quadrants(patches.shape[1]).repeat(patches.shape[0])
        loss = loss + F.cross_entropy(self.patch_quadrant(patches).flatten(0, 1), quadrants)
        loss = loss + F.binary_cross_entropy_with_logits(self.cls_pairs(cls), targets["cls_pairs"])
        return loss, accuracy


def init_grid_positions(model, scale: float = 0.3) -> None:
    """Start the tower's learned position embeddings from 2-D sin/cos of (row, col) instead of noise.

    From noise, attention needs thousands of images to find a patch's neighbours, and shapes (which span
    2-3 patches) stay at chance meanwhile; with a grid-aware start they are learned from the first steps.
    """
    embedding = model.model.vision_tower.embeddings.position_embedding.weight
    dim = embedding.shape[1]
    grid = math.isqrt(embedding.shape[0] - 1)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    frequencies = 1.0 / 100 ** (torch.arange(dim // 4) / (dim // 4))
    angles = [axis.flatten()[:, None].float() * frequencies for axis in (rows, cols)]
    table = torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1)
    with torch.no_grad():
        embedding.zero_()
        embedding[1:, :table.shape[1]] = scale * table


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


def attention_supervision_loss(model, hidden_states: tuple[Tensor, ...], batch: dict, layer: int, head: int,
                               targets: list[tuple[int, int, list[int]]]) -> Tensor:
    """Mean over `targets` (row, query position, key positions) of -log of the attention mass that `head` of
    LM layer `layer` puts on the key positions.

    Answer-only training leaves the question-conditioned lookup (find the patch the question names, read its
    colour) at chance for thousands of images: the query, the keys and the value path only pay off together.
    Telling one head where to look gives the query and the keys their own gradient from the first step.
    Recomputes that head's scores from the layer's input (`hidden_states[layer]`), for the target rows only.
    """
    if not targets:
        return hidden_states[0].sum() * 0.0
    block = model.model.language_model.layers[layer]
    attention, x = block.self_attn, block.input_layernorm(hidden_states[layer])  # [B, S, D]
    d = attention.head_dim
    kv_head = head // attention.num_key_value_groups
    rows = torch.tensor([t[0] for t in targets])
    queries = torch.tensor([t[1] for t in targets])
    cos, sin = model.model.language_model.rotary_emb(x, batch["position_ids"])  # [B, S, d]
    k = attention.k_proj(x)[..., kv_head * d:(kv_head + 1) * d]  # [B, S, d]
    k = k * cos + rotate_half(k) * sin
    q = attention.q_proj(x[rows, queries])[:, head * d:(head + 1) * d]  # [N, d]
    q = q * cos[rows, queries] + rotate_half(q) * sin[rows, queries]
    scores = torch.einsum("nd,nsd->ns", q.float(), k[rows].float()) * attention.scaling  # [N, S]
    allowed = batch["attention_mask"][rows, 0, queries]  # [N, S]
    log_attention = scores.masked_fill(~allowed, -torch.inf).log_softmax(-1)
    on_target = torch.zeros_like(allowed)
    for n, (_, _, keys) in enumerate(targets):
        on_target[n, keys] = True
    return -log_attention.masked_fill(~on_target, -torch.inf).logsumexp(-1).mean()


class PatchDropper:
    """Projector forward hook: while `kept` is set, hands the LM only those patches of each image (flattened
    in row order, which is how LLaVA scatters image features into the image-token positions)."""

    def __init__(self, model):
        self.kept: list[list[int]] | None = None
        model.model.multi_modal_projector.register_forward_hook(self._gather)

    def _gather(self, module, args, output):
        if self.kept is None:
            return output
        return torch.cat([output[row, kept] for row, kept in enumerate(self.kept)])[None]


class FeatureTap:
    """Keeps, from the last forward, the tower's feature-layer hidden states and the projector's output."""

    def __init__(self, model, layer: int):
        self.layer, self.features, self.projected = layer, None, None
        model.model.vision_tower.register_forward_hook(self._keep_features)
        model.model.multi_modal_projector.register_forward_hook(self._keep_projected)

    def _keep_features(self, module, args, output):
        self.features = output.hidden_states[self.layer]

    def _keep_projected(self, module, args, output):
        self.projected = output


def word_alignment_loss(projected: Tensor, patch_pair: Tensor, word_embeddings: Tensor, tok,
                        with_quadrant: bool = True) -> Tensor:
    """1 - cosine between each object patch's projected feature and the sum of the input embeddings of its
    colour word and shape word, and `with_quadrant` of its quadrant's two words ("top", "left"), held fixed
    as the target.

    The image tokens then read like the words "red circle top left" to the LM, and the questions become
    copying from context, which a small LM learns far sooner than decoding free-form visual features. Without
    the quadrant words the projector drops position (a linear probe reads the quadrant of an object patch from
    the tower's features every time, from the projector's output 62 % of the time) and position questions
    stay near chance.
    """
    on_object = patch_pair > 0  # [B, P]
    if not on_object.any():
        return projected.sum() * 0.0
    pair = patch_pair[on_object] - 1
    word_ids = lambda words: torch.tensor(tok.convert_tokens_to_ids(list(words)))  # noqa: E731
    words = word_embeddings.detach()
    target = words[word_ids(COLOURS)[pair // len(SHAPES)]] + words[word_ids(SHAPES)[pair % len(SHAPES)]]
    if with_quadrant:
        quadrant = patch_quadrants(patch_pair.shape[1]).expand_as(patch_pair)[on_object]
        vertical, horizontal = zip(*(q.split() for q in QUADRANTS))
        target = target + words[word_ids(vertical)[quadrant]] + words[word_ids(horizontal)[quadrant]]
    return (1 - F.cosine_similarity(projected[on_object].float(), target.float(), dim=-1)).mean()


def answer_loss(logits: Tensor, labels: Tensor, turn_weighted: bool) -> Tensor:
    """Next-token cross-entropy on the answer tokens (labels != -100).

    Token-averaged, a caption's ~16 tokens outweigh a one-word answer 8-fold; `turn_weighted` averages within
    each answer first, so that every turn (every question) weighs the same.
    """
    target = labels[:, 1:]
    token_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target.flatten(), ignore_index=-100,
                                 reduction="none").view_as(target)
    is_answer = target != -100
    if not turn_weighted:
        return token_loss[is_answer].mean()
    starts = is_answer & ~F.pad(is_answer[:, :-1], (1, 0), value=False)
    span = (starts.cumsum(1) + torch.arange(target.shape[0])[:, None] * target.shape[1])[is_answer]
    _, span_index, span_length = torch.unique(span, return_inverse=True, return_counts=True)
    return (token_loss[is_answer] / span_length[span_index]).sum() / len(span_length)


def schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def answer_accuracy(logits: Tensor, labels: Tensor, tasks: list[list[str]]) -> dict[str, float]:
    """Per-task share of turns whose answer tokens are all argmax-correct under teacher forcing."""
    predicted, target = logits[:, :-1].argmax(-1), labels[:, 1:]
    hits: dict[str, list[bool]] = {}
    for row in range(labels.shape[0]):
        is_answer = (target[row] != -100).int()
        # answer spans are maximal runs of label positions, in turn order
        starts = torch.nonzero(torch.diff(is_answer, prepend=torch.zeros(1, dtype=torch.int)) == 1).flatten()
        ends = torch.nonzero(torch.diff(is_answer, append=torch.zeros(1, dtype=torch.int)) == -1).flatten() + 1
        for task, s, e in zip(tasks[row], starts.tolist(), ends.tolist()):
            hits.setdefault(task, []).append(bool((predicted[row, s:e] == target[row, s:e]).all()))
    return {task: sum(v) / len(v) for task, v in sorted(hits.items())}


class Trainer:
    """The two stages over one model, its auxiliary heads and a running training-seed counter."""

    def __init__(self, recipe: Recipe, out: Path, log: Callable[[str], None]):
        torch.set_num_threads(recipe.threads)
        self.recipe, self.out, self.log = recipe, out, log
        self.arch = recipe.architecture
        self.processor = build_processor(self.arch)
        self.heads = AuxiliaryHeads(self.arch.vision_hidden)
        if recipe.init_from:
            self.model = LlavaForConditionalGeneration.from_pretrained(recipe.init_from, local_files_only=True,
                                                                       use_kernels=False)
            self.heads.load_state_dict(load_file(Path(recipe.init_from) / AUX_HEADS_FILE))
        else:
            self.model = build_model(self.processor.tokenizer, self.arch, recipe.seed)
            init_grid_positions(self.model)
        self.model.train()
        self.tap = FeatureTap(self.model, self.model.config.vision_feature_layer)
        self.dropper = PatchDropper(self.model)  # registered after the tap: the tap keeps the full grid
        self.autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.bf16)
        self.next_seed = recipe.train_seed_start
        self.started = time.time()
        self.history: list[dict] = []

    def batch(self, with_text: bool) -> dict:
        seeds = range(self.next_seed, self.next_seed + self.recipe.batch_size)
        self.next_seed += self.recipe.batch_size
        return make_batch(seeds, self.processor, self.arch, with_text, self.recipe.drop_probability)

    def progress(self) -> str:
        return f"images {self.next_seed - self.recipe.train_seed_start} {time.time() - self.started:.0f}s"

    def vision_stage(self) -> None:
        recipe, tower = self.recipe, self.model.model.vision_tower
        params = list(tower.parameters()) + list(self.heads.parameters())
        optimiser = torch.optim.AdamW(params, lr=recipe.vision_lr, weight_decay=recipe.weight_decay)
        for step in range(recipe.vision_steps):
            batch = self.batch(with_text=False)
            for group in optimiser.param_groups:
                group["lr"] = recipe.vision_lr * schedule(step, recipe.vision_steps, recipe.warmup_steps)
            with self.autocast:
                hidden = tower(batch["pixel_values"], output_hidden_states=True).hidden_states
                loss, accuracy = self.heads.loss(hidden[self.model.config.vision_feature_layer], batch["targets"])
            optimiser.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimiser.step()
            if step % 25 == 0 or step == recipe.vision_steps - 1:
                self.log(f"vision step {step} loss {loss.item():.3f} colour-acc {accuracy['colour']:.3f} "
                         f"shape-acc {accuracy['shape']:.3f} {self.progress()}")
            if (step + 1) % recipe.validate_every == 0 or step == recipe.vision_steps - 1:
                self.save()

    def joint_stage(self) -> None:
        recipe = self.recipe
        tower = set(self.model.model.vision_tower.parameters())
        # the pre-trained tower moves slower, so answer gradients refine its features rather than overwrite them
        groups = [{"params": [p for p in self.model.parameters() if p not in tower], "scale": 1.0},
                  {"params": list(tower) + list(self.heads.parameters()), "scale": recipe.joint_vision_lr_scale}]
        params = [p for g in groups for p in g["params"]]
        optimiser = torch.optim.AdamW(groups, lr=recipe.joint_lr, weight_decay=recipe.weight_decay)
        validation = make_batch(range(VALIDATION_SEED_START, VALIDATION_SEED_START + 64), self.processor, self.arch,
                                with_text=True)
        for step in range(recipe.joint_steps):
            batch = self.batch(with_text=True)
            self.dropper.kept = batch.get("kept_patches")
            for group in optimiser.param_groups:
                group["lr"] = recipe.joint_lr * group["scale"] * schedule(step, recipe.joint_steps, recipe.warmup_steps)
            with self.autocast:
                output = self.model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                                    attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                                    output_hidden_states=True)
                output.loss = answer_loss(output.logits, batch["labels"], recipe.turn_weighted_loss)
                look_loss = sum(attention_supervision_loss(self.model, output.hidden_states, batch, layer, 0,
                                                           batch[f"{name}_targets"])
                                for name, layer in (("lookup", recipe.lookup_layer), ("gather", recipe.gather_layer)))
                aux_loss, accuracy = self.heads.loss(self.tap.features, batch["targets"])
                align_loss = word_alignment_loss(self.tap.projected, batch["targets"]["patch_pair"],
                                                 self.model.get_input_embeddings().weight, self.processor.tokenizer,
                                                 recipe.align_quadrant)
            loss = (output.loss + recipe.aux_weight * aux_loss + recipe.align_weight * align_loss
                    + recipe.attention_weight * look_loss)
            optimiser.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimiser.step()
            if step % 10 == 0:
                self.log(f"joint step {step} answer-loss {output.loss.item():.3f} aux {aux_loss.item():.3f} "
                         f"align {align_loss.item():.3f} attention {look_loss.item():.3f} "
                         f"colour-acc {accuracy['colour']:.3f} shape-acc {accuracy['shape']:.3f} {self.progress()}")
            if (step + 1) % recipe.validate_every == 0 or step == recipe.joint_steps - 1:
                self.dropper.kept = None
                scores = validate(self.model, validation)
                self.history.append({"joint_step": step + 1, "seconds": round(time.time() - self.started), **scores})
                self.log(f"validation {json.dumps(self.history[-1])}")
                self.save()

    def save(self) -> None:
        """The model (safetensors) and processor, the recipe with the validation history, and the auxiliary
        heads in a separate file (only `--init-from` reads it; the model folder loads without it)."""
        out = self.out
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out)
        self.processor.save_pretrained(out)
        save_file(self.heads.state_dict(), out / AUX_HEADS_FILE)
        (out / "recipe.json").write_text(json.dumps({"recipe": asdict(self.recipe), "validation": self.history,
                                                     "training_images": self.next_seed - self.recipe.train_seed_start,
                                                     "seconds": round(time.time() - self.started)}, indent=1) + "\n")


def train(recipe: Recipe, out: Path, log: Callable[[str], None]) -> dict:
    """Run both stages of `recipe`, saving into `out`; returns the last validation scores."""
    trainer = Trainer(recipe, out, log)
    trainer.vision_stage()
    trainer.joint_stage()
    return trainer.history[-1] if trainer.history else {}


@torch.no_grad()
def validate(model, batch: dict) -> dict[str, float]:
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                       attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]).logits
    model.train()
    per_task = answer_accuracy(logits.float(), batch["labels"], batch["tasks"])
    questions = [v for k, v in per_task.items() if k != CAPTION_TASK]
    return {"teacher_forced_vqa": round(sum(questions) / len(questions), 4), **{k: round(v, 3) for k, v in per_task.items()}}
