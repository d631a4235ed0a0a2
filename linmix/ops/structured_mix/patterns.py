"""Sparsity patterns of the recurrent part B of a structured mixer (spec/structured_mixing.md §3).

Token ``t`` (0-based) reads the past outputs at the positions of its row of the pattern's index
table ``idx[t, k]``, one per level ``k``. Two families:

* ``Offsets``: translation invariant, ``idx[t, k] = t - f(k)``; the first order, k-th order,
  ``2^k``, ``k^2 + 1`` and windowed dense patterns are instances. Decoding keeps the last
  ``f(K - 1)`` outputs (the op's state, a window shifted by one per token): the cache stays
  ``O(T)`` (§3.1).
* ``Lattice``: the cache-efficient variant (Def. 4.10, Prop. 4.12; indexing reconstructed in §3.4
  and A5): level ``k`` is snapped to a lattice of step ``a_k``, so that the positions a token reads
  are a subset of the previous token's plus the previous token itself. Decoding is then a
  multi-rate shift register of one slot per level (``Lattice.advance``).

The levels of a pattern are fixed at construction; ``levels_below(f, T)`` gives the levels a
sequence of length ``T`` uses (``#{k : f(k) < T}``, Prop. 4.2), so ``powers_of_two(levels_below(
lambda k: 2 ** k, 4096))`` is the paper's ``2^k`` pattern at ``n = 4096`` (12 levels).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch


def _check_offsets(offsets: Sequence[int], what: str) -> tuple[int, ...]:
    """``offsets`` as a tuple of ints, strictly increasing and positive; TypeError/ValueError naming ``what``."""
    if isinstance(offsets, (str, bytes)) or not isinstance(offsets, Sequence):
        raise TypeError(f"{what} must be a sequence of ints, got {type(offsets).__name__}")
    if any(isinstance(f, bool) or not isinstance(f, int) for f in offsets):
        raise TypeError(f"{what} must hold ints, got {list(offsets)}")
    values = tuple(offsets)
    if not values:
        raise ValueError(f"{what} must hold at least one offset, got an empty sequence")
    if values[0] < 1 or any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"{what} must be positive and strictly increasing, got {list(values)}")
    return values


def levels_below(f: Callable[[int], int], T: int) -> int:
    """The number of levels a sequence of length ``T`` uses: ``#{k : f(k) < T}`` for strictly increasing ``f``."""
    k = 0
    while f(k) < T:
        k += 1
    return k


