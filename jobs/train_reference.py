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

from reference.training.loop import Recipe, train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    defaults = Recipe()
    for name in ("seed", "batch_size", "vision_steps", "joint_steps", "validate_every", "threads", "train_seed_start",
                 "lookup_layer", "gather_layer"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    for name in ("vision_lr", "joint_lr", "aux_weight", "joint_vision_lr_scale", "align_weight", "drop_probability",
                 "attention_weight"):
        parser.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(defaults, name))
    parser.add_argument("--token-averaged-loss", dest="turn_weighted_loss", action="store_false",
                        help="average the answer loss over tokens rather than over turns")
    parser.add_argument("--no-align-quadrant", dest="align_quadrant", action="store_false",
                        help="align object patches to their colour and shape words only, not their quadrant's")
    parser.add_argument("--init-from", help="start from a folder saved by an earlier run (not the committed recipe)")
    args = parser.parse_args()
    recipe = Recipe(**{k: v for k, v in vars(args).items() if k != "out"})

    def log(line: str) -> None:
        print(line, flush=True)

    log(f"recipe {json.dumps(asdict(recipe))}")
    train(recipe, args.out, log)


if __name__ == "__main__":
    main()
