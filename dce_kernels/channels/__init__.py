"""Channel plumbing: which layers share a set of channels, and applying a selection.

Two separate steps:

* *Linking* (``sequential_groups``, a model's own ``channel_groups()``, or
  :func:`dce_kernels.convert` for any model torch.fx can trace): a
  :class:`ChannelGroup` is one selectable set of channels, the output channels
  of a producer ``ChannelSparseConv2d``, with every layer that must follow its
  selection: the channel-sparse BatchNorms after it, the convs that read it
  (their input channels) and a Linear that reads it after flattening. For
  graphs with skips, a group also holds the convs *tied* to the producer (their
  outputs are added to its outputs), depthwise convs that carry the channels
  through, and the channel *offset* at which a layer sees the group inside a
  wider tensor (after a concatenation).
* *Applying* (:class:`ChannelPlan`): given one index tensor per group, call
  ``set_active`` on every layer, and list the parameter blocks that are
  active (for :class:`dce_kernels.optim.MaskedOptimizer`). A layer that
  several groups feed (a conv after a concatenation) gets the union of their
  offset-shifted selections; its channels that no group covers stay active.

A group whose producer output is read by nothing but the group's own layers
(``sole_readers``, established by the linker) can pass *packed* activations: the
producer emits only its active channels, the norms and channel-wise layers in
between run on those, and the consumers read them directly. That is what makes
a training step cost close to the physically narrower network's; full-width
groups stay correct for any graph.
"""
from .group import ChannelGroup, ChannelSpec, GroupSpec, converted_groups
from .plan import ChannelPlan, plan_for
from .sequential import sequential_groups
from .conversion import conversion_notes, convert

__all__ = ["ChannelGroup", "GroupSpec", "ChannelSpec", "ChannelPlan", "plan_for",
           "sequential_groups", "convert", "conversion_notes", "converted_groups"]