@dataclass(frozen=True)
class Offsets:
    """A translation-invariant pattern: token ``t`` reads ``y[t - f(k)]`` for every level ``k``.

    Attributes:
        offsets: ``f(0) < f(1) < ... < f(K - 1)``, positive ints.
        name: a label for listings and test ids.
    """

    offsets: tuple[int, ...]
    name: str = "offsets"

    def __post_init__(self) -> None:
        object.__setattr__(self, "offsets", _check_offsets(self.offsets, "offsets"))

    @property
    def levels(self) -> int:
        """K, the number of levels (one coefficient per level and token)."""
        return len(self.offsets)

    @property
    def max_offset(self) -> int:
        """``f(K - 1)``: how many past outputs the decode cache (and the op's state) holds."""
        return self.offsets[-1]

    def index_table(self, T: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """``idx [T, K]`` int64: ``t - f(k)``, or -1 where that is before position 0."""
        t = torch.arange(T, device=device)[:, None]  # [T, 1]
        idx = t - torch.tensor(self.offsets, device=device)  # [T, K]
        return idx.clamp_min(-1)

    def cache_size(self, T: int) -> int:
        """The most past outputs a decoder of a length-``T`` sequence must keep: ``f(K')`` of the
        highest level ``K'`` with ``f < T`` (every output at most that far back is read later), 0 for T <= 1."""
        used = [f for f in self.offsets if f < T]
        return used[-1] if used else 0


def first_order() -> Offsets:
    """``{1}``: the gated first-order recurrence (diagonal SSM)."""
    return Offsets((1,), "first_order")


def kth_order(k: int) -> Offsets:
    """``{1, ..., k}``: the k-th order recurrence (the dense one at length ``T`` for ``k = T - 1``)."""
    return Offsets(tuple(range(1, k + 1)), f"order_{k}")


def dense_window(window: int) -> Offsets:
    """Every one of the last ``window`` outputs: the dense ("infinite-order") recurrence for ``T <= window + 1``."""
    return Offsets(tuple(range(1, window + 1)), f"dense_{window}")


def powers_of_two(levels: int) -> Offsets:
    """``{2^k : k < levels}``: O(log n) per token, at most log2 n hops (popcount of the distance)."""
    return Offsets(tuple(2**k for k in range(levels)), f"pow2_{levels}")


def squares_plus_one(levels: int) -> Offsets:
    """``{k^2 + 1 : k < levels}``: O(sqrt n) per token, at most 4 hops (Lagrange's four-square theorem)."""
    return Offsets(tuple(k * k + 1 for k in range(levels)), f"sq1_{levels}")


@dataclass(frozen=True)
class Lattice:
    """The cache-efficient version of an offset pattern (§3.4): level ``k`` snapped to a lattice of step ``a_k``.

    1-based, token ``i`` reads ``p_k(i) = a_k * ceil((i - f(k)) / a_k)`` for each ``k`` with ``f(k) < i``,
    which lies in ``[1, i - 1]`` at an offset in ``(f(k) - a_k, f(k)]``; ``a_0 = 1`` and
    ``a_{k+1} = a_k * ceil((f(k+1) - f(k)) / a_k)``. Invariant: ``P(i + 1) ⊆ P(i) ∪ {i}``, so a
    decoder keeps one slot per level (``advance``). Levels may land on one position (duplicates,
    A6): each keeps its own slot and coefficient.

    Attributes:
        offsets: ``f(0) = 1 < f(1) < ...``, the pattern it snaps (``f(0) = 1``, A7).
        name: a label for listings and test ids.
    """

    offsets: tuple[int, ...]
    name: str = "lattice"
    steps: tuple[int, ...] = field(init=False, repr=False, compare=False)
    """``a_k``: 1, 1, 2, 4, 8, ... for ``2^k``; 1, 1, 3, 6, 12, 12, 12, 24, ... for ``k^2 + 1`` (set at
    construction, a plain attribute that ``torch.compile`` reads like any other)."""

    def __post_init__(self) -> None:
        offsets = _check_offsets(self.offsets, "offsets")
        if offsets[0] != 1:
            raise ValueError(f"offsets of a lattice pattern must start at f(0) = 1, got {list(offsets)}")
        object.__setattr__(self, "offsets", offsets)
        steps = [1]
        for low, high in zip(offsets, offsets[1:]):
            steps.append(steps[-1] * math.ceil((high - low) / steps[-1]))
        object.__setattr__(self, "steps", tuple(steps))

    @classmethod
    def of(cls, pattern: Offsets) -> Lattice:
        """The lattice version of a translation-invariant pattern."""
        return cls(pattern.offsets, f"{pattern.name}_lattice")

    @property
    def levels(self) -> int:
        """K, the number of levels (and of decoder slots)."""
        return len(self.offsets)

    def index_table(self, T: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """``idx [T, K]`` int64, 0-based: ``a_k * ceil((t + 1 - f(k)) / a_k) - 1`` where ``f(k) <= t``, else -1."""
        t = torch.arange(T, device=device)[:, None]  # [T, 1]
        f = torch.tensor(self.offsets, device=device)  # [K]
        a = torch.tensor(self.steps, device=device)  # [K]
        rest = t + 1 - f  # [T, K], ceil division of a non-negative int below
        idx = a * torch.div(rest + a - 1, a, rounding_mode="floor") - 1
        return torch.where(f <= t, idx, -1)

    def cache_levels(self, T: int) -> int:
        """Decoder slots (one per level) at length ``T``: the levels with ``f(k) < T``."""
        return sum(f < T for f in self.offsets)

    def cache_positions(self, T: int) -> int:
        """The most distinct past positions any token of a length-``T`` sequence reads (§3.4's table)."""
        idx = self.index_table(T)  # [T, K]
        ordered = idx.sort(dim=1).values
        distinct = (ordered[:, 1:] != ordered[:, :-1]) & (ordered[:, 1:] >= 0)  # [T, K - 1]
        counts = distinct.sum(dim=1) + (ordered[:, 0] >= 0).long()  # [T]
        return int(counts.max()) if T else 0

    def advance(self, slots: list, i: int, value: object) -> list:
        """The shift register after token ``i`` (1-based) is produced with ``value``: from the top level
        down, slot ``k`` takes slot ``k - 1`` when ``f(k) <= i`` and ``(i - f(k)) % a_k == 0``, then
        slot 0 takes ``value``. From slots holding ``P(i)`` (None for levels not reached yet) the result
        holds ``P(i + 1)``. ``slots`` is not modified.
        """
        slots = list(slots)
        for k in range(self.levels - 1, 0, -1):
            if self.offsets[k] <= i and (i - self.offsets[k]) % self.steps[k] == 0:
                slots[k] = slots[k - 1]
        slots[0] = value
        return slots

    def reached(self, position: torch.Tensor) -> torch.Tensor:
        """``[..., K]`` bool: whether the token at absolute 0-based ``position`` (int64 ``[...]``) reads
        level ``k``, i.e. ``f(k) <= position``."""
        f, _ = self._levels_on(position.device)
        return f <= position[..., None]

    def shifting(self, i: torch.Tensor) -> torch.Tensor:
        """``advance``'s rule on tensors: ``[..., K]`` bool, whether slot ``k`` takes slot ``k - 1`` after
        token ``i`` (1-based, int64 ``[...]``) (slot 0, which takes the new value, always)."""
        f, a = self._levels_on(i.device)
        i = i[..., None]  # [..., 1]
        return (f <= i) & (torch.remainder(i - f, a) == 0)

    def sources(self, start: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Where the register's slots come from in a call of ``T`` tokens starting at absolute position ``start``.

        Number the rows a call can read ``ext = [the K initial slots; the T outputs]``: slot ``j``
        of the carried register is row ``j``, the call's output ``t`` row ``K + t``. Row ``t`` of the
        result is the register before token ``t`` (0-based in the call, absolute ``start + t``), row
        ``T`` the register after the last token: what ``advance`` from the initial slots leaves in
        each slot. A slot that holds an output of the call holds the closed form's position
        (``index_table``); one that holds an initial slot is traced back through the copies of
        ``advance`` (slot ``j`` was last copied into at token ``i* <= q``, the largest with
        ``i* ≡ f(j) mod a_j``; it came from slot ``j - 1`` before that token if ``i*`` is in the call,
        else it is initial slot ``j``), at most K steps. A level not reached yet keeps its initial slot.

        Args:
            start: ``[B]`` int64, the absolute (0-based) position of each row's first token.
            T: the number of tokens of the call.

        Returns:
            ``rows [B, T + 1, K]`` int64 into ``ext`` and ``present [B, T + 1, K]`` bool: whether the
            token of row ``t`` reads level ``k`` (``f(k) <= start + t``).
        """
        f, a = self._levels_on(start.device)
        K = self.levels
        p = start[:, None, None] + torch.arange(T + 1, device=start.device)[:, None]  # [B, T + 1, 1] absolute
        present = f <= p  # [B, T + 1, K]
        read = a * torch.div(p + 1 - f + a - 1, a, rounding_mode="floor") - 1  # [B, T + 1, K], index_table's
        rows = K + read - start[:, None, None]
        traced = min(T + 1, self.offsets[-1])  # rows t >= f(K - 1) read outputs of the call only
        if traced:
            slot = self._initial_slots(start, p[:, :traced].expand(-1, -1, K), f, a)  # [B, traced, K]
            from_state = (~present | (read < start[:, None, None]))[:, :traced]
            rows[:, :traced] = torch.where(from_state, slot, rows[:, :traced])
        return rows, present

    def _initial_slots(self, start: torch.Tensor, q: torch.Tensor, f: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """For slot ``k`` of the register before absolute token ``q [B, R, K]``, the initial slot its value
        came from (``sources``' trace; entries holding an output of the call give garbage, masked there)."""
        start = start[:, None, None]  # [B, 1, 1]
        level = torch.arange(self.levels, device=q.device).expand_as(q).clone()  # [B, R, K]
        slot = level.clone()
        done = torch.zeros_like(q, dtype=torch.bool)
        for _ in range(self.levels):
            f_j, a_j = f[level], a[level]
            last = q - torch.remainder(q - f_j, a_j)  # the latest token i <= q that copies into slot j
            copied = (q >= f_j) & (last > start)
            slot = torch.where(~done & ~copied, level, slot)
            done = done | ~copied | (level == 0)  # slot 0 copied in the call holds an output
            level = torch.where(done, level, level - 1)
            q = torch.where(done, q, last - 1)
        return slot

    def _levels_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``f(k)`` and ``a_k`` as int64 ``[K]`` tensors on ``device``."""
        return (torch.tensor(self.offsets, device=device), torch.tensor(self.steps, device=device))

