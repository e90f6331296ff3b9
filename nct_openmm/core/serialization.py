"""The versioned model file: one ``torch.save`` archive of plain tensors, numbers and strings.

Loading uses ``weights_only=True``, so a model file can never execute code, and checks a format name and version
so that a foreign, corrupt or newer file fails with a message that says which.
"""
import os

import torch

from ..messages import error_line

FORMAT_NAME = "nct_openmm.model"
FORMAT_VERSION = 1


class ModelFileError(ValueError):
    """A model file that cannot be used: unreadable, corrupt, foreign or of an unsupported format version."""


def save_payload(path, payload: dict) -> None:
    """Write ``payload`` with the format header; the file appears whole or not at all.

    Raises
    ------
    ValueError
        When the payload holds something ``weights_only`` loading would refuse (numpy numbers, paths, objects):
        caught here rather than when the file is read back.
    """
    _check_plain(payload, "payload")
    document = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **payload}
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(document, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_payload(path, kind: str) -> dict:
    """Read a file written by :func:`save_payload` and check that it holds a ``kind`` model.

    Raises
    ------
    FileNotFoundError
        No such file.
    ModelFileError
        The file is not an nct_openmm model of this version and kind.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model file not found: {path}")
    try:
        document = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for garbage input
        raise ModelFileError(f"{path} is not a readable nct_openmm model file (corrupt or foreign): "
                             f"{type(error).__name__}") from error
    if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
        raise ModelFileError(f"{path} is not an nct_openmm model file (no '{FORMAT_NAME}' header)")
    version = document.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelFileError(f"{path} has model format version {version}; this nct_openmm reads version "
                             f"{FORMAT_VERSION} (re-train or re-export it with a matching nct_openmm)")
    if document.get("kind") != kind:
        raise ModelFileError(f"{path} holds a {document.get('kind')!r} model, expected {kind!r}")
    return document


def rebuilt(path, build):
    """``build()`` (a model from a loaded document), with a damaged or incompatible document as ModelFileError."""
    try:
        return build()
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise ModelFileError(f"{path} is an incomplete or damaged nct_openmm model file "
                             f"({type(error).__name__}: {error_line(error)})") from error


def _check_plain(value, where: str) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where} has a key {key!r} that is not a string")
            _check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
    elif not (value is None or type(value) in (str, bool, int, float) or isinstance(value, torch.Tensor)):
        # type(), not isinstance(): numpy's float64 subclasses float but is stored as a numpy object.
        raise ValueError(f"{where} is a {type(value).__name__}; a model file holds only strings, numbers, "
                         "booleans, None, tensors, and lists and dicts of them (convert it, e.g. with float() or "
                         "str())")
