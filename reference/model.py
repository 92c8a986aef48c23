"""The reference model: a small LLaVA-1.5-shaped model trained here on `pipeline.scenes`, and its prompts.

Real transformers classes throughout (`LlavaForConditionalGeneration` = CLIP vision tower + projector +
Llama LM, `LlavaProcessor` with `CLIPImageProcessorPil`), so every reducer runs the code paths it runs on
LLaVA-1.5; only the widths and the vocabulary are small. The tokenizer is word level over the words the
scene generator can emit. The shipped weights live in `REFERENCE_MODEL_DIR` (built by
`jobs/train_reference.py`, its recipe beside them in `recipe.json`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (AutoProcessor, CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

from pipeline.bundled import BUNDLED_MODEL_DIR as REFERENCE_MODEL_DIR  # jobs know the shipped model as "bundled"
from pipeline.scenes import vocabulary

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
# The LLaVA-1.5 conversation format; "\n" after the image is whitespace to the word-level tokenizer.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% if m['role'] == 'user' %} {% else %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


@dataclass(frozen=True)
class Architecture:
    """Shape of the reference model. Depth is LLaVA-like in proportion: LLM-side methods that prune at an
    early layer can still reach 1/9 of the visual tokens on average over the layers."""
    image_size: int = 168
    patch_size: int = 14
    vision_hidden: int = 128
    vision_layers: int = 5          # the feature layer is the penultimate one (-2), as in LLaVA-1.5
    vision_heads: int = 4
    llm_hidden: int = 128
    llm_layers: int = 12
    llm_heads: int = 4
    llm_intermediate: int = 256
    # Llama 3's base rather than LLaMA-2's 1e4: more rotary pairs turn slowly enough over the ~300-token
    # sequence that a question can find a patch by content wherever it is.
    rope_theta: float = 1e6

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the scene vocabulary plus the chat template's words."""
    words = list(SPECIAL_TOKENS) + ["USER", "ASSISTANT", ":"] + vocabulary()
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
                                  padding_side="left")
    tok.add_bos_token = True  # the template does not write <s> itself
    return tok


def build_processor(arch: Architecture = Architecture()) -> LlavaProcessor:
    size = arch.image_size
    images = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return LlavaProcessor(image_processor=images, tokenizer=build_tokenizer(), patch_size=arch.patch_size,
                          chat_template=CHAT_TEMPLATE, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1)


def build_model(tok: PreTrainedTokenizerFast, arch: Architecture = Architecture(), seed: int = 0
                ) -> LlavaForConditionalGeneration:
    """A freshly initialised reference model (deterministic for `seed`)."""
    vision = CLIPVisionConfig(image_size=arch.image_size, patch_size=arch.patch_size, hidden_size=arch.vision_hidden,
                              intermediate_size=4 * arch.vision_hidden, num_hidden_layers=arch.vision_layers,
                              num_attention_heads=arch.vision_heads, hidden_act="quick_gelu")
    text = LlamaConfig(vocab_size=len(tok), hidden_size=arch.llm_hidden, intermediate_size=arch.llm_intermediate,
                       num_hidden_layers=arch.llm_layers, num_attention_heads=arch.llm_heads,
                       num_key_value_heads=arch.llm_heads, max_position_embeddings=1024, rope_theta=arch.rope_theta,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    return model


def prompt(processor: LlavaProcessor, question: str) -> str:
    """The single-turn prompt of a question about one image."""
    return processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True)


def load_reference(path: str | Path = REFERENCE_MODEL_DIR) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The model and processor saved at `path` (the shipped model by default), offline, in eval mode."""
    model = LlavaForConditionalGeneration.from_pretrained(path, local_files_only=True, use_kernels=False).eval()
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    processor.tokenizer.padding_side = "left"  # generation needs left padding; not restored by from_pretrained
    return model, processor
