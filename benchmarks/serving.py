"""Serving benchmarks, each a one-run comparison measured side by side:

- ``http``: the HTTP server (FastAPI on uvicorn) against the standard-library server it replaced,
  same requests through the official ``openai`` client, then 64 streaming clients over four jobs
  for 30 s with the server's RSS watched (benchmarks/serving_http.py);
- ``engine``: multi-job batched decoding against a single merged job and jobs served one after
  another (benchmarks/serving_engine.py).

    .venv/bin/python benchmarks/serving.py              # both, http first (about 10 minutes on 2 cores)
    .venv/bin/python benchmarks/serving.py http --clients 64 --seconds 30
    .venv/bin/python benchmarks/serving.py engine --jobs 1,4,8 --batch 16
"""

from __future__ import annotations

import sys

import serving_engine
import serving_http


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv and argv[0] == "engine":
        serving_engine.main(argv[1:])
        return 0
    if argv and argv[0] == "http":
        return serving_http.main(argv[1:])
    status = serving_http.main(argv)
    serving_engine.main([])
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
