"""`zenlm prepare dailydialog`: perplexities are reported on dialogues the model never trained on."""
import gzip
import json

from zenlm.tasks.prepare import DATA_ROOT, dailydialog


def _write(root, split, dialogues):
    with gzip.open(root / f"dialogues_{split}.txt.gz", "wt", encoding="utf-8") as f:
        for turns in dialogues:
            f.write(" __eou__ ".join(turns) + " __eou__\n")


def _dialogues(path):
    return [tuple(m["content"] for m in json.loads(line)["messages"]) for line in path.read_text().splitlines()]


def test_dailydialog_drops_evaluation_dialogues_seen_in_train(tmp_path):
    root, out = tmp_path / "dd", tmp_path / "out"
    root.mkdir()
    a, b, c, d = ("Hi .", "Hello !"), ("How are you ?", "Fine ."), ("Where to ?", "Home ."), ("Bye .", "See you .")
    _write(root, "train", [a, b, a, ("Alone .",)])   # a twice, one single-turn dialogue
    _write(root, "validation", [b, c])                 # b also in train
    _write(root, "test", [d, ("Hi  .", "Hello   !")])  # the second is a after whitespace normalisation
    counts = dailydialog(out, root=root)
    assert _dialogues(out / "train.jsonl") == [a, b]
    assert _dialogues(out / "validation.jsonl") == [c]
    assert _dialogues(out / "test.jsonl") == [d]
    assert (counts["validation_dropped"], counts["test_dropped"]) == (1, 1)
    roles = [m["role"] for m in json.loads((out / "train.jsonl").read_text().splitlines()[0])["messages"]]
    assert roles == ["user", "assistant"]


def test_dailydialog_real_split_is_deduplicated(tmp_path):  # ../shared/data, where CI clones beside it
    counts = dailydialog(tmp_path, root=DATA_ROOT / "dailydialog")
    train = set(_dialogues(tmp_path / "train.jsonl"))
    for split in ("validation", "test"):
        held_out = _dialogues(tmp_path / f"{split}.jsonl")
        assert held_out and not train & set(held_out)
    assert len(train) == counts["train"]  # train's duplicates kept once
    assert counts["validation"] + counts["validation_dropped"] == 1000
    assert counts["test"] + counts["test_dropped"] == 1000
