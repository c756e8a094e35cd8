"""What does the energy net respond to? Mean E(v) of test images and of perturbed versions of them.

    python tools/energy_probe.py --run runs/study_fashion_mnist/bidvl_offset [--checkpoint 200]

Prints one JSON object: for the test images (the first --num of the config's test split), the
same images with Gaussian noise of standard deviation 0.05 / 0.1 / 0.3 added (clamped to [-1, 1]),
the same images blurred (3x3 box filter), uniform noise U[-1, 1], and generated samples G(h) (from
the generator's EMA when the run has one, unless --no-ema; "generator" says which): the
mean and standard deviation of E(v) (energy net in eval mode), and the AUROC of -E(v) between the
test images (positives) and each set. A net that ranks noise *below* data in energy (AUROC < 0.5)
and whose energy drops as noise is added to data has learned "sharp, high-frequency = data".
"""

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from bidvl.errors import BidvlError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run folder (holds config.yaml)")
    p.add_argument("--checkpoint", default=None, help="latest | final | STEP | checkpoint folder")
    p.add_argument("--num", type=int, default=1000, help="test images (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true",
                   help="sample from the trained generator even when the run has an EMA of it")
    args = p.parse_args(argv)

    from bidvl.evaluation import load_run, sample_images
    from bidvl.evaluation.metrics import auroc, energies
    from bidvl.evaluation.sampling import first_test_images

    try:
        run = load_run(args.run, args.checkpoint, ema=False if args.no_ema else None)
        v = first_test_images(run.cfg, args.num, 500)
    except BidvlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    g = torch.Generator().manual_seed(args.seed)
    sets = {"test": v}
    for sigma in (0.05, 0.1, 0.3):
        sets[f"test+noise{sigma}"] = (v + sigma * torch.randn(v.shape, generator=g)).clamp(-1, 1)
    sets["test_blurred"] = F.avg_pool2d(F.pad(v, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    sets["uniform"] = torch.rand(v.shape, generator=g) * 2 - 1
    sets["samples"] = sample_images(run.nets.generator, len(v), run.cfg.model.latent_dim, args.seed)
    result = {"run": args.run, "step": run.step, "weights": run.kind, "generator": run.generator, "num": len(v),
              "sets": {}}
    e_test = None
    for name, images in sets.items():
        e = torch.cat([energies(run.nets.energy_net, images[i:i + 500]) for i in range(0, len(images), 500)])
        e_test = e if name == "test" else e_test
        row = {"mean_energy": e.mean().item(), "std_energy": e.std().item()}
        if name != "test":
            row["auroc_vs_test"] = auroc(-e_test.numpy(), -e.numpy())
        result["sets"][name] = row
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
