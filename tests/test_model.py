"""LyraModel end to end on the tiny preset: parity with transformers' Qwen2-VL, LMME, batched
generation, LCMR, the speech paths, adapters and input errors."""
from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from transformers import Qwen2VLForConditionalGeneration

from lyra_pl import LyraConfig, LyraInputs, LyraModel, ops, reference
from lyra_pl.model import Sample, collate, lora
from lyra_pl.model.assemble import IGNORE
from lyra_pl.model.audio import AudioBatch
from lyra_pl.model.lcmr import pad_sequences

IMG, VID, SPEECH, SOUND = 500, 501, 502, 503
PATCH = 3 * 2 * 14 * 14


def tiny(**overrides) -> LyraConfig:
    return LyraConfig.from_preset("tiny", **overrides)


def build(cfg: LyraConfig, seed: int = 0, dtype=torch.float32) -> LyraModel:
    torch.manual_seed(seed)
    return LyraModel(cfg).to(dtype).eval()


def images(grids: list[list[int]], dtype=torch.float32, seed: int = 1):
    g = torch.tensor(grids)
    torch.manual_seed(seed)
    return torch.randn(int(g.prod(1).sum()), PATCH, dtype=dtype), g


def hf_twin(model: LyraModel) -> Qwen2VLForConditionalGeneration:
    """transformers' Qwen2-VL with our model's weights."""
    hf = Qwen2VLForConditionalGeneration(model.config.qwen2vl_config()).to(
        model.lm_head.weight.dtype).eval()
    state = {f"model.language_model.{k}": v for k, v in model.llm.state_dict().items()}
    state |= {f"model.visual.{k}": v for k, v in model.visual.state_dict().items()}
    state["lm_head.weight"] = model.lm_head.weight
    hf.load_state_dict(state)
    return hf


def expand(ids: list[int], counts: dict[int, list[int]]) -> tuple[list[int], list[int]]:
    """One placeholder per item -> Qwen2-VL's repeated pad tokens, and mm_token_type_ids."""
    left = {k: list(v) for k, v in counts.items()}
    out, types = [], []
    for t in ids:
        if t in left:
            n = left[t].pop(0)
            out += [t] * n
            types += [1 if t == IMG else 2] * n
        else:
            out.append(t)
            types.append(0)
    return out, types


