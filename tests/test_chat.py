"""Chat: the shared template, history fitted to the window, streaming, and `zenlm chat` over a pipe."""
import os
import subprocess
import sys

import pytest
import torch
from tiny_app_models import save_tiny, tiny_tokenizer

from zenlm import load, load_tokenizer
from zenlm.data import encode_chat
from zenlm.generation import Generator
from zenlm.tasks.chat import ChatSession, fit_history, run_terminal

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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


# --------------------------------------------------------------------------- a model's own chat template
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + "
          "m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
TEMPLATE_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
                   "<|end_of_text|>"]


def save_templated(directory, template=LLAMA3, family="decoder-only", generation_eos=None):
    """A tiny zenlm model whose tokenizer carries a Llama-3-style template and special tokens, saved as a
    folder: the template travels in chat_template.jinja and tokenizer_config.json."""
    import json

    from tokenizers import AddedToken

    from zenlm import TransformerConfig, TransformerLM
    from zenlm.checkpoint import save_pretrained

    tok = tiny_tokenizer()
    tok.backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TEMPLATE_TOKENS])
    tok.chat_template = template
    tok.special_tokens = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                               num_encoder_layers=2 if family == "encoder-decoder" else 0, num_decoder_layers=2,
                               max_position_embeddings=384, pad_token_id=tok.pad_id, bos_token_id=tok.bos_id,
                               eos_token_id=tok.eos_id)
    save_pretrained(TransformerLM(config).eval(), directory, tokenizer=tok)
    if generation_eos is not None:
        (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": generation_eos}))
    return directory


def test_session_uses_the_models_template_and_stops_on_its_end_tokens(tmp_path):
    path = save_templated(tmp_path / "m")
    model, tok = load(path), load_tokenizer(path)
    assert tok.has_chat_template and (path / "chat_template.jinja").read_text() == LLAMA3
    eot, eom = tok.token_to_id("<|eot_id|>"), tok.token_to_id("<|eom_id|>")
    session = ChatSession(model, tok, system="Be brief.", max_new_tokens=10, options={"do_sample": False})
    assert eot in session.stop_ids and tok.token_to_id("<|end_of_text|>") in session.stop_ids
    _, ids = session.prompt("Hello")
    text = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert ids == tok.encode(text) == tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        add_generation_prompt=True, return_dict=False)
    reply = session.reply("Hello")
    expected = Generator(model, tok).generate(ids, max_new_tokens=10, stop_token_ids=session.stop_ids)[0].text
    assert reply == expected.strip()
    assert session.history[-1] == {"role": "assistant", "content": reply}
    # the folder's generation_config eos list stops a reply: make the model's first greedy token one of them
    first = Generator(model, tok).generate(ids, max_new_tokens=1)[0].token_ids[0]
    stopped = save_templated(tmp_path / "s", generation_eos=[first, eom])
    session = ChatSession(load(stopped), load_tokenizer(stopped), system="Be brief.", max_new_tokens=10,
                          options={"do_sample": False})
    assert {first, eom, eot} <= set(session.stop_ids)
    assert session.reply("Hello") == ""
    # history is fitted by rendering whole conversations: newest exchanges kept, within the budget
    history = exchanges(12)
    for budget in (150, 100, 60):
        messages, ids = fit_history(tok, history, "last?", budget, "Be brief.")
        assert len(ids) <= budget and messages[0]["role"] == "system" and messages[-1]["content"] == "last?"
        kept = messages[1:-1]
        assert kept == history[len(history) - len(kept):] and len(kept) % 2 == 0
        if len(kept) < len(history):
            longer = [messages[0]] + history[len(history) - len(kept) - 2:] + [messages[-1]]
            assert len(encode_chat(tok, longer, add_generation_prompt=True)[0]) > budget


def test_a_template_refusing_the_conversation_is_a_value_error_in_the_session(tmp_path):
    template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
                + LLAMA3)
    path = save_templated(tmp_path / "m", template)
    session = ChatSession(load(path), load_tokenizer(path), system="Be brief.", max_new_tokens=4)
    with pytest.raises(ValueError, match="^System role not supported$"):
        session.reply("Hello")
    out = []
    session_lines = iter(["hi", "/system", "hi again", "/exit"])
    run_terminal(session, input_fn=lambda prompt: next(session_lines), write=out.append)
    text = "".join(out)
    assert "error: System role not supported" in text and text.count("bot> ") == 2


def test_llm_chat_and_rag_ask_format_through_the_template(tmp_path):
    from zenlm import LLM
    from zenlm.retrieval.index import Hit
    from zenlm.retrieval.rag import ask

    path = save_templated(tmp_path / "m")
    llm = LLM.load(path)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    session = ChatSession(llm.model, llm.tokenizer, system="Be brief.", max_new_tokens=6,
                          options={"do_sample": False}, history=messages[1:3])
    _, ids = session.prompt("Bye")
    assert ids == encode_chat(llm.tokenizer, messages, add_generation_prompt=True)[0]
    assert llm.chat(messages, max_new_tokens=6, do_sample=False) == session.reply("Bye")

    class Passages:
        def search(self, question, k=3, mode="hybrid"):
            return [Hit("d1", 1.0, "Volcanoes erupt magma."), Hit("d2", 0.5, "Dogs play in snow.")][:k]

    answer = ask(Passages(), llm.model, "What do volcanoes do?", k=2, tokenizer=llm.tokenizer, max_new_tokens=6,
                 do_sample=False)
    assert answer.prompt.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nAnswer the question")
    assert answer.prompt.endswith("Question: What do volcanoes do?<|eot_id|><|start_header_id|>assistant"
                                  "<|end_header_id|>\n\n")
    assert "[d1] Volcanoes erupt magma." in answer.prompt and answer.citations == ["d1", "d2"]
    assert len(llm.tokenizer.encode(answer.prompt)) <= 384 - 6
    # zenlm's own models keep the plain prompt
    own = save_tiny(tmp_path / "own", "decoder-only", window=384)
    plain = ask(Passages(), load(own), "What do volcanoes do?", k=2, tokenizer=load_tokenizer(own), max_new_tokens=4)
    assert plain.prompt.endswith("Answer:")
