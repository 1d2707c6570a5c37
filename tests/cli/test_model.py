"""`zenlm info` (cli/model.py)."""
from zenlm.cli import main


def test_info_on_preset_prints_costs(capsys):
    assert main(["info", "gpt2-small", "--batch-size", "2", "--seq-len", "128"]) == 0
    out = capsys.readouterr().out
    assert "124,439,808" in out and "training FLOPs/token" in out and "optimizer" in out


def test_info_on_checkpoint_folder(tmp_path, capsys):
    from zenlm import TransformerConfig, TransformerLM

    TransformerLM(TransformerConfig.from_preset("tiny")).save_pretrained(tmp_path)
    assert main(["info", str(tmp_path)]) == 0
    assert "decoder-only" in capsys.readouterr().out


def test_info_prints_the_library_cost_summary(capsys):
    from zenlm import TransformerConfig
    from zenlm.estimate import cost_summary, human_bytes, human_count

    assert main(["info", "tiny", "--batch-size", "2", "--bytes-per-param", "2"]) == 0
    table = cost_summary(TransformerConfig.from_preset("tiny"), 2, bytes_per_param=2, name="tiny")
    assert capsys.readouterr().out == table + "\n"
    assert table.splitlines()[1] == "parameters            1,574,016 (1.57M)"
    assert (human_count(1_574_016), human_count(11e6), human_bytes(6 * 2**20), human_bytes(1.5 * 2**30)) == \
        ("1.57M", "11M", "6.0 MiB", "1.5 GiB")


def test_info_system_prints_the_kernels_summary(capsys):
    from zenlm.kernels import system_summary

    assert main(["info", "--system"]) == 0
    out = capsys.readouterr().out
    assert out == system_summary() + "\n" and out.startswith("CPU: ") and "fp32 linear layers under fast_cpu()" in out
