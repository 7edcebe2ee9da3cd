"""masked_step's cached checks (aim_kernels/prepared.py) see every change made between
steps: a step after the change raises, copies or re-checks exactly as the full path does."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import aim_kernels as ak
from aim_kernels.ops import reference
from tests.vlm_toy import ToyVLM, backward, toy_groups


def stepped():
    """A model whose last step went down the cached path (and filled its caches)."""
    model = ToyVLM()
    state = ak.attach(model, ak.AIMConfig(groups=toy_groups()))
    for seed in range(2):
        backward(model, seed)
        ak.masked_step(model)
    return model, state


def expected_step(state):
    """What the next step must leave in the bucket, from clones (reference.py)."""
    (b,) = state.buckets
    cfg = state.config
    grad, fisher = b.grad.clone(), b.fisher.clone()
    stats = reference.fused_step(grad, b.param, b.anchor, b.importance, fisher, b.offsets,
                                 b.inv_scale, b.thresh, b.keep, b.lam, beta=cfg.beta,
                                 accumulate=cfg.accumulate, importance_kind=cfg.importance,
                                 directional=cfg.directional)
    return grad, fisher, stats


def assert_step_is_reference(model, state, seed):
    (b,) = state.buckets
    backward(model, seed)
    grad, fisher, stats = expected_step(state)
    got = ak.masked_step(model).tensor
    assert torch.equal(b.grad, grad) and torch.equal(b.fisher, fisher)
    torch.testing.assert_close(got, stats, rtol=1e-6, atol=1e-6)


def test_the_cached_step_is_the_reference_bit_for_bit():
    model, state = stepped()
    assert_step_is_reference(model, state, 5)
    assert_step_is_reference(model, state, 6)


def test_offsets_written_between_steps_are_checked_again():
    model, state = stepped()
    state.buckets[0].offsets[1] += 1000           # in place: its version counter moves
    with pytest.raises(ValueError, match="offsets"):
        ak.masked_step(model)


def test_a_bucket_tensor_swapped_between_steps_is_checked_again():
    model, state = stepped()
    b = state.buckets[0]
    b.lam = b.lam.double()
    with pytest.raises(TypeError, match="lam"):
        ak.masked_step(model)


def test_a_config_scalar_changed_between_steps_is_checked_again():
    model, state = stepped()
    state.config.beta = 2.0
    with pytest.raises(ValueError, match="beta"):
        ak.masked_step(model)


def test_a_transposed_parameter_at_the_same_address_is_not_at_home():
    model, _ = stepped()
    w = model.vision[0].weight                     # square: same shape, same address
    w.data = w.data.t()
    with pytest.raises(RuntimeError, match="no longer lives in the AIM flat buffer"):
        ak.masked_step(model)


def test_a_transposed_grad_at_the_same_address_is_copied_like_any_other():
    model, state = stepped()
    (b,) = state.buckets
    w = model.vision[0].weight
    s = state._slot_by_name["vision.0.weight"]
    backward(model, 7)
    w.grad = w.grad.t()                            # the same memory, read transposed
    view = b.grad[s.start:s.start + s.numel]
    as_was, transposed = view.clone(), w.grad.reshape(-1).clone()
    view.copy_(transposed)                          # what the full path copies in
    grad, fisher, _ = expected_step(state)
    view.copy_(as_was)
    assert not torch.equal(as_was, transposed)
    ak.masked_step(model)
    assert torch.equal(b.grad, grad) and torch.equal(b.fisher, fisher)
    assert w.grad.data_ptr() == b.grad.data_ptr() + 4 * s.start and w.grad.is_contiguous()


def test_the_step_bumps_the_version_of_what_it_writes():
    model, state = stepped()
    b = state.buckets[0]
    before = b.grad._version, b.fisher._version
    backward(model, 3)
    ak.masked_step(model)
    assert b.grad._version > before[0] and b.fisher._version > before[1]


def test_a_dispatch_mode_sees_the_custom_op():
    model, _ = stepped()
    seen = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Log():
        ak.masked_step(model)
    assert any("aim_kernels.fused_step" in f for f in seen)


def test_more_threads_after_a_step_get_a_scratch_that_fits():
    from aim_kernels import prepared
    from aim_kernels.ops import native
    if native._C is None:
        pytest.skip("the compiled CPU backend is not built")
    model, state = stepped()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 3)
        if native._C.cpu_threads() != threads + 3:
            pytest.skip("the compiled module's OpenMP does not follow torch.set_num_threads")
        assert_step_is_reference(model, state, 8)
        run = prepared._CACHE[state].launches[0][4]
        assert run._scratch.numel() >= (threads + 3) * state.num_groups * 7
    finally:
        torch.set_num_threads(threads)
