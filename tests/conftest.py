import pytest
import torch

from lyra_pl import _extension


def _devices():
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append(
            pytest.param("cuda", marks=pytest.mark.skipif(
                not _extension.HAS_CUDA_OPS,
                reason="a GPU is present but the CUDA extension was not built (LYRA_CUDA=0?)",
            ))
        )
    return devices


DEVICES = _devices()


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a test's server or rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 when both are zero)."""
    a, b = a.double(), b.double()
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]


def write_color_dataset(root, n: int, samples_per_shard: int) -> dict:
    """``n`` official-format samples in ``root`` (image + question about its color, every
    other one spoken: a 0.5-1.4 s clip with its transcript), a tiny tokenizer trained on
    their text, and their shards (``samples_per_shard`` each). Sample i is ``s{i:02d}``;
    ``answers`` maps each id to its answer."""
    import json

    import numpy as np
    from PIL import Image

    from lyra_pl.data import media
    from lyra_pl.data.convert import convert
    from lyra_pl.data.tokenizer import build_tiny_tokenizer

    rng = np.random.default_rng(0)
    samples, texts = [], []
    for i in range(n):
        color = COLORS[i % len(COLORS)]
        Image.new("RGB", (56, 28 + 14 * (i % 3)), color).save(root / f"img{i}.png")
        question = f"What color is picture number {i}?"
        texts.append(question + " " + color)
        sample = {"id": f"s{i:02d}", "image": f"img{i}.png",
                  "conversations": [{"from": "human", "value": "<image>\n" + question},
                                    {"from": "gpt", "value": color}]}
        if i % 2:
            seconds = 0.5 + (i % 4) * 0.3
            clip = (rng.standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32)
            (root / f"q{i}.wav").write_bytes(media.encode_wav(clip))
            sample.update(speech=f"q{i}.wav", speech_asr=question)
            sample["conversations"][0]["value"] = "<image>\n<speech>"
        samples.append(sample)
    (root / "data.json").write_text(json.dumps(samples))
    corpus = texts * 20 + ["<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                           "<|im_start|>user\n", "abcdefghijklmnopqrstuvwxyz " * 30,
                           " ".join(str(k) for k in range(300))]
    build_tiny_tokenizer(corpus, root / "tokenizer")
    convert(root / "data.json", root / "shards", samples_per_shard=samples_per_shard,
            progress=False)
    return {"root": root, "shards": root / "shards", "tokenizer": root / "tokenizer",
            "answers": {s["id"]: s["conversations"][-1]["value"] for s in samples}}


@pytest.fixture(scope="session")
def color_dataset():
    """:func:`write_color_dataset`, for the data modules' tests."""
    return write_color_dataset
