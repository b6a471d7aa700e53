"""Chat template, answer-only labels and the tiny tokenizer (lyra_pl.data)."""
import random

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from lyra_pl.data.conversation import (
    IGNORE, SYSTEM_PROMPT, TINY_PLACEHOLDERS, Tokenized, placeholder_token_ids, prompt, render,
    span_token_mask, tokenize,
)
from lyra_pl.data.tokenizer import TINY_SPECIAL_TOKENS, build_tiny_tokenizer
from lyra_pl.model import assemble
from lyra_pl.model.config import LyraConfig

WORDS = ("the a cat dog sees runs quickly over under red blue green speech image video sound "
         "answer question what is there in this picture describe hear loud quiet music bird car "
         "train people walking street window kitchen table yellow orange purple seven eleven "
         "thirty morning evening weather sunny cloudy raining piano guitar violin drums "
         "laughter").split()


def corpus(seed: int = 0, n: int = 48) -> list[str]:
    """Sentences with punctuation, numbers and newlines, plus rendered chats (the template)."""
    rng = random.Random(seed)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))
                 + rng.choice([".", "?", "!\n", ",\n\n"]) + f" {rng.randint(0, 999)}"
                 for _ in range(n)]
    chats = [render([{"from": "human", "value": f"<image>\n{a}"}, {"from": "gpt", "value": b}])[0]
             for a, b in zip(sentences[::2], sentences[1::2])]
    return sentences + chats


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_tokenizer")
    build_tiny_tokenizer(corpus(), directory)
    return directory


@pytest.fixture(scope="module")
def tok(tok_dir):
    return AutoTokenizer.from_pretrained(str(tok_dir))


