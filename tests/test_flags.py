"""pipeline/flags.py: the one builder of every job's flags; here in its typed form, as jobs/evaluate.py and
jobs/train_reference.py use it."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.flags import add_flags, option
from reference.benchmark import EVALUATE_GROUPS, HELD_OUT_SEED_START, EvaluateConfig
from reference.training.loop import RECIPE_GROUPS, Recipe


def recipe_of(argv: list[str]) -> Recipe:
    parser = argparse.ArgumentParser()
    add_flags(parser, Recipe, RECIPE_GROUPS, typed=True)
    return Recipe(**vars(parser.parse_args(argv)))


def test_recipe_flags_default_to_the_recipe_and_convert_to_its_types():
    assert recipe_of([]) == Recipe()
    recipe = recipe_of(["--joint-steps", "5", "--vision-lr", "1e-3", "--init-from", "s1"])
    assert (recipe.joint_steps, recipe.vision_lr, recipe.init_from) == (5, 1e-3, "s1")
    assert isinstance(recipe.joint_steps, int)


def test_negated_switches_turn_a_default_true_off():
    recipe = recipe_of(["--token-averaged-loss", "--no-align-quadrant"])
    assert (recipe.turn_weighted_loss, recipe.align_quadrant) == (False, False)
    assert (Recipe().turn_weighted_loss, Recipe().align_quadrant) == (True, True)


def evaluate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_flags(parser, EvaluateConfig, EVALUATE_GROUPS, exclusive=("visual_tokens", "ratio"), typed=True)
    return parser


def test_evaluate_flags_require_a_reducer_and_one_budget_at_most(capsys):
    args = evaluate_parser().parse_args(["--reducer", "fastv", "--ratio", "0.33", "--json", "out.json"])
    assert (args.reducer, args.ratio, args.visual_tokens, args.json) == ("fastv", 0.33, None, Path("out.json"))
    assert args.seed_start == HELD_OUT_SEED_START
    for argv in (["--ratio", "0.33"], ["--reducer", "fastv", "--ratio", "0.3", "--visual-tokens", "9"]):
        with pytest.raises(SystemExit):
            evaluate_parser().parse_args(argv)
    assert "not allowed with argument" in capsys.readouterr().err
    text = evaluate_parser().format_help()
    assert "--reducer NAME" in text and "(default: None)" not in text  # a required flag names no default


def test_an_option_in_an_unknown_section_is_refused():
    @dataclass
    class Options:
        size: int = option(1, "a size", "N", group="nowhere")

    with pytest.raises(ValueError, match=r"unknown --help group\(s\) \['nowhere'\]"):
        add_flags(argparse.ArgumentParser(), Options, {"somewhere": "a section"})