# ----------------------------------------------------------------------------- parity
def test_logits_match_qwen2vl_text_image_video():
    cfg = tiny()
    model = build(cfg)
    hf = hf_twin(model)
    pix, grid = images([[1, 4, 6], [1, 2, 2], [1, 4, 4]])
    vpix, vgrid = images([[2, 4, 6]], seed=2)
    ids = torch.tensor([
        [5, 6, IMG, 7, 8, IMG, 9, VID, 3],
        [10, IMG, 11, 12, 13, 14, 15, 0, 0],
        [20, 21, 22, 23, 24, 25, 0, 0, 0],
    ])
    lengths = torch.tensor([9, 7, 6])
    inputs = LyraInputs(ids, lengths, pixel_values=pix, image_grid_thw=grid,
                        pixel_values_videos=vpix, video_grid_thw=vgrid)
    with torch.no_grad():
        ours = model(inputs, return_logits=True).logits
    per_image = (grid.prod(1) // 4).tolist()
    patches = grid.prod(1).cumsum(0).tolist()
    image_rows = [[0, 1], [2], []]
    for b in range(3):
        items = image_rows[b]
        seq, types = expand(ids[b, : lengths[b]].tolist(),
                            {IMG: [per_image[i] for i in items], VID: [int(vgrid.prod(1)) // 4]})
        kw = {}
        if items:
            lo, hi = ([0] + patches)[items[0]], patches[items[-1]]
            kw.update(pixel_values=pix[lo:hi], image_grid_thw=grid[items])
        if VID in seq:
            kw.update(pixel_values_videos=vpix, video_grid_thw=vgrid)
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor([seq]), mm_token_type_ids=torch.tensor([types]),
                     **kw).logits[0]
        torch.testing.assert_close(ours[b, : len(seq)], ref, rtol=0, atol=1e-5)


def test_lmme_keep_all_leaves_logits_unchanged():
    pix, grid = images([[1, 4, 6], [1, 2, 2]])
    ids = torch.tensor([[5, IMG, 7, 8, 9, 4], [IMG, 11, 12, 0, 0, 0]])
    inputs = LyraInputs(ids, torch.tensor([6, 3]), pixel_values=pix, image_grid_thw=grid)
    plain = build(tiny())
    pruned = build(tiny(lmme_blocks=4, lmme_keep_ratio=1.0, lmme_min_keep=0))
    with torch.no_grad():
        a = plain(inputs, return_logits=True)
        b = pruned(inputs, return_logits=True)
    assert len(b.keeps) == 3
    assert torch.equal(a.state.valid, b.state.valid)
    valid = a.state.valid
    assert torch.equal(a.logits[valid], b.logits[valid])  # padding rows carry no meaning


# ----------------------------------------------------------------------------- LMME
def _compact_ref(mask: torch.Tensor, kept: list[list[int]]) -> torch.Tensor:
    out = torch.zeros(len(kept), max(len(k) for k in kept), dtype=mask.dtype)
    for b, idx in enumerate(kept):
        out[b, : len(idx)] = mask[b, idx]
    return out


@pytest.mark.parametrize("ratio,min_keep", [(0.5, 2), (0.3, 0), (0.7, 40)])
def test_lmme_keeps_follow_prune_tokens(ratio, min_keep):
    """At each pruning layer the kept tokens are exactly the plain-PyTorch reference selection
    on that layer's post-RoPE q and k, recomputed here from the layer's input."""
    cfg = tiny(lmme_blocks=4, lmme_keep_ratio=ratio, lmme_min_keep=min_keep)
    model = build(cfg, dtype=torch.float64)
    pix, grid = images([[1, 4, 6], [1, 6, 4], [1, 2, 2]], dtype=torch.float64)
    speech = AudioBatch.from_list([torch.randn(16000 * 2) * 0.1])
    ids = torch.tensor([
        [5, 6, IMG, 7, 8, IMG, 9, 3, 4],
        [10, SPEECH, 11, 12, IMG, 13, 14, 15, 0],
    ])
    labels = torch.full_like(ids, IGNORE)
    labels[0, 7:9] = ids[0, 7:9]
    inputs = LyraInputs(ids, torch.tensor([9, 8]), labels=labels, pixel_values=pix,
                        image_grid_thw=grid, speech=speech)
    seen = []
    hooks = [
        model.llm.layers[i].register_forward_pre_hook(
            lambda m, args, kwargs: seen.append((m, args[0], kwargs["position_embeddings"])),
            with_kwargs=True,
        )
        for i in cfg.lmme_layers()
    ]
    with torch.no_grad():
        assembled, _ = model.prepare(inputs)
        out = model(inputs)
    for h in hooks:
        h.remove()
    assert len(out.keeps) == len(cfg.lmme_layers()) == 3
    kept = [list(range(int(n))) for n in assembled.lengths]
    for step, (layer, h_in, (cos, sin)) in enumerate(seen[-3:]):
        x = layer.input_layernorm(h_in)
        B, N, _ = x.shape
        hd = cfg.head_dim
        q = layer.self_attn.q_proj(x).view(B, N, -1, hd).transpose(1, 2)
        k = layer.self_attn.k_proj(x).view(B, N, -1, hd).transpose(1, 2)
        q = q * cos[:, None] + torch.cat([-q[..., hd // 2:], q[..., : hd // 2]], -1) * sin[:, None]
        k = k * cos[:, None] + torch.cat([-k[..., hd // 2:], k[..., : hd // 2]], -1) * sin[:, None]
        masks = [_compact_ref(m, kept) for m in
                 (assembled.instruction, assembled.context, assembled.valid)]
        expected = reference.prune_tokens(q, k, *masks, ratio, min_keep)
        assert torch.equal(out.keeps[step], expected), f"pruning step {step}"
        n_ctx = masks[1].sum(1)
        # Exact decimal arithmetic, independent of the kernels' double rule.
        share = Fraction(repr(ratio))
        want = torch.tensor([c if c < min_keep else max(min_keep, c * share.numerator //
                                                          share.denominator)
                             for c in n_ctx.tolist()])
        assert torch.equal((expected & masks[1]).sum(1), want)
        kept = [[kept[b][j] for j in expected[b].nonzero().flatten().tolist()] for b in range(B)]
    for b in range(2):
        assert out.state.index[b, : len(kept[b])].tolist() == kept[b]


def test_lmme_training_keeps_every_answer_target():
    pix, grid = images([[1, 8, 8]])
    ids = torch.tensor([[5, IMG, 7, 8, 9, 10, 11, 12]])
    labels = torch.full_like(ids, IGNORE)
    labels[0, 5:] = ids[0, 5:]
    inputs = LyraInputs(ids, labels=labels, pixel_values=pix, image_grid_thw=grid)
    plain = build(tiny())
    pruned = build(tiny(lmme_blocks=2, lmme_keep_ratio=0.25, lmme_min_keep=1))
    a, b = plain(inputs), pruned(inputs)
    assert b.state.hidden.shape[1] < a.state.hidden.shape[1]
    ta, tb = a.state.targets, b.state.targets
    assert torch.equal(ta[ta != IGNORE], tb[tb != IGNORE])
    assert torch.isfinite(b.loss)
    b.loss.backward()
    assert pruned.llm.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert pruned.visual.merger.mlp[2].weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- generation
def _prompts():
    pix, grid = images([[1, 4, 6], [1, 2, 2], [1, 4, 4]], dtype=torch.float64)
    torch.manual_seed(3)
    clip = torch.randn(16000 * 3) * 0.1
    ids = torch.tensor([
        [5, 6, IMG, 7, 8, IMG, 9, 3],
        [10, IMG, 11, 12, 13, 0, 0, 0],
        [20, 21, 22, 23, SPEECH, 24, 25, 26],
    ])
    lengths = torch.tensor([8, 5, 8])
    batch = LyraInputs(ids, lengths, pixel_values=pix, image_grid_thw=grid,
                       speech=AudioBatch.from_list([clip]))
    cut = int(grid[:2].prod(1).sum())
    singles = [
        LyraInputs(ids[:1, :8], pixel_values=pix[:cut], image_grid_thw=grid[:2]),
        LyraInputs(ids[1:2, :5], pixel_values=pix[cut:], image_grid_thw=grid[2:]),
        LyraInputs(ids[2:, :8], speech=AudioBatch.from_list([clip])),
    ]
    return batch, singles


def _double(model: LyraModel) -> LyraModel:
    return model.double()


def test_batched_generation_with_lmme_equals_one_by_one():
    cfg = tiny(lmme_blocks=2, lmme_keep_ratio=0.5, lmme_min_keep=2)
    model = _double(build(cfg))
    batch, singles = _prompts()
    out = model.generate(batch, max_new_tokens=10)
    assert [int(k) for k in out.kept[0]] != [0, 0, 0]
    for b, single in enumerate(singles):
        alone = model.generate(single, max_new_tokens=10)
        assert alone.tokens[0] == out.tokens[b]
        assert int(alone.kept[0][0]) == int(out.kept[0][b])
    assert all(len(t) == 10 for t in out.tokens)


def test_generation_without_lmme_matches_transformers_generate():
    model = _double(build(tiny()))
    hf = hf_twin(model)
    pix, grid = images([[1, 4, 6]], dtype=torch.float64)
    ids = [5, 6, IMG, 7, 8, 9]
    ours = model.generate(LyraInputs(torch.tensor([ids]), pixel_values=pix, image_grid_thw=grid),
                          max_new_tokens=8, eos_token_ids=[])
    seq, types = expand(ids, {IMG: [6]})
    ref = hf.generate(input_ids=torch.tensor([seq]), mm_token_type_ids=torch.tensor([types]),
                      pixel_values=pix, image_grid_thw=grid, max_new_tokens=8, do_sample=False,
                      eos_token_id=None, pad_token_id=0, min_new_tokens=8)
    assert ours.tokens[0] == ref[0, len(seq):].tolist()


def test_generation_stops_and_samples():
    model = _double(build(tiny()))
    batch, _ = _prompts()
    free = model.generate(batch, max_new_tokens=6, eos_token_ids=[])
    row = free.tokens[2]
    eos = row[2]
    stopped = model.generate(batch, max_new_tokens=6, eos_token_ids=[eos])
    assert stopped.tokens[2] == row[: row.index(eos) + 1]
    seq = row[1:3]
    ends = next(i for i in range(2, 7) if row[i - 2:i] == seq)
    by_seq = model.generate(batch, max_new_tokens=6, eos_token_ids=[], stop_token_ids=[seq])
    assert by_seq.tokens[2] == row[:ends]
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    s1 = model.generate(batch, max_new_tokens=5, do_sample=True, top_k=20, top_p=0.9,
                        temperature=0.8, generator=g(), eos_token_ids=[])
    s2 = model.generate(batch, max_new_tokens=5, do_sample=True, top_k=20, top_p=0.9,
                        temperature=0.8, generator=g(), eos_token_ids=[])
    assert s1.tokens == s2.tokens and all(len(t) == 5 for t in s1.tokens)
    placeholders = set(model.config.placeholder_ids.values())
    assert not placeholders & {t for row in free.tokens + s1.tokens for t in row}
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(batch, max_new_tokens=0)


def test_streaming_speech_units_during_generation():
    model = _double(build(tiny()))
    batch, _ = _prompts()
    steps = []
    out = model.generate(batch, max_new_tokens=4, eos_token_ids=[], speech=True,
                         on_step=lambda tok, units: steps.append((tok, units)))
    assert len(steps) == 4 and out.units is not None and len(out.units) == 3
    for b in range(3):
        assert sum((u[b] for _, u in steps), []) == out.units[b]
        assert all(0 <= u < model.config.n_units for u in out.units[b])


# ----------------------------------------------------------------------------- speech paths
def test_two_hour_audio_gives_ten_tokens_per_second():
    model = build(tiny(audio_window_batch=4))
    seconds = 2 * 3600
    clip = torch.randn(seconds * 16000) * 0.05
    ids = torch.tensor([[5, SPEECH, 6, 7]])
    with torch.no_grad():
        assembled, media = model.prepare(LyraInputs(ids, speech=AudioBatch.from_list([clip])))
    assert int(media[3].counts[0]) == 10 * seconds == 72_000
    assert int(assembled.lengths[0]) == 72_000 + 3
    assert int((assembled.modality == 3).sum()) == 72_000


def test_short_clip_gets_only_its_real_tokens():
    model = build(tiny())
    clips = [torch.randn(int(16000 * 2)) * 0.1, torch.randn(int(16000 * 0.55)) * 0.1]
    with torch.no_grad():
        _, media = model.prepare(LyraInputs(torch.tensor([[SPEECH, 5], [SPEECH, 6]]),
                                            speech=AudioBatch.from_list(clips)))
    assert media[3].counts.tolist() == [20, 6]


def test_lcmr_is_returned_and_weighted():
    model = build(tiny(lcmr_weight=0.5))
    clips = [torch.randn(16000 * 2) * 0.1, torch.randn(16000) * 0.1]
    ids = torch.tensor([[SPEECH, 5, 6, 7], [8, SPEECH, 9, 10]])
    labels = torch.full_like(ids, IGNORE)
    labels[:, 2:] = ids[:, 2:]
    transcripts = torch.tensor([[11, 12, 13, 0], [0, 0, 0, 0]])
    inputs = LyraInputs(ids, labels=labels, speech=AudioBatch.from_list(clips),
                        transcript_ids=transcripts, transcript_lengths=torch.tensor([3, 0]))
    out = model(inputs)
    assert out.lcmr_loss is not None and out.ce_loss is not None
    torch.testing.assert_close(out.loss, out.ce_loss + 0.5 * out.lcmr_loss)
    with torch.no_grad():
        _, media = model.prepare(inputs)
        speech = pad_sequences(media[3].tokens, media[3].counts)[:1]
        want = ops.lcmr_loss(speech, model.llm.embed_tokens(transcripts[:1]), media[3].counts[:1],
                             torch.tensor([3]), gamma=0.1, temperature=0.06)
    torch.testing.assert_close(out.lcmr_loss.detach(), want.mean())
    out.lcmr_loss.backward()
    assert model.speech_projector.linear1.weight.grad.abs().sum() > 0
    assert model.llm.embed_tokens.weight.grad is None  # the transcript side is the target


def test_speech_generator_trains_on_answer_hidden_states():
    model = build(tiny(generator_upsample=5))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [5, 6, 7, 8, 9, 0]])
    labels = torch.full_like(ids, IGNORE)
    labels[0, 3:] = ids[0, 3:]
    labels[1, 4:5] = ids[1, 4:5]
    units = torch.tensor([[3, 4, 5, 6], [7, 8, 0, 0]])
    out = model(LyraInputs(ids, torch.tensor([6, 5]), labels=labels), units=units,
                unit_lengths=torch.tensor([4, 2]))
    loss = out.generator_loss
    torch.testing.assert_close(loss, model.speech_generator_loss(out.state, units, torch.tensor([4, 2])))
    assert torch.isfinite(loss)
    loss.backward()
    assert model.speech_generator.input_proj.weight.grad.abs().sum() > 0
    assert model.llm.layers[0].mlp.up_proj.weight.grad is None  # LLM untouched by CTC


def test_sound_input_runs():
    model = build(tiny())
    with torch.no_grad():
        out = model(LyraInputs(torch.tensor([[5, SOUND, 6]]),
                               sound=AudioBatch.from_list([torch.randn(16000) * 0.1], kind="sound")),
                    return_logits=True)
    assert out.logits.shape[1] == 2 + model.config.sound_tokens


def test_adapters_follow_the_batch_modalities():
    model = build(tiny())
    lora.add_adapter(model.llm, "speech", lora.LoraSpec(r=4, alpha=8))
    lora.add_adapter(model.llm, "long_speech", lora.LoraSpec(r=4, alpha=8))
    speech = LyraInputs(torch.tensor([[SPEECH, 5]]),
                        speech=AudioBatch.from_list([torch.randn(16000) * 0.1]))
    long = LyraInputs(torch.tensor([[SPEECH, 5]]),
                      speech=AudioBatch.from_list([torch.randn(16000 * 31) * 0.1]))
    pix, grid = images([[1, 2, 2]])
    image = LyraInputs(torch.tensor([[IMG, 5]]), pixel_values=pix, image_grid_thw=grid)
    with torch.no_grad():
        assert model(speech).adapters == ["speech"]
        assert lora.active_adapters(model.llm) == ["speech"]
        assert model(long).adapters == ["long_speech"]
        assert model(image).adapters == []
        assert lora.active_adapters(model.llm) == []


# ----------------------------------------------------------------------------- errors
def test_placeholder_mismatch_names_the_sample():
    cfg = tiny()
    samples = [Sample([5, 6]), Sample([IMG, 7], images=[])]
    with pytest.raises(ValueError, match=r"sample 1: 1 <image> placeholder\(s\).* 0 image"):
        collate(samples, cfg.placeholder_ids, cfg.pad_token_id)
    model = build(cfg)
    pix, grid = images([[1, 2, 2]])
    inputs = LyraInputs(torch.tensor([[5, 6], [IMG, 7]]), pixel_values=pix, image_grid_thw=grid,
                        media_counts=torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]))
    with pytest.raises(ValueError, match=r"sample 0: 0 <image>"):
        model(inputs)
    inputs = LyraInputs(torch.tensor([[5, 6], [IMG, IMG]]), pixel_values=pix, image_grid_thw=grid)
    with pytest.raises(ValueError, match=r"2 <image> placeholder\(s\) in the batch \(samples \[1\]\)"):
        model(inputs)


def test_bad_media_errors_name_the_sample():
    cfg = tiny()
    ph, pad = cfg.placeholder_ids, cfg.pad_token_id
    with pytest.raises(ValueError, match=r"22050.*16000|16000.*22050") as e:
        collate([Sample([5]), Sample([SPEECH, 5], speech=[torch.zeros(22050)],
                                     speech_sample_rates=22050)], ph, pad)
    assert "sample 1" in str(e.value)
    with pytest.raises(ValueError, match="empty") as e:
        collate([Sample([SPEECH], speech=[torch.zeros(0)])], ph, pad)
    assert "sample 0" in str(e.value)
    with pytest.raises(ValueError, match=r"sample 1: image 0 has zero size"):
        collate([Sample([5]), Sample([IMG], images=[torch.zeros(3, 0, 10)])], ph, pad)
    with pytest.raises(ValueError, match="image 1 has an empty grid"):
        LyraInputs(torch.tensor([[IMG, IMG]]), pixel_values=torch.zeros(4, PATCH),
                   image_grid_thw=torch.tensor([[1, 2, 2], [1, 0, 2]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        build(cfg)(LyraInputs(torch.tensor([[5, 9999]])))


def test_collate_builds_a_batch_the_model_runs():
    from transformers import Qwen2VLImageProcessor

    cfg = tiny()
    proc = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 16)
    samples = [
        Sample([5, IMG, 6, 7], labels=[IGNORE, IGNORE, IGNORE, 7],
               images=[torch.randint(0, 255, (3, 60, 90), dtype=torch.uint8)]),
        Sample([SPEECH, 8, 9], labels=[IGNORE, IGNORE, 9], speech=[torch.randn(8000) * 0.1],
               transcripts=[[11, 12]]),
    ]
    batch = collate(samples, cfg.placeholder_ids, cfg.pad_token_id, image_processor=proc)
    assert batch.media_counts.tolist() == [[1, 0, 0, 0], [0, 0, 1, 0]]
    out = build(cfg)(batch)
    assert torch.isfinite(out.loss) and out.lcmr_loss is not None


def test_stop_strings_with_a_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = _double(build(tiny()))
    n = model.config.vocab_size
    backend = Tokenizer(models.WordLevel({f"<{i}>": i for i in range(n)} | {"abcdef": n}, "<0>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.Fuse()  # token strings concatenate: "<150><33>"
    tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    batch, _ = _prompts()
    free = model.generate(batch, max_new_tokens=6, eos_token_ids=[])
    row = free.tokens[2]
    # A stop string spanning the end of one token and the start of the next.
    text = f"{row[1]}><{row[2]}"
    out = model.generate(batch, max_new_tokens=6, eos_token_ids=[], stop_strings=[text],
                         tokenizer=tok)
    ends = next(i for i in range(2, 7) if row[i - 2:i] == row[1:3])
    assert out.tokens[2] == row[:ends]
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate(batch, max_new_tokens=2, stop_strings=["x"])


def test_review_regressions():
    """Cases a review found: adapters must not leak between generate calls, a reused cache
    starts over, the last prompt token survives pruning, B == N == 3 compacts positions
    correctly, padding ids are ignored."""
    cfg = tiny(lmme_blocks=2, lmme_keep_ratio=0.3, lmme_min_keep=0)
    model = _double(build(cfg))
    pix, grid = images([[1, 8, 8]], dtype=torch.float64)
    ends_with_image = LyraInputs(torch.tensor([[5, 6, 7, IMG]]), pixel_values=pix,
                                 image_grid_thw=grid)
    out = model(ends_with_image)
    assert out.state.index[0, int(out.state.lengths[0]) - 1] == 3 + 16 - 1

    pix3, grid3 = images([[1, 2, 2]] * 3, dtype=torch.float64)
    three = LyraInputs(torch.tensor([[IMG, 5, 6]] * 3), pixel_values=pix3, image_grid_thw=grid3)
    out = model(three)  # B = 3 samples of N = 3 tokens
    assert out.state.positions.shape[:2] == (3, 3)

    text = LyraInputs(torch.tensor([[5, 6, 7, -1]]), torch.tensor([3]))  # -1 padding is ignored
    plain = model.generate(text, max_new_tokens=5, eos_token_ids=[]).tokens
    lora.add_adapter(model.llm, "speech", lora.LoraSpec(r=4, alpha=8))
    for name, p in model.llm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    speech = LyraInputs(torch.tensor([[SPEECH, 5]]),
                        speech=AudioBatch.from_list([torch.randn(16000) * 0.1]))
    model.generate(speech, max_new_tokens=2)
    assert model.generate(text, max_new_tokens=5, eos_token_ids=[]).tokens == plain

    from lyra_pl.model.decoder import DecoderCache

    cache = DecoderCache()
    with torch.no_grad():
        model(speech, cache=cache)
        reused = model(three, cache=cache, return_logits=True).logits
        fresh = model(three, return_logits=True).logits
    torch.testing.assert_close(reused, fresh)


def test_bfloat16_training_and_generation():
    model = build(tiny(lmme_blocks=2, lmme_keep_ratio=0.5, lmme_min_keep=2), dtype=torch.bfloat16)
    batch, _ = _prompts()
    labels = torch.full_like(batch.input_ids, IGNORE)
    labels[0, 6:8] = batch.input_ids[0, 6:8]
    labels[2, 6:8] = batch.input_ids[2, 6:8]
    batch.labels = labels
    batch.transcript_ids, batch.transcript_lengths = torch.tensor([[11, 12, 13]]), torch.tensor([3])
    out = model.train()(batch)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert out.lcmr_loss is not None and torch.isfinite(out.lcmr_loss)
    out.loss.backward()
    assert model.speech_projector.linear1.weight.grad.abs().sum() > 0
    gen = model.eval().generate(batch, max_new_tokens=3, speech=True)
    assert all(len(t) == 3 for t in gen.tokens) and len(gen.units) == 3


# ----------------------------------------------------------------------------- host sizes
def test_assemble_plans_on_the_host_what_the_device_measures():
    """With collate-checked sizes the layout is planned from host ints; without, it is measured
    on the device. Both must give the same batch, and the sizes counted here by hand."""
    from dataclasses import fields

    from lyra_pl.model.assemble import IMAGE, SOUND as SOUND_ID, SPEECH as SPEECH_ID
    from lyra_pl.model.assemble import Assembled, Media, assemble
    from lyra_pl.model.sizes import BatchSizes

    cfg = tiny()
    ids = torch.tensor([[5, IMG, 6, SPEECH, 7, 8], [SPEECH, 9, SOUND, 10, 0, 0],
                        [11, 12, 13, 14, 15, 16]])
    lengths = torch.tensor([6, 4, 6])
    labels = torch.full_like(ids, IGNORE)
    labels[0, 4:6] = ids[0, 4:6]
    labels[1, 3] = 10
    labels[2, :3] = ids[2, :3]  # a labelled first token is no token's target
    torch.manual_seed(0)
    H = 8
    media = {IMAGE: Media(torch.randn(6, H), torch.tensor([6]), torch.tensor([[1, 2, 3]]), (6,)),
             SPEECH_ID: Media(torch.randn(8, H), torch.tensor([5, 3]), host_counts=(5, 3)),
             SOUND_ID: Media(torch.randn(4, H), torch.tensor([4]), host_counts=(4,))}
    batch = LyraInputs(ids, lengths, labels, pixel_values=torch.zeros(24, PATCH),
                       image_grid_thw=torch.tensor([[1, 4, 6]]))
    counts = torch.tensor([[1, 0, 1, 0], [0, 0, 1, 1], [0, 0, 0, 0]])
    sizes = BatchSizes.measure(batch, checked_media_counts=counts)
    assert (sizes.answers, sizes.targets, sizes.grids) == ((2, 1, 3), 5, {IMAGE: ((1, 4, 6),)})
    embeds = torch.randn(3, 6, H)
    planned = assemble(ids, lengths, labels, embeds, media, cfg.placeholder_ids, sizes=sizes)
    measured = assemble(ids, lengths, labels, embeds, media, cfg.placeholder_ids)
    for f in fields(Assembled):
        a, b = getattr(planned, f.name), getattr(measured, f.name)
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f.name)
        else:
            assert a == b, f.name
    assert planned.host_lengths == (4 + 6 + 5, 2 + 3 + 4, 6)
    assert (planned.n_targets, planned.n_answers) == (5, (2, 1, 3))
    with pytest.raises(ValueError, match=r"1 <sound> placeholder\(s\) in the batch but 0"):
        assemble(ids, lengths, labels, embeds, {m: media[m] for m in (IMAGE, SPEECH_ID)},
                 cfg.placeholder_ids, sizes=sizes)


def test_collated_sizes_travel_with_the_batch_and_edits_drop_them():
    cfg = tiny()
    samples = [Sample([SPEECH, 8, 9], labels=[IGNORE, IGNORE, 9], speech=[torch.randn(8000) * 0.1],
                      transcripts=[[11, 12]]),
               Sample([5, 6, 7, 20], labels=[5, 6, IGNORE, IGNORE])]
    batch = collate(samples, cfg.placeholder_ids, cfg.pad_token_id)
    s = batch.sizes
    assert (s.lengths, s.answers, s.targets, s.transcripts) == ((3, 4), (1, 2), 2, (2,))
    assert s.token_range == (5, SPEECH) and s.media_counts == ((0, 0, 1, 0), (0, 0, 0, 0))
    assert batch.speech.host_lengths == (8000,) and batch.speech.host_num_tokens() == (5,)
    moved = batch.to("cpu")
    assert moved.sizes is s and moved.speech.host_lengths == (8000,)
    model = build(cfg)
    out = model(moved, return_logits=True)
    has = out.state.targets != IGNORE  # CE, independently, from the logits at the targets
    torch.testing.assert_close(out.ce_loss, torch.nn.functional.cross_entropy(
        out.logits[has].float(), out.state.targets[has]))
    moved.labels = None  # the recorded sizes described the old labels
    assert moved.sizes is None
    assert moved.host_sizes().answers == (0, 0) and moved.sizes.media_counts is None
    assert model(moved).ce_loss is None


def test_collate_rejects_labels_on_placeholders():
    cfg = tiny()
    samples = [Sample([5, 6], labels=[5, 6]),
               Sample([SPEECH, 7], labels=[SPEECH, 7], speech=[torch.randn(1600) * 0.1])]
    with pytest.raises(ValueError, match="sample 1: a placeholder token has a label"):
        collate(samples, cfg.placeholder_ids, cfg.pad_token_id)


def test_lcmr_with_host_sizes_matches_reading_them():
    from lyra_pl.model.lcmr import lcmr_term

    torch.manual_seed(0)
    embed = torch.nn.Embedding(30, 8)
    counts = torch.tensor([3, 5, 2])
    tokens = torch.randn(10, 8)
    ids, t_len = torch.tensor([[1, 2, 0], [0, 0, 0], [3, 4, 5]]), torch.tensor([2, 0, 3])
    read = lcmr_term(tokens, counts, ids, t_len, embed, 0.1, 0.06, "length_sum")
    host = lcmr_term(tokens, counts, ids, t_len, embed, 0.1, 0.06, "length_sum",
                     speech_sizes=(3, 5, 2), transcript_sizes=(2, 0, 3))
    padded = pad_sequences(tokens, counts)
    want = ops.lcmr_loss(padded[[0, 2]], embed(ids[[0, 2]]), counts[[0, 2]], t_len[[0, 2]],
                         gamma=0.1, temperature=0.06).mean()
    torch.testing.assert_close(read, want)
    torch.testing.assert_close(host, want)
    torch.testing.assert_close(pad_sequences(tokens, counts, 5), padded)
    assert lcmr_term(tokens, counts, ids, torch.zeros(3, dtype=torch.long), embed, 0.1, 0.06,
                     "length_sum", speech_sizes=(3, 5, 2), transcript_sizes=(0, 0, 0)) is None
