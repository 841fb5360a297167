"""The side-by-side benchmark, ONNX Runtime inference (``predict``), and the deploy stage end to end.

Quality numbers are recomputed here by hand (accuracy with numpy, perplexity with log_softmax in
float64); the end-to-end runs are the tiny MNIST-1D and stdlib LM runs of the other CLI tests with
the deploy stage left on.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from distilflow.cli import main
from distilflow.config import load_config
from distilflow.deploy.bench import benchmark, latency_ms, markdown, ort_variant, quality, torch_variant
from distilflow.deploy.export import export_onnx
from distilflow.deploy.int8_kernels import describe, u8s8_saturates
from distilflow.deploy.predict import predict
from distilflow.deploy.quantize import ort_dynamic, torch_int8
from distilflow.errors import UserError
from distilflow.models.zoo import MLP
from distilflow.tasks.classify import ClassifierWorkload

from .conftest import VOCAB, lm_feeds, run_onnx, tiny_llama
from .int8_reference import CLASSES, FEATURES, blobs, initializers

ERROR = "distilflow: error: "
VARIANTS = ("torch_fp32", "ort_fp32", "ort_int8_dynamic", "ort_int8_static", "torch_int8")


def row_keys(batch_sizes: list[int], metric: str) -> set[str]:
    keys = {"size_bytes", metric}
    for b in batch_sizes:
        keys |= {f"latency_ms_b{b}", f"latency_ms_p90_b{b}", f"throughput_b{b}"}
    return keys


def check_timings(row: dict, batch_sizes: list[int], items_per_row: int) -> None:
    for b in batch_sizes:
        p50, p90 = row[f"latency_ms_b{b}"], row[f"latency_ms_p90_b{b}"]
        assert 0 < p50 <= p90 + 1e-3, (b, p50, p90)
    # Throughput is items per second at the p50 latency; the row's p50 is rounded to 3 decimals (+-0.0005 ms)
    # and the throughput to 1 (+-0.05 items/s: more than 0.1 % of it on a slow or loaded machine).
    for b in batch_sizes:
        p50, items = row[f"latency_ms_b{b}"], b * items_per_row
        fastest, slowest = items / ((p50 - 0.0005) / 1000), items / ((p50 + 0.0005) / 1000)
        assert slowest * 0.999 - 0.05 <= row[f"throughput_b{b}"] <= fastest * 1.001 + 0.05, (b, row)


def one_error(capsys, argv: list[str]) -> str:
    """Run the CLI, expecting exit 2 and exactly one line on stderr; returns that line."""
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert err.startswith(ERROR) and err.count("\n") == 1, err
    return err.strip()


# ---------------------------------------------------------------- benchmark and markdown, tiny models


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A fitted MLP (accuracy well above chance, below 1), its fp32 and int8 ONNX files, and 100 test samples."""
    torch.manual_seed(0)
    model = MLP((FEATURES,), CLASSES, [64]).eval()
    x, y = blobs(300, seed=1)
    x = x + 2.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(9))  # overlapping classes
    with torch.no_grad():
        hidden = torch.cat([model.layers(x[:200]), torch.ones(200, 1)], dim=1)  # (N, 65)
        solution = torch.linalg.lstsq(hidden, nn.functional.one_hot(y[:200], CLASSES).float()).solution
        model.classifier.weight.copy_(solution[:-1].T)
        model.classifier.bias.copy_(solution[-1])
    folder = tmp_path_factory.mktemp("bench")
    fp32 = export_onnx(model, {"x": x[:2]}, folder / "mlp.onnx", kind="classifier")
    int8 = ort_dynamic(fp32, folder / "mlp.int8.onnx")
    data = {"x": x[200:].numpy(), "y": y[200:].numpy()}
    return model, fp32, int8, data


