"""The model, specified: shapes, causality, padding, KV cache, heads, bad input."""
import pytest
import torch

from zenlm import KVCache, TransformerConfig, TransformerLM, TransformerModel

FLAVOURS = {
    # a small model of each flag combination the public families need
    "bart-like": dict(pre_norm=False, embedding_norm=True, final_norm=False, position_offset=2),
    "gpt2-like": dict(activation="gelu_tanh"),
    "llama-like": dict(norm="rmsnorm", activation="swiglu", position="rotary", bias=False,
                       num_key_value_heads=2, tie_word_embeddings=False),
    "marian-like": dict(pre_norm=False, final_norm=False, position="sinusoidal", scale_embedding=True,
                        activation="silu", lm_head_bias=True),
    "bert-like": dict(pre_norm=False, embedding_norm=True, final_norm=False, type_vocab_size=2,
                      mlm_transform=True, lm_head_bias=True),
    "geglu-relu": dict(activation="geglu"),
}


def small(enc: int = 2, dec: int = 2, **kw) -> TransformerConfig:
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                num_encoder_layers=enc, num_decoder_layers=dec, max_position_embeddings=64)
    return TransformerConfig(**{**base, **kw})


def build(config, cls=TransformerLM):
    torch.manual_seed(0)
    return cls(config).eval()


def test_contract_snippet_runs_as_written():
    import torch
    from zenlm import TransformerModel, TransformerConfig

    config = TransformerConfig(vocab_size=10000, max_position_embeddings=512, num_attention_heads=8,
                               num_encoder_layers=6, num_decoder_layers=6)
    model = TransformerModel(config)
    input_ids = torch.randint(0, 10000, (1, 512))
    output_ids = torch.randint(0, 10000, (1, 512))
    with torch.no_grad():
        outputs = model(input_ids, output_ids)
    assert outputs.last_hidden_state.shape == torch.Size([1, 512, 768])
    assert outputs.encoder_last_hidden_state.shape == torch.Size([1, 512, 768])
    assert config.hidden_size == 768 and config.intermediate_size == 3072


