"""SentencePiece tokenizers through GGUF (tokenizer.ggml.model "llama"): a real SentencePiece BPE model
with byte fallback, trained here by the sentencepiece library on Shakespeare, turned by transformers into
the tokenizer.json forms a Llama 2 / Mistral folder (a space prepended: the legacy normalizer, or a
Metaspace pre-tokenizer) and a Gemma folder (no space prepended) carry. Each goes HF folder -> zenlm ->
GGUF -> zenlm: the tokenizer read back encodes and decodes the text suite as transformers' original
does, as sentencepiece itself does (Llama style), as transformers' own GGUF reader does, and (``slow``,
where llama_cpp is importable) as llama.cpp does, special tokens in the text included; the file holds
llama.cpp's token types and scores ordered as sentencepiece's own."""
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")
pytest.importorskip("google.protobuf")  # transformers reads tokenizer.model through protobuf

import zenlm  # noqa: E402
from zenlm import Tokenizer  # noqa: E402
from zenlm.gguf import export_gguf, load_gguf  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "tinyshakespeare" / "input.txt"
EXTRA = ["numbers 3.14159 and 2,718; émojis 🦙🚀 über café", "中文 テスト ∑ ūnicode", "tabs\tand  two spaces"]
# plain text: no leading space (transformers 5's Metaspace adds no second "▁" there; sentencepiece does)
SUITE = ["Hello world,  ROMEO: 123 émojis 🦙\n\tend", "First Citizen:\nBefore we proceed any further, hear me speak.",
         "double  space  ", "a", "", "ūnicode ∑ 中文 テスト ☃", "tabs\t\tand\n\nnewlines", "KING HENRY V. 1599 AD!",
         "Thou art 𝔣𝔞𝔦𝔯 — “quoted” ‘text’ …"]
SPECIAL = ["<s>hi</s> there <s> x", "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"]
STYLES = {"llama-legacy": ("LlamaTokenizer", {"legacy": True}), "llama": ("LlamaTokenizer", {"legacy": False}),
          "gemma": ("GemmaTokenizer", {})}


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    lines = DATA.read_text(encoding="utf-8").splitlines()[:4000] + EXTRA * 20
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=out, vocab_size=600, model_type="bpe", byte_fallback=True,
        character_coverage=0.999, split_digits=True, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, user_defined_symbols=[
            "<start_of_turn>", "<end_of_turn>"], minloglevel=2)
    path = tmp_path_factory.mktemp("spm") / "tokenizer.model"
    path.write_bytes(out.getvalue())
    return path


def hf_folder(sp_model: Path, style: str, folder: Path):
    """A transformers Llama (or Gemma 2) folder whose tokenizer transformers converted from ``sp_model``."""
    cls, extra = STYLES[style]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(sp_model.read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": cls, **extra}))
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    (folder / "tokenizer.model").unlink()  # what zenlm reads is tokenizer.json
    hf_tok.save_pretrained(folder)
    common = dict(vocab_size=len(hf_tok), hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                  bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id)
    torch.manual_seed(0)
    if style == "gemma":
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(head_dim=32, query_pre_attn_scalar=32,
                                                                         sliding_window=8, **common))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    model.save_pretrained(folder)
    return hf_tok


@pytest.fixture(scope="module")
def files(sp_model, tmp_path_factory) -> dict:
    """style -> (transformers' tokenizer, the GGUF written from the zenlm import of its folder)."""
    out = {}
    for style in STYLES:
        folder = tmp_path_factory.mktemp(style)
        hf_tok = hf_folder(sp_model, style, folder / "hf")
        report = export_gguf(zenlm.load(folder / "hf"), None, folder / "m.gguf")
        assert report["architecture"] == ("gemma2" if style == "gemma" else "llama")
        out[style] = (hf_tok, folder / "m.gguf")
    return out


@pytest.fixture(params=list(STYLES))
def exported(request, files):
    return (request.param, *files[request.param])


