"""Smoke tests of the benchmark scripts: each runs in its ``--quick`` form and writes JSON of the documented shape.

No timing is asserted (the machines that run the tests are shared); only that the numbers exist and are positive,
and that the reference training algorithm of benchmarks/training_throughput.py computes the same loss as ours.
"""
import importlib.util
import json
import math
import os

import pytest
import torch

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def loadBenchmark(name):
    path = os.path.join(REPOSITORY, "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def restoredTorchState():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    torch.set_flush_denormal(False)


def test_bias_overhead_quick(tmp_path, restoredTorchState):
    benchmark = loadBenchmark("bias_overhead")
    path = tmp_path / "rows.json"
    benchmark.main(["--quick", "--json", str(path)])
    rows = json.loads(path.read_text())
    assert isinstance(rows, list)
    variants = {row["variant"] for row in rows}
    assert {"plain", "naive", "nct", "nct-mts4", "nct-mts8", "nct-float64", "student", "student-mts8"} <= variants
    for row in rows:
        assert {"platform", "system", "variant", "ns_per_day", "ratio_to_plain"} <= set(row)
        assert row["ns_per_day"] > 0 and math.isfinite(row["ns_per_day"])
        assert row["ratio_to_plain"] > 0
    assert all(row["ratio_to_plain"] == 1.0 for row in rows if row["variant"] == "plain")


def test_training_throughput_quick(tmp_path, restoredTorchState):
    benchmark = loadBenchmark("training_throughput")
    path = tmp_path / "training.json"
    benchmark.main(["--quick", "--json", str(path)])
    result = json.loads(path.read_text())
    rows = {row["variant"]: row for row in result["throughput"]}
    assert {"reference", "ours", "ours+linear"} <= set(rows)
    for row in rows.values():
        assert row["samples_per_s"] > 0 and row["ratio_to_reference"] > 0
    assert result["settings"]["dim"] == 30 and result["settings"]["batch"] == 200
    # The baseline is the same model computed the reference way: equal loss and gradients (float64).
    equivalence = result["equivalence"]
    assert equivalence["nll_difference"] < 1e-8 * max(1.0, abs(equivalence["nll_ours"]))
    assert equivalence["log_omega_grad_max_difference"] < 1e-8 * max(1.0, equivalence["log_omega_grad_max"])
    loss = result["time_to_loss"]
    assert loss["ours"]["curve"] and loss["reference"]["curve"]
    assert all(row["ms_per_step"] > 0 for row in result["denormals"])
    floor = {row["variant"]: row for row in result["matmul_floor"]}
    assert set(floor) == {"reference", "ours"}
    for row in floor.values():
        assert 0 < row["matmul_ms_per_step"] and 0 < row["matmul_share"] <= 1 and row["ops_per_step"] > 100
    chain = result["harmonic_chain"]
    if chain["available"]:
        # Same function and same prior draws: every variant starts from the same variational free energy.
        start = [entry["curve"][0]["free_energy"] for entry in (chain["ours"], chain["reference"],
                                                               chain["reference+our-optimiser"])]
        assert start[0] == pytest.approx(start[1], rel=1e-5) == start[2]
        for name, section in chain["versus"].items():
            assert section["target_free_energy"] == section[name]["final_free_energy"]
            assert section[name]["seconds"] is not None  # a variant reaches its own final value


def test_reference_flow_momenta_are_canonical(restoredTorchState):
    """The reference's momenta from a second pass, P = p ∂q/∂Q (encoding) and p = P ∂Q/∂q (decoding), equal the
    per-layer cotangent lift of nct_openmm.core, with the linear point layer included."""
    benchmark = loadBenchmark("training_throughput")
    from nct_openmm.core import AffineCoupling, FlowConfig, model_from_data

    generator = torch.Generator().manual_seed(0)
    q = torch.randn(300, 6, generator=generator, dtype=torch.float64) * torch.linspace(0.5, 2.0, 6,
                                                                                     dtype=torch.float64)
    model = model_from_data(FlowConfig(dim=6, n_couplings=4, hidden=8, linear_point=True), q.float())
    with torch.no_grad():
        for layer in model.layers:
            if isinstance(layer, AffineCoupling):
                layer.net[-1].weight.normal_(0.0, 0.3, generator=generator)
        model.layers[-2].generator.normal_(0.0, 0.2, generator=generator)
    reference = benchmark.referenceFrom(model).double()
    model = model.double()
    p = torch.randn(q.shape, generator=generator, dtype=torch.float64)
    Q, P = model.encode(q, p)
    QReference = reference(q)
    PReference, = torch.autograd.grad(reference.inverse(QReference), QReference, p)
    torch.testing.assert_close(QReference, Q, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(PReference, P, rtol=1e-10, atol=1e-10)
    qBack, pBack = model.decode(Q, P)
    qReference = reference.inverse(Q.detach().requires_grad_(False)).detach().requires_grad_(True)
    pReference, = torch.autograd.grad(reference(qReference), qReference, P.detach())
    torch.testing.assert_close(qReference, qBack, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(pReference, pBack, rtol=1e-10, atol=1e-10)


def test_physics_check_quick(tmp_path, restoredTorchState):
    """The fast metadynamics path applies the bias of app.Metadynamics with the same hills (both against the exact
    Gaussian sum, closer on a finer grid), and the statistics section runs every variant."""
    benchmark = loadBenchmark("physics_check")
    path = tmp_path / "physics.json"
    benchmark.main(["--quick", "--json", str(path)])
    result = json.loads(path.read_text())
    coarse, fine = (result["same_bias"][str(nodes)] for nodes in benchmark.MODE_NODES)
    for same in (coarse, fine):
        assert same["inside_grid"] and same["hills"] >= 6
        assert max(row["bias_kj_mol"] for row in same["frames"]) > 0.1  # the frames feel the bias
        # Two interpolants of the same grid of Gaussians: equal far below a hill height, close to the exact sum.
        assert max(row["bias_error_fast_kj_mol"] for row in same["frames"]) < 1e-3 * same["max_height_kj_mol"]
        assert same["summary"]["fast_vs_plain"]["energy"] < 1e-5
        assert same["summary"]["fast_vs_exact"]["forces"] < 1e-4
    assert fine["summary"]["fast_vs_exact"]["energy"] < coarse["summary"]["fast_vs_exact"]["energy"]
    assert set(result["statistics"]["summary"]) == {"plain", "fast", "fast-mts8"}


def test_gpu_operations_quick(tmp_path, restoredTorchState):
    benchmark = loadBenchmark("gpu_operations")
    path = tmp_path / "operations.json"
    benchmark.main(["--quick", "--json", str(path)])
    rows = {row["cv"]: row for row in json.loads(path.read_text())}
    assert set(rows) == {"student", "student-distances", "flow"}
    parts = ["input", "input_pullback", "network", "grid_lookup", "hill_update"]
    for row in rows.values():
        assert all(row[part] > 0 for part in parts)
        # The parts run inside the whole evaluation, which adds the selection, the energy and its backward.
        assert row["evaluation"] > sum(row[part] for part in parts)
        # What is counted is the CUDA code path: the SVD-free alignment.
        assert row["svd_free"]
    # Kernel counts are deterministic for the pinned torch (RESULTS.md sections 1e, 1f, 1g): guards against a change
    # that lengthens the chain of kernels of a captured graph again (e.g. per-mode hill windows, 55; a gather and a
    # scatter around every coupling, 289).
    assert rows["student"]["input"] <= 76 and rows["student"]["hill_update"] <= 35
    assert rows["flow"]["network"] <= 239
    # A student on distances needs no alignment: a handful of operations in front of its network.
    assert rows["student-distances"]["input"] + rows["student-distances"]["input_pullback"] <= 8
    assert rows["student-distances"]["evaluation"] <= 106
