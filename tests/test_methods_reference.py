"""Every method held to its reference: the selection math restated independently, on tensors of a real run.

Each `*_reference` below restates, in plain fp64 tensor code on one row (batch 1), what the authors' code computes
(FastV, VisionZip, TokenCarve) or, for FiCoCo, what /work/shared/notes/methods.md prescribes (the paper's formulas,
where the authors' code differs). It reads the Step the runtime handed the method during a real forward of the tiny
LLaVA-1.5 model (576 visual tokens: its captured q / k and hidden states) and must keep the same tokens as the
runtime, and for merging methods form the same states (fp32 runtime against fp64 reference). Budgets 64 and 72:
at both C does not divide R in VisionZip, so stride-spaced contextual targets differ from floor(i * R / C) ones; at
72 TokenCarve selects an odd n = 57 whose A / B split at n // 2 keeps other tokens than one at (n + 1) // 2.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import reducers
from conftest import get_tiny
from reducers.step import Reduction, Step

BUDGETS = [64, 72]
States = dict[int, Tensor]  # candidate index -> the state the reference gives that kept token


def capture(method: str, budget: int, **params) -> tuple[reducers.Attachment, list[tuple[Step, Reduction]]]:
    """Run the tiny model on one prompt with `method` attached; every site's Step (a copy) and the Reduction made."""
    tiny = get_tiny("llava")
    records = []
    with reducers.attach(tiny.model, method, visual_tokens=budget, **params) as attachment:
        for site in ("reduce_vision", "reduce_llm"):
            def reduce(step: Step, original=getattr(attachment.method, site)) -> Reduction:
                frozen = dataclasses.replace(step, **{f.name: getattr(step, f.name).clone()
                                                      for f in dataclasses.fields(step)
                                                      if isinstance(getattr(step, f.name), Tensor)})
                reduction = original(step)
                records.append((frozen, reduction))
                return reduction
            setattr(attachment.method, site, reduce)
        with torch.no_grad():
            tiny.model(**tiny.inputs([0]))
    assert records, f"{method} made no reduction"
    return attachment, records


def attention(step: Step, rows: list[int] | Tensor) -> Tensor:
    """Head-mean softmax attention of query positions `rows` over every key of row 0: [R, S] fp64 (keys a row may not
    see, padding or later tokens under causal attention, get 0)."""
    rows = torch.as_tensor(rows)
    q, k = step.q[0].double()[:, rows], step.k[0].double()  # [H, R, d], [Hkv, S, d]
    k = k.repeat_interleave(q.shape[0] // k.shape[0], 0)  # grouped-query heads share their kv head
    logits = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])  # [H, R, S]
    hidden = ~step.key_valid[0][None, :].expand(len(rows), -1)
    if step.causal:
        hidden = hidden | (torch.arange(k.shape[1])[None, :] > rows[:, None])
    return logits.masked_fill(hidden, float("-inf")).softmax(-1).mean(0)


def descending(score: Tensor) -> Tensor:
    """Indices from the highest score to the lowest, ties to the earlier index."""
    return torch.sort(score, descending=True, stable=True).indices


def fastv_reference(step: Step) -> tuple[set[int], States]:
    """FastV (pkunlp-icler/FastV, src/transformers/src/transformers/models/llama/modeling_llama.py): the last
    token's head-mean attention at layer K-1; keep the top `keep`."""
    cand = step.cand[0]
    score = attention(step, [step.q.shape[2] - 1])[0, cand]
    return set(descending(score)[:int(step.keep[0])].tolist()), {}


