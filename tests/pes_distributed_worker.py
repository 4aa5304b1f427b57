"""One process of PES meta-training on 2 processes (tests/test_pes.py), started by torchrun, or called in-process
for the single-process reference: min-max against the small pool (so the particles also run the teachers), 2
trajectories of 2 antithetic pairs per meta-step shared out across the processes. Rank 0 writes the student, every
meta-gradient applied and the training meta losses to OUT."""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from amalgam_plugin.engine.curriculum import Curriculum, PhaseConfig
from amalgam_plugin.engine.distributed import launched_group
from amalgam_plugin.problems import make_problem
from amalgam_plugin.students import RNNProp
from amalgam_plugin.teachers import make_pool

CONFIG = PhaseConfig.of(unroll_length=3, depths=[2], validation_depths=[1], trajectories_per_period=2,
                        trajectories_per_step=2, validation_trajectories=2, min_periods=1, num_chances=0,
                        max_periods=1, second_order=False, mechanism="minmax", gradient_estimator="pes",
                        pes_pairs=2, pes_sigma=0.01)


def run(workdir: Path, out: Path) -> None:
    torch.set_num_threads(1)
    with launched_group() as group:
        student = RNNProp()
        student.reset_parameters(torch.Generator().manual_seed(0))
        curriculum = Curriculum(student, make_problem("mlp"), make_pool("small"), CONFIG, workdir, seed=7, group=group)
        gradients, apply = [], curriculum.learner.apply

        def recording_apply(gradient):
            gradients.append(gradient.clone())
            apply(gradient)

        curriculum.learner.apply = recording_apply
        curriculum.run()
    if group.main:
        losses = [r["meta_loss"] for r in map(json.loads, (workdir / "log.jsonl").read_text().splitlines())
                  if r["event"] == "meta_step"]
        save_file({**{f"student.{k}": v for k, v in student.state_dict().items()},
                   "gradients": torch.stack(gradients)}, str(out), metadata={"losses": json.dumps(losses)})


if __name__ == "__main__":
    run(Path(sys.argv[1]), Path(sys.argv[2]))
