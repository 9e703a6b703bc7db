"""Packed against float bundles of one quantised emulator: bytes on disk (what every data owner
downloads), the operator's write time and the data owner's verify and load times, side by side.

    make bench-bundle
    python benchmarks/bundle.py [--preset smollm2-135m/q34g16] [--runs 3] [--threads N]

What runs: the preset's base model (the embedded SmolLM2-135M by default; converted once and
cached, nothing downloaded) is cut into the preset's emulator and its middle rounded; the same
emulator is then written three times: every weight as floats (what bundles held before packing),
the rounded middle packed (``protocol/packed.py``), and that plus the weights the converted model
already holds on a GGUF grid (the embeddings and adapter shells; what ``write_bundle`` does by
default). For each it times ``write_bundle``, ``read_bundle`` (the sha256 of every file) and
``load_emulator`` (model build + unpacking), as the median of ``--runs``, and checks that all
three load to the same tensors, bit for bit. The preset's distillation, if any, is skipped: it
changes the weights, not the sizes or the timings.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def timed(fn, runs: int):
    times, result = [], None
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--preset",
        default="smollm2-135m/q34g16",
        help="a preset that quantises its middle (default smollm2-135m/q34g16)",
    )
    parser.add_argument("--runs", type=int, default=3, help="timed runs per step; the median is printed (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from offsite.cloud.models import load_base
    from offsite.cloud.prepare import cut_info
    from offsite.cloud.presets import get_preset
    from offsite.emulator.quantize import quantize_blocks
    from offsite.emulator.sandwich import build_emulator
    from offsite.protocol.bundle import load_emulator, read_bundle, write_bundle
    from offsite.protocol.packed import same_bits

    preset = get_preset(args.preset)
    if preset.quantize is None:
        parser.error(f"preset {preset.name} does not quantise its middle: nothing to pack")
    base, tokenizer, where = load_base(preset.base)
    shape = preset.shape
    emulator, layout = build_emulator(base, shape)
    middle = list(range(shape.a, len(layout) - shape.b))
    rounded = quantize_blocks(emulator, middle, preset.quantize)
    info = cut_info(base, shape, layout)
    print(
        f"{preset.name}: {where}, emulator {shape} with its middle rounded ({preset.quantize}), "
        f"{len(rounded)} weights, {sum(emulator.state_dict()[k].numel() for k in rounded) / 1e6:.1f} M values; "
        f"torch threads {torch.get_num_threads()}, median of {args.runs}"
    )

    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        variants = (
            ("floats", None, False),
            ("packed middle", rounded, False),
            ("packed middle + GGUF grids", rounded, True),
        )
        for label, packed, grids in variants:
            root = Path(scratch) / label.replace(" ", "-")
            write_s, bundle = timed(
                lambda: write_bundle(root, emulator, tokenizer, info, packed=packed, grids=grids), args.runs
            )
            read_s, bundle = timed(lambda: read_bundle(root), args.runs)
            load_s, model = timed(lambda: load_emulator(bundle), args.runs)
            rows[label] = (bundle.size, write_s, read_s, load_s, model.state_dict())
    floats = rows["floats"]
    print("\n| bundle | MiB | write s | verify s | load s |\n|---|---|---|---|---|")
    for label, (size, write_s, read_s, load_s, _) in rows.items():
        print(f"| {label} | {size / 2**20:.1f} | {write_s:.2f} | {read_s:.2f} | {load_s:.2f} |")
    same = True
    for label, (size, write_s, read_s, load_s, state) in list(rows.items())[1:]:
        equal = state.keys() == floats[4].keys() and all(same_bits(state[k], floats[4][k]) for k in state)
        same &= equal
        print(
            f"\n{label} / floats: size {size / floats[0]:.3f}, write {write_s / floats[1]:.2f}x, "
            f"verify {read_s / floats[2]:.2f}x, load {load_s / floats[3]:.2f}x; same tensors bit for bit: {equal}"
        )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
