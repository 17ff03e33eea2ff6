"""The benchmark harness measures a stack only once every engine replica is up."""

import os
import subprocess
import sys
import threading
import time

import pytest

from benchmarks.harness import wait_for_ready_line
from ruvllm.deployments.readiness import READY_PREFIX


def _sleeper(seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"])


def test_waits_for_the_ready_line_not_the_first_replica(tmp_path):
    log = tmp_path / "stack.log"
    log.write_text("(LLMReplica pid=1) engine 1 of 2 ready\n")
    proc = _sleeper(30)

    def second_engine_reports() -> None:
        time.sleep(1.5)
        with log.open("a") as f:
            f.write(f"(PlacementController pid=2) {READY_PREFIX} 'm' on 2 engine replica(s)\n")

    threading.Thread(target=second_engine_reports).start()
    try:
        assert wait_for_ready_line(log, proc, 20, "stack") >= 1.0
    finally:
        proc.kill()


def test_a_stack_that_exits_before_its_ready_line_is_an_error(tmp_path):
    log = tmp_path / "stack.log"
    log.write_text("")
    proc = _sleeper(0)
    proc.wait()
    with pytest.raises(RuntimeError, match="exited"):
        wait_for_ready_line(log, proc, 20, "stack")


def test_finds_the_ready_line_in_serve_log_files_when_the_console_has_none(tmp_path, monkeypatch):
    """Ray Serve's high-throughput mode logs only to files: the harness reads those too."""
    import tempfile

    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    serve_logs = tmp_path / "ray" / "session_latest" / "logs" / "serve"
    serve_logs.mkdir(parents=True)
    stale = serve_logs / "controller_0.log"  # an earlier session's ready line must not count
    stale.write_text(f"INFO {READY_PREFIX} 'm' on 1 engine replica(s)\n")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    console = tmp_path / "stack.log"
    console.write_text("Throughput optimized Ray Serve enabled\n  • Log to stderr disabled\n")
    since = time.time()
    proc = _sleeper(30)
    try:
        with pytest.raises(TimeoutError):
            wait_for_ready_line(console, proc, 2, "stack-tput", since)
        (serve_logs / "controller_1.log").write_text(f"INFO {READY_PREFIX} 'm' on 1 engine replica(s)\n")
        assert wait_for_ready_line(console, proc, 5, "stack-tput", since) < 5
    finally:
        proc.kill()


def test_decode_profile_splits_a_step_by_kernel_kind_and_reads_bandwidth():
    """gpu_decode_profile's arithmetic on a recorded row: kernel names sorted into kinds,
    per-step times, the host's share, and GB/s of each GEMM kind's weights."""
    from benchmarks.gpu_decode_profile import kind_of, summarize

    assert kind_of("void marlin::Marlin<(vllm::ScalarTypeId)4, 256, 1, 8, 8>(...)") == "4-bit GEMM"
    assert kind_of("nvjet_tst_64x8_64x16_4x1_v_bz_splitK_TNT") == "16-bit GEMM"
    assert kind_of("void flash::flash_fwd_splitkv_kernel<...>") == "attention"
    # FlashAttention 3 on Hopper is a CUTLASS kernel: attention, not a GEMM.
    assert kind_of("void cutlass::device_kernel<flash::enable_sm90_or_later<flash::"
                   "FlashAttnFwdSm90<flash::CollectiveMainloopFwdSm90<...>>>>") == "attention"
    assert kind_of("void vllm::rms_norm_kernel<c10::BFloat16>") == "rest"
    raw = {"wall_s_per_step": 0.004, "walls": [0.004, 0.0041, 0.0039], "device": "cuda",
           "kernels": {"marlin::Marlin<4>": {"us": 200_000, "count": 22_400},
                       "nvjet_tst_lm_head": {"us": 30_000, "count": 100},
                       "flash_fwd_splitkv": {"us": 20_000, "count": 3_200},
                       "rms_norm_kernel": {"us": 50_000, "count": 6_500}}}
    row = summarize(raw, tokens=100, weights={"4-bit GEMM": 4_000_000_000,
                                              "16-bit GEMM": 1_000_000_000})
    assert row["kernel_ms"] == pytest.approx({"4-bit GEMM": 2.0, "16-bit GEMM": 0.3,
                                              "attention": 0.2, "rest": 0.5})
    assert row["busy_ms"] == pytest.approx(3.0) and row["host_wait_ms"] == pytest.approx(1.0)
    assert row["gb_per_s"]["4-bit GEMM"] == pytest.approx(2000)  # 4 GB in 2 ms
    assert row["top_kernels"][0]["calls_per_step"] == pytest.approx(224)
    assert row["kernels"]["flash_fwd_splitkv"] == {"kind": "attention", "ms_per_step": 0.2,
                                                  "calls_per_step": 32}


def test_a_repeated_row_is_its_median_run_beside_every_run():
    from benchmarks.gpu_stack_vs_vllm import median_run

    runs = [{"output_throughput": t, "p50_ttft_ms": t / 100} for t in (9100, 8300, 9900)]
    row = median_run(runs)
    assert row["output_throughput"] == 9100 and row["p50_ttft_ms"] == 91
    assert row["runs_output_throughput"] == [9100, 8300, 9900]
    assert median_run(runs[:2])["output_throughput"] == 8300  # the lower of two
    assert "runs_output_throughput" not in median_run(runs[:1])


def test_each_w4a16_kernel_row_disables_every_kernel_vllm_would_try_first():
    """A kernel row measures the kernel it names only if every one vLLM prefers on CUDA is
    disabled and that one is not; checked against the installed vLLM's priority list."""
    from benchmarks.gpu_decode import w4a16_kernel_rows
    from ruvllm.deployments.vllm_compat import cuda_w4a16_kernels

    order = cuda_w4a16_kernels()
    rows = w4a16_kernel_rows("base", "gptq", {"tokens": 8})
    wanted = {"8B W4A16 Marlin (bf16)": "MarlinLinearKernel",
              "8B W4A16 Marlin (fp16)": "MarlinLinearKernel",
              "8B W4A16 ExLlama (fp16)": "ExllamaLinearKernel",
              "8B W4A16 Triton (bf16)": "TritonW4A16LinearKernel",
              "8B W4A16 Humming (bf16)": "HummingLinearKernel",
              "8B W4A16 Humming (fp16)": "HummingLinearKernel"}
    for name, kernel in wanted.items():
        disabled = set(rows[name]["env"]["VLLM_DISABLED_KERNELS"].split(","))
        assert set(order[:order.index(kernel)]) <= disabled, name
        assert kernel not in disabled, name
    assert rows["8B W4A16 ExLlama (fp16)"]["dtype"] == "float16"  # ExLlama takes fp16 only
    assert rows["8B W4A16 Humming (fp16)"]["dtype"] == "float16"
    assert "env" not in rows["8B fp16"] and rows["8B fp16"]["model"] == "base"
    assert "8B W4A16 Humming (bf16; 4-bit LM head)" not in rows  # no builder, no row
    built = []
    rows = w4a16_kernel_rows("base", "gptq", {"tokens": 8}, gptq_4bit_head=lambda: built.append(1))
    head4 = rows["8B W4A16 Humming (bf16; 4-bit LM head)"]
    assert head4["env"] == rows["8B W4A16 Humming (bf16)"]["env"] and callable(head4["model"])
    assert not built  # the checkpoint is built when the row runs, not when it is planned


def test_a_batch_sweep_reports_every_size_against_its_peer_and_plots_the_crossover(tmp_path):
    """gpu_decode's report over any batch sizes the rows measured: one column pair per size,
    each ratio against the peer at that size, a size a row lacks shown as a dash."""
    from benchmarks.gpu_decode import write_report

    def row(kernel: str, **tok_per_s) -> dict:
        return {**{b[1:]: {"tok_per_s": t, "runs_tok_per_s": [t - 1, t, t + 1]}
                   for b, t in tok_per_s.items()},
                "kernels": [kernel] if kernel else [], "weight_bytes": 2**30}

    result = {"date": "d", "gpu": "GPU", "vllm": "v", "tokens": 8, "rows": {"quant": {
        "8B bf16": row("", b1=200, b16=3000, b64=10000),
        "8B W4A16 Humming (bf16)": {**row("HummingLinearKernel", b1=290, b16=3600, b64=12500),
                                    "loaded_gib": 5.34},
        "8B W4A16 Marlin (bf16)": row("MarlinLinearKernel", b1=300, b64=9500)}}}
    write_report(tmp_path, result)
    table = (tmp_path / "report.md").read_text().split("## Quantized 8B vs bf16")[1]
    assert "| batch 1 tok/s | vs peer | batch 16 tok/s | vs peer | batch 64 tok/s |" in table
    assert "| 8B W4A16 Humming (bf16) | 290 (289-291) | 1.45x | 3600 (3599-3601) | 1.20x " \
           "| 12500 (12499-12501) | 1.25x | 1.00 | 1.00x | 5.34 | HummingLinearKernel |" in table
    assert "| 8B bf16 | 200 (199-201) | 1.00x |" in table and "| 1.00x | — | — |" in table
    assert "| 8B W4A16 Marlin (bf16) | 300 (299-301) | 1.50x | — | — | 9500 (9499-9501) | 0.95x |" in table
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_only_keeps_a_comma_inside_a_row_name_in_the_name():
    """gpu_decode --only: row names such as "8B FP8 (W8A8, quantized at load)" hold a comma;
    split naively they would name no row and the row would silently not run."""
    from benchmarks.gpu_decode import row_names

    assert row_names("8B bf16,8B FP8 (W8A8, quantized at load), 8B W4A16 (GPTQ, random 4-bit "
                     "weights),8B W4A16 Humming (bf16),") == {
        "8B bf16", "8B FP8 (W8A8, quantized at load)", "8B W4A16 (GPTQ, random 4-bit weights)",
        "8B W4A16 Humming (bf16)"}
    assert row_names("") == set()


def test_tinygemm_reference_matches_the_kernel_and_the_packing_round_trips():
    """The dequantized weight the GPU check trusts is what torch's int4 kernel computes (its
    CPU twin here); the CUDA packing keeps every nibble in one of its two orders."""
    import torch

    from benchmarks.gpu_int4_gemm import MAX_CHECK_ERROR, check_int4, pack_nibbles

    assert check_int4(512, 128, 8, "cpu") < MAX_CHECK_ERROR
    q = torch.randint(0, 16, (4, 8), dtype=torch.int32)
    packed = pack_nibbles(q).to(torch.int32)
    assert torch.equal(packed >> 4, q[:, ::2]) and torch.equal(packed & 15, q[:, 1::2])
    swapped = pack_nibbles(q, high_first=False).to(torch.int32)
    assert torch.equal(swapped >> 4, q[:, 1::2])


def test_int4_gemm_report_combines_heads_and_projects_the_step(tmp_path):
    from benchmarks.gpu_int4_gemm import BF16, non_gemm_ms, write_report

    def part(ms1, ms8, gib):
        return {"1": ms1, "8": ms8, "bytes": int(gib * 2**30)}

    result = {"date": "d", "gpu": "H200", "torch": "2.11", "layers": 32, "batches": [1, 8],
              "non_gemm_ms": 1.15, "checks": {},
              "rows": {BF16: {"stack": part(3.70, 3.80, 13.0), "head": part(0.25, 0.26, 0.98)},
                       "tinygemm (8)": {"stack": part(1.50, 2.00, 3.5), "head": part(0.08, 0.10, 0.27)},
                       "tinygemm (2)": {"error": "no kernel"}}}
    write_report(tmp_path, result)
    md = (tmp_path / "report.md").read_text()
    # 3.95 ms of bf16 GEMMs against 1.58 (4-bit head) and 1.75 (bf16 head); the step adds 1.15.
    assert "| tinygemm (8), 4-bit head | 1.580 | 2.50x | 2.100 | 1.93x | 3.77 | 2562 | 2.730 | 1.87x |" in md
    assert "| tinygemm (8), bf16 head | 1.750 | 2.26x |" in md
    assert "| tinygemm (2) | failed: no kernel |" in md
    assert (tmp_path / "report.png").stat().st_size > 0
    assert abs(non_gemm_ms() - (5.1077 - 3.9631)) < 1e-3  # the committed H200 profile


def test_a_random_gptq_checkpoint_can_carry_its_lm_head_in_four_bits(tmp_path):
    import json

    from safetensors import safe_open

    from benchmarks.gpu_decode import build_random_gptq

    like = tmp_path / "like"
    like.mkdir()
    (like / "config.json").write_text(json.dumps({
        "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_hidden_layers": 1, "vocab_size": 1024}))
    for lm_head in (False, True):
        out = build_random_gptq(tmp_path / f"gptq-{lm_head}", like, lm_head=lm_head)
        assert json.loads((out / "config.json").read_text())["quantization_config"]["lm_head"] is lm_head
        with safe_open(str(out / "embeddings.safetensors"), "pt") as f:
            names = set(f.keys())
            if lm_head:  # (in_features / 8, vocab) packed, one scale per group of 128 inputs
                assert f.get_tensor("lm_head.qweight").shape == (32, 1024)
                assert f.get_tensor("lm_head.scales").shape == (2, 1024)
        assert ("lm_head.weight" in names) is not lm_head and ("lm_head.qweight" in names) is lm_head
        assert "model.embed_tokens.weight" in names


def test_the_loaded_weight_size_is_read_from_either_vllms_log_line():
    from benchmarks.gpu_decode import loaded_gib

    assert loaded_gib("INFO ... Model loading took 14.99 GiB and 5.1 seconds") == 14.99  # 0.26
    assert loaded_gib("Model loading took 8.51 GiB memory and 3.2 seconds") == 8.51  # 0.32
    assert loaded_gib("no such line") is None


def test_the_int4_gemm_benchmark_runs_whole_on_the_cpu_twins_of_its_kernels(tmp_path, monkeypatch):
    """A dry run of every step the GPU lease will take (weights, checks, timing, report),
    on small shapes: a crash here would have cost device minutes."""
    import json
    import sys

    from benchmarks import gpu_int4_gemm as bench

    monkeypatch.setattr(bench, "HIDDEN", 256)
    monkeypatch.setattr(bench, "INTER", 512)
    monkeypatch.setattr(bench, "LAYER_SHAPES", {"qkv": (256, 384), "o": (256, 256),
                                                "gate_up": (256, 1024), "down": (512, 256)})
    monkeypatch.setattr(bench, "HEAD_SHAPE", (256, 1024))
    monkeypatch.setattr(sys, "argv", ["gpu_int4_gemm", "--out", str(tmp_path), "--layers", "2",
                                      "--batches", "1,4", "--inner-k-tiles", "2,8"])
    assert bench.main() == 0
    result = json.loads((tmp_path / "report.json").read_text())
    assert set(result["rows"]) == {bench.BF16, "tinygemm int4 g128 (inner k tiles 2)",
                                   "tinygemm int4 g128 (inner k tiles 8)"}
    for name, row in result["rows"].items():
        assert "error" not in row, (name, row)
        assert row["stack"]["1"] > 0 and row["head"]["4"] > 0
    for check in result["checks"].values():
        assert max(check["errors"].values()) < bench.MAX_CHECK_ERROR
    # 4-bit weights and their bf16 scales and zeros against bf16: about 0.27x the bytes.
    bf16, int4 = result["rows"][bench.BF16], result["rows"]["tinygemm int4 g128 (inner k tiles 8)"]
    assert 0.25 < int4["stack"]["bytes"] / bf16["stack"]["bytes"] < 0.3
    assert "tinygemm int4 g128 (inner k tiles 8), bf16 head" in (tmp_path / "report.md").read_text()
