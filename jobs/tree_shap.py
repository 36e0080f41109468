"""Exact tree SHAP of an xgboost model in numpy, from its trees parsed once.

xgboost's own tree SHAP (``Booster.predict(DMatrix, pred_contribs=True)``) needs a DMatrix per
call and walks every tree path for every row; for one decision of a 200-tree model that is most
of the time a score with reasons takes. This module computes the same values (path-dependent
tree SHAP, the algorithm xgboost implements) differently:

* for a leaf, let ``U`` be the distinct features split on along its path (``d`` of them), ``z_j``
  the fraction of the training cover that follows the path at the splits on ``j`` (the product of
  child cover / parent cover) and ``o_j`` 1 when the row follows the path at every split on ``j``,
  else 0. The leaf adds to feature ``i`` of ``U``::

      v * (o_i - z_i) * sum over S subset of U - {i}, S within {j: o_j = 1}, of
          |S|! (d - |S| - 1)! / d!  *  prod of z_j over j in U - S - {i}

* the ``o`` of a leaf is one of ``2**d`` patterns (``d`` is at most the tree depth), so every
  leaf's contributions for every pattern are tabulated once, when the model is loaded;
* a row then costs one comparison per split node, one pattern per leaf and a table look-up:
  a few vectorized numpy calls for the whole forest. Each tree's contributions are summed, then
  the trees are added up in float32, tree after tree, as xgboost adds them.

The bias (the model's expected log-odds) is taken from one xgboost call at load. The values
equal xgboost's ``pred_contribs`` up to its float32 arithmetic (tests compare them to 1e-6 on
every row; most entries are the same bits); :meth:`TreeShap.from_booster` returns None for a model it does not cover (not a
single-output ``gbtree``, categorical splits, too deep), and the caller then uses xgboost.
"""
from __future__ import annotations

import json
import logging
import sys
from math import factorial
from typing import Any

import numpy as np

_LOG = logging.getLogger(__name__)

#: Deepest tree covered (a leaf's path positions pack into one byte); deeper models use xgboost.
MAX_DEPTH = 8
_GATHER_BYTES = np.uint64(0x0102040810204080)
#: Rows per vectorized block (bounds the temporary arrays: rows x leaves x depth).
BLOCK_ROWS = 16


