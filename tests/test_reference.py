"""Reference-model plumbing: the word-level tokenizer, packed training turns that equal single-turn prompts,
the auxiliary vision targets, and the benchmark scoring."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from reducers.step import Step
from reference import benchmark
from reference.benchmark import Item, ObjectOracle, caption_items, object_coverage, question_items, retention, score
from reference.model import Architecture, build_model, build_processor, load_reference, prompt
from reference.scenes import (CAPTION_TASK, COLOURS, PLURAL, QUADRANTS, SHAPES, TASKS, generate_scene, render_scene,
                              vocabulary)
from reference.training.data import (PAIRS, coverage_by_object, dropped_background, make_batch, pack_turns,
                                     patch_quadrants, scene_questions, vision_targets)
from reference.training.loop import PatchDropper
from reference.training.losses import answer_accuracy, answer_loss, attention_supervision_loss, word_alignment_loss

SMALL = Architecture(vision_layers=2, llm_layers=2, vision_hidden=32, llm_hidden=32, llm_intermediate=64)


@pytest.fixture(scope="module")
def small():
    processor = build_processor(SMALL)
    return processor, build_model(processor.tokenizer, SMALL, seed=1).eval()


def test_every_word_is_one_known_token(small):
    tok = small[0].tokenizer
    for word in vocabulary():
        ids = tok(word, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] != tok.unk_token_id, word
    text = "what colour is the circle ? ASSISTANT : red"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_prompt_expands_to_the_grid_of_image_tokens(small):
    processor, _ = small
    inputs = processor(images=[generate_scene(0).render()], text=[prompt(processor, "how many objects are there ?")],
                       return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(processor.tokenizer.image_token_id) == SMALL.grid ** 2
    assert processor.tokenizer.decode(ids[SMALL.grid ** 2 + 3:]) == "how many objects are there ? ASSISTANT :"


def test_packed_turns_give_the_logits_of_single_turn_prompts(small):
    processor, model = small
    scene = generate_scene(5)
    questions = scene_questions(scene)
    batch = make_batch(range(5, 7), processor, SMALL, with_text=True)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                       attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]).logits[0]
        row = batch["input_ids"][0].tolist()
        prefix = SMALL.grid ** 2 + 3
        for question in (questions[0], questions[3], questions[-1]):
            single = processor(images=[scene.render()], text=[prompt(processor, question.text)], return_tensors="pt")
            alone = model(**single).logits[0, prefix:]
            turn = single["input_ids"][0, prefix:].tolist()
            start = next(s for s in range(prefix, len(row)) if row[s:s + len(turn)] == turn)
            torch.testing.assert_close(packed[start:start + len(turn)], alone, atol=1e-5, rtol=1e-4)


def test_labels_are_the_answers_and_end_of_turn_only(small):
    tok = small[0].tokenizer
    scene = generate_scene(9)
    questions = scene_questions(scene)
    packed = pack_turns(tok, [list(range(4))], [questions], 4)
    labelled = packed["labels"][0][packed["labels"][0] != -100].tolist()
    assert tok.decode(labelled) == " ".join(f"{q.answer} </s>" for q in questions)
    assert {q.task for q in questions} >= {"count_total", "count_colour", "count_shape", "presence", CAPTION_TASK}


def test_teacher_forced_accuracy_counts_whole_answers(small):
    tok = small[0].tokenizer
    questions = scene_questions(generate_scene(9))
    packed = pack_turns(tok, [list(range(4))], [questions], 4)
    labels = packed["labels"]
    perfect = torch.nn.functional.one_hot(torch.roll(labels.clamp(min=0), -1, dims=1), len(tok)).float()
    tasks = [[q.task for q in questions]]
    assert set(answer_accuracy(perfect, labels, tasks).values()) == {1.0}
    first_answer = int(torch.nonzero(labels[0] != -100)[0])
    perfect[0, first_answer - 1] = torch.roll(perfect[0, first_answer - 1], 1)
    assert answer_accuracy(perfect, labels, tasks)[questions[0].task] < 1.0


def test_vision_targets_mark_object_patches_and_centres():
    scene = generate_scene(11)
    _, index_map = render_scene(scene)
    targets = vision_targets([scene], [coverage_by_object(scene, index_map, 14)], Architecture())
    grid = Architecture().grid
    for obj in scene.objects:
        centre = int(obj.cy) // 14 * grid + int(obj.cx) // 14
        assert targets["patch_centre"][0, centre] == 1.0
        assert targets["patch_pair"][0, centre] == PAIRS.index((obj.colour, obj.shape)) + 1
    assert targets["patch_centre"].sum() == len(scene.objects)
    assert targets["cls_pairs"].sum() == len(scene.objects)
    assert (targets["patch_pair"] == 0).float().mean() > 0.6, "objects must stay small"


def test_benchmark_items_are_deterministic_and_cover_every_task():
    first, again = question_items(10_000_000, 21, 168), question_items(10_000_000, 21, 168)
    assert [i.question for i in first] == [i.question for i in again]
    assert [i.question.task for i in first] == list(TASKS) * 3
    captions = caption_items(10_000_000, 3, 168)
    assert {i.question.task for i in captions} == {CAPTION_TASK}
    assert not {i.scene.seed for i in captions} & {i.scene.seed for i in first}


def test_score_and_retention():
    items = question_items(10_000_000, 7, 168)
    answers = [i.question.answer for i in items[:6]] + ["wrong"]
    captions = caption_items(10_000_000, 2, 168)
    texts = [captions[0].question.answer, ""]
    result = score(items, answers, captions, texts)
    assert result["vqa_accuracy"] == pytest.approx(6 / 7)
    assert result["per_task"][TASKS[-1]] == 0.0 and result["per_task"][TASKS[0]] == 1.0
    assert result["caption_f1"] == pytest.approx(0.5)
    assert retention(0.45, 0.9) == pytest.approx(0.5)
    assert retention(0.5, 0.0) is None and retention(None, 0.9) is None
    assert isinstance(items[0], Item) and np.isfinite(result["caption_precision"])


def test_object_oracle_keeps_the_patches_objects_cover():
    scenes = [generate_scene(seed) for seed in (3, 4)]
    coverage = object_coverage(scenes, 14)
    for scene, row in zip(scenes, coverage):
        _, index_map = render_scene(scene)
        assert row.sum() * 14 * 14 == pytest.approx(float((index_map >= 0).sum()))
    oracle = ObjectOracle(coverage=coverage)
    patches = coverage.shape[1]
    cand = torch.arange(patches).expand(2, patches)
    keep = torch.tensor([8, 16])
    step = Step(hidden=torch.zeros(2, patches + 1, 4), q=torch.zeros(2, 1, patches + 1, 4),
                k=torch.zeros(2, 1, patches + 1, 4), key_valid=torch.ones(2, patches + 1, dtype=torch.bool),
                cand=cand + 1, cand_valid=torch.ones(2, patches, dtype=torch.bool), keep=keep, causal=False,
                grid=(12, 12), slots=cand)
    reduction = oracle.reduce_vision(step)
    for row in range(2):
        kept = reduction.kept[row][reduction.kept_valid[row]]
        assert len(kept) == keep[row]
        covered = int((coverage[row] > 0).sum())
        best = torch.sort(coverage[row], descending=True).values[:keep[row]]
        assert torch.equal(torch.sort(coverage[row][kept], descending=True).values, best)
        assert covered >= keep[row] or (coverage[row][kept] > 0).sum() == covered


def test_object_oracle_refuses_to_run_blind():
    with pytest.raises(RuntimeError, match="coverage"):
        ObjectOracle().reduce_vision(Step(hidden=torch.zeros(1, 2, 1), q=torch.zeros(1, 1, 2, 1), k=torch.zeros(1, 1, 2, 1),
                                          key_valid=torch.ones(1, 2, dtype=torch.bool), cand=torch.ones(1, 1, dtype=torch.long),
                                          cand_valid=torch.ones(1, 1, dtype=torch.bool), keep=torch.ones(1, dtype=torch.long),
                                          causal=False, grid=(1, 1), slots=torch.zeros(1, 1, dtype=torch.long)))


def test_word_alignment_loss_is_zero_when_patches_read_as_their_words(small):
    tok = small[0].tokenizer
    embeddings = torch.randn(len(tok), 8)
    word = lambda w: embeddings[tok.convert_tokens_to_ids(w)]  # noqa: E731
    scene = generate_scene(11)
    _, index_map = render_scene(scene)
    pair = vision_targets([scene], [coverage_by_object(scene, index_map, 14)], Architecture())["patch_pair"]
    quadrants = patch_quadrants(pair.shape[1])
    named = torch.randn(1, pair.shape[1], 8)  # object patches as "red circle"
    placed = torch.randn(1, pair.shape[1], 8)  # and as "red circle top left"
    for slot in torch.nonzero(pair[0]).flatten().tolist():
        colour, shape = PAIRS[int(pair[0, slot]) - 1]
        named[0, slot] = 3 * (word(colour) + word(shape))
        vertical, horizontal = QUADRANTS[int(quadrants[slot])].split()
        placed[0, slot] = 3 * (word(colour) + word(shape) + word(vertical) + word(horizontal))
    assert word_alignment_loss(placed, pair, embeddings, tok) == pytest.approx(0.0, abs=1e-5)
    assert word_alignment_loss(-placed, pair, embeddings, tok) == pytest.approx(2.0, abs=1e-5)
    assert word_alignment_loss(named, pair, embeddings, tok, with_quadrant=False) == pytest.approx(0.0, abs=1e-5)
    assert word_alignment_loss(named, pair, embeddings, tok) > 0.1  # the quadrant is part of the target


def test_drop_batches_keep_every_object_patch_and_run_through_the_model(small):
    processor, model = small
    patches = SMALL.grid ** 2
    dropped = None
    for first in range(0, 200, 2):
        batch = make_batch(range(first, first + 2), processor, SMALL, with_text=True, drop_probability=0.5)
        if "kept_patches" in batch:
            dropped = batch
            break
    assert dropped is not None, "no drop batch in 100 draws at probability 0.5"
    for row, kept in enumerate(dropped["kept_patches"]):
        scene = generate_scene(first + row)
        touched = set(np.nonzero(object_coverage([scene], 14)[0] > 0)[0].tolist())
        assert touched <= set(kept) and len(kept) <= patches
        assert int((dropped["input_ids"][row] == processor.tokenizer.image_token_id).sum()) == len(kept)
    dropper = PatchDropper(model)
    dropper.kept = dropped["kept_patches"]
    with torch.no_grad():
        out = model(input_ids=dropped["input_ids"], pixel_values=dropped["pixel_values"],
                    attention_mask=dropped["attention_mask"], position_ids=dropped["position_ids"],
                    labels=dropped["labels"])
    dropper.kept = None
    assert torch.isfinite(out.loss)


def test_positions_compact_or_original():
    tok = build_processor(SMALL).tokenizer
    questions = scene_questions(generate_scene(9))[:2]
    kept = [[0, 5, 7]]
    compact = pack_turns(tok, kept, [questions], 9)["position_ids"][0].tolist()
    original = pack_turns(tok, kept, [questions], 9, original_positions=True)["position_ids"][0].tolist()
    assert compact[:6] == [0, 1, 2, 3, 4, 5] and original[:6] == [0, 1, 2, 3, 8, 10]
    first_turn = len(tok(questions[0].text + " ASSISTANT:", add_special_tokens=False)["input_ids"]) + 2
    assert compact[6] == 6 and original[6] == 12
    assert compact[6 + first_turn] == 6 and original[6 + first_turn] == 12


def test_dropped_background_keeps_objects():
    coverage = np.zeros(144)
    coverage[[3, 40, 41]] = 0.5
    for seed in range(20):
        kept = dropped_background(coverage, np.random.default_rng(seed))
        assert {3, 40, 41} <= set(kept) and kept == sorted(kept)


def test_answer_loss_weighs_turns_equally(small):
    tok = small[0].tokenizer
    questions = scene_questions(generate_scene(9))
    labels = pack_turns(tok, [list(range(4))], [questions], 4)["labels"]
    logits = torch.randn(1, labels.shape[1], len(tok))
    target = labels[0, 1:]
    per_token = torch.nn.functional.cross_entropy(logits[0, :-1], target, ignore_index=-100, reduction="none")
    assert answer_loss(logits, labels, turn_weighted=False) == pytest.approx(per_token[target != -100].mean().item(), rel=1e-5)
    spans, current = [], []
    for value, loss in zip(target.tolist(), per_token.tolist()):
        if value != -100:
            current.append(loss)
        elif current:
            spans.append(sum(current) / len(current))
            current = []
    spans += [sum(current) / len(current)] if current else []
    assert len(spans) == len(questions)
    assert answer_loss(logits, labels, turn_weighted=True) == pytest.approx(sum(spans) / len(spans), rel=1e-5)


def test_attention_targets_point_at_what_the_words_name(small):
    processor, _ = small
    tok = processor.tokenizer
    word_of = lambda position, row, batch: tok.convert_ids_to_tokens(int(batch["input_ids"][row, position]))  # noqa: E731
    singular = {plural: shape for shape, plural in PLURAL.items()}
    captions = second_words = 0
    for first in (0, 40, 80):  # full grids and drop batches (compact and original positions)
        batch = make_batch(range(first, first + 4), processor, Architecture(), with_text=True, drop_probability=0.7)
        pair = batch["targets"]["patch_pair"]
        for row, query, keys in batch["lookup_targets"]:
            kept = batch.get("kept_patches", [list(range(144))] * 4)[row]
            word = singular.get(word_of(query, row, batch), word_of(query, row, batch))
            scene = generate_scene(first + row)
            named = {(o.colour, o.shape) for o in scene.objects if word in (o.colour, o.shape)}
            if keys == [0]:
                assert not named and word_of(0, row, batch) == "<s>"
                continue
            assert all(batch["input_ids"][row, k] == tok.image_token_id for k in keys)
            # 3 = "<s> USER :" before the image
            assert {PAIRS[int(pair[row, kept[k - 3]]) - 1] for k in keys} == named
        for row, query, keys in batch["gather_targets"]:
            assert batch["labels"][row, query + 1] != -100 and all(k < query for k in keys)
            words = {word_of(k, row, batch) for k in keys}
            if words == {"<image>"}:
                captions += word_of(query, row, batch) == "a"
            else:
                assert words <= set(COLOURS) | set(SHAPES) | set(PLURAL.values())
                second_words += word_of(query + 1, row, batch) in ("left", "right")  # "top" -> "left" reads them too
    assert captions > 10 and second_words > 0


def test_attention_supervision_loss_is_the_log_mass_of_eager_attention():
    processor = build_processor(SMALL)
    model = build_model(processor.tokenizer, SMALL, seed=2).eval()
    model.set_attn_implementation("eager")
    batch = make_batch(range(3, 5), processor, SMALL, with_text=True)
    additive = torch.zeros(batch["attention_mask"].shape).masked_fill(~batch["attention_mask"], -torch.inf)
    with torch.no_grad():  # eager attention adds a 4-D mask to the scores, so it gets the additive form
        out = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], position_ids=batch["position_ids"],
                    attention_mask=additive, output_hidden_states=True, output_attentions=True)
        for layer, head in ((0, 0), (1, 1)):
            for name in ("lookup_targets", "gather_targets"):
                targets = batch[name]
                weights = out.attentions[layer][:, head]  # [B, S, S]
                expected = -torch.stack([weights[r, q, keys].sum().log() for r, q, keys in targets]).mean()
                loss = attention_supervision_loss(model, out.hidden_states, batch, layer, head, targets)
                assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_the_shipped_model_loads_offline_and_answers_held_out_questions():
    """The committed weights (reference/assets/reference_model), unreduced, on the first 70 held-out questions
    (10 per task) and 10 captions: floors well under its full-benchmark scores (docs/reference-model.md), far over
    chance."""
    model, processor = load_reference()
    result = benchmark.run(model, processor, "none", questions=70, captions=10, batch_size=35)
    assert result["vqa_accuracy"] >= 0.9 and result["caption_f1"] >= 0.9, result


def test_the_benchmark_punishes_dropping_the_wrong_tokens():
    """At 1/9 of the visual tokens, keeping the patches the objects cover beats a random choice by at least 10
    points of accuracy on the shipped model (the issue's fitness check; 46 points on the full benchmark)."""
    model, processor = load_reference()
    accuracy = {method: benchmark.run(model, processor, method, ratio=1 / 9, questions=140, captions=0,
                                      batch_size=70)["vqa_accuracy"] for method in ("object-oracle", "random")}
    assert accuracy["object-oracle"] >= accuracy["random"] + 0.10, accuracy
