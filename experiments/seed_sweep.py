"""Start an `offsite sweep` from an `offsite eval` of the same recipe on the same rows.

An eval job measured all five settings of one emulator; a sweep on the same task, rows, tuning and
model would measure its full zero-shot, full FT and that emulator again (on jargon_entries: 38 + 26
minutes on one core). This writes those measurements as the sweep's first records, with the eval's
tuned adapter, so the sweep measures only the other emulators. It refuses an eval that was run with
another tuning, task or test file than the sweep would use.

    python experiments/seed_sweep.py runs/final/jargon-s0 runs/sweep-jargon 2-10-2/kd60 --task jargon_entries
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

from offsite.cloud.presets import get_preset
from offsite.emulator.tune import recorded_tuning
from offsite.harness.pipeline import task_files
from offsite.harness.sweep import BASELINES, EMULATOR_SETTINGS, adapter_name, parse_emulator, slug
from offsite.protocol.adapter import load_update
from offsite.protocol.bundle import read_bundle, sha256_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("eval_job", type=Path, help="an `offsite eval --out` directory (all five settings)")
    parser.add_argument("sweep", type=Path, help="the sweep's --out directory (must not hold records yet)")
    parser.add_argument("emulator", help="the sweep's name for the eval's emulator, e.g. 2-10-2/kd60")
    parser.add_argument("--task", required=True)
    parser.add_argument("--preset", default="smollm2-135m/default")
    args = parser.parse_args()

    (report,) = json.loads((args.eval_job / "report" / "report.json").read_text())
    meta, results = report["meta"], report["results"]
    preset = get_preset(args.preset)
    emulator = parse_emulator(args.emulator, preset)
    tune = dataclasses.asdict(preset.tune)
    _, test = task_files(args.task)
    checks = {
        "task": (report["task"], args.task),
        "tuning": (recorded_tuning(meta["tune"]), tune),
        "test file": (meta["test_sha256"], sha256_file(test)),
        "emulator": (meta["bundle_digest"], read_bundle(args.eval_job / "bundle").digest),
        "plug-in gain": (meta["plugin_gain"], emulator.plugin_gain),
        "settings": (sorted(results), sorted(BASELINES + EMULATOR_SETTINGS)),
    }
    for what, (got, want) in checks.items():
        if got != want:
            raise SystemExit(f"{args.eval_job}: its {what} is not the sweep's ({got!r} != {want!r})")
    if (args.sweep / "sweep.jsonl").exists():
        raise SystemExit(f"{args.sweep / 'sweep.jsonl'} exists: seed only a new sweep")

    identity = {
        "task": args.task,
        "rows": report["test_rows"],
        "val_rows": 0,
        "tune": tune,
        "test_sha256": meta["test_sha256"],
        "model": None,
    }
    digest = {"bundle_digest": meta["bundle_digest"]}
    baselines = identity | {
        "cut": f"{emulator.shape.a}+{emulator.shape.b}",
        "what": "baselines",
        "results": {k: results[k] for k in BASELINES},
        "meta": {"full_tuning": meta["full_tuning"]} | digest,
    }
    measured = {k: meta[k] for k in ("middle_nmse_at_answer", "emulator_tuning")}
    record = identity | {
        "emulator": emulator.name,
        "what": "emulator",
        "results": {k: results[k] for k in EMULATOR_SETTINGS},
        "meta": measured | digest,
    }
    _, adapter_meta = load_update(args.eval_job / "adapter.safetensors")
    if adapter_meta.get("bundle") != meta["bundle_digest"]:
        raise SystemExit(f"{args.eval_job / 'adapter.safetensors'} was tuned on another emulator")
    (args.sweep / "adapters").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(
        args.eval_job / "adapter.safetensors",
        args.sweep / "adapters" / f"{slug(adapter_name(emulator.name))}.safetensors",
    )
    with open(args.sweep / "sweep.jsonl", "w") as handle:
        for line in (baselines, record):
            handle.write(json.dumps(line) + "\n")
    print(f"{args.sweep / 'sweep.jsonl'}: baselines ({baselines['cut']}) and {emulator.name} from {args.eval_job}")


if __name__ == "__main__":
    main()
