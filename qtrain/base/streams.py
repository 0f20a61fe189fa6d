"""Independent random streams derived from one run seed.

A run's randomness is split into named streams (model initialisation, rounding, data order,
augmentation, ...). Each stream's seed is a hash of (seed, stream name), so two streams of one
run never share a seed, and the stream of one run never equals another stream of a run with a
neighbouring seed (which `seed + 1` schemes cannot guarantee).

    stream_seed(seed, name) = first 8 bytes of BLAKE2b(f"qtrain/{name}/{seed}") mod 2⁶³
"""

from __future__ import annotations

import hashlib

import torch

from qtrain.base.names import unknown_name

STREAMS = (
    "init",
    "grid-init",
    "rounding",
    "data-order",
    "augment",
    "flip",
    "sample",
    "subset",
    "validation",
    "whitening",
)


def stream_seed(seed: int, stream: str) -> int:
    """The 63-bit seed of `stream` for run seed `seed` (a pure, platform-independent hash)."""
    if stream not in STREAMS:
        raise unknown_name("random stream", stream, STREAMS)
    digest = hashlib.blake2b(f"qtrain/{stream}/{int(seed)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def stream_generator(seed: int, stream: str, device: str | torch.device = "cpu") -> torch.Generator:
    """A `torch.Generator` on `device` seeded with `stream_seed(seed, stream)`."""
    generator = torch.Generator(device=device)
    generator.manual_seed(stream_seed(seed, stream))
    return generator
