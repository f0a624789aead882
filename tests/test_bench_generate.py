"""bench/bench_generate.py's llama.cpp side without llama.cpp (CI does not build it): llama-bench's JSONL output is
parsed into the decode row, and run_llama_bench passes the flags that make llama-bench decode, at the threads and
repetitions asked, from an executable standing in for it."""

import stat

import pytest

from bench.bench_generate import parse_llama_bench, run_llama_bench

# A real line of `llama-bench -m model-q8_0.gguf -p 0 -n 8 -t 1 -r 2 -o jsonl` (llama.cpp of llama-cpp-python 0.3.36,
# the small preset exported by scripts/export_gguf.py), printed as is: note "],"samples_ts" without a space.
DECODE_LINE = (
    '{"build_commit": "0c1e570", "build_number": 1, "cpu_info": "AMD EPYC", "gpu_info": "", "backends": "CPU", '
    '"model_filename": "/tmp/llamabench_files/model-q8_0.gguf", "model_type": "llama ?B Q8_0", "model_size": '
    '27469824, "model_n_params": 25829888, "n_batch": 2048, "n_ubatch": 512, "n_threads": 1, "cpu_mask": "0x0", '
    '"cpu_strict": false, "poll": 50, "type_k": "f16", "type_v": "f16", "n_gpu_layers": -1, "n_cpu_moe": 0, '
    '"split_mode": "layer", "main_gpu": 0, "no_kv_offload": false, "flash_attn": -1, "devices": "auto", '
    '"tensor_split": "0.00", "tensor_buft_overrides": "none", "load_mode": "auto", "lazy_mode": "auto", '
    '"embeddings": false, "no_op_offload": 0, "no_host": false, "repack": true, "fit_target": 0, "fit_min_ctx": 0, '
    '"n_prompt": 0, "n_gen": 8, "n_depth": 0, "test_time": "2026-12-07T04:43:29Z", "avg_ns": 11616594, '
    '"stddev_ns": 713394, "avg_ts": 689.971094, "stddev_ts": 42.372273, "samples_ns": [ 12121040, 11112148 ],'
    '"samples_ts": [ 660.009, 719.933 ]}'
)
PROMPT_LINE = DECODE_LINE.replace('"n_prompt": 0, "n_gen": 8', '"n_prompt": 512, "n_gen": 0').replace(
    '"avg_ts": 689.971094', '"avg_ts": 2000.5'
)


def test_parse_llama_bench_takes_the_decode_test():
    for text in (DECODE_LINE + "\n", PROMPT_LINE + "\n" + DECODE_LINE + "\n\n"):  # a pp test beside it is skipped
        res = parse_llama_bench(text)
        assert res["tok_s"] == pytest.approx(689.971094) and res["sd"] == pytest.approx(42.372273)
        assert res["bytes"] == 27469824 and res["threads"] == 1 and res["build"] == "0c1e570 (1)"
    with pytest.raises(ValueError, match="one decode test"):
        parse_llama_bench(PROMPT_LINE)


def test_run_llama_bench_passes_the_decode_flags(tmp_path):
    args_file = tmp_path / "args.txt"
    exe = tmp_path / "llama-bench"
    exe.write_text(f"#!/bin/sh\necho \"$@\" > {args_file}\ncat <<'END'\n{DECODE_LINE}\nEND\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    res = run_llama_bench(str(exe), "/m.gguf", threads=3, new_tokens=16, repeats=4)
    assert args_file.read_text().split() == "-m /m.gguf -p 0 -n 16 -t 3 -r 4 -o jsonl".split()
    assert res["tok_s"] == pytest.approx(689.971094)
    assert res["load"] >= 0 and 0 <= res["cpu_share"] < 10  # the child's CPU time over its wall time
