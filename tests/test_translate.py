"""Translation: batched beam search equals one-by-one decoding, files, sacrebleu scores, bad input."""
import json
import os
import subprocess
import sys

import pytest
import sacrebleu
from tiny_app_models import save_tiny

from zenlm import load, load_tokenizer
from zenlm.cli import main
from zenlm.generation import Generator
from zenlm.tasks.translate import check_pair, file_language, score, translate

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SOURCES = ["A man rides a bike.", "Two dogs play in the snow.", "", "Hello, how are you today?", "I am fine!"]
PAIR = {"task": "translation", "source_lang": "en", "target_lang": "de"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("mt") / "en-de", extra=PAIR)


def zenlm_cli(*args, timeout=120):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "zenlm.cli", *map(str, args)], capture_output=True, text=True, check=False,
                          timeout=timeout, env=env)


def test_batched_translation_equals_one_by_one(model_dir):
    model, tok = load(model_dir), load_tokenizer(model_dir)
    got = translate(model, tok, SOURCES, beam=3, batch_size=2, max_new_tokens=10)
    gen = Generator(model, tok)
    for source, hyp in zip(SOURCES, got):
        if not source:
            assert hyp == ""
            continue
        ids = tok.encode(source) + [tok.eos_id]  # as the seq2seq objective encodes a training source
        assert hyp == gen.generate(ids, num_beams=3, max_new_tokens=10)[0].text.strip()


def test_language_pair_is_checked(model_dir):
    model = load(model_dir)
    assert check_pair(model, "en", "de") == ("en", "de")
    with pytest.raises(ValueError, match=r"translates en->de; it was not trained for target language 'fr'"):
        translate(model, load_tokenizer(model_dir), ["hi"], target_lang="fr")
    assert file_language("test_2016_flickr.de") == "de" and file_language("dev.zh.txt") == "zh"
    assert file_language("input.txt") is None and file_language("notes.md") is None and file_language("a.py") is None


def test_chinese_output_is_scored_with_the_zh_tokenizer():
    hyps, refs = ["我爱你。", "他在家"], ["我爱你。", "他在家里"]
    result = score(hyps, refs, target_lang="zh")
    expected = sacrebleu.corpus_bleu(hyps, [refs], tokenize="zh")
    assert result["bleu"] == pytest.approx(expected.score) and "tok:zh" in result["bleu_signature"]
    assert "tok:13a" in score(["a b c d"], ["a b c d"], target_lang="de")["bleu_signature"]