@pytest.mark.int8_kernels
def test_benchmark_classifier_rows_and_accuracy_by_hand(classifier, tmp_path):
    model, fp32, int8, data = classifier
    quantized, _ = torch_int8(model, backend="torch_ao")
    variants = [
        torch_variant("torch_fp32", model, "classifier"),
        ort_variant("ort_fp32", fp32, threads=1),
        ort_variant("ort_int8_dynamic", int8, threads=1),
        torch_variant("torch_int8", quantized, "classifier"),
    ]
    table = benchmark(variants, data, kind="classifier", batch_sizes=[1, 64], iterations=2)
    assert list(table) == ["torch_fp32", "ort_fp32", "ort_int8_dynamic", "torch_int8"]

    with torch.no_grad():
        logits = {
            "torch_fp32": model(torch.from_numpy(data["x"])).numpy(),
            "torch_int8": quantized(torch.from_numpy(data["x"])).numpy(),
        }
    logits["ort_fp32"] = run_onnx(fp32, {"x": data["x"]})
    logits["ort_int8_dynamic"] = run_onnx(int8, {"x": data["x"]})
    for name, row in table.items():
        assert set(row) == row_keys([1, 64], "accuracy"), name
        assert row["accuracy"] == np.mean(logits[name].argmax(1) == data["y"]), name
        check_timings(row, [1, 64], items_per_row=1)
    assert 0.3 < table["torch_fp32"]["accuracy"] < 1.0  # a number that can tell variants apart
    assert abs(table["ort_int8_dynamic"]["accuracy"] - table["torch_fp32"]["accuracy"]) <= 0.05

    saved = tmp_path / "archive.pt"  # torch.save names its zip records after the file ("archive" for a buffer)
    torch.save(model.state_dict(), saved)
    assert table["torch_fp32"]["size_bytes"] == saved.stat().st_size
    assert table["torch_fp32"]["size_bytes"] > 4 * sum(p.numel() for p in model.parameters())
    assert table["ort_fp32"]["size_bytes"] == fp32.stat().st_size
    assert table["ort_int8_dynamic"]["size_bytes"] == int8.stat().st_size
    assert table["ort_int8_dynamic"]["size_bytes"] < table["ort_fp32"]["size_bytes"]

    text = markdown(table, kind="classifier", batch_sizes=[1, 64], threads=1)
    lines = text.splitlines()
    assert lines[0].startswith("| variant | size MB | fp32 size / size | p50 ms b1 | p90 ms b1 |")
    assert lines[0].endswith("| samples/s b64 | accuracy |")
    rows = [line for line in lines[2:] if line.startswith("| ")]
    assert [r.split(" | ")[0][2:] for r in rows] == list(table)
    for r, row in zip(rows, table.values()):
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert len(cells) == len(lines[0].strip("|").split("|"))
        assert cells[1] == f"{row['size_bytes'] / 1e6:.3f}"
        assert cells[2] == f"{table['torch_fp32']['size_bytes'] / row['size_bytes']:.2f}x"
        assert cells[-1] == f"{row['accuracy']:.4f}"
    assert rows[0].split(" | ")[2] == "1.00x"
    assert lines[-1] == "1 CPU thread(s) for every variant; latency of one call on rows of the test split."


def test_latency_is_the_time_of_one_call_after_warmup():
    calls = []

    def slow(feeds):
        calls.append(len(feeds["x"]))
        time.sleep(0.004)

    p50, p90 = latency_ms(slow, {"x": np.zeros((3, 2))}, iterations=4, warmup=2)
    assert calls == [3] * 6
    assert 4.0 <= p50 <= p90 < 200


def lm_data(batch: int, seq: int) -> dict[str, np.ndarray]:
    """Token rows, right-padded to different lengths; labels: the ids, -100 on padding (as the LM task makes them)."""
    feeds = lm_feeds(batch, seq, seed=7)
    mask = feeds["attention_mask"]
    for row in range(batch):
        mask[row, seq - 2 * row :] = 0
    labels = torch.where(mask == 1, feeds["input_ids"], torch.full_like(mask, -100))
    return {"input_ids": feeds["input_ids"].numpy(), "attention_mask": mask.numpy(), "labels": labels.numpy()}


