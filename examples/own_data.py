"""Fit bora on your own JSONL file (one document per line, a text and a task column).

    python examples/own_data.py --data my.jsonl --text-column text --task-column customer
    python examples/own_data.py                 # writes a demo JSONL of four Shakespeare speakers
    python examples/own_data.py --tiny --steps 3   # seconds: a random-init tiny model (smoke test)

Prints per-task test perplexity of the base model and of the fit, and the learned tau.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def write_demo_jsonl(path: Path) -> Path:
    from bora import load_shakespeare

    tasks = ("hamlet/HAMLET", "macbeth/LADY MACBETH", "julius-caesar/PORTIA", "hamlet/Ghost")
    with open(path, "w") as f:
        for d in load_shakespeare(tasks):
            f.write(json.dumps({"text": d["text"], "speaker": d["task"]}) + "\n")
    return path


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=None, help="JSONL file (default: a demo file of Shakespeare speakers)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--task-column", default="speaker")
    p.add_argument("--model", default="smollm2", help="base model ('smollm2', a folder, or a hub name)")
    p.add_argument("--tau-mode", default="learned", choices=["learned", "fixed", "uncoupled", "shared"])
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (default: 2 epochs)")
    p.add_argument("--tiny", action="store_true", help="use a tiny random-init model (seconds; for smoke tests)")
    p.add_argument("--output", type=Path, default=None, help="save the fit here")
    args = p.parse_args(argv)

    from bora import AdapterConfig, Bora, BoraConfig, DataConfig, FitConfig, PriorConfig, format_table

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or write_demo_jsonl(Path(tmp) / "demo.jsonl")
        lm = tok = None
        layers = (-2, -1)
        if args.tiny:
            from bora import tiny_model

            lm, tok = tiny_model(layers=2)
            layers = (-1,)
        config = BoraConfig(
            model=args.model,
            adapter=AdapterConfig(rank=4, targets=("q_proj", "v_proj"), layers=layers),
            prior=PriorConfig(tau_mode=args.tau_mode),
            fit=FitConfig(epochs=2, steps=args.steps, batch_size=8),
            data=DataConfig(source=str(data), text_column=args.text_column, task_column=args.task_column,
                            max_length=48),
        )
        bora, splits = Bora.from_config(config, lm=lm, tokenizer=tok)
        feeds = {k: bora.feed(v) for k, v in splits.items()}
        base = bora.evaluate(feeds["test"], base=True)
        bora.fit(feeds["train"], feeds["val"], progress=not args.tiny)
        fitted = bora.evaluate(feeds["test"])
        print(format_table(base, fitted))
        print("tau:", bora.tau_estimate())
        if args.output:
            bora.save(args.output)
    return {"base": base, "fit": fitted, "tau": bora.tau_estimate()}


if __name__ == "__main__":
    main()