def test_cli_translate_file_and_evaluate_match_sacrebleu(model_dir, tmp_path, capsys):
    src, ref = tmp_path / "test.en", tmp_path / "test.de"
    src.write_text("\n".join(SOURCES[:2] + SOURCES[3:]) + "\n", encoding="utf-8")
    ref.write_text("Ein Mann fährt Fahrrad.\nZwei Hunde spielen im Schnee.\nHallo!\nMir geht's gut!\n", encoding="utf-8")
    out = tmp_path / "hyp.de"
    proc = zenlm_cli("evaluate", "translation", model_dir, "--src", src, "--ref", ref, "--beam", "2",
                     "--max-new-tokens", "8", "--output", out, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    hyps = out.read_text(encoding="utf-8").splitlines()
    refs = ref.read_text(encoding="utf-8").splitlines()
    assert len(hyps) == 4
    assert result["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert result["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert result["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")

    out2 = tmp_path / "hyp2.de"
    assert main(["translate", str(model_dir), "--input", str(src), "--output", str(out2), "--beam", "2",
                 "--max-new-tokens", "8"]) == 0
    assert out2.read_text(encoding="utf-8").splitlines() == hyps
    capsys.readouterr()
    assert main(["translate", str(model_dir), SOURCES[0], SOURCES[1], "--beam", "2", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.splitlines() == hyps[:2]


def test_cli_bad_input_is_one_line_and_writes_nothing(model_dir, tmp_path, capsys):
    src, ref, empty, short = tmp_path / "a.en", tmp_path / "a.de", tmp_path / "empty.en", tmp_path / "short.de"
    src.write_text("one\ntwo\nthree\n", encoding="utf-8")
    ref.write_text("eins\nzwei\ndrei\n", encoding="utf-8")
    empty.write_text("\n\n", encoding="utf-8")
    short.write_text("eins\n", encoding="utf-8")
    binary = tmp_path / "binary.en"
    binary.write_bytes(b"\xff\xfe\x00bad")
    other_dir = save_tiny(tmp_path / "other", extra=PAIR, hidden=64)
    from zenlm.lora import LoRAConfig, apply_lora, save_adapter

    other = load(other_dir)
    apply_lora(other, LoRAConfig(rank=2))
    save_adapter(other, tmp_path / "adapter-64")
    out = tmp_path / "out.de"
    cases = [
        (("evaluate", "translation", model_dir, "--src", empty, "--ref", ref, "--output", out), "is empty"),
        (("evaluate", "translation", model_dir, "--src", src, "--ref", short, "--output", out), "line counts differ"),
        (("evaluate", "translation", model_dir, "--src", binary, "--ref", ref, "--output", out), "not a readable UTF-8"),
        (("evaluate", "translation", model_dir, "--src", tmp_path / "missing.en", "--ref", ref), "no such file"),
        (("evaluate", "translation", model_dir, "--src", ref, "--ref", src, "--output", out), "named as 'de'"),
        (("translate", model_dir, "--input", src, "--output", out, "--target-lang", "fr"), "not trained for target"),
        (("translate", model_dir, "--input", empty, "--output", out), "is empty"),
        (("translate", model_dir, "--input", src, "--output", out, "--adapter", tmp_path / "adapter-64"),
         "does not fit this base"),
    ]
    for args, needle in cases:  # main() is what the console script runs: exit code, one line on stderr
        code = main([str(a) for a in args])
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], (args, err)
        assert not out.exists()
    proc = zenlm_cli(*cases[1][0])  # and once through a real process
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "line counts differ" in proc.stderr


@pytest.mark.slow
def test_a_trained_model_translates(tmp_path):
    """End to end: the seq2seq objective trains an encoder-decoder on word-substitution pairs,
    and beam-search translation of unseen sentences scores high sacrebleu BLEU."""
    import random

    from zenlm.train import TrainConfig, train

    en = ["cat", "dog", "house", "tree", "red", "blue", "big", "small", "man", "woman", "runs", "sees", "eats", "the", "a", "water"]
    de = ["katze", "hund", "haus", "baum", "rot", "blau", "gross", "klein", "mann", "frau", "läuft", "sieht", "isst", "der", "ein", "wasser"]
    words = dict(zip(en, de))
    rng = random.Random(0)

    def pair():
        ws = [rng.choice(en) for _ in range(rng.randint(3, 6))]
        return " ".join(ws), " ".join(words[w] for w in ws)

    pairs = [pair() for _ in range(1000)]
    (tmp_path / "train.tsv").write_text("".join(f"{a}\t{b}\n" for a, b in pairs[:900]), encoding="utf-8")
    (tmp_path / "valid.tsv").write_text("".join(f"{a}\t{b}\n" for a, b in pairs[900:]), encoding="utf-8")
    config = TrainConfig.from_dict({
        "out_dir": str(tmp_path / "run"), "seed": 0, "tokenizer": {"kind": "bpe", "vocab_size": 300},
        "model": {"num_encoder_layers": 2, "num_decoder_layers": 2, "hidden_size": 64, "intermediate_size": 128,
                  "num_attention_heads": 4, "max_position_embeddings": 32, "extra": PAIR},
        "data": {"train": [str(tmp_path / "train.tsv")], "valid": [str(tmp_path / "valid.tsv")], "format": "pairs",
                 "objective": "seq2seq", "seq_len": 32, "max_source_len": 32, "max_target_len": 32,
                 "cache_dir": str(tmp_path / "cache")},
        "optim": {"lr": 3e-3, "warmup_steps": 20, "weight_decay": 0.0},
        "max_steps": 250, "batch_size": 32, "eval_interval": 0, "progress": False, "plot": False,
        "peak_flops": 1e12, "resume": "never"})
    train(config)
    model, tok = load(tmp_path / "run" / "best"), load_tokenizer(tmp_path / "run" / "best")
    test = [pair() for _ in range(50)]  # new random sentences (a few may repeat training ones)
    hyps = translate(model, tok, [a for a, _ in test], beam=2, target_lang="de")
    bleu = sacrebleu.corpus_bleu(hyps, [[b for _, b in test]]).score
    assert bleu >= 60, (bleu, hyps[:3])
