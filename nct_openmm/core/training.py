"""Training loops: maximum likelihood on phase-space samples (paper Eq. 6) and variational free-energy minimisation
against a Hamiltonian (paper Eq. 5).

Units: the core works in reduced units, ``β = 1``. Molecular data are brought there once, at load time, by
:mod:`nct_openmm.data` (mass-weighted, divided by ``√kT``); toy Hamiltonians are written in them directly.
"""
import contextlib
import copy
import hashlib
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
from torch import Tensor

from .layers import AffinePoint
from .model import FlowConfig, NCTModel
from ..messages import error_line


def augment_momenta(q: Tensor, masses=1.0, kT: float = 1.0, generator: Optional[torch.Generator] = None) -> Tensor:
    """Maxwell–Boltzmann momenta for positions ``q``: ``p ~ N(0, m kT)``, drawn fresh at every call.

    Examples
    --------
    >>> p = augment_momenta(torch.zeros(100000, 1), masses=4.0, kT=2.0, generator=torch.Generator().manual_seed(0))
    >>> round(float(p.var()), 1)
    8.0
    """
    std = torch.sqrt(torch.as_tensor(masses, dtype=q.dtype, device=q.device) * kT)
    return torch.randn(q.shape, generator=generator, dtype=q.dtype, device=q.device) * std


def harmonic_initialization(q: Tensor, weights: Optional[Tensor] = None):
    """The harmonic (PCA) limit of data ``q`` in reduced units, as the starting point of a flow.

    Returns ``(pre, post, frequencies)``: ``pre`` centres, rotates onto the principal axes and whitens; ``post``
    restores each axis' scale; ``frequencies`` are ``ω_k = 1/σ_k``. A model built from them starts as the linear
    limit of NCT (so ω need no long walk from 1, and the couplings see unit-variance inputs).

    Raises
    ------
    ValueError
        When the data do not span all coordinates (a rank-deficient covariance makes the density degenerate).
    """
    q = q.detach().double()
    w = torch.ones(len(q), dtype=q.dtype) if weights is None else weights.detach().double()
    w = w / w.sum()
    mean = (w[:, None] * q).sum(0)
    centred = q - mean
    cov = (w[:, None] * centred).T @ centred
    eigenvalues, vectors = torch.linalg.eigh(cov)
    eigenvalues, vectors = eigenvalues.flip(0), vectors.flip(1)
    if eigenvalues[-1] <= 1e-10 * eigenvalues[0]:
        rank = int((eigenvalues > 1e-10 * eigenvalues[0]).sum())
        raise ValueError(f"the data span only {rank} of {q.shape[1]} coordinates (degenerate covariance); "
                         "remove constrained or rigid-body directions first")
    sigma = torch.sqrt(eigenvalues)
    dim = q.shape[1]
    pre = AffinePoint(mean.float(), vectors.float(), (1.0 / sigma).float())
    post = AffinePoint(torch.zeros(dim), torch.eye(dim), sigma.float())
    return pre, post, (1.0 / sigma).float()


def model_from_data(config: FlowConfig, q: Tensor, weights: Optional[Tensor] = None) -> NCTModel:
    """An untrained :class:`NCTModel` that starts at the harmonic limit of ``q`` (see
    :func:`harmonic_initialization`)."""
    pre, post, frequencies = harmonic_initialization(q, weights)
    return NCTModel(config, frequencies=frequencies, pre=pre, post=post)


@dataclass
class TrainingHistory:
    """What a training run did: losses per evaluation, learning rates, timing and how it stopped."""

    step: List[int] = field(default_factory=list)
    train_loss: List[float] = field(default_factory=list)
    val_loss: List[float] = field(default_factory=list)
    lr: List[float] = field(default_factory=list)
    elapsed: List[float] = field(default_factory=list)
    best_val_loss: float = math.inf
    stopped: str = ""

    @property
    def final_loss(self) -> float:
        return self.val_loss[-1] if self.val_loss else math.nan


