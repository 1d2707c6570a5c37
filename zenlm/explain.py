"""Look inside a model: attention maps, cross-attention alignments, gradient×input attributions.

* ``attention_maps``: every layer's and head's softmax(QKᵀ/√d) weights, from the model's
  explicit attention path (``output_attentions=True``); each row is a distribution over keys.
* ``alignment``: for a translation, the cross-attention from each target token to the source
  tokens, averaged over heads and layers: a soft word alignment (Bahdanau et al.'s picture).
* ``gradient_x_input``: how much each input token pushed the logit of the predicted next token:
  (∂ logit / ∂ embedding) · embedding, summed over the embedding dimensions (Shrikumar et al.;
  Ancona et al. 2018). Positive = pushed toward the prediction.

``explain`` runs all three on a text and ``write_report`` renders PNG heatmaps (matplotlib,
imported only there) and an ``index.html`` to browse them.
"""
from __future__ import annotations

import html
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

logger = logging.getLogger(__name__)


@dataclass
class Explanation:
    """What ``explain`` found for one input. Attention tensors are (layers, heads, queries, keys)."""

    tokens: list[str]  # the main stack's tokens: decoder (decoder-only, encoder-decoder) or encoder
    source_tokens: Optional[list[str]] = None  # encoder tokens of an encoder-decoder model
    attentions: Optional[torch.Tensor] = None  # self-attention of the main stack
    encoder_attentions: Optional[torch.Tensor] = None
    cross_attentions: Optional[torch.Tensor] = None
    alignment: Optional[torch.Tensor] = None  # (target, source), cross-attention averaged over layers and heads
    attributions: Optional[torch.Tensor] = None  # (len(tokens),) gradient×input toward the predicted token
    source_attributions: Optional[torch.Tensor] = None  # (len(source_tokens),) for encoder-decoder models
    predicted: Optional[str] = None
    predicted_id: Optional[int] = None
    extra: dict = field(default_factory=dict)


def _stack(weights) -> Optional[torch.Tensor]:
    """Tuple of per-layer (1, H, T, S) -> (L, H, T, S); None stays None."""
    if not weights:
        return None
    return torch.stack([w[0] for w in weights]).detach().float()


def _check_length(model, n: int, what: str) -> None:
    window = model.config.max_position_embeddings
    if n > window:
        raise ValueError(f"the {what} is {n} tokens, longer than the model's context of "
                         f"max_position_embeddings={window}; shorten it")
    if n == 0:
        raise ValueError(f"the {what} is empty")


def _as_batch(ids) -> torch.Tensor:
    ids = torch.as_tensor(ids, dtype=torch.long)
    return ids[None] if ids.dim() == 1 else ids


@torch.no_grad()
def attention_maps(model, input_ids, decoder_input_ids=None) -> dict[str, Optional[torch.Tensor]]:
    """Self-, encoder- and cross-attention weights of one sequence (pair), each (L, H, T, S)."""
    input_ids = _as_batch(input_ids)
    _check_length(model, input_ids.size(1), "input")
    args = (input_ids,)
    if model.config.is_encoder_decoder:
        if decoder_input_ids is None:
            raise ValueError("an encoder-decoder model needs decoder_input_ids (the target side)")
        decoder_input_ids = _as_batch(decoder_input_ids)
        _check_length(model, decoder_input_ids.size(1), "target")
        args = (input_ids, decoder_input_ids)
    was_training = model.training
    model.eval()
    try:
        out = model(*args, output_attentions=True)
    finally:
        model.train(was_training)
    return {"attentions": _stack(out.attentions), "encoder_attentions": _stack(out.encoder_attentions),
            "cross_attentions": _stack(out.cross_attentions)}


def alignment(model, source_ids, target_ids, start_token_id: Optional[int] = None) -> torch.Tensor:
    """(target, source) soft alignment: row t is where the decoder looked while producing
    target token t (decoder inputs are the targets shifted right behind the start token)."""
    if not model.config.is_encoder_decoder:
        raise ValueError(f"alignment needs an encoder-decoder model, this one is {model.config.family}")
    target = _as_batch(target_ids)
    start = model.config.start_token_id if start_token_id is None else start_token_id
    decoder_input = torch.cat([torch.full_like(target[:, :1], start), target[:, :-1]], dim=1)
    cross = attention_maps(model, source_ids, decoder_input)["cross_attentions"]
    return cross.mean(dim=(0, 1))