def conv(*values: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


MULTI = conv("<image>\nWhat is in this picture?", "A red cat on a table.",
             "And <speech> what do you hear?", " Loud music,\nthen a bird.")


# ---------------------------------------------------------------- tokenizer
def test_tiny_tokenizer_special_ids_match_the_tiny_preset(tok):
    cfg = LyraConfig.from_preset("tiny")
    assert tok.convert_tokens_to_ids(list(TINY_SPECIAL_TOKENS)) == list(range(500, 507))
    assert len(tok) == 507 <= cfg.vocab_size
    assert tok.pad_token_id == cfg.pad_token_id == 506
    assert tok.eos_token_id in cfg.eos_token_ids
    assert placeholder_token_ids(tok, TINY_PLACEHOLDERS, cfg.placeholder_ids) == cfg.placeholder_ids


def test_tiny_tokenizer_is_deterministic_and_round_trips(tmp_path, tok_dir, tok):
    again = build_tiny_tokenizer(iter(corpus()), tmp_path)  # a generator works too
    assert (tmp_path / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
    text = render(MULTI)[0]
    assert again(text, add_special_tokens=False)["input_ids"] == \
        tok(text, add_special_tokens=False)["input_ids"]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text


def test_too_little_text_raises(tmp_path):
    with pytest.raises(ValueError, match="only .* BPE tokens"):
        build_tiny_tokenizer(["a tiny text"], tmp_path)


# ---------------------------------------------------------------- template
def test_render_and_prompt_exact():
    text, spans = render(conv("Hi <image>", "Hello!", "More?", "Yes."))
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nHi <image><|im_end|>\n"
                    "<|im_start|>assistant\nHello!<|im_end|>\n"
                    "<|im_start|>user\nMore?<|im_end|>\n"
                    "<|im_start|>assistant\nYes.<|im_end|>\n")
    assert [text[a:b] for a, b in spans] == ["Hello!<|im_end|>", "Yes.<|im_end|>"]
    assert prompt(conv("Hi", "Hello!", "More?"), system="Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nMore?<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert SYSTEM_PROMPT == "You are a helpful assistant."
    assert render(conv("q", "a"), system=None)[0].startswith("<|im_start|>user\n")


@pytest.mark.parametrize("conversations, match", [
    ([], "non-empty"),
    ([{"from": "gpt", "value": "a"}], "turn 0: expected a 'human'"),
    (conv("q", "a") + [{"from": "gpt", "value": "b"}], "turn 2: expected a 'human'"),
    ([{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}], "turn 1: unknown role 'bot'"),
    ([{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}], "turn 0: 'value' must be"),
    (conv("q", "a", "q2"), "turn 2: .* end with a 'gpt'"),
])
def test_render_rejects_bad_conversations(conversations, match):
    with pytest.raises(ValueError, match=match):
        render(conversations)


def test_prompt_needs_a_final_human_turn():
    with pytest.raises(ValueError, match="turn 1: .* end with a 'human'"):
        prompt(conv("q", "a"))


# ---------------------------------------------------------------- labels
def test_labels_cover_exactly_every_answer_and_its_im_end(tok):
    out = tokenize(MULTI, tok, TINY_PLACEHOLDERS)
    ids, labels = np.array(out.input_ids), np.array(out.labels)
    assert ids.shape == labels.shape
    on = labels != IGNORE
    assert (labels[on] == ids[on]).all()
    # Contiguous labelled runs, one per answer, each decoding to that answer + <|im_end|>.
    edges = np.flatnonzero(np.diff(np.concatenate([[0], on.astype(int), [0]])))
    runs = [tok.decode(ids[a:b]) for a, b in zip(edges[::2], edges[1::2])]
    answers = [t["value"] + "<|im_end|>" for t in MULTI if t["from"] == "gpt"]
    assert runs == answers
    assert tok.decode(ids[on]) == "".join(answers)
    # Everything else (system, user turns, headers, newlines) is unlabelled.
    assert tok.decode(ids[~on]) == render(MULTI)[0].replace(answers[0], "").replace(answers[1], "")


def test_placeholders_are_counted_single_tokens_without_labels(tok):
    cfg = LyraConfig.from_preset("tiny")
    sample = conv("<image><image> and <sound>\n<speech> then <image>", "Three images.")
    out = tokenize(sample, tok, TINY_PLACEHOLDERS, expected_ids=cfg.placeholder_ids)
    assert isinstance(out, Tokenized)
    assert out.placeholder_counts == {"image": 3, "video": 0, "speech": 1, "sound": 1}
    ids, labels = torch.tensor([out.input_ids]), torch.tensor([out.labels])
    modality = assemble.placeholder_modality(ids, cfg.placeholder_ids)
    assert torch.bincount(modality.flatten(), minlength=5)[1:].tolist() == [3, 0, 1, 1]
    assert assemble.IGNORE == IGNORE
    assert (labels[modality != 0] == IGNORE).all()  # the model's convention (assemble checks it)


def test_reloaded_tokenizer_gives_identical_samples(tok_dir, tok):
    again = AutoTokenizer.from_pretrained(str(tok_dir))
    a, b = tokenize(MULTI, tok, TINY_PLACEHOLDERS), tokenize(MULTI, again, TINY_PLACEHOLDERS)
    assert (a.input_ids, a.labels) == (b.input_ids, b.labels)


def test_tokenize_errors(tok):
    with pytest.raises(ValueError, match="turn 1: placeholder.*'<image>'.*inside an answer"):
        tokenize(conv("look", "see <image>"), tok, TINY_PLACEHOLDERS)
    n = len(tokenize(MULTI, tok, TINY_PLACEHOLDERS).input_ids)
    assert len(tokenize(MULTI, tok, TINY_PLACEHOLDERS, max_length=n).input_ids) == n
    with pytest.raises(ValueError, match=f"sample has {n} tokens, more than max_length {n - 1}"):
        tokenize(MULTI, tok, TINY_PLACEHOLDERS, max_length=n - 1)
    with pytest.raises(ValueError, match="image placeholder '<img>' tokenizes to [2-9]"):
        tokenize(conv("<img> hi", "ok"), tok, {"image": "<img>"})
    with pytest.raises(ValueError, match="speech placeholder '<speech>' is token 502 .* expects 151665"):
        tokenize(conv("hi", "ok"), tok, TINY_PLACEHOLDERS, expected_ids={"speech": 151665})
    with pytest.raises(ValueError, match="turn 2: expected a 'human'"):
        tokenize(conv("q", "a") + [{"from": "gpt", "value": "b"}], tok, TINY_PLACEHOLDERS)


def test_answers_with_leading_whitespace_keep_prompt_text_out(tok):
    sample = conv("q", " spaced", "q2", "\nnewline first")
    out = tokenize(sample, tok, TINY_PLACEHOLDERS)
    ids, on = np.array(out.input_ids), np.array(out.labels) != IGNORE
    assert tok.decode(ids[on]) == " spaced<|im_end|>\nnewline first<|im_end|>"
    # "assistant\n" + "\n\n two": byte-level BPE makes one token of the three newlines, half
    # template, half answer: the sample is rejected, not labelled with prompt text.
    with pytest.raises(ValueError, match="turn 3: token .* crosses the boundary"):
        tokenize(conv("q", "ok", "q2", "\n\n two"), tok, TINY_PLACEHOLDERS)


def test_token_straddling_an_answer_boundary_raises():
    """A token covering template text and answer text is never labelled silently."""
    spans = [(10, 20), (30, 40)]
    inside = span_token_mask(np.array([[0, 10], [10, 15], [15, 20], [20, 30], [30, 40]]), spans)
    assert inside.tolist() == [False, True, True, False, True]
    for bad in ([8, 12], [18, 22], [28, 45], [5, 25]):
        with pytest.raises(ValueError, match="answer [01]: token 1 .* crosses the boundary"):
            span_token_mask(np.array([[0, 8], bad]), spans)
    assert span_token_mask(np.zeros((0, 2), dtype=np.int64), spans).tolist() == []
