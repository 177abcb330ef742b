"""The embedding bench's inputs and report, from results made up for the purpose."""

from __future__ import annotations

from bench.embeddings import EmbeddingLevel, corpus, table


def test_corpus_is_the_same_every_run_and_every_text_differs():
    texts = corpus(200)
    assert texts == corpus(200) and len(set(texts)) == 200
    assert all(6 <= len(text.split()) - 1 <= 40 for text in texts)


def test_table_gives_each_level_as_a_share_of_encode():
    levels = [EmbeddingLevel(1, 512, 0, 16.0), EmbeddingLevel(32, 512, 0, 4.0)]
    text = table(levels, 160.0, 8)
    assert "| 1 | 32.0 | 20% |" in text and "| 32 | 128.0 | 80% |" in text
    assert "SentenceTransformer.encode, one process: 160.0 texts/s" in text
