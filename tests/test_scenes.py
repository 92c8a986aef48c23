"""The scene generator: determinism, ground truth recomputed from the rendered pixels, question answers, scoring."""
from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from reference.scenes import (CAPTION_TASK, COLOURS, NUMBERS, PLURAL, SHAPES, TASKS, Scene, SceneObject, ask,
                              answer_correct, benchmark_item, caption, caption_pairs, caption_scores, f1,
                              generate_scene, normalise, patch_coverage, render_scene, vocabulary)

SEEDS = range(40)


def components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, each as an array of (row, col) pixels."""
    seen = np.zeros_like(mask, dtype=bool)
    found = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        queue, pixels = deque([start]), []
        while queue:
            r, c = queue.popleft()
            pixels.append((r, c))
            for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= nr < mask.shape[0] and 0 <= nc < mask.shape[1] and mask[nr, nc] and not seen[nr, nc]:
                    seen[nr, nc] = True
                    queue.append((nr, nc))
        found.append(np.array(pixels))
    return found


def colour_mask(pixels: np.ndarray, colour: str) -> np.ndarray:
    return np.all(pixels == np.array(COLOURS[colour], dtype=np.uint8), axis=-1)


def test_same_seed_same_scene_and_pixels():
    for seed in (0, 7, 123456):
        a, b = generate_scene(seed), generate_scene(seed)
        assert a == b
        assert np.array_equal(np.asarray(a.render()), np.asarray(b.render()))


def test_different_seeds_and_attempts_differ():
    scenes = {generate_scene(seed) for seed in range(50)}
    assert len(scenes) == 50
    assert generate_scene(3, attempt=0) != generate_scene(3, attempt=1)


def test_scene_shape_rules():
    counts = set()
    for seed in range(300):
        scene = generate_scene(seed)
        counts.add(len(scene.objects))
        pairs = [(o.colour, o.shape) for o in scene.objects]
        assert len(pairs) == len(set(pairs)), "a (colour, shape) pair appears twice"
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.bbox()
            assert 0 <= x0 and 0 <= y0 and x1 <= scene.size and y1 <= scene.size
            assert obj.radius <= 0.11 * scene.size, "objects must stay small"
    assert counts == {1, 2, 3, 4}


@pytest.mark.parametrize("seed", SEEDS)
def test_colour_and_count_recomputed_from_pixels(seed):
    scene = generate_scene(seed)
    pixels = np.asarray(scene.render())
    for colour in COLOURS:
        blobs = components(colour_mask(pixels, colour))
        expected = [o for o in scene.objects if o.colour == colour]
        assert len(blobs) == len(expected), f"{colour}: {len(blobs)} blobs in the pixels, {len(expected)} in the truth"
        # Each blob's centre of mass lies inside the object of that colour it belongs to.
        for blob in blobs:
            cy, cx = blob.mean(axis=0)
            assert min(np.hypot(cx + 0.5 - o.cx, cy + 0.5 - o.cy) / o.radius for o in expected) < 0.5
    painted = sum(colour_mask(pixels, c) for c in COLOURS)
    assert len(components(painted > 0)) == len(scene.objects)


@pytest.mark.parametrize("seed", SEEDS)
def test_index_map_matches_pixels(seed):
    scene = generate_scene(seed)
    image, index_map = render_scene(scene)
    pixels = np.asarray(image)
    for colour in COLOURS:
        drawn = np.isin(index_map, [i for i, o in enumerate(scene.objects) if o.colour == colour])
        assert np.array_equal(colour_mask(pixels, colour), drawn)
    background = pixels[index_map < 0]
    for rgb in COLOURS.values():
        assert not np.all(background == np.array(rgb, dtype=np.uint8), axis=-1).any()


def test_patch_coverage_sums_to_object_area():
    scene = generate_scene(11)
    _, index_map = render_scene(scene)
    coverage = patch_coverage(index_map, 14, len(scene.objects))
    assert coverage.shape == (len(scene.objects), 12, 12)
    for i in range(len(scene.objects)):
        assert coverage[i].sum() * 14 * 14 == pytest.approx((index_map == i).sum())
    assert coverage.sum(axis=0).max() <= 1.0


@pytest.mark.parametrize("seed", SEEDS)
def test_answers_agree_with_pixels(seed):
    scene = generate_scene(seed)
    pixels = np.asarray(scene.render())
    rng = np.random.default_rng(seed)
    count = ask(scene, "count_total", rng)
    assert count.answer == NUMBERS[len(components(sum(colour_mask(pixels, c) for c in COLOURS) > 0))]
    per_colour = ask(scene, "count_colour", rng)
    colour = per_colour.text.split()[2]
    assert per_colour.answer == NUMBERS[len(components(colour_mask(pixels, colour)))]


def test_position_is_the_quadrant_of_the_pixels():
    asked = 0
    for seed in SEEDS:
        scene, question = benchmark_item(seed, "position")
        _, index_map = render_scene(scene)
        name = question.text.removeprefix("where is the ").removesuffix(" ?")
        index = [o.name for o in scene.objects].index(name)
        rows, cols = np.nonzero(index_map == index)
        half = scene.size / 2
        vertical = "top" if rows.max() < half else "bottom" if rows.min() >= half else None
        horizontal = "left" if cols.max() < half else "right" if cols.min() >= half else None
        assert question.answer == f"{vertical} {horizontal}"
        asked += 1
    assert asked == len(SEEDS)


def test_every_task_has_a_consistent_answer():
    for seed in SEEDS:
        for task in TASKS:
            scene, q = benchmark_item(seed, task)
            names = {o.name for o in scene.objects}
            if task == "colour_of_shape":
                shape = q.text.split()[-2]
                assert [o.colour for o in scene.objects if o.shape == shape] == [q.answer]
            elif task == "shape_of_colour":
                colour = q.text.split()[-3]
                assert [o.shape for o in scene.objects if o.colour == colour] == [q.answer]
            elif task == "count_shape":
                plural = q.text.split()[2]
                shape = next(s for s in SHAPES if PLURAL[s] == plural)
                assert q.answer == NUMBERS[sum(o.shape == shape for o in scene.objects)]
            elif task == "presence":
                named = " ".join(q.text.split()[3:5])
                assert q.answer == ("yes" if named in names else "no")


def test_presence_is_balanced():
    answers = [benchmark_item(seed, "presence")[1].answer for seed in range(400)]
    assert 0.4 < answers.count("yes") / len(answers) < 0.6


def test_unknown_task_is_rejected():
    with pytest.raises(ValueError, match="unknown task"):
        ask(generate_scene(0), "colour", np.random.default_rng(0))


def _scene(*pairs: tuple[str, str]) -> Scene:
    objects = tuple(SceneObject(c, s, cx=20.0 + 40 * i, cy=40.0, radius=10.0) for i, (c, s) in enumerate(pairs))
    return Scene(seed=0, size=168, objects=objects, background=(220, 220, 220), textured=False)


def test_caption_names_objects_by_colour_then_shape_and_scores_perfectly():
    scene = _scene(("blue", "square"), ("red", "cross"), ("red", "circle"))
    assert caption(scene) == "a red circle , a red cross , a blue square"
    assert ask(scene, CAPTION_TASK, np.random.default_rng(0)).answer == caption(scene)
    assert caption_scores("A blue square, a red circle, a red cross.", scene) == (1.0, 1.0)  # any order


def test_caption_precision_and_recall():
    scene = _scene(("red", "circle"), ("blue", "square"), ("green", "cross"))
    assert caption_scores("a red circle , a yellow square", scene) == (0.5, pytest.approx(1 / 3))
    assert caption_scores("a red circle , a red circle", scene) == (1.0, pytest.approx(1 / 3))
    assert caption_scores("nothing here", scene) == (0.0, 0.0)
    assert caption_pairs("a red , circle blue square") == [("blue", "square")]
    assert f1(0.5, 1 / 3) == pytest.approx(0.4)
    assert f1(0.0, 0.0) == 0.0


def test_answer_comparison_normalises_case_and_punctuation():
    assert answer_correct("Yes.", "yes")
    assert answer_correct("  top   LEFT ", "top left")
    assert not answer_correct("top", "top left")
    assert not answer_correct("no", "yes")


def test_every_generated_word_is_in_the_vocabulary():
    words = set(vocabulary())
    for seed in range(300):
        for task in TASKS + (CAPTION_TASK,):
            _, q = benchmark_item(seed, task)
            assert set(normalise(q.text + " " + q.answer).split()) <= words, (task, q)


def test_evidence_is_the_objects_the_answer_is_read_from():
    for seed in SEEDS:
        for task in TASKS + (CAPTION_TASK,):
            scene, q = benchmark_item(seed, task)
            evidence = [scene.objects[i] for i in q.evidence]
            if task in ("colour_of_shape", "shape_of_colour", "position"):
                (obj,) = evidence
                named, answer = {"colour_of_shape": (obj.shape, obj.colour), "shape_of_colour": (obj.colour, obj.shape),
                                 "position": (obj.name, obj.quadrant(scene.size))}[task]
                assert f" {named} " in q.text and q.answer == answer
            elif task.startswith("count"):
                assert q.answer == NUMBERS[len(evidence)]
                assert all(o.colour in q.text.split() or PLURAL[o.shape] in q.text.split() for o in evidence) \
                    or task == "count_total"
            elif task == "presence":
                assert (q.answer == "yes") == bool(evidence)
                assert all(o.name in q.text for o in evidence)
            else:
                assert q.answer == " , ".join(f"a {o.name}" for o in evidence)
