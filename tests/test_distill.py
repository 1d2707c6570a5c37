"""Distillation: the soft-target loss against torch's KL, the relation loss across widths, a short
DistillTrainer run pulling the student toward the teacher, the CLI, and bad input."""
import json

import pytest
import torch
import torch.nn.functional as F

import zenlm
from zenlm.cli import main
from zenlm.distill import DistillConfig, DistillTrainer, relation_loss, soft_target_loss
from zenlm.train import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_soft_target_loss_matches_torch_kl():
    torch.manual_seed(0)
    s, t = torch.randn(3, 5, 11), torch.randn(3, 5, 11)
    mask = torch.ones(3, 5, dtype=torch.bool)
    for temp in (1.0, 2.0, 4.0):
        ref = F.kl_div(F.log_softmax(s / temp, -1).reshape(-1, 11), F.softmax(t / temp, -1).reshape(-1, 11),
                       reduction="batchmean") * temp ** 2
        assert float(soft_target_loss(s, t, mask, temp)) == pytest.approx(float(ref), rel=1e-5)
    assert float(soft_target_loss(t, t, mask, 2.0)) == pytest.approx(0.0, abs=1e-6)
    # masked positions do not count
    mask[:, 2:] = False
    s2 = s.clone()
    s2[:, 2:] = 100.0
    assert float(soft_target_loss(s2, t, mask, 2.0)) == pytest.approx(float(soft_target_loss(s, t, mask, 2.0)))


def test_relation_loss_is_width_independent():
    torch.manual_seed(0)
    teacher = torch.randn(2, 6, 32)
    student = teacher @ torch.linalg.qr(torch.randn(32, 32))[0][:, :16]  # a narrower view
    assert float(relation_loss(teacher * 3.0, teacher)) == pytest.approx(0.0, abs=1e-6)  # scale-free
    assert float(relation_loss(student, teacher)) > 0
    assert relation_loss(torch.randn(2, 6, 16), teacher).shape == ()


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    text = "\n".join(f"the {w} sat on the {v} mat." for w in ("cat", "dog", "owl") for v in ("red", "big")) * 60
    (root / "train.txt").write_text(text)
    tok = zenlm.Tokenizer.train([text], kind="char", vocab_size=64)
    torch.manual_seed(0)
    config = zenlm.TransformerConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                                     num_attention_heads=4, num_encoder_layers=0, num_decoder_layers=2,
                                     max_position_embeddings=33, pad_token_id=tok.pad_id or 0,
                                     bos_token_id=tok.bos_id or 1, eos_token_id=tok.eos_id or 2)
    teacher = zenlm.TransformerLM(config)
    ids = torch.tensor(tok.encode(text))
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    for step in range(60):  # a teacher that knows something
        starts = torch.randint(0, len(ids) - 33, (16,))
        batch = torch.stack([ids[s:s + 33] for s in starts])
        loss = teacher(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    teacher.save_pretrained(root / "teacher", tokenizer=tok)
    return root


def _config(root, out, steps, **model):
    return TrainConfig.from_dict({
        "out_dir": str(out), "model": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                                       "num_encoder_layers": 0, "num_decoder_layers": 1,
                                       "max_position_embeddings": 33, **model},
        "data": {"train": [str(root / "train.txt")], "seq_len": 32, "sampling": "random"},
        "max_steps": steps, "batch_size": 8, "eval_interval": 0, "eval_batches": 2, "log_interval": 5,
        "precision": "fp32", "plot": False, "progress": False, "optim": {"lr": 3e-3, "warmup_steps": 0}})


def kl_to_teacher(trainer, batch: dict, shifted: bool) -> float:
    """The student's KL to the teacher on ``batch`` at T=1, over the positions that carry labels
    (a decoder-only model predicts token t+1 at position t, so its logits and labels are shifted)."""
    with torch.no_grad():
        s = trainer.model.eval()(**batch).logits
        t = trainer.teacher(**batch).logits
    if shifted:
        return float(soft_target_loss(s[:, :-1], t[:, :-1], batch["labels"][:, 1:] != -100, 1.0))
    return float(soft_target_loss(s, t, batch["labels"] != -100, 1.0))


def test_distillation_pulls_the_student_toward_the_teacher(teacher_dir, tmp_path):
    trainer = DistillTrainer(_config(teacher_dir, tmp_path / "s", 40), str(teacher_dir / "teacher"),
                             DistillConfig(temperature=2.0, alpha=1.0, hidden_weight=0.5))
    assert trainer.model.num_parameters() < trainer.teacher.num_parameters()
    batch = trainer.data.valid.batch(range(8))

    before = kl_to_teacher(trainer, batch, shifted=True)
    summary = trainer.train()
    after = kl_to_teacher(trainer, batch, shifted=True)
    assert summary["step"] == 40
    assert after < 0.5 * before, (before, after)
    # the saved student is a plain zenlm model with the teacher's tokenizer
    student = zenlm.load(tmp_path / "s" / "best")
    assert student.config.hidden_size == 32
    assert (tmp_path / "s" / "best" / "tokenizer.json").exists()


