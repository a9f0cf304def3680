"""AmoebaNet-D (L, F) flattened to the 60·L + 85 layers of the published GPipe tables.

Why it is built this way
------------------------
The GPipe paper's AmoebaNet-D rows, and torchgpipe's benchmarks that reproduce
them, name a model by (L, F) and a pipeline by a *balance*: how many layers of
one particular flat ``nn.Sequential`` each device holds (``[43, 35, 36, 38, 43,
45, 46, 39]`` for eight devices). Those numbers only mean something for that
exact flattening, and most of the published cuts fall *inside* a cell. So this
module rebuilds the table-era model layer for layer:

- stem (4 layers): ReLU, 3×3 conv stride 2 (3 → F/4), BatchNorm, and a layer
  that duplicates the result into the pair (previous-previous, previous);
- 3·L + 4 cells: reduction, reduction, L normal, reduction, L normal,
  reduction, L normal. Cell channels C start at F/2 and double at each later
  reduction; every cell outputs 3·C channels (the concat of three nodes);
- each cell is 20 layers: preprocess input 0, keep the raw input 1 (it becomes
  the next cell's previous-previous), preprocess input 1, five nodes of
  (branch, branch, sum), move the kept input to the front, concatenate;
- the classifier (1 layer): average pool of the pair's second element, linear
  (12·F → classes).

Everything between layers is a tensor or a tuple of tensors with the batch as
dim 0, and no layer reads anything but its input, so the sequence runs as a
plain model, as any whole slice ``model[a:b]`` fed ``model[:a]``'s output, and
inside GPipe cut at any boundary. The tuples carry exactly what the original
carried at every boundary (the cell's raw input, both preprocessed inputs and
every node computed so far), so a cut moves the same tensors between devices
as it did in the published runs.

Table-era slips, kept on purpose
--------------------------------
:func:`amoebanetd` reproduces the operations as that era's PyTorch port
defined them, because the published balances and parameter counts hold only
for them:

- ``max_pool_3x3`` is an *average* pool (the same as ``avg_pool_3x3``);
- every pooling operation is followed by a 1×1 conv and BatchNorm, although
  its input already has the cell's channels.

With them the parameter counts are (10 classes): (L=4, F=512) 380,274,698;
(6, 208) 89,745,302; (6, 416) 358,456,186; (6, 544) 612,770,042; (12, 544)
1,163,292,602; (24, 512) 2,005,905,418.

:func:`amoebanetd_corrected` fixes both (true max pooling, no conv or
BatchNorm after a pool) with the same layer structure, so the same balances
apply; it has fewer parameters and is not a table model.

Details the genotype leaves open follow that port: 3×3 pools pad 1 and average
without counting padding; a 2×2 max pool has no padding; strided ``conv_3x3``
strides its 3×3, strided ``conv_7x1_1x7`` strides the 1×7 along the width and
the 7×1 along the height; convolutions have no bias; initialisation is
PyTorch's default. The classifier pools adaptively, which is the published
7×7 pool at 224×224 and lets other sizes run.

Input sizes: the stem halves the image (rounding up) and four reductions each
halve it exactly (a factorized reduce and a 2×2 max pool beside a padded 3×3
pool need an even size), so height and width must be 32·k − 1 or 32·k pixels;
the smallest is 31×31 (1×1 at the classifier, where BatchNorm in training mode
then needs at least two samples per micro-batch).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Dict, List, NamedTuple, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

__all__ = [
    "amoebanetd",
    "amoebanetd_corrected",
    "Genotype",
    "AMOEBANET_D",
    "LAYERS_PER_CELL",
    "MIN_INPUT_SIZE",
    "num_model_layers",
]

Tensors = Tuple[Tensor, ...]
Size2 = Union[int, Tuple[int, int]]

LAYERS_PER_CELL = 20
STEM_LAYERS = 4
CLASSIFIER_LAYERS = 1
#: Reductions after the stem; the stem's output size must be a multiple of 2**REDUCTIONS.
REDUCTIONS = 4
#: Smallest height/width that survives the stem and the four reductions.
MIN_INPUT_SIZE = 2 ** (REDUCTIONS + 1) - 1


def num_model_layers(num_layers: int) -> int:
    """Length of the flat model for ``num_layers`` normal cells per stage: 60·L + 85."""
    return STEM_LAYERS + LAYERS_PER_CELL * (3 * num_layers + 4) + CLASSIFIER_LAYERS


# --------------------------------------------------------------------------- genotype


class Genotype(NamedTuple):
    """A cell description: (operation, input state) pairs, two per node, and the nodes to concat.

    States are numbered: 0 and 1 are the cell's two (preprocessed) inputs,
    2, 3, ... are the nodes in order.
    """

    normal: Tuple[Tuple[str, int], ...]
    normal_concat: Tuple[int, ...]
    reduce: Tuple[Tuple[str, int], ...]
    reduce_concat: Tuple[int, ...]


#: AmoebaNet-D (Real et al., "Regularized Evolution for Image Classifier Architecture Search").
AMOEBANET_D = Genotype(
    normal=(
        ("max_pool_3x3", 0),
        ("conv_1x1", 0),
        ("skip_connect", 2),
        ("max_pool_3x3", 2),
        ("skip_connect", 0),
        ("conv_7x1_1x7", 1),
        ("conv_1x1", 1),
        ("conv_7x1_1x7", 1),
        ("avg_pool_3x3", 0),
        ("conv_1x1", 3),
    ),
    normal_concat=(4, 5, 6),
    reduce=(
        ("max_pool_2x2", 1),
        ("max_pool_3x3", 1),
        ("conv_3x3", 0),
        ("skip_connect", 2),
        ("conv_7x1_1x7", 2),
        ("max_pool_3x3", 2),
        ("avg_pool_3x3", 2),
        ("conv_1x1", 3),
        ("skip_connect", 3),
        ("max_pool_2x2", 0),
    ),
    reduce_concat=(4, 5, 6),
)


# --------------------------------------------------------------------------- operations


class ReLUConvBN(nn.Sequential):
    """ReLU, convolution without bias, BatchNorm."""

    def __init__(self, c_in: int, c_out: int, kernel_size: Size2 = 1, stride: Size2 = 1, padding: Size2 = 0) -> None:
        super().__init__(
            OrderedDict(
                [
                    ("relu", nn.ReLU()),
                    ("conv", nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False)),
                    ("bn", nn.BatchNorm2d(c_out)),
                ]
            )
        )


class FactorizedReduce(nn.Module):
    """Halves the size: ReLU, two 1×1 stride-2 convs (the second one pixel off), concat, BatchNorm."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        if c_out % 2:
            raise ValueError(f"factorized reduce needs an even channel count, got {c_out}")
        self.relu = nn.ReLU()
        self.conv_a = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.conv_b = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(x)
        shifted = x[:, :, 1:, 1:]
        out: Tensor = self.bn(torch.cat([self.conv_a(x), self.conv_b(shifted)], dim=1))
        return out


