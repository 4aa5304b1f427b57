"""Losses (docs/method.md#meta-loss) on hand-made trajectories, and the students' own formulas
(docs/method.md#rnnprop, #choice-network)."""

import math

import numpy as np
import pytest
import torch

from amalgam_plugin.amalgamation import (
    adaptive_clip_,
    imitation_distance,
    imitation_weight,
    log_improvement,
    reduce_imitation,
)
from amalgam_plugin.students import ChoiceConfig, ChoiceNet, RNNProp
from amalgam_plugin.students.choice import rank_features
from amalgam_plugin.teachers import make_pool


def test_a_meta_loss_term_is_the_log_improvement_over_the_truncations_start():
    objectives = torch.tensor([2.0, 1.0, 0.5, 0.25])
    references = torch.tensor([2.0, 2.0, 2.0, 4.0])
    expected = [0.0, math.log(0.5), math.log(0.25), math.log(0.0625)]
    assert log_improvement(objectives, references).tolist() == pytest.approx(expected, rel=1e-6)


def test_imitation_distance_is_log_mean_half_squared_distance():
    student, teacher = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 0.0, 3.0, 5.0])
    expected = math.log(0.5 * (4 + 1) + 1e-10) - math.log(4)
    assert float(imitation_distance(student, teacher)) == pytest.approx(expected, rel=1e-6)


def test_mean_and_minmax_reductions():
    distances = torch.tensor([[0.0, -2.0], [1.0, 3.0], [-1.0, -5.0]])  # [steps, teachers]
    assert float(reduce_imitation(distances, "mean")) == pytest.approx(np.mean([-1.0, 2.0, -3.0]))
    assert float(reduce_imitation(distances, "minmax")) == pytest.approx(np.mean([0.0, 3.0, -1.0]))
    assert float(reduce_imitation(distances[:, :1], "choice")) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="valid mechanisms: mean, minmax, choice"):
        reduce_imitation(distances, "median")


def test_imitation_schedules():
    assert [imitation_weight("il_more", s) for s in range(5)] == [0.2, 0.1, 0.05, 0.02, 0.02]
    assert imitation_weight("none", 2) == 0.0
    with pytest.raises(ValueError, match="il_more"):
        imitation_weight("lots", 0)


def test_adaptive_gradient_clipping_caps_the_ratio():
    w = torch.nn.Parameter(torch.full((4,), 2.0))  # ‖w‖ = 4
    w.grad = torch.full((4,), 5.0)  # ‖G‖ = 10 > 0.1·4
    adaptive_clip_([w], clip=0.1)
    assert float(w.grad.norm()) == pytest.approx(0.4)
    tiny = torch.nn.Parameter(torch.zeros(3))
    tiny.grad = torch.ones(3)
    adaptive_clip_([tiny], clip=0.1, eps=1e-3)
    assert float(tiny.grad.norm()) == pytest.approx(1e-4)


def test_rnnprop_has_the_papers_shape_and_rule():
    torch.manual_seed(0)
    student = RNNProp()
    assert sum(p.numel() for p in student.parameters()) == 5141
    assert float(student.recurrent[0].bias[20:40].detach().min()) == 1.0  # unit forget bias
    grad = torch.tensor([1e-3, -0.5, 2.0])
    state = student.init_state(3, grad)
    delta, new = student(grad, state)
    assert torch.allclose(new["m"], 0.1 * grad) and torch.allclose(new["v"], 0.001 * grad * grad)
    assert float(delta.detach().abs().max()) <= 0.1
    frozen = student.warmup_step(grad, state)
    assert torch.equal(frozen["h0"], state["h0"]) and torch.equal(frozen["m"], new["m"])


def test_choice_network_is_a_softmax_mixture_of_its_pool():
    torch.manual_seed(0)
    net = ChoiceNet(ChoiceConfig())
    grad = torch.tensor([0.3, -0.2, 1e-3, 4.0])
    state = net.init_state(4, grad)
    weights, updates, _ = net.weights(grad, state, rank=2)
    expected_updates = torch.stack([t.update(grad, t.init(grad))[0] for t in make_pool("choice-large")], dim=-1)
    torch.testing.assert_close(updates, expected_updates)
    torch.testing.assert_close(weights.sum(-1), torch.ones(4), rtol=0, atol=1e-6)
    delta, new_state = net(grad, state, rank=2)
    torch.testing.assert_close(delta, (weights * updates).sum(-1))
    assert new_state["t"] == 1


def test_choice_network_quirks_rank4_and_unclipped_time():
    like = torch.zeros(1)
    assert rank_features(4, 2, like).abs().sum() == 0  # conv kernels get no rank indicator
    assert rank_features(2, 1, like).tolist() == [[0.0, 1.0, 0.0]]
    per_coordinate = rank_features(torch.tensor([1, 4, 3]), 3, like)
    assert per_coordinate.tolist() == [[1, 0, 0], [0, 0, 0], [0, 0, 1]]
    net = ChoiceNet()
    grad = torch.ones(2)
    state = {**net.init_state(2, grad), "t": 5000}  # t/2000 = 2.5: not clipped to 1
    captured = {}
    net.recurrent[0].register_forward_pre_hook(lambda module, args: captured.update(x=args[0]))
    net(grad, state, rank=1)
    assert captured["x"][0, len(net.config.pool)].item() == pytest.approx(2.5)
