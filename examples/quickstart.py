"""Train the quickstart VAE from Python, then reload the exported model and sample from it.

Run:  python examples/quickstart.py [--epochs 10] [--output outputs/example_quickstart]
"""

from __future__ import annotations

import argparse

import medgen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--output", default="outputs/example_quickstart")
    args = parser.parse_args()

    cfg = medgen.compose(
        "train",
        overrides=[
            "experiment=quickstart",
            f"trainer.max_epochs={args.epochs}",
            f"paths.output_dir={args.output}",
        ],
    )
    result = medgen.train(cfg)
    print("validation metrics:", result["metrics"])

    model = medgen.load(result["model_dir"])  # offline, safetensors only
    images = model.sample(8, seed=0)
    recon = model.reconstruct(images)
    print(
        "samples", tuple(images.shape), "reconstruction error", float((recon - images).abs().mean())
    )
    medgen.write_samples(model, f"{args.output}/more_samples", num_samples=8, seed=1)


if __name__ == "__main__":
    main()
