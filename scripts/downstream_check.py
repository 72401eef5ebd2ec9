# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The measuring half of scripts/downstream_check.sh; each step runs in its own environment.

    prepare WORK PRESET   (project venv) testbed outputs, token windows, transformers' reference
    llama WORK            (llama.cpp venv) convert each output to GGUF and score it
    vllm WORK             (vLLM venv) load each output in vLLM's CPU build and score it
    report WORK           a table: perplexity and greedy tokens of each tool against transformers

Every tool scores the same token ids (tokenized once by the model's own tokenizer), on
non-overlapping windows of SEQ_LEN tokens whose first token is context only (what `eval`
computes), and continues the same prompts greedily for NEW_TOKENS tokens.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

SEQ_LEN, WINDOWS, PROMPTS, PROMPT_LEN, NEW_TOKENS = 128, 24, 6, 16, 16


def load(work: Path) -> dict:
    return json.loads((work / "reference.json").read_text())


def nll_of(logprob_rows, window) -> float:
    """Summed NLL of window[1:] given rows[i] = log p(. | window[:i+1])."""
    return -sum(float(logprob_rows[i][window[i + 1]]) for i in range(len(window) - 1))


def prepare(work: Path, preset: str) -> None:
    import torch
    import transformers
    from mergekit.options import MergeOptions

    from benchmarks.testbed import build_testbed
    from mergekit_moe2dense.build import build_dense
    from mergekit_moe2dense.config import Moe2DenseConfig

    testbed = build_testbed(preset)
    calibration = {"dataset": str(testbed.calib_dir), "num_samples": 64, "seq_len": SEQ_LEN, "batch_size": 8}
    variants = {
        "dense": ("router_weighted", {"refit": "down_proj"}),
        "moe_k2": ("kmeans_multi_dense", {"num_clusters": 2, "output": "moe"}),
    }
    models = {}
    for name, (method, parameters) in variants.items():
        out = work / "models" / name
        if not (out / "config.json").is_file():
            config = Moe2DenseConfig.model_validate(
                {
                    "merge_method": method,
                    "models": [{"model": str(testbed.moe)}],
                    "parameters": parameters,
                    "calibration": calibration,
                    "dtype": "float32",
                }
            )
            build_dense(config, str(out), MergeOptions(quiet=True), overwrite=True)
        models[name] = str(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(models["dense"])
    text = "".join(p.read_text(encoding="utf-8") for p in sorted(Path(testbed.test_dir).glob("*.txt")))
    stream = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
    windows = [stream[i : i + SEQ_LEN] for i in range(0, WINDOWS * SEQ_LEN, SEQ_LEN)]
    prompts = [windows[i][:PROMPT_LEN] for i in range(PROMPTS)]
    lines = [line for line in text.splitlines() if line.strip()][:50]
    reference = {
        "windows": windows,
        "prompts": prompts,
        "lines": lines,
        "hf_line_tokens": [tokenizer(line, add_special_tokens=False)["input_ids"] for line in lines],
        "models": models,
        "results": {},
    }
    for name, path in models.items():
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            nll = sum(nll_of(model(input_ids=torch.tensor([w])).logits[0].double().log_softmax(-1), w) for w in windows)
            greedy = []
            for prompt in prompts:
                ids = list(prompt)
                for _ in range(NEW_TOKENS):
                    ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
                greedy.append(ids[len(prompt) :])
        reference["results"][name] = {"transformers": {"nll": nll, "greedy": greedy}}
    (work / "reference.json").write_text(json.dumps(reference))


def llama(work: Path) -> None:
    import numpy as np
    from llama_cpp import Llama

    reference = load(work)
    converter = next(Path(sys.prefix).glob("src/llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    results = {}
    for name, path in reference["models"].items():
        gguf = work / f"{name}.gguf"
        # The testbeds' byte-level BPE tokenizers are trained here: their pre-tokenizer is GPT-2's
        # (ByteLevel, use_regex), but the converter recognises pre-tokenizers by the hash of known
        # vocabularies only, so it is told which one it is.
        patch = (
            "import sys, runpy; sys.path.insert(0, sys.argv[1].rsplit('/', 1)[0]); "
            "import conversion.base as b; b.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'gpt-2'; "
            "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
        )
        subprocess.run(
            [sys.executable, "-c", patch, str(converter), path, "--outfile", str(gguf), "--outtype", "f32"], check=True
        )
        llm = Llama(model_path=str(gguf), n_ctx=SEQ_LEN, n_batch=SEQ_LEN, logits_all=True, verbose=False, seed=0)
        nll = 0.0
        for window in reference["windows"]:
            llm.reset()
            llm.eval(window)
            logits = np.asarray(llm.scores[: len(window)], dtype=np.float64)
            logprobs = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
            nll += nll_of(logprobs, window)
        greedy = []
        for prompt in reference["prompts"]:
            llm.reset()
            llm.eval(prompt)
            out = []
            for _ in range(NEW_TOKENS):
                out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
                llm.eval([out[-1]])
            greedy.append(out)
        lines = [llm.tokenize(line.encode(), add_bos=False, special=False) for line in reference["lines"]]
        same = sum(a == b for a, b in zip(lines, reference["hf_line_tokens"]))
        results[name] = {"nll": nll, "greedy": greedy, "tokenizer_lines_equal": f"{same}/{len(lines)}"}
        del llm
    (work / "llama.json").write_text(json.dumps(results))


def vllm(work: Path) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    reference = load(work)
    results = {}
    for name, path in reference["models"].items():
        # a request needs room for one generated token after its prompt: a window fills the model's
        # positions (128 in the testbeds), so vLLM is allowed one more (VLLM_ALLOW_LONG_MAX_MODEL_LEN,
        # set by the script); that token is never used, only the prompt's log-probabilities are
        llm = LLM(model=path, dtype="float32", max_model_len=SEQ_LEN + 1, enforce_eager=True, seed=0)
        scored = llm.generate(
            [TokensPrompt(prompt_token_ids=w) for w in reference["windows"]],
            SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0),
        )
        nll = 0.0
        for window, output in zip(reference["windows"], scored):
            nll -= sum(output.prompt_logprobs[i][window[i]].logprob for i in range(1, len(window)))
        continued = llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in reference["prompts"]],
            SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True),
        )
        results[name] = {"nll": nll, "greedy": [list(o.outputs[0].token_ids) for o in continued]}
        del llm
    (work / "vllm.json").write_text(json.dumps(results))


