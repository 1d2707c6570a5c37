"""Chat: the shared template, history fitted to the window, streaming, and `zenlm chat` over a pipe."""
import os
import subprocess
import sys

import pytest
import torch
from tiny_app_models import one_torch_thread, save_tiny, tiny_tokenizer  # noqa: F401 (autouse fixture)

from zenlm import load, load_tokenizer
from zenlm.data import encode_chat
from zenlm.generate import Generator
from zenlm.tasks.chat import ChatSession, fit_history, run_terminal


def exchanges(n):
    history = []
    for i in range(n):
        history += [{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": f"answer {i}."}]
    return history


def test_history_drops_oldest_turns_never_system_or_current():
    tok = tiny_tokenizer()
    history = exchanges(10)
    system, current = "Be kind.", "final question?"
    full_ids, _ = encode_chat(tok, [{"role": "system", "content": system}] + history +
                              [{"role": "user", "content": current}], add_generation_prompt=True)
    for budget in (len(full_ids), len(full_ids) - 1, 80, 50):
        messages, ids = fit_history(tok, history, current, budget, system)
        assert len(ids) <= budget
        assert messages[0] == {"role": "system", "content": system}
        assert messages[-1] == {"role": "user", "content": current}
        kept = messages[1:-1]
        # what is kept is the most recent exchanges, whole, in order
        assert kept == history[len(history) - len(kept):] and len(kept) % 2 == 0
        # and as many as fit: one more exchange would not
        if len(kept) < len(history):
            more = history[len(history) - len(kept) - 2:]
            longer, _ = encode_chat(tok, [messages[0]] + more + [messages[-1]], add_generation_prompt=True)
            assert len(longer) > budget
        # ids are the shared training template with the assistant prompt
        assert ids == encode_chat(tok, messages, add_generation_prompt=True)[0]
    assert fit_history(tok, history, current, len(full_ids), system)[0][1:-1] == history
    with pytest.raises(ValueError, match=r"system prompt and current message are \d+ tokens, more than the 10"):
        fit_history(tok, history, current, 10, system)


@pytest.mark.parametrize("family", ["decoder-only", "encoder-decoder"])
def test_session_streams_what_the_engine_generates(tmp_path, family):
    path = save_tiny(tmp_path / "m", family)
    model, tok = load(path), load_tokenizer(path)
    session = ChatSession(model, tok, system="Be brief.", max_new_tokens=12, options={"do_sample": False})
    _, ids = session.prompt("Hello")
    deltas = list(session.send("Hello"))
    end = tok.token_to_id("<|end|>")
    expected = Generator(model, tok).generate(ids, max_new_tokens=12, stop_token_ids=[end])[0].text
    assert "".join(deltas) == expected
    assert session.history == [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": expected.strip()}]
    session.reset()
    assert session.history == []


def test_terminal_loop_commands(tmp_path):
    path = save_tiny(tmp_path / "m", "decoder-only")
    session = ChatSession(load(path), load_tokenizer(path), max_new_tokens=4, options={"do_sample": False})
    lines = iter(["hi", "/system Answer in one word.", "again", "/reset", "/bogus", "/exit", "never read"])
    out = []
    run_terminal(session, input_fn=lambda prompt: next(lines), write=out.append)
    text = "".join(out)
    assert text.count("bot> ") == 2 and "(system prompt set)" in text and "(conversation reset)" in text
    assert "unknown command /bogus" in text
    assert session.system == "Answer in one word." and session.history == []


@pytest.mark.parametrize("family", ["decoder-only", "encoder-decoder"])
def test_zenlm_chat_over_a_pipe(tmp_path, family):
    path = save_tiny(tmp_path / "m", family)
    script = "hello there\n/system You are terse.\nand now?\n/reset\nbye\n/exit\n"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "zenlm.cli", "chat", str(path), "--max-new-tokens", "6",
                           "--seed", "0"], input=script, capture_output=True, text=True, timeout=120, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("bot> ") == 3
    assert "(system prompt set)" in proc.stdout and "(conversation reset)" in proc.stdout
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("family", ["decoder-only", "encoder-decoder"])
def test_chat_perplexity_matches_a_direct_computation(tmp_path, family):
    import json
    import math

    from zenlm.tasks.chat import chat_perplexity

    path = save_tiny(tmp_path / "m", family)
    model, tok = load(path), load_tokenizer(path)
    convs = [[{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello"},
              {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "How are you?"},
              {"role": "assistant", "content": "Fine, thanks."}],
             [{"role": "user", "content": "Two dogs?"}, {"role": "assistant", "content": "In the snow."}],
             [{"role": "user", "content": "x" * 200}, {"role": "assistant", "content": "too long for the window"}]]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    result = chat_perplexity(model, tok, data, batch_size=2)
    assert result["conversations"] == 2 and result["skipped"]["too_long"] == 1
    # direct: log-probabilities of the reply tokens, one conversation at a time, no padding
    nll, n = 0.0, 0
    with torch.no_grad():
        for conv in convs[:2]:
            ids, mask = encode_chat(tok, conv)
            if family == "decoder-only":
                logp = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
                for t in range(1, len(ids)):
                    if mask[t]:
                        nll -= float(logp[t - 1, ids[t]])
                        n += 1
            else:
                start = max(i for i, m in enumerate(mask) if m and not mask[i - 1])
                src, tgt = ids[:start], ids[start:]
                dec = [model.config.start_token_id] + tgt[:-1]
                logp = model(input_ids=torch.tensor([src]), decoder_input_ids=torch.tensor([dec])).logits[0].log_softmax(-1)
                nll -= sum(float(logp[i, t]) for i, t in enumerate(tgt))
                n += len(tgt)
    assert result["tokens"] == n
    assert result["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)


@pytest.mark.parametrize("family", ["decoder-only", "encoder-decoder"])
def test_inference_prompt_is_what_training_feeds(tmp_path, family):
    """The chat objective's batches (zenlm.data) and ChatSession build the same token layout."""
    import json

    from zenlm.data import DataConfig, load_datasets

    path = save_tiny(tmp_path / "m", family)
    model, tok = load(path), load_tokenizer(path)
    conv = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "How are you?"},
            {"role": "assistant", "content": "Fine."}]
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": conv}) + "\n")
    config = DataConfig(train=[str(data)], valid=[str(data)], format="chat", objective="chat", seq_len=96,
                        max_source_len=96, max_target_len=96, cache_dir=str(tmp_path / "cache"))
    batch = load_datasets(config, tok, family, seed=0, progress=False).valid.batch([0])
    session = ChatSession(model, tok, system="Be kind.", max_new_tokens=8)
    session.history = conv[1:3]
    _, prompt = session.prompt("How are you?")
    reply = tok.encode("Fine.<|end|>")
    if family == "encoder-decoder":  # source = conversation up to the reply, target = reply + <|end|>
        assert batch["input_ids"][0].tolist() == prompt
        assert batch["labels"][0].tolist() == reply
    else:  # one sequence; the inference prompt is its prefix, the reply is what carries loss
        ids = batch["input_ids"][0].tolist()
        assert ids == prompt + reply
        assert [t for t in batch["labels"][0].tolist()[len(prompt):]] == reply
