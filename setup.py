"""Installation of nct_openmm.

The binary-coupled stack (torch, openmm, openmm-torch) is pinned to the combination verified to work together
(see README, "Dependency stack"): openmm-torch binaries are ABI-tied to one torch minor and one OpenMM version.
"""
from setuptools import find_packages, setup

setup(
    name="nct_openmm",
    version="0.1.0",
    description="Neural canonical transformations: learned slow collective variables for OpenMM",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["nct_openmm", "nct_openmm.*"]),
    install_requires=[
        "torch==2.11.0",
        "openmm[cuda13]==8.5.2",
        "acellera-openmmtorch-cu13==1.10",
        "mdtraj>=1.11,<1.12",
        "tables",  # PyTables: mdtraj reads and writes HDF5 trajectories through it
        "openmmtools==0.27.0",
        "numpy",
        "scipy",
        "tqdm",
        "matplotlib",
    ],
    extras_require={"test": ["pytest"]},
    entry_points={"console_scripts": ["nct=nct_openmm.cli:main"]},
)
