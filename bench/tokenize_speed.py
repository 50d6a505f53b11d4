"""Seconds to tokenize the default mixture's splits: as far as the mixture reads each domain, against all of it.

A mixture takes as many tokens from every domain as its smallest holds (``bayesprune.inputs.data.tokenize``),
so the library tokenizes each domain's documents only that far. ``whole`` tokenizes every document first, as
before; both must give the same token streams.

    .venv/bin/python bench/tokenize_speed.py          # ≈ 1 min
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from common import write_results

import bayesprune as bp
from bayesprune.inputs import data


def whole(tokenizer, documents: list[data.Document]) -> torch.Tensor:
    """Every document of every domain tokenized, then the balanced stream cut from them."""
    streams = [torch.tensor([i for d in group for i in tokenizer(d.text, add_special_tokens=False)["input_ids"]
                             + [tokenizer.eos_token_id]]) for group in data._by_domain(documents).values()]
    shortest = min(s.numel() for s in streams)
    chunk = min(data.MIXTURE_CHUNK, shortest)
    return torch.cat([s[i * chunk:(i + 1) * chunk] for i in range(shortest // chunk) for s in streams])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results/tokenize_speed.json")
    args = parser.parse_args()
    _, tokenizer = bp.load_model()
    splits = data.split_corpus(bp.DataConfig())
    rows = []
    for name, documents in splits.items():
        seconds, streams = {}, {}
        for way, call in (("as_far_as_read", data.tokenize), ("whole", whole)):
            started = time.perf_counter()
            streams[way] = call(tokenizer, documents)
            seconds[way] = time.perf_counter() - started
        rows.append({"split": name, "tokens": streams["whole"].numel(),
                     "characters": sum(len(d.text) for d in documents), "seconds": seconds,
                     "speed_up": seconds["whole"] / seconds["as_far_as_read"],
                     "same": torch.equal(streams["whole"], streams["as_far_as_read"])})
        print(rows[-1], flush=True)
    write_results({"rows": rows, "how": "one process, each split one way then the other; the default model's "
                   "tokenizer", "machine": platform.platform(), "processor": platform.processor()}, args.out)


if __name__ == "__main__":
    main()
