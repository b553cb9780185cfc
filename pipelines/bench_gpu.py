"""GPU benchmark of the trainer: train images/s and data wait per arch, batch, data path and compile; predict with TTA 8.

Cases, on one CUDA device, bf16 autocast + channels_last (the trainer's CUDA defaults):

  train   small | resnet | timm:resnet18  x  batch 256 | 512  x  streamed | resident     (12 runs)
          + torch.compile for each arch at batch 512, resident                               (3 runs)
  predict each arch, batch 512, TTA 8 (8 dihedral views per image), streamed

Each train case builds the model with the trainer's own `setup`, runs --warmup steps untimed
(cudnn autotuning, compilation), then times steps for --seconds: images/s over the timed steps,
and data_wait_frac = the share of that wall time spent blocked on the next batch (the GPU is
synchronised every step, so waiting is time the GPU would run dry). Nothing is written to the
run folder. Whatever has not started after --budget seconds is skipped and says so, so a run
stays under 5 minutes. Prints a Markdown table and writes JSON (--out).

    python pipelines/bench_gpu.py --shards shards/ --out bench_gpu.json            # the real thing, CUDA
    python pipelines/bench_gpu.py --shards shards/ --smoke                         # CPU, a few steps each

--smoke runs every case on the CPU with batch 8, 1 warmup and 1 timed step, and skips
compile (it needs a C compiler and minutes on a CPU): it checks the script, not the numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pcam_prep.loader import BatchLoader
from pcam_prep.train.augment import dihedral
from pcam_prep.train.config import TrainConfig
from pcam_prep.train.data import Normalise, resolve_device, stream_batches
from pcam_prep.train.loop import autocast, epoch_batches, setup, train_step

ARCHS = ("small", "resnet", "timm:resnet18")


@dataclass(frozen=True)
class Case:
    kind: str  # train | predict
    arch: str
    batch_size: int
    data: str  # streamed | resident
    compile: bool = False


@dataclass
class Result:
    case: Case
    images_per_s: float | None = None
    data_wait_frac: float | None = None
    steps: int = 0
    note: str = ""


def cases(archs: tuple[str, ...], batches: tuple[int, ...], with_compile: bool) -> list[Case]:
    found = [Case("train", a, b, d) for a in archs for b in batches for d in ("streamed", "resident")]
    if with_compile:
        found += [Case("train", a, max(batches), "resident", compile=True) for a in archs]
    return found + [Case("predict", a, max(batches), "streamed") for a in archs]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def steps_forever(run):
    """(epoch, step, batch) across epochs, from the trainer's own data path (resident or streamed)."""
    epoch = 0
    while True:
        run.loader.set_epoch(epoch)
        batches = epoch_batches(run)
        for step in range(run.steps):
            yield epoch, step, batches
        if hasattr(batches, "close"):
            batches.close()
        epoch += 1


def val_batches_forever(loader: BatchLoader, device: torch.device):
    while True:
        yield from stream_batches(loader, device)


def bench_train(case: Case, args: argparse.Namespace, out: Path) -> Result:
    config = TrainConfig(shards=args.shards, out=out, arch=case.arch, batch_size=case.batch_size,
                         resident=case.data == "resident", compile=case.compile, device=args.device, epochs=1)
    device = resolve_device(config.device)
    run = setup(config, 0, 1, device)
    run.net.train()
    wait = 0.0
    steps = images = 0
    start = None
    for n, (epoch, step, batches) in enumerate(steps_forever(run)):
        if n == args.warmup:
            sync(device)
            wait, start = 0.0, time.perf_counter()
        waited = time.perf_counter()
        batch = next(batches)
        blocked = time.perf_counter() - waited
        train_step(run, batch, epoch, step)
        sync(device)  # so time blocked on data is time the GPU had nothing to do
        if start is not None:
            wait += blocked
            steps, images = steps + 1, images + len(batch.index)
            elapsed = time.perf_counter() - start
            if steps >= args.max_steps or elapsed >= args.seconds:
                break
    elapsed = time.perf_counter() - start
    return Result(case, round(images / elapsed, 1), round(wait / elapsed, 4), steps)


