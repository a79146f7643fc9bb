"""`rlhf viz`: look inside a model.

rlhf viz attention MODEL_DIR --text TEXT [--layer L] [--head H] [--out attn.png]
    the self-attention matrix of one head as a heatmap, tokens on both axes
rlhf viz kl POLICY_DIR --reference REF_DIR --prompt TEXT [--out kl.html]
    the policy answers greedily; each response token is coloured by the full-distribution
    KL(policy || reference) at its position: where RL moved the model away from SFT.
    Writes kl.html (coloured spans, values on hover) and kl.png beside it.
"""

from __future__ import annotations

import argparse
import html
from pathlib import Path
from typing import Any

import torch

from rlhf.infra.errors import UserError
from rlhf.tokens.chat import encode_prompt
from rlhf.tokens.decoding import Decoding
from rlhf.tokens.sequences import response_slice
from rlhf.tools.generate import generate_responses, load, pick_device, quiet_loading_in_pipes
from rlhf.tools.plotting import pyplot, save_figure

MAX_ATTENTION_TOKENS = 256  # beyond this the heatmap's labels are unreadable


def token_labels(tokenizer: Any, ids: list[int], width: int = 14) -> list[str]:
    """Each token as it reads in text, with whitespace made visible."""
    out = []
    for i in ids:
        text = tokenizer.decode([i])
        text = text.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "·")
        out.append(text[:width] or "∅")
    return out


def _tick(label: str) -> str:
    return label.replace("$", r"\$")  # a '$' pair would switch matplotlib into mathtext


def _index(value: int, size: int, what: str) -> int:
    """Python-style index (negative counts from the end) checked against `size`."""
    if not -size <= value < size:
        raise UserError(f"--{what} {value}: the model has {size} {what}s (0..{size - 1})")
    return value % size


# -------------------------------------------------------------------------------- attention


def load_eager(model_dir: str, device: torch.device) -> tuple[torch.nn.Module, Any]:
    model, tokenizer = load(model_dir, device)
    # SDPA and flash attention never materialise the attention matrix; eager does.
    model.set_attn_implementation("eager")
    return model, tokenizer


@torch.no_grad()
def attention_matrix(
    model: torch.nn.Module, tokenizer: Any, text: str, layer: int = -1, head: int = 0
) -> tuple[torch.Tensor, list[str], int, int]:
    """(weights (T, T): row = query token, column = key token; labels; layer; head)."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if not ids:
        raise UserError("--text is empty")
    if len(ids) > MAX_ATTENTION_TOKENS:
        raise UserError(
            f"--text is {len(ids)} tokens; at most {MAX_ATTENTION_TOKENS} make a legible heatmap"
        )
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor([ids], device=device), output_attentions=True)
    if not out.attentions or out.attentions[0] is None:
        raise UserError("this model returned no attention weights (needs eager attention)")
    layer = _index(layer, len(out.attentions), "layer")
    weights = out.attentions[layer][0]  # (heads, T, T)
    head = _index(head, weights.shape[0], "head")
    return weights[head].float().cpu(), token_labels(tokenizer, ids), layer, head


def plot_attention(
    weights: torch.Tensor, labels: list[str], layer: int, head: int, path: Path
) -> Path:
    plt = pyplot()
    n = len(labels)
    size = min(max(6.0, 0.26 * n + 2.5), 60.0)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    im = ax.imshow(weights.numpy(), cmap="viridis", vmin=0.0, vmax=float(weights.max()))
    ticks = list(range(n))
    font = 8 if n <= 60 else 6
    ax.set_xticks(ticks, [_tick(t) for t in labels], rotation=90, fontsize=font)
    ax.set_yticks(ticks, [_tick(t) for t in labels], fontsize=font)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query (attending)")
    ax.set_title(f"self-attention, layer {layer}, head {head}")
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label="attention weight")
    return save_figure(fig, path)


# ----------------------------------------------------------------------------------- per-token KL


def greedy_response(
    model: torch.nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int
) -> tuple[list[int], list[int]]:
    """(prompt ids with the chat template, greedy response ids up to and including EOS)."""
    messages = [{"role": "user", "content": prompt}]
    decoding = Decoding(max_new_tokens=max_new_tokens)
    row = generate_responses(model, tokenizer, [messages], decoding, 1, 2048, with_ids=True)[0]
    return encode_prompt(tokenizer, messages, 2048), row["ids"]


@torch.no_grad()
def token_kl(
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    prompt_ids: list[int],
    response_ids: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per response position: (KL(p || q) = sum_v p log p/q over the whole vocabulary,
    log p(token) - log q(token) of the token actually chosen), both (R,).

    The full-distribution KL is what the policy's change costs at that position; the sampled
    token's log-ratio is the single-sample estimate PPO's penalty uses.
    """
    ids = torch.tensor([prompt_ids + response_ids])
    window = response_slice(len(prompt_ids), len(response_ids))
    logp = _logprobs(policy, ids)[window]
    logq = _logprobs(reference, ids)[window]
    if logp.shape != logq.shape:
        raise UserError(
            f"policy and reference vocabularies differ ({logp.shape[-1]} vs {logq.shape[-1]})"
        )
    kl = (logp.exp() * (logp - logq)).sum(-1).clamp(min=0.0)  # tiny negatives are rounding
    chosen = torch.tensor(response_ids).unsqueeze(-1)
    log_ratio = (logp.gather(-1, chosen) - logq.gather(-1, chosen)).squeeze(-1)
    return kl, log_ratio


