"""Error messages shown to users, shared by every layer: no dependencies, so that the torch-free modules
(:mod:`nct_openmm.data`) and the core (:mod:`nct_openmm.core`) can both import it."""


def error_line(error: BaseException) -> str:
    """The first non-blank line of an exception's message (OpenMM and torch append tracebacks, some readers start
    with a newline), or its type name when the message is blank.

    Examples
    --------
    >>> error_line(ValueError("\\nbad file\\n  detail"))
    'bad file'
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
