"""Seeded generators of the synthetic tasks: MQAR, copy, multi-hop, parity and S5.

Every generator returns a `TaskBatch` of `num_examples` sequences: the inputs, the token to
predict at each position, and the mask of the positions that are scored (loss and accuracy are
computed there only). Generators draw from their own `torch.Generator` seeded by `seed`, so the
same arguments give the same examples on every machine. Bad arguments raise ValueError naming
the argument and its valid range.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

IGNORE = -100  # the target of a position that is not scored (torch's cross-entropy ignore_index)
SAMPLE_CHUNK = 1 << 22  # rows x population drawn at once when sampling without replacement


@dataclass
class TaskBatch:
    """Examples of a synthetic task.

    Attributes:
        inputs: [N, T] torch.long token ids.
        targets: [N, T] torch.long, the token to predict at each position; IGNORE where mask is False.
        mask: [N, T] bool, the scored positions.
        vocab_size: the number of token ids inputs and targets draw from.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    vocab_size: int

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def to(self, device: torch.device | str) -> TaskBatch:
        """The same examples on `device`."""
        return TaskBatch(self.inputs.to(device), self.targets.to(device), self.mask.to(device), self.vocab_size)

    def select(self, index: torch.Tensor | slice) -> TaskBatch:
        """The examples at `index` (a slice or a [n] index tensor)."""
        return TaskBatch(self.inputs[index], self.targets[index], self.mask[index], self.vocab_size)


def _rng(seed: int) -> torch.Generator:
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    return torch.Generator().manual_seed(seed)