class TreeShap:
    """Tree SHAP contributions of one xgboost forest (see the module docstring)."""

    def __init__(self, *, n_features: int, n_trees: int, feature: np.ndarray, threshold: np.ndarray,
                 default_left: np.ndarray, path_node: np.ndarray, path_left: np.ndarray, leaf_full: np.ndarray,
                 repeated: np.ndarray, repeated_pattern: np.ndarray, pair_leaf: np.ndarray, pair_base: np.ndarray,
                 pair_width: np.ndarray, pair_bin: np.ndarray, table: np.ndarray, bias: float) -> None:
        self.n_features, self.n_trees, self.bias = n_features, n_trees, bias
        self._feature, self._threshold, self._default_left = feature, threshold, default_left
        self._path_node, self._path_left, self._leaf_full = path_node, path_left, leaf_full
        self._repeated, self._repeated_pattern = repeated, repeated_pattern
        self._pair_leaf, self._pair_base, self._pair_width, self._pair_bin = pair_leaf, pair_base, pair_width, pair_bin
        self._table = table

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in vars(self).values() if isinstance(a, np.ndarray))

    @classmethod
    def from_booster(cls, booster: Any, n_features: int) -> TreeShap | None:
        """The tables of ``booster``'s trees, or None when the model is not one this covers."""
        if sys.byteorder != "little":  # _block reads a leaf's 8 path flags as one little-endian integer
            return None
        model = json.loads(booster.save_raw("json"))
        learner = model["learner"]
        gbm = learner["gradient_booster"]
        params = learner["learner_model_param"]
        if (gbm.get("name") != "gbtree" or params.get("num_class", "0") not in ("0", "1")
                or params.get("num_target", "1") != "1" or int(params.get("num_feature", -1)) != n_features):
            return None
        trees = gbm["model"]["trees"]
        if any(t["tree_param"].get("size_leaf_vector", "1") not in ("0", "1") or any(t["split_type"])
               for t in trees):
            return None
        try:
            parsed = [_leaf_paths(t) for t in trees]
        except _Unsupported as exc:
            _LOG.info("tree SHAP in numpy does not cover this model (%s): xgboost computes it", exc)
            return None
        out = cls._build(n_features, trees, parsed)
        if out is None:
            return None
        # the bias (base margin + every tree's cover-weighted mean leaf) is one number per model:
        # xgboost's own, so that bias + contributions add up to xgboost's margin as before
        import xgboost as xgb

        row = np.zeros((1, n_features), dtype=np.float64)
        got = booster.predict(xgb.DMatrix(row, missing=np.nan, nthread=1), pred_contribs=True,
                              validate_features=False)
        out.bias = float(np.asarray(got, dtype=np.float64)[0, -1])
        return out

    @classmethod
    def _build(cls, n_features: int, trees: list[dict], parsed: list[list[tuple]]) -> TreeShap | None:
        # split nodes of the whole forest, numbered globally; number n_split is the padding of short paths
        feature, threshold, default_left, number = [], [], [], []
        for t in trees:
            mine: dict[int, int] = {}
            for k, child in enumerate(t["left_children"]):
                if child != -1:
                    mine[k] = len(feature)
                    feature.append(t["split_indices"][k])
                    threshold.append(t["split_conditions"][k])
                    default_left.append(bool(t["default_left"][k]))
            number.append(mine)
        pad_node = len(feature)
        leaves = [(number[i], path, v, i) for i, paths in enumerate(parsed) for path, v in paths]
        leaves = [leaf for leaf in leaves if leaf[1]]  # a one-leaf tree adds to the bias only
        tree_of = np.array([leaf[3] for leaf in leaves], dtype=np.int64)
        depth = max((len(leaf[1]) for leaf in leaves), default=1)
        if depth > MAX_DEPTH:
            return None
        n = len(leaves)
        path_node = np.full((n, 8), pad_node, dtype=np.int64)
        path_left = np.ones((n, 8), dtype=bool)
        slot_of = np.zeros((n, 8), dtype=np.int64)        # the distinct-feature slot of each path position
        distinct: list[list[int]] = []
        fractions: list[list[float]] = []
        values = np.empty(n, dtype=np.float64)
        for li, (mine, path, v, _) in enumerate(leaves):
            feats: list[int] = []
            zs: list[float] = []
            for p, (node, goes_left, feat, z) in enumerate(path):
                if feat in feats:
                    u = feats.index(feat)
                    zs[u] *= z
                else:
                    u = len(feats)
                    feats.append(feat)
                    zs.append(z)
                path_node[li, p] = mine[node]
                path_left[li, p] = goes_left
                slot_of[li, p] = u
            distinct.append(feats)
            fractions.append(zs)
            values[li] = v
        # which of a leaf's path positions a row leaves (bit p, packed) -> its pattern (bit u: the
        # row follows every split on distinct feature u)
        codes = np.arange(256)
        code_bits = (codes[:, None] >> np.arange(8)[None, :]) & 1                         # (256, 8)
        d_all = np.array([len(f) for f in distinct], dtype=np.int64)
        lengths = np.array([len(leaf[1]) for leaf in leaves], dtype=np.int64)
        position_bit = np.where(np.arange(8)[None, :] < lengths[:, None], 1 << slot_of, 0)   # (n, 8)
        missed = np.zeros((n, 256), dtype=np.int64)
        for p in range(8):
            missed |= code_bits[None, :, p] * position_bit[:, p:p + 1]
        pattern_of = ((1 << d_all) - 1)[:, None] ^ missed                                  # (n, 256)
        # the table: per leaf, for each of its 2**d patterns, its d contributions (float32, as
        # xgboost's), leaf after leaf; a row then reads one pattern's d values per leaf
        leaf_off = np.concatenate([[0], np.cumsum((1 << d_all) * d_all)[:-1]]).astype(np.int64)
        table = np.zeros(int(((1 << d_all) * d_all).sum()), dtype=np.float64)
        for d in range(1, int(d_all.max(initial=0)) + 1):
            ls = np.flatnonzero(d_all == d)
            if len(ls) == 0:
                continue
            z = np.array([fractions[li] for li in ls], dtype=np.float64)                  # (n_d, d)
            contrib = _leaf_tables(z, values[ls])                                          # (n_d, 2**d, d)
            table[(leaf_off[ls][:, None] + np.arange((1 << d) * d)[None, :]).ravel()] = contrib.ravel()
        # a leaf whose path splits on no feature twice has pattern = all ^ code; the others a map
        repeated = np.flatnonzero(d_all < lengths)
        pair_leaf = np.repeat(np.arange(n, dtype=np.int64), d_all)                          # (leaf, slot) pairs
        pair_slot = np.arange(len(pair_leaf)) - np.repeat(np.cumsum(d_all) - d_all, d_all)
        pair_feature = np.array([f for feats in distinct for f in feats], dtype=np.int64)
        return cls(n_features=n_features, n_trees=len(trees), feature=np.array(feature, dtype=np.intp),
                   threshold=np.array(threshold, dtype=np.float32), default_left=np.array(default_left, dtype=bool),
                   path_node=path_node.astype(np.intp), path_left=path_left, leaf_full=(1 << d_all).astype(np.intp) - 1,
                   repeated=repeated.astype(np.intp), repeated_pattern=pattern_of[repeated].astype(np.uint8),
                   pair_leaf=pair_leaf.astype(np.intp), pair_base=(leaf_off[pair_leaf] + pair_slot).astype(np.intp),
                   pair_width=d_all[pair_leaf].astype(np.intp),
                   pair_bin=(tree_of[pair_leaf] * (n_features + 1) + pair_feature).astype(np.intp),
                   table=table.astype(np.float32), bias=0.0)

    def contributions(self, x: np.ndarray) -> np.ndarray:
        """(rows, n_features + 1) float64: each input's contribution to the log-odds, then the bias."""
        x = np.asarray(x, dtype=np.float64)
        if x.shape[0] == 1:
            return self._block(x)
        out = np.empty((x.shape[0], self.n_features + 1), dtype=np.float64)
        for start in range(0, x.shape[0], BLOCK_ROWS):
            out[start:start + BLOCK_ROWS] = self._block(x[start:start + BLOCK_ROWS])
        return out

    def _block(self, x: np.ndarray) -> np.ndarray:
        n = x.shape[0]
        value = x.astype(np.float32)[:, self._feature]             # (n, split nodes): xgboost compares in float32
        with np.errstate(invalid="ignore"):
            left = np.where(np.isnan(value), self._default_left, value < self._threshold)
        left = np.concatenate([left, np.ones((n, 1), dtype=bool)], axis=1)   # the padding node: always followed
        off = left[:, self._path_node] != self._path_left           # (n, leaves, 8): the row leaves the path there
        # the 8 flags of a leaf are 8 bytes of 0/1: one multiplication gathers them into the top
        # byte, flag p at bit p (the partial products below it never carry into it)
        code = ((np.ascontiguousarray(off).view(np.uint64)[:, :, 0] * _GATHER_BYTES) >> np.uint64(56)).astype(np.intp)
        pattern = self._leaf_full ^ code                              # (n, leaves): bit u, feature u followed
        if len(self._repeated):
            pattern[:, self._repeated] = self._repeated_pattern[np.arange(len(self._repeated)), code[:, self._repeated]]
        got = self._table[self._pair_base + pattern[:, self._pair_leaf] * self._pair_width]   # (n, pairs)
        bins = self.n_trees * (self.n_features + 1)
        if n == 1:
            index = self._pair_bin
        else:
            index = (np.arange(n, dtype=np.intp)[:, None] * bins + self._pair_bin[None, :]).ravel()
        per_tree = np.bincount(index, weights=got.ravel(), minlength=n * bins).reshape(n, self.n_trees, -1)
        # xgboost adds each tree's float32 contributions to a float32 total, tree after tree: so do
        # these (a float64 sum would differ from its values by float32 rounding, ~1e-6 for 200 trees)
        phi = np.cumsum(per_tree.astype(np.float32), axis=1, dtype=np.float32)[:, -1, :].astype(np.float64)
        phi[:, -1] = self.bias
        return phi