def gradient_x_input(model, input_ids, decoder_input_ids=None, target_id: Optional[int] = None
                     ) -> tuple[torch.Tensor, Optional[torch.Tensor], int]:
    """Attributions of the main-stack tokens (and of the source tokens for encoder-decoder
    models) to the logit of ``target_id`` at the last position (default: the argmax).
    Returns (attributions, source_attributions or None, target_id)."""
    input_ids = _as_batch(input_ids)
    _check_length(model, input_ids.size(1), "input")
    if model.config.is_encoder_decoder:
        if decoder_input_ids is None:
            raise ValueError("an encoder-decoder model needs decoder_input_ids (the target side)")
        decoder_input_ids = _as_batch(decoder_input_ids)
        _check_length(model, decoder_input_ids.size(1), "target")
    if not hasattr(model, "logits"):
        raise ValueError("gradient×input needs a model with an LM head (TransformerLM / zenlm.load)")
    captured: list[torch.Tensor] = []

    def keep(_module, _inputs, output):
        output.retain_grad()
        captured.append(output)

    handle = model.embed_tokens.register_forward_hook(keep)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            args = (input_ids, decoder_input_ids) if decoder_input_ids is not None else (input_ids,)
            logits = model(*args).logits[0, -1]
            if target_id is None:
                target_id = int(logits.argmax())
            if not 0 <= target_id < logits.numel():
                raise ValueError(f"target_id {target_id} is outside [0, vocab_size={logits.numel()})")
            if not captured or not captured[0].requires_grad:  # frozen or integer embeddings: grad from here
                raise ValueError("the embedding output does not carry gradients (a quantized model?); "
                                 "explain the floating-point checkpoint instead")
            logits[target_id].backward()
    finally:
        handle.remove()
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    scores = [(e.grad * e).sum(-1)[0].detach() for e in captured]
    if decoder_input_ids is not None:  # the encoder embeds first, then the decoder
        return scores[1], scores[0], target_id
    return scores[0], None, target_id


def _token_strings(tokenizer, ids: Sequence[int]) -> list[str]:
    if tokenizer is None:
        return [str(i) for i in ids]
    out = []
    for i in ids:
        text = tokenizer.decode([i], skip_special_tokens=False)
        if not text:
            text = tokenizer.id_to_token(i) or str(i)
        out.append(text.replace(" ", "␣").replace("\n", "↵"))  # visible whitespace on the axes
    return out