def perplexity_by_hand(model: nn.Module, data: dict[str, np.ndarray]) -> float:
    """exp(mean NLL) of every labelled token given the ones before it, one row at a time, in float64."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids, mask, labels in zip(data["input_ids"], data["attention_mask"], data["labels"]):
            logits = model(input_ids=torch.from_numpy(ids[None]), attention_mask=torch.from_numpy(mask[None])).logits
            log_probs = torch.log_softmax(logits[0].double(), dim=-1)  # (T, V)
            for t in range(1, len(ids)):
                if labels[t] != -100:
                    nll -= float(log_probs[t - 1, labels[t]])
                    count += 1
    return math.exp(nll / count)


def test_benchmark_lm_perplexity_by_hand(tmp_path):
    model = tiny_llama()
    path = export_onnx(model, lm_feeds(2, 8, seed=0), tmp_path / "lm.onnx", kind="causal_lm")
    data = lm_data(5, 12)
    want = perplexity_by_hand(model, data)
    assert 10 < want < 4 * VOCAB  # an untrained model: about uniform over the vocabulary

    variants = [torch_variant("torch_fp32", model, "causal_lm"), ort_variant("ort_fp32", path, threads=1)]
    table = benchmark(variants, data, kind="causal_lm", batch_sizes=[1, 2], iterations=2)
    for name, row in table.items():
        assert set(row) == row_keys([1, 2], "perplexity"), name
        assert row["perplexity"] == pytest.approx(want, rel=1e-5), name
        check_timings(row, [1, 2], items_per_row=12)  # tokens per row
    # Batches of 2 rows (the last one short) give the same perplexity: it is over tokens, not batches.
    assert quality(variants[1].logits, data, "causal_lm", batch=2)["perplexity"] == pytest.approx(want, rel=1e-5)

    text = markdown(table, kind="causal_lm", batch_sizes=[1, 2], threads=1)
    assert text.splitlines()[0].endswith("| tokens/s b2 | perplexity |")
    assert len([line for line in text.splitlines() if line.startswith("| torch_fp32 |")]) == 1
    assert f"| {table['ort_fp32']['perplexity']:.4f} |" in text


# ---------------------------------------------------------------- predict on a tiny classifier


def test_predict_npz_and_csv(classifier, tmp_path):
    model, fp32, _, data = classifier
    x = data["x"][:10]
    np.savez(tmp_path / "x.npz", x=x)
    with torch.no_grad():
        probs = torch.softmax(model(torch.from_numpy(x)), dim=-1).numpy()
    lines = predict(str(fp32), str(tmp_path / "x.npz")).splitlines()
    assert len(lines) == 10
    for i, line in enumerate(lines):
        index, label, confidence = line.split("\t")
        assert int(index) == i and int(label) == probs[i].argmax()
        assert float(confidence) == pytest.approx(probs[i].max(), abs=1e-4)

    # The same samples as CSV, with a label column (ignored) among the features.
    header = [f"f{i}" for i in range(FEATURES)]
    header.insert(5, "label")
    rows = [",".join(f"{v:.9g}" for v in np.insert(sample, 5, 7)) for sample in x]
    (tmp_path / "x.csv").write_text(",".join(header) + "\n" + "\n".join(rows) + "\n")
    assert predict(str(fp32), str(tmp_path / "x.csv")).splitlines() == lines

    (tmp_path / "hole.csv").write_text(",".join(header) + "\n" + ",".join([""] + rows[0].split(",")[1:]) + "\n")
    with pytest.raises(UserError, match="line 2, column 'f0': an empty value"):
        predict(str(fp32), str(tmp_path / "hole.csv"))
    np.savez(tmp_path / "features.npz", features=x)
    with pytest.raises(UserError, match=r"holds arrays \['features'\]; it needs 'x'"):
        predict(str(fp32), str(tmp_path / "features.npz"))
    (tmp_path / "x.txt").write_text(rows[0] + "\n")
    with pytest.raises(UserError, match=r"must be \.npz \(array x\) or \.csv"):
        predict(str(fp32), str(tmp_path / "x.txt"))


# ---------------------------------------------------------------- end to end: the tiny MNIST-1D run


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory, tiny_overrides) -> tuple[Path, list[str]]:
    """The tiny run of tests/test_cli.py with the deploy stage on (its default), measured quickly."""
    run_dir = tmp_path_factory.mktemp("deploy_mnist") / "run"
    args = [a for a in tiny_overrides(run_dir) if not a.startswith("deploy.")]
    args += ["deploy.iterations=2", "deploy.batch_sizes=[1, 8]", "deploy.tensorrt=true"]
    assert load_config(None, args).deploy.enabled
    assert main(["run", *args, "--no-tensorboard"]) == 0
    return run_dir, args


def largest_int8_weight(path: Path) -> int:
    """max |q| over the int8 weight matrices of a quantized file: 127 for 8-bit weights, 64 for reduce_range."""
    tensors = initializers(path)
    return max(int(np.abs(v.astype(int)).max()) for k, v in tensors.items() if v.dtype == np.int8 and "weight" in k)


def tensorrt_usable() -> bool:
    return "TensorrtExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()


@pytest.mark.int8_kernels
def test_run_ends_with_the_deploy_table(mnist_run):
    run_dir, _ = mnist_run
    results = json.loads((run_dir / "results.json").read_text())
    deploy, info = results["deploy"], results["deploy_info"]
    assert list(deploy) == [*VARIANTS, *(["ort_tensorrt"] if tensorrt_usable() else [])]
    for name, row in deploy.items():
        assert set(row) == row_keys([1, 8], "accuracy"), name
        assert isinstance(row["size_bytes"], int) and row["size_bytes"] > 0, name
        assert 0.0 <= row["accuracy"] <= 1.0, name
        check_timings(row, [1, 8], items_per_row=1)
    # Quality by the benchmark equals the run's own evaluation of the student (fp32), and int8 stays close.
    assert deploy["torch_fp32"]["accuracy"] == deploy["ort_fp32"]["accuracy"] == results["student"]["accuracy"]
    for name in ("ort_int8_dynamic", "ort_int8_static", "torch_int8"):
        assert abs(deploy[name]["accuracy"] - results["student"]["accuracy"]) <= 0.1, name

    folder = run_dir / "deploy"
    for name, file in (("ort_fp32", ""), ("ort_int8_dynamic", ".int8-dynamic"), ("ort_int8_static", ".int8-static")):
        assert deploy[name]["size_bytes"] == (folder / f"student{file}.onnx").stat().st_size, name
    assert info["parity"]["max_rel"] < 1e-5
    assert info["quantized_nodes"]["ort_fp32"] == {"Gemm": 3}
    assert info["quantized_nodes"]["ort_int8_dynamic"] == {"MatMulInteger": 3, "DynamicQuantizeLinear": 3}
    assert info["quantized_nodes"]["ort_int8_static"]["DequantizeLinear"] >= 9
    assert info["torch_int8_backend"] == "torch_ao" and info["threads"] == 1 and info["per_channel"] is False
    # The kernel path the int8 rows ran on, and deploy.reduce_range 'auto' decided by this CPU's probe:
    # 7-bit weights (|q| <= 64) exactly where ONNX Runtime's U8S8 kernel saturates.
    kernels = info["int8_kernels"]
    assert kernels["u8s8_saturates"] is u8s8_saturates() and kernels["reduce_range_setting"] == "auto"
    assert kernels["reduce_range"] is u8s8_saturates()
    assert kernels["onnxruntime"] == ort.__version__
    assert kernels["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["table_markdown"].splitlines()[-1] == describe(kernels)
    assert largest_int8_weight(folder / "student.int8-dynamic.onnx") == (64 if kernels["reduce_range"] else 127)
    if tensorrt_usable():
        assert info["notes"] == []
    else:
        (note,) = info["notes"]
        assert note.startswith("TensorRT: skipped, ") and "\n" not in note
        assert ("onnxruntime-gpu" in note) or ("no CUDA GPU" in note)

    bench = json.loads((folder / "bench.json").read_text())
    assert bench == {"variants": deploy, **info}
    assert (folder / "bench.md").read_text() == info["table_markdown"] + "\n" + "".join(
        f"\n{n}" for n in info["notes"]
    ) + "\n"
    table = info["table_markdown"].splitlines()
    assert [line.split(" | ")[0] for line in table[2 : 2 + len(deploy)]] == [f"| {n}" for n in deploy]
    report = (run_dir / "report.md").read_text()
    assert "## Deployment (the distilled student)" in report
    assert info["table_markdown"] in report
    assert all(note in report for note in info["notes"])


def test_export_quantize_bench_commands_on_the_finished_run(mnist_run, capsys):
    run_dir, args = mnist_run
    folder = run_dir / "deploy"
    for file in folder.glob("*.onnx"):
        file.unlink()
    assert main(["export", *args]) == 0
    out = capsys.readouterr().out
    assert re.fullmatch(
        rf"exported {re.escape(str(folder / 'student.onnx'))}; ONNX Runtime vs eager on test "
        r"inputs: max abs diff \S+, max rel diff \S+\n",
        out,
    ), out
    assert sorted(f.name for f in folder.glob("*.onnx")) == ["student.onnx"]

    assert main(["quantize", *args]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and out[0].startswith("exported ")
    for line, name, file in zip(out[1:], ("ort_int8_dynamic", "ort_int8_static"), ("dynamic", "static")):
        path = folder / f"student.int8-{file}.onnx"
        assert line.startswith(f"{name}: {path} ({path.stat().st_size:,} bytes; nodes {{")
    assert "'MatMulInteger': 3" in out[1] and "'QuantizeLinear'" in out[2]

    before = json.loads((folder / "bench.json").read_text())
    assert main(["bench", *args]) == 0
    out = capsys.readouterr().out
    after = json.loads((folder / "bench.json").read_text())
    assert after["table_markdown"] in out and f"JSON in {folder / 'bench.json'}" in out
    assert list(after["variants"]) == list(before["variants"])
    for name, row in after["variants"].items():  # measured again: same sizes and accuracy
        assert row["accuracy"] == before["variants"][name]["accuracy"], name
        if name != "torch_int8":
            assert row["size_bytes"] == before["variants"][name]["size_bytes"], name

    # An explicit deploy.reduce_range is for another target: kept whatever this CPU is.
    for setting, largest in (("true", 64), ("false", 127)):
        assert main(["quantize", *args, f"deploy.reduce_range={setting}"]) == 0
        capsys.readouterr()
        for file in ("dynamic", "static"):
            assert largest_int8_weight(folder / f"student.int8-{file}.onnx") == largest, (setting, file)
    assert main(["quantize", *args]) == 0  # back to this machine's choice for the predict tests below
    capsys.readouterr()


@pytest.fixture(scope="module")
def mnist_test_set(mnist_run, tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """The run's test inputs as test.npz, and the eager student's logits on them."""
    run_dir, args = mnist_run
    x = ClassifierWorkload(load_config(None, args), torch.device("cpu")).test_arrays()["x"]  # (40, 40)
    path = tmp_path_factory.mktemp("predict") / "test.npz"
    np.savez(path, x=x)
    student = MLP((FEATURES,), CLASSES, [32, 32], dropout=0.1)
    student.load_state_dict(load_file(run_dir / "student" / "model.safetensors"))
    with torch.no_grad():
        logits = student.eval()(torch.from_numpy(x)).numpy()
    return path, x, logits


def printed_rows(out: str) -> list[tuple[int, int, float]]:
    rows = []
    for line in out.splitlines():
        index, label, confidence = line.split("\t")
        rows.append((int(index), int(label), float(confidence)))
    return rows


@pytest.mark.int8_kernels
def test_predict_command_with_the_int8_model(mnist_run, mnist_test_set, capsys):
    run_dir, _ = mnist_run
    path, x, logits = mnist_test_set
    assert main(["predict", str(run_dir / "deploy" / "student.int8-dynamic.onnx"), str(path)]) == 0
    rows = printed_rows(capsys.readouterr().out)
    assert [r[0] for r in rows] == list(range(len(x)))
    agreement = np.mean([label == want for (_, label, _), want in zip(rows, logits.argmax(1))])
    assert agreement >= 0.9
    assert all(1 / CLASSES <= r[2] <= 1 for r in rows)

    # fp32 ONNX: exactly the eager classes and softmax confidences; a CSV of the same rows prints the same.
    assert main(["predict", str(run_dir / "deploy" / "student.onnx"), str(path)]) == 0
    out = capsys.readouterr().out
    probs = torch.softmax(torch.from_numpy(logits), dim=-1).numpy()
    for (_, label, confidence), p in zip(printed_rows(out), probs):
        assert label == p.argmax() and confidence == pytest.approx(p.max(), abs=1e-4)
    csv = path.with_suffix(".csv")
    csv.write_text(
        ",".join(f"x{i}" for i in range(FEATURES)) + "\n" + "\n".join(",".join(f"{v:.9g}" for v in r) for r in x) + "\n"
    )
    assert main(["predict", str(run_dir / "deploy" / "student.onnx"), str(csv)]) == 0
    assert capsys.readouterr().out == out


def test_predict_command_bad_input(mnist_run, mnist_test_set, tmp_path, capsys):
    run_dir, _ = mnist_run
    path, x, _ = mnist_test_set
    model = str(run_dir / "deploy" / "student.int8-dynamic.onnx")
    np.savez(tmp_path / "narrow.npz", x=x[:3, :39])
    line = one_error(capsys, ["predict", model, str(tmp_path / "narrow.npz")])
    assert "has samples of shape (39,); the model expects (40,)" in line
    line = one_error(capsys, ["predict", str(tmp_path / "missing.onnx"), str(path)])
    assert line == f"{ERROR}ONNX model '{tmp_path / 'missing.onnx'}' does not exist"
    (tmp_path / "fake.onnx").write_text("not a model\n")
    line = one_error(capsys, ["predict", str(tmp_path / "fake.onnx"), str(path)])
    assert line.startswith(f"{ERROR}'{tmp_path / 'fake.onnx'}' is not a loadable ONNX model (")
    line = one_error(capsys, ["predict", model, str(tmp_path / "absent.npz")])
    assert line == f"{ERROR}input file '{tmp_path / 'absent.npz'}' does not exist"


@pytest.mark.parametrize(
    "override, key",
    [
        ("deploy.bits=4", "deploy.bits"),
        ("deploy.observe_steps=0", "deploy.observe_steps"),
        ("deploy.reduce_range=maybe", "deploy.reduce_range"),
    ],
)
def test_bad_deploy_config_is_refused(override, key, tmp_path, capsys):
    line = one_error(capsys, ["print-config", f"output_dir={tmp_path / 'run'}", override])
    assert key in line and override.split("=")[1] in line
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- end to end: the tiny stdlib LM run


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, tiny_lm_args) -> Path:
    """The tiny stdlib run of tests/lm/test_lm_pipeline.py with the deploy stage on."""
    root = tmp_path_factory.mktemp("deploy_lm")
    args = [*tiny_lm_args(root), "deploy.iterations=2", "deploy.batch_sizes=[1, 2]"]
    assert main(["run", *args, "--no-tensorboard"]) == 0
    return root / "run"


def test_lm_run_deploy_variants_report_perplexity(lm_run):
    results = json.loads((lm_run / "results.json").read_text())
    deploy = results["deploy"]
    assert list(deploy) == list(VARIANTS)
    fp32 = results["student"]["perplexity"]
    for name, row in deploy.items():
        assert set(row) == row_keys([1, 2], "perplexity"), name
        assert isinstance(row["size_bytes"], int) and row["size_bytes"] > 0, name
        check_timings(row, [1, 2], items_per_row=32)  # data.stdlib.seq_len tokens a row
        assert row["perplexity"] == pytest.approx(fp32, rel=1e-5 if name.endswith("fp32") else 0.05), name
    info = results["deploy_info"]
    assert info["parity"]["max_rel"] < 1e-5 and info["notes"] == []
    assert info["quantized_nodes"]["ort_int8_dynamic"]["MatMulInteger"] == 8
    for file in ("student.onnx", "student.int8-dynamic.onnx", "student.int8-static.onnx", "tokenizer.json"):
        assert (lm_run / "deploy" / file).is_file(), file


def greedy_by_hand(folder: Path, prompt: str, new_tokens: int) -> str:
    """Greedy decoding with the eager student from its Hugging Face folder, one argmax at a time."""
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        for _ in range(new_tokens):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
            if ids[-1] == tokenizer.eos_token_id:
                break
    return tokenizer.decode(ids)


def test_predict_command_generates_text_with_the_lm(lm_run, tmp_path, capsys):
    onnx_file = lm_run / "deploy" / "student.onnx"
    assert main(["predict", str(onnx_file), "def main(", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("def main(")
    assert out == greedy_by_hand(lm_run / "student" / "hf", "def main(", 6) + "\n"
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("def main(")
    assert main(["predict", str(onnx_file), str(prompt), "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == out

    assert main(["predict", str(lm_run / "deploy" / "student.int8-dynamic.onnx"), "import os\n"]) == 0
    assert capsys.readouterr().out.startswith("import os\n")
    line = one_error(capsys, ["predict", str(onnx_file), "def main(", "--max-new-tokens", "0"])
    assert "--max-new-tokens 0 is not allowed" in line
