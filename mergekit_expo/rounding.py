"""How theta2 lands on the output dtype's grid: nearest (the writer's cast) or stochastic.

Round-to-nearest drops alpha * delta wherever it is below half an ulp of the output
dtype, which in bf16 is most elements of a DPO-sized change (its RMS is about 6e-6
against weights of about 1e-2 with an ulp of about 1e-4).
Unbiased stochastic rounding goes up with probability (x - lower) / (upper - lower),
so every element keeps theta1 + alpha * delta in expectation.
"""

import hashlib
from typing import Literal

import torch

RoundingMode = Literal["nearest", "stochastic"]

CHUNK = 1 << 16  # elements: cache-sized temporaries, and draws independent of tensor size


def tensor_seed(seed: int, name: str) -> int:
    """A seed per tensor from the recipe's seed and the tensor's name.

    Tensors are merged in an order (and on threads) mergekit chooses; seeding by
    name keeps every tensor's draws the same whatever that order.
    """
    digest = hashlib.blake2b(f"{seed}\0{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def stochastic_round_(x: torch.Tensor, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Round x in place onto `dtype`'s values (x keeps its own dtype); return x.

    The writer's later cast to `dtype` is then exact. Finite values never round
    to infinity; infinities and NaN stay as they are.
    """
    if torch.finfo(dtype).bits >= torch.finfo(x.dtype).bits:
        return x  # every value of x is already a value of dtype
    generator = torch.Generator(device=x.device).manual_seed(seed)
    flat = x.view(-1)
    for start in range(0, flat.numel(), CHUNK):
        piece = flat[start : start + CHUNK]
        near = piece.to(dtype)
        above = near.to(x.dtype) > piece
        away = torch.where(above, -torch.inf, torch.inf).to(dtype)
        other = torch.nextafter(near, away).to(x.dtype)
        near = near.to(x.dtype)
        lower = torch.where(above, other, near)
        upper = torch.where(above, near, other)
        lower = torch.where(lower.isinf(), upper, lower)  # beyond dtype's largest value:
        upper = torch.where(upper.isinf(), lower, upper)  # saturate
        up = (piece - lower) / (upper - lower)
        draw = torch.rand(piece.shape, generator=generator, dtype=x.dtype, device=x.device)
        rounded = torch.where(draw < up, upper, lower)
        piece.copy_(torch.where(piece.isfinite(), rounded, piece))
    return x
