"""Cost of the stain transforms per batch: Macenko and Reinhard normalisation, HED jitter.

Synthetic H&E patches (`pcam-prep synth`'s generator, no files), one batch of --batch-size on
--device; the reference is fitted on the batch itself with `pcam_prep.stain.fit_reference`.
Each transform runs --warmup times untimed, then --repeats timed runs (CUDA synchronised);
prints the median, min and max seconds per batch and the mean absolute change per pixel value
(0-1 scale: how strong the transform is) as a Markdown table, and JSON with --out. For scale,
the existing colour jitter (`train.augment.colour_jitter`) and one training step of the default
model (forward, backward, AdamW; --no-step skips it) are timed too.

    python pipelines/bench_stain.py --batch-size 256 --repeats 7
    python pipelines/bench_stain.py --device cuda --repeats 20
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from pcam_prep.stain import fit_reference
from pcam_prep.synth.kaggle import make_patch
from pcam_prep.train.augment import colour_jitter
from pcam_prep.train.stain import StainNormaliser, hed_jitter


def patches(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([make_patch(rng, i % 2, 96)[0] for i in range(n)])


def timed(fn, warmup: int, repeats: int, device: torch.device) -> list[float]:
    seconds = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
    return seconds


def train_step(x: torch.Tensor, device: torch.device):
    """One forward/backward/AdamW step of the default model on `x`, as a callable."""
    import torch.nn.functional as F

    from pcam_prep.train.data import keep_freed_memory_on_cpu
    from pcam_prep.train.models import build_model

    if device.type == "cpu":
        keep_freed_memory_on_cpu()  # as the trainer does
    model = build_model("small", 32).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters())
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.zeros(len(x), device=device)

    def step() -> None:
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads  [default: torch's own]")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.02, 0.05], help="HED jitter strengths")
    parser.add_argument("--no-step", action="store_true", help="skip timing a training step of the default model")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    images = patches(args.batch_size, 0)
    x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float().div_(255)  # as Normalise.to_unit
    generator = torch.Generator(device).manual_seed(0)
    cases = {f"{m} normalise": StainNormaliser(fit_reference(images, m, "the batch"), device)
             for m in ("macenko", "reinhard")}
    runs = {name: (lambda n=n: n(x)) for name, n in cases.items()}
    for sigma in args.sigmas:
        runs[f"HED jitter (sigma {sigma})"] = lambda s=sigma: hed_jitter(x, generator, s)
    runs["colour jitter (existing)"] = lambda: colour_jitter(x, generator)
    rows = []
    with torch.no_grad():
        for name, fn in runs.items():
            seconds = timed(fn, args.warmup, args.repeats, device)
            change = float((fn() - x).abs().mean())
            rows.append({"transform": name, "median_s": statistics.median(seconds), "min_s": min(seconds),
                         "max_s": max(seconds), "mean_abs_change": change})
    if not args.no_step:
        seconds = timed(train_step(x, device), args.warmup, args.repeats, device)
        rows.append({"transform": "train step, default model (for scale)", "median_s": statistics.median(seconds),
                     "min_s": min(seconds), "max_s": max(seconds), "mean_abs_change": float("nan")})
    print(f"batch {args.batch_size}, {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"{args.repeats} runs after {args.warmup} warmup")
    print("| transform | median s/batch | min | max | mean abs change |\n|---|---|---|---|---|")
    for r in rows:
        change = "-" if r["mean_abs_change"] != r["mean_abs_change"] else f"{r['mean_abs_change']:.3f}"  # NaN: a step
        print(f"| {r['transform']} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['max_s']:.3f} | {change} |")
    if args.out:
        meta = {"batch_size": args.batch_size, "device": str(device), "torch": torch.__version__,
                "threads": torch.get_num_threads(), "repeats": args.repeats, "host": platform.node()}
        args.out.write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