@pytest.mark.parametrize("enc,dec,family", [(2, 2, "encoder-decoder"), (0, 2, "decoder-only"), (2, 0, "encoder-only")])
def test_shapes_for_all_three_families(enc, dec, family):
    config = small(enc, dec)
    assert config.family == family
    model = build(config)
    ids = torch.randint(0, 97, (3, 7))
    out = model(ids, torch.randint(0, 97, (3, 5))) if family == "encoder-decoder" else model(ids)
    length = 5 if family == "encoder-decoder" else 7
    assert out.last_hidden_state.shape == (3, length, 32)
    assert out.logits.shape == (3, length, 97)
    if family == "encoder-decoder":
        assert out.encoder_last_hidden_state.shape == (3, 7, 32)
    else:
        assert out.encoder_last_hidden_state is None


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("enc,dec", [(0, 2), (2, 2)])
def test_decoder_is_causal(flavour, enc, dec):
    model = build(small(enc, dec, **FLAVOURS[flavour]))
    src = torch.randint(0, 97, (1, 6))
    tgt = torch.randint(0, 97, (1, 10))
    changed = tgt.clone()
    changed[0, 6] = (tgt[0, 6] + 1) % 97
    run = (lambda t: model(src, t).last_hidden_state) if enc else (lambda t: model(t).last_hidden_state)
    a, b = run(tgt), run(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 6:], b[:, 6:])


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("enc,dec", [(0, 2), (2, 0), (2, 2)])
def test_padded_batch_equals_rows_run_alone(flavour, enc, dec):
    model = build(small(enc, dec, **FLAVOURS[flavour]))
    lengths = [7, 4, 1]
    rows = [torch.randint(3, 97, (1, n)) for n in lengths]
    ids = torch.zeros(3, 7, dtype=torch.long)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : r.size(1)], mask[i, : r.size(1)] = r[0], 1
    if enc and dec:
        tgt = torch.randint(3, 97, (3, 4))
        batched = model(ids, tgt, attention_mask=mask).last_hidden_state
        for i, r in enumerate(rows):
            alone = model(r, tgt[i:i + 1]).last_hidden_state
            torch.testing.assert_close(batched[i], alone[0], atol=1e-5, rtol=0)
    else:
        batched = model(ids, attention_mask=mask).last_hidden_state
        for i, r in enumerate(rows):
            alone = model(r).last_hidden_state
            torch.testing.assert_close(batched[i, : r.size(1)], alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_kv_cache_decoding_matches_full_forward_decoder_only(flavour):
    model = build(small(0, 2, **FLAVOURS[flavour]))
    ids = torch.randint(0, 97, (2, 12))
    full = model(ids).logits
    cache = KVCache(capacity=4)  # small on purpose: exercises growth
    out = model(ids[:, :5], past_key_values=cache, use_cache=True)
    steps = [out.logits]
    for t in range(5, 12):
        steps.append(model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
    assert cache.length == 12


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_kv_cache_decoding_matches_full_forward_encoder_decoder(flavour):
    model = build(small(2, 2, **FLAVOURS[flavour]))
    src, src_mask = torch.randint(0, 97, (2, 9)), torch.ones(2, 9, dtype=torch.long)
    src_mask[1, 6:] = 0
    tgt = torch.randint(0, 97, (2, 8))
    full = model(src, tgt, attention_mask=src_mask).logits
    first = model(src, tgt[:, :3], attention_mask=src_mask, use_cache=True)
    cache, memory = first.past_key_values, first.encoder_last_hidden_state
    assert len(cache.cross) == 2  # cross-attention K/V computed once per layer
    cross_before = [k.data_ptr() for k, _ in cache.cross.values()]
    steps = [first.logits]
    for t in range(3, 8):
        out = model(None, tgt[:, t:t + 1], attention_mask=src_mask, encoder_hidden_states=memory,
                    past_key_values=cache, use_cache=True)
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
    assert [k.data_ptr() for k, _ in cache.cross.values()] == cross_before


def test_cache_with_left_padding_matches_full_forward():
    model = build(small(0, 2, position="rotary", norm="rmsnorm"))
    ids = torch.randint(3, 97, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    full = model(ids, attention_mask=mask, position_ids=pos).logits
    cache = KVCache()
    steps = [model(ids[:, :6], attention_mask=mask[:, :6], position_ids=pos[:, :6], past_key_values=cache,
                   use_cache=True).logits]
    for t in range(6, 9):
        steps.append(model(ids[:, t:t + 1], attention_mask=mask[:, : t + 1], position_ids=pos[:, t:t + 1],
                           past_key_values=cache, use_cache=True).logits)
    got = torch.cat(steps, 1)
    torch.testing.assert_close(got[0], full[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1, 3:], full[1, 3:], atol=1e-5, rtol=0)
    # the left-padded row equals the unpadded sequence run alone
    alone = model(ids[1:, 3:]).logits
    torch.testing.assert_close(full[1, 3:], alone[0], atol=1e-5, rtol=0)


def test_cache_reorder_selects_rows():
    model = build(small(0, 2))
    ids = torch.randint(0, 97, (3, 5))
    cache = KVCache()
    model(ids, past_key_values=cache, use_cache=True)
    cache.reorder(torch.tensor([2, 2, 0]))
    nxt = torch.randint(0, 97, (3, 1))
    got = model(nxt, past_key_values=cache, use_cache=True).logits[:, -1]
    want = model(torch.cat([ids[[2, 2, 0]], nxt], 1)).logits[:, -1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("enc,dec", [(0, 2), (2, 0), (2, 2)])
def test_explicit_attention_path_agrees_with_sdpa_and_returns_weights(flavour, enc, dec):
    model = build(small(enc, dec, **FLAVOURS[flavour]))
    ids = torch.randint(0, 97, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, 4:] = 0
    args = (ids, torch.randint(0, 97, (2, 5))) if enc and dec else (ids,)
    fast = model(*args, attention_mask=mask)
    slow = model(*args, attention_mask=mask, output_attentions=True)
    torch.testing.assert_close(fast.logits, slow.logits, atol=1e-5, rtol=0)
    weights = slow.attentions
    assert len(weights) == 2 and weights[0].shape[:2] == (2, 4)
    torch.testing.assert_close(weights[0].sum(-1), torch.ones_like(weights[0].sum(-1)))
    if dec:  # causal: nothing above the diagonal
        assert torch.all(weights[0][1].triu(1) == 0)
    if enc and dec:
        assert slow.cross_attentions[0].shape == (2, 4, 5, 6)
        assert torch.all(slow.cross_attentions[0][0, :, :, 4:] == 0)  # padded source keys get no weight
        assert slow.encoder_attentions[0].shape == (2, 4, 6, 6)


def test_grouped_query_attention_shares_kv_heads():
    config = small(0, 1, num_key_value_heads=1)
    model = build(config)
    assert model.decoder.layers[0].attn.qkv.out_features == 32 + 2 * 8
    assert model(torch.randint(0, 97, (1, 4))).logits.shape == (1, 4, 97)


def test_causal_lm_loss_shifts_labels_inside():
    model = build(small(0, 2))
    ids = torch.randint(0, 97, (2, 8))
    out = model(ids, labels=ids)
    manual = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, manual)


def test_seq2seq_loss_builds_decoder_inputs_from_labels():
    config = small(2, 2, decoder_start_token_id=5)
    model = build(config)
    src, labels = torch.randint(3, 97, (2, 6)), torch.randint(3, 97, (2, 4))
    labels[1, 3] = -100
    out = model(src, labels=labels)
    dec_in = torch.cat([torch.full((2, 1), 5), labels[:, :-1]], 1)
    same = model(src, dec_in)
    torch.testing.assert_close(out.logits, same.logits)
    manual = torch.nn.functional.cross_entropy(same.logits.reshape(-1, 97), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, manual)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_blockwise_cross_entropy_equals_torch_value_and_gradient(dtype, smoothing):
    # more rows than one block holds, ignored rows among them, logits in the training dtype
    from zenlm.kernels import cross_entropy
    torch.manual_seed(0)
    logits = (torch.randn(300, 1234) * 3).to(dtype).requires_grad_()
    labels = torch.randint(0, 1234, (300,))
    labels[::7] = -100
    before = logits.detach().clone()
    ours = cross_entropy(logits, labels, -100, smoothing)
    (g_ours,) = torch.autograd.grad(ours * 2.5, logits)
    ref = torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=-100, label_smoothing=smoothing)
    (g_ref,) = torch.autograd.grad(ref * 2.5, logits)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    assert g_ours.dtype == dtype and not g_ours[::7].any()  # ignored rows get no gradient
    tol = 1e-7 if dtype == torch.float32 else 2 ** -8 * float(g_ref.abs().max())
    torch.testing.assert_close(g_ours.float(), g_ref.float(), rtol=0, atol=tol)
    assert torch.equal(logits.detach(), before)  # the logits are read, never written (an fp32 block is a view)


def test_cross_entropy_with_every_row_ignored_is_nan_like_torch_and_bad_labels_are_named():
    from zenlm.kernels import cross_entropy
    logits = torch.randn(4, 10)
    assert torch.isnan(cross_entropy(logits, torch.full((4,), -100)))
    with pytest.raises(ValueError, match=r"label 10 .*\[0, 10\)"):
        cross_entropy(logits, torch.tensor([1, 2, 10, -100]))
    with pytest.raises(ValueError, match=r"label -3 "):
        cross_entropy(logits, torch.tensor([1, -3, 2, 3]))


def test_masked_lm_loss_ignores_unmasked_positions():
    model = build(small(2, 0, **FLAVOURS["bert-like"]))
    ids = torch.randint(5, 97, (2, 8))
    labels = torch.full_like(ids, -100)
    labels[0, 2], labels[1, 5] = ids[0, 2], ids[1, 5]
    out = model(ids, labels=labels)
    picked = out.logits[[0, 1], [2, 5]]
    manual = torch.nn.functional.cross_entropy(picked, ids[[0, 1], [2, 5]])
    torch.testing.assert_close(out.loss, manual)


@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_pooled_embeddings(pooling):
    model = build(small(2, 0), TransformerModel)
    ids = torch.randint(3, 97, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    vecs = model.embed(ids, mask, pooling=pooling)
    assert vecs.shape == (2, 32)
    torch.testing.assert_close(vecs.norm(dim=-1), torch.ones(2))
    alone = model.embed(ids[1:, :4], pooling=pooling)
    torch.testing.assert_close(vecs[1], alone[0], atol=1e-5, rtol=0)
    raw = model.embed(ids, mask, pooling=pooling, normalize=False)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(2))


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig.from_preset("tiny", vocab_size=64, max_position_embeddings=32))
    ids = torch.randint(0, 64, (4, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(200):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.1:
            break
    assert loss.item() < 0.1, f"loss {loss.item():.3f} after {step + 1} steps"


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad,match", [
    (torch.rand(1, 4), "integer token ids"),
    (torch.randint(0, 97, (1, 2, 3)), "2-D"),
    (torch.tensor([[1, 97]]), "97, outside \\[0, vocab_size=97\\)"),
    (torch.tensor([[-1, 2]]), "-1, outside"),
    (torch.randint(0, 97, (1, 65)), "position 65 .*max_position_embeddings=64"),
    (torch.zeros(1, 0, dtype=torch.long), "empty"),
])
@pytest.mark.parametrize("enc,dec", [(0, 2), (2, 0), (2, 2)])
def test_bad_ids_raise_value_error_naming_value_and_limit(bad, match, enc, dec):
    model = build(small(enc, dec))
    with pytest.raises(ValueError, match=match):
        if enc and dec:
            model(bad, torch.randint(0, 97, (1, 3)))
        else:
            model(bad)


def test_bad_decoder_ids_and_masks():
    model = build(small(2, 2))
    src = torch.randint(0, 97, (2, 5))
    with pytest.raises(ValueError, match="decoder_input_ids holds token id 200"):
        model(src, torch.tensor([[1, 200], [1, 2]]))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 4\); expected \(2, 5\)"):
        model(src, src, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="needs decoder_input_ids"):
        model(src)
    dec_only = build(small(0, 2))
    with pytest.raises(ValueError, match="decoder-only model takes one sequence"):
        dec_only(src, src)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 5\); expected \(2, 5\)"):
        dec_only(src, attention_mask=torch.ones(1, 5))


