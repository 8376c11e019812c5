from setuptools import find_packages, setup

setup(
    name="megamu",
    version="0.1.0",
    description="DeepSpeed/Megatron-style LLM pretraining with tested muP and loss prediction (muScaling)",
    # configs/ and ds_configs/ stay at the repository root and install as megamu.configs / megamu.ds_configs,
    # so shipped configs are found by name (megamu/shipped.py) wherever megamu is installed.
    packages=[*find_packages(include=["megamu", "megamu.*"]), "megamu.configs", "megamu.ds_configs"],
    package_dir={"megamu.configs": "configs", "megamu.ds_configs": "ds_configs"},
    package_data={"megamu.configs": ["*.yaml"], "megamu.ds_configs": ["*.json"]},
    python_requires=">=3.10",
    install_requires=[
        # A range, so GPU users keep their CUDA build; CPU machines pin 2.13.0 in the Makefile.
        "torch>=2.4,<2.20",
        "deepspeed>=0.19.3,<0.20",  # the pipeline module overrides a private DeepSpeed method
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
        # transformers: tests and benchmarks compare with HF LlamaForCausalLM of the same shape
        # lm_eval[hf]: tests/test_export_hf.py scores a local task on an exported model through the harness's API
        "dev": ["pytest>=7", "pytest-timeout>=2", "wandb>=0.16", "transformers>=4.40", "torchao>=0.18,<0.19",
                "lm_eval[hf]>=0.4.13,<0.5"],
        "bench": ["transformers>=4.40"],
        # train.fp8: megamu calls torchao's FP8 training matmul, an internal of its Float8Linear
        "fp8": ["torchao>=0.18,<0.19"],
        # megamu-export-hf: transformers builds the model directory and the tokenizer, saved as safetensors
        "export": ["transformers>=5", "safetensors>=0.4"],
    },
    entry_points={
        "console_scripts": [
            "megamu-train=megamu.train:main",
            "megamu-preprocess=megamu.cli.preprocess:main",
            "megamu-train-tokenizer=megamu.cli.train_tokenizer:main",
            "megamu-predict=megamu.cli.predict:main",
            "megamu-plan=megamu.cli.plan:main",
            "megamu-sweep=megamu.cli.sweep:main",
            "megamu-scale=megamu.cli.scale:main",
            "megamu-coord-check=megamu.cli.coord_check:main",
            "megamu-merge=megamu.cli.merge:main",
            "megamu-demo=megamu.demo:main",
            "megamu-curve=megamu.cli.curve:main",
            "megamu-export-hf=megamu.cli.export_hf:main",
            "megamu-generate=megamu.cli.generate:main",
            "megamu-eval=megamu.cli.evaluate:main",
            "megamu-import-hf=megamu.cli.import_hf:main",
        ]
    },
)
