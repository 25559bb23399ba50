"""Multi-query associative recall (MQAR), as defined by Zoology (Arora, Eyuboglu et al., 2023).

One example of length ``seq_len`` (``K = num_kv_pairs``, vocabulary ``V``)::

    k1 v1 k2 v2 ... kK vK | . . q . . . q . q . . .
    `---- 2K tokens -----'   `-- queries, noise elsewhere --'

* keys are drawn from the lower half of the vocabulary, ``1 .. V//2 - 1`` (token 0 is Zoology's
  placeholder and is never a key), values from the upper half ``V//2 .. V-1``; within one example the
  K keys are distinct and so are the K values;
* after the key-value block, the query region holds ``space = (seq_len - 2K) // 2`` even slots. Each
  key is asked exactly once: the K query slots ``g`` are drawn without replacement with probability
  proportional to ``power_a * g**(power_a - 1)`` for ``g = 1 .. space`` (a power law: small ``power_a``
  puts most queries soon after the block, ``power_a = 1`` is uniform), and key ``k_i`` sits at
  position ``2K + 2 (g_i - 1)``;
* every other position of the query region is noise, uniform over the whole vocabulary
  (Zoology's ``random_non_queries``; noise never carries a label);
* labels are -100 everywhere except at the token right after each query, which holds the value
  paired with that key.

Labels follow the Hugging Face *causal* convention (the model shifts them: ``logits[:, t]`` is scored
against ``labels[:, t + 1]``), so ``model(input_ids, labels=labels).loss`` is the MQAR loss.
Zoology stores the same targets pre-shifted; ``labels[:, 1:]`` is its ``labels[:, :-1]``.

Generation is vectorised with NumPy's ``default_rng(seed)``: the same config always yields the same
tensors. Weighted sampling without replacement uses the Gumbel-top-k trick, which draws from exactly
the distribution of sequential draws with renormalisation (what ``np.random.choice(replace=False, p=...)``
does in Zoology).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100


@dataclass
class MQARConfig:
    """Everything that determines an MQAR data set (saved as ``mqar.json`` beside each checkpoint)."""

    vocab_size: int = 256
    seq_len: int = 256
    num_kv_pairs: int = 8
    power_a: float = 0.01
    num_examples: int = 1000
    seed: int = 0
    random_non_queries: bool = True

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        def bad(field, why):
            raise ValueError(f"MQARConfig: {field}={getattr(self, field)!r} is invalid: {why}")

        for field in ("vocab_size", "seq_len", "num_kv_pairs", "num_examples"):
            v = getattr(self, field)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(field, "must be a positive int")
        if self.seq_len % 2:
            bad("seq_len", "must be even")
        if self.num_kv_pairs > self.vocab_size // 2 - 1:
            bad("num_kv_pairs", f"needs at least that many keys in 1 .. vocab_size//2 - 1 = {self.vocab_size // 2 - 1}")
        if 4 * self.num_kv_pairs > self.seq_len:
            bad("num_kv_pairs", f"2K block + K queries on even slots need 4K <= seq_len={self.seq_len}")
        if not self.power_a > 0:
            bad("power_a", "must be > 0")

    # -- JSON ----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MQARConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"MQARConfig: unknown fields {sorted(unknown)}")
        return cls(**d)

    def save(self, path: str) -> None:
        """Write ``path`` (a file, or a directory that receives ``mqar.json``)."""
        if os.path.isdir(path):
            path = os.path.join(path, "mqar.json")
        with open(path, "w") as fh:
            json.dump(self.to_dict(), fh, indent=2)
            fh.write("\n")

    @classmethod
    def load(cls, path: str) -> "MQARConfig":
        if os.path.isdir(path):
            path = os.path.join(path, "mqar.json")
        with open(path) as fh:
            return cls.from_dict(json.load(fh))

    # -- data ----------------------------------------------------------------------------------
    @property
    def context_len(self) -> int:
        return 2 * self.num_kv_pairs

    @property
    def query_space(self) -> int:
        return (self.seq_len - self.context_len) // 2

    def generate(self) -> "MQARData":
        return multiquery_ar(self)


@dataclass
class MQARData:
    """``inputs`` (n, T) int64 token ids, ``labels`` (n, T) int64 (-100 except after each query), plus
    the ground truth per example: ``keys``, ``values`` (n, K) and ``query_positions`` (n, K), the
    position of the query for ``keys[:, i]``."""

    inputs: torch.Tensor
    labels: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    query_positions: torch.Tensor
    config: MQARConfig

    def __len__(self) -> int:
        return self.inputs.shape[0]


def power_law_probs(space: int, power_a: float) -> np.ndarray:
    """Zoology's query-gap distribution: p(g) proportional to ``a * g**(a-1)``, g = 1 .. space."""
    g = np.arange(1, space + 1, dtype=np.float64)
    p = power_a * g ** (power_a - 1)
    return p / p.sum()


