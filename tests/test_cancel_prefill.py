"""A forward pass asked to stop stops between two layers, in its own thread only, and the hooks
that stop it leave nothing behind: not in the model, not in a copy taken while they were on."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from processors.lm import Cancelled, _stoppable


class Layers(torch.nn.Module):
    """A stack of layers; before the third, the pass asks itself to stop (and is copied)."""

    def __init__(self, cancel: threading.Event) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(6))
        self.ran: list[int] = []
        self.cancel = cancel
        self.copies: list[torch.nn.Module] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            self.ran.append(i)
            if i == 2 and self.copies == []:
                self.copies.append(copy.deepcopy(self.layers))  # an adapter view meanwhile
                self.cancel.set()
            x = layer(x)
        return x


def test_a_pass_stops_at_the_next_layer_and_leaves_no_hook_behind() -> None:
    cancel = threading.Event()
    model = Layers(cancel)
    with pytest.raises(Cancelled), _stoppable(model, cancel):
        model(torch.ones(1, 4))
    assert model.ran == [0, 1, 2]  # set just before layer 2: it and those after never ran
    assert all(not layer._forward_pre_hooks for layer in model.layers)
    # the copy taken during the pass carries the hook, which checks nothing any more
    copied = model.copies[0]
    assert any(layer._forward_pre_hooks for layer in copied)
    for layer in copied:
        layer(torch.ones(1, 4))
    model.ran.clear()
    model(torch.ones(1, 4))  # the event is still set: without the block nothing stops
    assert model.ran == list(range(6))


def test_a_set_event_stops_before_the_pass_and_none_changes_nothing() -> None:
    cancel = threading.Event()
    model = Layers(threading.Event())
    cancel.set()
    with pytest.raises(Cancelled), _stoppable(model, cancel):
        model(torch.ones(1, 4))
    assert model.ran == []
    with _stoppable(model, None):
        model(torch.ones(1, 4))
    assert model.ran == list(range(6))


def test_another_thread_running_the_model_is_not_stopped() -> None:
    cancel = threading.Event()
    model = Layers(threading.Event())
    outcome: list[str] = []

    def run_elsewhere() -> None:
        model(torch.ones(1, 4))
        outcome.append("ran")

    with _stoppable(model, cancel):
        cancel.set()
        thread = threading.Thread(target=run_elsewhere)
        thread.start()
        thread.join()
    assert outcome == ["ran"]