def report(work: Path) -> None:
    reference = load(work)
    tokens = sum(len(w) - 1 for w in reference["windows"])
    tools = {}
    for tool in ("llama", "vllm"):
        path = work / f"{tool}.json"
        tools["llama.cpp" if tool == "llama" else "vLLM (CPU)"] = json.loads(path.read_text()) if path.is_file() else {}
    print(
        f"{tokens} tokens in {len(reference['windows'])} windows of {SEQ_LEN}; {len(reference['prompts'])} prompts x {NEW_TOKENS} greedy tokens"
    )
    print(
        "| model | tool | perplexity | transformers | relative difference | greedy tokens equal | tokenizer lines equal |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, result in reference["results"].items():
        hf = result["transformers"]
        hf_ppl = math.exp(hf["nll"] / tokens)
        for tool, runs in tools.items():
            run = runs.get(name)
            if run is None:
                print(f"| {name} | {tool} | not run | {hf_ppl:.4f} | - | - | - |")
                continue
            ppl = math.exp(run["nll"] / tokens)
            equal = sum(a == b for g, h in zip(run["greedy"], hf["greedy"]) for a, b in zip(g, h))
            total = sum(len(h) for h in hf["greedy"])
            lines = run.get("tokenizer_lines_equal", "-")
            print(
                f"| {name} | {tool} | {ppl:.4f} | {hf_ppl:.4f} | {ppl / hf_ppl - 1:+.2e} | {equal}/{total} | {lines} |"
            )


if __name__ == "__main__":
    step, work = sys.argv[1], Path(sys.argv[2])
    work.mkdir(parents=True, exist_ok=True)
    if step == "prepare":
        prepare(work, sys.argv[3])
    else:
        {"llama": llama, "vllm": vllm, "report": report}[step](work)
