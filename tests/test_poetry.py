"""Form-constrained poems: four lines of five or seven characters, from any (here random) model."""
import re

import pytest
from tiny_app_models import save_tiny

from zenlm import load, load_tokenizer
from zenlm.tasks.poetry import check_form, write_poem

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("lines,chars", [(4, 5), (4, 7)])
def test_poem_has_the_form(tmp_path, lines, chars):
    path = save_tiny(tmp_path / "m", "decoder-only")
    model, tok = load(path), load_tokenizer(path)
    for seed in (chars,):
        poem = write_poem(model, tok, "明月", lines=lines, chars=chars, seed=seed)
        rows = poem.rstrip("\n").split("\n")
        assert len(rows) == lines
        for i, row in enumerate(rows):  # an independent check of the form
            assert re.fullmatch(r"[\u4e00-\u9fff]{%d}%s" % (chars, "，" if i % 2 == 0 else "。"), row), poem
        assert check_form(poem, lines, chars)
    # the same seed gives the same poem
    assert write_poem(model, tok, "明月", lines=lines, chars=chars, seed=chars) == poem


def test_check_form_rejects_other_shapes():
    good = "床前明月光，\n疑是地上霜。\n舉頭望明月，\n低頭思故鄉。\n"
    assert check_form(good, 4, 5)
    assert not check_form(good, 4, 7)
    assert not check_form(good.replace("床前明月光", "床前明月光光"), 4, 5)
    assert not check_form(good.replace("明月光，", "明月光。"), 4, 5)
    assert not check_form("床前mo月光，\n疑是地上霜。\n舉頭望明月，\n低頭思故鄉。", 4, 5)
    with pytest.raises(ValueError, match="lines and chars must be integers >= 1"):
        write_poem(None, None, "t", lines=0)