class Bottleneck(nn.Sequential):
    """1×1 down to C/4, the spatial convolutions, 1×1 back up to C; each one ReLU-conv-BN."""

    def __init__(self, channels: int, spatial: Sequence[Tuple[Size2, Size2, Size2]]) -> None:
        inner = channels // 4
        blocks: List[nn.Module] = [ReLUConvBN(channels, inner)]
        blocks += [ReLUConvBN(inner, inner, kernel, stride, padding) for kernel, stride, padding in spatial]
        blocks.append(ReLUConvBN(inner, channels))
        super().__init__(*blocks)


class PoolConvBN(nn.Sequential):
    """The table era's pooling operation: the pool, then a 1×1 conv and BatchNorm."""

    def __init__(self, pool: nn.Module, channels: int) -> None:
        super().__init__(
            OrderedDict(
                [
                    ("pool", pool),
                    ("conv", nn.Conv2d(channels, channels, 1, bias=False)),
                    ("bn", nn.BatchNorm2d(channels)),
                ]
            )
        )


def _avg_pool_3x3(stride: int) -> nn.Module:
    return nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False)


def _max_pool_3x3(stride: int) -> nn.Module:
    return nn.MaxPool2d(3, stride=stride, padding=1)


def _max_pool_2x2(stride: int) -> nn.Module:
    if stride != 2:
        raise ValueError("max_pool_2x2 keeps the size only at stride 2")
    return nn.MaxPool2d(2, stride=2)


def skip_connect(channels: int, stride: int) -> nn.Module:
    return nn.Identity() if stride == 1 else FactorizedReduce(channels, channels)


def conv_1x1(channels: int, stride: int) -> nn.Module:
    return ReLUConvBN(channels, channels, 1, stride)


