"""The few numbers about a LLaVA model that budgets and layer positions depend on, read from its config."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    family: str              # "llava" (1.5) or "next"
    vision_layers: int       # layers in the vision tower
    feature_layers: int      # tower layers that feed the selected feature layer (LLaVA's -2 -> all but the last)
    grid: tuple[int, int]    # patch grid of one crop
    llm_layers: int
    has_cls: bool            # vision_feature_select_strategy "default": CLS is dropped from the features

    @property
    def patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def llm_layer(self, depth: float) -> int:
        """An LLM layer index from a relative depth (2/32 -> layer 2 of 32), kept in 1..L-1."""
        return min(max(round(depth * self.llm_layers), 1), self.llm_layers - 1)

    def vision_layer(self, depth: float) -> int:
        """A tower layer index from a relative depth, kept among the layers that feed the features."""
        return min(max(round(depth * self.vision_layers) - 1, 0), self.feature_layers - 1)

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        vision, text = config.vision_config, config.text_config
        family = {"llava": "llava", "llava_next": "next"}.get(config.model_type)
        if family is None:
            raise ValueError(f"unsupported model type {config.model_type!r}: trimlens reduces LLaVA-1.5 "
                             "(LlavaForConditionalGeneration) and LLaVA-NeXT (LlavaNextForConditionalGeneration)")
        layer = config.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError(f"vision_feature_layer={layer!r}: only a single feature layer is supported")
        side = vision.image_size // vision.patch_size
        return cls(family=family, vision_layers=vision.num_hidden_layers,
                   feature_layers=layer % (vision.num_hidden_layers + 1), grid=(side, side),
                   llm_layers=text.num_hidden_layers,
                   has_cls=config.vision_feature_select_strategy == "default")