def test_tokenizer_read_back_equals_transformers_and_sentencepiece(exported, sp_model):
    style, hf_tok, path = exported
    back = zenlm.load(path).tokenizer
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    for text in SUITE + EXTRA:
        ids = hf_tok.encode(text, add_special_tokens=False)
        assert back.encode(text) == ids, (style, text)
        assert back.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True), (style, text)
        assert back.encode(text, add_special_tokens=True) == hf_tok.encode(text, add_special_tokens=True), (style, text)
        if style != "gemma":  # sentencepiece itself (its model prepends "▁"; Gemma's tokenizer.json does not)
            assert ids == sp.encode(text), (style, text)
    turn = "<start_of_turn>user"
    if style == "llama":  # Metaspace "first": no "▁" after an added token; llama.cpp (and zenlm's read) prepend one
        assert back.encode(turn) == hf_tok.encode("<start_of_turn> user", add_special_tokens=False)
    else:
        assert back.encode(turn) == hf_tok.encode(turn, add_special_tokens=False)
    assert back.special_tokens["bos_token"] == hf_tok.bos_token and back.special_tokens["eos_token"] == hf_tok.eos_token


def test_file_holds_llamacpp_types_and_scores_in_sentencepieces_order(exported, sp_model):
    style, hf_tok, path = exported
    meta = {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items() if k.startswith("tokenizer.")}
    assert meta["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.merges" not in meta
    assert meta["tokenizer.ggml.add_space_prefix"] == (style != "gemma")
    tokens, types, scores = (meta[f"tokenizer.ggml.{k}"] for k in ("tokens", "token_type", "scores"))
    T = gguf.TokenType
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    for i, token in enumerate(tokens[:sp.get_piece_size()]):
        assert token == sp.id_to_piece(i)
        want = (T.BYTE if sp.is_byte(i) else T.UNKNOWN if sp.is_unknown(i) else T.CONTROL if sp.is_control(i)
                else T.USER_DEFINED if i in (3, 4) else T.NORMAL)
        assert types[i] == want, (style, i, token)
    # merged pieces: our scores (from the merge ranks) order them as sentencepiece's own scores do
    merged = [i for i, t in enumerate(tokens[:sp.get_piece_size()]) if types[i] == T.NORMAL and len(t) > 1]
    ours = np.array([scores[i] for i in merged])
    theirs = np.array([sp.get_score(i) for i in merged])
    assert len(merged) > 200 and np.array_equal(np.argsort(-ours, kind="stable"), np.argsort(-theirs, kind="stable"))


@pytest.mark.parametrize("style", ["llama-legacy", "llama"])
def test_transformers_gguf_reader_tokenizes_the_same(files, style):
    """transformers' own GGUF tokenizer reader derives its merges from the scores, as llama.cpp merges
    by them; it ignores add_space_prefix = false, so the Gemma style is checked by llama.cpp only."""
    hf_tok, path = files[style]
    theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in SUITE:
        assert theirs.encode(text, add_special_tokens=False) == hf_tok.encode(text, add_special_tokens=False), text


def test_gguf_to_zenlm_to_gguf_keeps_the_vocabulary(exported, tmp_path):
    style, hf_tok, path = exported
    back = load_gguf(path)
    export_gguf(back, back.tokenizer, tmp_path / "again.gguf", arch="gemma2" if style == "gemma" else "llama")
    fields = [f"tokenizer.ggml.{k}" for k in ("model", "tokens", "scores", "token_type", "add_space_prefix",
                                              "bos_token_id", "eos_token_id", "unknown_token_id", "add_bos_token")]
    first, second = (gguf.GGUFReader(str(p)).fields for p in (path, tmp_path / "again.gguf"))
    for name in fields:
        assert first[name].contents() == second[name].contents(), name


@pytest.mark.slow
def test_llama_cpp_tokenizes_and_detokenizes_the_same(exported):
    """llama.cpp's own SentencePiece tokenizer on the file (vocab only, in its own process): the same ids
    on the suite, and on text with special tokens in it (llama.cpp prefixes a space after each)."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama_cpp is not importable: `pip install llama-cpp-python` (builds llama.cpp from source)")
    style, hf_tok, path = exported
    texts = SUITE + EXTRA + SPECIAL + [" leading space"]
    back = zenlm.load(path).tokenizer
    assert [back.encode(t) for t in texts] == _llama_cpp_ids(path, texts)


# --------------------------------------------------------------------------- unigram: llama.cpp's "t5" vocabulary
def _llama_cpp_ids(path: Path, texts: list[str]) -> list[list[int]]:
    worker = ("import json, sys\nfrom llama_cpp import Llama\n"
              "llm = Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)\n"
              "print(json.dumps([list(llm.tokenize(t.encode(), add_bos=False, special=True)) "
              "for t in json.loads(sys.argv[2])]))")
    proc = subprocess.run([sys.executable, "-c", worker, str(path), json.dumps(texts)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-800:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


_UNIGRAMS: dict = {}


@pytest.fixture
def unigram(request, tmp_path_factory) -> tuple:
    """A sentencepiece unigram model (normalization rule ``request.param``), as a tokenizers Unigram with
    a Metaspace (the form transformers' SentencePiece converter gives a unigram model) and, for a
    normalizing model, its precompiled character map, exported to GGUF; built once per rule."""
    if request.param not in _UNIGRAMS:
        _UNIGRAMS[request.param] = _build_unigram(request.param, tmp_path_factory)
    return _UNIGRAMS[request.param]


def _build_unigram(rule: str, tmp_path_factory) -> tuple:
    from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as RustTokenizer
    from transformers.convert_slow_tokenizer import import_protobuf

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(DATA.read_text(encoding="utf-8").splitlines()[:4000] + EXTRA * 20), model_writer=out,
        vocab_size=600, model_type="unigram", character_coverage=0.999, remove_extra_whitespaces=False,
        normalization_rule_name=rule, unk_id=0, bos_id=1, eos_id=2, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=out.getvalue())
    backend = RustTokenizer(models.Unigram([(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())],
                                           unk_id=0, byte_fallback=False))
    proto = import_protobuf().ModelProto()
    proto.ParseFromString(out.getvalue())
    if proto.normalizer_spec.precompiled_charsmap:
        backend.normalizer = normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False)
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=False)
    backend.add_special_tokens([AddedToken(sp.id_to_piece(i), special=True, normalized=False) for i in range(3)])
    tok = Tokenizer(backend, special_tokens={"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"})
    path = tmp_path_factory.mktemp("unigram") / "m.gguf"
    model = zenlm.TransformerLM(zenlm.TransformerConfig.from_preset(
        "tiny", vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=64, num_attention_heads=2,
        num_decoder_layers=1, bos_token_id=1, eos_token_id=2, pad_token_id=None))
    assert export_gguf(model, tok, path)["warnings"] == []
    return sp, tok, path


# nmt_nfkc: the character map is a 240 kB array in the file, which the gguf package's reader takes ~6 s to parse
@pytest.mark.parametrize("unigram", ["identity", "nmt_nfkc"], indirect=True)
def test_unigram_round_trips_as_sentencepiece_tokenizes(unigram):
    sp, tok, path = unigram
    back = zenlm.load(path).tokenizer
    for text in SUITE + EXTRA + [" leading space", "ﬁne ① ＡＢＣ café"]:
        ids = back.encode(text)
        assert ids == sp.encode(text), text  # sentencepiece's own Viterbi (unknown characters fused into one <unk>)
        if not text.startswith(" "):  # the Metaspace adds no second "▁" before a leading space; sentencepiece does
            assert ids == tok.encode(text), text
        assert back.decode(ids) == tok.decode(ids), text


@pytest.mark.parametrize("unigram", ["identity"], indirect=True)
def test_unigram_file_holds_sentencepieces_scores(unigram):
    sp, tok, path = unigram
    meta = {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items() if k.startswith("tokenizer.")}
    assert meta["tokenizer.ggml.model"] == "t5" and meta["tokenizer.ggml.add_space_prefix"] is True
    assert meta["tokenizer.ggml.remove_extra_whitespaces"] is False
    assert np.allclose(meta["tokenizer.ggml.scores"][3:], [sp.get_score(i) for i in range(3, sp.get_piece_size())])
    assert meta["tokenizer.ggml.token_type"][:3] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL,
                                                     gguf.TokenType.CONTROL]


def test_zenlm_unigram_keeps_nfkc_with_a_warning(tmp_path, caplog):
    """zenlm's own unigram tokenizers normalize with NFKC, which llama.cpp's unigram tokenizer does not
    apply: the export says so, and zenlm's reader restores it from its own key."""
    tok = Tokenizer.train(DATA.read_text(encoding="utf-8").splitlines()[:2000] + EXTRA * 5, vocab_size=400,
                          kind="unigram")
    model = zenlm.TransformerLM(zenlm.TransformerConfig.from_preset(
        "tiny", vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=64, num_attention_heads=2,
        num_decoder_layers=1))
    report = export_gguf(model, tok, tmp_path / "m.gguf")
    assert len(report["warnings"]) == 1 and "NFKC" in report["warnings"][0]
    back = zenlm.load(tmp_path / "m.gguf").tokenizer
    for text in SUITE + EXTRA + ["ﬁne ① ＡＢＣ"]:
        assert back.encode(text) == tok.encode(text), text
        assert back.decode(back.encode(text)) == tok.decode(tok.encode(text)), text


def test_what_llama_cpp_tokenizers_cannot_express_is_refused(tmp_path):
    from tokenizers import decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as RustTokenizer

    model = zenlm.TransformerLM(zenlm.TransformerConfig.from_preset(
        "tiny", vocab_size=8, hidden_size=64, intermediate_size=64, num_attention_heads=2, num_decoder_layers=1))
    vocab = [("<unk>", 0.0)] + [(c, -1.0) for c in "▁abcdef"]
    cases = []
    t5 = RustTokenizer(models.Unigram(vocab, unk_id=0))
    t5.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace()])
    cases.append((t5, "WhitespaceSplit"))
    fallback = RustTokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    fallback.pre_tokenizer = pre_tokenizers.Metaspace()
    cases.append((fallback, "byte_fallback"))
    lowercase = RustTokenizer(models.BPE({t: i for i, (t, _) in enumerate(vocab)}, [], byte_fallback=True))
    lowercase.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(" ", "▁")])
    lowercase.decoder = decoders.ByteFallback()
    cases.append((lowercase, "Lowercase"))
    for backend, message in cases:
        with pytest.raises(ValueError, match=message):
            export_gguf(model, Tokenizer(backend), tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.slow
@pytest.mark.parametrize("unigram", ["identity"], indirect=True)
def test_llama_cpp_unigram_tokenizes_the_same(unigram):
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama_cpp is not importable: `pip install llama-cpp-python` (builds llama.cpp from source)")
    sp, tok, path = unigram
    texts = SUITE + EXTRA + [" leading space", "<s>hi</s> there <s> x", "ﬁne ① ＡＢＣ café"]
    back = zenlm.load(path).tokenizer
    assert [back.encode(t) for t in texts] == _llama_cpp_ids(path, texts)


@pytest.mark.slow
def test_llama_cpp_runs_the_gemma2_file_with_its_sentencepiece_vocabulary(files):
    """The whole Gemma 2 file (transformers' random weights, zenlm's export, SentencePiece vocabulary) in
    llama.cpp: its prompt tokens and logits are zenlm's."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama_cpp is not importable: `pip install llama-cpp-python` (builds llama.cpp from source)")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from check_gguf_llamacpp import llamacpp_greedy

    _, path = files["gemma"]
    model = zenlm.load(path)
    prompt = SUITE[1]
    ids = model.tokenizer.encode(prompt)
    got = llamacpp_greedy(path, ids, 4, prompt=prompt)
    assert got["tokenized"] == ids
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    assert want.std() > 1e-3 and np.abs(got["prompt_logits"] - want).max() < 1e-3
