"""The tiny synthetic corpus: speech by espeak-ng, images by PIL, sounds by numpy, units by
k-means, written in the official Lyra JSON format (``lyra-pl corpus build --out data/tiny``)."""
from lyra_pl.data.corpus.build import CorpusSizes, build_corpus, main

__all__ = ["CorpusSizes", "build_corpus", "main"]
