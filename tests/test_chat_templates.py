"""Chat templates of open models rendered by zenlm exactly as transformers renders them.

Every template in ../shared/data/chat-templates/ (Llama 2/3/3.1 with tools, Qwen2.5, Gemma,
Mistral with and without tools, Phi-3, Zephyr, ChatML, Hermes) over a suite of conversations:
with and without a system message, multi-turn, content as a list of parts, tools, assistant
tool calls, tool results, add_generation_prompt on and off. Where transformers' rendering
raises, zenlm's is a ValueError with the template's message. Then: reading templates from a
folder as transformers does (tokenizer_config.json, chat_template.jinja, named templates),
tokenized results, the ``{% generation %}`` mask, the loss mask found by rendering for every
template, and the stop tokens.
"""
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from zenlm import load_tokenizer  # noqa: E402
from zenlm.data import encode_chat  # noqa: E402
from zenlm.tokenizer import ChatTemplateError, Tokenizer, chat_spans  # noqa: E402

transformers = pytest.importorskip("transformers")
import jinja2  # noqa: E402

TEMPLATES_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "chat-templates"
TEMPLATES = sorted(TEMPLATES_DIR.glob("*.jinja"))
if not TEMPLATES:  # the shared data is part of the task's checkout
    pytest.skip(f"no chat templates in {TEMPLATES_DIR}", allow_module_level=True)

# the named special tokens each family's tokenizer_config.json gives its template
SPECIALS = {
    "chatml": {"bos_token": "<s>", "eos_token": "<|im_end|>", "unk_token": "<unk>"},
    "gemma-it": {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"},
    "llama-2-chat": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "llama-3-instruct": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "mistral-instruct": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "phi-3": {"bos_token": "<s>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
    "qwen2.5-instruct": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    "vllm-tool-hermes": {"bos_token": "<|begin_of_text|>", "eos_token": "<|im_end|>"},
    "vllm-tool-llama3.1-json": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "vllm-tool-mistral": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "zephyr": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
}
# the token each template ends an assistant turn with: what generation must stop on
END_OF_TURN = {"chatml": "<|im_end|>", "gemma-it": "<end_of_turn>", "llama-2-chat": "</s>",
               "llama-3-instruct": "<|eot_id|>", "mistral-instruct": "</s>", "phi-3": "<|end|>",
               "qwen2.5-instruct": "<|im_end|>", "vllm-tool-hermes": "<|im_end|>",
               "vllm-tool-llama3.1-json": "<|eot_id|>", "vllm-tool-mistral": "</s>", "zephyr": "</s>"}
ADDED = sorted({t for s in SPECIALS.values() for t in s.values()} | set(END_OF_TURN.values()) | {
    "<|im_start|>", "<|start_header_id|>", "<|end_header_id|>", "<start_of_turn>", "<|user|>", "<|assistant|>",
    "<|system|>", "<|eom_id|>", "<|end_of_text|>", "<pad>"})

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "The city, e.g. Zürich"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Temperature unit"},
        "days": {"type": ["integer", "null"], "description": "Days ahead"},
        "hours": {"type": "array", "items": {"type": "integer"}, "description": "Hours of the day"},
        "extra": {"type": "object", "additionalProperties": {"type": "number"}, "description": "Anything else"}},
        "required": ["city"]},
    "return": {"type": "string", "description": "A sentence about the weather"}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "description": "Search the web & return <b>snippets</b>.",
    "parameters": {"type": "object", "properties": {"query": {"type": "number", "description": "What to find"}},
                   "required": ["query"]}}}
TOOLS = [WEATHER, SEARCH]
CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Zürich", "unit": "celsius"}}}
CALL_STR = {"id": "call_2", "type": "function", "function": {"name": "search", "arguments": '{"query": 3.5}'}}


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


SYSTEM = {"role": "system", "content": "  You are terse. Answer in English.  "}
PARTS = {"role": "user", "content": [{"type": "text", "text": "What is in "}, {"type": "text", "text": "this picture?"},
                                     {"type": "image", "url": "https://example.com/cat.png"}]}