def _check_int(name: str, value, low: int, high: float = math.inf, why: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        bound = f"in [{low}, {high}]" if high != math.inf else f">= {low}"
        raise ValueError(f"{name} must be an int {bound}{why}, got {value!r}")


def _distinct_draws(rows: int, population: int, count: int, rng: torch.Generator) -> torch.Tensor:
    """`count` distinct values of `range(population)` per row, in uniformly random order. [rows, count]

    The `count` largest of `population` i.i.d. uniforms mark a uniform subset, and sorting by them
    orders it uniformly at random (what `np.random.choice(population, count, replace=False)` draws).
    """
    step = max(1, SAMPLE_CHUNK // population)
    parts = [torch.rand(min(step, rows - start), population, generator=rng).topk(count, dim=1).indices
             for start in range(0, rows, step)]
    return torch.cat(parts)


def power_law_gaps(rows: int, space: int, count: int, power_a: float, rng: torch.Generator) -> torch.Tensor:
    """`count` distinct gaps in `range(space)` per row, drawn one after another without replacement
    with probability proportional to `power_a * k ** (power_a - 1)` for gap k - 1 (zoology's power law).

    Sorting `log p + Gumbel noise` draws exactly the sequence of weighted draws without replacement
    (the Gumbel top-k trick), so column 0 holds the first draw, distributed as p itself. [rows, count]
    """
    ranks = torch.arange(1, space + 1, dtype=torch.float64)
    log_p = (math.log(power_a) + (power_a - 1.0) * torch.log(ranks)).float()  # unnormalised, [space]
    step = max(1, SAMPLE_CHUNK // space)
    parts = []
    for start in range(0, rows, step):
        uniform = torch.rand(min(step, rows - start), space, generator=rng).clamp_(min=1e-20, max=1.0 - 1e-7)
        gumbel = -torch.log(-torch.log(uniform))
        parts.append((log_p + gumbel).topk(count, dim=1).indices)
    return torch.cat(parts)


def mqar(
    num_examples: int,
    seq_len: int,
    num_kv_pairs: int,
    vocab_size: int = 8192,
    power_a: float = 0.01,
    num_passes: int = 1,
    random_non_queries: bool = True,
    seed: int = 0,
) -> TaskBatch:
    """Multi-query associative recall as zoology's `multiquery_ar` builds it (Arora et al., 2023).

    Each sequence lists `num_kv_pairs` (key, value) pairs (repeated `num_passes` times), keys drawn
    without replacement from [1, V/2) and values from [V/2, V). The rest of the sequence is the
    query region: each key appears once more, at an even offset 2g after the pairs, the gaps g drawn
    without replacement with P(g = k - 1) proportional to `power_a * k ** (power_a - 1)` (queries
    cluster early). The target at a query is its key's value; no other position is scored. The
    other query-region tokens are 0, or uniform in [0, V) with `random_non_queries` (then a key or
    value token may reappear there, as in zoology).

    The distribution is zoology's; the random stream is not (zoology draws with numpy's global
    generator, this function with a seeded torch generator).

    Args:
        num_examples: N, >= 1.
        seq_len: T, even, below vocab_size, with room for the pairs and one query per key:
            `2 * num_kv_pairs * num_passes + 2 * num_kv_pairs <= seq_len`.
        num_kv_pairs: pairs per sequence, >= 1.
        vocab_size: V, > seq_len.
        power_a: the power law's exponent parameter, > 0 (1 gives uniform query placement).
        num_passes: times the pairs are repeated before the queries (JRT-style), >= 1.
        random_non_queries: fill the query region's other positions with random tokens.
        seed: seeds the generator.

    Returns:
        A TaskBatch with inputs, targets and mask [N, T].

    Raises:
        ValueError: an argument out of range (zoology's asserts, among others).
    """
    _check_int("num_examples", num_examples, 1)
    _check_int("num_kv_pairs", num_kv_pairs, 1)
    _check_int("num_passes", num_passes, 1)
    _check_int("seq_len", seq_len, 2)
    if seq_len % 2:
        raise ValueError(f"seq_len must be even, got {seq_len}")
    if not isinstance(vocab_size, int) or vocab_size <= seq_len:
        raise ValueError(f"vocab_size must be an int > seq_len={seq_len}, got {vocab_size!r}")
    context = 2 * num_kv_pairs * num_passes
    if context + 2 * num_kv_pairs > seq_len:
        raise ValueError(
            f"seq_len must be >= 2 * num_kv_pairs * (num_passes + 1) = {context + 2 * num_kv_pairs} to hold "
            f"{num_kv_pairs} pairs x {num_passes} passes and one query per key, got {seq_len}"
        )
    key_vocab = vocab_size // 2  # vocab_size > seq_len >= 4 num_kv_pairs: both halves hold enough distinct tokens
    if not power_a > 0:
        raise ValueError(f"power_a must be > 0, got {power_a}")
    rng = _rng(seed)
    keys = _distinct_draws(num_examples, key_vocab - 1, num_kv_pairs, rng) + 1  # [N, kv] in [1, V/2)
    values = _distinct_draws(num_examples, vocab_size - key_vocab, num_kv_pairs, rng) + key_vocab  # [V/2, V)
    space = (seq_len - context) // 2
    gaps = power_law_gaps(num_examples, space, num_kv_pairs, power_a, rng)  # [N, kv]
    inputs = torch.zeros(num_examples, seq_len, dtype=torch.long)
    pairs = torch.stack([keys, values], dim=2).flatten(1)  # [N, 2 kv]: k0 v0 k1 v1 ...
    inputs[:, :context] = pairs.repeat(1, num_passes)
    queries = context + 2 * gaps  # [N, kv], each <= seq_len - 2
    inputs.scatter_(1, queries, keys)
    targets = torch.full_like(inputs, IGNORE)
    targets.scatter_(1, queries, values)
    if random_non_queries:
        noise = torch.randint(vocab_size, inputs.shape, generator=rng)
        inputs = torch.where(inputs == 0, noise, inputs)
    return TaskBatch(inputs, targets, targets != IGNORE, vocab_size)


def copy_task(num_examples: int, length: int, num_symbols: int = 32, seed: int = 0) -> TaskBatch:
    """Copy ("repeat after me"): BOS, a random string of `length` symbols, SEP, the string again.

    Tokens: symbols [0, S), BOS = S, SEP = S + 1. The sequence has T = 2L + 2 tokens; the positions
    from SEP to the second copy's next-to-last symbol predict the copy (L scored positions).

    Args:
        num_examples: N, >= 1.
        length: L, the string's length, >= 1.
        num_symbols: S, >= 2.
        seed: seeds the generator.

    Returns:
        A TaskBatch with inputs, targets and mask [N, 2L + 2] and vocab_size S + 2.
    """
    _check_int("num_examples", num_examples, 1)
    _check_int("length", length, 1)
    _check_int("num_symbols", num_symbols, 2)
    rng = _rng(seed)
    string = torch.randint(num_symbols, (num_examples, length), generator=rng)
    bos = torch.full((num_examples, 1), num_symbols)
    sep = torch.full((num_examples, 1), num_symbols + 1)
    inputs = torch.cat([bos, string, sep, string], dim=1)  # [N, 2L + 2]
    targets = torch.full_like(inputs, IGNORE)
    targets[:, length + 1 : 2 * length + 1] = string
    return TaskBatch(inputs, targets, targets != IGNORE, num_symbols + 2)


def multihop(
    num_examples: int,
    hops: int,
    seq_len: int = 256,
    num_entities: int = 64,
    num_chains: int = 8,
    seed: int = 0,
) -> TaskBatch:
    """Multi-hop pointer chasing: follow `hops` assignments from a queried entity.

    Each example draws `num_chains` chains of `hops + 1` distinct entities, `a -> b -> c ...`, writes
    every link as the three tokens `a b ;`, shuffles all links together (the other chains are the
    distractors), and ends with the query `? a` for the head a of one chain; the answer, scored at
    the last position only, is a's `hops`-hop image (the chain's tail). The sequence is padded on
    the left to `seq_len`.

    Tokens: entities [0, E), ";" = E, "?" = E + 1, padding = E + 2.

    Args:
        num_examples: N, >= 1.
        hops: h, >= 1.
        seq_len: T, >= 3 * num_chains * hops + 2 (the links and the query).
        num_entities: E, >= num_chains * (hops + 1) (every chain's entities are distinct).
        num_chains: chains per example, >= 1.
        seed: seeds the generator.

    Returns:
        A TaskBatch with inputs, targets and mask [N, T] and vocab_size E + 3.
    """
    _check_int("num_examples", num_examples, 1)
    _check_int("hops", hops, 1)
    _check_int("num_chains", num_chains, 1)
    _check_int("num_entities", num_entities, num_chains * (hops + 1),
               why=f" (num_chains * (hops + 1) distinct entities for {num_chains} chains of {hops} hops)")
    content = 3 * num_chains * hops + 2
    _check_int("seq_len", seq_len, content, why=" (3 tokens per link for num_chains * hops links, and 2 query tokens)")
    rng = _rng(seed)
    semicolon, question, pad = num_entities, num_entities + 1, num_entities + 2
    chains = _distinct_draws(num_examples, num_entities, num_chains * (hops + 1), rng)
    chains = chains.view(num_examples, num_chains, hops + 1)
    links = torch.stack([chains[:, :, :-1], chains[:, :, 1:]], dim=3).flatten(1, 2)  # [N, C h, 2]
    order = torch.rand(num_examples, num_chains * hops, generator=rng).argsort(dim=1)
    links = links.gather(1, order[:, :, None].expand(-1, -1, 2))
    link_tokens = torch.cat([links, torch.full_like(links[:, :, :1], semicolon)], dim=2).flatten(1)
    queried = torch.randint(num_chains, (num_examples,), generator=rng)
    rows = torch.arange(num_examples)
    head, answer = chains[rows, queried, 0], chains[rows, queried, hops]
    inputs = torch.cat([
        torch.full((num_examples, seq_len - content), pad),
        link_tokens,
        torch.full((num_examples, 1), question),
        head[:, None],
    ], dim=1)
    targets = torch.full_like(inputs, IGNORE)
    targets[:, -1] = answer
    return TaskBatch(inputs, targets, targets != IGNORE, num_entities + 3)


def parity(num_examples: int, seq_len: int, seed: int = 0) -> TaskBatch:
    """Running parity: random bits; the target at every position is the parity of the bits so far.

    Args:
        num_examples: N, >= 1.
        seq_len: T, >= 1.
        seed: seeds the generator.

    Returns:
        A TaskBatch with inputs, targets and mask [N, T] (every position scored) and vocab_size 2.
    """
    _check_int("num_examples", num_examples, 1)
    _check_int("seq_len", seq_len, 1)
    bits = torch.randint(2, (num_examples, seq_len), generator=_rng(seed))
    return TaskBatch(bits, bits.cumsum(dim=1) % 2, torch.ones_like(bits, dtype=torch.bool), 2)


S5_PERMUTATIONS = tuple(itertools.permutations(range(5)))  # token i is S5_PERMUTATIONS[i]


def s5_compose_table() -> torch.Tensor:
    """`table[a, b]` = the token of `S5_PERMUTATIONS[a] o S5_PERMUTATIONS[b]` (b first, then a). [120, 120]"""
    index = {perm: i for i, perm in enumerate(S5_PERMUTATIONS)}
    return torch.tensor([[index[tuple(a[b[i]] for i in range(5))] for b in S5_PERMUTATIONS] for a in S5_PERMUTATIONS])


def s5(num_examples: int, seq_len: int, seed: int = 0) -> TaskBatch:
    """S5 state tracking: tokens are the 120 permutations of 5 elements; the target at position t is
    the running product `x_t o x_{t-1} o ... o x_0` (each new permutation applied after the others).

    Tokens: the index into `S5_PERMUTATIONS` (itertools order), for inputs and targets alike.

    Args:
        num_examples: N, >= 1.
        seq_len: T, >= 1.
        seed: seeds the generator.

    Returns:
        A TaskBatch with inputs, targets and mask [N, T] (every position scored) and vocab_size 120.
    """
    _check_int("num_examples", num_examples, 1)
    _check_int("seq_len", seq_len, 1)
    inputs = torch.randint(len(S5_PERMUTATIONS), (num_examples, seq_len), generator=_rng(seed))
    table = s5_compose_table()
    targets = torch.empty_like(inputs)
    targets[:, 0] = inputs[:, 0]
    for t in range(1, seq_len):
        targets[:, t] = table[inputs[:, t], targets[:, t - 1]]
    return TaskBatch(inputs, targets, torch.ones_like(inputs, dtype=torch.bool), len(S5_PERMUTATIONS))


GENERATORS = {"mqar": mqar, "copy": copy_task, "multihop": multihop, "parity": parity, "s5": s5}
