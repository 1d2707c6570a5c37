"""Multi-turn chat over any generating model, with the same template training uses.

Every conversation is formatted by ``zenlm.data.encode_chat``, the function training uses, so
a model sees at inference exactly the layout it was trained on: the model's own chat template
when its tokenizer carries one (an imported Llama 3, Qwen, Gemma, Mistral, Phi ... folder;
rendered as transformers renders it), else zenlm's ``<|role|>content<|end|>`` template
(``zenlm.data.chat_segments``). A reply ends at any of ``tokenizer.stop_token_ids``
(``<|end|>`` for zenlm's template; ``<|eot_id|>``, ``<|im_end|>``, ``<end_of_turn>``, the
generation_config's eos list ... for a model's own).

Long conversations are fitted to the context window by dropping the oldest
exchanges first; the system prompt and the current user turn are never dropped
(if those two alone do not fit, that is an error naming both lengths).
Decoder-only models read the conversation as a prompt and continue it;
encoder-decoder models read it as the source (as the ``chat`` objective trains them)
and write the reply in the decoder.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from ..data import encode_chat
from ..tokenizer import ROLE_TOKENS, Tokenizer

END = ROLE_TOKENS[3]


def chat_prompt(tokenizer: Tokenizer, messages: Sequence[dict], tools: Sequence[dict] | None = None,
                **template_kwargs) -> list[int]:
    """The token ids a model answers: ``messages`` formatted with the model's chat template (or
    zenlm's) and the assistant prompt appended. What the server's /v1/chat/completions and any other
    front end should call; a template that refuses the conversation is a ValueError with its message."""
    return encode_chat(tokenizer, messages, add_generation_prompt=True, tools=tools, **template_kwargs)[0]


def stop_token_ids(tokenizer: Tokenizer, model=None) -> list[int]:
    """Every token a chat reply ends on (``tokenizer.stop_token_ids``), and the model config's eos ids."""
    ids = list(tokenizer.stop_token_ids)
    eos = getattr(getattr(model, "config", None), "eos_token_id", None)
    for i in ([eos] if isinstance(eos, int) else list(eos or [])):
        if i not in ids:
            ids.append(i)
    return ids


def _exchanges(history: Sequence[dict]) -> list[list[dict]]:
    """Group past messages into exchanges, each starting at a user message, so that dropping
    one never leaves an assistant reply without its question."""
    groups: list[list[dict]] = []
    for message in history:
        if message["role"] == "user" or not groups:
            groups.append([message])
        else:
            groups[-1].append(message)
    return groups


