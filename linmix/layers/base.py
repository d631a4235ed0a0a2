"""The layer contract every token mixer follows, as a base class with its defaults.

A mixer maps a normalised sequence x [B, T, d] to y [B, T, d] and can carry a decoding state:

* ``forward(x, None)`` processes a sequence from position 0 and returns ``(y, None)``;
* ``forward(x, state)`` continues from ``state`` (``init_state``'s, or the one a previous call
  returned) and returns ``(y, new_state)``, so a sequence processed in pieces gives the outputs of
  one call on the whole;
* ``step(x_t, state)`` decodes one position; decoding a sequence token by token with ``step``
  gives the outputs of ``forward`` on it;
* ``window`` is the longest sequence the mixer can process (``math.inf`` when unbounded);
* ``no_weight_decay`` names the module's own parameters that take no weight decay (see
  ``linmix.models.param_groups``).

A state passed to ``forward`` or ``step`` may be updated in place: use the returned one.
"""

import abc
import math

import torch
from torch import nn


def check_head_config(config) -> None:
    """The checks every multi-head mixer config shares: ``d_model``, ``n_heads``, ``conv_size`` and
    ``context_length`` at least 1, and ``head_dim`` either >= 1 or None with ``d_model`` a multiple of
    ``n_heads``. Raises ValueError naming the field."""
    for name in ("d_model", "n_heads", "conv_size", "context_length"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
    if config.head_dim is None and config.d_model % config.n_heads:
        raise ValueError(f"d_model={config.d_model} must be a multiple of n_heads={config.n_heads} "
                         "when head_dim is not given")
    if config.head_dim is not None and config.head_dim < 1:
        raise ValueError(f"head_dim must be >= 1, got {config.head_dim}")


def init_linear_layers(module: nn.Module, std: float) -> None:
    """Every ``nn.Linear`` inside ``module``: weights N(0, std^2), biases 0."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, std=std)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def check_mixer_input(x: torch.Tensor, ndim: int, d_model: int) -> None:
    """ValueError unless ``x`` is ``[B, T, d]`` (``ndim`` 3, a sequence) or ``[B, d]`` (``ndim`` 2, a step)."""
    if x.dim() != ndim or x.shape[-1] != d_model:
        raise ValueError(f"x must be [B, T, {d_model}] (x_t [B, {d_model}] for a step), got {list(x.shape)}")


class Mixer(nn.Module, metaclass=abc.ABCMeta):
    """Base class of the token mixers: subclasses implement ``forward`` and ``init_state``.

    Attributes:
        window: longest sequence (in positions, from position 0) the mixer can process; a class
            attribute or a property, ``math.inf`` by default.
        no_weight_decay: names of the module's own parameters (not its submodules') that take no
            weight decay and, in the "grouped" optimizer mode, train in the "logit" group at half the
            learning rate.
    """

    window: float = math.inf
    no_weight_decay: tuple[str, ...] = ()

    @abc.abstractmethod
    def forward(self, x: torch.Tensor, state=None) -> tuple[torch.Tensor, object]:
        """Mix a sequence.

        Args:
            x: [B, T, d] input; a width other than the config's d_model raises ValueError.
            state: None to start at position 0, or a decoding state to continue from.

        Returns:
            (y [B, T, d], None when ``state`` is None, else the state after the last position).
        """

    @abc.abstractmethod
    def init_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype):
        """The decoding state before position 0.

        Args:
            batch_size: sequences decoded together, B.
            device: where the state's tensors live.
            dtype: dtype of the inputs that will be decoded.

        Returns:
            The state ``forward``/``step`` take (a dict of tensors and positions, or None for a
            stateless mixer).
        """

    def step(self, x_t: torch.Tensor, state) -> tuple[torch.Tensor, object]:
        """Decode one position: ``forward`` on a sequence of length 1. Mixers override it with a
        fused one-token path where they have one.

        Args:
            x_t: [B, d] input at the next position.
            state: the state after the previous position.

        Returns:
            (y_t [B, d], the state after this position).
        """
        if x_t.dim() != 2:
            raise ValueError(f"x_t must be [B, d], got {list(x_t.shape)}")
        y, state = self.forward(x_t[:, None], state)
        return y[:, 0], state
