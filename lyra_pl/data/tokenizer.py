"""A byte-level BPE tokenizer for the tiny preset, trained on the tiny corpus's text.

The tiny model has a 512-row embedding with its special tokens at fixed ids (image 500 ..
pad 506, ``LyraConfig.from_preset("tiny")``), so the tokenizer is built to match and saved as
a Hugging Face directory: training code loads it offline with ``AutoTokenizer``, exactly as
it loads Qwen2-VL's tokenizer for the real presets.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

# In id order from 500: placeholders (image, video, speech, sound), chat markers, pad.
TINY_SPECIAL_TOKENS: tuple[str, ...] = (
    "<image>", "<video>", "<speech>", "<sound>", "<|im_start|>", "<|im_end|>", "<|endoftext|>",
)
TINY_SPECIAL_BASE = 500
_ROUND_TRIP_PROBE = ("<|im_start|>user\n<image> Héllo, wörld! 12 + 3 = 15?\t<speech><|im_end|>\n"
                     "<|im_start|>assistant\n  two  spaces\n\nand 😀<|im_end|>\n<|endoftext|>")


def build_tiny_tokenizer(texts: Iterable[str], directory: str | Path, vocab_size: int = 512,
                         ) -> PreTrainedTokenizerFast:
    """Trains a byte-level BPE on ``texts`` and saves it to ``directory``.

    The BPE part is trained to exactly ``TINY_SPECIAL_BASE`` (500) tokens (256 bytes +
    merges), then the 7 special tokens are added at ids 500..506, so the ids never depend on
    the corpus; the texts must hold enough distinct pairs for 244 merges. Training is
    single-pass and deterministic for the same texts. Offsets are not trimmed, so a token's
    character range is exactly the text it covers (answer labelling relies on it).
    """
    texts = list(texts)
    n_special = len(TINY_SPECIAL_TOKENS)
    if vocab_size < TINY_SPECIAL_BASE + n_special:
        raise ValueError(f"vocab_size {vocab_size} leaves no room for the special tokens at "
                         f"{TINY_SPECIAL_BASE}..{TINY_SPECIAL_BASE + n_special - 1}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_SPECIAL_BASE, min_frequency=1, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.get_vocab_size() != TINY_SPECIAL_BASE:
        raise ValueError(f"the texts give only {tok.get_vocab_size()} BPE tokens, "
                         f"{TINY_SPECIAL_BASE} are needed so the special tokens land at "
                         f"{TINY_SPECIAL_BASE}..; train on more (or more varied) text")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in TINY_SPECIAL_TOKENS])
    got = {t: tok.token_to_id(t) for t in TINY_SPECIAL_TOKENS}
    want = {t: TINY_SPECIAL_BASE + i for i, t in enumerate(TINY_SPECIAL_TOKENS)}
    if got != want:
        raise ValueError(f"special token ids {got} differ from the tiny preset's {want}")

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False, model_max_length=1 << 30)
    check_round_trip(fast, [_ROUND_TRIP_PROBE, *texts[:8]])
    fast.save_pretrained(str(directory))
    return fast


def check_round_trip(tokenizer: PreTrainedTokenizerFast, texts: Iterable[str]) -> None:
    """Raises ValueError unless ``decode(encode(text)) == text`` for every text, special
    tokens included: labels are checked by decoding, so decoding must be lossless."""
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        back = tokenizer.decode(ids, skip_special_tokens=False,
                                clean_up_tokenization_spaces=False)
        if back != text:
            raise ValueError(f"tokenizer does not round-trip {text[:60]!r}: got {back[:60]!r}")
