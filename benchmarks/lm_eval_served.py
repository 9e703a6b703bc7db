"""lm-eval's ``local-completions`` model against a served job, checked against ``offsite eval``.

1. ``offsite eval --settings plug_in`` tunes an adapter on the emulator and scores the plug-in
   (the full model with that adapter) on the first ``--rows`` rows of a multiple-choice task; or
   ``--job`` names such a run already done (its ``adapter.safetensors`` and ``report/report.json``).
2. The same rows are scored again by the functions ``offsite eval`` uses (``plug_in_update`` +
   ``score_rows``), keeping each choice's log-likelihood.
3. ``offsite cloud serve --add job=ADAPTER`` serves the adapter, in its own process.
4. ``lm_eval --model local-completions`` scores the same rows through the server, as a local task
   (a YAML over a JSONL of those rows, ``target_delimiter: ""`` since our choices carry their
   leading space), offline (``HF_*_OFFLINE=1``; the tokenizer is the served model's directory).
5. Printed: both accuracies, how many rows' predictions agree, the largest difference between a
   choice's log-likelihood from lm-eval and from offsite's scorer.

lm-eval is an optional extra: ``pip install -e '.[lmeval]'``. CPU heavy on the real model: one run.

    .venv/bin/python benchmarks/lm_eval_served.py --task hyperbaton --rows 200 --out runs/lm-eval-served
    .venv/bin/python benchmarks/lm_eval_served.py --job runs/my-eval --rows 200 --out runs/lm-eval-served
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from offsite.cloud.combine import read_reports
from offsite.cloud.evaluate import score_rows
from offsite.cloud.models import load_base, resolve_model_dir
from offsite.cloud.plugin import plug_in_update
from offsite.emulator.data import read_test_rows
from offsite.protocol.adapter import load_update

REPO = Path(__file__).resolve().parents[1]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1"}
TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {rows}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def run(command: list[str], log: Path, env: dict | None = None) -> None:
    print("$ " + " ".join(command), flush=True)
    with open(log, "w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=os.environ | (env or {}))
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}); the end of {log}:\n" + log.read_text()[-3000:])


def offsite_eval(args, out: Path) -> Path:
    """``offsite eval --settings plug_in`` on the first ``--rows`` rows (unless ``--job`` is given)."""
    if args.job:
        return args.job
    job = out / "eval"
    run(
        [
            sys.executable,
            "-m",
            "offsite.cli",
            "eval",
            "--task",
            args.task,
            "--settings",
            "plug_in",
            "--test-rows",
            str(args.rows),
            "--steps",
            str(args.steps),
            "--out",
            str(job),
        ],
        out / "offsite-eval.log",
        {"OMP_NUM_THREADS": str(args.threads)},
    )
    return job


def offsite_scores(job: Path, rows) -> tuple[float, list[list[float]]]:
    """The plug-in's accuracy and per-choice log-likelihoods, by the functions ``offsite eval`` uses."""
    meta = json.loads((job / "job.json").read_text())
    base, tokenizer, _ = load_base(meta["model"])
    update, info = load_update(job / "adapter.safetensors")
    adapter_blocks = sorted({int(key.split(".")[1]) for key in update})
    plugged = plug_in_update(base, update, adapter_blocks, info.get("lora_alpha"), info.get("plugin_gain", 1.0))
    result = score_rows(plugged, tokenizer, rows, 16, progress=False)
    return result.accuracy, result.scores


