# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Scale benchmark: calibration memory/throughput and merge speed on a generated MoE.

    python benchmarks/scale.py [--size-gb 4] [--tokens 512] [--cuda] [--engines full,layerwise] [--workdir DIR] [--keep]
    python benchmarks/scale.py --smoke          # a few MB, seconds: keeps the script working

1. Writes a random Mixtral-architecture checkpoint of about --size-gb on disk
   (bf16, legacy per-expert layout, 1 GB shards), one layer at a time, with a
   word-level tokenizer whose words map 1:1 to token ids.
2. Calibration: every available engine (`full`: transformers forward of the whole
   model with router hooks; `layerwise`: the layer-streaming engine) on the same
   tokens, through the library's `collect_statistics`. Tokens/s counts load + forward.
3. Merge: `mergekit-moe2dense` (expert_uniform, bf16 out) vs stock mergekit's
   `linear` merge of the same checkpoint (reads the same bytes), vs reading every
   shard once. The page cache is dropped for the checkpoint (posix_fadvise)
   before each, so each one reads from disk.

Every measurement runs in its own subprocess; its peak RSS is that child's
`ru_maxrss` from `os.wait4`. Figures and ratios are printed from this one run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GB = 1e9


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    experts: int
    vocab: int

    def layer_bytes(self) -> int:
        head_dim = self.hidden // self.heads
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim
        experts = self.experts * 3 * self.hidden * self.intermediate
        return 2 * (attention + experts + self.experts * self.hidden + 2 * self.hidden)

    def layers_for(self, size_bytes: float) -> int:
        fixed = 2 * (2 * self.vocab * self.hidden + self.hidden)
        return max(1, round((size_bytes - fixed) / self.layer_bytes()))


# Mixtral-8x7B's proportions (I = 3.5 H, 8 experts, GQA), scaled down.
FULL_SHAPE = Shape(hidden=1024, intermediate=3584, heads=16, kv_heads=8, experts=8, vocab=32000)
SMOKE_SHAPE = Shape(hidden=64, intermediate=224, heads=4, kv_heads=2, experts=4, vocab=512)


