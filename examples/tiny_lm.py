"""A small byte-level causal language model trained on Python's own documentation (an optagent model file).

What it is: a 4-layer, 256-wide Llama-architecture decoder (``transformers.LlamaForCausalLM``, 3.3 M
parameters, 4 heads, rotary positions, a context of ``CONTEXT`` = 64 bytes) over a 256-symbol vocabulary:
the bytes of UTF-8 text, so the tokenizer is ``list(text.encode())`` and nothing is downloaded. It is
trained once, on the text of ``pydoc_data.topics`` (the ~470 kB behind ``help("with")`` and friends, which
ships with Python), and cached with ``optagent.cached_weights``.

Why this example: it is a generative transformer, the model family people most want to shrink, at a size
that trains in two to three minutes on 2 CPU threads (500 steps of 32 windows) and beats a unigram model
by a wide margin. Llama rather than GPT-2 because GPT-2's projections are
``transformers.Conv1D`` modules, which ``torch.ao`` int8 quantization and pruning tools do not recognise;
every Llama projection is an ``nn.Linear``. The wrapper's ``forward(input_ids)`` returns the logits as a
plain tensor (no ``ModelOutput``, no KV cache), so ``torch.export`` and ONNX export trace one graph.

Data: the text is cut into 4096-byte chunks, every 20th chunk held out for eval and another 20th for test
(so both splits sample every part of the docs); each split is cut into (input_ids[64], target_ids[64])
windows, targets being the inputs shifted by one byte. Metrics: ``perplexity`` (exp of the mean next-byte
cross-entropy; lower is better) and ``accuracy`` (top-1 next-byte accuracy). The baseline scores ~4.0
perplexity and 0.61 accuracy on eval, where a unigram byte model scores 26.5 perplexity. ``loss`` is the
same token cross-entropy, for recovery fine-tuning.

``generate(model, input_ids, max_new_tokens)`` decodes greedily by whole forward passes over a sliding
window of the input's length (no KV cache), so every pass has the shape of ``example_input()`` and
a model with static shapes (exported, compiled, ONNX Runtime) can run it; optagent may use it to report
tokens per second.

Environment knobs (read when called, so they need no edit of this file):

- ``OPTAGENT_EXAMPLE_BATCH``: the serving batch of ``example_input()`` (default ``SERVING_BATCH`` = 1);
- ``OPTAGENT_EXAMPLE_SMALL=1``: a 2-layer, 64-wide model trained for a few seconds and small splits
  (train 512, eval 64, test 64 windows) for fast tests. It is cached separately from the full model.

Run ``python examples/tiny_lm.py`` to train (first time) and score it, and print a sample.
"""

from __future__ import annotations

import math
import os
import time
from functools import lru_cache, partial

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

import optagent

SEED = 0
CONTEXT = 64  # bytes per window: the model's input length and its maximum position
SERVING_BATCH = 1  # one prompt at a time; OPTAGENT_EXAMPLE_BATCH overrides it
VOCAB = 256  # one symbol per byte value: no special tokens, windows are cut from one stream
CHUNK = 4096  # bytes; the unit of the train / eval / test split
PROMPT = 'The "with" statement is used to wrap the execution of a block'  # the docs go on: ' with methods...'

# name -> (Llama sizes, training steps). Steps x BATCH x CONTEXT: ~1.0 M bytes, ~2.4 passes over train.
CONFIGS = {
    "full": (dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4), 500),
    "small": (dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=2), 150),
}
BATCH = 32
LR = 3e-3
SMALL_SIZES = {"train": 512, "eval": 64, "test": 64}


def _small() -> bool:
    return os.environ.get("OPTAGENT_EXAMPLE_SMALL", "") not in ("", "0")


def encode(text: str) -> torch.Tensor:
    """The tokenizer: UTF-8 bytes as int64 ids in [0, 256)."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(ids: torch.Tensor) -> str:
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class ByteLM(nn.Module):
    """``LlamaForCausalLM`` returning plain logits (batch, length, 256) for input_ids (batch, length)."""

    def __init__(self, name: str = "full"):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        sizes, _ = CONFIGS[name]
        config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=CONTEXT,  # key/value heads = heads
                             tie_word_embeddings=False,  # a weight shared by two layers trips pruning tools
                             bos_token_id=None, eos_token_id=None, pad_token_id=None, use_cache=False,
                             attn_implementation="sdpa", **sizes)
        self.lm = LlamaForCausalLM(config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Positions of the batch's own shape: Llama's default (1, length) positions broadcast against the batch,
        # which makes an export from a batch-1 example fix the batch at 1 instead of keeping it dynamic.
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        return self.lm(input_ids=input_ids, position_ids=positions, use_cache=False).logits


@lru_cache(maxsize=1)
def _chunks() -> dict[str, torch.Tensor]:
    """The docs as bytes in (n, CHUNK) rows per split: chunk i is eval if i % 20 == 10, test if 15, else train."""
    from pydoc_data.topics import topics

    data = encode("\n\n".join(topics[key] for key in sorted(topics)))
    rows = data[: len(data) // CHUNK * CHUNK].view(-1, CHUNK)
    index = torch.arange(len(rows)) % 20
    return {"train": rows[(index != 10) & (index != 15)], "eval": rows[index == 10], "test": rows[index == 15]}


def _windows(rows: torch.Tensor) -> TensorDataset:
    """Non-overlapping (input, target) windows: CONTEXT + 1 bytes each, stride CONTEXT, within each chunk."""
    per_row = (CHUNK - 1) // CONTEXT
    idx = torch.arange(per_row)[:, None] * CONTEXT + torch.arange(CONTEXT + 1)
    windows = rows[:, idx].reshape(-1, CONTEXT + 1)
    return TensorDataset(windows[:, :-1].clone(), windows[:, 1:].clone())


@lru_cache(maxsize=2)
def _splits(small: bool) -> dict[str, TensorDataset]:
    sets = {name: _windows(rows) for name, rows in _chunks().items()}
    if small:  # evenly spaced, so the small splits still cover the whole text
        sets = {name: TensorDataset(*(t[torch.linspace(0, len(ds) - 1, SMALL_SIZES[name]).long()]
                                      for t in ds.tensors)) for name, ds in sets.items()}
    return sets


def load_data() -> optagent.Data:
    """Train / eval / test windows from disjoint chunks; calibration is 256 evenly spaced training windows."""
    sets = _splits(_small())
    spaced = torch.linspace(0, len(sets["train"]) - 1, min(256, len(sets["train"]))).long().tolist()
    return optagent.Data(train=sets["train"], eval=sets["eval"], test=sets["test"],
                         calibration=Subset(sets["train"], spaced))


def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy over every position of every window."""
    return nn.functional.cross_entropy(outputs.float().reshape(-1, outputs.shape[-1]), targets.reshape(-1))


