"""``nct analyze``: a trained model on trajectories — spectrum vs harmonic PCA, mode–dihedral information,
a latent interpolation, and optionally figures and structure files.

Examples
--------
``nct analyze model.pt --traj traj.dcd --top top.pdb --json report.json --plot figures/``
"""
import dataclasses
import json
import os
from pathlib import Path

import mdtraj
import numpy as np

from nct_openmm.analysis import (backbone_dihedrals, dihedral_information, interpolate, plot_mutual_information,
                                 plot_ramachandran, plot_spectrum, spectrum_report, write_positions_as_trajectory)
from nct_openmm.analysis.dihedrals import LOWER_CORE, UPPER_CORE
from nct_openmm.cli import CommandError, checkOutputFolder
from nct_openmm.data import load_topology, load_trajectories, local_bonds
from nct_openmm.slowmodes import SlowModeModel

#: Structures drawn from the prior for the Ramachandran figure.
PRIOR_SAMPLES = 500
#: Structures on the interpolation path, endpoints included.
PATH_FRAMES = 20


def add_parser(subparsers):
    """Register the ``analyze`` subcommand on ``subparsers``."""
    parser = subparsers.add_parser(
        "analyze", help="analyse a model on trajectories: spectrum vs PCA, mutual information with Φ/Ψ, figures",
        description="Compare the model's frequency spectrum with the harmonic PCA spectrum of the same internal "
                    "coordinates, estimate the mutual information of the slowest modes with the backbone Φ and Ψ "
                    "(peptides), interpolate between two frames in latent space, and optionally write a JSON "
                    "report and figures.")
    parser.add_argument("model", help="model file (from 'nct train')")
    parser.add_argument("--traj", nargs="+", required=True, help="trajectory files (any format mdtraj reads)")
    parser.add_argument("--top", required=True, help="topology file of the system the model was trained on")
    parser.add_argument("--json", metavar="PATH", help="write the full report as JSON to PATH")
    parser.add_argument("--plot", metavar="DIR", help="write spectrum.png, mutual_information.png, "
                                                      "ramachandran.png and interpolation.dcd/.pdb to DIR")
    parser.add_argument("--stride", type=int, default=1, help="read every STRIDE-th frame (default: 1)")
    parser.add_argument("--weights", nargs="+",
                        help="per-frame weight files, one per trajectory (e.g. from 'nct sample --metadynamics'): "
                             "the PCA baseline is then fitted to the reweighted distribution, like the model")
    parser.add_argument("--modes", type=int, default=6, help="slowest modes tabulated and analysed (default: 6)")
    parser.set_defaults(func=run)


def run(args):
    """Analyse, print a table, write the requested files; returns the exit code."""
    if args.stride < 1 or args.modes < 1:
        raise CommandError("--stride and --modes must be positive")
    if args.json:
        checkOutputFolder(args.json, "--json")
    model = SlowModeModel.load(args.model)
    data = load_model_data(model, args.traj, args.top, args.stride, args.weights)
    if data.n_frames < 10:
        raise CommandError(f"only {data.n_frames} frames to analyse; the estimates need at least 10")
    report = {"model": os.fspath(args.model), "trajectories": [os.fspath(p) for p in args.traj],
              "stride": args.stride}
    report.update(spectrum_report(model, data))
    report.update(_training_provenance(model, args.traj))
    try:
        info = dihedral_information(model, data, n_modes=args.modes)
        report.update({key: info[key] for key in ("mi_phi", "mi_psi", "pca_mi_phi", "pca_mi_psi", "mi_frames",
                                                  "mi_ensemble")})
        report["mi_units"] = info["units"]
        phi, psi = backbone_dihedrals(_selected_trajectory(data.positions, data, data.boxes))
    except ValueError as error:
        if "needs a peptide" not in str(error):
            raise
        report.update(mi_phi=None, mi_psi=None, pca_mi_phi=None, pca_mi_psi=None, mi_note=str(error))
        phi = psi = None
    start, end, reason = _interpolation_endpoints(model, data, phi)
    path = interpolate(model, data.positions[start], data.positions[end], n_frames=PATH_FRAMES,
                       start_box=None if data.boxes is None else data.boxes[start],
                       end_box=None if data.boxes is None else data.boxes[end])
    report["interpolation"] = {"method": "SLERP of the whole latent vector ε = ωQ, decoded",
                               "choice": reason, "start": _frame_label(data, start), "end": _frame_label(data, end),
                               "log_likelihood": path.log_likelihood.tolist(),
                               "log_likelihood_kind": "configuration space, ln ρ(u), exact Jacobian"}
    _print_table(report, args.modes)
    if args.plot:
        written = _write_figures(model, data, report, path, phi, psi, Path(args.plot))
        print("wrote " + ", ".join(str(p) for p in written))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
        print(f"wrote {args.json}")
    return 0


