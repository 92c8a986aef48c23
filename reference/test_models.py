"""Tiny LLaVA-1.5 / LLaVA-NeXT models built offline from config (no hub), for tests, benchmarks and the demo.

They use the real transformers classes (`LlavaForConditionalGeneration`, `LlavaNextForConditionalGeneration`,
CLIP vision tower, Llama language model) with random weights, so every reducer runs through the same code
paths as on the published checkpoints; only the widths are small. Depth stays realistic by default (32 LLM
layers like LLaVA-1.5-7B) so that LLM-side budgets such as 64 of 576 are reachable.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaNextConfig, LlavaNextForConditionalGeneration,
                          LlavaNextImageProcessorPil, LlavaNextProcessor, LlavaProcessor, PreTrainedTokenizerFast)

# USER: <image>\n{question} ASSISTANT:  -- the LLaVA-1.5 conversation format.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% if m['role'] == 'user' %} {% else %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}")

_CORPUS = [
    "USER: What is shown in this image? ASSISTANT: A cat on a red sofa.",
    "Describe the picture in detail. There is a dog in a green park near a blue lake.",
    "Is there a person? Yes. No. How many objects are there? One two three four.",
    "Write a short caption for the image. A small white boat on the sea at sunset.",
]


@dataclass(frozen=True)
class TinySpec:
    """Shape of a tiny model. Defaults: LLaVA-1.5 layout (336 px, patch 14 -> 576 visual tokens)."""
    family: str = "llava"           # "llava" (1.5) or "next" (AnyRes)
    image_size: int = 336
    patch_size: int = 14
    vision_hidden: int = 64
    vision_layers: int = 4
    vision_heads: int = 4
    vision_intermediate: int = 128
    llm_hidden: int = 64
    llm_layers: int = 32
    llm_heads: int = 4
    llm_kv_heads: int = 4           # < llm_heads gives grouped-query attention
    intermediate: int = 128


def build_tokenizer() -> PreTrainedTokenizerFast:
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(
        _CORPUS, trainer=trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<image>"],
                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
                                  padding_side="left")
    tok.add_bos_token = True  # the template does not write <s> itself
    return tok


def build_processor(spec: TinySpec = TinySpec()) -> LlavaProcessor | LlavaNextProcessor:
    tok = build_tokenizer()
    size = spec.image_size
    if spec.family == "llava":
        images = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        return LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=spec.patch_size,
                              chat_template=CHAT_TEMPLATE, vision_feature_select_strategy="default",
                              num_additional_image_tokens=1)
    if spec.family == "next":
        images = LlavaNextImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                            image_grid_pinpoints=_pinpoints(size))
        return LlavaNextProcessor(image_processor=images, tokenizer=tok, patch_size=spec.patch_size,
                                  chat_template=CHAT_TEMPLATE, vision_feature_select_strategy="default",
                                  num_additional_image_tokens=1)
    raise ValueError(f"unknown family {spec.family!r}; expected 'llava' or 'next'")


def _pinpoints(size: int) -> list[list[int]]:
    return [[size, 2 * size], [2 * size, size], [2 * size, 2 * size]]


def build_model(tok: PreTrainedTokenizerFast, spec: TinySpec = TinySpec(), seed: int = 0,
                dtype: torch.dtype = torch.float32) -> LlavaForConditionalGeneration | LlavaNextForConditionalGeneration:
    """A randomly initialised model of `spec`'s shape (deterministic for `seed`), in eval mode."""
    vision = CLIPVisionConfig(image_size=spec.image_size, patch_size=spec.patch_size, hidden_size=spec.vision_hidden,
                              intermediate_size=spec.vision_intermediate, num_hidden_layers=spec.vision_layers,
                              num_attention_heads=spec.vision_heads, hidden_act="quick_gelu")
    text = LlamaConfig(vocab_size=len(tok), hidden_size=spec.llm_hidden, intermediate_size=spec.intermediate,
                       num_hidden_layers=spec.llm_layers, num_attention_heads=spec.llm_heads,
                       num_key_value_heads=spec.llm_kv_heads, max_position_embeddings=8192,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    common = dict(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                  vision_feature_layer=-2, vision_feature_select_strategy="default", pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    if spec.family == "llava":
        model = LlavaForConditionalGeneration(LlavaConfig(**common))
    elif spec.family == "next":
        model = LlavaNextForConditionalGeneration(
            LlavaNextConfig(image_grid_pinpoints=_pinpoints(spec.image_size), **common))
    else:
        raise ValueError(f"unknown family {spec.family!r}; expected 'llava' or 'next'")
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model.to(dtype).eval()


def save_tiny(path: str, spec: TinySpec = TinySpec(), seed: int = 0) -> str:
    """Build and save a tiny model + processor with `save_pretrained` (safetensors); returns `path`."""
    processor = build_processor(spec)
    build_model(processor.tokenizer, spec, seed).save_pretrained(path)
    processor.save_pretrained(path)
    return path
