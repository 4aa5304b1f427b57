"""average_last_stage (issue 24): the kept student is the mean of the last stage's weights after each meta-update."""

import pytest
import torch

from amalgam_plugin.engine.curriculum import Curriculum, PhaseConfig
from amalgam_plugin.problems import make_problem
from amalgam_plugin.students import RNNProp

CONFIG = PhaseConfig.of(unroll_length=4, depths=[1, 2], validation_depths=[1, 2], trajectories_per_period=1,
                        validation_trajectories=1, min_periods=2, num_chances=0, max_periods=2, max_repeat=0,
                        second_order=False, average_last_stage=True)


def new_student() -> RNNProp:
    student = RNNProp()
    student.reset_parameters(torch.Generator().manual_seed(0))
    return student


def recorded_run(workdir, config, validations=None):
    """A curriculum run that also records, independently of the averaging, (stage, period, attempt, weights)
    after every meta-update."""
    student = new_student()
    curriculum = Curriculum(student, make_problem("mlp"), [], config, workdir, seed=3)
    seen, apply = [], curriculum.learner.apply

    def recording(gradient):
        apply(gradient)
        pr = curriculum.progress
        seen.append((pr.stage, pr.period, pr.attempt, {k: v.clone() for k, v in student.state_dict().items()}))

    curriculum.learner.apply = recording
    if validations is not None:
        curriculum.validate = lambda: validations[(curriculum.progress.stage, curriculum.progress.period,
                                                   curriculum.progress.attempt)]
    curriculum.run()
    return student, seen


def same_weights(student, weights: dict) -> bool:
    return all(torch.equal(v, weights[k]) for k, v in student.state_dict().items())


def float64_mean(weights: list[dict]) -> dict:
    return {k: (sum(w[k].double() for w in weights) / len(weights)).float() for k in weights[0]}


def test_the_kept_student_is_the_mean_of_the_last_stages_weights(tmp_path):
    student, seen = recorded_run(tmp_path, CONFIG)
    last_stage = [w for stage, _, _, w in seen if stage == 1]
    assert len(last_stage) == 2 * 2  # periods x depth
    for name, value in float64_mean(last_stage).items():
        torch.testing.assert_close(student.state_dict()[name], value, rtol=0, atol=0)
    # and it is none of the checkpoints the curriculum would have kept
    assert not any(same_weights(student, w) for *_, w in seen)


def test_a_repeated_period_leaves_the_average_as_it_was(tmp_path):
    config = CONFIG.changed(max_repeat=1, repeat_threshold=0.5)
    # stage 1, period 1, attempt 0 validates far worse than period 0: repeated, its updates rolled back
    validations = {(0, 0, 0): 1.0, (0, 1, 0): 0.9, (1, 0, 0): 0.8, (1, 1, 0): 5.0, (1, 1, 1): 0.7}
    student, seen = recorded_run(tmp_path, config, validations)
    assert {(p, a) for stage, p, a, _ in seen if stage == 1} == {(0, 0), (1, 0), (1, 1)}
    kept = [w for stage, period, attempt, w in seen if stage == 1 and (period, attempt) != (1, 0)]
    for name, value in float64_mean(kept).items():
        torch.testing.assert_close(student.state_dict()[name], value, rtol=0, atol=0)


def test_a_run_resumed_in_the_last_stage_keeps_the_same_average(tmp_path):
    reference, _ = recorded_run(tmp_path / "ref", CONFIG)
    student = new_student()
    killed = Curriculum(student, make_problem("mlp"), [], CONFIG, tmp_path / "killed", seed=3)
    validate, calls = killed.validate, []

    def dies_in_the_last_stage():
        calls.append(1)
        if len(calls) == 4:  # stage 1, period 1: after one checkpointed period of the last stage
            raise KeyboardInterrupt
        return validate()

    killed.validate = dies_in_the_last_stage
    with pytest.raises(KeyboardInterrupt):
        killed.run()
    torch.manual_seed(11)  # the global random state must not matter
    student = new_student()
    Curriculum(student, make_problem("mlp"), [], CONFIG, tmp_path / "killed", seed=3).run(resume=True)
    for name, value in reference.state_dict().items():
        assert torch.equal(student.state_dict()[name], value), name


def test_off_by_default_the_last_stages_best_checkpoint_is_kept(tmp_path):
    assert PhaseConfig().schedule.average_last_stage is False
    student, seen = recorded_run(tmp_path, CONFIG.changed(average_last_stage=False))
    assert any(same_weights(student, w) for *_, w in seen)
