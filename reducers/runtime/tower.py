"""The vision tower's part: where each image's placeholders come from, and the crops shortened at the vision sites.

After each vision site layer the method's `reduce_vision` shortens the crops' sequences (CLS stays first); crops
that keep different counts are padded and later tower layers get a key mask. At the tower's output the selected
feature layer is scattered back to the full patch grid, so LLaVA's own projector and AnyRes packing run unchanged;
the dropped placeholders are removed at the LLM input (prefill.py).
"""
from __future__ import annotations

import functools
import inspect

import torch
from torch import Tensor
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from .. import budget
from ..plan import image_budgets
from ..rows import gather_rows, pack
from ..step import Step
from .compat import IncompatibleTransformers
from .hooks import Hooks
from .sdpa import TowerKeepsLse
from .state import Images, State, Tower


class TowerHooks:
    def __init__(self, state: State):
        self.state = state

    def install(self, hooks: Hooks) -> None:
        s = self.state
        hooks.wrap(s.base, "get_image_features", self._locating_images)
        if not s.vision_sites:
            return
        tower = s.tower_module
        hooks.before(tower, self._enter)
        hooks.after(tower, self._leave)
        layers = tower.encoder.layers
        if tower.config._attn_implementation == "sdpa":
            hooks.add(TowerKeepsLse(tower.config, {layers[j].self_attn: functools.partial(self._keep_lse, j)
                                                   for j in s.vision_sites}))
        for j, layer in enumerate(layers):
            hooks.before(layer, self._layer_mask)
            if j in s.vision_sites:
                for name in ("q", "k"):
                    hooks.after(getattr(layer.self_attn, f"{name}_proj"), self._capture(j, name))
                # prepend: shorten the output before transformers records it as a hidden state
                hooks.after(layer, self._site(j), prepend=True)

    def _locating_images(self, original):
        """generate runs the tower before the first forward: wrap the model's get_image_features (per instance)."""
        signature = inspect.signature(original)

        @functools.wraps(original)
        def get_image_features(*args, **kwargs):
            given = signature.bind(*args, **kwargs).arguments  # LLaVA-NeXT's forward passes image_sizes positionally
            start = self.state.now()
            self.state.images = self._locate(given["pixel_values"], given.get("image_sizes"))
            output = original(*args, **kwargs)
            self.state.images.seconds = self.state.now() - start
            return output
        return get_image_features

    def _capture(self, layer: int, name: str):
        def hook(module, args, output):
            if self.state.tower is not None:
                self.state.captured.put(layer, **{name: output})
        return hook

    def _keep_lse(self, layer: int, lse: Tensor) -> None:
        if self.state.tower is not None:
            self.state.captured.put(layer, lse=lse)

    # --------------------------------------------------------------- images

    def _locate(self, pixel_values: Tensor, image_sizes: Tensor | None) -> Images:
        """Per image: its full count; per placeholder: which crop patch fills it; per crop: the patches it keeps."""
        s, patches = self.state, self.state.shape.patches
        if s.shape.family == "llava":
            n_images = pixel_values.shape[0]
            full = torch.full((n_images,), patches, dtype=torch.long)
            placeholder_patch = torch.arange(n_images * patches)
            crops_per_image = torch.ones(n_images, dtype=torch.long)
        else:
            placeholder_patch, full, crops_per_image = self._next_layout(image_sizes)
        budget_, entering = image_budgets(s.method, full, s.visual_tokens, s.ratio)
        eligible = torch.zeros(int(crops_per_image.sum()) * patches, dtype=torch.bool)
        eligible[placeholder_patch[placeholder_patch >= 0]] = True
        eligible = eligible.view(-1, patches)
        image_of_placeholder = torch.repeat_interleave(torch.arange(len(full)), full)
        newlines = torch.zeros_like(full).index_add_(0, image_of_placeholder, (placeholder_patch < 0).long())
        to_keep = entering - newlines
        if (to_keep < 0).any():
            i = int((to_keep < 0).nonzero()[0])
            raise ValueError(f"the budget {int(budget_[i])} is below the {int(newlines[i])} row-separator tokens "
                             f"LLaVA-NeXT adds for this image; use at least {int(newlines[i]) + 1}")
        crop_image = torch.repeat_interleave(torch.arange(len(full)), crops_per_image)
        crop_keep = budget.split_by_weight(to_keep, eligible.sum(1), crop_image)
        return Images(full, placeholder_patch, eligible, crop_keep)

    def _next_layout(self, image_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Run LLaVA-NeXT's own AnyRes packing on patch indices to learn where each patch lands."""
        config, patches = self.state.model.config, self.state.shape.patches
        crops = torch.tensor([image_size_to_num_patches(size, config.image_grid_pinpoints,
                                                        config.vision_config.image_size) for size in image_sizes.tolist()])
        first = torch.cumsum(crops, 0) - crops
        index = [(torch.arange(n * patches, dtype=torch.float32) + f * patches).view(n, patches, 1)
                 for n, f in zip(crops.tolist(), first.tolist())]
        packed, lengths = self.state.base.pack_image_features(index, image_sizes.cpu(), "default", torch.tensor([-1.0]))
        return torch.cat(packed).view(-1).long(), lengths.cpu().long(), crops

    # ---------------------------------------------------------- vision tower

    def _enter(self, module, args):
        s, crops = self.state, args[0].shape[0]
        images = s.images
        if images is None or images.crop_keep.shape[0] != crops:
            raise IncompatibleTransformers("the vision tower to run inside get_image_features, which places its crops",
                                           "the tower running outside get_image_features")
        eligible = images.crop_eligible.sum(1)
        slots = torch.arange(-1, s.shape.patches, device=args[0].device).expand(crops, -1)
        s.tower = Tower(slots=slots, valid=None,
                        targets=budget.linear_steps(eligible, images.crop_keep, len(s.vision_sites)))
        images.vision_tokens = [(0, crops * (s.shape.patches + 1))]

    def _layer_mask(self, module, args):
        tower = self.state.tower
        if tower is None or tower.valid is None:
            return None
        return (args[0], tower.valid[:, None, None, :]) + tuple(args[2:])  # key mask for ragged crops

    def _site(self, layer: int):
        def hook(module, args, output):
            return self._reduce(layer, output)
        return hook

    def _reduce(self, layer: int, hidden: Tensor) -> Tensor:
        """Shorten the crops after tower layer `layer`. Only patches that reach the LLM are candidates: CLS
        and the patches AnyRes unpadding drops stay as context, so the tower computes what it did before."""
        s = self.state
        images, tower = s.images, s.tower
        attn = s.tower_module.encoder.layers[layer].self_attn
        crops, length, _ = hidden.shape
        q, k, lse = s.captured.take(layer)
        q = q.view(crops, length, attn.num_heads, attn.head_dim).transpose(1, 2)  # [C, H, T, d]
        k = k.view(crops, length, attn.num_heads, attn.head_dim).transpose(1, 2)
        valid = tower.valid if tower.valid is not None else torch.ones(crops, length, dtype=torch.bool, device=hidden.device)
        eligible = torch.cat([images.crop_eligible, images.crop_eligible[:, :1] & False], 1).to(hidden.device)
        is_cand = valid & eligible.gather(1, tower.slots.masked_fill(tower.slots < 0, eligible.shape[1] - 1))
        cand, cand_valid = pack(is_cand)
        step = Step(hidden=hidden, q=q, k=k, key_valid=valid, cand=cand, cand_valid=cand_valid,
                    keep=tower.targets[tower.site].to(hidden.device), causal=False, grid=s.shape.grid,
                    slots=tower.slots.gather(1, cand), layer=layer, lse=lse)
        # order-preserving pack: CLS stays first
        index, new_valid, hidden, seconds = s.reduce(s.method.reduce_vision, step, valid & ~is_cand, pack)
        images.scoring_seconds += seconds
        tower.slots = tower.slots.gather(1, index)
        tower.valid = None if bool(new_valid.all()) else new_valid
        tower.site += 1
        images.vision_tokens.append((layer + 1, int(new_valid.sum())))
        return gather_rows(hidden, index)

    def _leave(self, module, args, output):
        """Scatter the feature layer back onto the full patch grid; record which patches survive."""
        s = self.state
        images, tower = s.images, s.tower
        index = s.shape.feature_layers
        features = output.hidden_states[index]  # [C, 1+K, D]
        crops, _, dim = features.shape
        patches = s.shape.patches
        valid = tower.valid if tower.valid is not None else torch.ones_like(tower.slots, dtype=torch.bool)
        slot = (tower.slots + 1).masked_fill(~valid, patches + 1)  # CLS -> 0; padding -> a spare row, cut below
        full = features.new_zeros(crops, patches + 2, dim)
        full.scatter_(1, slot[..., None].expand(-1, -1, dim), features)
        states = list(output.hidden_states)
        states[index] = full[:, :patches + 1]
        output.hidden_states = tuple(states)
        kept_patch = torch.zeros(crops, patches + 2, dtype=torch.bool, device=features.device)
        kept_patch.scatter_(1, slot, valid)
        flat = kept_patch[:, 1:patches + 1].reshape(-1).cpu()
        where = images.placeholder_patch
        images.placeholder_keep = (where < 0) | flat[where.clamp(min=0)]
        s.tower = None
        return output
