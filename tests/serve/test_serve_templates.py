"""`zenlm serve FOLDER` for an imported instruct model: its own chat template, its stop tokens.

Tiny random Llama folders written the way transformers writes them (LlamaConfig, hidden 64, two
layers; a byte-level BPE tokenizer.json with Llama 3's special tokens and its BOS post-processor;
tokenizer_config.json carrying the chat template from ../shared/data/chat-templates/;
generation_config.json with an eos list), served, and called with the official ``openai`` client:
the prompt the engine receives is transformers' ``apply_chat_template(..., tokenize=True,
add_generation_prompt=True)`` for the same messages, the greedy reply is what zenlm's Generator
writes from those ids, a reply ends on the template's end-of-turn token and on every id of
generation_config's eos list, and a template that refuses a conversation is a 400 with its message.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
transformers = pytest.importorskip("transformers")
openai = pytest.importorskip("openai")

from .conftest import free_port, spawn_server, start_server  # noqa: E402

TEMPLATES = Path(__file__).resolve().parents[3] / "shared" / "data" / "chat-templates"
if not (TEMPLATES / "llama-3-instruct.jinja").is_file():
    pytest.skip(f"no chat templates in {TEMPLATES}", allow_module_level=True)

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CORPUS = ["The quick brown fox jumps over the lazy dog.", "system user assistant ipython tool",
          "What is the weather in Paris today? It is sunny, 21 degrees.", '{"name": "get_weather", "city": 1}',
          "Cutting Knowledge Date: December 2023 Today Date: 26 Jul 2024 Environment"] * 20
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": "Sunny."},
        {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "text", "text": "tomorrow?"}]}]


def _joined(messages: list[dict]) -> list[dict]:
    """The messages with list content joined: what a template that reads strings is given."""
    return [{**m, "content": "".join(p["text"] for p in m["content"])} if isinstance(m.get("content"), list) else m
            for m in messages]


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=384, special_tokens=SPECIALS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    # Llama 3's tokenizer.json adds <|begin_of_text|> itself; the template writes it too (transformers
    # tokenizes a rendered chat without special tokens, so there is one)
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 0)])
    return tok


def write_instruct_folder(folder: Path, template: str, eos_token: str = "<|eot_id|>", eos_ids=None,
                          lm_head_rows: dict | None = None, seed: int = 0) -> Path:
    """A Llama 3 instruct-shaped folder: random weights (``lm_head_rows`` {row: source row} copies
    output rows to steer the greedy choice), tokenizer.json, tokenizer_config.json with ``template``
    and ``eos_token``, generation_config.json with ``eos_ids`` (default: end_of_text and eot_id)."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = _tokenizer()
    ids = {t: tok.token_to_id(t) for t in SPECIALS}
    eos_ids = [ids["<|end_of_text|>"], ids["<|eot_id|>"]] if eos_ids is None else eos_ids
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=ids["<|begin_of_text|>"], eos_token_id=eos_ids, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for row, source in (lm_head_rows or {}).items():
            model.lm_head.weight[row] = 2 * model.lm_head.weight[source]
    model.save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token=eos_token).save_pretrained(
        folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)  # the template lives in tokenizer_config.json
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = template
    cfg_path.write_text(json.dumps(cfg, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": ids["<|begin_of_text|>"], "eos_token_id": eos_ids}))
    return folder


def hf_ids(folder: Path, messages: list[dict], **kwargs) -> list[int]:
    """transformers' own prompt ids for ``messages`` with the folder's template."""
    from transformers import AutoTokenizer

    out = AutoTokenizer.from_pretrained(folder).apply_chat_template(messages, tokenize=True,
                                                                    add_generation_prompt=True, **kwargs)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def zenlm_greedy(folder: Path, ids: list[int], max_new_tokens: int) -> tuple[list[int], str]:
    """zenlm's Generator (not the server) from ``ids``, stopping where the server stops."""
    from zenlm import Generator, load, load_tokenizer
    from zenlm.tasks.chat import stop_token_ids

    model, tokenizer = load(folder).eval(), load_tokenizer(folder)
    out = Generator(model, tokenizer).generate([ids], max_new_tokens=max_new_tokens, do_sample=False,
                                               stop_token_ids=stop_token_ids(tokenizer, model))
    return out.token_ids[0], out.texts[0]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("instruct")
    llama3 = (TEMPLATES / "llama-3-instruct.jinja").read_text()
    tools = (TEMPLATES / "vllm-tool-llama3.1-json.jinja").read_text()
    out = {"llama3": write_instruct_folder(root / "llama3", llama3),
           "llama31-tools": write_instruct_folder(root / "llama31-tools", tools)}
    # the model's first greedy token on CHAT, to steer the stop-token folders
    first = zenlm_greedy(out["llama3"], hf_ids(out["llama3"], _joined(CHAT)), 1)[0][0]
    ids = {t: _tokenizer().token_to_id(t) for t in SPECIALS}
    assert first not in ids.values()
    # generation_config's eos list names the first greedy token: the reply stops at once
    out["llama3-eos"] = write_instruct_folder(root / "llama3-eos", llama3,
                                              eos_ids=[ids["<|end_of_text|>"], ids["<|eot_id|>"], first])
    # eos is <|end_of_text|> everywhere; only the template names <|eot_id|>, which the model now
    # prefers (its output row is twice the greedy token's)
    out["llama3-eot"] = write_instruct_folder(root / "llama3-eot", llama3, eos_token="<|end_of_text|>",
                                              eos_ids=ids["<|end_of_text|>"], lm_head_rows={ids["<|eot_id|>"]: first})
    out["first"] = first
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory, folders):
    r = start_server(tmp_path_factory.mktemp("server"),
                     [folders[k] for k in ("llama3", "llama31-tools", "llama3-eos", "llama3-eot")])
    prompts: list[tuple[str, list[int]]] = []  # (model, prompt ids) of every sequence the engines were given
    for name, model in r.app.app.state.server.catalog.models.items():
        submit = model.engine.submit_all

        def record(requests, owner=None, _submit=submit, _name=name):
            prompts.extend((_name, list(q.prompt_ids)) for q in requests)
            return _submit(requests, owner=owner)

        model.engine.submit_all = record
    r.prompts = prompts
    yield r
    r.stop()


def test_the_engine_gets_transformers_prompt_and_the_reply_is_zenlms_greedy_text(served, folders):
    client = served.client(served.key())
    served.prompts.clear()
    reply = client.chat.completions.create(model="llama3", messages=CHAT, max_tokens=12, temperature=0)
    expected = hf_ids(folders["llama3"], _joined(CHAT))  # llama-3's template reads strings: parts are joined
    assert expected.count(0) == 1  # one <|begin_of_text|>: the template's, none added by the tokenizer
    assert served.prompts == [("llama3", expected)]
    assert reply.usage.prompt_tokens == len(expected)
    tokens, text = zenlm_greedy(folders["llama3"], expected, 12)
    assert reply.choices[0].message.content == text
    assert reply.usage.completion_tokens == len(tokens)
    assert reply.choices[0].finish_reason == ("stop" if len(tokens) < 12 else "length")


def test_developer_is_system_and_a_stream_gets_the_same_prompt(served, folders):
    client = served.client(served.key())
    served.prompts.clear()
    messages = [{"role": "developer", "content": "You are terse."}, *CHAT[1:]]
    stream = client.chat.completions.create(model="llama3", messages=messages, max_tokens=4, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert served.prompts == [("llama3", hf_ids(folders["llama3"], _joined(CHAT)))]
    assert chunks[-1].usage.prompt_tokens == len(served.prompts[0][1])


def test_tool_calls_tool_results_names_and_parts_reach_the_template(served, folders):
    """The Llama 3.1 JSON tool template reads content parts, an assistant's tool call (its arguments
    as an object, from the JSON text the client sends) and the tool's result."""
    client = served.client(served.key())
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [{"role": "system", "content": "You are terse.", "name": "ops"},
                {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris?"}]},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 degrees"}]
    served.prompts.clear()
    reply = client.chat.completions.create(model="llama31-tools", messages=messages, max_tokens=3, temperature=0)
    hf_messages = [dict(m) for m in messages]
    hf_messages[2] = {"role": "assistant", "tool_calls": [
        {**call, "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    expected = hf_ids(folders["llama31-tools"], hf_messages)
    assert served.prompts == [("llama31-tools", expected)]
    assert reply.usage.prompt_tokens == len(expected)
    text = served.app.app.state.server.catalog.get("llama31-tools").tokenizer.decode(expected, False)
    assert '{"name": "get_weather", "parameters": {"city": "Paris"}}' in text  # not the arguments' text re-quoted
    assert '{"output": "sunny, 21 degrees"}' in text
    assert "Weather inParis?" in text  # the template trims each part: it was given the list, not one string


def test_every_eos_id_of_generation_config_ends_the_reply(served, folders):
    client = served.client(served.key())
    reply = client.chat.completions.create(model="llama3-eos", messages=CHAT, max_tokens=8, temperature=0)
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == 1  # the stop token was computed (and billed), nothing after it
    # the library's Generator stops at the same token and writes the same text (a special token, as real
    # eos tokens are, would be skipped; this ordinary one is shown, as zenlm.generate shows it)
    tokens, text = zenlm_greedy(folders["llama3-eos"], hf_ids(folders["llama3-eos"], _joined(CHAT)), 8)
    assert tokens == [folders["first"]] and reply.choices[0].message.content == text
    stops = served.app.app.state.server.catalog.get("llama3-eos").stop_token_ids
    assert folders["first"] in stops


def test_the_templates_end_of_turn_token_ends_the_reply(served, folders):
    """eos is <|end_of_text|> in every config; <|eot_id|> comes from the template alone."""
    eot = _tokenizer().token_to_id("<|eot_id|>")
    catalog = served.app.app.state.server.catalog
    assert eot in catalog.get("llama3-eot").stop_token_ids
    assert eot in catalog.get("llama3").stop_token_ids
    client = served.client(served.key())
    for stream in (False, True):
        if stream:
            chunks = list(client.chat.completions.create(model="llama3-eot", messages=CHAT, max_tokens=8,
                                                         temperature=0, stream=True))
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert finish == ["stop"] and text == ""
        else:
            reply = client.chat.completions.create(model="llama3-eot", messages=CHAT, max_tokens=8, temperature=0)
            assert reply.choices[0].finish_reason == "stop"
            assert reply.choices[0].message.content == ""
            assert reply.usage.completion_tokens == 1


def test_a_template_that_refuses_is_a_400_with_its_message(served):
    client = served.client(served.key())
    for model, messages in (("llama3", [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]),
                            ("llama31-tools", [{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [
                                {"id": f"c{i}", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                                for i in range(2)]}])):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=model, messages=messages, max_tokens=2)
        error = info.value.body
        assert info.value.status_code == 400 and error["type"] == "invalid_request_error"
        assert error["param"] == "messages"
        assert ("Conversation roles must alternate" if model == "llama3"
                else "only supports single tool-calls") in error["message"]


def test_tool_messages_without_a_template_and_malformed_ones_are_400s(running):
    """zenlm's own <|role|> template has no place for tools; the wire checks the fields of each role."""
    client = running.client(running.key())
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    cases = [([{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "c1", "content": "4"}], "no place for tool calls"),
             ([{"role": "user"}], "needs content"),
             ([{"role": "tool", "content": "4"}], "tool_call_id"),
             ([{"role": "user", "content": "a", "tool_calls": [call]}], "belong to assistant messages")]
    for messages, words in cases:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
        assert words in info.value.body["message"], info.value.body


def test_zenlm_serve_cli_serves_the_folder_with_its_template(tmp_path, folders):
    """`zenlm serve FOLDER` as its own process, through the official client."""
    from zenlm.serve.billing import Billing

    db, port = str(tmp_path / "cli.sqlite3"), free_port()
    billing = Billing.open(db)
    billing.create_plan("basic", {"*": (1_000_000, 2_000_000)}, monthly_budget_micros=10 ** 9)
    key = billing.create_key("acme", "basic")[0]
    proc = spawn_server(folders["llama3"], db, port)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=60)
        reply = client.chat.completions.create(model="llama3", messages=CHAT, max_tokens=6, temperature=0)
        expected = hf_ids(folders["llama3"], _joined(CHAT))
        assert reply.usage.prompt_tokens == len(expected)
        assert reply.choices[0].message.content == zenlm_greedy(folders["llama3"], expected, 6)[1]
        with pytest.raises(openai.BadRequestError, match="Conversation roles must alternate"):
            client.chat.completions.create(model="llama3", messages=CHAT[:2] + CHAT[1:2], max_tokens=2)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
