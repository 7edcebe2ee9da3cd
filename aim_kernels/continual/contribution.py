"""Seed 001's analysis: cross-modal contributions between tasks.

For tasks i, j and features of their examples (image: the projector's output,
mean over the image tokens; text: the decoder's input embeddings of the question,
mean over its tokens -- both live in the decoder's space):

    Con_I->T[i][j] = E_{x in i, y in j} cos(I_x, T_y)     Con_T->I[i][j] = E cos(T_x, I_y)
    Con_I->I[i][j] = E cos(I_x, I_y)                      Con_T->T[i][j] = E cos(T_x, T_y)

``contribution_order`` picks the task order minimising the cross-modal contribution
(Con_I->T + Con_T->I) summed over adjacent tasks; ``forgetting_correlation`` sets
each pair's contribution against the accuracy task i loses while task j trains.
"""
from __future__ import annotations

import itertools

import numpy as np
import torch

from . import data
from .model import base, inputs

KINDS = ("I->T", "T->I", "I->I", "T->T")


@torch.no_grad()
def features(model, split: data.Split, n: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(image features [n, H], question-text features [n, H]), unit-normalised."""
    pix, ids = inputs(model, split.images[:n], split.questions[:n])
    core = base(model).model
    img = core.get_image_features(pixel_values=pix)
    img = img.pooler_output if hasattr(img, "pooler_output") else img
    if isinstance(img, (list, tuple)):
        img = torch.stack([t.reshape(-1, t.shape[-1]).mean(0) for t in img])
    else:
        img = img.reshape(len(ids), -1, img.shape[-1]).mean(1)
    q = ids[:, -split.questions.shape[1]:]
    txt = core.get_input_embeddings()(q).mean(1)
    return torch.nn.functional.normalize(img.float(), dim=-1), torch.nn.functional.normalize(txt.float(), dim=-1)


def contributions(model, bench: data.Benchmark, skills, n: int = 128) -> dict[str, list[list[float]]]:
    """The four [T, T] matrices of expected cosines, on the tasks' test splits."""
    feats = [features(model, bench.test[s], n) for s in skills]
    T = len(skills)
    out = {k: np.zeros((T, T)) for k in KINDS}
    for i in range(T):
        Ii, Ti = feats[i]
        for j in range(T):
            Ij, Tj = feats[j]
            out["I->T"][i, j] = float((Ii @ Tj.T).mean())
            out["T->I"][i, j] = float((Ti @ Ij.T).mean())
            out["I->I"][i, j] = float((Ii @ Ij.T).mean())
            out["T->T"][i, j] = float((Ti @ Tj.T).mean())
    return {k: [[round(float(x), 5) for x in row] for row in v] for k, v in out.items()}


def order_cost(con: dict, skills, order) -> float:
    idx = {s: k for k, s in enumerate(skills)}
    cross = np.array(con["I->T"]) + np.array(con["T->I"])
    return float(sum(cross[idx[a], idx[b]] for a, b in zip(order, order[1:])))


def contribution_order(con: dict, skills) -> list[str]:
    """The order of ``skills`` minimising the summed cross-modal contribution of adjacent
    tasks (exhaustive for T <= 8, greedy nearest-neighbour beyond)."""
    skills = list(skills)
    if len(skills) <= 8:
        return list(min(itertools.permutations(skills), key=lambda o: order_cost(con, skills, o)))
    cross = np.array(con["I->T"]) + np.array(con["T->I"])
    best = None
    for start in range(len(skills)):
        order, left = [start], set(range(len(skills))) - {start}
        while left:
            nxt = min(left, key=lambda j: cross[order[-1], j])
            order.append(nxt)
            left.remove(nxt)
        cand = [skills[k] for k in order]
        if best is None or order_cost(con, skills, cand) < order_cost(con, skills, best):
            best = cand
    return best


def pair_drops(R, order) -> list[tuple[str, str, float]]:
    """(task i, task j, accuracy of i lost while j trained) for every i < j of a run."""
    out = []
    for j in range(1, len(order)):
        for i in range(j):
            out.append((order[i], order[j], R[j - 1][i] - R[j][i]))
    return out


def forgetting_correlation(con: dict, skills, runs) -> dict[str, float]:
    """Pearson r between each Con kind of (i, j) and the drop of task i while j trains,
    over every pair of every run given (NaN when undefined)."""
    idx = {s: k for k, s in enumerate(skills)}
    xs = {k: [] for k in KINDS}
    ys = []
    for r in runs:
        for a, b, drop in pair_drops(r["acc_matrix"], r["order"]):
            for k in KINDS:
                xs[k].append(con[k][idx[a]][idx[b]])
            ys.append(drop)
    out = {}
    for k in KINDS:
        x, y = np.array(xs[k]), np.array(ys)
        ok = len(y) > 2 and x.std() > 0 and y.std() > 0
        out[k] = round(float(np.corrcoef(x, y)[0, 1]), 3) if ok else float("nan")
    out["pairs"] = len(ys)
    return out