def visionzip_reference(step: Step, contextual_share: float) -> tuple[set[int], States]:
    """VisionZip (dvlab-research/VisionZip, visionzip/clip_encoder.py forward; keys from visionzip/utils.py
    CLIPAttention_forward): dominant = top CLS attention; the R others in order, targets arange(0, R, R // C)[:C];
    the non-targets join their most cosine-similar target by head-mean raw key; contextual = target + joined mean."""
    cand, keep = step.cand[0], int(step.keep[0])
    contextual = round(keep * contextual_share)
    dominant = descending(attention(step, [0])[0, cand])[:keep - contextual]
    others = torch.tensor(sorted(set(range(len(cand))) - set(dominant.tolist())))  # [R] candidate indices
    targets = torch.arange(0, len(others), max(1, len(others) // contextual))[:contextual]  # [C] into `others`
    joining = others[~torch.isin(torch.arange(len(others)), targets)]  # [M]
    keys = step.k[0].double().mean(0)[cand]  # [V, d]: raw keys averaged over heads
    unit = keys / keys.norm(dim=-1, keepdim=True)
    assign = F.one_hot((unit[joining] @ unit[others[targets]].T).argmax(-1), contextual).double()  # [M, C]
    hidden = step.hidden[0].double()[cand]  # [V, D]
    joined_mean = assign.T @ hidden[joining] / assign.sum(0).clamp(min=1)[:, None]  # [C, D]
    states = {int(i): hidden[i] for i in dominant}
    states.update({int(t): hidden[t] + joined_mean[c] for c, t in enumerate(others[targets])})
    return set(states), states


def floor_spaced_targets(remaining: int, contextual: int) -> list[int]:
    """The spacing trimlens used before following the authors: floor(i * R / C)."""
    return [i * remaining // contextual for i in range(contextual)]


def local_penalty(score: Tensor, step: Step, factor: float) -> Tensor:
    """methods.md: lay s on the patch grid, multiply each 2x2 window's maximum by `factor` (s shifted to >= 0 first,
    so doubling raises it; cells of patches already removed never count)."""
    h, w = step.grid
    shifted = score - score.min()
    grid = torch.full((h * w,), -1.0, dtype=torch.float64)
    slots = step.slots[0]
    grid[slots] = shifted
    boost = torch.ones(h * w, dtype=torch.float64)
    for top in range(0, h, 2):
        for left in range(0, w, 2):
            cells = torch.tensor([r * w + c for r in range(top, min(top + 2, h))
                                  for c in range(left, min(left + 2, w))])
            boost[cells[grid[cells].argmax()]] = factor
    return shifted * boost[slots]


def fold(hidden: Tensor, corr: Tensor, dropped: Tensor, kept: Tensor, eps: float) -> States:
    """methods.md correlate + compress: dropped i targets the kept j with C_ij >= the eps-quantile of its row,
    alpha_ij = C_ij / sum over its targets; x_j <- (x_j + sum_i alpha_ij x_i) / (1 + sum_i alpha_ij)."""
    threshold = torch.quantile(corr, eps, dim=1, keepdim=True)  # [R, 1]
    alpha = corr.clamp(min=0) * (corr >= threshold)
    alpha = alpha / alpha.sum(1, keepdim=True)  # [R, K]
    merged = (hidden[kept] + alpha.T @ hidden[dropped]) / (1 + alpha.sum(0))[:, None]
    return {int(j): merged[n] for n, j in enumerate(kept)}


def keep_least_redundant(redundancy: Tensor, keep: int) -> tuple[Tensor, Tensor]:
    """Discard the highest redundancy: (kept, dropped) candidate indices, ascending."""
    order = descending(-redundancy)
    return order[:keep].sort().values, order[keep:].sort().values


def ficoco_v_reference(step: Step, lam: float, eps: float, penalty: float) -> tuple[set[int], States]:
    """FiCoCo-V as methods.md states it: s_i = lam * mean_j A_ij - (1 - lam) * A_cls,i over the patches, local
    penalty, discard the highest; C_ij = A_ij."""
    cand = step.cand[0]
    among = attention(step, cand)[:, cand]  # [V, V]
    redundancy = lam * among.mean(1) - (1 - lam) * attention(step, [0])[0, cand]
    kept, dropped = keep_least_redundant(local_penalty(redundancy, step, penalty), int(step.keep[0]))
    states = fold(step.hidden[0].double()[cand], among[dropped][:, kept], dropped, kept, eps)
    return set(states), states


def ficoco_l_reference(step: Step, beta: float, gamma: float, eps: float) -> tuple[set[int], States]:
    """FiCoCo-L as methods.md states it, A read at layer K-1 (causal): s_i = beta * mean_{j visual} A[i, j] -
    (1 - beta) * mean_{k text} A[k, i]; C_ij = gamma * A[i, j] + (1 - gamma) * mean_k A[k, i] A[k, j], k the text
    tokens after the image."""
    cand = step.cand[0]
    text = [int(p) for p in step.text[0].nonzero().view(-1) if p > cand[0]]
    among, seen = attention(step, cand)[:, cand], attention(step, text)[:, cand]  # [V, V], [T, V]
    redundancy = beta * among.mean(1) - (1 - beta) * seen.mean(0)
    kept, dropped = keep_least_redundant(redundancy, int(step.keep[0]))
    corr = gamma * among[dropped][:, kept] + (1 - gamma) * seen[:, dropped].T @ seen[:, kept] / len(text)
    states = fold(step.hidden[0].double()[cand], corr, dropped, kept, eps)
    return set(states), states


def tokencarve_reference(step: Step, select: float, info_weight: float) -> tuple[set[int], States]:
    """TokenCarve (ShawnTan86/TokenCarve, TokenCarve/modeling_llama.py, the work-layer branch): info = row L1 norms of
    U S (SVD of the visual states X); both rankings weighted n..1 and fused; keep the top n = T + (select - 1) T;
    A = the first int(0.5 n) of them, B the rest; each B finds its most cosine-similar A, the most similar
    n - T of B are averaged into their A partner (a scatter mean including the partner). Fused ties go to the
    earlier token (the authors' topk leaves them open)."""
    cand, keep = step.cand[0], int(step.keep[0])
    hidden = step.hidden[0].double()[cand]  # [V, D]
    u, s, _ = torch.linalg.svd(hidden, full_matrices=False)
    info = (u * s).abs().sum(1)
    attn = attention(step, [step.q.shape[2] - 1])[0, cand]
    weights = torch.arange(len(cand), 0, -1, dtype=torch.float64)
    fused = torch.zeros(len(cand), dtype=torch.float64)
    fused[descending(info)] += info_weight * weights
    fused[descending(attn)] += (1 - info_weight) * weights
    selected = min(keep + math.floor((select - 1) * keep), len(cand))
    chosen = descending(fused)[:selected]
    half = int(0.5 * selected)
    a, b = chosen[:half], chosen[half:]
    unit = hidden / hidden.norm(dim=-1, keepdim=True)
    best, partner = (unit[b] @ unit[a].T).max(-1)
    merged = descending(best)[:min(half, selected - keep)]
    states = {}
    for n, j in enumerate(a):
        group = torch.cat([j[None], b[merged][partner[merged] == n]])
        states[int(j)] = hidden[group].mean(0)
    states.update({int(i): hidden[i] for i in b[~torch.isin(torch.arange(len(b)), merged)]})
    return set(states), states


def reference_for(method, step: Step) -> tuple[set[int], States]:
    name = method.name
    if name == "fastv":
        return fastv_reference(step)
    if name == "visionzip":
        return visionzip_reference(step, method.contextual_share)
    if name == "tokencarve":
        return tokencarve_reference(step, method.select, method.info_weight)
    if name == "ficoco-vl":
        return reference_for(method.llm if step.causal else method.vision, step)
    if name == "ficoco-v":
        return ficoco_v_reference(step, method.lam, method.eps, method.penalty)
    if name == "ficoco-l":
        return ficoco_l_reference(step, method.beta, method.gamma, method.eps)
    raise AssertionError(f"no reference for {name}")


def runtime_states(step: Step, reduction: Reduction) -> States:
    kept = reduction.kept[0][reduction.kept_valid[0]]
    hidden = step.hidden_cand[0] if reduction.hidden is None else None
    return {int(i): (hidden[i] if hidden is not None else reduction.hidden[0, n]).double() for n, i in enumerate(kept)}


CASES = [("fastv", {}), ("visionzip", {}), ("ficoco-v", {}), ("ficoco-l", {}), ("ficoco-vl", {}),
         ("tokencarve", {"fp64_eigh": True})]  # fp64 eigh: the information score exact, as against the authors' SVD


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("method,params", CASES, ids=[c[0] for c in CASES])
def test_runtime_keeps_what_the_reference_keeps(method, params, budget):
    attachment, records = capture(method, budget, **params)
    for step, reduction in records:
        assert step.cand.shape[0] == 1 and bool(step.key_valid.all())
        expected_kept, expected_states = reference_for(attachment.method, step)
        got = runtime_states(step, reduction)
        assert len(expected_kept) == int(step.keep[0]) < int(step.cand_valid.sum())  # the step really reduced
        assert set(got) == expected_kept, f"{method} layer {step.layer}: kept sets differ"
        originals = step.hidden_cand[0].double()
        changed = [i for i, state in expected_states.items() if not torch.equal(state, originals[i])]
        if method != "fastv":  # every other method here merges: some kept state must change
            assert changed, f"{method}: the reference merged nothing, so the state check below would be empty"
        for i, state in expected_states.items():
            torch.testing.assert_close(got[i], state, rtol=1e-4, atol=1e-5 * float(originals.abs().max()),
                                       msg=lambda m, i=i: f"{method} layer {step.layer}, token {i}: {m}")


@pytest.mark.parametrize("budget", BUDGETS)
def test_budgets_tell_strided_from_floor_spaced_targets(budget):
    """At these budgets the authors' stride spacing and floor(i * R / C) pick different VisionZip targets, so the
    reference test above can see the difference."""
    _, [(step, _)] = capture("visionzip", budget)
    keep = int(step.keep[0])
    contextual = round(keep * reducers.methods.METHODS["visionzip"].contextual_share)
    remaining = int(step.cand_valid.sum()) - (keep - contextual)
    strided = list(range(0, remaining, remaining // contextual))[:contextual]
    assert strided != floor_spaced_targets(remaining, contextual)
