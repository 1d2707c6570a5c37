"""`zenlm tokenizer train` (cli/train.py)."""
from zenlm.cli import main


def test_tokenizer_train_command(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world, 你好世界\n" * 200)
    assert main(["tokenizer", "train", str(corpus), "--vocab-size", "300", "--kind", "bpe", "--out", str(tmp_path / "tok")]) == 0
    assert (tmp_path / "tok" / "tokenizer.json").exists()
    assert "trained bpe tokenizer" in capsys.readouterr().out
