"""Independent float64 NumPy references for transformer attribution: AttnLRP / CP-LRP relevance of a tiny bias-free
ViT, and attention rollout / gradient-weighted rollout from attention arrays.

Nothing here uses JAX in a computation (parameters that arrive as JAX arrays are converted with ``np.asarray``);
everything is written from the rules below, not from attrjax's code, so that attrjax's tests can use it as a
yardstick.

The model (the "tiny bias-free ViT", ``tests.transformer_zoo.plain_vit_init(..., biases=False, cls_token=False,
pool='gap')``): patchify (patch tokens row-major over (patch row, patch col), a patch vector ordered (dy, dx,
channel)); ``x = patches @ W_embed``; no class token, no position embedding; pre-LN blocks
``x = x + Attn(LN1(x)); x = x + W2 gelu(W1 LN2(x))`` with the exact (erf) GELU; LayerNorm ``scale * (x - mean) /
sqrt(var + eps)`` without a shift; a final LayerNorm; mean pooling over the tokens; ``logits = pooled @ W_head``.
Attention: ``q, k, v = y Wq, y Wk, y Wv`` split into heads, ``scores = (q / sqrt(head_dim)) k^T``, ``A =
softmax(scores)`` over the keys, ``o = A v``, heads concatenated, ``@ Wo``.

Relevance rules (:func:`attnlrp_reference`), starting at ``R_logits = onehot(target) * logits``:

* bias-free linear maps ``z_j = sum_i x_i w_ij`` (dense layers, patch embedding, mean pooling, LayerNorm centring):
  LRP-0, ``R_i = x_i sum_j w_ij R_j / z_j`` (safe division: 0 where z_j == 0);
* LayerNorm: ``sigma`` held at its value (division and scale are constant scalings that R passes unchanged), the
  centring ``c = (I - 1/D) x`` by LRP-0;
* GELU and the constant 1/sqrt(head_dim): identity, R passes unchanged;
* residual ``out = a + b``: ``R_a = a / out R``, ``R_b = b / out R``;
* softmax (AttnLRP, Achtibat et al., ICML 2024): ``R_x = x * (R_s - s * sum(R_s))`` with x the scaled scores;
* the bilinear products ``q k^T`` and ``A v`` (AttnLRP's uniform rule): each factor of each product term
  ``a_k b_k`` gets half of its share ``a_k b_k / o R_o``;
* CP-LRP (Ali et al., ICML 2022; ``cp=True``): ``A`` held constant, all of ``o``'s relevance goes to ``v`` by LRP-0
  with weights A, nothing to the softmax, q or k;
* pixels: LRP-0 through the patch embedding, un-patchified to (B, S, S, C), summed over the channels.

Conservation (checked in ``tests/test_transformer_reference.py``): with ``cp=True`` every step is conservative and
the map sums, per image, to the target logit (to float64 rounding). AttnLRP's softmax rule is not: the relevance
entering the scores is ``sum_i x_i R_i - (sum_i s_i x_i) (sum_i R_i)`` (per row), which is not ``sum R``; everything
else is conservative, so AttnLRP's map sums to something else than the logit.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

SOFTMAX_RULES = ("attnlrp", "gradient", "identity")


def _f64(tree):
    if isinstance(tree, dict):
        return {k: _f64(v) for k, v in tree.items() if k != "config"}
    if isinstance(tree, (list, tuple)):
        return [_f64(v) for v in tree]
    return np.asarray(tree, dtype=np.float64)


def _config(params):
    cfg = params["config"]
    return dict(patch=int(cfg.patch), heads=int(cfg.heads), pool=cfg.pool, cls_token=bool(cfg.cls_token),
                posemb=bool(cfg.posemb), eps=float(cfg.eps))


def safe_divide(num, den):
    """``num / den``, 0 where ``den == 0``."""
    num, den = np.broadcast_arrays(np.asarray(num, np.float64), np.asarray(den, np.float64))
    out = np.zeros(num.shape, np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def patchify(images, patch):
    """(B, S, S, C) -> (B, N, p*p*C), tokens row-major over (patch row, patch col), vectors ordered (dy, dx, c)."""
    b, h, w, c = images.shape
    x = images.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches, patch, image_size, channels):
    """The inverse of :func:`patchify`."""
    b = patches.shape[0]
    g = image_size // patch
    x = patches.reshape(b, g, g, patch, patch, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, image_size, image_size, channels)


def gelu_exact(x):
    erf = np.vectorize(math.erf, otypes=[np.float64])
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def _layer_norm(x, p, eps):
    c = x - x.mean(axis=-1, keepdims=True)
    sigma = np.sqrt((c * c).mean(axis=-1, keepdims=True) + eps)
    y = c / sigma * p["scale"]
    if "bias" in p:
        y = y + p["bias"]
    return y, c, sigma


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _forward(params, images):
    """Float64 forward pass keeping every intermediate the relevance rules need."""
    cfg = _config(params)
    p = _f64(params)
    images = np.asarray(images, np.float64)
    patches = patchify(images, cfg["patch"])
    x = np.einsum("bnk,kd->bnd", patches, p["embedding"]["kernel"])
    if "bias" in p["embedding"]:
        x = x + p["embedding"]["bias"]
    cache = {"images": images, "patches": patches, "x0": x, "blocks": []}
    if cfg["cls_token"]:
        x = np.concatenate([np.broadcast_to(p["cls"], (x.shape[0], 1, x.shape[-1])), x], axis=1)
    if cfg["posemb"]:
        x = x + p["pos_embedding"]

    def dense(inp, layer, spec):
        out = np.einsum(spec, inp, layer["kernel"])
        return out + layer["bias"] if "bias" in layer else out

    for block in p["blocks"]:
        blk = {"x_in": x}
        blk["y1"], blk["c1"], blk["sigma1"] = _layer_norm(x, block["ln1"], cfg["eps"])
        q = dense(blk["y1"], block["attn"]["query"], "btd,dhe->bthe")
        k = dense(blk["y1"], block["attn"]["key"], "btd,dhe->bthe")
        v = dense(blk["y1"], block["attn"]["value"], "btd,dhe->bthe")
        qs = q / math.sqrt(q.shape[-1])
        scores = np.einsum("bqhe,bkhe->bhqk", qs, k)
        a = _softmax(scores)
        o = np.einsum("bhqk,bkhe->bqhe", a, v)
        attn_out = dense(o, block["attn"]["out"], "bqhe,hed->bqd")
        x1 = x + attn_out
        blk.update(q=q, qs=qs, k=k, v=v, scores=scores, A=a, o=o, attn_out=attn_out, x1=x1)
        blk["y2"], blk["c2"], blk["sigma2"] = _layer_norm(x1, block["ln2"], cfg["eps"])
        h = dense(blk["y2"], block["mlp"]["fc1"], "btd,dm->btm")
        g = gelu_exact(h)
        m = dense(g, block["mlp"]["fc2"], "btm,md->btd")
        x = x1 + m
        blk.update(h=h, g=g, m=m, x2=x)
        cache["blocks"].append(blk)
    cache["x_final"] = x
    cache["yf"], cache["cf"], cache["sigmaf"] = _layer_norm(x, p["final_ln"], cfg["eps"])
    pooled = cache["yf"].mean(axis=1) if cfg["pool"] == "gap" else cache["yf"][:, 0]
    logits = pooled @ p["head"]["kernel"]
    if "bias" in p["head"]:
        logits = logits + p["head"]["bias"]
    cache.update(pooled=pooled, logits=logits)
    return cache, p, cfg


def numpy_forward(params, images):
    """Logits (B, num_classes) in float64; handles every option of ``plain_vit_init`` (biases, class token,
    position embedding, 'tok' pooling), so it can check ``plain_vit_apply`` beyond the relevance model."""
    return _forward(params, images)[0]["logits"]


def numpy_attentions(params, images):
    """The float64 attention probabilities of each block, a list of (B, heads, T, T)."""
    return [blk["A"] for blk in _forward(params, images)[0]["blocks"]]


# ---------------------------------------------------------------------------------------------------------------
# relevance rules
# ---------------------------------------------------------------------------------------------------------------

def _lrp0_dense(x, kernel, z, r, x_spec, k_spec, z_spec):
    """LRP-0 through ``z = einsum(x_spec, k_spec -> z_spec)(x, kernel)`` (no bias):
    ``R_x = x * einsum(z_spec, k_spec -> x_spec)(R / z, kernel)``."""
    s = safe_divide(r, z)
    return x * np.einsum(f"{z_spec},{k_spec}->{x_spec}", s, kernel)


def _lrp_centring(x, c, r_c):
    """LRP-0 through ``c = M x`` with ``M = I - 1/D`` (symmetric): ``R_x_i = x_i sum_j M_ij R_c_j / c_j``."""
    s = safe_divide(r_c, c)
    return x * (s - s.mean(axis=-1, keepdims=True))


def _lrp_layer_norm(x, c, sigma, scale, r_y, y, hold):
    """Relevance through ``y = scale * c / sigma``. ``hold``: sigma held (R_c = R_y, then LRP-0 through the
    centring). Otherwise (a mutation): gradient x input of the whole LayerNorm, ``R_x_i = x_i sum_j (dy_j/dx_i)
    R_y_j / y_j`` with the full Jacobian ``dy_j/dx_i = scale_j / sigma (M_ij - c_i c_j / (D sigma^2))``."""
    if hold:
        return _lrp_centring(x, c, r_y)
    d = x.shape[-1]
    s = safe_divide(r_y, y) * scale / sigma  # (..., D): scale_j / sigma * R_j / y_j
    # sum_j s_j (M_ij - c_i c_j / (D sigma^2)) = (s_i - mean(s)) - c_i (c . s) / (D sigma^2)
    return x * ((s - s.mean(axis=-1, keepdims=True))
                - c * (c * s).sum(axis=-1, keepdims=True) / (d * sigma ** 2))


def _lrp_residual(a, b, out, r):
    s = safe_divide(r, out)
    return a * s, b * s


def _lrp_softmax(x, s, r_s, rule):
    """Relevance through ``s = softmax(x)`` over the last axis.

    * ``"attnlrp"``: ``R_x = x * (R_s - s * sum(R_s))`` (Achtibat et al. 2024). This is also gradient x input
      with the relevance normalised by the output, ``x * J^T (R_s / s)``, since ``J = diag(s) - s s^T``.
    * ``"gradient"`` (a mutation): gradient x input with the relevance itself as the upstream signal,
      ``R_x = x * J^T R_s = x * s * (R_s - sum(s * R_s))``, the rule one gets by pushing R (instead of R / z)
      through a vector-Jacobian product.
    * ``"identity"`` (a mutation): R passes unchanged, as through an elementwise activation.
    """
    if rule == "attnlrp":
        return x * (r_s - s * r_s.sum(axis=-1, keepdims=True))
    if rule == "gradient":
        return x * s * (r_s - (s * r_s).sum(axis=-1, keepdims=True))
    if rule == "identity":
        return r_s
    raise ValueError(f"softmax_rule must be one of {SOFTMAX_RULES}, not {rule!r}")


def attnlrp_reference(params, images, target, *, cp=False, softmax_rule="attnlrp", hold_norm_scale=True,
                      return_layers=False):
    """Pixel relevance (B, S, S) of the tiny bias-free ViT for the logit ``target`` (an int or one per image).

    ``cp=True``: CP-LRP (attention held constant). ``softmax_rule`` and ``hold_norm_scale=False`` are deliberate
    mutations (see :func:`_lrp_softmax`, :func:`_lrp_layer_norm`) for tests that show the reference is sharp.
    ``return_layers=True``: returns ``(map, layers)``, ``layers`` a dict of float64 relevances: ``"logits"``
    (B, C), ``"pooled"`` (B, D), ``"final_ln_out"`` / ``"final_ln_in"`` (B, T, D), per block ``"block{i}/..."``:
    ``out``, ``mlp``, ``mlp_hidden`` (B, T, M), ``ln2_out``, ``attn_residual`` (x1), ``attn_out``, ``o`` (B, T, H,
    hd), ``A`` / ``scores`` (B, H, T, T), ``q``, ``k``, ``v``, ``ln1_out``, ``in``; ``"tokens"`` (the embedding's
    output), ``"patches"`` (B, N, p*p*C), ``"pixels"`` (B, S, S, C).
    """
    cache, p, cfg = _forward(params, images)
    if p["embedding"].get("bias") is not None or cfg["cls_token"] or cfg["posemb"] or cfg["pool"] != "gap" \
            or any("bias" in layer for layer in (p["head"], p["final_ln"])):
        raise ValueError("the relevance reference is for the bias-free ViT: biases=False, cls_token=False, "
                         "no position embedding, pool='gap'")
    if softmax_rule not in SOFTMAX_RULES:
        raise ValueError(f"softmax_rule must be one of {SOFTMAX_RULES}, not {softmax_rule!r}")
    logits = cache["logits"]
    b, n_classes = logits.shape
    target = np.broadcast_to(np.asarray(target, np.int64), (b,))
    layers = {}
    r = np.zeros_like(logits)
    r[np.arange(b), target] = logits[np.arange(b), target]
    layers["logits"] = r
    # head
    r = _lrp0_dense(cache["pooled"], p["head"]["kernel"], logits, r, "bd", "dc", "bc")
    layers["pooled"] = r
    # mean pool: pooled_d = sum_t yf_td / T
    yf = cache["yf"]
    r = (yf / yf.shape[1]) * safe_divide(r, cache["pooled"])[:, None, :]
    layers["final_ln_out"] = r
    r = _lrp_layer_norm(cache["x_final"], cache["cf"], cache["sigmaf"], p["final_ln"]["scale"], r, yf,
                        hold_norm_scale)
    layers["final_ln_in"] = r

    for i in reversed(range(len(p["blocks"]))):
        blk, w = cache["blocks"][i], p["blocks"][i]
        name = f"block{i}/"
        layers[name + "out"] = r
        r_x1, r_m = _lrp_residual(blk["x1"], blk["m"], blk["x2"], r)
        layers[name + "mlp"] = r_m
        r_g = _lrp0_dense(blk["g"], w["mlp"]["fc2"]["kernel"], blk["m"], r_m, "btm", "md", "btd")
        r_h = r_g  # GELU: identity rule
        layers[name + "mlp_hidden"] = r_h
        r_y2 = _lrp0_dense(blk["y2"], w["mlp"]["fc1"]["kernel"], blk["h"], r_h, "btd", "dm", "btm")
        layers[name + "ln2_out"] = r_y2
        r_x1 = r_x1 + _lrp_layer_norm(blk["x1"], blk["c2"], blk["sigma2"], w["ln2"]["scale"], r_y2, blk["y2"],
                                      hold_norm_scale)
        layers[name + "attn_residual"] = r_x1
        r_x, r_a = _lrp_residual(blk["x_in"], blk["attn_out"], blk["x1"], r_x1)
        layers[name + "attn_out"] = r_a
        r_o = _lrp0_dense(blk["o"], w["attn"]["out"]["kernel"], blk["attn_out"], r_a, "bqhe", "hed", "bqd")
        layers[name + "o"] = r_o
        # o[b,q,h,e] = sum_k A[b,h,q,k] v[b,k,h,e]; terms A_qk v_ke, shares (A_qk v_ke / o_qe) R_o_qe
        frac = safe_divide(r_o, blk["o"])
        a, v = blk["A"], blk["v"]
        term_v = np.einsum("bhqk,bkhe,bqhe->bkhe", a, v, frac)  # sum over q of each term's share, per v_ke
        if cp:
            r_v = term_v
            r_q = np.zeros_like(blk["q"])
            r_k = np.zeros_like(blk["k"])
            layers[name + "A"] = np.zeros_like(a)
            layers[name + "scores"] = np.zeros_like(a)
        else:
            r_v = 0.5 * term_v
            r_a_att = 0.5 * np.einsum("bhqk,bkhe,bqhe->bhqk", a, v, frac)
            layers[name + "A"] = r_a_att
            r_scores = _lrp_softmax(blk["scores"], a, r_a_att, softmax_rule)
            layers[name + "scores"] = r_scores
            # scores[b,h,q,k] = sum_e qs[b,q,h,e] k[b,k,h,e]; 1/sqrt(hd) passes R unchanged (R_q = R_qs)
            fs = safe_divide(r_scores, blk["scores"])
            r_q = 0.5 * np.einsum("bqhe,bkhe,bhqk->bqhe", blk["qs"], blk["k"], fs)
            r_k = 0.5 * np.einsum("bqhe,bkhe,bhqk->bkhe", blk["qs"], blk["k"], fs)
        layers[name + "q"], layers[name + "k"], layers[name + "v"] = r_q, r_k, r_v
        y1 = blk["y1"]
        r_y1 = (_lrp0_dense(y1, w["attn"]["query"]["kernel"], blk["q"], r_q, "btd", "dhe", "bthe")
                + _lrp0_dense(y1, w["attn"]["key"]["kernel"], blk["k"], r_k, "btd", "dhe", "bthe")
                + _lrp0_dense(y1, w["attn"]["value"]["kernel"], blk["v"], r_v, "btd", "dhe", "bthe"))
        layers[name + "ln1_out"] = r_y1
        r = r_x + _lrp_layer_norm(blk["x_in"], blk["c1"], blk["sigma1"], w["ln1"]["scale"], r_y1, y1,
                                  hold_norm_scale)
        layers[name + "in"] = r
    layers["tokens"] = r
    r = _lrp0_dense(cache["patches"], p["embedding"]["kernel"], cache["x0"], r, "bnk", "kd", "bnd")
    layers["patches"] = r
    s = cache["images"].shape
    pixels = unpatchify(r, cfg["patch"], s[1], s[3])
    layers["pixels"] = pixels
    heatmap = pixels.sum(axis=-1)
    return (heatmap, layers) if return_layers else heatmap


# ---------------------------------------------------------------------------------------------------------------
# attention rollout
# ---------------------------------------------------------------------------------------------------------------

def _map(r, prefix_tokens, grid, subtract_identity):
    h, w = grid
    if prefix_tokens > 0:
        row = r[:, 0, prefix_tokens:]
    else:
        if subtract_identity:
            r = r - np.eye(r.shape[-1])
        row = r.mean(axis=1)[:, prefix_tokens:]
    return row.reshape(r.shape[0], h, w)


def rollout_reference(attentions: Sequence, prefix_tokens: int, grid):
    """Attention rollout (Abnar & Zuidema 2020) from ``[A_l (B, heads, T, T)]`` in the order of the blocks.

    ``Abar_l = mean over heads``, ``Ahat_l = 0.5 Abar_l + 0.5 I`` with rows renormalised to 1,
    ``R = Ahat_L @ ... @ Ahat_1``. Map (B, h, w): ``R[:, 0, prefix:]`` with prefix tokens, else the mean over all rows
    of ``R`` (all columns are patches).
    """
    r = None
    for a in attentions:
        a = np.asarray(a, np.float64)
        abar = a.mean(axis=1)
        ahat = 0.5 * abar + 0.5 * np.eye(abar.shape[-1])
        ahat = ahat / ahat.sum(axis=-1, keepdims=True)
        r = ahat if r is None else ahat @ r
    return _map(r, prefix_tokens, grid, subtract_identity=False)


def grad_rollout_reference(attentions: Sequence, attention_grads: Sequence, prefix_tokens: int, grid):
    """Gradient-weighted rollout (Chefer, Gur & Wolf, ICCV 2021, generic attention-model explainability).

    ``R = I``; for each block in order: ``Abar_l = mean over heads of max(grad_l * A_l, 0)``, ``R = R + Abar_l @ R``.
    ``grad_l`` is d(target logit)/d(A_l). Map (B, h, w): ``R[:, 0, prefix:]`` with prefix tokens, else the mean
    over rows of ``R - I``.
    """
    r = None
    for a, g in zip(attentions, attention_grads, strict=True):
        abar = np.maximum(np.asarray(g, np.float64) * np.asarray(a, np.float64), 0.0).mean(axis=1)
        if r is None:
            r = np.broadcast_to(np.eye(abar.shape[-1]), abar.shape).copy()
        r = r + abar @ r
    return _map(r, prefix_tokens, grid, subtract_identity=True)