def conv_3x3(channels: int, stride: int) -> nn.Module:
    return Bottleneck(channels, [(3, stride, 1)])


def conv_7x1_1x7(channels: int, stride: int) -> nn.Module:
    return Bottleneck(channels, [((1, 7), (1, stride), (0, 3)), ((7, 1), (stride, 1), (3, 0))])


Operation = Callable[[int, int], nn.Module]

_CONVS: Dict[str, Operation] = {
    "skip_connect": skip_connect,
    "conv_1x1": conv_1x1,
    "conv_3x3": conv_3x3,
    "conv_7x1_1x7": conv_7x1_1x7,
}

#: The table era: both 3×3 pools average, and every pool is followed by a 1×1 conv + BN.
TABLE_ERA_OPS: Dict[str, Operation] = {
    **_CONVS,
    "avg_pool_3x3": lambda c, s: PoolConvBN(_avg_pool_3x3(s), c),
    "max_pool_3x3": lambda c, s: PoolConvBN(_avg_pool_3x3(s), c),
    "max_pool_2x2": lambda c, s: PoolConvBN(_max_pool_2x2(s), c),
}

#: As the genotype says: true max pooling, pools without parameters.
CORRECTED_OPS: Dict[str, Operation] = {
    **_CONVS,
    "avg_pool_3x3": lambda c, s: _avg_pool_3x3(s),
    "max_pool_3x3": lambda c, s: _max_pool_3x3(s),
    "max_pool_2x2": lambda c, s: _max_pool_2x2(s),
}


# --------------------------------------------------------------------------- layers
#
# Inside a cell the tuple is (s0, s1, nodes so far..., [pending branch,] kept),
# where ``kept`` is the cell's raw input 1; it stays last until the cell's
# second-to-last layer moves it to the front.


class StemPair(nn.Module):
    """Last stem layer: the stem output becomes the pair (previous-previous, previous)."""

    def forward(self, x: Tensor) -> Tensors:
        height, width = x.shape[-2:]
        step = 2**REDUCTIONS
        if height % step or width % step:
            raise ValueError(
                f"AmoebaNet-D needs inputs of 32·k − 1 or 32·k pixels a side (the stem gave "
                f"{height}×{width}, not a multiple of {step}); the smallest is {MIN_INPUT_SIZE}×{MIN_INPUT_SIZE}"
            )
        return x, x


class Preprocess(nn.Module):
    """Replaces element ``index`` of the tuple by ``module`` applied to it."""

    def __init__(self, module: nn.Module, index: int) -> None:
        super().__init__()
        self.module = module
        self.index = index

    def forward(self, xs: Tensors) -> Tensors:
        i = self.index
        return xs[:i] + (self.module(xs[i]),) + xs[i + 1 :]


class KeepInput(nn.Module):
    """Appends the cell's raw input 1 (the last element); it is the next cell's previous-previous."""

    def forward(self, xs: Tensors) -> Tensors:
        return xs + (xs[-1],)


class Branch(nn.Module):
    """One operation of a node: ``op(state[source])``, inserted just before the kept input."""

    def __init__(self, op: nn.Module, source: int) -> None:
        super().__init__()
        self.op = op
        self.source = source

    def forward(self, xs: Tensors) -> Tensors:
        return xs[:-1] + (self.op(xs[self.source]),) + xs[-1:]


