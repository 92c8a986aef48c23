"""Training losses of the reference model: answer tokens, auxiliary vision heads, word alignment of the
projected patches, attention supervision of one head, and teacher-forced answer accuracy."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.models.llama.modeling_llama import rotate_half

from reference.scenes import COLOURS, QUADRANTS, SHAPES
from reference.training.data import PAIRS, patch_quadrants

BACKGROUND_WEIGHT = 0.2


class AuxiliaryHeads(nn.Module):
    """Vision-side training targets on the feature layer; not part of the saved model.

    Per patch: the colour and the shape of the object covering it (class 0 = background; two factorised
    heads, so shape gets its own gradient rather than one shared with 20 pairs), whether it holds an
    object's centre (what counting needs), and its quadrant (keeps position in the features). On CLS:
    which pairs are present (makes the CLS attention, read by VisionZip and FiCoCo-V, look at objects).
    """

    def __init__(self, hidden: int):
        super().__init__()
        self.patch_colour = nn.Linear(hidden, len(COLOURS) + 1)
        self.patch_shape = nn.Linear(hidden, len(SHAPES) + 1)
        self.patch_centre = nn.Linear(hidden, 1)
        self.patch_quadrant = nn.Linear(hidden, 4)
        self.cls_pairs = nn.Linear(hidden, len(PAIRS))

    def loss(self, features: Tensor, targets: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """Sum of the losses on `features` [B, 1 + P, H], and colour / shape accuracy on object patches."""
        cls, patches = features[:, 0].float(), features[:, 1:].float()
        pair = targets["patch_pair"]
        on_object = pair > 0
        colour = torch.where(on_object, (pair - 1) // len(SHAPES) + 1, 0)
        shape = torch.where(on_object, (pair - 1) % len(SHAPES) + 1, 0)
        loss, accuracy = torch.zeros(()), {}
        for name, head, target in (("colour", self.patch_colour, colour), ("shape", self.patch_shape, shape)):
            logits = head(patches)
            # background is ~85 % of patches: down-weighted so that the object patches drive learning
            weight = torch.ones(logits.shape[-1])
            weight[0] = BACKGROUND_WEIGHT
            loss = loss + F.cross_entropy(logits.flatten(0, 1), target.flatten(), weight=weight)
            accuracy[name] = (logits.argmax(-1) == target)[on_object].float().mean().item()
        loss = loss + F.binary_cross_entropy_with_logits(self.patch_centre(patches).squeeze(-1), targets["patch_centre"])
        quadrants = patch_quadrants(patches.shape[1]).repeat(patches.shape[0])
        loss = loss + F.cross_entropy(self.patch_quadrant(patches).flatten(0, 1), quadrants)
        loss = loss + F.binary_cross_entropy_with_logits(self.cls_pairs(cls), targets["cls_pairs"])
        return loss, accuracy


def attention_supervision_loss(model, hidden_states: tuple[Tensor, ...], batch: dict, layer: int, head: int,
                               targets: list[tuple[int, int, list[int]]]) -> Tensor:
    """Mean over `targets` (row, query position, key positions) of -log of the attention mass that `head` of
    LM layer `layer` puts on the key positions.

    Answer-only training leaves the question-conditioned lookup (find the patch the question names, read its
    colour) at chance for thousands of images: the query, the keys and the value path only pay off together.
    Telling one head where to look gives the query and the keys their own gradient from the first step.
    Recomputes that head's scores from the layer's input (`hidden_states[layer]`), for the target rows only.
    """
    if not targets:
        return hidden_states[0].sum() * 0.0
    block = model.model.language_model.layers[layer]
    attention, x = block.self_attn, block.input_layernorm(hidden_states[layer])  # [B, S, D]
    d = attention.head_dim
    kv_head = head // attention.num_key_value_groups
    rows = torch.tensor([t[0] for t in targets])
    queries = torch.tensor([t[1] for t in targets])
    cos, sin = model.model.language_model.rotary_emb(x, batch["position_ids"])  # [B, S, d]
    k = attention.k_proj(x)[..., kv_head * d:(kv_head + 1) * d]  # [B, S, d]
    k = k * cos + rotate_half(k) * sin
    q = attention.q_proj(x[rows, queries])[:, head * d:(head + 1) * d]  # [N, d]
    q = q * cos[rows, queries] + rotate_half(q) * sin[rows, queries]
    scores = torch.einsum("nd,nsd->ns", q.float(), k[rows].float()) * attention.scaling  # [N, S]
    allowed = batch["attention_mask"][rows, 0, queries]  # [N, S]
    log_attention = scores.masked_fill(~allowed, -torch.inf).log_softmax(-1)
    on_target = torch.zeros_like(allowed)
    for n, (_, _, keys) in enumerate(targets):
        on_target[n, keys] = True
    return -log_attention.masked_fill(~on_target, -torch.inf).logsumexp(-1).mean()


def word_alignment_loss(projected: Tensor, patch_pair: Tensor, word_embeddings: Tensor, tok,
                        with_quadrant: bool = True) -> Tensor:
    """1 - cosine between each object patch's projected feature and the sum of the input embeddings of its
    colour word and shape word, and `with_quadrant` of its quadrant's two words ("top", "left"), held fixed
    as the target.

    The image tokens then read like the words "red circle top left" to the LM, and the questions become
    copying from context, which a small LM learns far sooner than decoding free-form visual features. Without
    the quadrant words the projector drops position (a linear probe reads the quadrant of an object patch from
    the tower's features every time, from the projector's output 62 % of the time) and position questions
    stay near chance.
    """
    on_object = patch_pair > 0  # [B, P]
    if not on_object.any():
        return projected.sum() * 0.0
    pair = patch_pair[on_object] - 1
    word_ids = lambda words: torch.tensor(tok.convert_tokens_to_ids(list(words)))  # noqa: E731
    words = word_embeddings.detach()
    target = words[word_ids(COLOURS)[pair // len(SHAPES)]] + words[word_ids(SHAPES)[pair % len(SHAPES)]]
    if with_quadrant:
        quadrant = patch_quadrants(patch_pair.shape[1]).expand_as(patch_pair)[on_object]
        vertical, horizontal = zip(*(q.split() for q in QUADRANTS))
        target = target + words[word_ids(vertical)[quadrant]] + words[word_ids(horizontal)[quadrant]]
    return (1 - F.cosine_similarity(projected[on_object].float(), target.float(), dim=-1)).mean()


def answer_loss(logits: Tensor, labels: Tensor, turn_weighted: bool) -> Tensor:
    """Next-token cross-entropy on the answer tokens (labels != -100).

    Token-averaged, a caption's ~16 tokens outweigh a one-word answer 8-fold; `turn_weighted` averages within
    each answer first, so that every turn (every question) weighs the same.
    """
    target = labels[:, 1:]
    token_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target.flatten(), ignore_index=-100,
                                 reduction="none").view_as(target)
    is_answer = target != -100
    if not turn_weighted:
        return token_loss[is_answer].mean()
    starts = is_answer & ~F.pad(is_answer[:, :-1], (1, 0), value=False)
    span = (starts.cumsum(1) + torch.arange(target.shape[0])[:, None] * target.shape[1])[is_answer]
    _, span_index, span_length = torch.unique(span, return_inverse=True, return_counts=True)
    return (token_loss[is_answer] / span_length[span_index]).sum() / len(span_length)


def answer_accuracy(logits: Tensor, labels: Tensor, tasks: list[list[str]]) -> dict[str, float]:
    """Per-task share of turns whose answer tokens are all argmax-correct under teacher forcing."""
    predicted, target = logits[:, :-1].argmax(-1), labels[:, 1:]
    hits: dict[str, list[bool]] = {}
    for row in range(labels.shape[0]):
        is_answer = (target[row] != -100).int()
        # answer spans are maximal runs of label positions, in turn order
        starts = torch.nonzero(torch.diff(is_answer, prepend=torch.zeros(1, dtype=torch.int)) == 1).flatten()
        ends = torch.nonzero(torch.diff(is_answer, append=torch.zeros(1, dtype=torch.int)) == -1).flatten() + 1
        for task, s, e in zip(tasks[row], starts.tolist(), ends.tolist()):
            hits.setdefault(task, []).append(bool((predicted[row, s:e] == target[row, s:e]).all()))
    return {task: sum(v) / len(v) for task, v in sorted(hits.items())}
