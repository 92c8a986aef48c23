"""Training of the reference model from scratch on procedural scenes (entry point: jobs/train_reference.py).

Two stages, both fed fresh scenes every step (training seeds start at 0; the benchmark's held-out range
starts at `reference.benchmark.HELD_OUT_SEED_START`, the validation range at `data.VALIDATION_SEED_START`):
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

import torch
from safetensors.torch import load_file, save_file
from transformers import LlavaForConditionalGeneration

from pipeline.flags import option

from reference.model import Architecture, build_model, build_processor
from reference.scenes import CAPTION_TASK, TASKS
from reference.training.data import EXTRA_TURNS, PATCH_OBJECT_THRESHOLD, VALIDATION_SEED_START, make_batch
from reference.training.losses import (AuxiliaryHeads, answer_accuracy, answer_loss, attention_supervision_loss,
                                       word_alignment_loss)

AUX_HEADS_FILE = "aux_heads.safetensors"


# The sections of jobs/train_reference.py's `--help`; every Recipe field with a flag names one.
RECIPE_GROUPS = {
    "stages": "how long and how fast each stage trains",
    "losses": "what the joint stage learns besides the answers",
    "run": "seeds, threads, validation and where to start from",
}


@dataclass
class Recipe:
    """How the reference model is trained: the flags of jobs/train_reference.py, saved in recipe.json."""
    architecture: Architecture = field(default_factory=Architecture)
    seed: int = option(0, "seeds the model's initialisation", "S", group="run")
    batch_size: int = option(16, "images per training step", "N", group="stages")
    vision_steps: int = option(1100, "steps of stage 1 (the vision tower alone)", "N", group="stages")
    joint_steps: int = option(1000, "steps of stage 2 (the whole model)", "N", group="stages")
    vision_lr: float = option(2e-3, "peak learning rate of stage 1", "LR", group="stages")
    joint_lr: float = option(2e-3, "peak learning rate of stage 2", "LR", group="stages")
    warmup_steps: int = 50
    weight_decay: float = 0.01
    aux_weight: float = option(1.0, "weight of the auxiliary vision-head losses in stage 2", "W", group="losses")
    joint_vision_lr_scale: float = option(0.3, "stage 2's learning rate of the tower and the heads, as a share of "
                                               "--joint-lr", "F", group="stages")
    align_weight: float = option(1.0, "weight of word_alignment_loss (object patches project onto their words)", "W",
                                 group="losses")
    align_quadrant: bool = option(True, "align object patches to their colour and shape words only, not their "
                                        "quadrant's (default: with the quadrant's words)", group="losses",
                                  negated="--no-align-quadrant")
    attention_weight: float = option(1.0, "weight of the two attention-supervision losses "
                                          "(attention_supervision_loss)", "W", group="losses")
    lookup_layer: int = option(1, "LM layer whose head 0 learns: colour / shape words -> the objects they name", "L",
                               group="losses")
    gather_layer: int = option(3, "LM layer whose head 0 learns: answer position -> those words (attention_targets)",
                               "L", group="losses")
    turn_weighted_loss: bool = option(True, "average the answer loss over tokens rather than over turns (default: "
                                            "over turns, every answer weighs the same; see answer_loss)",
                                      group="losses", negated="--token-averaged-loss")
    drop_probability: float = option(0.5, "share of stage-2 batches with background patches dropped (make_batch)",
                                     "P", group="losses")
    init_from: str | None = option(None, "start from a folder saved by an earlier run, not the committed recipe "
                                         "(probes chain stages this way; default: a fresh model)", "DIR", group="run")
    validate_every: int = option(250, "steps between validations (each one saves the model)", "N", group="run")
    threads: int = option(1, "torch threads", "N", group="run")
    bf16: bool = True
    train_seed_start: int = option(0, "the first training scene's seed", "S", group="run")
    data: dict = field(default_factory=lambda: {
        "generator": "reference.scenes.generate_scene(seed, size=image_size, attempt=0)",
        "turns_per_image": list(TASKS) + list(EXTRA_TURNS) + [CAPTION_TASK],
        "question_rng": "numpy default_rng([seed, turn_index])",
        "patch_object_threshold": PATCH_OBJECT_THRESHOLD,
    })


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


def schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


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
