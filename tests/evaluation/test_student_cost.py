"""What a student costs where it will run (issue 16, items 1–3): memory traffic and arithmetic intensity against hand
counts, the roofline bound against hand arithmetic, energy measured from a (fake) RAPL tree through zeus or estimated
from a stated power and labelled so, and int8 students saved, reloaded, evaluated and reported beside their source."""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kdflow.config.evaluation import DEFAULT_POWER, EvaluationSection
from kdflow.config.loading import RecipeError
from kdflow.config.recipe import load_recipe
from kdflow.evaluation import deployment, devices, energy, quantize, traffic
from kdflow.store.model_folders import write_location
from kdflow.store.outputs import building, content_key, existing_output, finish
from kdflow.training.tiny_models import llama_model, train_tokenizer

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]
COT = "Solve step by step: {{ question }}"
ROWS = [
    {"id": f"t-{i}", "question": f"{i}+{i}", "rationale": f"={2 * i}\nAnswer: {2 * i}", "answer": str(2 * i)}
    for i in range(1, 4)
]


def config(**extra) -> LlamaConfig:
    # d 64, L 2, h 2 query heads and kv 1 of size 32, f 128, V 40
    return LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        intermediate_size=128,
        vocab_size=40,
        **extra,
    )


def net(**extra):
    torch.manual_seed(0)
    return LlamaForCausalLM(config(**extra)).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([f"{COT}\n{r['rationale']}" for r in ROWS] * 20, vocab_size=40)


# ---- memory traffic and arithmetic intensity ---------------------------------------------------------------

# Per layer: q 64·64 + k, v 2·64·32 + o 64·64 + gate, up, down 3·64·128 = 36,864 matrix weights, 2 norms of 64.
LAYER = 36_864 + 128
MATRICES = 2 * 36_864  # the layers' Linear weights


def test_bytes_per_token_untied_fp32_by_hand():
    model = net(tie_word_embeddings=False)
    # 2 layers + final norm 64 + head 40·64 read whole + ONE embedding row of 64 (a lookup), 4 bytes each
    weights = 4 * (2 * LAYER + 64 + 40 * 64 + 64)
    assert traffic.weight_bytes_read(model) == weights == 306_688
    # KV: 2 (k, v) · 2 layers · 1 kv head · 32 · 10 positions · 4 bytes = 5,120
    t = traffic.traffic(model, context=10, flops_per_token=deployment.flops_per_token(model.config, 10))
    assert t["kv_bytes_per_token"] == 5_120 and t["memory_bytes_per_token"] == 311_808
    # FLOPs at c = 10: 2·(73,728 + 2,560) + 4·2·2·32·10 = 157,696 (test_evaluate's hand count)
    assert t["arithmetic_intensity"] == pytest.approx(157_696 / 311_808, abs=1e-4)
    assert t["compute_dtype"] == "fp32"


def test_a_tied_head_reads_the_whole_table_once():
    model = net(tie_word_embeddings=True)
    assert traffic.weight_bytes_read(model) == 4 * (2 * LAYER + 64 + 40 * 64)  # no extra lookup row: same tensor


def test_bytes_per_token_of_the_int8_copy_by_hand():
    q = quantize.quantize_int8(net(tie_word_embeddings=True))
    # int8 (1 byte): the layers' matrices and the head's own copy 40·64; float32: 4 norms + final norm, and one row
    # of the embedding table (float32, lookups only: the head has its own int8 copy)
    weights = MATRICES + 40 * 64 + 4 * (4 * 64 + 64) + 4 * 64
    assert traffic.weight_bytes_read(q) == weights == 77_824
    t = traffic.traffic(q, context=10, flops_per_token=157_696)
    assert t["kv_bytes_per_token"] == 5_120  # the KV cache stays float32 under dynamic quantization
    assert t["compute_dtype"] == "int8" and t["arithmetic_intensity"] == pytest.approx(157_696 / 82_944, abs=1e-4)


def test_bfloat16_weights_count_two_bytes():
    model = net(tie_word_embeddings=True).to(torch.bfloat16)
    t = traffic.traffic(model, context=10, flops_per_token=None)
    assert t["weight_bytes_per_token"] == 2 * (2 * LAYER + 64 + 40 * 64) and t["kv_bytes_per_token"] == 2_560
    assert t["compute_dtype"] == "bf16" and t["arithmetic_intensity"] is None