class Merge(nn.Module):
    """Sums a node's two branches (the two elements before the kept input) into the node."""

    def forward(self, xs: Tensors) -> Tensors:
        a, b = xs[-3], xs[-2]
        if a.shape != b.shape:
            raise ValueError(f"the branches of a node disagree in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
        return xs[:-3] + (a + b,) + xs[-1:]


class KeptFirst(nn.Module):
    """Moves the kept input from the end to the front: (kept, s0, s1, nodes...)."""

    def forward(self, xs: Tensors) -> Tensors:
        return xs[-1:] + xs[:-1]


class Concat(nn.Module):
    """Ends a cell: (kept, states...) → (kept, concat of the chosen states along channels)."""

    def __init__(self, states: Sequence[int]) -> None:
        super().__init__()
        self.states = tuple(states)

    def forward(self, xs: Tensors) -> Tensors:
        states = xs[1:]
        return xs[0], torch.cat([states[i] for i in self.states], dim=1)

    def extra_repr(self) -> str:
        return f"states={list(self.states)}"


class Classifier(nn.Module):
    """Global average pool of the pair's second element, then a linear layer."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(channels, num_classes)

    def forward(self, xs: Tensors) -> Tensor:
        logits: Tensor = self.linear(torch.flatten(self.pool(xs[1]), 1))
        return logits


# --------------------------------------------------------------------------- assembly


def _cell(
    genotype: Genotype,
    ops: Dict[str, Operation],
    c_prev_prev: int,
    c_prev: int,
    channels: int,
    reduction: bool,
    reduction_prev: bool,
) -> Tuple[List[Tuple[str, nn.Module]], int]:
    """The 20 layers of one cell and its output channels."""
    pre0: nn.Module
    if reduction_prev:
        pre0 = FactorizedReduce(c_prev_prev, channels)
    elif c_prev_prev != channels:
        pre0 = ReLUConvBN(c_prev_prev, channels)
    else:
        pre0 = nn.Identity()

    layers: List[Tuple[str, nn.Module]] = [
        ("pre0", Preprocess(pre0, 0)),
        ("keep", KeepInput()),
        ("pre1", Preprocess(ReLUConvBN(c_prev, channels), 1)),
    ]

    pairs = genotype.reduce if reduction else genotype.normal
    concat = genotype.reduce_concat if reduction else genotype.normal_concat
    if len(pairs) % 2:
        raise ValueError("a genotype lists two operations per node")
    for node in range(len(pairs) // 2):
        for branch, (name, source) in zip("ab", pairs[2 * node : 2 * node + 2]):
            if not 0 <= source < 2 + node:
                raise ValueError(f"node {2 + node} cannot read state {source}")
            stride = 2 if reduction and source < 2 else 1
            layers.append((f"node{2 + node}{branch}_{name}", Branch(ops[name](channels, stride), source)))
        layers.append((f"node{2 + node}_sum", Merge()))
    layers += [("kept_first", KeptFirst()), ("concat", Concat(concat))]
    return layers, len(concat) * channels


def _amoebanet(ops: Dict[str, Operation], num_layers: int, num_filters: int, num_classes: int) -> nn.Sequential:
    if num_layers < 0:
        raise ValueError(f"num_layers must be at least 0, got {num_layers}")
    if num_filters < 8:
        raise ValueError(f"num_filters must be at least 8 (bottlenecks use C/4 ≥ 1 channels), got {num_filters}")

    stem_channels = num_filters // 4
    model: "OrderedDict[str, nn.Module]" = OrderedDict(
        [
            ("stem_relu", nn.ReLU()),
            ("stem_conv", nn.Conv2d(3, stem_channels, 3, stride=2, padding=1, bias=False)),
            ("stem_bn", nn.BatchNorm2d(stem_channels)),
            ("stem_pair", StemPair()),
        ]
    )

    plan = [True, True] + [False] * num_layers + ([True] + [False] * num_layers) * 2  # reduction?
    c_prev_prev = c_prev = channels = stem_channels
    reduction_prev = False
    for k, reduction in enumerate(plan):
        if reduction:
            channels *= 2
        layers, c_out = _cell(AMOEBANET_D, ops, c_prev_prev, c_prev, channels, reduction, reduction_prev)
        kind = "reduce" if reduction else "normal"
        model.update((f"cell{k:02d}_{kind}_{name}", layer) for name, layer in layers)
        c_prev_prev, c_prev, reduction_prev = c_prev, c_out, reduction

    model["classifier"] = Classifier(c_prev, num_classes)
    assert len(model) == num_model_layers(num_layers)
    return nn.Sequential(model)


def amoebanetd(num_layers: int = 4, num_filters: int = 512, num_classes: int = 10) -> nn.Sequential:
    """The table-era AmoebaNet-D (L, F) as 60·L + 85 layers (325 for L=4).

    380,274,698 parameters for the defaults. See the module docstring for
    why the era's operations are kept.
    """
    return _amoebanet(TABLE_ERA_OPS, num_layers, num_filters, num_classes)


def amoebanetd_corrected(num_layers: int = 4, num_filters: int = 512, num_classes: int = 10) -> nn.Sequential:
    """AmoebaNet-D with the genotype's pooling: true max pools, no 1×1 conv + BN after a pool.

    Same 60·L + 85 layer structure as :func:`amoebanetd` (so the same
    balances apply), fewer parameters; not the model of the published tables.
    """
    return _amoebanet(CORRECTED_OPS, num_layers, num_filters, num_classes)
