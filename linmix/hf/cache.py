"""The decoding cache of a linmix model under transformers' `generate()`.

It holds what `linmix.models.generate` keeps between tokens: the model's recurrent state (from
`init_state`, `prefill` and `step`), the number of tokens seen and, for a model with a finite
window, its last `window` tokens. Within the window each new token goes through the model's `step`
(constant memory per token for the linear mixers); past it, each new token recomputes the last
`window` tokens, as linmix's own decoding does, so both pick the same tokens.
"""

import math
from collections.abc import Callable

import torch
from torch import nn
from transformers.cache_utils import Cache


class LinmixCache(Cache):
    """Recurrent decoding state of one batch of sequences.

    Args:
        model: the linmix model (e.g. ``LinmixForCausalLM.linmix``), in the mode it decodes in.
        batch_size: sequences decoded together.
        device: where the state lives.
        dtype: the model's parameter dtype (as `linmix.models.generate` uses).
    """

    def __init__(self, model: nn.Module, batch_size: int, device: torch.device | str, dtype: torch.dtype):
        super().__init__(layers=[])
        self.window = model.window
        self.state = model.init_state(batch_size, device, dtype)
        self.seen_tokens = 0
        # The last `window` tokens [B, <= window], kept only where the model has a finite window.
        self.recent = None if math.isinf(self.window) else torch.empty(batch_size, 0, dtype=torch.long, device=device)

    def advance(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """Decode the next tokens and update the cache.

        Args:
            model: the model the cache was made for.
            input_ids: [B, T] tokens that follow those seen so far.

        Returns:
            logits [B, T', V] of the last T' = min(T, window) positions.
        """
        window = self.window
        length = input_ids.shape[1]
        if self.seen_tokens == 0 or self.seen_tokens + length <= window:
            tokens = input_ids if length <= window else input_ids[:, -int(window):]
            if self.seen_tokens > 0 and length == 1:
                logits, self.state = model.step(tokens[:, 0], self.state)
                logits = logits[:, None]
            else:
                logits, self.state = model.prefill(tokens, self.state)
        else:  # past the window: recompute the last `window` tokens, as linmix.models.generate does
            context = torch.cat([self.recent, input_ids], dim=1)[:, -int(window):]
            logits = model(context)[0][:, -length:]
        self.seen_tokens += length
        if self.recent is not None:
            self.recent = torch.cat([self.recent, input_ids], dim=1)[:, -int(window):]
        return logits

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens decoded so far (transformers' name)."""
        return self.seen_tokens

    def memory_bytes(self) -> int:
        """Bytes of the tensors the cache holds."""
        return sum(t.numel() * t.element_size() for t in _tensors([self.state, self.recent]))

    @property
    def is_croppable(self) -> bool:
        """A recurrent state cannot be rolled back to fewer tokens."""
        return False

    @property
    def is_compileable(self) -> bool:
        """The state is a tree of tensors that changes shape past the window: never compiled by generate."""
        return False

    def crop(self, tokens_to_remove: int) -> None:
        """Not supported: a recurrent state cannot forget tokens."""
        raise NotImplementedError("a linmix recurrent state cannot be cropped")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep the sequences `beam_idx` [B] (beam search)."""
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the sequences `indices` [B'] of the batch."""
        self._map_tensors(lambda t: t.index_select(0, indices.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat each sequence `repeats` times in place (its copies next to it)."""
        self._map_tensors(lambda t: t.repeat_interleave(repeats, dim=0))

    def _map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace every tensor of the state (batch first, as every linmix state is) and `recent` by fn(tensor)."""
        self.state = _map_tree(self.state, fn)
        if self.recent is not None:
            self.recent = fn(self.recent)


def _tensors(tree):
    """The tensors of `tree` (nested dicts, lists and tuples)."""
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from _tensors(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _tensors(value)


def _map_tree(tree, fn: Callable[[torch.Tensor], torch.Tensor]):
    """`tree` (nested dicts, lists and tuples) with each tensor t replaced by fn(t); other leaves unchanged."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return {key: _map_tree(value, fn) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map_tree(value, fn) for value in tree)
    return tree