# ---- the roofline -------------------------------------------------------------------------------------------


def test_roofline_bound_by_hand():
    phone = devices.DeviceProfile("p", "x", 50e9, "s", {"int8": 10e12}, "s")
    # memory: 1 MB / 50 GB/s = 20 µs; compute (int8): 1 GFLOP / 10 TOPS = 100 µs -> compute-bound, 100 µs
    r = devices.roofline_seconds(1e9, 1e6, "int8", phone)
    assert r == {"seconds": pytest.approx(100e-6), "bound": "compute", "compute_term": True}
    # fp32 has no published peak: the memory term alone (still a lower bound), flagged
    r = devices.roofline_seconds(1e9, 1e6, "fp32", phone)
    assert r == {"seconds": pytest.approx(20e-6), "bound": "memory", "compute_term": False}
    figures = {"flops_per_token": 157_696, "memory_bytes_per_token": 311_040, "compute_dtype": "fp32"}
    h100 = devices.roofline(figures)["datacenter-gpu-h100"]
    assert h100["us_per_token"] == pytest.approx(311_040 / 3.35e12 * 1e6, abs=1e-4) and h100["bound"] == "memory"
    assert devices.roofline({"flops_per_token": 1}) == {}


def test_every_device_number_has_its_source():
    names = [d.name for d in devices.DEVICES]
    assert len(set(names)) == len(names) >= 4
    assert {"phone-soc", "laptop-cpu", "edge-gpu"} <= set(names) and any(n.startswith("datacenter") for n in names)
    for d in devices.DEVICES:
        assert d.bandwidth_bytes_s > 0 and len(d.bandwidth_source) > 20 and len(d.peak_source) > 20
        assert set(d.peak_flops) <= {"fp32", "bf16", "fp16", "int8"} and all(v > 0 for v in d.peak_flops.values())


# ---- energy -------------------------------------------------------------------------------------------------


def fake_rapl(root: Path, package_uj: int, dram_uj: int | None = None) -> Path:
    """/sys/class/powercap as the kernel lays it out: intel-rapl/intel-rapl:0 (package-0), and its dram subzone."""
    zone = root / "intel-rapl" / "intel-rapl:0"
    zone.mkdir(parents=True)
    (zone / "name").write_text("package-0\n")
    (zone / "energy_uj").write_text(f"{package_uj}\n")
    (zone / "max_energy_range_uj").write_text("262143328850\n")
    if dram_uj is not None:
        (zone / "intel-rapl:0:0").mkdir()
        (zone / "intel-rapl:0:0" / "name").write_text("dram\n")
        (zone / "intel-rapl:0:0" / "energy_uj").write_text(f"{dram_uj}\n")
        (zone / "intel-rapl:0:0" / "max_energy_range_uj").write_text("65532610987\n")
    return zone


def test_rapl_counter_reads_package_and_dram_through_zeus(tmp_path):
    zone = fake_rapl(tmp_path, package_uj=5_000_000, dram_uj=1_000_000)
    counter = energy.rapl_counter(tmp_path)
    assert "package-0 + dram" in counter.what and "zeus" in counter.what
    assert counter.read_joules() == pytest.approx(6.0)
    (zone / "energy_uj").write_text("7500000\n")
    (zone / "intel-rapl:0:0" / "energy_uj").write_text("1250000\n")
    assert counter.read_joules() == pytest.approx(8.75)


