"""`zenlm evaluate chat` (cli/generate.py)."""
import pytest

from zenlm.cli import main


def test_evaluate_chat_is_a_command(tmp_path, capsys):
    # the README shows it; its parser was once written and never registered
    with pytest.raises(SystemExit) as done:
        main(["evaluate", "chat", "--help"])
    assert done.value.code == 0 and "--data" in capsys.readouterr().out
    assert main(["evaluate", "chat", str(tmp_path / "none"), "--data", "x.jsonl"]) == 2
    assert "no model folder" in capsys.readouterr().err


def test_translation_scores_print_with_their_signatures():
    from zenlm.tasks.translate import format_scores

    result = {"bleu_text": "BLEU = 12.3", "bleu_signature": "nrefs:1|tok:13a", "chrf_text": "chrF2 = 40.1",
              "chrf_signature": "nrefs:1|nc:6", "sentences": 3}
    assert format_scores(result).splitlines() == ["BLEU = 12.3", "BLEU signature: nrefs:1|tok:13a", "chrF2 = 40.1",
                                                  "chrF signature: nrefs:1|nc:6", "3 sentences"]
    assert format_scores({**result, "seconds": 1.5}).endswith("3 sentences in 1.5s")


def test_generate_compile_flag_reaches_the_generation_config(tmp_path, capsys, monkeypatch):
    # the captured step itself is tested in tests/test_decode_step.py; here: the flag asks for it, and
    # without the flag the eager path runs
    from tiny_app_models import save_tiny

    import zenlm.generation as generation

    folder = save_tiny(tmp_path / "m", family="decoder-only")
    asked = []
    stream = generation.Generator.stream

    def spy(self, prompt, **options):
        asked.append(options.get("compile"))
        return stream(self, prompt, **{**options, "compile": False})

    monkeypatch.setattr(generation.Generator, "stream", spy)
    assert main(["generate", str(folder), "--prompt", "A man", "--max-new-tokens", "3", "--compile"]) in (0, None)
    assert main(["generate", str(folder), "--prompt", "A man", "--max-new-tokens", "3"]) in (0, None)
    assert asked == [True, False]
