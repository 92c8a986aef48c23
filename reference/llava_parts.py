"""One builder of small LLaVA-1.5 / LLaVA-NeXT models from a shape, for the reference model and the test models.

Real transformers classes throughout (`LlavaForConditionalGeneration` or `LlavaNextForConditionalGeneration` =
CLIP vision tower + projector + Llama LM, their processors with `CLIPImageProcessorPil` /
`LlavaNextImageProcessorPil`), so every reducer runs the code paths it runs on the published checkpoints; only the
widths, the depth and the vocabulary are the caller's. Callers bring their own raw tokenizer (its vocabulary).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Tokenizer
from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaNextConfig, LlavaNextForConditionalGeneration,
                          LlavaNextImageProcessorPil, LlavaNextProcessor, LlavaProcessor, PreTrainedTokenizerFast)

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
# USER: <image>\n{question} ASSISTANT:  -- the LLaVA-1.5 conversation format ("\n" is whitespace to the tokenizers).
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% if m['role'] == 'user' %} {% else %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
FAMILIES = ("llava", "next")


@dataclass(frozen=True)
class LlavaSpec:
    """Shape of a small model. Defaults: the test models' LLaVA-1.5 layout (336 px, patch 14 -> 576 visual tokens,
    32 LLM layers like LLaVA-1.5-7B, so that LLM-side budgets such as 64 of 576 are reachable)."""
    family: str = "llava"           # "llava" (1.5) or "next" (AnyRes)
    image_size: int = 336
    patch_size: int = 14
    vision_hidden: int = 64
    vision_intermediate: int | None = 128  # None: 4 x vision_hidden, CLIP's ratio
    vision_layers: int = 4
    vision_heads: int = 4
    llm_hidden: int = 64
    llm_intermediate: int = 128
    llm_layers: int = 32
    llm_heads: int = 4
    llm_kv_heads: int = 4           # < llm_heads gives grouped-query attention
    max_positions: int = 8192
    rope_theta: float = 1e4         # LLaMA-2's base

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown family {self.family!r}; expected 'llava' or 'next'")

    @property
    def grid(self) -> int:
        """Patches per side of one crop."""
        return self.image_size // self.patch_size


def wrap_tokenizer(raw: Tokenizer) -> PreTrainedTokenizerFast:
    """A transformers tokenizer over `raw` (which holds SPECIAL_TOKENS), left-padded, writing <s> itself."""
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
                                  padding_side="left")
    tok.add_bos_token = True  # the template does not write <s> itself
    return tok


def _pinpoints(size: int) -> list[list[int]]:
    return [[size, 2 * size], [2 * size, size], [2 * size, 2 * size]]


def build_llava_processor(spec: LlavaSpec, tok: PreTrainedTokenizerFast) -> LlavaProcessor | LlavaNextProcessor:
    size = spec.image_size
    crop = dict(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    common = dict(tokenizer=tok, patch_size=spec.patch_size, chat_template=CHAT_TEMPLATE,
                  vision_feature_select_strategy="default", num_additional_image_tokens=1)
    if spec.family == "llava":
        return LlavaProcessor(image_processor=CLIPImageProcessorPil(**crop), **common)
    return LlavaNextProcessor(image_processor=LlavaNextImageProcessorPil(**crop, image_grid_pinpoints=_pinpoints(size)),
                              **common)


def build_model(tok: PreTrainedTokenizerFast, spec: LlavaSpec, seed: int = 0, dtype: torch.dtype = torch.float32
                ) -> LlavaForConditionalGeneration | LlavaNextForConditionalGeneration:
    """A randomly initialised model of `spec`'s shape over `tok` (deterministic for `seed`), in eval mode."""
    vision = CLIPVisionConfig(image_size=spec.image_size, patch_size=spec.patch_size, hidden_size=spec.vision_hidden,
                              intermediate_size=spec.vision_intermediate or 4 * spec.vision_hidden,
                              num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
                              hidden_act="quick_gelu")
    text = LlamaConfig(vocab_size=len(tok), hidden_size=spec.llm_hidden, intermediate_size=spec.llm_intermediate,
                       num_hidden_layers=spec.llm_layers, num_attention_heads=spec.llm_heads,
                       num_key_value_heads=spec.llm_kv_heads, max_position_embeddings=spec.max_positions,
                       rope_theta=spec.rope_theta, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    common = dict(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                  vision_feature_layer=-2, vision_feature_select_strategy="default", pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    if spec.family == "llava":
        model = LlavaForConditionalGeneration(LlavaConfig(**common))
    else:
        model = LlavaNextForConditionalGeneration(
            LlavaNextConfig(image_grid_pinpoints=_pinpoints(spec.image_size), **common))
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    return model.to(dtype).eval()
