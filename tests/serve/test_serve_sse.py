"""The streamed token chunks are rendered from a template, not a pydantic model per token: they
must be the very bytes the pydantic model would give, for any text."""
from __future__ import annotations

import json

import pytest

from zenlm.serve.routes.generation import _chunk, _sse, _TokenChunks

TEXTS = ["hi", "", " \"quoted\" \\ back\\slash", "line\nbreak\ttab\r", "é 中文 🙂", "\u2028\u2029", "\x00\x1f\x7f",
         _TokenChunks.SLOT, "{\"choices\":[]}", "</script>"]


@pytest.mark.parametrize("chat", [True, False])
def test_template_chunks_are_the_pydantic_bytes(chat):
    chunks = _TokenChunks(chat, "chatcmpl-abc" if chat else "cmpl-abc", 1_700_000_000, "my/model-1")
    for index in (0, 1, 7):
        for text in TEXTS:
            got = chunks(index, text)
            want = _sse(_chunk(chat, "chatcmpl-abc" if chat else "cmpl-abc", 1_700_000_000, "my/model-1", index, text))
            assert got == want
            assert got.startswith("data: ") and got.endswith("\n\n")
            body = json.loads(got[6:])
            assert body["choices"][0]["index"] == index
            assert (body["choices"][0]["delta"]["content"] if chat else body["choices"][0]["text"]) == text