def flow_optimizer(model: NCTModel, lr: float = 1e-3, frequency_lr_factor: float = 10.0,
                   capturable: bool = False) -> torch.optim.Adam:
    """The Adam optimiser :class:`Trainer` uses: the prior's frequencies in their own group at ``frequency_lr_factor``
    times the rate.

    ω often sits orders of magnitude from its initial value; its own, larger step size keeps it from being the slowest
    parameter to converge. ``capturable`` (for :class:`CapturedStep`) keeps the rates as device tensors, which a
    scheduler changes in place and a captured step then sees; otherwise the fused kernel updates every parameter in
    one call instead of a dozen small operations per parameter (a tenth of a CPU training step).

    Examples
    --------
    >>> optimizer = flow_optimizer(NCTModel(FlowConfig(dim=2, n_couplings=1, hidden=4)), lr=1e-3)
    >>> [group["lr"] for group in optimizer.param_groups]
    [0.001, 0.01]
    """
    device = model.prior.log_omega.device
    frequency_params = [model.prior.log_omega]
    other = [p for name, p in model.named_parameters() if name != "prior.log_omega"]
    rates = [lr, lr * frequency_lr_factor]
    if capturable:
        rates = [torch.tensor(rate, device=device) for rate in rates]
    fused = not capturable and device.type in ("cpu", "cuda")
    return torch.optim.Adam([{"params": other, "lr": rates[0]}, {"params": frequency_params, "lr": rates[1]}],
                            capturable=capturable, fused=fused or None)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)``, keeping how ``optimizer`` runs.

    torch's loader replaces every group's settings with the saved ones, ``capturable``, ``fused`` and the type of
    ``lr`` included: a checkpoint of an eager run would make a CUDA-graph run's optimiser refuse capture, and one
    of a captured run would give an eager run device-tensor rates. The saved rates and moments are kept.

    Examples
    --------
    >>> model = NCTModel(FlowConfig(dim=2, n_couplings=1, hidden=4))
    >>> captured = flow_optimizer(model, capturable=True)
    >>> load_optimizer_state(captured, flow_optimizer(model, lr=5e-4).state_dict())
    >>> [(group["capturable"], round(float(group["lr"]), 6)) for group in captured.param_groups]
    [(True, 0.0005), (True, 0.005)]
    """
    modes = [{key: group[key] for key in ("capturable", "fused")} for group in optimizer.param_groups]
    rate_tensors = [group["lr"] if isinstance(group["lr"], Tensor) else None for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, mode, tensor in zip(optimizer.param_groups, modes, rate_tensors):
        group.update(mode)
        rate = float(group["lr"])
        # The same tensor, filled in place: a captured step may already hold it.
        group["lr"] = rate if tensor is None else tensor.fill_(rate)


class CompiledLoss:
    """A batch loss compiled with ``torch.compile`` (inductor), forward and backward pass together.

    The flow's small operations are fused into a few generated kernels, so a step costs little more than its matrix
    products (on this project's 2-core CPU, maximum likelihood with the reference architecture: 1.5× faster steps than
    eager, ``benchmarks/training_throughput.py``). The first call compiles, which takes tens of seconds on a CPU
    (inductor needs a C++ compiler there) and is cached on disk for later runs; it pays for trainings of more than a few
    minutes. Batches must keep their shapes (a new shape compiles again). A compilation that fails raises a
    ``RuntimeError`` that says so, before any training step has been taken.

    Examples
    --------
    >>> model = NCTModel(FlowConfig(dim=2, n_couplings=1, hidden=4))
    >>> loss = CompiledLoss(lambda q, p: negative_log_likelihood(model, q, p))  # doctest: +SKIP
    >>> loss(torch.randn(8, 2), torch.randn(8, 2)).backward()  # doctest: +SKIP
    """

    def __init__(self, loss: Callable[..., Tensor]):
        self._compiled = torch.compile(loss, dynamic=False)
        self._checked = False

    def __call__(self, *batch) -> Tensor:
        if self._checked:
            return self._compiled(*batch)
        try:
            value = self._compiled(*batch)
        except Exception as error:  # inductor reports a missing compiler and the like under many exception types
            raise RuntimeError(f"compiling the training loss failed ({type(error).__name__}: {error_line(error)}); "
                               "train without compile_loss, or install what torch.compile needs (a C++ compiler on a "
                               "CPU, Triton on a GPU)") from error
        self._checked = True
        return value


def _maybe_compiled(loss: Callable[..., Tensor], compile_loss: bool, trainer_options: dict) -> Callable[..., Tensor]:
    if not compile_loss:
        return loss
    if trainer_options.get("cuda_graph"):
        raise ValueError("compile_loss=True and cuda_graph=True cannot be combined; use one of them")
    return CompiledLoss(loss)


class CapturedStep:
    """One training step (loss, backward, optimiser step) captured once in a CUDA graph, then replayed.

    A flow step at batch sizes of a few hundred is hundreds of small kernels, and on a GPU launching them costs
    more than running them; a replayed graph launches them all at once. Each call performs exactly one step and
    returns the loss as a new device tensor (reading it synchronises, so read it rarely). The first ``warmup`` calls run
    eagerly on a side stream (as graph capture requires), the next one captures and replays.

    ``loss_fn()`` must be free of host synchronisation (no ``.item()``, no data-dependent Python branches) and draw
    its randomness on the device from the default CUDA generator, which graphs advance at every replay. The
    optimiser must be created with ``capturable=True`` and tensor learning rates, so that a scheduler's in-place
    changes reach the graph (:class:`Trainer` does this with ``cuda_graph=True``).

    Examples
    --------
    >>> model = torch.nn.Linear(4, 1).cuda()  # doctest: +SKIP
    >>> optimizer = torch.optim.Adam(model.parameters(), lr=torch.tensor(1e-3, device="cuda"),
    ...                              capturable=True)  # doctest: +SKIP
    >>> step = CapturedStep(lambda: model(torch.randn(64, 4, device="cuda")).pow(2).mean(),
    ...                     optimizer)  # doctest: +SKIP
    >>> losses = [step() for _ in range(100)]  # doctest: +SKIP
    """

    def __init__(self, loss_fn: Callable[[], Tensor], optimizer: torch.optim.Optimizer, warmup: int = 3):
        self.loss_fn, self.optimizer, self.warmup = loss_fn, optimizer, warmup
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.loss: Optional[Tensor] = None
        self._calls = 0
        self._side_stream: Optional[torch.cuda.Stream] = None

    def __call__(self) -> Tensor:
        self._calls += 1
        if self.graph is None:
            if self._calls <= self.warmup:
                return self._warmup_step()
            self._capture()
        self.graph.replay()
        return self.loss.clone()  # the next replay overwrites self.loss

    def _eager_step(self) -> Tensor:
        loss = self.loss_fn()
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def _warmup_step(self) -> Tensor:
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream()
        self._side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._side_stream):
            self.optimizer.zero_grad(set_to_none=True)
            loss = self._eager_step()
        torch.cuda.current_stream().wait_stream(self._side_stream)
        return loss

    def _capture(self) -> None:
        # Gradients set to None are allocated inside the graph's memory pool, and every replay overwrites them.
        self.optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = self._eager_step()


#: What :meth:`Trainer.state_dict` writes and :meth:`Trainer.load_state_dict` needs.
_CHECKPOINT_KEYS = frozenset({"model", "optimizer", "generator", "history", "step", "stale", "best_state",
                              "extra_state"})


class Trainer:
    """Adam with a plateau schedule on a monitored loss, early stopping, seeded randomness, resumable checkpoints.

    ``loss_fn(generator, step)`` returns a scalar training loss; ``evaluate_fn()`` returns the monitored loss
    (a validation loss, or a fresh large-batch estimate). ``extra_state`` is a dict the loss function keeps its own
    state in (e.g. the position in an epoch); it is checkpointed and restored in place. Every ``eval_every`` steps
    the monitored loss drives the best-weights copy, the schedule and early stopping. An evaluation improves on the
    best one when it is lower by more than ``1e-4 · max(1, |best|)``; after every ``lr_patience + 1`` evaluations
    in a row without improvement the learning rates are multiplied by ``lr_factor`` (not below ``min_lr``); training
    stops after ``patience`` such evaluations, or when a reduction is due and the rate is already at ``min_lr``. One
    criterion serves all three, so the schedule behaves the same for negative losses (variational free energies)
    as for positive ones. A checkpoint holds the model, optimiser, generator state, history and the training losses
    of the unfinished evaluation window, so resuming reproduces an uninterrupted run exactly. ``fingerprint``
    describes the problem (data digests, settings); a checkpoint written for another one is refused at resume.

    Randomness comes from ``generator``, a ``torch.Generator`` on the model's device. With ``cuda_graph=True`` (a
    model on a CUDA device) every step is replayed from a CUDA graph (:class:`CapturedStep`): ``loss_fn`` is then
    called once, at capture, with ``generator=None`` and must draw from the default CUDA generator (seeded here) on
    the device; the loss is read and checked for NaN only at evaluations; resumed runs continue but do not repeat
    an uninterrupted one bit for bit.
    """

    def __init__(self, model: NCTModel, loss_fn: Callable, evaluate_fn: Callable, *, lr: float = 1e-3,
                 frequency_lr_factor: float = 10.0, eval_every: int = 100, patience: int = 10,
                 lr_patience: int = 3, lr_factor: float = 0.5, min_lr: float = 1e-5, seed: int = 0,
                 checkpoint: Optional[str] = None, checkpoint_every: int = 0, progress: bool = True,
                 description: str = "training", extra_state: Optional[dict] = None, cuda_graph: bool = False,
                 fingerprint: Optional[dict] = None):
        self.model = model
        self.fingerprint = fingerprint
        device = next(model.parameters()).device
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a model on a CUDA device, this one is on {device}")
        if cuda_graph and (model.config.linear_point or model.config.linear_symplectic):
            # Measured on an H200 (torch 2.11): matrix_exp copies to the host, which graph capture refuses.
            raise ValueError("cuda_graph=True cannot capture the matrix exponential of the linear layers; train "
                             "with FlowConfig(linear_point=False, linear_symplectic=False) or cuda_graph=False")
        self.cuda_graph = cuda_graph
        self.extra_state = extra_state if extra_state is not None else {}
        self.loss_fn, self.evaluate_fn = loss_fn, evaluate_fn
        self.optimizer = flow_optimizer(model, lr, frequency_lr_factor, capturable=cuda_graph)
        self.lr_patience, self.lr_factor = lr_patience, lr_factor
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self._device = device
        if cuda_graph:
            with self._on_model_device():
                torch.cuda.manual_seed(seed)
        self.eval_every, self.patience, self.min_lr = eval_every, patience, min_lr
        self.checkpoint, self.checkpoint_every = checkpoint, checkpoint_every
        self.progress, self.description = progress, description
        self.history = TrainingHistory()
        self.step_count = 0
        self._best_state = None
        self._stale = 0
        self._running: List[Tensor] = []  # training losses since the last evaluation

    # --- checkpoints --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        running = torch.stack(self._running).cpu() if self._running else torch.zeros(0)
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state(), "history": self.history.__dict__.copy(),
                "step": self.step_count, "stale": self._stale, "best_state": self._best_state,
                "extra_state": dict(self.extra_state), "running": running, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        load_optimizer_state(self.optimizer, state["optimizer"])
        self.generator.set_state(state["generator"])
        self.history = TrainingHistory(**state["history"])
        self.step_count, self._stale, self._best_state = state["step"], state["stale"], state["best_state"]
        self.extra_state.update(state["extra_state"])
        device = next(self.model.parameters()).device
        self._running = list(state.get("running", torch.zeros(0)).to(device))

    def save_checkpoint(self, path: Optional[str] = None) -> None:
        path = path or self.checkpoint
        tmp = f"{path}.tmp{os.getpid()}"
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)

    def resume(self, path: Optional[str] = None) -> bool:
        """Continue from a checkpoint if one exists; returns whether it did."""
        path = path or self.checkpoint
        if not path or not os.path.exists(path):
            return False
        try:
            state = torch.load(path, weights_only=True)
        except Exception as error:
            raise ValueError(f"cannot read the checkpoint {path} (corrupt, or not a checkpoint): "
                             f"{error_line(error)}") from None
        missing = sorted(_CHECKPOINT_KEYS - set(state)) if isinstance(state, dict) else ["everything"]
        if missing:
            raise ValueError(f"{path} is not a training checkpoint (it lacks {', '.join(missing)}): delete it, or "
                             "give this run another checkpoint path")
        saved = state.get("fingerprint")
        if self.fingerprint is not None and saved is not None and saved != self.fingerprint:
            changed = sorted(key for key in set(saved) | set(self.fingerprint)
                             if saved.get(key) != self.fingerprint.get(key))
            raise ValueError(f"the checkpoint {path} belongs to another training problem (it differs in "
                             f"{', '.join(changed)}): delete it, or give this run another checkpoint path")
        self.load_state_dict(state)
        return True

    # --- the loop -----------------------------------------------------------------------------------------------
    def fit(self, max_steps: int) -> TrainingHistory:
        """Train until ``max_steps`` steps in total (counting resumed ones), a plateau, or the minimum rate."""
        torch.set_flush_denormal(True)  # decayed weights as float32 denormals slow every matmul several-fold
        start = time.perf_counter() - (self.history.elapsed[-1] if self.history.elapsed else 0.0)
        bar = _progress_bar(max_steps, self.step_count, self.description, self.progress)
        self.model.train()
        try:
            self._run_steps(max_steps, bar, start)
        except FloatingPointError as error:
            raise self._with_best_weights(error) from None
        finally:
            bar.close()
        if self.checkpoint:
            self.save_checkpoint()
        if self._running:
            # Outside the schedule and after the last checkpoint, so a resumed run matches an uninterrupted one.
            self._evaluate(self._mean_loss(self._running), time.perf_counter() - start, schedule=False)
        self.history.stopped = self.history.stopped or "max_steps"
        if self._best_state is not None:
            self.model.load_state_dict(self._best_state)
        self.model.eval()
        return self.history

    def _run_steps(self, max_steps: int, bar, start: float) -> None:
        step = self._captured_step() if self.cuda_graph else self._eager_step
        with self._on_model_device():
            self._step_until(step, max_steps, bar, start)

    def _on_model_device(self):
        """The model's CUDA device made current for a captured run: streams, graphs and the default generator act
        on the current device, which need not be the model's."""
        return torch.cuda.device(self._device) if self.cuda_graph else contextlib.nullcontext()

    def _step_until(self, step: Callable[[], Tensor], max_steps: int, bar, start: float) -> None:
        while self.step_count < max_steps and not self.history.stopped:
            self._running.append(step())
            self.step_count += 1
            bar.update(1)
            if self.step_count % self.eval_every == 0:
                self._evaluate(self._mean_loss(self._running), time.perf_counter() - start, schedule=True)
                self._running = []
                bar.set_postfix(loss=f"{self.history.train_loss[-1]:.4g}", val=f"{self.history.val_loss[-1]:.4g}",
                                lr=f"{self.history.lr[-1]:.2g}")
            if self.checkpoint and self.checkpoint_every and self.step_count % self.checkpoint_every == 0:
                self.save_checkpoint()

    def _with_best_weights(self, error: FloatingPointError) -> FloatingPointError:
        """A non-finite loss ends training; the model gets the best weights so far, and the message says so."""
        if self._best_state is None:
            return error
        self.model.load_state_dict(self._best_state)
        best_step = self.history.step[self.history.val_loss.index(self.history.best_val_loss)]
        return FloatingPointError(f"{error}; the model holds the best weights so far, from step {best_step}")

    def _eager_step(self) -> Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.generator, self.step_count)
        self._check_finite(loss)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def _captured_step(self) -> CapturedStep:
        return CapturedStep(lambda: self.loss_fn(None, self.step_count), self.optimizer)

    def _check_finite(self, loss: Tensor) -> None:
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {float(loss)} at step {self.step_count}; lower the "
                                     "learning rate or check the data")

    def _mean_loss(self, losses: List[Tensor]) -> float:
        # On a GPU the losses stay on the device until here: one read, one synchronisation per evaluation.
        mean = torch.stack(losses).mean()
        self._check_finite(mean)
        return float(mean)

    def _evaluate(self, train_loss: float, elapsed: float, schedule: bool) -> None:
        self.model.eval()
        val = float(self.evaluate_fn())
        self.model.train()
        h = self.history
        h.step.append(self.step_count)
        h.train_loss.append(train_loss)
        h.val_loss.append(val)
        h.lr.append(float(self.optimizer.param_groups[0]["lr"]))  # a captured step's rate is a tensor
        h.elapsed.append(elapsed)
        if not math.isfinite(h.best_val_loss) or val < h.best_val_loss - 1e-4 * max(1.0, abs(h.best_val_loss)):
            h.best_val_loss = val
            self._best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self._stale = 0
        elif schedule:
            self._stale += 1
        if not schedule:
            return
        if self._stale >= self.patience:
            h.stopped = "plateau"
        elif self._stale and self._stale % (self.lr_patience + 1) == 0:
            self._reduce_learning_rates()

    def _reduce_learning_rates(self) -> None:
        """Multiply every group's rate by ``lr_factor``, down to ``min_lr``; stop instead when the flow's rate (the
        first group; the frequencies' group may run faster) is at ``min_lr`` already."""
        if float(self.optimizer.param_groups[0]["lr"]) <= self.min_lr * (1 + 1e-9):
            self.history.stopped = "min_lr"
            return
        for group in self.optimizer.param_groups:
            new = max(float(group["lr"]) * self.lr_factor, self.min_lr)
            if isinstance(group["lr"], Tensor):
                group["lr"].fill_(new)  # in place: a captured step holds this tensor
            else:
                group["lr"] = new


