"""One process of the joint-batch check in tests/test_scale.py: K bi-level steps of the engine on
this rank's slice of a global batch. Started by torchrun with 1 or 2 processes (or plainly, as one);
the nets' final state (weights and BatchNorm statistics) is exported to RUN_DIR/model.

Every rank draws the same global batch v, prior draws h_p and reparameterisation noise eps from
seeded generators and keeps its own slice (rank r: samples r*b .. (r+1)*b - 1), so one process on
the whole batch sees exactly the samples that two processes see together:

    torchrun --standalone --nproc_per_node 2 tests/joint_batch_worker.py --run-dir R1
    python tests/joint_batch_worker.py --run-dir R2       # then compare R1/model and R2/model

--eval-mode keeps the nets in eval mode (BatchNorm normalises with its running statistics, so
per-rank batch statistics cannot enter; for the CPU, where torch's SyncBatchNorm refuses tensors).
Otherwise the nets train as `Trainer.train_step` trains them, and two processes equal one only with
model.sync_batchnorm=true. --share-gpu puts every rank on cuda:0 over gloo (NCCL refuses two ranks
on one GPU), so that a one-GPU machine can run the synced check.
"""

import argparse
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
REPO = HERE.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", required=True, help="run folder; the nets go to RUN_DIR/model")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16, help="global batch (all ranks together)")
    p.add_argument("--eval-mode", action="store_true")
    p.add_argument("--share-gpu", action="store_true")
    p.add_argument("overrides", nargs="*", help="config overrides (key=value)")
    a = p.parse_args()
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if a.batch_size % world:
        raise SystemExit(f"--batch-size {a.batch_size} does not split over {world} processes")
    if a.share_gpu and world > 1:
        os.environ["LOCAL_RANK"] = "0"  # Accelerate puts rank r on cuda:LOCAL_RANK
        torch.cuda.set_device(0)
        torch.distributed.init_process_group("gloo")  # Accelerate keeps an existing group

    from bidvl import objectives
    from bidvl.config import load_config
    from bidvl.engine import Trainer
    from bidvl.tracking import StepResult
    from conftest import TINY

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 on the GPU too: the
    torch.backends.cudnn.allow_tf32 = False  # per-rank and joint batches pick different kernels
    b = a.batch_size // world
    mine = slice(rank * b, (rank + 1) * b)
    noise = torch.Generator().manual_seed(1234)

    def reparameterize(mu, logvar):  # the engine's h_q = mu + sigma * eps, eps from the global draw
        assert len(mu) == b, f"expected a per-rank batch of {b}, got {len(mu)}"
        eps = torch.randn((a.batch_size, *mu.shape[1:]), generator=noise)[mine]
        return mu + torch.exp(0.5 * logvar) * eps.to(mu.device, mu.dtype)

    objectives.reparameterize = reparameterize
    cfg = load_config(REPO / "configs/digits.yaml",
                      [*TINY, f"run.dir={a.run_dir}", f"train.batch_size={b}", *a.overrides])
    if a.eval_mode and cfg.objective.order != "upper_first":
        raise SystemExit("--eval-mode runs the phases in objective.order=upper_first")
    trainer = Trainer(cfg)
    device = trainer.accelerator.device
    data = torch.Generator().manual_seed(99)
    shape = (a.batch_size, cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
    for _ in range(a.steps):
        v = (torch.rand(shape, generator=data) * 2 - 1)[mine].to(device)
        h_p = torch.randn((a.batch_size, cfg.model.latent_dim), generator=data)[mine].to(device)
        if not a.eval_mode:
            trainer.train_step([v], [h_p])
            continue
        result = StepResult()  # train_step's phases (objective.order=upper_first), nets in eval mode
        for net in (trainer.energy_net, trainer.encoder, trainer.generator):
            net.eval()
        trainer.upper_level_step([v], [h_p], result)
        for _ in range(cfg.objective.lower_steps):
            trainer.lower_level_step([v], [h_p], result)
    trainer.export()
    trainer.close()


if __name__ == "__main__":
    main()
