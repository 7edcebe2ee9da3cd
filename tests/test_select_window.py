"""The CPU group_thresholds on large groups (>= 2^16 elements): the sampled window and
its one streaming pass (csrc/select_window_cpu.h), and the radix passes it falls back
to when the window misses or overflows. Every threshold and c_g must be the reference's
exactly, on every instruction-set build of the CPU code.

The fuzz tests of tests/test_native.py use groups of at most 2000 elements, which never
take this path.
"""
from __future__ import annotations

import pytest
import torch

from aim_kernels.ops import reference

native = pytest.importorskip("aim_kernels.ops.native")
_C = native._C
if _C is None:
    pytest.skip("the native module is not built", allow_module_level=True)

MIN_GROUP = 1 << 16           # window::kMinGroup
MAX_SAMPLE = 1 << 12          # window::kMaxSample


ISAS = native.cpu_isas()


def sample_places(n: int) -> torch.Tensor:
    """The places the select samples in a group of n (window::sample_place)."""
    s = min(MAX_SAMPLE, n // 16)
    w = n // s
    j = torch.arange(s, dtype=torch.int64)
    h = (j * 2654435761) & 0xFFFFFFFF
    return j * w + ((h * w) >> 32)


def check(omega, offsets, ratio, isa, normalize=True):
    with native.using_cpu_isa(isa):
        c, t = native.group_thresholds(omega, offsets, ratio, normalize=normalize)
    c_ref, t_ref = reference.group_thresholds(omega, offsets, ratio, normalize=normalize)
    # the k-th largest may be NaN (NaN ranks above +inf); any NaN matches any NaN
    same = (t == t_ref) | (t.isnan() & t_ref.isnan())
    assert same.all(), f"{isa}: thresholds {t.tolist()} != {t_ref.tolist()}"
    assert torch.equal(c, c_ref), f"{isa}: inv_scale {c.tolist()} != {c_ref.tolist()}"
    return t


def _data(kind: str, n: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "random":
        return torch.randn(n, generator=gen) * torch.rand(n, generator=gen)
    if kind == "zeros":        # most of Ω never sensitive: exactly 0
        x = torch.rand(n, generator=gen)
        return torch.where(torch.rand(n, generator=gen) < 0.7, torch.zeros(()), x)
    if kind == "ties":         # few distinct values: the window is one of them
        return torch.randint(0, 5, (n,), generator=gen).float() * 0.25
    if kind == "special":      # inf and NaN rank above every finite |x|
        x = torch.rand(n, generator=gen)
        x[torch.randint(0, n, (n // 20,), generator=gen)] = float("inf")
        x[torch.randint(0, n, (n // 50,), generator=gen)] = float("nan")
        x[torch.randint(0, n, (n // 10,), generator=gen)] *= -1
        return x
    raise ValueError(kind)


CASES = ([(isa, kind, torch.float32) for isa in ISAS
          for kind in ("random", "zeros", "ties", "special")] +
         [(ISAS[-1], kind, dtype) for dtype in (torch.bfloat16, torch.float16)
          for kind in ("random", "ties")])


@pytest.mark.parametrize("isa,kind,dtype", CASES, ids=str)
def test_large_groups_exact(isa, kind, dtype):
    gen = torch.Generator().manual_seed(hash((kind, str(dtype))) % 2**31)
    # large groups next to small ones (radix) and an empty one; ratios from 0 to 1
    sizes = [MIN_GROUP, 100, 0, 3 * MIN_GROUP + 7, MIN_GROUP - 1, 2 * MIN_GROUP]
    offsets = torch.tensor([0] + torch.tensor(sizes).cumsum(0).tolist())
    omega = _data(kind, int(offsets[-1]), gen).to(dtype)
    for ratios in ([0.1, 0.5, 0.5, 0.3, 0.2, 0.9], [0.0, 1.0, 0.5, 0.999, 0.001, 1.0],
                   [0.75, 0.0, 0.0, 0.6, 0.5, 0.0]):
        check(omega, offsets, torch.tensor(ratios, dtype=torch.float64), isa,
              normalize=ratios[0] != 0.75)


@pytest.mark.parametrize("isa", ISAS)
def test_misleading_sample_falls_back(isa):
    """A group whose sampled places hold the largest values: the sample puts the window
    far above the k-th largest; the counts show the miss, and the radix passes give the
    exact threshold."""
    n = 4 * MIN_GROUP
    gen = torch.Generator().manual_seed(1)
    omega = torch.rand(n, generator=gen)
    omega[sample_places(n)] = 100.0 + torch.rand(min(MAX_SAMPLE, n // 16), generator=gen)
    offsets = torch.tensor([0, n])
    t = check(omega, offsets, torch.tensor([0.5], dtype=torch.float64), isa)
    assert t[0] < 1.0                       # the true median, not a value of the sample


@pytest.mark.parametrize("isa", ISAS)
def test_window_over_its_cap_falls_back(isa):
    """Half the group one value just above the window's lower end: the window holds far
    more than the sample promised (its cap), so the group falls back to the radix passes."""
    n = 4 * MIN_GROUP
    gen = torch.Generator().manual_seed(2)
    omega = torch.rand(n, generator=gen)
    places = sample_places(n)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[places] = True
    # outside the sample, half the elements take one value near the median
    tied = (~mask) & (torch.rand(n, generator=gen) < 0.5)
    omega[tied] = 0.5
    check(omega, torch.tensor([0, n]), torch.tensor([0.5], dtype=torch.float64), isa)


def test_k_at_the_lower_end_of_the_window():
    """Ties at the window's lower end (all zeros): the k-th largest is that value, found
    from the count of elements equal to it (they are not kept)."""
    n = 2 * MIN_GROUP
    omega = torch.zeros(n)
    omega[: n // 4] = torch.rand(n // 4) + 1.0       # a quarter non-zero
    omega = omega[torch.randperm(n, generator=torch.Generator().manual_seed(3))]
    for isa in ISAS:
        t = check(omega, torch.tensor([0, n]), torch.tensor([0.5], dtype=torch.float64), isa)
        assert t[0] == 0.0