def _digest(tensor: Optional[Tensor]) -> str:
    """A short content hash of a tensor (its dtype, shape and bytes), or "none"."""
    if tensor is None:
        return "none"
    array = tensor.detach().cpu().contiguous().numpy()
    header = f"{array.dtype}{array.shape}".encode()
    return hashlib.sha1(header + array.tobytes()).hexdigest()[:16]


def _progress_bar(total: int, initial: int, description: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=description, disable=not enabled, leave=False,
                dynamic_ncols=True)


# --- maximum likelihood (Eq. 6) ---------------------------------------------------------------------------------
def negative_log_likelihood(model: NCTModel, q: Tensor, p: Tensor, weights: Optional[Tensor] = None) -> Tensor:
    """Weighted mean of ``−ln ρ(q, p)`` over a batch."""
    nll = -model.log_prob(q, p)
    if weights is None:
        return nll.mean()
    return (weights * nll).sum() / weights.sum()


def fit_likelihood(model: NCTModel, q: Tensor, *, weights: Optional[Tensor] = None,
                   q_val: Optional[Tensor] = None, weights_val: Optional[Tensor] = None, masses=1.0,
                   kT: float = 1.0, batch_size: int = 256, max_steps: int = 20000, eval_every: Optional[int] = None,
                   lr: float = 1e-3, patience: int = 10, seed: int = 0, checkpoint: Optional[str] = None,
                   checkpoint_every: int = 0, resume: bool = True, progress: bool = True, compile_loss: bool = False,
                   **trainer_options) -> TrainingHistory:
    """Maximum-likelihood training on configurations ``q`` augmented with fresh Maxwell–Boltzmann momenta.

    Parameters
    ----------
    model : NCTModel
        Trained in place; on return it holds the weights of the best validation loss.
    q : Tensor (n_frames, dim)
        Training configurations (reduced units unless ``masses``/``kT`` say otherwise).
    weights : Tensor (n_frames,), optional
        Per-frame statistical weights (e.g. reweighting factors of a biased run).
    q_val, weights_val : Tensor, optional
        Held-out frames for the monitored loss; by default the training frames.
    masses, kT
        Momenta are drawn from ``N(0, masses·kT)`` for every batch (fresh each time). The latent Hamiltonian is
        at β = 1, so the learned ω are the physical frequencies divided by ``kT``: to read ω in physical units,
        give reduced coordinates ``q·√(m/kT)`` with ``masses = kT = 1`` (the defaults), as
        :class:`nct_openmm.slowmodes.NCT` does.
    batch_size, max_steps, eval_every, lr, patience, seed
        Optimisation settings; one evaluation per epoch by default.
    checkpoint, checkpoint_every, resume
        Checkpoint file, how often to write it (steps), and whether to continue from an existing one.
    compile_loss
        Compile the batch loss and its gradient (:class:`CompiledLoss`): faster steps after a one-time compilation.

    Examples
    --------
    >>> q = torch.randn(512, 2) * torch.tensor([3.0, 0.5])
    >>> model = model_from_data(FlowConfig(dim=2, n_couplings=2, hidden=8), q)
    >>> history = fit_likelihood(model, q, max_steps=20, progress=False)
    >>> [round(w) for w in model.frequencies().tolist()]
    [0, 2]
    """
    if len(q) < batch_size:
        raise ValueError(f"{len(q)} training frames are fewer than one batch of {batch_size}")
    q_val = q if q_val is None else q_val
    weights_val = weights if q_val is q and weights_val is None else weights_val
    # Weights go where their frames are: indexed by device-side batch indices, they must be on that device.
    weights = None if weights is None else torch.as_tensor(weights, device=q.device)
    weights_val = None if weights_val is None else torch.as_tensor(weights_val, device=q_val.device)
    order = {"perm": torch.empty(0, dtype=torch.long), "pos": 0}
    batch_loss = _maybe_compiled(lambda qb, pb, wb: negative_log_likelihood(model, qb, pb, wb), compile_loss,
                                 trainer_options)

    # On q's device once: inside loss_fn a host-to-device copy would break the capture of a CUDA-graph step.
    momentum_masses = torch.as_tensor(masses, dtype=q.dtype, device=q.device)

    def loss_fn(generator, step):
        if generator is None:
            # Replayed from a CUDA graph: batches drawn on the device, with replacement, instead of epochs.
            idx = torch.randint(len(q), (batch_size,), device=q.device)
        else:
            if order["pos"] + batch_size > len(order["perm"]):
                order["perm"], order["pos"] = torch.randperm(len(q), generator=generator, device=q.device), 0
            idx = order["perm"][order["pos"]: order["pos"] + batch_size]
            order["pos"] += batch_size
        qb = q[idx]
        pb = augment_momenta(qb, momentum_masses, kT, generator)
        return batch_loss(qb, pb, None if weights is None else weights[idx])

    eval_generator = torch.Generator(device=q.device).manual_seed(seed + 1)

    def evaluate_fn():
        # The same momenta at every evaluation, so that changes in the monitored loss come from the model alone.
        eval_generator.manual_seed(seed + 1)
        total, norm = 0.0, 0.0
        for start in range(0, len(q_val), 4096):
            qb = q_val[start: start + 4096]
            pb = augment_momenta(qb, momentum_masses, kT, eval_generator)
            wb = torch.ones(len(qb), device=qb.device) if weights_val is None else weights_val[start: start + 4096]
            with torch.no_grad():
                total += float((wb * -model.log_prob(qb, pb)).sum())
            norm += float(wb.sum())
        return total / norm

    fingerprint = None
    if checkpoint:  # hashing copies the data to the host: only worth it when a checkpoint is to be matched
        train = _digest(q)
        fingerprint = {"method": "likelihood", "config": repr(model.config), "train": train,
                       "weights": _digest(weights), "validation": train if q_val is q else _digest(q_val),
                       "validation_weights": _digest(weights_val), "masses": _digest(torch.as_tensor(masses)),
                       "kT": float(kT), "batch_size": int(batch_size)}
    trainer = Trainer(model, loss_fn, evaluate_fn, lr=lr, eval_every=eval_every or max(1, len(q) // batch_size),
                      patience=patience, seed=seed, checkpoint=checkpoint, checkpoint_every=checkpoint_every,
                      progress=progress, description="max. likelihood", extra_state=order, fingerprint=fingerprint,
                      **trainer_options)
    if resume:
        trainer.resume()
    return trainer.fit(max_steps)


# --- variational (Eq. 5) ----------------------------------------------------------------------------------------
def variational_loss(model: NCTModel, hamiltonian: Callable, n: int, beta: float = 1.0,
                     generator: Optional[torch.Generator] = None, whiten: bool = False) -> Tensor:
    """Monte-Carlo estimate of ``E_{x∼ρ}[ln ρ(x) + βH(x)]`` with the reparameterisation trick.

    ``x = T⁻¹(z)`` for ``z`` from the prior; since the Jacobian is one, ``ln ρ(x) = ln N(z)``. The value is an
    upper bound of ``−ln Z`` (the variational free energy in units of kT). ``whiten`` draws a whitened batch
    (:func:`~nct_openmm.core.prior.whiten_batch`): a low-variance training estimate with an ``O(1/n)`` bias.
    """
    Q, P = model.prior.sample(n, generator, whiten=whiten)
    return variational_objective(model, hamiltonian, Q, P, beta)


def variational_objective(model: NCTModel, hamiltonian: Callable, Q: Tensor, P: Tensor, beta: float = 1.0) -> Tensor:
    """Mean of ``ln ρ(x) + βH(x)`` over the phase-space points ``x = T⁻¹(Q, P)`` decoded from latent draws."""
    q, p = model.decode(Q, P)
    return (model.prior.log_prob(Q, P) + beta * hamiltonian(q, p)).mean()


def free_energy_estimate(flow: NCTModel, hamiltonian, n: int = 4096, seed: int = 0, batch: int = 4096) -> dict:
    """Free-energy estimates (kT) from ``n`` samples of the flow against ``hamiltonian``.

    ``variational``: ``F = E_ρ[ln ρ + H]``, an upper bound of ``−ln Z``, with its ``standard_error``;
    ``importance_sampled``: ``−ln E_ρ[exp(−ln ρ − H)]`` (consistent, biased upwards for finite ``n``), with the
    ``effective_sample_fraction`` of the weights (1 when the flow is exact).

    Examples
    --------
    >>> H = lambda q, p: 0.5 * (p ** 2).sum(-1) + 2.0 * (q ** 2).sum(-1)
    >>> model = NCTModel(FlowConfig(dim=2, n_couplings=1, hidden=4), frequencies=torch.tensor([2.0, 2.0]))
    >>> round(free_energy_estimate(model, H, n=1000)["variational"], 4)  # exact: −2 ln(2π/2)
    -2.2895
    """
    generator = torch.Generator(device=flow.prior.log_omega.device).manual_seed(seed)
    values = []
    with torch.no_grad():
        for start in range(0, n, batch):
            Q, P = flow.prior.sample(min(batch, n - start), generator)
            log_rho = flow.prior.log_prob(Q, P)
            q, p = flow.decode(Q, P)
            values.append((log_rho.double() + hamiltonian(q.double(), p.double())).detach())
    w = torch.cat(values)
    log_weights = -w
    log_sum = torch.logsumexp(log_weights, 0)
    ess = float(torch.exp(2 * log_sum - torch.logsumexp(2 * log_weights, 0))) / len(w)
    return {"variational": float(w.mean()), "standard_error": float(w.std() / math.sqrt(len(w))),
            "importance_sampled": float(math.log(len(w)) - log_sum), "effective_sample_fraction": ess}


def path_gradient_objective(model: NCTModel, shadow: NCTModel, hamiltonian: Callable, Q: Tensor, P: Tensor,
                            beta: float = 1.0) -> Tensor:
    """:func:`variational_objective` whose gradient is the path derivative alone ("sticking the landing", Roeder,
    Wu & Duvenaud 2017).

    ``x = T⁻¹(Q, P)`` is decoded with the trainable ``model``; ``ln ρ(x)`` is evaluated by ``shadow``, a frozen copy
    given the same weights here, so the gradient flows through ``x`` only. The dropped score term
    ``E_ρ[∂_θ ln ρ]`` vanishes in expectation, so the estimator stays unbiased; unlike the full reparameterisation
    gradient, its variance goes to zero as ``ρ`` approaches the Boltzmann distribution, because ``ln ρ + βH`` is
    then constant in ``x``. Costs one extra encoding per step.
    """
    shadow.load_state_dict(model.state_dict())
    q, p = model.decode(Q, P)
    return (shadow.log_prob(q, p) + beta * hamiltonian(q, p)).mean()


#: Gradient estimators of :func:`fit_variational`.
VARIATIONAL_GRADIENTS = ("reparameterization", "path")


def fit_variational(model: NCTModel, hamiltonian: Callable, *, beta: float = 1.0, batch_size: int = 512,
                    max_steps: int = 3000, eval_every: int = 100, eval_batch: int = 8192, lr: float = 3e-3,
                    patience: int = 8, seed: int = 0, checkpoint: Optional[str] = None, checkpoint_every: int = 0,
                    resume: bool = True, progress: bool = True, whiten: bool = False, compile_loss: bool = False,
                    gradient: str = "reparameterization", **trainer_options) -> TrainingHistory:
    """Variational training against ``hamiltonian(q, p) -> (batch,)`` (torch-differentiable), paper Eq. 5.

    The monitored loss is the variational free energy on a fixed large batch (``eval_batch``) of plain, independent
    draws, so it stays an unbiased estimate of an upper bound of ``−ln Z``. ``whiten`` trains on whitened batches
    (:func:`~nct_openmm.core.prior.whiten_batch`, needs ``batch_size > dim``): near the harmonic limit the gradient
    then carries almost no sampling noise, which is what limits the plain estimator's convergence of slow modes
    (32-site harmonic chain, 4 couplings, 1500 steps: the slowest five ω within 1 % whitened, within 4 % plain).
    ``compile_loss`` compiles the loss of a batch of draws, ``hamiltonian`` included, and its gradient
    (:class:`CompiledLoss`). ``gradient="path"`` trains with the path derivative
    (:func:`path_gradient_objective`) instead of the full reparameterisation gradient: the same monitored loss, a
    training gradient whose variance vanishes at the optimum (not with ``compile_loss``).

    Examples
    --------
    >>> H = lambda q, p: 0.5 * (p ** 2).sum(-1) + 2.0 * (q ** 2).sum(-1)
    >>> model = NCTModel(FlowConfig(dim=2, n_couplings=2, hidden=8))
    >>> history = fit_variational(model, H, max_steps=300, progress=False)
    >>> [round(w, 1) for w in model.frequencies().tolist()]
    [2.0, 2.0]
    """
    if whiten and trainer_options.get("cuda_graph"):
        # whiten_batch diagonalises the batch covariance (eigh), which checks its result on the host.
        raise ValueError("whiten=True cannot be captured in a CUDA graph; use one of them")
    objective = _variational_training_objective(model, hamiltonian, beta, gradient, compile_loss, trainer_options)

    def loss_fn(generator, step):
        return objective(*model.prior.sample(batch_size, generator, whiten=whiten))

    def evaluate_fn():
        generator = torch.Generator(device=model.prior.log_omega.device).manual_seed(seed + 1)
        with torch.no_grad():
            return float(variational_loss(model, hamiltonian, eval_batch, beta, generator))

    # The Hamiltonian itself cannot be fingerprinted; the settings and the model's configuration can.
    fingerprint = {"method": "variational", "config": repr(model.config), "beta": float(beta),
                   "batch_size": int(batch_size), "whiten": bool(whiten), "gradient": gradient}
    trainer = Trainer(model, loss_fn, evaluate_fn, lr=lr, eval_every=eval_every, patience=patience, seed=seed,
                      checkpoint=checkpoint, checkpoint_every=checkpoint_every, progress=progress,
                      description="variational" if gradient == "reparameterization" else "variational (path gradient)",
                      fingerprint=fingerprint, **trainer_options)
    if resume:
        trainer.resume()
    return trainer.fit(max_steps)


def _variational_training_objective(model, hamiltonian, beta, gradient, compile_loss, trainer_options):
    """The training loss of a batch of latent draws ``(Q, P)`` for :func:`fit_variational`'s ``gradient``."""
    if gradient not in VARIATIONAL_GRADIENTS:
        raise ValueError(f"unknown gradient {gradient!r}: use one of {', '.join(VARIATIONAL_GRADIENTS)}")
    if gradient == "reparameterization":
        return _maybe_compiled(lambda Q, P: variational_objective(model, hamiltonian, Q, P, beta), compile_loss,
                               trainer_options)
    if compile_loss:
        raise ValueError("compile_loss=True needs gradient='reparameterization'")
    shadow = copy.deepcopy(model).requires_grad_(False)
    return lambda Q, P: path_gradient_objective(model, shadow, hamiltonian, Q, P, beta)
