"""Peak host memory of loading a quantized checkpoint, against the file's size.

Writes a block-FP8 checkpoint (``--tensors`` weights of ``--size`` x ``--size``
float8_e4m3fn with their ``weight_scale_inv``) and an NF4 bitsandbytes one of the same
weights, then loads each in a fresh process and reports the peak RSS over the RSS after
``import jax, jlora`` (``VmHWM``, reset then through ``/proc/self/clear_refs``), three
processes each, medians:

- ``jlora.load_quantized`` / ``jlora.load_bitsandbytes``: each tensor memory-mapped and
  made a device array one at a time;
- the read-everything-first way the loaders had before (``safetensors`` reads the whole
  file into host arrays, then each becomes a device array), for the NF4 file (the only
  one ``safetensors.numpy`` reads).

On the CPU backend the loaded arrays live in host memory too, so the floor is 1x the
file. Run from the repo root: ``python benchmarks/load_rss.py`` (writes
``benchmarks/results/load_rss.md``).
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import sys
import jax, jax.numpy as jnp, jlora, safetensors.numpy
def status(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field)) * 1024
with open("/proc/self/clear_refs", "w") as f:  # the peak (VmHWM) starts again from here
    f.write("5")
before = status("VmRSS")
how, path = sys.argv[1], sys.argv[2]
if how == "eager":  # everything read first, then each array made
    host = safetensors.numpy.load_file(path)
    tree = {k: jnp.asarray(v) for k, v in host.items()}
else:
    tree = getattr(jlora, how)(path)
jax.block_until_ready(jax.tree.leaves(tree))
print(status("VmHWM") - before)
"""


def write(folder: str, tensors: int, size: int) -> dict:
    import json

    import numpy as np
    import safetensors.torch
    import torch

    import jlora

    fp8, nf4 = {}, {}
    for i in range(tensors):
        w = torch.randn(size, size, generator=torch.Generator().manual_seed(i))
        fp8[f"layers.{i}.weight"] = (w / 0.01).clamp(-448, 448).to(torch.float8_e4m3fn)
        fp8[f"layers.{i}.weight_scale_inv"] = torch.full((-(-size // 128),) * 2, 0.01)
        q = jlora.quantize({"w": w.numpy()}, double_quant=False)["w"]
        nf4[f"layers.{i}.weight"] = torch.from_numpy(np.asarray(q.packed)[:, None])
        nf4[f"layers.{i}.weight.absmax"] = torch.from_numpy(np.asarray(q.absmax))
        nf4[f"layers.{i}.weight.quant_map"] = torch.tensor(jlora._src.numerics.quant.NF4_CODE)
        state = {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [size] * 2}
        nf4[f"layers.{i}.weight.quant_state.bitsandbytes__nf4"] = torch.frombuffer(
            bytearray(json.dumps(state).encode()), dtype=torch.uint8
        )
    paths = {"fp8": os.path.join(folder, "fp8.safetensors")}
    paths["nf4"] = os.path.join(folder, "nf4.safetensors")
    safetensors.torch.save_file(fp8, paths["fp8"])
    safetensors.torch.save_file(nf4, paths["nf4"])
    return paths


def peak(how: str, path: str, runs: int) -> list[int]:
    out = []
    for _ in range(runs):
        res = subprocess.run(
            [sys.executable, "-c", CHILD, how, path], capture_output=True, text=True, check=True
        )
        out.append(int(res.stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tensors", type=int, default=16)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results", "load_rss.md")
    )
    args = parser.parse_args()
    mb = 2**20
    with tempfile.TemporaryDirectory() as folder:
        paths = write(folder, args.tensors, args.size)
        rows = []
        for label, how, kind in (
            ("block FP8, `load_quantized`", "load_quantized", "fp8"),
            ("NF4, `load_quantized`", "load_quantized", "nf4"),
            ("NF4, `load_bitsandbytes`", "load_bitsandbytes", "nf4"),
            ("NF4, whole file read first", "eager", "nf4"),
        ):
            size = os.path.getsize(paths[kind])
            got = peak(how, paths[kind], args.runs)
            med = statistics.median(got)
            rows.append(
                f"| {label} | {size / mb:.0f} | {med / mb:.0f} ({min(got) / mb:.0f}-"
                f"{max(got) / mb:.0f}) | {med / size:.2f} |"
            )
    lines = [
        f"`python benchmarks/load_rss.py` ({args.tensors} weights of {args.size} x "
        f"{args.size}; peak RSS over the RSS after import, median (min-max) of "
        f"{args.runs} processes)",
        "",
        "| checkpoint, loader | file MB | peak RSS added MB | / file |",
        "|---|---|---|---|",
        *rows,
    ]
    text = "\n".join(lines)
    print(text)
    with open(args.out, "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