# (name, messages, tools, extra template variables)
SUITE = [
    ("one user turn", [u("Hello there!")], None, {}),
    ("system + user", [SYSTEM, u("Hi")], None, {}),
    ("multi-turn", [u("Hi"), a("Hello! How can I help?"), u("Tell me a joke."), a("No."), u("Why?")], None, {}),
    ("system + multi-turn", [SYSTEM, u("Hi"), a("Hello."), u("Bye")], None, {}),
    ("ends with the assistant", [SYSTEM, u("2+2?"), a(" 4 "), u("and 3+3?"), a("6")], None, {}),
    ("unicode and braces", [u("床前明月光 🎉 {{ not jinja }} {% raw %}"), a("好的 <b>bold</b> \"quoted\"")], None, {}),
    ("content as parts", [PARTS], None, {}),
    ("system as parts", [{"role": "system", "content": [{"type": "text", "text": " Be kind. "}]}, u("Hi")], None, {}),
    ("parts in every turn", [PARTS, {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
                             {"role": "user", "content": [{"type": "text", "text": "Sure?"}]}], None, {}),
    ("tools offered", [u("Weather in Zürich?")], TOOLS, {}),
    ("tools with system", [SYSTEM, u("Weather in Zürich?")], TOOLS, {}),
    ("tool call and result", [u("Weather in Zürich?"), {"role": "assistant", "content": None, "tool_calls": [CALL]},
                              {"role": "tool", "name": "get_weather", "tool_call_id": "call_1", "content": "21 C, sunny"},
                              a("It is 21 C and sunny.")], TOOLS, {}),
    ("tool call, string arguments", [SYSTEM, u("Find 3.5"), {"role": "assistant", "content": "",
                                                             "tool_calls": [CALL_STR]},
                                     {"role": "tool", "name": "search", "content": '{"hits": ["a", "b"]}'}], TOOLS, {}),
    ("two tool calls", [u("Both?"), {"role": "assistant", "content": "Calling both.", "tool_calls": [CALL, CALL_STR]},
                        {"role": "tool", "name": "get_weather", "content": "21 C"},
                        {"role": "tool", "name": "search", "content": "nothing"}], TOOLS, {}),
    ("tool result without a name", [u("x?"), {"role": "assistant", "tool_calls": [CALL]},
                                    {"role": "tool", "content": "21 C"}], TOOLS, {}),
    ("ipython result, tool call without tools", [u("x?"), {"role": "assistant", "tool_calls": [CALL]},
                                                 {"role": "ipython", "content": "21"}], None, {}),
    ("reasoning and a date", [u("Think."), {"role": "assistant", "content": "Done.", "reasoning_content": "hmm"},
                              u("Again")], None, {"date_string": "26 Jul 2024", "enable_thinking": False}),
    ("llama 3.1 tools in the system prompt", [SYSTEM, u("Weather?")], TOOLS, {"tools_in_user_message": False}),
    ("roles do not alternate", [u("one"), u("two")], None, {}),
    ("starts with the assistant", [a("I speak first."), u("ok")], None, {}),
    ("empty tool list", [u("Hi")], [], {}),
    # Hermes' type mapper recurses without end on TOOLS' ["integer", "null"]: the same turns with a plain tool
    ("plain tool: call and result", [SYSTEM, u("Find 3.5"), {"role": "assistant", "content": None,
                                                             "tool_calls": [CALL_STR]},
                                     {"role": "tool", "name": "search", "content": "3.5 found"}, a("Found it.")],
     [SEARCH], {}),
    ("plain tool: result without a name", [u("x?"), {"role": "assistant", "tool_calls": [CALL_STR]},
                                           {"role": "tool", "content": "21 C"}], [SEARCH], {}),
]


def byte_level_tokenizer():
    """A small byte-level BPE (any text encodes) with every family's special tokens added."""
    from tokenizers import AddedToken

    texts = ["Hello there! How can I help? The weather in Zürich is 21 C and sunny.", "床前明月光 🎉 <b>bold</b>",
             '{"name": "get_weather", "arguments": {"city": "Zürich"}}'] * 20
    tok = Tokenizer.train(texts, vocab_size=400, kind="bpe")
    tok.backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ADDED])
    return tok