def train(model: nn.Module, steps: int) -> None:
    """AdamW + one-cycle LR on random CONTEXT-byte windows of the train chunks; fixed seed, fixed step count.

    Random offsets (rather than the fixed windows of ``load_data().train``) show the model every alignment
    of the text. A step of the full model costs ~0.45 s of CPU time, so 500 steps take ~2-3 min on 2 threads.
    """
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    rows = _chunks()["train"]
    decay = [p for p in model.parameters() if p.dim() >= 2]  # no weight decay on the RMSNorm gains
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps, pct_start=0.05)
    model.train()
    for _ in range(steps):
        row = torch.randint(len(rows), (BATCH, 1), generator=generator)
        start = torch.randint(CHUNK - CONTEXT, (BATCH, 1), generator=generator)
        windows = rows[row, start + torch.arange(CONTEXT + 1)]
        opt.zero_grad(set_to_none=True)
        loss(model(windows[:, :-1]), windows[:, 1:]).backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()


def load_model() -> nn.Module:
    """The trained baseline in eval mode; trained once per content of this file (and size), then cached."""
    name = "small" if _small() else "full"
    torch.manual_seed(SEED)
    return optagent.cached_weights(ByteLM(name), partial(train, steps=CONFIGS[name][1]), __file__, tag=name)


def evaluate(model: nn.Module, loader: DataLoader) -> dict[str, float]:
    """Perplexity (exp of the mean next-byte cross-entropy) and top-1 next-byte accuracy over all positions."""
    total, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for inputs, targets in loader:
            logits = model(inputs).float()
            total += float(nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1),
                                                       reduction="sum"))
            correct += int((logits.argmax(-1) == targets).sum())
            count += targets.numel()
    return {"perplexity": math.exp(total / count), "accuracy": correct / count}


def example_input() -> torch.Tensor:
    """The last CONTEXT bytes of PROMPT (left-padded with spaces if shorter), repeated to the serving batch."""
    batch = int(os.environ.get("OPTAGENT_EXAMPLE_BATCH") or SERVING_BATCH)
    ids = encode(PROMPT.rjust(CONTEXT))[-CONTEXT:]
    return ids.repeat(batch, 1)


@torch.no_grad()
def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding: (batch, max_new_tokens) new ids, one full forward pass per token, no KV cache.

    The window keeps the input's length (drop the oldest byte, append the new one), so every call has the
    same shape; the input must be at most CONTEXT long.
    """
    window, new = input_ids, []
    for _ in range(max_new_tokens):
        token = model(window)[:, -1].argmax(dim=-1, keepdim=True)
        new.append(token)
        window = torch.cat([window[:, 1:], token], dim=1)
    return torch.cat(new, dim=1)


def unigram_perplexity(split: str = "eval") -> float:
    """The reference to beat: a byte-frequency model of the train chunks (add-one smoothed) on `split`."""
    counts = torch.bincount(_chunks()["train"].reshape(-1), minlength=VOCAB).double() + 1
    targets = _splits(_small())[split].tensors[1].reshape(-1)
    return math.exp(-float((counts / counts.sum()).log()[targets].mean()))


if __name__ == "__main__":
    torch.set_num_threads(2)
    start = time.perf_counter()
    baseline = load_model()
    print(f"load_model: {time.perf_counter() - start:.1f}s, params {sum(p.numel() for p in baseline.parameters())}")
    data = load_data()
    for split_name in ("eval", "test"):
        print(split_name, evaluate(baseline, DataLoader(getattr(data, split_name), batch_size=64)),
              f"(unigram perplexity {unigram_perplexity(split_name):.1f})")
    prompt = example_input()[:1]
    start = time.perf_counter()
    sample = generate(baseline, prompt, 48)
    elapsed = time.perf_counter() - start
    print(f"greedy, {48 / elapsed:.0f} tokens/s: {decode(prompt[0])!r} -> {decode(sample[0])!r}")