def serve(job: Path, out: Path, threads: int) -> tuple[subprocess.Popen, str, str]:
    meta = json.loads((job / "job.json").read_text())
    log = out / "serve.log"
    command = [
        sys.executable,
        "-m",
        "offsite.cli",
        "cloud",
        "serve",
        "--model",
        meta["model"],
        "--registry",
        str(out / "registry"),
        "--add",
        f"job={job / 'adapter.safetensors'}",
        "--replace",
        "--port",
        "0",
        "--grpc-port",
        "-1",
        "--threads",
        str(threads),
        "--no-access-log",
    ]
    print("$ " + " ".join(command), flush=True)
    with open(log, "w") as handle:
        process = subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO, env=os.environ | {"PYTHONUNBUFFERED": "1"}
        )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if line.startswith("http: "):
                return process, line.split()[1], meta["model"]
        if process.poll() is not None:
            raise SystemExit(f"the server exited:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    process.terminate()
    raise SystemExit("the server did not start")


def lm_eval(url: str, model: str, rows_file: Path, out: Path, args) -> tuple[float, list[list[float]]]:
    """lm-eval's acc and each row's per-choice log-likelihoods (from its logged samples)."""
    tasks = out / "tasks"
    tasks.mkdir(exist_ok=True)
    name = f"offsite_{args.task}_{args.rows}"
    (tasks / f"{name}.yaml").write_text(TASK_YAML.format(name=name, rows=rows_file.resolve()))
    tokenizer = resolve_model_dir(model)
    # add_bos_token: offsite eval encodes each prompt with the tokenizer's special tokens (lm-eval's HF
    # convention for the context); SmolLM2's tokenizer prepends <|im_start|> then, and local-completions
    # only does so with add_bos_token=True (without it every log-likelihood differs: 0.19 nats on average)
    model_args = (
        f"model=job,base_url={url}/v1/completions,tokenizer={tokenizer},tokenizer_backend=huggingface,"
        f"tokenized_requests=True,add_bos_token=True,num_concurrent=1,max_retries=1,timeout=600"
    )
    results = out / "lm_eval"
    run(
        [
            "lm_eval",
            "--model",
            "local-completions",
            "--model_args",
            model_args,
            "--tasks",
            name,
            "--include_path",
            str(tasks),
            "--batch_size",
            str(args.batch_size),
            "--output_path",
            str(results),
            "--log_samples",
        ],
        out / "lm-eval.log",
        OFFLINE
        | {
            "OMP_NUM_THREADS": str(args.threads),
            "OPENAI_API_KEY": "none",
            "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"],
        },
    )
    [result_file] = sorted(results.rglob("results_*.json"))[-1:]
    accuracy = json.loads(result_file.read_text())["results"][name]["acc,none"]
    [samples_file] = sorted(results.rglob(f"samples_{name}_*.jsonl"))[-1:]
    samples = sorted(
        (json.loads(line) for line in samples_file.read_text().splitlines() if line.strip()), key=lambda s: s["doc_id"]
    )
    return accuracy, [[float(choice[0]) for choice in sample["filtered_resps"]] for sample in samples]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="hyperbaton", help="an MC task shipped in data/ (for offsite eval)")
    parser.add_argument("--rows", type=int, default=200, help="the first N test rows")
    parser.add_argument("--job", type=Path, default=None, help="an `offsite eval` run to use instead of running one")
    parser.add_argument("--steps", type=int, default=40, help="offsite eval's tuning steps (when it runs here)")
    parser.add_argument("--batch-size", type=int, default=16, help="lm-eval's requests per API call")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    job = offsite_eval(args, args.out)
    [report] = read_reports(job / "report" / "report.json")
    reported = report.value("plug_in")
    test = Path(json.loads((job / "job.json").read_text())["test"])
    _, rows = read_test_rows(test, limit=args.rows)
    rows_file = args.out / f"rows-{args.rows}.jsonl"
    rows_file.write_text(
        "".join(json.dumps({"prompt": r.prompt, "choices": list(r.choices), "answer": r.answer}) + "\n" for r in rows)
    )
    ours, our_scores = offsite_scores(job, rows)
    process, url, model = serve(job, args.out, args.threads)
    try:
        theirs, their_scores = lm_eval(url, model, rows_file, args.out, args)
    finally:
        process.terminate()
        process.wait(60)
    differences = [abs(a - b) for mine, other in zip(our_scores, their_scores) for a, b in zip(mine, other)]
    agree = sum(
        max(range(len(m)), key=m.__getitem__) == max(range(len(o)), key=o.__getitem__)
        for m, o in zip(our_scores, their_scores)
    )
    summary = {
        "task": args.task,
        "rows": len(rows),
        "offsite_eval_plug_in_accuracy": reported,
        "offsite_rescored_accuracy": ours,
        "lm_eval_acc": theirs,
        "predictions_agree": agree,
        "max_abs_loglik_difference": max(differences),
        "mean_abs_loglik_difference": sum(differences) / len(differences),
        "seconds": round(time.perf_counter() - started),
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    if abs(theirs - reported) > 1e-9 or agree != len(rows):
        raise SystemExit("lm-eval's accuracy through the server differs from offsite eval's plug-in accuracy")


if __name__ == "__main__":
    main()