def test_student_not_smaller_than_teacher_is_an_error(teacher_dir, tmp_path):
    with pytest.raises(ValueError, match="not fewer than the teacher's"):
        DistillTrainer(_config(teacher_dir, tmp_path / "big", 5, hidden_size=128, num_decoder_layers=2),
                       str(teacher_dir / "teacher"))
    with pytest.raises(ValueError, match="alpha must be in"):
        DistillTrainer(_config(teacher_dir, tmp_path / "x", 5), str(teacher_dir / "teacher"), DistillConfig(alpha=2))


def test_cli_distill(teacher_dir, tmp_path, capsys):
    args = ["distill", "--teacher", str(teacher_dir / "teacher"), "--student-config", str(teacher_dir / "teacher"),
            "--set", "hidden_size=32", "--set", "intermediate_size=64", "--set", "num_decoder_layers=1",
            str(teacher_dir / "train.txt"), "--out", str(tmp_path / "cli"), "--steps", "6", "--batch-size", "4"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 6 and 0 < summary["parameter_ratio"] < 1
    assert summary["teacher_val_ppl"] > 1 and summary["student_val_ppl"] > 1
    big = args[:9] + ["--set", "hidden_size=256"] + args[11:]
    assert main(big) == 2
    assert "not fewer than the teacher's" in capsys.readouterr().err


# --------------------------------------------------------------------------- encoder-decoder
WORDS = ("cat", "dog", "owl", "red", "big", "sun", "map", "top")


@pytest.fixture(scope="module")
def seq2seq_teacher(tmp_path_factory):
    """A 2+2-layer encoder-decoder that learned to reverse short phrases (source TAB target)."""
    root = tmp_path_factory.mktemp("distill-s2s")
    gen = torch.Generator().manual_seed(0)
    lines = []
    for _ in range(400):
        phrase = " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (3,), generator=gen))
        lines.append(f"{phrase}\t{phrase[::-1]}")
    (root / "pairs.tsv").write_text("\n".join(lines) + "\n")
    tok = zenlm.Tokenizer.train([l.replace("\t", " ") for l in lines], kind="char", vocab_size=64)
    torch.manual_seed(0)
    config = zenlm.TransformerConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                                     num_attention_heads=4, num_encoder_layers=2, num_decoder_layers=2,
                                     max_position_embeddings=32, pad_token_id=tok.pad_id, bos_token_id=tok.bos_id,
                                     eos_token_id=tok.eos_id, pre_norm=True, final_norm=True)
    teacher = zenlm.TransformerLM(config)
    pairs = [(tok.encode(a) + [tok.eos_id], tok.encode(b) + [tok.eos_id]) for a, b in
             (line.split("\t") for line in lines)]
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    for step in range(80):
        chunk = [pairs[int(i)] for i in torch.randint(0, len(pairs), (16,), generator=gen)]
        src = torch.nn.utils.rnn.pad_sequence([torch.tensor(a) for a, _ in chunk], True, tok.pad_id)
        tgt = torch.nn.utils.rnn.pad_sequence([torch.tensor(b) for _, b in chunk], True, -100)
        loss = teacher(src, attention_mask=(src != tok.pad_id).long(), labels=tgt).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    teacher.save_pretrained(root / "teacher", tokenizer=tok)
    return root, float(loss.detach())


def test_encoder_decoder_teacher_distils_into_a_smaller_encoder_decoder(seq2seq_teacher, tmp_path):
    root, teacher_loss = seq2seq_teacher
    assert teacher_loss < 2.0, "the teacher should have learned something"
    config = TrainConfig.from_dict({
        "out_dir": str(tmp_path / "s"),
        "model": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_encoder_layers": 1,
                  "num_decoder_layers": 1, "max_position_embeddings": 32, "pre_norm": True, "final_norm": True},
        "data": {"train": [str(root / "pairs.tsv")], "objective": "seq2seq", "format": "pairs",
                 "max_source_len": 31, "max_target_len": 31},
        "max_steps": 40, "batch_size": 8, "eval_interval": 0, "eval_batches": 2, "log_interval": 5,
        "precision": "fp32", "plot": False, "progress": False, "optim": {"lr": 3e-3, "warmup_steps": 0}})
    trainer = DistillTrainer(config, str(root / "teacher"), DistillConfig(temperature=2.0, alpha=1.0, hidden_weight=0.5))
    assert trainer.model.config.is_encoder_decoder
    assert trainer.model.num_parameters() < 0.5 * trainer.teacher.num_parameters()
    batch = trainer.data.valid.batch(range(8))
    assert "labels" in batch and "decoder_input_ids" not in batch  # decoder inputs come from the labels

    before = kl_to_teacher(trainer, batch, shifted=False)
    summary = trainer.train()
    after = kl_to_teacher(trainer, batch, shifted=False)
    assert summary["step"] == 40
    assert after < 0.5 * before, (before, after)
    student = zenlm.load(tmp_path / "s" / "best")
    assert student.config.is_encoder_decoder and student.config.num_encoder_layers == 1


def test_encoder_decoder_student_must_match_the_teacher_family(seq2seq_teacher, tmp_path):
    root, _ = seq2seq_teacher
    config = _config(root, tmp_path / "x", 5)  # a decoder-only student
    config.data.train = [str(root / "pairs.tsv")]
    with pytest.raises(ValueError, match="the student is decoder-only but the teacher is encoder-decoder"):
        DistillTrainer(config, str(root / "teacher"))