# -- checkpoint generation -------------------------------------------------------
def generate_checkpoint(path: Path, size_bytes: float, shape: Shape, seed: int = 0, shard_bytes: float = 1 * GB) -> int:
    """Writes config, tokenizer and shards; holds at most one shard in memory. Returns bytes written."""
    import torch
    import transformers
    from safetensors.torch import save_file

    layers = shape.layers_for(size_bytes)
    config = transformers.MixtralConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        num_local_experts=shape.experts,
        num_experts_per_tok=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    config.architectures = ["MixtralForCausalLM"]
    config.dtype = "bfloat16"
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    write_tokenizer(path, shape.vocab)

    generator = torch.Generator().manual_seed(seed)

    def randn(*size, std=0.02):
        return (torch.randn(*size, generator=generator) * std).to(torch.bfloat16)

    head_dim = shape.hidden // shape.heads
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    shards: list[dict[str, torch.Tensor]] = []

    def flush():
        nonlocal shard
        if shard:
            name = f"shard-{len(shards):05d}.safetensors"
            save_file(shard, os.fspath(path / name), metadata={"format": "pt"})
            weight_map.update({key: name for key in shard})
            shards.append({})
            shard = {}

    def add(name: str, tensor: torch.Tensor):
        if shard and sum(t.numel() * 2 for t in shard.values()) + tensor.numel() * 2 > shard_bytes:
            flush()
        shard[name] = tensor

    add("model.embed_tokens.weight", randn(shape.vocab, shape.hidden))
    for layer in range(layers):
        prefix = f"model.layers.{layer}"
        add(f"{prefix}.input_layernorm.weight", torch.ones(shape.hidden, dtype=torch.bfloat16))
        add(f"{prefix}.post_attention_layernorm.weight", torch.ones(shape.hidden, dtype=torch.bfloat16))
        for proj, rows in (("q", shape.hidden), ("k", shape.kv_heads * head_dim), ("v", shape.kv_heads * head_dim)):
            add(f"{prefix}.self_attn.{proj}_proj.weight", randn(rows, shape.hidden))
        add(f"{prefix}.self_attn.o_proj.weight", randn(shape.hidden, shape.hidden))
        moe = f"{prefix}.block_sparse_moe"
        add(f"{moe}.gate.weight", randn(shape.experts, shape.hidden, std=0.5))
        for e in range(shape.experts):
            add(f"{moe}.experts.{e}.w1.weight", randn(shape.intermediate, shape.hidden))
            add(f"{moe}.experts.{e}.w3.weight", randn(shape.intermediate, shape.hidden))
            add(f"{moe}.experts.{e}.w2.weight", randn(shape.hidden, shape.intermediate))
    add("model.norm.weight", torch.ones(shape.hidden, dtype=torch.bfloat16))
    add("lm_head.weight", randn(shape.vocab, shape.hidden))
    flush()
    total = sum(f.stat().st_size for f in path.glob("shard-*.safetensors"))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def write_tokenizer(path: Path, vocab: int) -> None:
    """Word-level: token i is the word `w{i}`, so generated text has an exact token count."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    words.update({f"w{i}": i for i in range(4, vocab)})
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(path)


def write_calibration_text(path: Path, vocab: int, tokens: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    ids = [rng.randrange(4, vocab) for _ in range(tokens)]
    path.write_text(" ".join(f"w{i}" for i in ids) + "\n")


# -- measurement -----------------------------------------------------------------
@dataclass
class Measured:
    wall_s: float
    peak_rss_bytes: int
    peak_anon_rss_bytes: int  # sampled every 50 ms
    report: dict


def measure(command: list[str], library: Path = REPO) -> Measured:
    """Runs `command` with mergekit_moe2dense imported from `library`; its wall time, its peak
    RSS (ru_maxrss of this child only), its peak anonymous RSS, and the JSON object it printed
    last on stdout, if any."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(library), os.environ.get("PYTHONPATH", "")])}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=out, stderr=err, env=env, text=True)
        peak_anon = 0
        while True:  # this child's own rusage; its anonymous RSS sampled meanwhile
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            peak_anon = max(peak_anon, anonymous_rss(child.pid))
            time.sleep(0.05)
        wall = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        out, err = out.read(), err.read()
    if child.returncode != 0:
        raise SystemExit(f"failed ({child.returncode}): {' '.join(command)}\n{err[-3000:]}")
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return Measured(wall, usage.ru_maxrss * 1024, peak_anon, json.loads(lines[-1]) if lines else {})


