"""One process of the distributed meta-training test (tests/test_meta_distributed.py), started by torchrun, or
called in-process for the single-process reference: min-max meta-training of RNNProp on the MLP problem with
trajectories shared out across the processes. Rank 0 writes the student, the first meta-gradient and the
training meta losses to OUT. ``killed`` ends every process abruptly in the middle of the run, after a checkpoint;
``resume`` continues that run from its checkpoint."""

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from amalgam_plugin.engine.curriculum import Curriculum, PhaseConfig
from amalgam_plugin.engine.distributed import launched_group
from amalgam_plugin.problems import make_problem
from amalgam_plugin.students import RNNProp
from amalgam_plugin.teachers import make_pool

# 3 trajectories per period in meta-steps of 2: the last meta-step of a period has one trajectory
CONFIG = PhaseConfig.of(unroll_length=4, depths=[1, 2], validation_depths=[1, 2], trajectories_per_period=3,
                        trajectories_per_step=2, validation_trajectories=3, min_periods=2, num_chances=1,
                        max_periods=2, second_order=False, mechanism="minmax")
KILL_AT_META_UPDATE = 5  # in stage 0's second period, after the first checkpoint


def run(mode: str, workdir: Path, out: Path, config: PhaseConfig = CONFIG) -> None:
    torch.set_num_threads(1)
    with launched_group() as group:
        student = RNNProp()
        student.reset_parameters(torch.Generator().manual_seed(0))
        curriculum = Curriculum(student, make_problem("mlp"), make_pool("small"), config, workdir, seed=7,
                                group=group)
        gradients, apply = [], curriculum.learner.apply

        def recording_apply(gradient):
            gradients.append(gradient.clone())
            if mode == "killed" and len(gradients) == KILL_AT_META_UPDATE:
                os._exit(17)
            apply(gradient)

        curriculum.learner.apply = recording_apply
        curriculum.run(resume=mode == "resume")
    if group.main:
        losses = [r["meta_loss"] for r in map(json.loads, (workdir / "log.jsonl").read_text().splitlines())
                  if r["event"] == "meta_step"]
        save_file({**{f"student.{k}": v for k, v in student.state_dict().items()}, "first_gradient": gradients[0]},
                  str(out), metadata={"losses": json.dumps(losses)})


if __name__ == "__main__":
    mode, workdir, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    run(mode, workdir, out, CONFIG.changed(trajectories_per_step=int(sys.argv[4])) if len(sys.argv) > 4 else CONFIG)