def test_sequence_longer_than_context_with_cache_names_both_lengths():
    model = build(small(0, 2))
    cache = KVCache()
    model(torch.randint(0, 97, (1, 60)), past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match=r"position 65 \(length 5 \+ 60 cached\)"):
        model(torch.randint(0, 97, (1, 5)), past_key_values=cache, use_cache=True)


# --------------------------------------------------------------------------- open-model flags
OPEN_FLAGS = dict(vocab_size=97, hidden_size=48, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                  num_encoder_layers=0, num_decoder_layers=3, max_position_embeddings=128, position="rotary",
                  norm="rmsnorm", activation="geglu_tanh", bias=False, qkv_bias=True, head_size=16, qk_norm=True,
                  norm_unit_offset=True, sandwich_norm=True, scale_embedding=True, sliding_window=6,
                  layer_types=["sliding_attention", "full_attention", "sliding_attention"], rope_local_theta=100.0,
                  query_pre_attn_scalar=20.0, attn_logit_softcap=2.0, final_logit_softcap=5.0,
                  partial_rotary_factor=0.5, rope_scaling={"rope_type": "linear", "factor": 2.0})


def test_sliding_window_attention_sees_exactly_the_last_window_positions():
    """Changing a token moves the logits of the positions that can see it: within the window for a
    model whose every layer slides (one layer: no path around the window)."""
    torch.manual_seed(0)
    config = TransformerConfig(**{**OPEN_FLAGS, "num_decoder_layers": 1, "layer_types": None})
    model = TransformerLM(config).eval()
    ids = torch.randint(0, 97, (1, 30))
    changed = ids.clone()
    changed[0, 10] = (ids[0, 10] + 1) % 97
    with torch.no_grad():
        moved = (model(ids).logits - model(changed).logits).abs().amax(-1)[0]
    assert (moved[10:16] > 1e-6).all() and (moved[16:] == 0).all() and (moved[:10] == 0).all()


def test_every_open_model_flag_at_once_decodes_through_a_trimmed_cache_as_the_full_forward():
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(**OPEN_FLAGS)).eval()
    ids = torch.randint(0, 97, (2, 40))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        cache = KVCache(capacity=4, trim_windows=True)
        steps = [model(ids[:, :3], attention_mask=mask[:, :3], past_key_values=cache, use_cache=True).logits]
        for t in range(3, 40):
            steps.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache,
                               use_cache=True).logits)
    keep = mask.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[keep], full[keep], atol=1e-5, rtol=1e-5)
    assert cache.start(0) > 0 and cache.keys[0].size(2) <= 12 and cache.start(1) == 0  # windows trimmed, global not
    assert full.abs().max() <= 5.0  # the final soft cap


def test_gemma_rmsnorm_scales_by_one_plus_weight():
    from zenlm.model import make_norm

    norm = make_norm(TransformerConfig(**OPEN_FLAGS))
    x = torch.randn(3, 48)
    torch.testing.assert_close(norm(x), torch.nn.functional.rms_norm(x, (48,), eps=norm.eps))  # weight 0: plain