def fit_history(tokenizer: Tokenizer, history: Sequence[dict], current: str, max_tokens: int,
                system: str | None = None, tools: Sequence[dict] | None = None, **template_kwargs
                ) -> tuple[list[dict], list[int]]:
    """The messages to send (system, as many recent exchanges as fit, the current user turn)
    and their token ids with the assistant prompt appended, within ``max_tokens``.

    Oldest exchanges go first; the system prompt and current turn are always kept."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    head = [{"role": "system", "content": system}] if system else []
    tail = [{"role": "user", "content": current}]
    ids = chat_prompt(tokenizer, head + tail, tools, **template_kwargs)
    if len(ids) > max_tokens:
        raise ValueError(f"the system prompt and current message are {len(ids)} tokens, more than the "
                         f"{max_tokens} tokens the context window leaves for the conversation")
    groups = [g for g in _exchanges([m for m in history if m["role"] != "system"])]
    if tokenizer.has_chat_template:
        # a model's template is not a concatenation of turns (headers, defaults, tools in the first
        # message): render candidates whole, keeping the most recent exchanges that fit (binary search)
        def render(kept: int) -> tuple[list[dict], list[int]]:
            messages = head + [m for g in groups[len(groups) - kept:] for m in g] + tail
            return messages, chat_prompt(tokenizer, messages, tools, **template_kwargs)

        low, high = 0, len(groups)
        best = (head + tail, ids)
        while low <= high:
            mid = (low + high) // 2
            candidate = render(mid)
            if len(candidate[1]) <= max_tokens:
                best, low = candidate, mid + 1
            else:
                high = mid - 1
        return best
    # token cost of each exchange, measured in context (the template is a plain concatenation)
    costs = [len(encode_chat(tokenizer, g)[0]) for g in groups]
    budget, kept = max_tokens - len(ids), 0
    for cost in reversed(costs):
        if cost > budget:
            break
        budget -= cost
        kept += 1
    messages = head + [m for g in groups[len(groups) - kept:] for m in g] + tail
    ids, _ = encode_chat(tokenizer, messages, add_generation_prompt=True)
    return messages, ids


@dataclass
class ChatSession:
    """A conversation with a model: history, an optional system prompt and generation settings.
    ``send`` streams the reply and records it in the history."""

    model: object
    tokenizer: Tokenizer
    system: str | None = None
    max_new_tokens: int = 128
    options: dict = field(default_factory=dict)  # GenerationConfig options (temperature, top_p, seed, ...)
    history: list = field(default_factory=list)
    tools: list | None = None  # JSON schemas for a template that offers tools
    template_kwargs: dict = field(default_factory=dict)  # further template variables (enable_thinking=False, ...)

    def __post_init__(self) -> None:
        from ..generation import Generator

        self.generator = Generator(self.model, self.tokenizer)
        if self.tokenizer.has_chat_template:  # the model's own template: stop on every end token it names
            self.stop_ids = stop_token_ids(self.tokenizer, self.model)
            self.end_id = self.stop_ids[0] if self.stop_ids else None
        else:
            end = self.tokenizer.token_to_id(END)
            if end is None:
                raise ValueError(f"the tokenizer has no {END} token and no chat template; chat needs the role "
                                 f"tokens {', '.join(ROLE_TOKENS)} or a model's chat template")
            self.end_id, self.stop_ids = end, [end]
        config = self.model.config
        window = config.max_position_embeddings
        if config.is_encoder_decoder:
            if self.max_new_tokens + 1 > window:
                raise ValueError(f"max_new_tokens={self.max_new_tokens} (+1 start token) exceeds the decoder's "
                                 f"context window of {window} positions")
            self.prompt_budget = window
        else:
            self.prompt_budget = window - self.max_new_tokens
            if self.prompt_budget < 1:
                raise ValueError(f"max_new_tokens={self.max_new_tokens} leaves no room for the conversation in "
                                 f"the context window of {window} positions")

    def reset(self) -> None:
        self.history.clear()

    def set_system(self, text: str | None) -> None:
        self.system = text or None

    def prompt(self, text: str) -> tuple[list[dict], list[int]]:
        return fit_history(self.tokenizer, self.history, text, self.prompt_budget, self.system, self.tools,
                           **self.template_kwargs)

    def send(self, text: str) -> Iterator[str]:
        """Stream the reply to ``text`` as text deltas; the full reply joins the history at the end."""
        if not text.strip():
            raise ValueError("message is empty")
        _, ids = self.prompt(text)
        options = dict(self.options)
        stop = list(options.pop("stop_token_ids", ())) + self.stop_ids
        parts = []
        for delta in self.generator.stream(ids, max_new_tokens=self.max_new_tokens, stop_token_ids=stop, **options):
            parts.append(delta)
            yield delta
        reply = "".join(parts).strip()
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]

    def reply(self, text: str) -> str:
        return "".join(self.send(text))


def chat_perplexity(model, tokenizer: Tokenizer, path, batch_size: int = 16) -> dict:
    """Perplexity of the assistant replies of a chat JSONL file (token-weighted, the loss the
    ``chat`` objective trains). Decoder-only models are scored on every reply in context;
    encoder-decoder models on the last reply given the conversation before it, as they train.
    Conversations longer than the context window are skipped and counted, never cut. Its length
    is the two ways of scoring (decoder-only, encoder-decoder) side by side, so they stay comparable."""
    import json
    import math
    from pathlib import Path

    import torch

    from ..model import IGNORE_INDEX

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    config, window = model.config, model.config.max_position_embeddings
    rows, skipped = [], {"too_long": 0, "no_reply": 0}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            messages = json.loads(line)["messages"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path} line {n + 1} is not a JSON object with 'messages'") from None
        ids, mask = encode_chat(tokenizer, messages)
        if not any(mask):
            skipped["no_reply"] += 1
            continue
        if config.is_encoder_decoder:
            last = max(i for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1]))
            source, target = ids[:last], ids[last:len(mask) - mask[::-1].index(1)]
            if len(source) > window or len(target) > window:
                skipped["too_long"] += 1
                continue
            rows.append((source, target))
        else:
            if len(ids) > window:
                skipped["too_long"] += 1
                continue
            rows.append((ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]))
    if not rows:
        raise ValueError(f"{path}: no conversation with an assistant reply fits the context window of {window}")
    pad = config.pad_token_id
    total, count = 0.0, 0
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            width_a = max(len(a) for a, _ in chunk)
            width_b = max(len(b) for _, b in chunk)
            ids = torch.tensor([a + [pad] * (width_a - len(a)) for a, _ in chunk])
            attn = torch.tensor([[1] * len(a) + [0] * (width_a - len(a)) for a, _ in chunk])
            if config.is_encoder_decoder:
                labels = torch.tensor([b + [IGNORE_INDEX] * (width_b - len(b)) for _, b in chunk])
            else:
                labels = torch.tensor([b + [IGNORE_INDEX] * (width_a - len(b)) for _, b in chunk])
            loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
            scored = int((labels[:, 1:] if not config.is_encoder_decoder else labels).ne(IGNORE_INDEX).sum())
            total += float(loss) * scored
            count += scored
    mean = total / count
    return {"loss": mean, "perplexity": math.exp(mean), "conversations": len(rows), "tokens": count,
            "skipped": skipped}


HELP = "commands: /reset (forget the conversation), /system TEXT (set the system prompt), /exit"


def run_terminal(session: ChatSession, input_fn=input, write=None) -> None:
    """The interactive loop behind ``zenlm chat``: read a line, stream the reply, handle
    /reset, /system TEXT and /exit. End of input (Ctrl-D, or a closed pipe) also exits."""
    import sys

    write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    write(f"chatting with a {session.model.config.family} model; {HELP}\n")
    while True:
        try:
            line = input_fn("you> ")
        except EOFError:
            write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            session.reset()
            write("(conversation reset)\n")
            continue
        if text == "/system" or text.startswith("/system "):
            session.set_system(text[len("/system"):].strip())
            write(f"(system prompt {'set' if session.system else 'cleared'})\n")
            continue
        if text.startswith("/"):
            write(f"unknown command {text.split()[0]}; {HELP}\n")
            continue
        try:
            write("bot> ")
            for delta in session.send(text):
                write(delta)
            write("\n")
        except ValueError as e:  # e.g. a message longer than the context window: say so, keep going
            write(f"\nerror: {e}\n")


__all__ = ["END", "ChatSession", "chat_perplexity", "chat_prompt", "fit_history", "run_terminal", "stop_token_ids"]
