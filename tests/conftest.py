"""Shared fixtures: sklearn digits splits and a small model trained on them (session-scoped, copied per test).

Keep this file small: fixtures used by one test file live in that file."""

from __future__ import annotations

import pytest
import torch

from hwmpq.data import Splits, load_digits


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models step far faster on one torch thread (and a second thread fights other processes)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def digits() -> Splits:
    """sklearn digits, 1x8x8, 60/20/20 split with seed 0 (do not mutate)."""
    return load_digits(seed=0)


@pytest.fixture(scope="session")
def _tiny_trained_state(digits: Splits) -> dict[str, torch.Tensor]:
    from hwmpq.train import fit
    from hwmpq.zoo import create_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model trains faster on one thread (far faster on a busy machine)
    try:
        torch.manual_seed(0)
        model = create_model("test_tiny", in_chans=1)
        fit(model, digits, epochs=6, batch_size=32, lr=0.1, seed=0, progress=False, log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture
def tiny_trained(_tiny_trained_state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A fresh float ``test_tiny`` (1x8x8, 10 classes) trained on digits (~0.9+ test accuracy), in eval mode."""
    from hwmpq.zoo import create_model

    model = create_model("test_tiny", in_chans=1)
    model.load_state_dict(_tiny_trained_state)
    return model.eval()


@pytest.fixture
def tiny_ort(tmp_path):
    """test_tiny on a real 1-thread ort-x86 target with an empty LUT store: ``.profile(config)`` fills it
    (layers, stand-ins, transitions, overhead). Store closed and target cleaned up afterwards."""
    from types import SimpleNamespace

    from hwmpq.graph import analyse
    from hwmpq.lut.model import edges_through_merges
    from hwmpq.lut.store import LutStore
    from hwmpq.profilers.probes import profiling_specs
    from hwmpq.profilers.runner import profile
    from hwmpq.targets.ort.target import OrtTarget
    from hwmpq.zoo import create_model

    model = create_model("test_tiny").eval()
    x = torch.zeros(1, 1, 8, 8)
    specs, _ = analyse(model, x)
    edges = edges_through_merges(model, x)
    target = OrtTarget(threads=1)
    store = LutStore.open(tmp_path / "ort.lut", target=target.id, device=target.device())
    ns = SimpleNamespace(model=model, x=x, specs=specs, edges=edges, target=target, store=store)
    ns.profile = lambda config: profile(profiling_specs(specs, edges, target), edges, target, store, config,
                                        progress=False)
    yield ns
    store.close()
    target.cleanup()