def test_measured_energy_per_token_from_a_fake_counter(tmp_path, tokenizer, monkeypatch):
    """Each timed batch-1 run advances the fake package counter by a known amount: the figure is that ÷ tokens."""
    zone = fake_rapl(tmp_path, package_uj=0)
    counter = energy.rapl_counter(tmp_path)
    big, small = (llama_model(tokenizer, hidden=h, layers=1, heads=2, intermediate=64, seed=0).eval() for h in (64, 32))
    joules = {id(big): 2.0, id(small): 0.5}  # per timed run at batch 1

    def timed(model, tok, enc, tokens):
        if enc["input_ids"].shape[0] == 1 and tokens == 8:
            now = int((zone / "energy_uj").read_text())
            (zone / "energy_uj").write_text(f"{now + int(joules[id(model)] * 1e6)}\n")
        return 0.1

    monkeypatch.setattr(deployment, "timed_generate", timed)
    monkeypatch.setattr(deployment, "peak_generation_memory", lambda model, tok, enc, tokens: 1)
    figures = deployment.measure_all(
        {"big": (big, tokenizer), "small": (small, tokenizer)}, "1+1", ["2+2"] * 2, tokens=8, repeats=3, counter=counter
    )
    assert figures["big"]["measured_energy_j_per_token"] == pytest.approx(2.0 / 8)
    assert figures["small"]["measured_energy_j_per_token"] == pytest.approx(0.5 / 8)
    e = energy.energy_per_token(figures["big"], 10.0, "a stated figure")
    assert e["energy_source"] == "measured" and e["energy_j_per_token"] == pytest.approx(0.25)
    assert "RAPL" in e["energy_basis"]


def test_no_counter_means_an_estimate_labelled_as_such(tmp_path):
    counter, why = energy.counter_for("cpu", powercap=tmp_path)  # an empty powercap: as on this project's machines
    assert counter is None and "no RAPL zones" in why
    e = energy.energy_per_token({"latency_ms_per_token": 4.0}, DEFAULT_POWER.watts, DEFAULT_POWER.source)
    assert e["energy_source"] == "estimated"
    assert e["energy_j_per_token"] == pytest.approx(7.5 * 0.004)  # 7.5 W × 4 ms
    assert "7.5 W" in e["energy_basis"] and "EPYC" in e["energy_basis"]


def test_an_unreadable_counter_says_why(tmp_path, monkeypatch):
    fake_rapl(tmp_path, package_uj=1)
    (tmp_path / "intel-rapl" / "intel-rapl:0" / "energy_uj").unlink()  # as if the file had gone
    counter, why = energy.counter_for("cpu", powercap=tmp_path)
    assert counter is None and "not readable" in why


def test_a_power_figure_needs_its_source():
    section = EvaluationSection.Deployment(power={"watts": 30, "source": "wall meter, 2026-12-02"})
    assert section.power.watts == 30
    with pytest.raises(ValueError, match="source"):
        EvaluationSection.Deployment(power={"watts": 30})


# ---- cache keys: the new options rerun only what they change --------------------------------------------


def test_quantize_and_power_leave_the_evaluate_and_deployment_keys_alone():
    def key(value):
        return content_key("s", "1", {"section": value})

    plain = EvaluationSection()
    assert key(EvaluationSection(quantize=["int8"])) == key(plain)  # evaluate stage: every model as before
    assert key(EvaluationSection.Deployment(power={"watts": 30, "source": "wall meter"})) == key(
        EvaluationSection.Deployment()
    )  # the measurement does not change; the report's estimate does
    assert key(EvaluationSection.Deployment(repeats=3)) != key(EvaluationSection.Deployment())


def test_the_demo_recipe_quantizes_its_students():
    assert load_recipe(ROOT / "recipes" / "demo.yaml").evaluation.quantize == ["int8"]


def test_an_unknown_quantization_is_a_recipe_error(tmp_path):
    text = (ROOT / "recipes" / "demo.yaml").read_text().replace("quantize: [int8]", "quantize: [int4]")
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(RecipeError, match="quantize"):
        load_recipe(tmp_path / "r.yaml")
    (tmp_path / "r.yaml").write_text(text.replace("quantize: [int4]", "quantize: [int8, int8]"))
    with pytest.raises(RecipeError, match=r"quantize.*int8 listed more than once.*list it once"):
        load_recipe(tmp_path / "r.yaml")


# ---- int8 students --------------------------------------------------------------------------------------------


def stage(root, name, key, build):
    key = key.ljust(64, "0")
    with building(root, name, key) as tmp:
        build(tmp)
        finish(tmp, name, key, inputs={})
    return existing_output(root, name, key)