@pytest.fixture(scope="module")
def backend():
    return byte_level_tokenizer().backend


def hf_tokenizer(backend, specials, **kwargs):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials, **kwargs)


def outcome(fn):
    """("ok", value) or ("error", message-or-None): a template's raise_exception message is kept."""
    try:
        return "ok", fn()
    except jinja2.TemplateError as e:  # transformers lets the template's own exception through
        return "error", e.message
    except ChatTemplateError as e:
        return "error", str(e)
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, RecursionError) as e:
        return "error", None if not isinstance(e, ValueError) else str(e)


@pytest.mark.parametrize("path", TEMPLATES, ids=[p.stem for p in TEMPLATES])
def test_every_template_renders_every_conversation_as_transformers_does(path, backend):
    template = path.read_text(encoding="utf-8")
    specials = SPECIALS[path.stem]
    hf = hf_tokenizer(backend, specials)
    zen = Tokenizer(backend, chat_template=template, special_tokens=specials)
    rendered = raised = 0
    for name, messages, tools, extra in SUITE:
        for prompt in (False, True):
            def theirs():
                return hf.apply_chat_template(messages, tools=tools, chat_template=template, tokenize=False,
                                              add_generation_prompt=prompt, **extra)

            def ours():
                return zen.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=prompt,
                                               **extra)

            expected, got = outcome(theirs), outcome(ours)
            if expected != got and "strftime_now" in template:  # the date turned over between the two renders
                expected, got = outcome(theirs), outcome(ours)
            where = f"{path.stem} / {name} / add_generation_prompt={prompt}"
            if expected[0] == "ok":
                assert got == expected, where
                rendered += 1
            else:  # transformers raised: so do we, a ValueError carrying the template's message
                assert got[0] == "error", f"{where}: transformers raised {expected[1]!r}, zenlm rendered {got[1]!r}"
                with pytest.raises(ValueError):
                    ours()
                if expected[1] is not None:
                    assert got[1] == expected[1], where
                raised += 1
    assert rendered + raised == 2 * len(SUITE)
    assert rendered >= 16, f"{path.stem}: only {rendered} of {2 * len(SUITE)} renders succeeded"
    # the tokenized forms equal transformers' as well (transformers 5: a dict unless return_dict=False)
    messages = [SYSTEM, u("Hi"), a("Hello."), u("Bye")] if "gemma" not in path.stem else [u("Hi"), a("Hello."), u("Bye")]
    ok, text = outcome(lambda: hf.apply_chat_template(messages, chat_template=template, tokenize=False))
    if ok == "ok":
        theirs = hf.apply_chat_template(messages, chat_template=template, add_generation_prompt=True)
        assert zen.apply_chat_template(messages, add_generation_prompt=True) == dict(theirs)
        assert zen.apply_chat_template(messages, return_dict=False) == \
            hf.apply_chat_template(messages, chat_template=template, return_dict=False)


