"""Train the reference model from scratch on procedural scenes (CPU, minutes), and save it with its recipe.

    python jobs/train_reference.py --out reference/assets/reference_model [--vision-steps N] [--joint-steps N] ...

Every flag defaults to the committed recipe (`reference.training.loop.Recipe`); how it trains is
described there. The model is saved with `save_pretrained` (safetensors) at each validation, with
`recipe.json` beside it (the recipe, its seeds and the validation history).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.flags import add_flags  # noqa: E402
from reference.training.loop import RECIPE_GROUPS, Recipe, train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder the model and recipe.json are saved in")
    add_flags(parser, Recipe, RECIPE_GROUPS, typed=True)
    args = parser.parse_args()
    recipe = Recipe(**{k: v for k, v in vars(args).items() if k != "out"})

    def log(line: str) -> None:
        print(line, flush=True)

    log(f"recipe {json.dumps(asdict(recipe))}")
    train(recipe, args.out, log)


if __name__ == "__main__":
    main()
