"""Helpers for `train_tasks.py`: a training loop with a progress bar, loss plots."""

import os
import sys
import time

import numpy as np

PLAIN_REPORTS = 5  # Progress lines per loop when stdout is not a terminal.


def shown(path: str) -> str:
    """`path` relative to the working directory when it is below it."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def run_steps(step, state, steps: int, label: str):
    """Runs ``state, loss = step(state, i)`` for i < steps, showing progress.

    Returns:
      (final state, per-step losses, per-step wall times in seconds).
    """
    losses, times = [], []
    if sys.stdout.isatty():
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TimeRemainingColumn,
        )

        with Progress(
            "{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            "{task.fields[loss]}",
        ) as bar:
            job = bar.add_task(f"{label:16}", total=steps, loss="")
            for i in range(steps):
                state = _timed(step, state, i, losses, times)
                bar.update(job, advance=1, loss=f"loss {losses[-1]:.3f}")
        return state, losses, times
    every = max(1, steps // PLAIN_REPORTS)
    for i in range(steps):
        state = _timed(step, state, i, losses, times)
        if (i + 1) % every == 0 or i + 1 == steps:
            print(f"{label:16} step {i + 1:5d}/{steps}  loss {losses[-1]:.3f}", flush=True)
    return state, losses, times


def _timed(step, state, i, losses, times):
    t0 = time.perf_counter()
    state, loss = step(state, i)
    losses.append(float(loss))  # waits for the step to finish
    times.append(time.perf_counter() - t0)
    return state


def plot_losses(base_losses, adapter_losses: dict, path: str):
    """Writes base and per-adapter loss curves to `path` (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("loss curves: skipped (pip install matplotlib to draw them)")
        return
    panels = [("base: full fine-tuning on copy", {"base": base_losses})] if base_losses else []
    panels.append(("LoRA adapters over the frozen base", adapter_losses))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (title, curves) in zip(axes[0], panels):
        for name, losses in curves.items():
            ax.plot(np.arange(1, len(losses) + 1), losses, label=name, linewidth=1)
        ax.set(title=title, xlabel="step", ylabel="answer loss", yscale="log")
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"loss curves: {shown(path)}")
