"""Channel effects, channel masks, masked updates and channel packing.

Implements the channel-explanation unlearning of Xu et al., "Update Selective Parameters:
Federated Machine Unlearning Based on Model Explanation".
The public surface of a private tree, one concept per module (as optax): _layers (channel
layers by path), _effects (channel effects), _selection (top-delta / random channels and
their masks), _update (the masked optax transform), _packing (packed channel updates) and
_outputs (layer outputs). Import this package, not its modules; Path, layer_at and
top_k_mask, outside __all__, are shared with fu_jax.class_pruning's channel scores.

The TF-IDF channel scores of the CDP baseline (Wang et al.) are in `fu_jax.class_pruning`.

Conventions (Flax): a *layer* is any dict in the params tree holding a 'kernel' leaf; its
output channels are the LAST axis of the kernel and the only axis of its 'bias'. A layer is
addressed by its path, a tuple of dict keys (e.g. ('Conv_0',) or ('block1', 'Dense_0')).
Channel masks are dicts path -> bool [C]; parameter masks are pytrees shaped like params.

Choices the Xu et al. paper leaves open, and what we do:
- Layers: Algorithm 1 iterates over "all layers in model M*" and Sec. 4.2 gives both conv and
  linear layers as parameterised layers, so every conv/dense layer is scored, the final
  classifier included (its output channels are the class logits). Restrict with `layers=`.
- Pruning a channel zeroes its kernel slice and its bias entry (Def. 4, Fig. 4: the output
  channel of the layer becomes 0). A norm layer that follows is not touched.
- Order: Alg. 1 line 12 says "sort from small to large", but the text (Sec. 4.3, 4.5) keeps
  the channels with the HIGHEST effect; we follow the text. Count per layer: ceil(delta * C).
- Ties: accuracy on a small batch has few distinct values, so ties are common and the paper
  does not break them. With `metric='both'` we break accuracy ties by the loss increase
  (then by channel index). This never overrides the paper's accuracy order; it only
  chooses among channels the paper ranks equal.
"""

from fu_jax.masking._effects import ChannelEffects, channel_effects
from fu_jax.masking._layers import Path as Path
from fu_jax.masking._layers import channel_layers, zero_channel
from fu_jax.masking._layers import layer_at as layer_at
from fu_jax.masking._outputs import layer_outputs
from fu_jax.masking._packing import (
  PackedLayer,
  channel_counts,
  pack_channels,
  packed_num_bytes,
  selected_num_bytes,
  unpack_channels,
)
from fu_jax.masking._selection import (
  channel_mask_to_param_mask,
  num_selected,
  random_channels,
  random_mask,
  top_delta_channels,
  top_delta_mask,
  zero_masked,
)
from fu_jax.masking._selection import top_k_mask as top_k_mask
from fu_jax.masking._update import MaskedUpdateState, init_masked_state, masked_update, set_mask

__all__ = [
  "channel_layers",
  "zero_channel",
  "ChannelEffects",
  "channel_effects",
  "num_selected",
  "top_delta_channels",
  "random_channels",
  "channel_mask_to_param_mask",
  "top_delta_mask",
  "random_mask",
  "zero_masked",
  "MaskedUpdateState",
  "init_masked_state",
  "set_mask",
  "masked_update",
  "PackedLayer",
  "channel_counts",
  "pack_channels",
  "unpack_channels",
  "packed_num_bytes",
  "selected_num_bytes",
  "layer_outputs",
]