def saved(tokenizer, hidden=64, seed=0):
    def build(tmp):
        llama_model(tokenizer, hidden=hidden, layers=2, heads=2, intermediate=64, seed=seed).save_pretrained(
            tmp / "model"
        )
        tokenizer.save_pretrained(tmp / "model")
        write_location(tmp, "model")

    return build


def test_int8_folder_reloads_to_the_same_quantized_model(tokenizer, tmp_path):
    source = llama_model(tokenizer, hidden=64, layers=2, heads=2, intermediate=64, seed=0).eval()
    source.save_pretrained(tmp_path / "fp32")
    tokenizer.save_pretrained(tmp_path / "fp32")
    info = quantize.save_int8(str(tmp_path / "fp32"), tmp_path / "int8")
    assert info["method"] == "int8" and info["linear_layers"] == 2 * 7 + 1  # q k v o gate up down per layer, head
    assert quantize.is_quantized(str(tmp_path / "int8")) and not quantize.is_quantized(str(tmp_path / "fp32"))
    q, _ = quantize.load(str(tmp_path / "int8"))
    x = torch.randint(0, source.config.vocab_size, (2, 9))
    with torch.no_grad():
        again = quantize.quantize_int8(llama_model(tokenizer, hidden=64, layers=2, heads=2, intermediate=64, seed=0))
        assert torch.equal(q(x).logits, again(x).logits)  # the saved int8 weights are the quantizer's, bit for bit
        assert (q(x).logits - source(x).logits).abs().max() < 0.1  # and close to the float model's
    assert quantize.count_params(q) == sum(p.numel() for p in source.parameters())
    fp32, int8 = deployment.size_on_disk(tmp_path / "fp32"), deployment.size_on_disk(tmp_path / "int8")
    assert int8 < fp32 / 2


def test_quantize_stage_then_evaluate_and_measure_like_any_model(tokenizer, tmp_path):
    from kdflow.config.data import DataSource
    from tasks.evaluate import evaluate_model, measure_deployment
    from tasks.quantize import quantize_model, quantized_name

    assert quantized_name("seq-kd", "int8") == "seq-kd-int8" and quantized_name("seq-kd@2", "int8") == "seq-kd-int8@2"
    data = stage(tmp_path, "data", "d", lambda tmp: pd.DataFrame(ROWS).to_parquet(tmp / "test.parquet"))
    teacher, student = (
        stage(tmp_path, "teacher", "t", saved(tokenizer, 64, 1)),
        stage(tmp_path, "students", "s", saved(tokenizer, 32, 2)),
    )
    q = quantize_model.fn(tmp_path, "int8", student)
    assert q.manifest()["quantization"]["method"] == "int8"
    assert quantize_model.fn(tmp_path, "int8", student) == q  # a finished output is found, not rebuilt
    section = EvaluationSection(max_new_tokens=6, batch_size=4)
    m = evaluate_model.fn(tmp_path, section, COT, DataSource.arithmetic, q, teacher, data).manifest()["metrics"]
    assert m["rows"] == 3 and 0 <= m["accuracy"] <= 1 and m["perplexity"] > 1 and 0 <= m["agreement"] <= 1
    settings = EvaluationSection.Deployment(latency_tokens=3, throughput_batch=2, repeats=1)
    dep = measure_deployment.fn(
        tmp_path, {"teacher": teacher, "student": student, "student-int8": q}, settings, COT, data, "test"
    ).manifest()
    f = dep["figures"]
    assert dep["traffic_formula"] == traffic.TRAFFIC_FORMULA and dep["energy"]["counter"] is None
    assert f["student-int8"]["compute_dtype"] == "int8" and f["student"]["compute_dtype"] == "fp32"
    assert f["student-int8"]["params"] == f["student"]["params"]
    assert f["student-int8"]["size_bytes"] < 0.6 * f["student"]["size_bytes"]  # + a float32 embedding, pickle framing
    assert f["student-int8"]["weight_bytes_per_token"] < f["student"]["weight_bytes_per_token"] / 2
    for fig in f.values():
        assert fig["memory_bytes_per_token"] == fig["weight_bytes_per_token"] + fig["kv_bytes_per_token"]
        assert fig["arithmetic_intensity"] == pytest.approx(
            fig["flops_per_token"] / fig["memory_bytes_per_token"], abs=1e-4
        )
        assert "measured_energy_j_per_token" not in fig  # no counter on this machine: nothing claimed as measured


