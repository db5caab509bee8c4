"""Decode-step bookkeeping states (the arguments of ops.step_update and ops.slot_update) shared by the tests of
their backends."""

from __future__ import annotations

import torch


def step_state(B: int, R: int, L: int, gen: torch.Generator, p: int, per_row_end: bool) -> dict:
    C, eos, pad = 9, 1024, 1025
    delays = torch.tensor([0, 8, 9, 10, 11, 12, 13, 14, 15])
    codes = torch.randint(0, 1024, (B, C), generator=gen)
    codes[::2, 0] = eos  # some items emit EOS now (and on other channels, which the rules overwrite)
    codes[:, 3] = torch.where(torch.rand(B, generator=gen) < 0.3, eos, codes[:, 3])
    eos_pos = torch.where(torch.rand(B, generator=gen) < 0.5, torch.randint(0, p + 1, (B,), generator=gen), -1)
    forced = torch.full((B, L, C), -1)
    forced[:, : p // 2 + 1] = torch.randint(0, 1027, (B, p // 2 + 1, C), generator=gen)
    forced[1::3, p] = torch.randint(0, 1027, (C,), generator=gen)  # a forced prefix reaching position p
    fep = torch.randint(p - 2, p + 3, (B,), generator=gen) if per_row_end else torch.tensor(p + 1)
    return dict(
        codes=codes,
        pos=torch.tensor([p]),
        eos_pos=eos_pos,
        delays=delays,
        forced_eos_pos=fep,
        forced=forced,
        out=torch.full((B, L, C), pad),
        real=torch.rand(B, generator=gen) < 0.8,
        done=torch.zeros(1, dtype=torch.bool),
        tokens=torch.zeros(R, 1, C, dtype=torch.long),
        min_eos_pos=torch.randint(p - 2, p + 3, (B,), generator=gen),
        allow_eos=torch.zeros(B, dtype=torch.bool),
    )


def slot_state(S: int, L: int, gen: torch.Generator) -> dict:
    """ops.slot_update's arguments: S slots (live, idle and finished), each at its own position."""
    C = 9
    codes = torch.randint(0, 1024, (S, C), generator=gen)
    codes[::2, 0] = 1024
    return dict(
        codes=codes,
        pos=torch.randint(1, L, (S,), generator=gen),
        eos_pos=torch.where(torch.rand(S, generator=gen) < 0.5, torch.randint(0, 30, (S,), generator=gen), -1),
        delays=torch.tensor([0, 8, 9, 10, 11, 12, 13, 14, 15]),
        forced_eos_pos=torch.randint(10, 40, (S,), generator=gen),
        min_eos_pos=torch.randint(0, 40, (S,), generator=gen),
        forced=torch.where(
            torch.rand(S, L, C, generator=gen) < 0.2, torch.randint(0, 1027, (S, L, C), generator=gen), -1
        ),
        out=torch.randint(0, 1027, (S, L, C), generator=gen),
        active=torch.rand(S, generator=gen) < 0.8,
        finished=torch.rand(S, generator=gen) < 0.2,
        allow_eos=torch.zeros(S, dtype=torch.bool),
        tokens=torch.zeros(2 * S, 1, C, dtype=torch.long),
        row_pos=torch.zeros(2 * S, dtype=torch.long),
    )