def test_a_templates_own_exception_is_a_value_error_with_its_message(backend):
    template = (TEMPLATES_DIR / "gemma-it.jinja").read_text()
    zen = Tokenizer(backend, chat_template=template, special_tokens=SPECIALS["gemma-it"])
    with pytest.raises(ValueError, match=r"^Conversation roles must alternate user/assistant/user/assistant/\.\.\.$"):
        zen.apply_chat_template([u("one"), u("two")], tokenize=False)
    strict = Tokenizer(backend, chat_template="{% if messages[0].role == 'system' %}"
                       "{{ raise_exception('System role not supported') }}{% endif %}{{ messages[0].content }}")
    with pytest.raises(ChatTemplateError, match="^System role not supported$"):
        strict.apply_chat_template([SYSTEM, u("x")], tokenize=False)
    with pytest.raises(ValueError, match="not valid Jinja"):
        Tokenizer(backend, chat_template="{% for %}").apply_chat_template([u("x")], tokenize=False)
    # the sandbox: no way out through attributes
    escape = Tokenizer(backend, chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(ValueError):
        escape.apply_chat_template([u("x")], tokenize=False)
    with pytest.raises(ValueError):
        Tokenizer(backend, chat_template="{% set ns = namespace(_x=1) %}").apply_chat_template([u("x")], tokenize=False)


def test_sandbox_features_match_transformers(backend):
    """tojson (indent, ensure_ascii, sort_keys, separators), loop controls, namespace, dict, strftime_now,
    a template's {% generation %} blocks, batches, continue_final_message."""
    template = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
                "{% set ns.n = ns.n + 1 %}{{ m | tojson }}|{{ m | tojson(indent=2, sort_keys=True) }}|"
                "{{ m | tojson(ensure_ascii=True, separators=(',', ':')) }}{% if loop.index > 3 %}{% break %}{% endif %}"
                "{% endfor %}{{ ns.n }} {{ dict(a=1) | tojson }} {{ strftime_now('%Y') }} {{ bos_token }}{{ eos_token }}"
                "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}"
                "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    specials = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    hf, zen = hf_tokenizer(backend, specials), Tokenizer(backend, chat_template=template, special_tokens=specials)
    chats = [[SYSTEM, u("<b>é</b>"), a("ok & done"), u("x"), a("y"), u("z")], [u("solo"), a("reply")]]
    for chat in chats:
        assert zen.apply_chat_template(chat, tokenize=False) == \
            hf.apply_chat_template(chat, chat_template=template, tokenize=False)
    assert zen.apply_chat_template(chats, tokenize=False, add_generation_prompt=True) == \
        hf.apply_chat_template(chats, chat_template=template, tokenize=False, add_generation_prompt=True)
    theirs = hf.apply_chat_template(chats[0], chat_template=template, return_assistant_tokens_mask=True)
    ours = zen.apply_chat_template(chats[0], return_assistant_tokens_mask=True)
    assert ours == dict(theirs) and any(ours["assistant_masks"])
    batch = hf.apply_chat_template(chats, chat_template=template, padding=True, return_assistant_tokens_mask=True)
    assert zen.apply_chat_template(chats, padding=True, return_assistant_tokens_mask=True) == dict(batch)
    plain = [u("Hi"), a("Once upon")]
    cont = "{% for m in messages %}[{{ m.role }}]{{ m.content }}[end]{% endfor %}"
    assert Tokenizer(backend, chat_template=cont).apply_chat_template(plain, tokenize=False,
                                                                      continue_final_message=True) == \
        hf.apply_chat_template(plain, chat_template=cont, tokenize=False, continue_final_message=True)
    tensors = zen.apply_chat_template(chats, padding=True, return_tensors="pt")
    assert tensors["input_ids"].tolist() == \
        hf.apply_chat_template(chats, chat_template=template, padding=True, return_tensors="pt")["input_ids"].tolist()


def write_folder(directory: Path, backend, config: dict, files: dict | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                                 **config}))
    for name, text in (files or {}).items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text)
    return directory