# ---- the report ---------------------------------------------------------------------------------------------------


def test_report_gives_every_model_traffic_energy_and_the_kd_x_quantization_table():
    from kdflow.reporting.run_report import build_report, render_markdown
    from tasks.report import cost

    def fig(params, dtype, latency, measured=None):
        f = {
            "params": params,
            "flops_per_token": 2 * params,
            "memory_bytes_per_token": 4 * params,
            "weight_bytes_per_token": 4 * params - 100,
            "kv_bytes_per_token": 100,
            "arithmetic_intensity": 0.5,
            "compute_dtype": dtype,
            "size_bytes": 4 * params,
            "peak_memory_bytes": 5 * params,
            "latency_ms_per_token": latency,
            "throughput_tokens_per_s": 100.0,
            "context": 30.0,
        }
        return f | (
            {"measured_energy_j_per_token": measured, "energy_counter": "RAPL package-0 (zeus)"} if measured else {}
        )

    power = DEFAULT_POWER
    q = {"accuracy": 0.7, "perplexity": 1.2, "rows": 10, "split": "test", "reference_tokens": 50}
    teacher = {**q, "accuracy": 0.9, **cost(fig(1000, "fp32", 2.0), power)}
    students = {
        "baseline": {**q, "accuracy": 0.5, "data": "gold", **cost(fig(100, "fp32", 1.0), power)},
        "seq-kd": {**q, "data": "teacher", **cost(fig(100, "fp32", 1.0), power)},
        "baseline-int8": {
            **q,
            "accuracy": 0.45,
            "data": "gold",
            "quantized": "int8",
            "quantized_from": "baseline",
            **cost(fig(100, "int8", 0.8, measured=0.003), power),
        },
        "seq-kd-int8": {
            **q,
            "accuracy": 0.68,
            "data": "teacher",
            "quantized": "int8",
            "quantized_from": "seq-kd",
            **cost(fig(100, "int8", 0.8), power),
        },
    }
    dep = {
        "machine": {"device": "cpu", "cpu_count": 2, "torch_threads": 1, "torch": "2"},
        "settings": {"latency_tokens": 8, "throughput_batch": 4, "repeats": 1},
        "flops_formula": "F",
        "traffic_formula": traffic.TRAFFIC_FORMULA,
        "energy": {"counter": None, "why_not": "no RAPL zones"},
        "energy_formula": energy.ENERGY_FORMULA,
        "roofline_formula": devices.ROOFLINE_FORMULA,
        "power": power.model_dump(),
        "devices": devices.device_table(),
    }
    report = build_report("r", teacher, students, {"input_rows": 1, "kept": 1, "dropped": 0, "drop_reasons": {}}, dep)
    assert report["gap_closure"]["baseline"] == "baseline"  # never its int8 copy
    assert report["students"]["seq-kd-int8"]["gap_closure"] == pytest.approx((0.68 - 0.5) / (0.9 - 0.5))
    for m in [report["teacher"], *report["students"].values()]:
        assert {"memory_bytes_per_token", "arithmetic_intensity", "energy_j_per_token", "energy_source"} <= set(m)
        assert set(m["roofline"]) == {d.name for d in devices.DEVICES}
    assert report["students"]["baseline-int8"]["energy_source"] == "measured"
    assert report["students"]["seq-kd-int8"]["energy_source"] == "estimated"
    assert report["students"]["seq-kd-int8"]["energy_j_per_token"] == pytest.approx(7.5 * 0.0008)
    md = render_markdown(report)
    assert "## KD × quantization" in md and "| seq-kd-int8 | teacher; weights int8 after training | int8 |" in md
    assert "0 (baseline)" in md and md.count("0 (baseline)") == 1
    assert "(measured)" in md and "(estimated)" in md and "7.5 W" in md and "bytes/token = W + 2·L·kv·hd·c·b" in md
    for d in devices.DEVICES:
        assert d.bandwidth_source in md
    json.dumps(report)  # report.json stays plain JSON