def explain(model, tokenizer, text: str, target: Optional[str] = None, beam: int = 1) -> Explanation:
    """All three views for ``text``. For an encoder-decoder model ``text`` is the source and
    ``target`` its translation (generated greedily when not given); the attributions are for
    the token the model predicts after the whole target (for a decoder-only model: after text)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("text must be a non-empty string")
    config = model.config
    ids = tokenizer.encode(text)
    if config.is_encoder_decoder:
        eos = tokenizer.eos_id
        source = ids + ([eos] if eos is not None else [])
        _check_length(model, len(source), "text")
        if target is None:
            from .tasks.translate import translate

            target = translate(model, tokenizer, [text], beam=beam)[0]
        target_ids = tokenizer.encode(target) + ([eos] if eos is not None else [])
        _check_length(model, len(target_ids), "target")
        decoder_input = [config.start_token_id] + target_ids[:-1]
        maps = attention_maps(model, source, decoder_input)
        align = maps["cross_attentions"].mean(dim=(0, 1))
        # attributions for the token after the last real target token (the decoder input
        # ends just before eos, so the prediction there is what closes the translation)
        attr, src_attr, pred = gradient_x_input(model, source, decoder_input)
        return Explanation(tokens=_token_strings(tokenizer, decoder_input),
                           source_tokens=_token_strings(tokenizer, source), alignment=align,
                           attributions=attr, source_attributions=src_attr, predicted_id=pred,
                           predicted=_token_strings(tokenizer, [pred])[0],
                           extra={"target": target, "target_tokens": _token_strings(tokenizer, target_ids)}, **maps)
    _check_length(model, len(ids), "text")
    maps = attention_maps(model, ids)
    attr, pred = None, None
    if config.family == "decoder-only":
        attr, _, pred = gradient_x_input(model, ids)
    return Explanation(tokens=_token_strings(tokenizer, ids), attentions=maps["attentions"], attributions=attr,
                       predicted_id=pred, predicted=None if pred is None else _token_strings(tokenizer, [pred])[0])


# --------------------------------------------------------------------------- report
def _heatmap(plt, matrix, rows, cols, title, path, cmap="viridis") -> None:
    n_r, n_c = matrix.shape
    fig, ax = plt.subplots(figsize=(min(max(5.0, 2 + 0.3 * n_c), 14), min(2 + 0.3 * n_r, 14)), dpi=90)
    ax.imshow(matrix, cmap=cmap, aspect="auto", vmin=0.0, vmax=float(matrix.max()) or 1.0)
    if n_c <= 64:
        ax.set_xticks(range(n_c), cols, rotation=90, fontsize=7)
    if n_r <= 64:
        ax.set_yticks(range(n_r), rows, fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(expl: Explanation, out_dir) -> Path:
    """PNG per (stack, layer, head), the alignment and the attributions, plus index.html
    linking them; returns the HTML path. Long because it is mostly the figures' and the HTML
    page's template, written in the order the page shows them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sections: list[tuple[str, list[tuple[str, str]]]] = []
    src = expl.source_tokens or expl.tokens
    stacks = [("encoder", expl.encoder_attentions, src, src),
              ("decoder" if expl.source_tokens else "self", expl.attentions, expl.tokens, expl.tokens),
              ("cross", expl.cross_attentions, expl.tokens, src)]
    for name, weights, rows, cols in stacks:
        if weights is None:
            continue
        images = []
        for layer in range(weights.size(0)):
            for head in range(weights.size(1)):
                file = f"{name}-L{layer}-H{head}.png"
                _heatmap(plt, weights[layer, head].numpy(), rows, cols, f"{name} layer {layer} head {head}",
                         out / file)
                images.append((f"layer {layer} head {head}", file))
        sections.append((f"{name} attention", images))
    if expl.alignment is not None:
        _heatmap(plt, expl.alignment.numpy(), expl.extra.get("target_tokens", expl.tokens), src,
                 "cross-attention alignment\n(rows: target, columns: source; mean of layers and heads)",
                 out / "alignment.png", cmap="Blues")
        sections.insert(0, ("alignment", [("target ↔ source", "alignment.png")]))
    if expl.attributions is not None:
        fig, axes = plt.subplots(2 if expl.source_attributions is not None else 1, 1, dpi=90, squeeze=False,
                                 figsize=(min(2 + 0.35 * max(len(expl.tokens), len(src)), 14), 3.2))
        parts = [(expl.tokens, expl.attributions, "decoder" if expl.source_tokens else "input")]
        if expl.source_attributions is not None:
            parts.insert(0, (src, expl.source_attributions, "source"))
        for ax, (toks, scores, label) in zip(axes[:, 0], parts):
            values = scores.numpy()
            ax.bar(range(len(values)), values, color=["tab:red" if v > 0 else "tab:blue" for v in values])
            ax.set_xticks(range(len(values)), toks, rotation=90, fontsize=7)
            ax.set_ylabel(label, fontsize=8)
        axes[0, 0].set_title(f"gradient × input toward the predicted token {expl.predicted!r}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "attributions.png")
        plt.close(fig)
        sections.insert(0, ("attributions", [("gradient × input", "attributions.png")]))
    page = ["<!doctype html><meta charset='utf-8'><title>zenlm explain</title>",
            "<style>body{font-family:sans-serif;margin:1.5em}img{max-width:100%;border:1px solid #ddd}"
            "figure{display:inline-block;margin:.4em;vertical-align:top}figcaption{font-size:.8em}"
            "select{font-size:1em}</style>",
            f"<h1>zenlm explain</h1><p>tokens: <code>{html.escape(' | '.join(expl.tokens))}</code></p>"]
    if expl.source_tokens:
        page.append(f"<p>source: <code>{html.escape(' | '.join(expl.source_tokens))}</code><br>"
                    f"target: {html.escape(expl.extra.get('target', ''))}</p>")
    if expl.predicted is not None:
        page.append(f"<p>predicted next token: <code>{html.escape(expl.predicted)}</code></p>")
    for title, images in sections:
        page.append(f"<h2>{html.escape(title)}</h2>")
        if len(images) > 1:  # a picker to step through layers and heads, then every map as a thumbnail
            sid = title.split()[0]
            options = "".join(f"<option value='{f}'>{html.escape(c)}</option>" for c, f in images)
            page.append(f"<select onchange=\"document.getElementById('{sid}').src=this.value\">{options}</select><br>"
                        f"<img id='{sid}' src='{images[0][1]}'><details><summary>all {len(images)} maps</summary>")
            page += [f"<figure><img src='{f}' width=220><figcaption>{html.escape(c)}</figcaption></figure>"
                     for c, f in images]
            page.append("</details>")
        else:
            page += [f"<figure><img src='{f}'><figcaption>{html.escape(c)}</figcaption></figure>" for c, f in images]
    index = out / "index.html"
    index.write_text("\n".join(page), encoding="utf-8")
    summary = {"tokens": expl.tokens, "source_tokens": expl.source_tokens, "predicted": expl.predicted,
               "attributions": None if expl.attributions is None else expl.attributions.tolist(),
               "alignment_argmax": None if expl.alignment is None else expl.alignment.argmax(-1).tolist()}
    (out / "explanation.json").write_text(json.dumps(summary, ensure_ascii=False, indent=1), encoding="utf-8")
    return index


__all__ = ["Explanation", "attention_maps", "alignment", "gradient_x_input", "explain", "write_report"]
