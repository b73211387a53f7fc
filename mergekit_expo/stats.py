"""Weight-change statistics: one implementation for `mergekit-expo inspect` and the merge.

`measure` reduces a tensor pair to additive sums (`Change`), from which the paper's
Table 1 quantities and the rounding loss of the output dtype follow for any group of
tensors: per module kind, per layer, in total.

During a merge the kernel reports each tensor to the observers attached with
`observing()` (one per merge run); it never reads anything back, and with no
observer attached nothing is measured.
"""

import math
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from mergekit_expo.extrapolation import compute_dtype, extrapolate

CHUNK = 1 << 18  # elements per step: amortizes per-operation overhead, stays in cache


@dataclass(frozen=True)
class Loss:
    """What rounding theta2 = theta1 + alpha * delta to `dtype` keeps of alpha * delta."""

    moved: int = 0  # elements alpha * delta should move (delta != 0)
    rounded_back: int = 0  # ... whose stored theta2 equals stored theta1
    kept_sq: float = 0.0  # ||stored(theta2) - stored(theta1)||^2
    kept_dot: float = 0.0  # <stored(theta2) - stored(theta1), alpha * delta>
    requested_sq: float = 0.0  # ||alpha * delta||^2

    def __add__(self, other: "Loss") -> "Loss":
        return Loss(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(Loss)))

    @property
    def rounded_back_fraction(self) -> Optional[float]:
        return self.rounded_back / self.moved if self.moved else None

    @property
    def kept(self) -> Optional[float]:
        """||stored(theta2) - stored(theta1)|| / ||alpha * delta||: the norm that survives."""
        return math.sqrt(self.kept_sq / self.requested_sq) if self.requested_sq else None

    @property
    def kept_along_delta(self) -> Optional[float]:
        """The surviving step projected on alpha * delta: 1 when unbiased (stochastic rounding)."""
        return self.kept_dot / self.requested_sq if self.requested_sq else None


LossKey = Tuple[float, str]  # (alpha, dtype name)


@dataclass(frozen=True)
class Change:
    """Additive sums over the elements of some tensors of theta0 and theta1."""

    tensors: int = 0
    numel: int = 0
    changed: int = 0  # elements with theta1 != theta0
    delta_sq: float = 0.0  # ||theta1 - theta0||^2
    theta0_sq: float = 0.0
    theta0_delta: float = 0.0  # <theta0, theta1 - theta0>
    losses: Dict[LossKey, Loss] = field(default_factory=dict)

    def __add__(self, other: "Change") -> "Change":
        losses = dict(self.losses)
        for key, loss in other.losses.items():
            losses[key] = losses.get(key, Loss()) + loss
        sums = {
            f.name: getattr(self, f.name) + getattr(other, f.name)
            for f in fields(Change)
            if f.name != "losses"
        }
        return Change(**sums, losses=losses)

    @property
    def frobenius(self) -> float:
        return math.sqrt(self.delta_sq)

    @property
    def normalized_frobenius(self) -> float:
        """sqrt(sum(delta^2) / |P|): the paper's Table 1 measure."""
        return math.sqrt(self.delta_sq / self.numel) if self.numel else 0.0

    @property
    def relative(self) -> Optional[float]:
        """||theta1 - theta0|| / ||theta0||."""
        return math.sqrt(self.delta_sq / self.theta0_sq) if self.theta0_sq else None

    @property
    def changed_fraction(self) -> float:
        return self.changed / self.numel if self.numel else 0.0

    @property
    def one_minus_cosine(self) -> Optional[float]:
        """1 - cos(theta0, theta1), from sin^2 so it stays accurate near 0.

        sin^2 = (|theta0|^2 |delta|^2 - <theta0, delta>^2) / (|theta0|^2 |theta1|^2)
        needs no cancellation between numbers near |theta0|^2.
        """
        theta1_sq = self.theta0_sq + 2 * self.theta0_delta + self.delta_sq
        if not self.theta0_sq or theta1_sq <= 0:
            return None
        sin_sq = (self.theta0_sq * self.delta_sq - self.theta0_delta**2) / (
            self.theta0_sq * theta1_sq
        )
        sin_sq = min(max(sin_sq, 0.0), 1.0)
        cosine = math.copysign(math.sqrt(1 - sin_sq), self.theta0_sq + self.theta0_delta)
        return sin_sq / (1 + cosine) if cosine >= 0 else 1 - cosine

    @property
    def cosine(self) -> Optional[float]:
        gap = self.one_minus_cosine
        return None if gap is None else 1 - gap

    @property
    def dtypes(self) -> List[str]:
        """The output dtypes a rounding loss was measured for."""
        return list(dict.fromkeys(dtype for _, dtype in self.losses))

    def loss(self, dtype: str, alpha: Optional[float] = None) -> Loss:
        """The rounding loss for `dtype` at `alpha`, or summed over every alpha."""
        parts = [
            loss
            for (a, d), loss in self.losses.items()
            if d == dtype and (alpha is None or a == alpha)
        ]
        return sum(parts, Loss())


