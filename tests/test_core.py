"""Physics of the flow core: bijectivity, the symplectic condition, unit Jacobian, the cotangent lift, the prior,
and the persistence of models and training."""
import copy
import doctest
import math

import numpy as np
import pytest
import torch

from nct_openmm.core import (AffineCoupling, AffinePoint, FlowConfig, LinearPoint, LinearSymplectic, ModelFileError,
                             NCTModel, coupling_masks, fit_likelihood, fit_variational, model_from_data,
                             negative_log_likelihood, path_gradient_objective, variational_loss,
                             variational_objective)
from nct_openmm import messages
from nct_openmm.core import layers, linear, model as model_module, prior, training
from nct_openmm.core.serialization import save_payload

DIM = 6
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


def randomize(module, seed=0, std=0.4):
    """Random weights everywhere (an untrained flow is the identity and would prove nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return module


def random_affine(dim, seed=1):
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(dim, dim, generator=generator) + 3 * torch.eye(dim)
    return AffinePoint(torch.randn(dim, generator=generator), matrix, torch.rand(dim, generator=generator) + 0.5)


def point_layers():
    conditioning, transformed = coupling_masks(DIM, 1, "random", seed=3)[0]
    return {
        "coupling": randomize(AffineCoupling(conditioning, transformed, hidden=16, depth=2)),
        "linear_point": randomize(LinearPoint(DIM), std=0.2),
        "affine": random_affine(DIM),
    }


def full_model(dtype=torch.float64, linear_symplectic=False, seed=0, std=0.2):
    config = FlowConfig(dim=DIM, n_couplings=4, hidden=16, linear_symplectic=linear_symplectic)
    model = NCTModel(config, pre=random_affine(DIM, 5), post=random_affine(DIM, 6))
    return randomize(model, seed, std=std).to(dtype)


def phase_space_map(layer_or_model):
    """The map x = (q, p) ↦ z = (Q, P) as a function of one flat vector, for Jacobians."""
    def f(x):
        q, p = x[:DIM][None], x[DIM:][None]
        if isinstance(layer_or_model, NCTModel):
            Q, P = layer_or_model.encode(q, p)
        elif isinstance(layer_or_model, LinearSymplectic):
            Q, P = layer_or_model(q, p)
        else:
            Q, P = layer_or_model.forward_with_momentum(q, p)
        return torch.cat([Q[0], P[0]])
    return f


def symplectic_form(n, dtype=torch.float64):
    J = torch.zeros(2 * n, 2 * n, dtype=dtype)
    J[:n, n:] = torch.eye(n, dtype=dtype)
    J[n:, :n] = -torch.eye(n, dtype=dtype)
    return J


SYMPLECTIC_MAPS = {**{name: (lambda name=name: point_layers()[name]) for name in ("coupling", "linear_point",
                                                                                    "affine")},
                   "linear_symplectic": lambda: randomize(LinearSymplectic(DIM), std=0.2),
                   "model": lambda: full_model(),
                   "model_with_linear_symplectic": lambda: full_model(linear_symplectic=True)}


@pytest.mark.parametrize("name", SYMPLECTIC_MAPS)
def test_symplectic_condition_and_unit_jacobian(name):
    mapping = SYMPLECTIC_MAPS[name]().double()
    J = symplectic_form(DIM)
    for seed in range(3):
        x = torch.randn(2 * DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        M = torch.func.jacrev(phase_space_map(mapping))(x)
        assert torch.allclose(M @ J @ M.T, J, atol=1e-8, rtol=0)
        assert abs(torch.linalg.slogdet(M).logabsdet) < 1e-8


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["coupling", "linear_point", "affine"])
def test_point_layer_bijective_with_momenta(name, dtype):
    layer = point_layers()[name].to(dtype)
    generator = torch.Generator().manual_seed(7)
    q, p = torch.randn(32, DIM, generator=generator).to(dtype), torch.randn(32, DIM, generator=generator).to(dtype)
    Q, P = layer.forward_with_momentum(q, p)
    q2, p2 = layer.inverse_with_momentum(Q, P)
    tol = TOLERANCE[dtype]
    assert torch.allclose(q2, q, atol=tol, rtol=tol) and torch.allclose(p2, p, atol=tol, rtol=tol)
    assert torch.allclose(layer(q), Q, atol=tol) and torch.allclose(layer.inverse(Q), q, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("linear_symplectic", [False, True])
def test_model_bijective(dtype, linear_symplectic):
    # Weights of a trained model's size; the float32 bound then holds with room to spare.
    model = full_model(dtype, linear_symplectic, std=0.05)
    generator = torch.Generator().manual_seed(11)
    q, p = torch.randn(64, DIM, generator=generator).to(dtype), torch.randn(64, DIM, generator=generator).to(dtype)
    Q, P = model.encode(q, p)
    q2, p2 = model.decode(Q, P)
    tol = TOLERANCE[dtype] * 10  # several layers of rounding
    assert torch.allclose(q2, q, atol=tol, rtol=tol) and torch.allclose(p2, p, atol=tol, rtol=tol)


def test_cotangent_lift_equals_autograd_definition():
    """P = p ∂q/∂Q, with ∂q/∂Q the full Jacobian of the inverse point map from autograd."""
    model = full_model()
    generator = torch.Generator().manual_seed(2)
    for _ in range(3):
        q = torch.randn(DIM, dtype=torch.float64, generator=generator)
        p = torch.randn(DIM, dtype=torch.float64, generator=generator)
        Q, P = model.encode(q[None], p[None])
        dq_dQ = torch.func.jacrev(lambda Q_: model.inverse_transform(Q_[None])[0])(Q[0])
        assert torch.allclose(P[0], p @ dq_dQ, atol=1e-10)
        assert torch.allclose(Q[0], model.transform(q[None])[0], atol=1e-12)


def _parameter_gradients(model, loss):
    return [g for g in torch.autograd.grad(loss, list(model.parameters()), allow_unused=True) if g is not None]


def test_likelihood_gradients_equal_those_of_the_autograd_momenta():
    """Training differentiates the closed-form cotangent lift once; the definition ``P = p ∂q/∂Q`` taken by autograd
    (a second, inverse pass differentiated twice, the reference algorithm) must give the same parameter gradients."""
    model = full_model()
    generator = torch.Generator().manual_seed(4)
    q = torch.randn(16, DIM, dtype=torch.float64, generator=generator)
    p = torch.randn(16, DIM, dtype=torch.float64, generator=generator)
    closed_form = _parameter_gradients(model, negative_log_likelihood(model, q, p))
    Q = model.transform(q)
    P, = torch.autograd.grad(model.inverse_transform(Q), Q, p, create_graph=True)
    definition = _parameter_gradients(model, -model.prior.log_prob(Q, P).mean())
    assert len(closed_form) == len(definition) == len(list(model.parameters()))
    for a, b in zip(closed_form, definition):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-8 * float(b.abs().max()))


def test_variational_gradients_equal_those_of_the_autograd_momenta():
    """The same for decoding, ``p = P ∂Q/∂q``, inside the variational loss."""
    model = full_model()

    def hamiltonian(q, p):
        return 0.5 * (p ** 2).sum(-1) + 0.25 * (q ** 4).sum(-1)

    closed_form = _parameter_gradients(model, variational_loss(model, hamiltonian, 16, 1.0,
                                                               torch.Generator().manual_seed(5)))
    Q, P = model.prior.sample(16, torch.Generator().manual_seed(5))
    q = model.inverse_transform(Q)
    p, = torch.autograd.grad(model.transform(q), q, P, create_graph=True)
    definition = _parameter_gradients(model, (model.prior.log_prob(Q, P) + hamiltonian(q, p)).mean())
    for a, b in zip(closed_form, definition):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-8 * float(b.abs().max()))


def test_closed_form_mlp_refuses_other_networks():
    with pytest.raises(ValueError, match="Linear layers with SiLU"):
        layers.SiLUMLP(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))


def test_scripted_coupling_pullback_is_the_jacobian():
    """forward_saving and pullback compiled by TorchScript against autograd, and their halves forms (which the
    exported CVs run) on coordinates split into the conditioning and the transformed ones."""
    torch.manual_seed(0)
    coupling = layers.AffineCoupling(torch.tensor([0, 3, 4]), torch.tensor([1, 2]), hidden=16, depth=3).double()
    for parameter in coupling.parameters():
        torch.nn.init.normal_(parameter, std=0.5)
    scripted = torch.jit.script(coupling)
    q = torch.randn(1, 5, dtype=torch.float64)
    Q, saved = scripted.forward_saving(q)
    assert torch.allclose(Q, coupling(q), rtol=1e-14, atol=1e-14)
    jacobian = torch.autograd.functional.jacobian(lambda x: coupling(x)[0], q)[:, 0, :]
    cotangents = torch.randn(3, 5, dtype=torch.float64)
    assert torch.allclose(scripted.pullback(saved, cotangents), cotangents @ jacobian, rtol=1e-12, atol=1e-12)
    a, b = coupling.conditioning, coupling.transformed
    Qb, saved = scripted.halves_forward_saving(q[:, a], q[:, b])
    assert torch.equal(Qb, Q[:, b])
    pa, pb = scripted.halves_pullback(saved, cotangents[:, a], cotangents[:, b])
    assert torch.allclose(torch.cat([pa, pb], -1), (cotangents @ jacobian)[:, torch.cat([a, b])], rtol=1e-12,
                          atol=1e-12)


@pytest.mark.parametrize("module", [layers, linear, model_module, prior, training, messages])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_point_transformation_latent_positions_ignore_momenta():
    model = full_model()
    q = torch.randn(4, DIM, dtype=torch.float64)
    Q1, _ = model.encode(q, torch.randn(4, DIM, dtype=torch.float64))
    Q2, _ = model.encode(q, torch.randn(4, DIM, dtype=torch.float64))
    assert torch.allclose(Q1, Q2)
    with pytest.raises(ValueError, match="point transformation"):
        full_model(linear_symplectic=True).transform(q)


def test_prior_density_is_normalised():
    """Integrate exp(ln N) on a grid in one mode (the modes factorise), for two frequencies."""
    for omega in (0.3, 4.0):
        model = NCTModel(FlowConfig(dim=1, linear_point=False), frequencies=torch.tensor([omega])).double()
        Q = torch.linspace(-12 / omega, 12 / omega, 801, dtype=torch.float64)
        P = torch.linspace(-12, 12, 801, dtype=torch.float64)
        grid_Q, grid_P = torch.meshgrid(Q, P, indexing="ij")
        density = torch.exp(model.prior.log_prob(grid_Q.reshape(-1, 1), grid_P.reshape(-1, 1)))
        integral = density.sum() * (Q[1] - Q[0]) * (P[1] - P[0])
        assert abs(float(integral.detach()) - 1.0) < 1e-6


def test_prior_samples_have_the_harmonic_variances():
    model = NCTModel(FlowConfig(dim=3), frequencies=torch.tensor([0.5, 1.0, 3.0]))
    Q, P = model.prior.sample(200000, torch.Generator().manual_seed(0))
    assert torch.allclose(Q.var(0), torch.tensor([4.0, 1.0, 1 / 9]), rtol=0.02)
    assert torch.allclose(P.var(0), torch.ones(3), rtol=0.02)


def test_frequencies_sorted_and_slow_modes_follow_them():
    model = NCTModel(FlowConfig(dim=3, n_couplings=2), frequencies=torch.tensor([2.0, 0.5, 1.0]))
    assert model.frequencies().tolist() == [0.5, 1.0, 2.0]
    q = torch.randn(5, 3)
    Q = model.transform(q)
    assert torch.allclose(model.slow_modes(q, 2), Q[:, [1, 2]])
    assert torch.allclose(model.slow_modes(q, 1, scaled=True), Q[:, [1]] * 0.5)


def test_mode_signs_are_deterministic():
    q = torch.randn(4000, 2) * torch.tensor([2.0, 1.0])
    q[:, 0] = q[:, 0].abs() - 1.5  # skewed slow mode
    model = model_from_data(FlowConfig(dim=2, n_couplings=2, hidden=8), q)

    def skew_of_slowest():
        slow = model.slow_modes(q, 1)[:, 0]
        return float(((slow - slow.mean()) ** 3).mean())

    # From either sign the convention lands on the same one, so one of the two starts is a real flip.
    skews = []
    for start in (1.0, -1.0):
        model.mode_signs.fill_(start)
        skews.append(skew_of_slowest())
        model.fix_mode_signs(q)
        assert skew_of_slowest() > 0
    assert min(skews) < 0


def test_model_file_round_trip(tmp_path):
    model = full_model(torch.float32)
    path = tmp_path / "flow.pt"
    model.save(path, metadata={"note": "test"})
    loaded = NCTModel.load(path)
    q, p = torch.randn(8, DIM), torch.randn(8, DIM)
    for a, b in zip(model.encode(q, p), loaded.encode(q, p)):
        assert torch.equal(a, b)
    assert loaded.metadata == {"note": "test"}


def test_bad_model_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        NCTModel.load(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a model")
    with pytest.raises(ModelFileError, match="corrupt or foreign"):
        NCTModel.load(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(ModelFileError, match="not an nct_openmm model"):
        NCTModel.load(foreign)
    newer = tmp_path / "newer.pt"
    torch.save({"format": "nct_openmm.model", "format_version": 99, "kind": "flow"}, newer)
    with pytest.raises(ModelFileError, match="version 99"):
        NCTModel.load(newer)
    wrong_kind = tmp_path / "molecular.pt"
    torch.save({"format": "nct_openmm.model", "format_version": 1, "kind": "molecular"}, wrong_kind)
    with pytest.raises(ModelFileError, match="holds a 'molecular' model, expected 'flow'"):
        NCTModel.load(wrong_kind)
    damaged = tmp_path / "damaged.pt"
    state = full_model().state()
    del state["state_dict"]["prior.log_omega"]
    torch.save({"format": "nct_openmm.model", "format_version": 1, "kind": "flow", "flow": state}, damaged)
    with pytest.raises(ModelFileError, match="incomplete or damaged.*RuntimeError"):
        NCTModel.load(damaged)


def test_a_float64_model_round_trips_exactly_and_unstorable_metadata_is_refused_at_save(tmp_path):
    model = full_model(dtype=torch.float64)
    path = tmp_path / "model.pt"
    model.save(path, metadata={"note": "float64", "omega": [1.0, 2.0]})
    loaded = NCTModel.load(path)
    assert loaded.prior.log_omega.dtype == torch.float64
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match=r"payload\['metadata'\]\['omega'\] is a float64"):
        model.save(tmp_path / "other.pt", metadata={"omega": np.float64(1.0)})
    assert not (tmp_path / "other.pt").exists()


def _anisotropic_data(n=2048, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(n, 3, generator=generator) * torch.tensor([3.0, 1.0, 0.3])
    q[:, 1] += 0.3 * q[:, 0] ** 2 / 3.0
    return q


def test_likelihood_checkpoint_resumes_to_identical_numbers(tmp_path):
    q = _anisotropic_data()
    config = FlowConfig(dim=3, n_couplings=2, hidden=16)
    options = dict(batch_size=100, eval_every=7, progress=False, seed=3)

    uninterrupted = model_from_data(config, q)
    history = fit_likelihood(uninterrupted, q, max_steps=30, **options)

    # A run that crashes at step 18: its last checkpoint (every 5 steps) is from step 15, mid evaluation window.
    checkpoint = str(tmp_path / "ckpt.pt")
    crashing = model_from_data(config, q)
    original = training.negative_log_likelihood
    calls = []

    def crash_at_step_18(*args, **kwargs):
        calls.append(1)
        if len(calls) == 18:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    training.negative_log_likelihood = crash_at_step_18
    try:
        with pytest.raises(KeyboardInterrupt):
            fit_likelihood(crashing, q, max_steps=30, checkpoint=checkpoint, checkpoint_every=5, **options)
    finally:
        training.negative_log_likelihood = original
    assert torch.load(checkpoint, weights_only=True)["step"] == 15
    resumed = model_from_data(config, q)
    history_resumed = fit_likelihood(resumed, q, max_steps=30, checkpoint=checkpoint, **options)

    assert history_resumed.__dict__ == history.__dict__ | {"elapsed": history_resumed.elapsed}
    for (name, a), b in zip(uninterrupted.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_checkpoint_keeps_the_rates_and_moments_but_not_the_optimizer_mode_of_its_run():
    """An eager run's checkpoint resumed with cuda_graph=True, and the other way round: torch's loader would hand
    over capturable/fused and the rate's type too, and capture then refuses the optimiser (CUDA only, so checked
    here on the optimisers themselves)."""
    model = NCTModel(FlowConfig(dim=2, n_couplings=1, hidden=4))
    eager = training.flow_optimizer(model, lr=5e-4)
    model.prior.log_omega.sum().backward()
    eager.step()
    captured = training.flow_optimizer(model, capturable=True)
    rate = captured.param_groups[0]["lr"]
    training.load_optimizer_state(captured, eager.state_dict())
    assert [group["capturable"] for group in captured.param_groups] == [True, True]
    assert captured.param_groups[0]["lr"] is rate  # the tensor a captured step holds
    assert float(rate) == pytest.approx(5e-4, rel=1e-6)
    moments = eager.state[model.prior.log_omega]["exp_avg"]
    assert torch.equal(captured.state[model.prior.log_omega]["exp_avg"], moments)
    resumed = training.flow_optimizer(model)
    training.load_optimizer_state(resumed, captured.state_dict())
    assert [(group["capturable"], group["fused"]) for group in resumed.param_groups] == [(False, True)] * 2
    assert [group["lr"] for group in resumed.param_groups] == pytest.approx([5e-4, 5e-3], rel=1e-6)


def _scheduled_run(offset, evaluations, **options):
    """A Trainer whose monitored loss is ``offset`` plus the given sequence; returns its history."""
    model = NCTModel(FlowConfig(dim=2, n_couplings=1, hidden=4))
    values = iter(evaluations)

    def loss_fn(generator, step):
        return (model.prior.log_omega ** 2).sum()

    trainer = training.Trainer(model, loss_fn, lambda: offset + next(values), eval_every=1, progress=False,
                               **options)
    return trainer.fit(len(evaluations))


def test_the_schedule_ignores_the_sign_and_offset_of_the_loss():
    """Rate reductions and stops follow the trainer's own improvement test, so the sign of the loss (a variational
    free energy is often negative) changes nothing. With ReduceLROnPlateau's relative threshold, an offset of −1000
    let slightly worse values count as improvements and the rate never dropped."""
    evaluations = [5.0, 4.0, 3.0, 3.00001, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0]
    runs = [_scheduled_run(offset, evaluations, lr_patience=1, patience=6) for offset in (-1000.0, 0.0, 1000.0)]
    for run in runs[1:]:
        assert run.lr == runs[0].lr and run.stopped == runs[0].stopped and run.step == runs[0].step
    assert runs[0].lr[:5] == [1e-3] * 5 and runs[0].lr[5] == pytest.approx(5e-4)  # 2 evaluations without gain
    assert runs[0].stopped == "plateau"


def test_training_stops_at_the_minimum_rate_only_after_a_window_there():
    history = _scheduled_run(0.0, [1.0] * 20, lr=1e-3, lr_patience=0, lr_factor=0.5, min_lr=2.5e-4, patience=100)
    assert history.stopped == "min_lr"
    assert history.lr == pytest.approx([1e-3, 1e-3, 5e-4, 2.5e-4])  # one evaluation at min_lr, then the stop


def test_a_checkpoint_of_other_data_is_refused_at_resume(tmp_path):
    q = _anisotropic_data()
    config = FlowConfig(dim=3, n_couplings=1, hidden=4)
    checkpoint = str(tmp_path / "ckpt.pt")
    options = dict(batch_size=100, max_steps=5, progress=False, checkpoint=checkpoint)
    fit_likelihood(model_from_data(config, q), q, **options)
    saved = open(checkpoint, "rb").read()
    with pytest.raises(ValueError, match="belongs to another training problem .*train.*delete it"):
        fit_likelihood(model_from_data(config, q[::2]), q[::2], **options)
    with pytest.raises(ValueError, match="differs in kT"):
        fit_likelihood(model_from_data(config, q), q, kT=2.0, **options)
    assert open(checkpoint, "rb").read() == saved  # nothing overwritten


@pytest.mark.parametrize("content, message", [
    ({"format": "nct_openmm"}, "is not a training checkpoint \\(it lacks best_state, extra_state, generator"),
    (b"not a zip archive at all", "cannot read the checkpoint .*bad.pt \\(corrupt, or not a checkpoint\\)"),
])
def test_a_file_that_is_no_checkpoint_is_refused_at_resume_naming_it(tmp_path, content, message):
    q = _anisotropic_data()
    path = tmp_path / "bad.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, str(path))
    with pytest.raises(ValueError, match=message):
        fit_likelihood(model_from_data(FlowConfig(dim=3, n_couplings=1, hidden=4), q), q, batch_size=100,
                       max_steps=5, progress=False, checkpoint=str(path))


def test_a_failed_save_leaves_no_temporary_file(tmp_path, monkeypatch):
    def full_disk(document, path):
        open(path, "wb").write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_payload(str(tmp_path / "model.pt"), {"model": "x"})
    assert list(tmp_path.iterdir()) == []


def test_a_non_finite_loss_leaves_the_best_weights_in_the_model():
    model = NCTModel(FlowConfig(dim=2, n_couplings=1, hidden=4))
    values = iter([3.0, 2.0, 2.5])

    def loss_fn(generator, step):
        loss = (model.prior.log_omega ** 2).sum()
        return loss * float("nan") if step == 3 else loss

    trainer = training.Trainer(model, loss_fn, lambda: next(values), eval_every=1, progress=False)
    best = []
    original = trainer._evaluate

    def evaluate(*args, **kwargs):
        original(*args, **kwargs)
        if trainer.history.val_loss[-1] == trainer.history.best_val_loss:
            best.append({k: v.clone() for k, v in model.state_dict().items()})

    trainer._evaluate = evaluate
    with pytest.raises(FloatingPointError, match="at step 3.*best weights so far, from step 2"):
        trainer.fit(10)
    for name, value in model.state_dict().items():
        assert torch.equal(value, best[-1][name]), name


def test_variational_checkpoint_resumes_to_identical_numbers(tmp_path):
    def hamiltonian(q, p):
        return 0.5 * (p ** 2).sum(-1) + 0.5 * (q ** 2 * torch.tensor([0.25, 4.0])).sum(-1)

    config = FlowConfig(dim=2, n_couplings=2, hidden=8)
    options = dict(batch_size=64, eval_every=5, eval_batch=256, progress=False, seed=1)
    uninterrupted = NCTModel(config)
    fit_variational(uninterrupted, hamiltonian, max_steps=20, **options)
    checkpoint = str(tmp_path / "ckpt.pt")
    fit_variational(NCTModel(config), hamiltonian, max_steps=10, checkpoint=checkpoint, checkpoint_every=10,
                    **options)
    resumed = NCTModel(config)
    fit_variational(resumed, hamiltonian, max_steps=20, checkpoint=checkpoint, **options)
    for a, b in zip(uninterrupted.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_likelihood_recovers_gaussian_frequencies():
    """For Gaussian data with standard deviations σ_k the maximum-likelihood ω_k are 1/σ_k; training starts from
    ω = 1 (not from the data) so that the frequencies have to move."""
    generator = torch.Generator().manual_seed(0)
    sigma = torch.tensor([2.0, 1.0, 0.5])
    q = torch.randn(4096, 3, generator=generator) * sigma
    model = NCTModel(FlowConfig(dim=3, n_couplings=2, hidden=16))
    fit_likelihood(model, q, max_steps=400, lr=3e-3, progress=False)
    assert torch.allclose(model.frequencies(), torch.sort(1 / q.std(0)).values, rtol=0.03)


def test_weights_reweight_the_likelihood():
    """Frames weighted 4:1 between two Gaussian widths: the fitted variance follows the weights."""
    generator = torch.Generator().manual_seed(0)
    narrow, wide = torch.randn(4096, 2, generator=generator) * 0.5, torch.randn(4096, 2, generator=generator) * 2
    q = torch.cat([narrow, wide])
    weights = torch.cat([torch.full((4096,), 4.0), torch.ones(4096)])
    expected_var = (4 * 0.25 + 1 * 4.0) / 5
    model = model_from_data(FlowConfig(dim=2, n_couplings=0), q, weights)
    assert torch.allclose(model.prior.frequencies().detach(), torch.full((2,), 1 / math.sqrt(expected_var)),
                          rtol=0.05)


def test_too_few_frames_for_a_batch():
    q = torch.randn(10, 2)
    with pytest.raises(ValueError, match="fewer than one batch"):
        fit_likelihood(NCTModel(FlowConfig(dim=2)), q, batch_size=64, progress=False)


def test_training_keeps_the_best_validation_weights():
    q = _anisotropic_data()
    model = model_from_data(FlowConfig(dim=3, n_couplings=2, hidden=16), q)
    history = fit_likelihood(model, q, max_steps=60, batch_size=128, eval_every=10, progress=False)
    assert history.best_val_loss == min(history.val_loss)
    assert history.best_val_loss < history.val_loss[0]


def test_training_returns_the_weights_of_the_best_evaluation():
    model = NCTModel(FlowConfig(dim=2, n_couplings=1, hidden=4))
    # The third value is lower than the second by less than the 1e-4 relative threshold: not an improvement.
    values = iter([3.0, 1.0, 1.0 - 5e-5, 2.0])
    snapshots = []

    def evaluate():
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(values)

    trainer = training.Trainer(model, lambda generator, step: ((model.prior.log_omega - 1) ** 2).sum(), evaluate,
                               eval_every=1, progress=False)
    history = trainer.fit(4)
    assert history.best_val_loss == 1.0
    assert not torch.equal(snapshots[1]["prior.log_omega"], snapshots[-1]["prior.log_omega"])
    for name, value in model.state_dict().items():
        assert torch.equal(value, snapshots[1][name]), name


def test_cuda_graph_training_needs_a_model_on_a_gpu():
    model = NCTModel(FlowConfig(dim=2, n_couplings=1, hidden=4))
    with pytest.raises(ValueError, match="CUDA device"):
        fit_variational(model, lambda q, p: 0.5 * ((q ** 2) + (p ** 2)).sum(-1), max_steps=1, progress=False,
                        cuda_graph=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_training_refuses_the_linear_layers():
    model = NCTModel(FlowConfig(dim=2, n_couplings=1, hidden=4, linear_point=True)).cuda()
    with pytest.raises(ValueError, match="matrix exponential"):
        fit_variational(model, lambda q, p: 0.5 * ((q ** 2) + (p ** 2)).sum(-1), max_steps=1, progress=False,
                        cuda_graph=True)


@pytest.mark.slow
def test_compiled_likelihood_training_follows_the_eager_path():
    q = _anisotropic_data()
    config = FlowConfig(dim=3, n_couplings=2, hidden=8)
    histories = [fit_likelihood(model_from_data(config, q), q, max_steps=30, batch_size=100, eval_every=10,
                                progress=False, compile_loss=compile_loss) for compile_loss in (False, True)]
    assert len(histories[1].val_loss) == 3
    assert histories[1].val_loss == pytest.approx(histories[0].val_loss, rel=1e-4)


@pytest.mark.slow
def test_compiled_variational_training_follows_the_eager_path():
    def hamiltonian(q, p):
        return 0.5 * (p ** 2).sum(-1) + 0.5 * (q ** 2 * torch.tensor([0.25, 4.0])).sum(-1)

    histories = [fit_variational(NCTModel(FlowConfig(dim=2, n_couplings=2, hidden=8)), hamiltonian, max_steps=30,
                                 batch_size=64, eval_every=10, eval_batch=256, progress=False,
                                 compile_loss=compile_loss) for compile_loss in (False, True)]
    assert histories[1].val_loss == pytest.approx(histories[0].val_loss, rel=1e-4)


def test_the_path_gradient_vanishes_at_the_exact_model_and_the_full_one_does_not():
    """At ρ = Boltzmann every sample has ln ρ + H = const, so the path derivative of a finite batch is zero; the
    full reparameterisation gradient keeps the score term, zero only on average."""
    omega = torch.tensor([0.5, 2.0, 1.3], dtype=torch.float64)

    def hamiltonian(q, p):
        return 0.5 * ((p ** 2) + (omega * q) ** 2).sum(-1)

    model = NCTModel(FlowConfig(dim=3, n_couplings=2, hidden=8)).double()  # couplings start as the identity
    with torch.no_grad():
        model.prior.log_omega.copy_(omega.log())
    shadow = copy.deepcopy(model).requires_grad_(False)
    parameters = [p for p in model.parameters() if p.requires_grad]

    def gradient(objective):  # the same draws each time; they depend on ω (reparameterisation)
        Q, P = model.prior.sample(64, torch.Generator().manual_seed(2))
        return torch.autograd.grad(objective(Q, P), parameters, allow_unused=True)

    path = gradient(lambda Q, P: path_gradient_objective(model, shadow, hamiltonian, Q, P))
    full = gradient(lambda Q, P: variational_objective(model, hamiltonian, Q, P))
    assert max(float(g.abs().max()) for g in path if g is not None) < 1e-12
    assert max(float(g.abs().max()) for g in full if g is not None) > 1e-3


def test_path_gradient_training_is_refused_with_compilation_and_unknown_estimators():
    model = NCTModel(FlowConfig(dim=2, n_couplings=1, hidden=4))

    def hamiltonian(q, p):
        return 0.5 * (p ** 2 + q ** 2).sum(-1)

    with pytest.raises(ValueError, match="compile_loss=True needs gradient='reparameterization'"):
        fit_variational(model, hamiltonian, gradient="path", compile_loss=True, max_steps=1, progress=False)
    with pytest.raises(ValueError, match="unknown gradient 'score'"):
        fit_variational(model, hamiltonian, gradient="score", max_steps=1, progress=False)


def test_a_failed_compilation_is_reported_before_training(monkeypatch):
    def broken_compiler(function, **options):
        def call(*args):
            raise OSError("no C++ compiler found")
        return call

    monkeypatch.setattr(torch, "compile", broken_compiler)
    q = _anisotropic_data()
    model = model_from_data(FlowConfig(dim=3, n_couplings=1, hidden=4), q)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="compiling the training loss failed.*no C\\+\\+ compiler"):
        fit_likelihood(model, q, max_steps=5, batch_size=100, progress=False, compile_loss=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_compilation_and_cuda_graphs_are_not_combined():
    with pytest.raises(ValueError, match="compile_loss=True and cuda_graph=True"):
        fit_variational(NCTModel(FlowConfig(dim=2, n_couplings=1, hidden=4)), lambda q, p: (q ** 2 + p ** 2).sum(-1),
                        max_steps=1, progress=False, compile_loss=True, cuda_graph=True)