def anonymous_rss(pid: int) -> int:
    """RssAnon: resident memory not backed by files. ru_maxrss also counts the pages
    of safetensors shards mapped with mmap, which the kernel can drop at will."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # the child exited between wait4 and the read
        pass
    return 0


DROP_ALL_CACHES = False  # --drop-caches


def drop_page_cache(path: Path) -> None:
    """Evicts the checkpoint's pages so the next reader hits the disk: with --drop-caches (root) the
    kernel's whole page cache (`echo 3 > /proc/sys/vm/drop_caches`), else the checkpoint's files
    with posix_fadvise (no root needed; on a virtual disk the host may still cache them)."""
    if DROP_ALL_CACHES:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return
    for file in path.iterdir():
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def available_engines() -> list[str]:
    from mergekit_moe2dense.config import CalibrationConfig

    engine = CalibrationConfig.model_fields.get("engine")
    if engine is None:
        return ["full"]
    return [name for name in ("full", "layerwise") if name in str(engine.annotation)]


# -- subprocess entry points -----------------------------------------------------
def child_calibrate(
    model: str,
    data: str,
    engine: str,
    tokens_per_seq: int,
    num_samples: int,
    device: str,
    dtype: str,
    compute_dtype: str = "auto",
) -> None:
    from mergekit_moe2dense.calibration import collect_statistics, load_calibration_batches
    from mergekit_moe2dense.config import Moe2DenseConfig
    from mergekit_moe2dense.io.source import SourceModel

    calibration = {
        "dataset": data,
        "num_samples": num_samples,
        "seq_len": tokens_per_seq,
        "batch_size": 4,
        "dtype": dtype,
    }
    if len(available_engines()) > 1:  # the config has an `engine` key
        calibration["engine"] = engine
    if compute_dtype != "auto":  # a key of newer checkouts only
        calibration["compute_dtype"] = compute_dtype
    config = Moe2DenseConfig.model_validate(
        {"merge_method": "router_weighted", "models": [{"model": model}], "calibration": calibration}
    )
    source = SourceModel.open(config.model)
    start = time.perf_counter()
    _, batches = load_calibration_batches(source.path, config.calibration)  # timed, as in a run
    stats = collect_statistics(source, batches, config.calibration, device=device, progress=False)
    seconds = time.perf_counter() - start
    report = {"seconds": seconds, "tokens": stats.tokens, "mean_probs": stats.mean_probs.tolist()}
    # the dtype the layers were computed in (older checkouts: the calibration dtype)
    report["compute_dtype"] = getattr(stats, "metadata", {}).get("compute_dtype", dtype)
    print(json.dumps(report))


CONVERSIONS = {
    # the new-user run: router statistics streamed layer by layer, bf16 throughout
    "router_weighted": {"merge_method": "router_weighted"},
    # the same with the least-squares re-fit of every down projection (a second layer stream)
    "refit": {"merge_method": "router_weighted", "parameters": {"refit": "down_proj"}},
    # the gradient-based re-fit of another branch: reported as skipped where `refit: fit` is refused
    "refit_fit": {"merge_method": "router_weighted", "parameters": {"refit": "fit"}},
}


def child_convert(
    model: str,
    data: str,
    out: str,
    name: str,
    seq_len: int,
    num_samples: int,
    device: str,
    compute_dtype: str = "auto",
) -> None:
    """One whole conversion through `build_dense`, with this process's RSS sampled every 20 ms
    and its high-water mark (VmHWM) read at each phase boundary: the peak of each phase."""
    import threading

    from mergekit.options import MergeOptions

    import mergekit_moe2dense.build as build
    import mergekit_moe2dense.finish as finish
    import mergekit_moe2dense.outputs.dense as dense
    from mergekit_moe2dense.config import Moe2DenseConfig
    from mergekit_moe2dense.errors import Moe2DenseError

    phases: dict[str, dict] = {}
    state = {"phase": "prepare", "start": time.perf_counter(), "hwm": _proc_status("VmHWM"), "max": 0}
    stop = threading.Event()

    def sample():
        while not stop.wait(0.02):
            state["max"] = max(state["max"], _proc_status("VmRSS"))

    def switch(phase: str) -> None:
        hwm, now = _proc_status("VmHWM"), time.perf_counter()
        state["max"] = max(state["max"], _proc_status("VmRSS"))
        peak = hwm if hwm > state["hwm"] else state["max"]  # exact when the phase raised the mark
        entry = phases.setdefault(state["phase"], {"seconds": 0.0, "peak_rss_bytes": 0})
        entry["seconds"] += now - state["start"]
        entry["peak_rss_bytes"] = max(entry["peak_rss_bytes"], peak)
        state.update(phase=phase, start=now, hwm=hwm, max=0)

    def phased(phase: str, function):
        def wrapper(*args, **kwargs):
            previous = state["phase"]
            switch(phase)
            try:
                return function(*args, **kwargs)
            finally:
                switch(previous if previous != "prepare" else "other (planning, files)")

        return wrapper

    build.calibrate = phased("calibration", build.calibrate)
    finish._refit_dense = phased("refit", finish._refit_dense)
    dense.run_graph = phased("merge_and_write", dense.run_graph)
    spec = {
        **CONVERSIONS[name],
        "models": [{"model": model}],
        "dtype": "bfloat16",
        "calibration": {
            "dataset": data,
            "num_samples": num_samples,
            "seq_len": seq_len,
            "batch_size": 4,
            "dtype": "bfloat16",
            "engine": "layerwise",
            **({"compute_dtype": compute_dtype} if compute_dtype != "auto" else {}),
        },
    }
    try:
        config = Moe2DenseConfig.model_validate(spec)
    except Moe2DenseError as error:
        return print(json.dumps({"skipped": str(error)}))
    threading.Thread(target=sample, daemon=True).start()
    start = time.perf_counter()
    try:
        build.build_dense(config, out, MergeOptions(quiet=True, device=device))
    except Moe2DenseError as error:
        if state["phase"] != "prepare":
            raise
        return print(json.dumps({"skipped": str(error)}))  # refused before any work: not available here
    switch("done")
    stop.set()
    print(
        json.dumps({"seconds": time.perf_counter() - start, "phases": phases, "peak_rss_bytes": _proc_status("VmHWM")})
    )


def _proc_status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def child_read(model: str, direct: bool = False) -> None:
    """One sequential read of every shard, 64 MB at a time: plain (through the page cache), or with
    `direct` by O_DIRECT into a page-aligned buffer (the disk's own speed, no copy out of the page
    cache; plain where the file system has no O_DIRECT)."""
    import mmap

    buffer = mmap.mmap(-1, 64 << 20)  # page-aligned, as O_DIRECT wants
    total = 0
    start = time.perf_counter()
    for file in sorted(Path(model).glob("*.safetensors")):
        try:
            fd = os.open(file, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        except OSError:
            fd, direct = os.open(file, os.O_RDONLY), False
        try:
            offset = 0
            while count := os.preadv(fd, [buffer], offset):
                offset += count
            total += offset
        finally:
            os.close(fd)
    print(json.dumps({"seconds": time.perf_counter() - start, "bytes": total, "direct": direct}))


# -- the benchmark ---------------------------------------------------------------
def run(args) -> dict:
    shape = SMOKE_SHAPE if args.smoke else FULL_SHAPE
    size = args.size_gb * GB
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="moe2dense-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model = workdir / "moe"
    results: dict = {"command": " ".join(["python", "benchmarks/scale.py", *sys.argv[1:]])}
    me = [sys.executable, os.fspath(Path(__file__).resolve())]
    try:
        # in a child: Linux carries a parent's RSS at fork into the child's ru_maxrss,
        # so this process stays small (no torch) and measures nothing itself
        if args.keep and (model / "model.safetensors.index.json").is_file():  # from an earlier --keep run
            m = Measured(0.0, 0, 0, {"bytes": sum(f.stat().st_size for f in model.glob("*.safetensors"))})
            m.report["engines"] = available_engines()
        else:
            m = measure([*me, "_generate", str(model), str(size), "smoke" if args.smoke else "full"])
        on_disk, engines = m.report["bytes"], m.report["engines"]
        results["checkpoint"] = {
            "bytes": on_disk,
            "layers": shape.layers_for(size),
            "shape": shape.__dict__,
            "generate_s": m.wall_s,
        }
        print(
            f"checkpoint: {on_disk / GB:.2f} GB, {shape.layers_for(size)} layers, "
            f"written in {results['checkpoint']['generate_s']:.1f} s",
            flush=True,
        )

        data = workdir / "calib.txt"
        num_samples = max(1, args.tokens // args.seq_len)
        write_calibration_text(data, shape.vocab, num_samples * args.seq_len * 2)
        calib = {}
        device = "cuda" if args.cuda else "cpu"
        for engine in [e for e in engines if e in args.engines]:
            drop_page_cache(model)
            m = measure(
                [
                    *me,
                    "_calibrate",
                    str(model),
                    str(data),
                    engine,
                    str(args.seq_len),
                    str(num_samples),
                    device,
                    args.calibration_dtype,
                    args.compute_dtype,
                ]
            )
            calib[engine] = {
                "tokens": m.report["tokens"],
                "seconds": m.report["seconds"],
                "tokens_per_s": m.report["tokens"] / m.report["seconds"],
                "peak_rss_bytes": m.peak_rss_bytes,
                "peak_rss_vs_checkpoint": m.peak_rss_bytes / on_disk,
                "peak_anon_rss_bytes": m.peak_anon_rss_bytes,
                "peak_anon_rss_vs_checkpoint": m.peak_anon_rss_bytes / on_disk,
                "mean_probs": m.report["mean_probs"],
                "compute_dtype": m.report["compute_dtype"],
            }
            print(
                f"calibration {engine} ({args.calibration_dtype}, layers computed in {m.report['compute_dtype']}): "
                f"{calib[engine]['tokens_per_s']:.1f} tok/s, "
                f"peak RSS {m.peak_rss_bytes / GB:.2f} GB (anonymous {m.peak_anon_rss_bytes / GB:.2f} GB)",
                flush=True,
            )
        if "layerwise" in calib and "full" in calib:
            full, layerwise = calib["full"], calib["layerwise"]
            calib["ratios"] = {
                "throughput_layerwise_vs_full": layerwise["tokens_per_s"] / full["tokens_per_s"],
                "peak_rss_layerwise_vs_full": layerwise["peak_rss_bytes"] / full["peak_rss_bytes"],
                "peak_anon_rss_layerwise_vs_full": layerwise["peak_anon_rss_bytes"] / full["peak_anon_rss_bytes"],
                "max_abs_mean_prob_diff": max(
                    abs(a - b)
                    for row_a, row_b in zip(layerwise["mean_probs"], full["mean_probs"])
                    for a, b in zip(row_a, row_b)
                ),
            }
        for entry in calib.values():
            entry.pop("mean_probs", None)
        results["calibration"] = calib

        conversions = {}
        libraries = {"": REPO, **({" (baseline)": Path(args.baseline)} if args.baseline else {})}
        for name, (suffix, library) in [(n, lib) for n in args.conversions for lib in libraries.items()]:
            out = workdir / f"out-convert-{name}"
            drop_page_cache(model)
            m = measure(
                [
                    *me,
                    "_convert",
                    str(model),
                    str(data),
                    str(out),
                    name,
                    str(args.seq_len),
                    str(num_samples),
                    device,
                    args.compute_dtype,
                ],
                library,
            )
            name = name + suffix
            if "skipped" in m.report:
                conversions[name] = {"skipped": m.report["skipped"]}
                print(f"conversion {name}: skipped, the library refused it: {m.report['skipped']}", flush=True)
                continue
            phases = m.report["phases"]
            conversions[name] = {
                "wall_s": m.wall_s,
                "peak_rss_bytes": m.peak_rss_bytes,
                "peak_rss_vs_checkpoint": m.peak_rss_bytes / on_disk,
                "peak_anon_rss_bytes": m.peak_anon_rss_bytes,
                "phases": {
                    phase: {**entry, "peak_rss_vs_checkpoint": entry["peak_rss_bytes"] / on_disk}
                    for phase, entry in phases.items()
                },
            }
            if "refit" in phases:
                conversions[name]["refit_s_per_layer"] = phases["refit"]["seconds"] / results["checkpoint"]["layers"]
            shutil.rmtree(out)
            print(
                f"conversion {name}: {m.wall_s:.1f} s, peak RSS {m.peak_rss_bytes / GB:.2f} GB "
                f"({100 * m.peak_rss_bytes / on_disk:.1f}% of the checkpoint); by phase: "
                + ", ".join(
                    f"{phase} {entry['peak_rss_bytes'] / GB:.2f} GB in {entry['seconds']:.1f} s"
                    for phase, entry in phases.items()
                ),
                flush=True,
            )
        if args.baseline:
            conversions["ratios"] = {
                f"peak_rss_{name}_vs_baseline": conversions[name]["peak_rss_bytes"]
                / conversions[name + " (baseline)"]["peak_rss_bytes"]
                for name in args.conversions
                if "skipped" not in conversions[name] and "skipped" not in conversions[name + " (baseline)"]
            }
        results["conversion"] = conversions

        merges = {}

        def raw_read(key: str) -> None:
            for suffix, direct in (("", []), ("_direct", ["direct"])):
                drop_page_cache(model)
                m = measure([*me, "_read", str(model), *direct])
                merges[key + suffix] = {
                    "wall_s": m.report["seconds"],
                    "peak_rss_bytes": m.peak_rss_bytes,
                    "read_gb_per_s": m.report["bytes"] / GB / m.report["seconds"],
                    "direct": m.report["direct"],
                }
                print(f"{(key + suffix).replace('_', ' ')}: {m.report['seconds']:.1f} s", flush=True)

        # a virtual disk's throughput drifts (burst credits, other tenants): one raw read before
        # the merges and one after, and the ratio against their mean; each plainly (through the
        # page cache, whose copies cost CPU time) and with O_DIRECT (the disk's own speed)
        raw_read("raw_read")
        cuda = ["--cuda"] if args.cuda else []
        # each command as a module of the Python running this (a machine may have no console scripts)
        runs = [("moe2dense", {"merge_method": "expert_uniform"}, "mergekit_moe2dense", REPO)]
        if args.baseline:
            runs.append(("moe2dense_baseline", runs[0][1], runs[0][2], Path(args.baseline)))
        if not args.no_linear:
            runs.append(("mergekit_linear", {"merge_method": "linear"}, "mergekit.scripts.run_yaml", REPO))
        for name, config, module, library in runs:
            spec = {**config, "models": [{"model": str(model)}], "dtype": "bfloat16"}
            if name == "mergekit_linear":
                spec["models"][0]["parameters"] = {"weight": 1.0}
            path = workdir / f"{name}.yml"
            path.write_text(json.dumps(spec))
            out = workdir / f"out-{name}"
            drop_page_cache(model)
            m = measure([sys.executable, "-m", module, str(path), str(out), "--quiet", *cuda], library)
            written = sum(f.stat().st_size for f in out.glob("*.safetensors"))
            merges[name] = {
                "wall_s": m.wall_s,
                "peak_rss_bytes": m.peak_rss_bytes,
                "peak_anon_rss_bytes": m.peak_anon_rss_bytes,
                "written_bytes": written,
            }
            shutil.rmtree(out)
            print(
                f"merge {name}: {m.wall_s:.1f} s, peak RSS {m.peak_rss_bytes / GB:.2f} GB "
                f"(anonymous {m.peak_anon_rss_bytes / GB:.2f} GB), "
                f"wrote {written / GB:.2f} GB",
                flush=True,
            )
        raw_read("raw_read_after")
        mean_read = (merges["raw_read"]["wall_s"] + merges["raw_read_after"]["wall_s"]) / 2
        mean_direct = (merges["raw_read_direct"]["wall_s"] + merges["raw_read_after_direct"]["wall_s"]) / 2
        merges["ratios"] = {
            "moe2dense_vs_raw_read": merges["moe2dense"]["wall_s"] / mean_read,
            "moe2dense_vs_raw_read_direct": merges["moe2dense"]["wall_s"] / mean_direct,
        }
        print(
            f"merge moe2dense / mean raw read: {merges['ratios']['moe2dense_vs_raw_read']:.2f}x plain, "
            f"{merges['ratios']['moe2dense_vs_raw_read_direct']:.2f}x O_DIRECT",
            flush=True,
        )
        if "mergekit_linear" in merges:
            linear = merges["mergekit_linear"]
            merges["ratios"]["moe2dense_vs_mergekit_linear"] = merges["moe2dense"]["wall_s"] / linear["wall_s"]
            merges["ratios"]["peak_rss_moe2dense_vs_mergekit_linear"] = (
                merges["moe2dense"]["peak_rss_bytes"] / linear["peak_rss_bytes"]
            )
        if "moe2dense_baseline" in merges:
            baseline = merges["moe2dense_baseline"]
            merges["ratios"]["moe2dense_vs_baseline"] = merges["moe2dense"]["wall_s"] / baseline["wall_s"]
            merges["ratios"]["peak_rss_moe2dense_vs_baseline"] = (
                merges["moe2dense"]["peak_rss_bytes"] / baseline["peak_rss_bytes"]
            )
        results["merge"] = merges
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_calibrate":
        model, data, engine, seq_len, samples, device, dtype, *compute = argv[1:]
        return child_calibrate(model, data, engine, int(seq_len), int(samples), device, dtype, *compute)
    if argv and argv[0] == "_convert":
        model, data, out, name, seq_len, samples, device, *compute = argv[1:]
        return child_convert(model, data, out, name, int(seq_len), int(samples), device, *compute)
    if argv and argv[0] == "_read":
        return child_read(argv[1], direct=argv[2:] == ["direct"])
    if argv and argv[0] == "_generate":
        shape = SMOKE_SHAPE if argv[3] == "smoke" else FULL_SHAPE
        written = generate_checkpoint(Path(argv[1]), float(argv[2]), shape)
        return print(json.dumps({"bytes": written, "engines": available_engines()}))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=4.0, help="checkpoint size on disk")
    parser.add_argument("--tokens", type=int, default=512, help="calibration tokens")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--cuda", action="store_true", help="calibrate and merge on the GPU")
    parser.add_argument(
        "--calibration-dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="dtype of both calibration engines",
    )
    parser.add_argument(
        "--compute-dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="calibration.compute_dtype of the layer-streamed passes (auto: float32 for bf16 on the CPU)",
    )
    parser.add_argument(
        "--engines",
        default="full,layerwise",
        help="calibration engines to measure, comma-separated (leave out full for a checkpoint larger than RAM)",
    )
    parser.add_argument(
        "--conversions",
        default="router_weighted,refit",
        help=f"whole conversions to measure phase by phase, comma-separated ({', '.join(CONVERSIONS)}; '' for none)",
    )
    parser.add_argument("--baseline", help="another checkout of this repository: its conversions and merge too")
    parser.add_argument(
        "--drop-caches", action="store_true", help="drop the kernel's whole page cache before each run (root)"
    )
    parser.add_argument("--no-linear", action="store_true", help="skip stock mergekit's linear merge")
    parser.add_argument("--smoke", action="store_true", help="tiny model and token count (seconds)")
    parser.add_argument("--workdir", help="where to generate (default: a temporary directory)")
    parser.add_argument(
        "--keep", action="store_true", help="keep the generated checkpoint (and reuse one --workdir already holds)"
    )
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    args.engines = [name.strip() for name in args.engines.split(",") if name.strip()]
    args.conversions = [name.strip() for name in args.conversions.split(",") if name.strip()]
    if not set(args.conversions) <= set(CONVERSIONS):
        parser.error(f"--conversions: some of {', '.join(CONVERSIONS)}, got {','.join(args.conversions)}")
    if not set(args.engines) <= {"full", "layerwise"}:
        parser.error(f"--engines: full and/or layerwise, got {','.join(args.engines)}")
    if args.smoke:
        args.size_gb, args.tokens, args.seq_len = min(args.size_gb, 0.004), min(args.tokens, 64), min(args.seq_len, 16)
    global DROP_ALL_CACHES
    DROP_ALL_CACHES = args.drop_caches
    results = run(args)
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