@dataclass(frozen=True)
class TensorRecord:
    name: str
    shape: Tuple[int, ...]
    alpha: Optional[float]  # the merge's alpha for this tensor; None in `inspect`
    change: Change


def dtype_name(dtype: Union[str, torch.dtype]) -> str:
    return str(dtype).removeprefix("torch.")


def measure(
    theta0: torch.Tensor,
    theta1: torch.Tensor,
    alphas: Sequence[float],
    dtypes: Sequence[Union[str, torch.dtype]],
    *,
    delta: Optional[torch.Tensor] = None,
    theta2: Optional[torch.Tensor] = None,
) -> Change:
    """Sums for one tensor pair, and the rounding loss for every (alpha, dtype).

    delta is the extrapolation direction when it is not theta1 - theta0 (sparsified
    or averaged in a merge); theta2 the merge's result when it is not the writer's
    round-to-nearest cast of theta1 + alpha * delta (stochastic rounding; then one
    alpha and one dtype). Works on flat chunks, so a tensor mmapped from disk is
    read once and temporaries stay small; sums accumulate in float64.
    """
    compute = compute_dtype(theta0, theta1)
    dtypes = [getattr(torch, dtype_name(d)) for d in dtypes]
    if theta2 is not None and len(alphas) * len(dtypes) != 1:
        raise ValueError("theta2 is the result for one alpha and one dtype")
    numel = theta0.numel()
    scratch = _Scratch(min(CHUNK, numel), theta0.device)
    flat = [t if t is None else t.reshape(-1) for t in (theta0, theta1, delta, theta2)]
    sums = [0, 0.0, 0.0, 0.0]  # changed, delta_sq, theta0_sq, theta0_delta
    losses = {(a, d): [0, 0, 0.0, 0.0, 0.0] for a in alphas for d in dtypes}
    for start in range(0, numel, CHUNK):
        size = min(CHUNK, numel - start)
        t0, t1, direction, result = (
            t if t is None else _cast(t[start : start + size], compute, scratch(role, compute, size))
            for role, t in enumerate(flat)
        )
        change = torch.sub(t1, t0, out=scratch("change", compute, size))
        piece = (_count_nonzero(change), _dot(change, change), _dot(t0, t0))
        sums = [a + b for a, b in zip(sums, (*piece, _dot(t0, change)))]
        if direction is None:
            direction, moved, direction_sq = change, piece[0], piece[1]
        else:
            moved = _count_nonzero(direction)
            direction_sq = _dot(direction, direction)
        stored1 = {
            d: t1 if _holds(theta1.dtype, d) else _stored(t1, d, scratch, ("theta1", d), size)
            for d in dtypes
        }
        for alpha in alphas:
            theta2_piece = result
            if result is None:
                theta2_piece = extrapolate(t1, direction, alpha, out=scratch("theta2", compute, size))
            for dtype in dtypes:
                stored2 = _stored(theta2_piece, dtype, scratch, "theta2", size)
                step = torch.sub(stored2, stored1[dtype], out=scratch("step", compute, size))
                if result is not None:  # stochastic rounding also moves theta1 off-grid
                    step.masked_fill_(direction == 0, 0)
                entry = losses[(alpha, dtype)]
                entry[0] += moved
                entry[1] += moved - _count_nonzero(step)
                entry[2] += _dot(step, step)
                entry[3] += alpha * _dot(step, direction)
                entry[4] += alpha**2 * direction_sq
    return Change(
        1,
        numel,
        *sums,
        {(a, dtype_name(d)): Loss(*entry) for (a, d), entry in losses.items()},
    )


class _Scratch:
    """Chunk buffers reused across chunks: a fresh temporary per operation costs
    more in page faults (large blocks go back to the OS when freed) than the
    arithmetic on it."""

    def __init__(self, size: int, device: torch.device):
        self.size, self.device, self.buffers = size, device, {}

    def __call__(self, role, dtype: torch.dtype, size: int) -> torch.Tensor:
        if (role, dtype) not in self.buffers:
            self.buffers[(role, dtype)] = torch.empty(self.size, dtype=dtype, device=self.device)
        return self.buffers[(role, dtype)][:size]


def _cast(x: torch.Tensor, dtype: torch.dtype, out: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == dtype else out.copy_(x)


def _stored(x: torch.Tensor, dtype: torch.dtype, scratch: _Scratch, role, size: int):
    """x as the writer stores it in `dtype` (round to nearest), back in x's dtype."""
    if torch.finfo(dtype).bits >= torch.finfo(x.dtype).bits:
        return x
    narrow = scratch((role, "narrow"), dtype, size).copy_(x)
    return scratch((role, "stored"), x.dtype, size).copy_(narrow)


def _holds(source: torch.dtype, dtype: torch.dtype) -> bool:
    """Every value of `source` is a value of `dtype` (bf16 is not inside fp16)."""
    wider = {torch.float32: (torch.bfloat16, torch.float16)}.get(dtype, ())
    return source == dtype or dtype == torch.float64 or source in wider


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a, b))