def test_templates_are_read_from_a_folder_as_transformers_reads_them(tmp_path, backend):
    from transformers import AutoTokenizer

    llama = (TEMPLATES_DIR / "llama-3-instruct.jinja").read_text()
    qwen = (TEMPLATES_DIR / "qwen2.5-instruct.jinja").read_text()
    hermes = (TEMPLATES_DIR / "vllm-tool-hermes.jinja").read_text()
    added = {"bos_token": {"__type": "AddedToken", "content": "<|begin_of_text|>", "special": True, "lstrip": False, "rstrip": False,
                           "normalized": False, "single_word": False}, "eos_token": "<|eot_id|>"}
    folders = {
        "config string": write_folder(tmp_path / "a", backend, {**added, "chat_template": llama}),
        "config list": write_folder(tmp_path / "b", backend, {"eos_token": "<|im_end|>", "chat_template": [
            {"name": "default", "template": qwen}, {"name": "tool_use", "template": hermes}]}),
        "jinja files": write_folder(tmp_path / "c", backend, {"eos_token": "<|im_end|>", "chat_template": "ignored"},
                                    {"chat_template.jinja": qwen, "additional_chat_templates/tool_use.jinja": hermes}),
    }
    conversation = [SYSTEM, u("Weather in Zürich?")]
    for what, folder in folders.items():
        zen, hf = load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
        assert zen.has_chat_template, what
        for tools in (None, [SEARCH]):  # (Hermes' type mapper recurses forever on a "null" type)
            for prompt in (False, True):
                assert zen.apply_chat_template(conversation, tools=tools, add_generation_prompt=prompt,
                                               tokenize=False) == \
                    hf.apply_chat_template(conversation, tools=tools, add_generation_prompt=prompt, tokenize=False), what
        assert zen.apply_chat_template(conversation) == dict(hf.apply_chat_template(conversation))
    named = load_tokenizer(folders["jinja files"])
    assert named.render_chat(conversation, chat_template="tool_use").startswith("<|im_start|>system")
    assert named.render_chat(conversation, tools=[SEARCH]).startswith("You are a function calling AI model")
    # a folder without a template keeps zenlm's own format; saving keeps the template for transformers
    bare = write_folder(tmp_path / "d", backend, {"eos_token": "</s>"})
    assert not load_tokenizer(bare).has_chat_template
    saved = tmp_path / "saved"
    named.save(saved)
    again, hf_again = load_tokenizer(saved), AutoTokenizer.from_pretrained(saved)
    assert again.chat_template == named.chat_template and again.special_tokens["eos_token"] == "<|im_end|>"
    assert again.apply_chat_template(conversation, tokenize=False) == \
        hf_again.apply_chat_template(conversation, tokenize=False)
    with pytest.raises(ValueError, match="multiple chat templates with no default"):
        Tokenizer(backend, chat_template={"a": "x", "b": "y"}).apply_chat_template([u("x")])


@pytest.mark.parametrize("path", TEMPLATES, ids=[p.stem for p in TEMPLATES])
def test_loss_mask_found_by_rendering_covers_exactly_the_assistant_turns(path, backend):
    """For every template: the tokens that carry loss are each assistant reply (content or tool call)
    with its end-of-turn token, and nothing of the system, user or tool messages."""
    template = path.read_text(encoding="utf-8")
    zen = Tokenizer(backend, chat_template=template, special_tokens=SPECIALS[path.stem])
    end = END_OF_TURN[path.stem]
    trained = 0
    for name, messages, tools, extra in SUITE:
        if not any(m["role"] == "assistant" for m in messages):
            continue
        try:
            text = zen.render_chat(messages, tools=tools, **extra)
        except ValueError:
            continue  # the template refuses this conversation; the data pipeline counts it as bad
        ids, mask = encode_chat(zen, messages, tools=tools, **extra)
        assert ids == zen.encode(text), name
        scored = zen.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=False)
        unscored = zen.decode([t for t, m in zip(ids, mask) if not m], skip_special_tokens=False)
        for message in messages:
            content = message.get("content")
            if isinstance(content, str) and content.strip() and len(content.strip()) > 3:
                if message["role"] == "assistant" and content.strip() in text:
                    assert content.strip() in scored, (path.stem, name, content)
                elif message["role"] != "assistant":
                    assert content.strip() not in scored, (path.stem, name, content)
        assert scored.rstrip().endswith(end) or scored.rstrip().endswith("</tool_call>"), (path.stem, name, scored)
        assert unscored, name
        trained += 1
    assert trained >= 3, path.stem
    # the generation prompt the model answers is exactly the text before its trained reply
    messages = [u("Hi"), a("Hello there, friend."), u("Bye"), a("See you.")]
    full, spans = chat_spans(lambda m, p: zen.render_chat(m, add_generation_prompt=p), messages)
    assert [full[s:e].strip().removesuffix(end).strip() for s, e in spans] == ["Hello there, friend.", "See you."]
    if "mistral" not in path.stem and "llama-2" not in path.stem:  # those have no generation prompt
        prompt = zen.render_chat(messages[:3], add_generation_prompt=True)
        assert "".join(prompt.split()) == "".join(full[:spans[1][0]].split())


