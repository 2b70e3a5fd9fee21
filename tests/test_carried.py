"""`topo.construct.prefix`: the prefix's outputs carried from module to module give what the whole prefix gives."""
from __future__ import annotations

import torch
from torch import nn

from topo.construct.prefix import CarriedOutputs
from topo.construct.prefix import calibrate_batchnorm


def _network() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2))


def _batches(n: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.rand(8, 1, 10, 10, generator=generator), torch.zeros(8)) for _ in range(n)]


def test_two_advances_give_what_calibrating_and_running_the_whole_network_gives():
    batches, null = _batches(), [x + 1.0 for x, _ in _batches()]
    names = [str(i) for i in range(7)]
    carried_net, whole_net = _network(), _network()
    carried = CarriedOutputs(batches, null, max_batches=4, device=torch.device("cpu"))
    assert carried.advance(carried_net, names[:3]) and carried.depth == 3
    assert carried.advance(carried_net, names) and carried.depth == 7
    calibrate_batchnorm(whole_net, batches, 4, torch.device("cpu"))
    whole_net.eval()
    with torch.no_grad():
        for got, (x, _) in zip(carried.eval, batches[:4], strict=True):
            torch.testing.assert_close(got, whole_net(x), rtol=0, atol=0)
        for got, x in zip(carried.null, null[:4], strict=True):
            torch.testing.assert_close(got, whole_net(x), rtol=0, atol=0)
    for a, b in zip(carried_net.state_dict().values(), whole_net.state_dict().values()):
        assert torch.equal(a, b)  # the same running statistics, to the bit
    assert all(m.training for m in carried_net.modules())  # modes and momenta are put back
    assert carried_net[1].momentum == 0.1
    assert torch.equal(carried.example, batches[0][0][:1])


def test_outputs_past_the_memory_bound_are_let_go():
    carried = CarriedOutputs(_batches(), None, max_batches=2, device=torch.device("cpu"), max_bytes=100)
    assert carried.null is None
    assert not carried.advance(_network(), ["0"])