def _logprobs(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    logits = model(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device)).logits
    return torch.log_softmax(logits[0].double(), dim=-1).cpu()  # float64: KL near 0 stays ~0


def _colors(values: list[float], vmax: float) -> list[str]:
    import matplotlib

    cmap = matplotlib.colormaps["Reds"]
    return [matplotlib.colors.to_hex(cmap(min(v / vmax, 1.0) * 0.85)) for v in values]


def kl_scale(kl: list[float]) -> float:
    """Colour scale top: the largest KL, but at least 0.05 nats so that a policy identical to
    its reference shows as white instead of amplified rounding noise."""
    return max(max(kl, default=0.0), 0.05)


def kl_html(
    prompt: str,
    pieces: list[str],
    kl: list[float],
    log_ratio: list[float],
    policy_dir: str,
    reference_dir: str,
) -> str:
    vmax = kl_scale(kl)
    spans = []
    for text, k, r, color in zip(pieces, kl, log_ratio, _colors(kl, vmax)):
        title = f"KL {k:.4f} nats | log p/q of this token {r:+.4f} | {text!r}"
        spans.append(
            f'<span class="t" style="background:{color}" title="{html.escape(title)}">'
            f"{html.escape(text)}</span>"
        )
    steps = [vmax * i / 4 for i in range(5)]
    legend = "".join(
        f'<span class="t" style="background:{c}">{v:.3g}</span>'
        for v, c in zip(steps, _colors(steps, vmax))
    )
    total = sum(kl)
    mean = total / max(len(kl), 1)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>per-token KL</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 960px; margin: 24px auto; color: #222; }}