def test_generation_tagged_template_mask_equals_transformers(backend):
    """On a template with {% generation %} blocks (the only kind transformers can mask), the mask
    found by rendering equals transformers' assistant_masks."""
    template = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' }}{% if m.role == 'assistant' %}"
                "{% generation %}{{ m.content + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
                "{% else %}{{ m.content + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    hf = hf_tokenizer(backend, {"eos_token": "<|im_end|>"})
    zen = Tokenizer(backend, chat_template=template, special_tokens={"eos_token": "<|im_end|>"})
    for messages in ([SYSTEM, u("Hi"), a("Hello there."), u("Weather?"), a("Sunny, 21 C.")],
                     [u("床前明月光"), a("疑是地上霜 🎉")]):
        theirs = hf.apply_chat_template(messages, chat_template=template, return_assistant_tokens_mask=True)
        ids, mask = encode_chat(zen, messages)
        assert ids == theirs["input_ids"] and mask == theirs["assistant_masks"]


def test_stop_tokens_name_every_end_token_of_the_folder(tmp_path, backend):
    for path in TEMPLATES:
        zen = Tokenizer(backend, chat_template=path.read_text(), special_tokens=SPECIALS[path.stem])
        stops = {zen.id_to_token(i) for i in zen.stop_token_ids}
        assert END_OF_TURN[path.stem] in stops, path.stem
        assert SPECIALS[path.stem]["eos_token"] in stops, path.stem
    eom, eot, end = (backend.token_to_id(t) for t in ("<|eom_id|>", "<|eot_id|>", "<|end_of_text|>"))
    folder = write_folder(tmp_path / "llama", backend, {"eos_token": "<|end_of_text|>", "bos_token": "<|begin_of_text|>"},
                          {"chat_template.jinja": (TEMPLATES_DIR / "vllm-tool-llama3.1-json.jinja").read_text(),
                           "generation_config.json": json.dumps({"eos_token_id": [end, eom, eot]})})
    stops = load_tokenizer(folder).stop_token_ids
    assert {end, eom, eot} <= set(stops)
    own = byte_level_tokenizer()
    assert own.stop_token_ids == [own.token_to_id("<|end|>")]  # zenlm's own template ends at <|end|>


def test_the_template_survives_conversion_both_ways(tmp_path, backend):
    """HF folder -> zenlm checkpoint -> HF folder: the template, its named templates and the special
    tokens come along, and transformers renders the exported folder as it rendered the original."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from zenlm.hf import convert_from_hf, convert_to_hf

    torch.manual_seed(0)
    source = tmp_path / "hf"
    GPT2LMHeadModel(GPT2Config(vocab_size=backend.get_vocab_size(), n_embd=32, n_layer=1, n_head=2,
                               n_positions=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)).save_pretrained(source)
    hf = hf_tokenizer(backend, SPECIALS["llama-3-instruct"])
    hf.chat_template = {"default": (TEMPLATES_DIR / "llama-3-instruct.jinja").read_text(),
                        "tool_use": (TEMPLATES_DIR / "vllm-tool-llama3.1-json.jinja").read_text()}
    hf.save_pretrained(source)
    ours = convert_from_hf(source, tmp_path / "zen")
    back = convert_to_hf(ours, tmp_path / "back")
    conversation = [SYSTEM, u("Weather?"), a("Sunny."), u("Thanks")]
    expected = hf.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True, date_string="1 Jan 2026")
    for folder in (source, ours, back):
        zen = load_tokenizer(folder)
        assert zen.chat_template == hf.chat_template and zen.special_tokens["bos_token"] == "<|begin_of_text|>"
        assert zen.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True,
                                       date_string="1 Jan 2026") == expected
        assert zen.apply_chat_template(conversation, tools=[SEARCH], tokenize=False, date_string="1 Jan 2026") == \
            hf.apply_chat_template(conversation, tools=[SEARCH], tokenize=False, date_string="1 Jan 2026")
    assert AutoTokenizer.from_pretrained(back).apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=True, date_string="1 Jan 2026") == expected