@torch.no_grad()
def bench_predict(case: Case, args: argparse.Namespace, out: Path) -> Result:
    config = TrainConfig(shards=args.shards, out=out, arch=case.arch, batch_size=case.batch_size, device=args.device,
                         resident=False, epochs=1)
    device = resolve_device(config.device)
    run = setup(config, 0, 1, device)
    model = run.model.eval()
    loader = BatchLoader(run.val_loader.source, case.batch_size, shuffle=False)
    steps = images = 0
    start = None
    for n, batch in enumerate(val_batches_forever(loader, device)):
        if n == args.warmup:
            sync(device)
            start = time.perf_counter()
        unit = Normalise.to_unit(batch.images)
        with autocast(run):
            views = [torch.sigmoid(model(run.norm(dihedral(unit, code))).float()) for code in range(8)]
        torch.stack(views).mean(0).cpu()  # the probabilities on the host, as predict writes them
        if start is not None:
            steps, images = steps + 1, images + len(batch.index)
            if steps >= args.max_steps or time.perf_counter() - start >= args.seconds:
                break
    return Result(case, round(images / (time.perf_counter() - start), 1), None, steps, "TTA 8")


def markdown(results: list[Result]) -> str:
    lines = ["| kind | arch | batch | data | compile | images/s | data_wait_frac | steps | note |",
             "|---|---|---:|---|---|---:|---:|---:|---|"]
    for r in results:
        c = r.case
        ips = "" if r.images_per_s is None else f"{r.images_per_s:,.0f}"
        wait = "" if r.data_wait_frac is None else f"{r.data_wait_frac:.2%}"
        lines.append(f"| {c.kind} | {c.arch} | {c.batch_size} | {c.data} | {'yes' if c.compile else 'no'} | {ips} | "
                     f"{wait} | {r.steps} | {r.note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=Path, required=True, help="built OUT folder (Kaggle train for real numbers)")
    parser.add_argument("--out", type=Path, default=Path("bench_gpu.json"), help="JSON results")
    parser.add_argument("--archs", default=",".join(ARCHS), help="comma-separated archs")
    parser.add_argument("--batches", default="256,512", help="comma-separated batch sizes")
    parser.add_argument("--seconds", type=float, default=6.0, help="timed seconds per case")
    parser.add_argument("--warmup", type=int, default=15, help="untimed steps per case (autotuning, compile)")
    parser.add_argument("--max-steps", type=int, default=10_000, help="timed steps per case at most")
    parser.add_argument("--budget", type=float, default=270.0, help="start no case after this many seconds")
    parser.add_argument("--device", default="cuda", help="cuda (the point) or cpu")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile cases")
    parser.add_argument("--smoke", action="store_true", help="CPU, batch 8, 1 warmup + 1 timed step, no compile")
    args = parser.parse_args(argv)
    if args.smoke:
        args.device, args.batches, args.warmup, args.max_steps, args.seconds, args.no_compile = "cpu", "8", 1, 1, \
            float("inf"), True
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke (CPU) to check the script", file=sys.stderr)
        return 2
    archs = tuple(a for a in args.archs.split(",") if a)
    batches = tuple(int(b) for b in args.batches.split(","))
    began, results = time.perf_counter(), []
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        for i, case in enumerate(cases(archs, batches, not args.no_compile)):
            if time.perf_counter() - began > args.budget:
                results.append(Result(case, note=f"skipped: past the {args.budget:.0f}s budget"))
                continue
            bench = bench_train if case.kind == "train" else bench_predict
            results.append(bench(case, args, Path(tmp) / f"case-{i}"))
            print(markdown(results[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    table = markdown(results)
    device = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    payload = {"device": device, "torch": torch.__version__, "smoke": args.smoke,
               "seconds": round(time.perf_counter() - began, 1),
               "results": [{**asdict(r.case), **{k: v for k, v in asdict(r).items() if k != "case"}} for r in results]}
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(table)
    print(f"\n{device}, torch {torch.__version__}, {payload['seconds']}s; JSON in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
