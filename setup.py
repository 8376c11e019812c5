from setuptools import find_packages, setup

setup(
    name="megamu",
    version="0.1.0",
    description="DeepSpeed/Megatron-style LLM pretraining with tested muP and loss prediction (muScaling)",
    packages=find_packages(include=["megamu", "megamu.*"]),
    python_requires=">=3.10",
    install_requires=[
        # A range, so GPU users keep their CUDA build; CPU machines pin 2.13.0 in the Makefile.
        "torch>=2.4,<2.20",
        "deepspeed>=0.19.3",
        "sentencepiece>=0.2",
        "datasets>=2.18",
        "numpy>=1.24",
        "scipy>=1.10",
        "matplotlib>=3.7",
        "tqdm>=4.60",
        "pyyaml>=6.0",
    ],
    extras_require={
        "wandb": ["wandb>=0.16"],
        "apex": [],  # NVIDIA apex is never required; megamu uses torch-native fused ops.
        "dev": ["pytest>=7", "pytest-timeout>=2", "wandb>=0.16"],
        "bench": ["transformers>=4.40"],  # benchmarks/bench_train.py compares with HF LlamaForCausalLM
    },
    entry_points={
        "console_scripts": [
            "megamu-train=megamu.train:main",
        ]
    },
)