def _distinct(rng: np.random.Generator, n: int, low: int, high: int, k: int) -> np.ndarray:
    """n rows of k distinct uniform draws from low .. high-1 (a random permutation's first k)."""
    return rng.random((n, high - low)).argsort(axis=1)[:, :k] + low


def multiquery_ar(config: MQARConfig) -> MQARData:
    """Generate the data set ``config`` describes (deterministic in ``config.seed``)."""
    c = config
    n, T, K, V = c.num_examples, c.seq_len, c.num_kv_pairs, c.vocab_size
    rng = np.random.default_rng(c.seed)
    half = V // 2
    keys = _distinct(rng, n, 1, half, K)
    values = _distinct(rng, n, half, V, K)

    # query slots: K distinct slots out of `space`, weighted by the power law (Gumbel-top-k)
    space = c.query_space
    logp = np.log(power_law_probs(space, c.power_a))
    gumbel = -np.log(-np.log(rng.random((n, space))))
    slots = np.argsort(-(logp + gumbel), axis=1)[:, :K]  # 0-based slot g - 1
    query_pos = c.context_len + 2 * slots

    inputs = np.zeros((n, T), dtype=np.int64)
    inputs[:, 0 : 2 * K : 2] = keys
    inputs[:, 1 : 2 * K : 2] = values
    if c.random_non_queries:
        noise = rng.integers(0, V, size=(n, T - 2 * K))
        inputs[:, 2 * K :] = noise
    rows = np.arange(n)[:, None]
    inputs[rows, query_pos] = keys
    labels = np.full((n, T), IGNORE_INDEX, dtype=np.int64)
    labels[rows, query_pos + 1] = values  # HF convention: the model's output at query_pos predicts it
    return MQARData(
        inputs=torch.from_numpy(inputs), labels=torch.from_numpy(labels), keys=torch.from_numpy(keys),
        values=torch.from_numpy(values), query_positions=torch.from_numpy(query_pos), config=c,
    )


def value_distances(data: MQARData) -> torch.Tensor:
    """(n, K): how far back each query must look, ``query position - position of its value``
    (key ``i`` sits at ``2i`` and its value at ``2i + 1``). A query with distance >= ``w`` asks for a
    value outside a window of ``w`` tokens."""
    K = data.keys.shape[1]
    return data.query_positions - (2 * torch.arange(K) + 1)


def answer_mask(labels: torch.Tensor) -> torch.Tensor:
    """(n, T) labels -> (n, T - 1) bool: positions of ``logits[:, :-1]`` that are scored."""
    return labels[:, 1:] != IGNORE_INDEX


@torch.no_grad()
def count_correct(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(correct, total) argmax predictions at the answer positions (HF causal alignment)."""
    mask = answer_mask(labels)
    pred = logits[:, :-1].argmax(-1)
    correct = (pred == labels[:, 1:]) & mask
    return int(correct.sum()), int(mask.sum())


__all__ = ["MQARConfig", "MQARData", "multiquery_ar", "power_law_probs", "answer_mask", "count_correct",
           "value_distances", "IGNORE_INDEX"]