.response {{ font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 1.9;
             border: 1px solid #ddd; padding: 12px; }}
.t {{ border-radius: 3px; padding: 1px 0; }}
.meta {{ color: #555; font-size: 14px; }}
</style></head><body>
<h1>Per-token KL(policy || reference)</h1>
<p class="meta">policy: {html.escape(policy_dir)}<br>reference: {html.escape(reference_dir)}<br>
greedy response of {len(kl)} tokens; KL summed over the response {total:.4f} nats,
mean {mean:.4f} per token. Hover a token for its numbers.</p>
<h3>prompt</h3><div class="response">{html.escape(prompt)}</div>
<h3>response</h3><div class="response">{"".join(spans)}</div>
<p class="meta">colour scale (nats): {legend}</p>
</body></html>
"""


def plot_kl(labels: list[str], kl: list[float], path: Path, title: str) -> Path:
    """Top: the response as coloured token boxes (wrapped); bottom: KL per position."""
    plt = pyplot()
    vmax = kl_scale(kl)
    colors = _colors(kl, vmax)
    width_in, char_in = 14.0, 0.095  # monospace 9pt is about 0.095 inch per character
    per_line = int(width_in * 0.96 / char_in)
    # Lay the tokens out in lines first so the figure can be as tall as the text.
    places, row, col = [], 0, 0  # (line, starting column) of each token
    for label in labels:
        if col + len(label) > per_line and col:
            row, col = row + 1, 0
        places.append((row, col))
        col += len(label) + 1
    text_h = 0.3 * (row + 1) + 0.4
    fig, (ax_text, ax_bar) = plt.subplots(
        2, 1, figsize=(width_in, text_h + 3.2), height_ratios=[text_h, 3.0]
    )
    ax_text.axis("off")
    for label, (line, column), color in zip(labels, places, colors):
        ax_text.text(
            column / per_line,
            1 - (line + 0.5) / (row + 1),
            label,
            family="monospace",
            fontsize=9,
            va="center",
            parse_math=False,
            bbox={"facecolor": color, "edgecolor": "none", "pad": 1.5},
        )
    ax_text.set_title(title, fontsize=10)
    positions = list(range(len(kl)))
    ax_bar.bar(positions, kl, color=colors, edgecolor="#888", linewidth=0.5)
    ax_bar.set_xticks(positions, [_tick(t) for t in labels], rotation=90, fontsize=7)
    ax_bar.set_xlim(-0.6, max(len(kl), 1) - 0.4)
    ax_bar.set_ylim(0, vmax * 1.05)
    ax_bar.set_ylabel("KL (nats)")
    ax_bar.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def kl_report(
    policy_dir: str,
    reference_dir: str,
    prompt: str,
    out: Path,
    max_new_tokens: int = 48,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Generate, measure, write <out>.html and <out>.png. Returns the numbers too."""
    device = device or pick_device(None)
    policy, tokenizer = load(policy_dir, device)
    reference, ref_tokenizer = load(reference_dir, device)
    if ref_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise UserError(
            f"{reference_dir}: its tokenizer differs from the policy's; KL needs the same vocabulary"
        )
    prompt_ids, response_ids = greedy_response(policy, tokenizer, prompt, max_new_tokens)
    if not response_ids:
        raise UserError("the policy generated nothing for this prompt")
    kl, log_ratio = (t.tolist() for t in token_kl(policy, reference, prompt_ids, response_ids))
    pieces = [tokenizer.decode([i]) for i in response_ids]
    html_path, png_path = out.with_suffix(".html"), out.with_suffix(".png")
    html_path.parent.mkdir(parents=True, exist_ok=True)
    page = kl_html(prompt, pieces, kl, log_ratio, policy_dir, reference_dir)
    html_path.write_text(page, encoding="utf-8")
    title = f"KL(policy || reference) per response token: {policy_dir} vs {reference_dir}"
    plot_kl(token_labels(tokenizer, response_ids), kl, png_path, title)
    return {"html": html_path, "png": png_path, "tokens": pieces, "kl": kl, "log_ratio": log_ratio}


# ------------------------------------------------------------------------------ entry point


def main(args: argparse.Namespace) -> int:
    quiet_loading_in_pipes()
    device = pick_device(args.device)
    if args.what == "attention":
        if not args.text:
            raise UserError("rlhf viz attention needs --text TEXT")
        model, tokenizer = load_eager(args.model_dir, device)
        weights, labels, layer, head = attention_matrix(
            model, tokenizer, args.text, args.layer, args.head
        )
        out = Path(args.out or f"attention_L{layer}_H{head}.png")
        if out.suffix.lower() != ".png":
            raise UserError(f"--out {out}: the attention map is a PNG (name it *.png)")
        print(f"attention: {plot_attention(weights, labels, layer, head, out)}")
        return 0
    if not args.reference or not args.prompt:
        raise UserError("rlhf viz kl needs --reference REF_DIR and --prompt TEXT")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    out = Path(args.out or "kl.html")
    result = kl_report(
        args.model_dir, args.reference, args.prompt, out, args.max_new_tokens, device
    )
    kl = result["kl"]
    print(f"kl: {len(kl)} tokens, total {sum(kl):.4f} nats, max {max(kl):.4f}")
    print(f"html: {result['html']}")
    print(f"png: {result['png']}")
    return 0
