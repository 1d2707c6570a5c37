"""zenlm.LLM: the two-line Python API over a zenlm folder and a Hugging Face folder, each method
checked against the library call it stands for."""
import numpy as np
import pytest
import torch
from tiny_app_models import save_tiny, tiny_tokenizer

import zenlm
from zenlm import LLM
from zenlm.generation import Generator

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("lm"), family="decoder-only")


def test_two_lines_load_a_zenlm_folder_and_generate(lm_folder):
    llm = zenlm.LLM.load(lm_folder)
    text = llm.generate("A man", max_new_tokens=5)
    assert isinstance(text, str)
    # the same as the library call with the folder's own tokenizer
    assert text == zenlm.generate(zenlm.load(lm_folder), "A man", tokenizer=zenlm.load_tokenizer(lm_folder),
                                  max_new_tokens=5)
    assert llm.generate(["A man", "Two"], max_new_tokens=3) == [llm.generate("A man", max_new_tokens=3),
                                                                  llm.generate("Two", max_new_tokens=3)]
    assert "decoder-only" in repr(llm) and "tokenizer yes" in repr(llm)


def test_stream_yields_the_greedy_reply_in_pieces(lm_folder):
    llm = LLM.load(lm_folder)
    pieces = list(llm.stream("Hello", max_new_tokens=6))
    assert all(isinstance(p, str) for p in pieces)
    assert "".join(pieces) == llm.generate("Hello", max_new_tokens=6)


def test_a_hugging_face_folder_loads_with_its_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=tok.vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(tmp_path)
    tok.save(tmp_path)
    llm = LLM.load(tmp_path)
    assert llm.tokenizer is not None
    ids = tok.encode("A man")
    # greedy tokens equal transformers' own generate on the same weights
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False, pad_token_id=tok.eos_id)[0, len(ids):]
    ours = llm.generate(ids, max_new_tokens=4, eos_token_id=[])
    assert ours == ref.tolist()[:len(ours)] and len(ours) == 4


def test_chat_answers_the_last_user_message_with_the_session_template(lm_folder):
    from zenlm.tasks.chat import ChatSession

    llm = LLM.load(lm_folder)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "How are you?"}]
    reply = llm.chat(messages, max_new_tokens=4)
    session = ChatSession(llm.model, llm.tokenizer, system="Be brief.", max_new_tokens=4, history=messages[1:3])
    assert reply == session.reply("How are you?")
    with pytest.raises(ValueError, match="end with a message whose role is 'user'"):
        llm.chat(messages[:3])


def test_translate_and_embed(tmp_path):
    llm = LLM.load(save_tiny(tmp_path / "mt", extra={"source_lang": "en", "target_lang": "de"}))
    one = llm.translate("A man rides a bike.", beam=2, max_new_tokens=5)
    assert isinstance(one, str) and llm.translate(["A man rides a bike."], beam=2, max_new_tokens=5) == [one]
    vectors = llm.embed(["A man rides a bike.", "Two dogs."])
    assert vectors.shape == (2, llm.model.config.hidden_size) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(llm.embed("Two dogs."), vectors[1], atol=1e-5)


def test_save_then_load_gives_the_same_model(lm_folder, tmp_path):
    llm = LLM.load(lm_folder)
    again = LLM.load(llm.save(tmp_path / "copy"))
    assert again.generate("A man", max_new_tokens=5) == llm.generate("A man", max_new_tokens=5)


def test_finetune_with_lora_returns_the_tuned_model(tmp_path, monkeypatch):
    monkeypatch.setenv("ZENLM_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "text.txt"
    data.write_text("A man rides a bike. Two dogs play in the snow.\n" * 200, encoding="utf-8")
    llm = LLM(zenlm.load(save_tiny(tmp_path / "base", family="decoder-only")), tiny_tokenizer())  # in memory
    tuned = llm.finetune(data, method="lora", out_dir=tmp_path / "run", max_steps=6, eval_interval=3, batch_size=4,
                         progress=False, plot=False, peak_flops=1e12, threads=1, optim={"lr": 0.01, "warmup_steps": 0})
    assert tuned.summary["method"] == "lora" and (tmp_path / "run" / "adapter").is_dir()
    ids = torch.tensor([tiny_tokenizer().encode("A man rides")])
    with torch.no_grad():
        assert not torch.allclose(tuned.model(ids).logits, llm.model(ids).logits, atol=1e-4)
    assert Generator(tuned.model, tuned.tokenizer).generate("A man", max_new_tokens=3).texts[0] is not None