def load_model_data(model, paths, topology, stride=1, weights=None):
    """Frames of the model's own atom selection, with checks that the topology is the model's system.

    Raises
    ------
    CommandError
        When the topology has too few atoms or atoms whose masses differ from the model's.
    """
    top = load_topology(topology)
    indices = model.atom_indices
    if max(indices) >= top.n_atoms:
        raise CommandError(f"the topology {topology} has {top.n_atoms} atoms but the model reads atom indices up to "
                           f"{max(indices)}: it belongs to another system")
    # mdtraj selections come back sorted; the model's order is what its frame reads, so permute if they differ.
    data = load_trajectories(paths, topology, selection="index " + " ".join(map(str, indices)), stride=stride,
                             weights=weights)
    if data.atom_indices != indices:
        permutation = [data.atom_indices.index(i) for i in indices]
        data = dataclasses.replace(data, positions=data.positions[:, permutation], atom_indices=list(indices),
                                   masses=data.masses[permutation], bonds=local_bonds(top, indices))
    model_masses = model.frame.masses.numpy()
    mismatch = np.flatnonzero(~np.isclose(data.masses, model_masses, rtol=1e-3))
    if len(mismatch):
        i = int(mismatch[0])
        raise CommandError(f"atom {indices[i]} ({top.atom(indices[i])}) of {topology} has mass {data.masses[i]:.3f} "
                           f"but the model's atom there has {model_masses[i]:.3f} ({len(mismatch)} mismatches): "
                           "the topology is not the one the model was trained on")
    return data


def _same_file(a, b):
    """Whether two paths name the same file (by identity when both exist, else by normalised absolute path)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.normpath(os.path.abspath(a)) == os.path.normpath(os.path.abspath(b))


def _training_provenance(model, paths):
    """The model's training sources and which analysed trajectories are among them."""
    sources = list(model.metadata.get("training", {}).get("sources", []))
    flags = {os.fspath(p): any(_same_file(p, s) for s in sources) for p in paths}
    return {"training_sources": sources, "analysed_in_training": flags,
            "analysed_trajectory_in_training": any(flags.values()),
            "training_sources_note": "every file given to training, validation hold-outs included"}


def _selected_trajectory(positions, data, boxes=None):
    """An mdtraj trajectory of the selected atoms, for dihedrals; with ``boxes`` they are measured across periodic
    boundaries."""
    traj = mdtraj.Trajectory(positions, data.topology.subset(data.atom_indices))
    if boxes is not None:
        traj.unitcell_vectors = np.asarray(boxes, dtype=np.float32)
    return traj


def _frame_label(data, i):
    """Where analysed frame ``i`` comes from."""
    return {"index": int(i), "source": data.sources[data.trajectory_ids[i]], "frame": int(data.frame_indices[i])}


def _interpolation_endpoints(model, data, phi):
    """Two frames to interpolate between, and why they were chosen.

    Peptides: the first frame and the frame of the other Φ basin's core closest to the core's centre, or, when the
    data visit one basin only, the two frames farthest apart in Φ (measured from the circular mean, so that −179°
    and 179° count as neighbours). Other systems: the first frame and the frame farthest from it along the
    slowest mode.
    """
    if phi is None:
        slowest = model.transform(data, k=1)[:, 0]
        end = int(np.argmax(np.abs(slowest - slowest[0])))
        return 0, end, "first frame and the frame farthest from it along the slowest mode"
    phi = np.angle(np.exp(1j * phi))
    other = UPPER_CORE if phi[0] <= 0 else LOWER_CORE
    in_other = np.flatnonzero((phi >= other[0]) & (phi <= other[1]))
    if len(in_other):
        centre = 0.5 * (other[0] + other[1])
        end = int(in_other[np.argmin(np.abs(phi[in_other] - centre))])
        return 0, end, "first frame and a frame in the other Φ basin"
    relative = np.angle(np.exp(1j * (phi - np.angle(np.mean(np.exp(1j * phi))))))
    return int(np.argmin(relative)), int(np.argmax(relative)), "the two most distant Φ frames (one Φ basin visited)"