_BITS = {torch.float32: torch.int32, torch.float64: torch.int64}


def _count_nonzero(x: torch.Tensor) -> int:
    """Nonzero elements of a difference, counted on the bits: several times faster
    than on floats, whose count branches per element (a difference of equal values
    is +0.0, so -0.0 only comes from a zero that flipped its sign, a change too)."""
    return int(torch.count_nonzero(x.view(_BITS[x.dtype])))


MODULE_KINDS = ("embeddings", "attention", "mlp", "norm", "lm_head", "other")
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


def module_kind(name: Optional[str]) -> str:
    """Coarse module kind of a tensor name, for per-module summaries."""
    name = (name or "").lower()
    if "lm_head" in name or name.endswith("output.weight"):
        return "lm_head"
    if "embed" in name or "wte" in name or "tok_embeddings" in name:
        return "embeddings"
    if "norm" in name or "ln_" in name:
        return "norm"
    if "attn" in name or "attention" in name:
        return "attention"
    if "mlp" in name or "feed_forward" in name or "ffn" in name:
        return "mlp"
    return "other"


def layer_index(name: Optional[str]) -> Optional[int]:
    """The transformer block a tensor belongs to, None outside the blocks."""
    match = _LAYER.search(name or "")
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class Summary:
    total: Change
    kinds: Dict[str, Change]
    layers: Dict[int, Change]
    alphas: Dict[str, Tuple[float, float]]  # per module kind, in a merge
    tensors: List[TensorRecord]

    @property
    def alpha_range(self) -> Tuple[float, float]:
        values = [v for pair in self.alphas.values() for v in pair]
        return min(values), max(values)


def summarize(entries: List[TensorRecord]) -> Optional[Summary]:
    if not entries:
        return None
    kinds: Dict[str, Change] = {}
    layers: Dict[int, Change] = {}
    alphas: Dict[str, Tuple[float, float]] = {}
    for entry in entries:
        kind, layer = module_kind(entry.name), layer_index(entry.name)
        kinds[kind] = kinds.get(kind, Change()) + entry.change
        if layer is not None:
            layers[layer] = layers.get(layer, Change()) + entry.change
        if entry.alpha is not None:
            low, high = alphas.get(kind, (entry.alpha, entry.alpha))
            alphas[kind] = (min(low, entry.alpha), max(high, entry.alpha))
    return Summary(
        total=sum((e.change for e in entries), Change()),
        kinds={kind: kinds[kind] for kind in MODULE_KINDS if kind in kinds},
        layers=dict(sorted(layers.items())),
        alphas={kind: alphas[kind] for kind in MODULE_KINDS if kind in alphas},
        tensors=list(entries),
    )


# ------------------------------------------------------------------------ observers


class Collector:
    """The records of one merge run, in the order the tensors were merged."""

    def __init__(self):
        self._lock = threading.Lock()
        self._records: List[TensorRecord] = []

    def add(self, entry: TensorRecord) -> None:
        with self._lock:
            self._records.append(entry)

    def records(self) -> List[TensorRecord]:
        with self._lock:
            return list(self._records)

    def summary(self) -> Optional[Summary]:
        return summarize(self.records())


_observers_lock = threading.Lock()
_observers: List[Collector] = []


@contextmanager
def observing() -> Iterator[Collector]:
    """Collect the statistics of every `expo` tensor merged while the block runs.

    Attached process-wide (mergekit may merge on worker threads), detached on
    exit. The kernel's results never depend on it.
    """
    collector = Collector()
    with _observers_lock:
        _observers.append(collector)
    try:
        yield collector
    finally:
        with _observers_lock:
            _observers.remove(collector)


def observe(
    name: str,
    alpha: float,
    theta0: torch.Tensor,
    theta1: torch.Tensor,
    delta: torch.Tensor,
    dtype: torch.dtype,
    theta2: Optional[torch.Tensor] = None,
) -> None:
    """Measure one merged tensor for the observers attached, if any.

    theta2 is the result when it is not the round-to-nearest cast of
    theta1 + alpha * delta to `dtype` (stochastic rounding).
    """
    with _observers_lock:
        observers = list(_observers)
    if not observers:
        return
    change = measure(theta0, theta1, [alpha], [dtype], delta=delta, theta2=theta2)
    entry = TensorRecord(name, tuple(theta0.shape), alpha, change)
    for collector in observers:
        collector.add(entry)
