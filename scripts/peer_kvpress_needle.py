"""Needle retrieval, obcache against kvpress, on the same prompts, paired sample by sample.

    python scripts/peer_kvpress_needle.py --kvpress-python /tmp/kvenv/bin/python     # (setup: peer_kvpress.py)
    python scripts/peer_kvpress_needle.py --kvpress-python ... --query-agnostic --out runs/peer-kvpress-agnostic

Query-aware (default): the question is compressed with the context. Query-agnostic: the context alone is
compressed, then the question is fed on the compressed cache (kvpress's pipeline: at positions after the
context).

SmolLM2-135M, float32: 24 samples of `niah_single_number` at 2048 tokens (a 7-digit value), each prompt
built by obcache (chat template, question, answer prefix) and fed as the same token ids to both
libraries; greedy answers of up to 12 tokens; counted over the samples the full cache answers. The two
sides run at once, one thread each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

REMOVED = (0.5, 0.8, 0.9)
NEW_TOKENS = 12


def kvpress_configs(removed: float, agnostic: bool) -> dict:
    from kvpress import AdaKVPress, ChunkKVPress, ExpectedAttentionPress, SnapKVPress, TOVAPress

    if agnostic:  # the presses the probe tried without the question
        return {
            "kvpress snapkv": lambda: SnapKVPress(compression_ratio=removed),
            "kvpress tova": lambda: TOVAPress(compression_ratio=removed),
            "kvpress expected attention": lambda: ExpectedAttentionPress(compression_ratio=removed),
        }
    return {
        "kvpress snapkv": lambda: SnapKVPress(compression_ratio=removed),
        "kvpress adakv(snapkv)": lambda: AdaKVPress(SnapKVPress(compression_ratio=removed)),
        "kvpress tova": lambda: TOVAPress(compression_ratio=removed),
        "kvpress chunkkv(snapkv)": lambda: ChunkKVPress(SnapKVPress(compression_ratio=removed), chunk_length=8),
    }


def obcache_configs(removed: float, agnostic: bool) -> dict:
    import obcache

    kept = round(1 - removed, 6)
    if agnostic:
        return {  # head-level KVzip rates the heads once per model (and process); every budget reuses the rating
            "obcache kvzip-heads": lambda: obcache.KVzipHeads(score="attention", budget=kept),
            "obcache recommended (obc-key)": lambda: obcache.recommended(budget=kept, score="obc-key"),
        }
    return {
        "obcache recommended (obc-key)": lambda: obcache.recommended(budget=kept, score="obc-key"),
        "obcache recommended (attention)": lambda: obcache.recommended(budget=kept, score="attention"),
        "obcache snapkv (paper)": lambda: obcache.SnapKV(budget=kept, score="attention"),
    }


def answer_kvpress(model, tokenizer, ids: list[int], rest: list[int], press, eos: set[int]) -> list[int]:
    from contextlib import nullcontext

    from transformers import DynamicCache

    cache, prompt = DynamicCache(), torch.tensor([ids])
    with (press(model) if press else nullcontext()), torch.no_grad():
        hidden = model.model(input_ids=prompt, past_key_values=cache).last_hidden_state[:, -1:]
    logits = model.lm_head(hidden)
    with torch.no_grad():  # as kvpress's pipeline: every later token at its position after the compressed prompt
        if rest:
            positions = torch.arange(len(ids), len(ids) + len(rest))[None]
            logits = model(input_ids=torch.tensor([rest]), past_key_values=cache, position_ids=positions).logits
        token, start, out = logits[:, -1:].argmax(-1), len(ids) + len(rest), []
        for i in range(NEW_TOKENS):
            if int(token) in eos:
                break
            out.append(int(token))
            position = torch.tensor([[start + i]])
            token = model(input_ids=token, past_key_values=cache, position_ids=position).logits[:, -1:].argmax(-1)
    return out


def answer_obcache(model, tokenizer, ids: list[int], rest: list[int], policy, eos: set[int]) -> list[int]:
    import obcache
    from obcache.generation import continue_greedy, forward_tokens

    cache = obcache.EvictableCache(config=model.config)
    with obcache.attach(model, policy, tokenizer=tokenizer), torch.no_grad():
        logits = forward_tokens(model, cache, ids)
        return continue_greedy(model, cache, logits, rest, eos=eos, max_new_tokens=NEW_TOKENS)


def run_side(side: str, prompts_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    prompts = json.load(open(prompts_file))
    eos, agnostic = set(prompts["eos"]), prompts["agnostic"]
    if side == "kvpress":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from peer_kvpress import model_path

        model = AutoModelForCausalLM.from_pretrained(model_path(), dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_path())
        configs, answer = kvpress_configs, answer_kvpress
    else:
        import obcache

        model, tokenizer = obcache.load_model()
        configs, answer = obcache_configs, answer_obcache
    done = set()
    if os.path.exists(out_file):
        done = {(r["config"], r["removed"], r["sample"]) for r in map(json.loads, open(out_file))}
    with open(out_file, "a") as out:
        for sample, (ids, rest) in enumerate(zip(prompts["ids"], prompts["rest"])):
            jobs = [("full cache", 0.0, None)] if side == "obcache" else []
            jobs += [(name, removed, make) for removed in REMOVED for name, make in configs(removed, agnostic).items()]
            for name, removed, make in jobs:
                if (name, removed, sample) not in done:
                    tokens = answer(model, tokenizer, ids, rest, make() if make else None, eos)
                    out.write(json.dumps({"config": name, "removed": removed, "sample": sample, "tokens": tokens}) + "\n")
                    out.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kvpress-python", help="the python of an environment with kvpress (see peer_kvpress.py)")
    parser.add_argument("--samples", type=int, default=24)
    parser.add_argument("--query-agnostic", action="store_true", help="compress the context alone, then ask")
    parser.add_argument("--out", default="runs/peer-kvpress-needle")
    parser.add_argument("--side", choices=("obcache", "kvpress"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    prompts_file = os.path.join(args.out, "prompts.json")
    if args.side:
        run_side(args.side, prompts_file, os.path.join(args.out, f"{args.side}.jsonl"))
        return 0
    if not args.kvpress_python:
        parser.error("--kvpress-python is required (kvpress needs its own environment, see peer_kvpress.py)")
    import obcache
    from obcache.evaluation.tasks import make_sample
    from obcache.generation import build_prompt

    tokenizer = obcache.load_tokenizer()
    samples = [make_sample("niah_single_number", tokenizer, 2048, seed=seed) for seed in range(args.samples)]
    ids, rest = [], []
    for s in samples:
        context, question = build_prompt(tokenizer, s.context, s.question, answer_prefix=s.answer_prefix)
        ids.append(context if args.query_agnostic else context + question)
        rest.append(question if args.query_agnostic else [])
    os.makedirs(args.out, exist_ok=True)
    eos = [tokenizer.eos_token_id] + ([tokenizer.convert_tokens_to_ids("<|im_end|>")] if "<|im_end|>" in tokenizer.get_vocab() else [])
    json.dump({"ids": ids, "rest": rest, "eos": eos, "agnostic": args.query_agnostic}, open(prompts_file, "w"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error",
           "PYTHONPATH": os.path.dirname(os.path.abspath(__file__))}
    sides = [subprocess.Popen([python, __file__, "--side", side, "--out", args.out], env=env,
                              stderr=subprocess.DEVNULL)
             for side, python in (("obcache", sys.executable), ("kvpress", args.kvpress_python))]
    if any(side.wait() for side in sides):
        print("a side failed; rerun to resume", file=sys.stderr)
        return 1
    report(args.out, samples, tokenizer, args.query_agnostic)
    return 0


def report(folder: str, samples, tokenizer, agnostic: bool) -> None:
    from obcache.evaluation.stats import sign_test, wilson
    from obcache.evaluation.tasks import score_prediction

    right: dict = {}
    for side in ("obcache", "kvpress"):
        for row in map(json.loads, open(os.path.join(folder, f"{side}.jsonl"))):
            text = tokenizer.decode(row["tokens"], skip_special_tokens=True)
            right[(row["config"], row["removed"], row["sample"])] = score_prediction(samples[row["sample"]], text) == 1.0
    answered = [s for s in range(len(samples)) if right[("full cache", 0.0, s)]]
    configs = sorted({c for c, r, _ in right if r}, key=lambda c: (not c.startswith("obcache"), c))
    reference = "obcache global(kvzip[heads])" if agnostic else "obcache recommended (obc-key)"
    mode = "query-agnostic" if agnostic else "query-aware"
    print(f"SmolLM2-135M, 2048 tokens, {mode}, {len(samples)} samples; counted over the {len(answered)} the "
          f"full cache answers; p: sign test on the discordant pairs against {reference}")
    print("| configuration | " + " | ".join(f"{r:.0%} removed" for r in REMOVED) + " |")
    print("|---|" + "---:|" * len(REMOVED))
    for config in configs:
        cells = []
        for removed in REMOVED:
            hits = [right[(config, removed, s)] for s in answered]
            low, high = wilson(sum(hits), len(hits))
            cell = f"{sum(hits)}/{len(hits)} [{low:.0%}, {high:.0%}]"
            if config != reference:
                ours = [right[(reference, removed, s)] for s in answered]
                wins = sum(o and not h for o, h in zip(ours, hits))
                losses = sum(h and not o for o, h in zip(ours, hits))
                p = sign_test(wins, losses)
                cell += " p<0.001" if p < 0.001 else f" p={p:.3f}"
            cells.append(cell)
        print(f"| {config} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