class _Unsupported(ValueError):
    pass


def _leaf_paths(tree: dict) -> list[tuple[list[tuple[int, bool, int, float]], float]]:
    """Every leaf of one tree as (path, value): the path is (split node, goes left, feature,
    child cover / node cover) from the root down."""
    left, right = tree["left_children"], tree["right_children"]
    feat, cond, hess = tree["split_indices"], tree["split_conditions"], tree["sum_hessian"]
    n_features = int(tree["tree_param"]["num_feature"])
    out = []
    stack: list[tuple[int, list]] = [(0, [])]
    while stack:
        node, path = stack.pop()
        if left[node] == -1:
            out.append((path, float(np.float32(cond[node]))))
            continue
        if not 0 <= feat[node] < n_features:
            raise _Unsupported(f"split on feature {feat[node]}")
        if hess[node] <= 0:
            raise _Unsupported("a split node without cover")
        cover = np.float64(np.float32(hess[node]))
        for child, goes_left in ((left[node], True), (right[node], False)):
            z = float(np.float64(np.float32(hess[child])) / cover)
            stack.append((child, [*path, (node, goes_left, feat[node], z)]))
    return out


def _leaf_tables(z: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(leaves, 2**d, d): for leaves of ``d`` distinct path features with cover fractions ``z``
    (leaves, d) and values ``v``, the contribution to each of its features for every pattern
    (bit u of the pattern: the row follows the path at every split on feature u)."""
    n, d = z.shape
    masks = np.arange(1 << d)
    bits = (masks[:, None] >> np.arange(d)[None, :]) & 1                      # (2**d, d)
    # q[l, M] = product of z_j over j outside M
    q = np.prod(np.where(bits[None, :, :] == 1, 1.0, z[:, None, :]), axis=2)   # (n, 2**d)
    size = bits.sum(axis=1)
    weight = np.array([factorial(s) * factorial(d - s - 1) / factorial(d) if s < d else 0.0 for s in size])
    within = (masks[None, :] & ~masks[:, None]) == 0                           # within[p, M]: M inside p
    out = np.empty((n, 1 << d, d), dtype=np.float64)
    for i in range(d):
        bit = 1 << i
        a = np.where(within & ((masks & bit) == 0)[None, :], weight[None, :], 0.0)   # (patterns, M without i)
        c = q[:, masks | bit] @ a.T                                            # (n, patterns)
        out[:, :, i] = v[:, None] * (bits[None, :, i] - z[:, i:i + 1]) * c
    return out