def _print_table(report, n_modes):
    """Spectrum and mutual information per mode, NCT next to PCA."""
    frequencies, pca = report["frequencies"], report["pca_frequencies"]
    gap, pca_gap = report["gap"], report["pca_gap"]
    print(f"{report['n_frames']} frames, {report['n_modes']} internal modes; analysed trajectory in training "
          f"sources: {'yes' if report['analysed_trajectory_in_training'] else 'no'}")
    print(f"NCT: span {report['span']:.3g}, largest gap x{gap['ratio']:.2f} after mode {gap['index']}; "
          f"PCA: span {report['pca_span']:.3g}, largest gap x{pca_gap['ratio']:.2f} after mode {pca_gap['index']}")
    has_mi = report["mi_phi"] is not None
    header = f"{'mode':>4}  {'ω NCT [1/ps]':>12}  {'ω PCA [1/ps]':>12}"
    if has_mi:
        header += f"  {'I(Φ) NCT':>9}  {'I(Ψ) NCT':>9}  {'I(Φ) PCA':>9}  {'I(Ψ) PCA':>9}  [nats]"
    print(header)
    for k in range(min(n_modes, len(frequencies))):
        row = f"{k:>4}  {frequencies[k]:>12.4g}  {pca[k]:>12.4g}"
        if has_mi and k < len(report["mi_phi"]):
            row += "".join(f"  {report[key][k]:>9.3f}" for key in ("mi_phi", "mi_psi", "pca_mi_phi", "pca_mi_psi"))
        print(row)
    if not has_mi:
        print(f"no mutual information: {report['mi_note']}")


def _write_figures(model, data, report, path, phi, psi, folder):
    """Figures and the interpolation's structure files; returns the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = [plot_spectrum(report["frequencies"], folder / "spectrum.png", baseline=report["pca_frequencies"],
                             baseline_label="harmonic PCA", label="NCT")]
    if phi is not None:
        written.append(plot_mutual_information(report["mi_phi"], report["mi_psi"], folder / "mutual_information.png",
                                               report["pca_mi_phi"], report["pca_mi_psi"], label="NCT modes",
                                               baseline_label="PCA modes"))
        written.append(_ramachandran(model, data, report, path, phi, psi, folder / "ramachandran.png"))
    topology = data.topology.subset(data.atom_indices)
    for suffix in ("dcd", "pdb"):
        target = folder / f"interpolation.{suffix}"
        write_positions_as_trajectory(path.positions, topology, target)
        written.append(target)
    return written


def _ramachandran(model, data, report, path, phi, psi, target):
    """Data, decoded prior samples and the interpolation path on one Ramachandran map."""
    import torch

    Q, _ = model.flow.prior.sample(PRIOR_SAMPLES, torch.Generator().manual_seed(0))
    sample_phi, sample_psi = backbone_dihedrals(_selected_trajectory(model.positions_from_latent(Q), data))
    path_phi, path_psi = backbone_dihedrals(_selected_trajectory(path.positions, data))
    used = "training data" if report["analysed_trajectory_in_training"] else "not used in training"
    start, end = report["interpolation"]["start"]["index"], report["interpolation"]["end"]["index"]
    return plot_ramachandran([
        (f"analysed frames ({data.n_frames}, {used})", phi, psi, "points"),
        (f"decoded prior samples ({PRIOR_SAMPLES})", sample_phi, sample_psi, "points"),
        (f"latent SLERP path, frame {start} → {end}", path_phi, path_psi, "path"),
    ], target)
