"""The embedding model: the one module of the embedding worker that touches torch.

sentence-transformers runs the model with its own pooling and normalisation; this module only
turns texts into token ids (never truncated: the engine refuses what is too long) and runs one
padded batch of token-id lists at a time.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Normalize

log = logging.getLogger(__name__)


class EmbeddingRunner:
    """A sentence-transformers model on one device; `max_length` and `dimensions` are its own."""

    def __init__(self, model: SentenceTransformer) -> None:
        self.model = model.eval()
        self.tokenizer = model.tokenizer
        self.max_length = int(model.max_seq_length)
        self.dimensions = int(model.get_embedding_dimension())
        self.vocab_size = len(self.tokenizer)
        self.normalized = any(isinstance(module, Normalize) for module in model)
        self._prefix, self._suffix = _special_tokens_around(self.tokenizer)

    @classmethod
    def load(cls, location: str, device: torch.device, dtype: torch.dtype) -> EmbeddingRunner:
        log.info("loading embedding model %s on %s as %s", location, device, dtype)
        model = SentenceTransformer(location, device=str(device), model_kwargs={"dtype": dtype})
        return cls(model)

    def text_ids(self, texts: list[str]) -> list[list[int]]:
        """Each text's token ids, special tokens included, as the model's own tokenizer makes them."""
        return self.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]

    def with_special_tokens(self, ids: list[int]) -> list[int]:
        """Token ids of a text (as a client tokenized it) framed as `text_ids` frames them."""
        return [*self._prefix, *ids, *self._suffix]

    @torch.inference_mode()
    def embed(self, batch: list[list[int]]) -> np.ndarray:
        """One forward pass over `batch`, padded to its longest entry; float32 [B, dimensions]."""
        features = dict(self.tokenizer.pad({"input_ids": batch}, return_tensors="pt", return_attention_mask=True))
        if "token_type_ids" in self.tokenizer.model_input_names and "token_type_ids" not in features:
            features["token_type_ids"] = torch.zeros_like(features["input_ids"])
        device = self.model.device
        output = self.model({name: tensor.to(device) for name, tensor in features.items()})
        return output["sentence_embedding"].float().cpu().numpy()


def _special_tokens_around(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text (BERT: [CLS] and [SEP]),
    found by tokenizing a probe text with and without them."""
    bare = tokenizer("probe", add_special_tokens=False)["input_ids"]
    framed = tokenizer("probe", add_special_tokens=True)["input_ids"]
    for start in range(len(framed) - len(bare) + 1):
        if framed[start:start + len(bare)] == bare:
            return framed[:start], framed[start + len(bare):]
    return [], []
